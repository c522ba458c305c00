"""The workload registry: built-ins, entry-point plugins and ``--plugin FILE.py``, all alike.

Mirrors ``routers.registry``: ``@register_workload("name")`` stores the class and returns it
unchanged; names are looked up exactly; an unknown name raises an error listing the valid ones.
Installed packages add workloads through the entry-point group ``moe_bench.workloads``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from moe_routing_bench.routers import registry as router_registry

from .base import Workload, WorkloadError, config_from_options

ENTRY_POINT_GROUP = "moe_bench.workloads"

_REGISTRY = router_registry.Registry(
    "workload",
    Workload,
    WorkloadError,
    "moe_routing_bench.workloads.builtin",
    ENTRY_POINT_GROUP,
    ",=",
    "spaces, ',' or '='",
)

W = TypeVar("W", bound=type[Workload])


def register_workload(name: str, description: str | None = None) -> Callable[[W], W]:
    """Class decorator: register a :class:`Workload` subclass under ``name``.

    The one-line description defaults to the first line of the class docstring.
    """
    return _REGISTRY.register(name, description, "register_workload")


def load_plugin(path: str | Path) -> tuple[list[str], list[str]]:
    """Execute a plugin file once; the routers and workloads it registers join their registries.

    Returns (routers added, workloads added). The file runs through the router registry's loader,
    so one ``--plugin`` may define either or both.
    """
    _REGISTRY.ensure_loaded()
    before = set(_REGISTRY.classes)
    routers_added = router_registry.load_plugin(path)
    added = sorted(set(_REGISTRY.classes) - before)
    if added:
        _REGISTRY.plugins.append(f"file {Path(path).resolve()} (workloads: {', '.join(added)})")
    return routers_added, added


def loaded_plugins() -> list[str]:
    """What workload plugins this process loaded, for run metadata."""
    return _REGISTRY.loaded_plugins()


def workload_names() -> list[str]:
    return _REGISTRY.names()


def list_workloads() -> list[tuple[str, str]]:
    """(name, one-line description) for every registered workload, sorted by name."""
    return _REGISTRY.listing()


def get_workload_class(name: str) -> type[Workload]:
    return _REGISTRY.get(name)


def workload_options(name: str) -> dict[str, Any]:
    """Workload ``name``'s config fields and their defaults (what ``--workload-opt`` may set)."""
    cls = get_workload_class(name).config_cls
    return {f.name: f.default for f in dataclasses.fields(cls)}


def build_workload(name: str, options: dict[str, Any] | None = None, seed: int | None = None) -> Workload:
    """Build workload ``name`` from options (strings are parsed by the config field types).

    seed: the workload's seed unless ``options`` sets one itself.
    """
    cls = get_workload_class(name)
    opts = dict(options or {})
    if seed is not None:
        opts.setdefault("seed", seed)
    return cls(config_from_options(cls.config_cls, opts))
