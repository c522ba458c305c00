"""The router registry: built-ins, entry-point plugins and ``--plugin FILE.py``, all alike.

``@register_router("name")`` stores the class and returns it unchanged (timm's pattern). Names are
looked up exactly; an unknown name raises an error listing the valid ones.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

from .contract import Router, RoutingError, config_from_options

ENTRY_POINT_GROUP = "moe_bench.routers"

_ROUTERS: dict[str, type[Router]] = {}
_DESCRIPTIONS: dict[str, str] = {}
_ORIGINS: dict[str, str] = {}
_LOADED_PLUGINS: list[str] = []
_entry_points_loaded = False

R = TypeVar("R", bound=type[Router])


def register_router(name: str, description: str | None = None) -> Callable[[R], R]:
    """Class decorator: register a :class:`Router` subclass under ``name``.

    The one-line description defaults to the first line of the class docstring.
    """
    if not name or not isinstance(name, str) or any(c.isspace() or c == "," for c in name):
        raise RoutingError(f"router name must be a non-empty string without spaces or commas (got {name!r})")

    def deco(cls: R) -> R:
        if not (isinstance(cls, type) and issubclass(cls, Router)):
            raise RoutingError(f"@register_router({name!r}) must decorate a Router subclass (got {cls!r})")
        existing = _ROUTERS.get(name)
        if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
            raise RoutingError(f"router {name!r} is already registered by {existing.__module__}")
        cls.name = name
        _ROUTERS[name] = cls
        doc = (cls.__doc__ or "").strip().splitlines()
        _DESCRIPTIONS[name] = description or (doc[0] if doc else "")
        _ORIGINS[name] = cls.__module__
        return cls

    return deco


def _ensure_loaded() -> None:
    """Import the built-ins and every installed entry-point plugin, once."""
    global _entry_points_loaded
    importlib.import_module("routers.builtin")
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as exc:  # a broken plugin must not hide the built-ins
            print(f"warning: router plugin {ep.name!r} ({ep.value}) failed to load: {exc}", file=sys.stderr)
            continue
        if isinstance(obj, type) and issubclass(obj, Router) and ep.name not in _ROUTERS:
            register_router(ep.name)(obj)
        _LOADED_PLUGINS.append(f"entry point {ep.name} = {ep.value}")


def load_plugin(path: str | Path) -> list[str]:
    """Execute a plugin file; routers it registers join the registry. Returns their names."""
    p = Path(path)
    if p.suffix != ".py" or not p.is_file():
        raise RoutingError(f"--plugin must name an existing .py file (got {str(path)!r})")
    _ensure_loaded()
    before = set(_ROUTERS)
    module_name = f"moe_bench_plugin_{p.stem}"
    spec = importlib.util.spec_from_file_location(module_name, p)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except RoutingError:
        raise
    except Exception as exc:
        raise RoutingError(f"--plugin {p}: failed to load: {type(exc).__name__}: {exc}") from exc
    added = sorted(set(_ROUTERS) - before)
    _LOADED_PLUGINS.append(f"file {p.resolve()} ({', '.join(added) or 'no new routers'})")
    return added


def loaded_plugins() -> list[str]:
    """What plugins this process loaded, for run metadata (a plugin is code the user chose)."""
    _ensure_loaded()
    return list(_LOADED_PLUGINS)


def router_names() -> list[str]:
    _ensure_loaded()
    return sorted(_ROUTERS)


def list_routers() -> list[tuple[str, str]]:
    """(name, one-line description) for every registered router, sorted by name."""
    _ensure_loaded()
    return [(n, _DESCRIPTIONS[n]) for n in sorted(_ROUTERS)]


def get_router_class(name: str) -> type[Router]:
    _ensure_loaded()
    try:
        return _ROUTERS[name]
    except KeyError:
        raise RoutingError(f"unknown router {name!r}; valid routers: {', '.join(sorted(_ROUTERS))}") from None


def config_fields(name: str) -> list[str]:
    """Names of router ``name``'s config fields (what ``--router-opt`` may set)."""
    return [f.name for f in dataclasses.fields(get_router_class(name).config_cls)]


def build_router(name: str, **options: Any) -> Router:
    """Build router ``name`` from options (strings are parsed by the config field types)."""
    cls = get_router_class(name)
    return cls(config_from_options(cls.config_cls, options))
