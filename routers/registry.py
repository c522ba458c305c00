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

T = TypeVar("T", bound=type)


class Registry:
    """Named classes of one kind (routers, workloads): exact-name lookup, one-line descriptions,
    and plugins from an entry-point group, imported once, beside the built-ins.

    kind: the word in messages ("router"); base: what a registered class must subclass;
    error: the exception raised; builtin: the module whose import registers the built-ins;
    forbidden/name_rule: characters a name may not hold, and how the error says so.
    """

    def __init__(
        self,
        kind: str,
        base: type,
        error: type[Exception],
        builtin: str,
        group: str,
        forbidden: str,
        name_rule: str,
    ) -> None:
        self.kind, self.base, self.error = kind, base, error
        self.builtin, self.group = builtin, group
        self.forbidden, self.name_rule = forbidden, name_rule
        self.classes: dict[str, type] = {}
        self.descriptions: dict[str, str] = {}
        self.plugins: list[str] = []
        self.entry_points_loaded = False

    def register(self, name: str, description: str | None, decorator: str) -> Callable[[T], T]:
        if not name or not isinstance(name, str) or any(c.isspace() or c in self.forbidden for c in name):
            raise self.error(f"{self.kind} name must be a non-empty string without {self.name_rule} (got {name!r})")

        def deco(cls: T) -> T:
            if not (isinstance(cls, type) and issubclass(cls, self.base)):
                raise self.error(f"@{decorator}({name!r}) must decorate a {self.base.__name__} subclass (got {cls!r})")
            existing = self.classes.get(name)
            if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
                raise self.error(f"{self.kind} {name!r} is already registered by {existing.__module__}")
            cls.name = name
            self.classes[name] = cls
            doc = (cls.__doc__ or "").strip().splitlines()
            self.descriptions[name] = description or (doc[0] if doc else "")
            return cls

        return deco

    def ensure_loaded(self) -> None:
        """Import the built-ins and every installed entry-point plugin, once."""
        importlib.import_module(self.builtin)
        if self.entry_points_loaded:
            return
        self.entry_points_loaded = True
        for ep in metadata.entry_points(group=self.group):
            try:
                obj = ep.load()
            except Exception as exc:  # a broken plugin must not hide the built-ins
                print(
                    f"warning: {self.kind} plugin {ep.name!r} ({ep.value}) failed to load: {exc}",
                    file=sys.stderr,
                )
                continue
            if isinstance(obj, type) and issubclass(obj, self.base) and ep.name not in self.classes:
                self.register(ep.name, None, "entry point")(obj)
            self.plugins.append(f"entry point {ep.name} = {ep.value}")

    def names(self) -> list[str]:
        self.ensure_loaded()
        return sorted(self.classes)

    def listing(self) -> list[tuple[str, str]]:
        """(name, one-line description) for every registered class, sorted by name."""
        return [(n, self.descriptions[n]) for n in self.names()]

    def get(self, name: str) -> type:
        self.ensure_loaded()
        try:
            return self.classes[name]
        except KeyError:
            valid = ", ".join(sorted(self.classes))
            raise self.error(f"unknown {self.kind} {name!r}; valid {self.kind}s: {valid}") from None

    def loaded_plugins(self) -> list[str]:
        self.ensure_loaded()
        return list(self.plugins)


_REGISTRY = Registry(
    "router",
    Router,
    RoutingError,
    "moe_routing_bench.routers.builtin",
    ENTRY_POINT_GROUP,
    ",",
    "spaces or commas",
)

R = TypeVar("R", bound=type[Router])


def register_router(name: str, description: str | None = None) -> Callable[[R], R]:
    """Class decorator: register a :class:`Router` subclass under ``name``.

    The one-line description defaults to the first line of the class docstring.
    """
    return _REGISTRY.register(name, description, "register_router")


def load_plugin(path: str | Path) -> list[str]:
    """Execute a plugin file; routers it registers join the registry. Returns their names."""
    p = Path(path)
    if p.suffix != ".py" or not p.is_file():
        raise RoutingError(f"--plugin must name an existing .py file (got {str(path)!r})")
    _REGISTRY.ensure_loaded()
    before = set(_REGISTRY.classes)
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
    added = sorted(set(_REGISTRY.classes) - before)
    _REGISTRY.plugins.append(f"file {p.resolve()} ({', '.join(added) or 'no new routers'})")
    return added


def loaded_plugins() -> list[str]:
    """What plugins this process loaded, for run metadata (a plugin is code the user chose)."""
    return _REGISTRY.loaded_plugins()


def router_names() -> list[str]:
    return _REGISTRY.names()


def list_routers() -> list[tuple[str, str]]:
    """(name, one-line description) for every registered router, sorted by name."""
    return _REGISTRY.listing()


def get_router_class(name: str) -> type[Router]:
    return _REGISTRY.get(name)


def config_fields(name: str) -> list[str]:
    """Names of router ``name``'s config fields (what ``--router-opt`` may set)."""
    return [f.name for f in dataclasses.fields(get_router_class(name).config_cls)]


def build_router(name: str, **options: Any) -> Router:
    """Build router ``name`` from options (strings are parsed by the config field types)."""
    cls = get_router_class(name)
    return cls(config_from_options(cls.config_cls, options))
