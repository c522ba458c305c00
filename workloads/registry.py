"""The workload registry: built-ins, entry-point plugins and ``--plugin FILE.py``, all alike.

Mirrors ``routers.registry``: ``@register_workload("name")`` stores the class and returns it
unchanged; names are looked up exactly; an unknown name raises an error listing the valid ones.
Installed packages add workloads through the entry-point group ``moe_bench.workloads``.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

from routers import registry as router_registry

from .base import Workload, WorkloadError, config_from_options

ENTRY_POINT_GROUP = "moe_bench.workloads"

_WORKLOADS: dict[str, type[Workload]] = {}
_DESCRIPTIONS: dict[str, str] = {}
_ORIGINS: dict[str, str] = {}
_LOADED_PLUGINS: list[str] = []
_entry_points_loaded = False

W = TypeVar("W", bound=type[Workload])


def register_workload(name: str, description: str | None = None) -> Callable[[W], W]:
    """Class decorator: register a :class:`Workload` subclass under ``name``.

    The one-line description defaults to the first line of the class docstring.
    """
    if not name or not isinstance(name, str) or any(c.isspace() or c in ",=" for c in name):
        raise WorkloadError(
            f"workload name must be a non-empty string without spaces, ',' or '=' (got {name!r})"
        )

    def deco(cls: W) -> W:
        if not (isinstance(cls, type) and issubclass(cls, Workload)):
            raise WorkloadError(
                f"@register_workload({name!r}) must decorate a Workload subclass (got {cls!r})"
            )
        existing = _WORKLOADS.get(name)
        if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
            raise WorkloadError(f"workload {name!r} is already registered by {existing.__module__}")
        cls.name = name
        _WORKLOADS[name] = cls
        doc = (cls.__doc__ or "").strip().splitlines()
        _DESCRIPTIONS[name] = description or (doc[0] if doc else "")
        _ORIGINS[name] = cls.__module__
        return cls

    return deco


def _ensure_loaded() -> None:
    """Import the built-ins and every installed entry-point plugin, once."""
    global _entry_points_loaded
    importlib.import_module("workloads.builtin")
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as exc:  # a broken plugin must not hide the built-ins
            print(f"warning: workload plugin {ep.name!r} ({ep.value}) failed to load: {exc}", file=sys.stderr)
            continue
        if isinstance(obj, type) and issubclass(obj, Workload) and ep.name not in _WORKLOADS:
            register_workload(ep.name)(obj)
        _LOADED_PLUGINS.append(f"entry point {ep.name} = {ep.value}")


def load_plugin(path: str | Path) -> tuple[list[str], list[str]]:
    """Execute a plugin file once; the routers and workloads it registers join their registries.

    Returns (routers added, workloads added). The file runs through the router registry's loader,
    so one ``--plugin`` may define either or both.
    """
    _ensure_loaded()
    before = set(_WORKLOADS)
    routers_added = router_registry.load_plugin(path)
    added = sorted(set(_WORKLOADS) - before)
    if added:
        _LOADED_PLUGINS.append(f"file {Path(path).resolve()} (workloads: {', '.join(added)})")
    return routers_added, added


def loaded_plugins() -> list[str]:
    """What workload plugins this process loaded, for run metadata."""
    _ensure_loaded()
    return list(_LOADED_PLUGINS)


def workload_names() -> list[str]:
    _ensure_loaded()
    return sorted(_WORKLOADS)


def list_workloads() -> list[tuple[str, str]]:
    """(name, one-line description) for every registered workload, sorted by name."""
    _ensure_loaded()
    return [(n, _DESCRIPTIONS[n]) for n in sorted(_WORKLOADS)]


def get_workload_class(name: str) -> type[Workload]:
    _ensure_loaded()
    try:
        return _WORKLOADS[name]
    except KeyError:
        raise WorkloadError(
            f"unknown workload {name!r}; valid workloads: {', '.join(sorted(_WORKLOADS))}"
        ) from None


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
