"""Options to configs, once for routers and workloads: strings parsed by a field's declared type.

A user names options as strings (``--router-opt top_k=4``, ``topk[top_k=4]``, ``--workload-opt
s=1.2``) or as typed values (TOML, Python). :func:`config_from_options` builds a frozen config from
either; unknown keys and unparsable values raise the caller's error type with a message naming the
option and what is allowed. ``workloads/`` imports this module (routers never import workloads).

A config field can be *fixed*: its metadata carries ``FIXED`` with the reason (switch's ``top_k``
is always 1, dense has no capacity). Shared flags (``--top-k``, ``--capacity-factor``) skip such
a field and say so once; an option the user names for that router alone still reaches it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal, get_args, get_origin, get_type_hints

FIXED = "fixed"  # field metadata key: why a shared flag does not apply to this field


def fixed(default: Any, why: str) -> Any:
    """A dataclass field whose value a shared flag does not set, with the reason it says once."""
    return dataclasses.field(default=default, metadata={FIXED: why})


def fixed_reason(config_cls: type, name: str) -> str | None:
    """Why ``config_cls.name`` ignores shared flags, or None when it takes them."""
    for f in dataclasses.fields(config_cls):
        if f.name == name:
            return f.metadata.get(FIXED)
    return None


def literal_choices(cls: type, name: str) -> tuple[Any, ...] | None:
    """The allowed values of a ``Literal[...]`` field, or None for other types."""
    hint = get_type_hints(cls).get(name)
    if get_origin(hint) is Literal:
        return get_args(hint)
    return None


def check_literals(cfg: object, error: Callable[[str], Exception], prefix: str = "") -> None:
    """Raise ``error`` naming the first ``Literal`` field whose value is not one of its choices."""
    for f in dataclasses.fields(cfg):  # type: ignore[arg-type]
        choices = literal_choices(type(cfg), f.name)
        value = getattr(cfg, f.name)
        if choices is not None and value not in choices:
            allowed = ", ".join(repr(c) for c in choices)
            raise error(f"{prefix}{f.name} must be one of {allowed} (got {value!r})")


def parse_option(raw: str, hint: Any) -> Any:
    """Parse a command-line string by a config field's declared type (bool, int, float, str,
    Literal, or an Optional of those; 'none' gives None where the type allows it). Raises
    ValueError saying what was wanted; callers add which option it was."""
    text = raw.strip()
    args = get_args(hint)
    if text.lower() in ("none", "null") and type(None) in args:
        return None
    if get_origin(hint) is Literal:
        return text
    candidates = [a for a in args if a is not type(None)] or [hint]
    for typ in candidates:
        try:
            if typ is bool:
                low = text.lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            if typ is int:
                return int(text)
            if typ is float:
                return float(text)
            if typ is str:
                return text
        except ValueError:
            continue
    wanted = " or ".join(getattr(t, "__name__", str(t)) for t in candidates)
    raise ValueError(f"must be {wanted} (got {raw!r})")


def config_from_options(
    config_cls: type,
    options: dict[str, Any],
    error: Callable[[str], Exception],
    unknown: Callable[[str, list[str]], str],
    bad_value: Callable[[str, str], str],
) -> Any:
    """Build ``config_cls(**options)``, parsing string values by each field's type.

    error: the exception type to raise. unknown(key, valid names) and bad_value(key, reason): the
    messages for an option the config lacks and for a string that does not parse.
    """
    hints = get_type_hints(config_cls)
    names = [f.name for f in dataclasses.fields(config_cls)]
    values: dict[str, Any] = {}
    for key, raw in options.items():
        if key not in names:
            raise error(unknown(key, names))
        if isinstance(raw, str):
            try:
                values[key] = parse_option(raw, hints[key])
            except ValueError as exc:
                raise error(bad_value(key, str(exc))) from None
        else:
            values[key] = raw
    return config_cls(**values)
