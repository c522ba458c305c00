"""Naming a router or workload with options, and the one meaning of the shared flags.

One syntax names a router or a workload with options, everywhere (command lines, sweep files,
reports): ``name`` or ``name[key=value,key=value]``, e.g. ``topk[top_k=4,drop_policy=probs]`` or
``text[lang=de]``; a comma list splits only outside brackets. A sweep file may also write the
table ``{ name = "...", opts = {...}, label = "..." }``. ``--router-opt key=value`` (every selected
router with that field) and ``--router-opt name.key=value`` (router ``name`` only) add options.

The shared flags mean the same in every command (route, run, simulate, ep, quality):

- ``--capacity-factor``: a number > 0, ``none`` (dropless) or ``default`` (each router's own). It
  applies to every router that has a capacity, ``topk`` included; a router without one (``dense``)
  ignores it, and the command says so once.
- ``--top-k``: applies to every router whose K is free; a router with a fixed K (switch, gshard,
  hash, dense) keeps its own, said once. A K no router of the selection can take is refused.

An option named for one router (``topk[capacity_factor=2.0]``, ``--router-opt topk.top_k=4``)
overrides a shared flag for that router, and is never silently dropped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from moe_routing_bench.routers.contract import RoutingError
from moe_routing_bench.routers.options import fixed_reason
from moe_routing_bench.routers.registry import build_router, config_fields, get_router_class

DEFAULT = "default"  # the capacity factor (or K) of each router's own config
INT64_MAX = 2**63 - 1  # the largest count a Parquet int64 column (and a tensor's size) holds
SEED_MAX = 2**32 - 1  # the largest seed: every generator the harness seeds accepts it
DROPLESS_WORDS = ("none", "dropless")
CapacityFactor = float | None | str  # a number > 0, None (dropless) or DEFAULT


@dataclass(frozen=True)
class Spec:
    """A router or workload name with options (strings are parsed by its config's field types)
    and the label its rows carry (``name`` or ``name[k=v,...]`` unless given)."""

    name: str
    options: tuple[tuple[str, Any], ...] = ()
    label: str = ""

    def __post_init__(self) -> None:
        if not self.label:
            object.__setattr__(self, "label", format_spec(self.name, self.opts))

    @property
    def opts(self) -> dict[str, Any]:
        return dict(self.options)

    def with_options(self, extra: dict[str, Any]) -> Spec:
        """The same entry, under the same label, with ``extra`` options added (``--router-opt``,
        ``--workload-opt``: more options for what the user named, not another name)."""
        return Spec(self.name, tuple({**self.opts, **extra}.items()), self.label)


def format_spec(name: str, opts: dict[str, Any]) -> str:
    """``name`` or ``name[k=v,...]`` with the keys sorted: the label of an unlabelled entry."""
    if not opts:
        return name
    return name + "[" + ",".join(f"{k}={_text(v)}" for k, v in sorted(opts.items())) + "]"


def _text(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return str(v).lower()
    return str(v)


def split_list(text: str) -> list[str]:
    """Split a comma list at commas outside brackets: ``a,b[x=1,y=2],c`` -> 3 items."""
    items, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    items.append(cur)
    return [i.strip() for i in items if i.strip()]


def parse_spec(text: str, flag: str = "--router") -> Spec:
    """``name`` or ``name[key=value,...]``; errors name ``flag`` and the entry."""
    item = text.strip()
    name, bracket, rest = item.partition("[")
    name = name.strip()
    if not name or any(c in name for c in "]=, "):
        raise RoutingError(f"{flag} entry {item!r} must look like name or name[key=value,...]")
    opts: dict[str, str] = {}
    if bracket:
        if not rest.endswith("]") or "[" in rest[:-1] or "]" in rest[:-1]:
            raise RoutingError(f"{flag} entry {item!r} must look like name[key=value,...]")
        for pair in filter(None, (p.strip() for p in rest[:-1].split(","))):
            key, sep, value = pair.partition("=")
            if not sep or not key.strip():
                raise RoutingError(f"{flag} option {pair!r} in {item!r} must look like key=value")
            opts[key.strip()] = value.strip()
    return Spec(name, tuple(opts.items()))


def parse_specs(text: str, flag: str, all_names: Callable[[], list[str]] | None = None) -> list[Spec]:
    """A comma list of specs; ``all`` (where ``all_names`` is given) is every registered name."""
    if all_names is not None and text.strip() == "all":
        return [Spec(n) for n in all_names()]
    specs = [parse_spec(item, flag) for item in split_list(text)]
    if not specs:
        raise RoutingError(f"{flag} needs at least one name (got {text!r})")
    return specs


def spec_from_entry(item: Any, kind: str) -> Spec:
    """A sweep file's entry: a spec string or a table ``{name, opts, label}``."""
    if isinstance(item, str):
        return parse_spec(item, kind)
    if isinstance(item, dict) and isinstance(item.get("name"), str):
        unknown = set(item) - {"name", "opts", "label", "capacity"}
        if unknown:
            raise RoutingError(f"{kind} entry {item!r}: unknown keys {sorted(unknown)}; allowed: name, opts, label")
        opts = item.get("opts", {})
        if not isinstance(opts, dict):
            raise RoutingError(f"{kind} entry {item!r}: opts must be a table of options")
        return Spec(item["name"], tuple(opts.items()), str(item.get("label") or ""))
    raise RoutingError(f"{kind} entries must be names or tables with a name (got {item!r})")


def add_router_opts(pairs: Iterable[str], specs: list[Spec]) -> list[Spec]:
    """Apply ``--router-opt`` pairs: ``key=value`` to every selected router whose config has the
    field, ``name.key=value`` to the entries of router ``name`` (or with that label) only."""
    extra: list[dict[str, str]] = [{} for _ in specs]
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise RoutingError(f"--router-opt must look like key=value or router.key=value (got {pair!r})")
        target, dot, fld = key.rpartition(".")
        if dot:
            hits = [i for i, s in enumerate(specs) if target in (s.name, s.label)]
            if not hits:
                names = ", ".join(dict.fromkeys(s.label for s in specs))
                raise RoutingError(f"--router-opt {pair!r} names router {target!r}, not one of: {names}")
            for i in hits:
                extra[i][fld] = value  # validated when the router is built
            continue
        hits = [i for i, s in enumerate(specs) if key in config_fields(s.name)]
        if not hits:
            valid = sorted({f for s in specs for f in config_fields(s.name)})
            raise RoutingError(f"unknown router option {key!r}; valid options: {', '.join(valid)}")
        for i in hits:
            extra[i][key] = value
    return [s.with_options(x) if x else s for s, x in zip(specs, extra, strict=True)]


def key_value_pairs(pairs: Iterable[str], flag: str) -> dict[str, str]:
    """``key=value`` strings (``--workload-opt``) as a dict; values are parsed by the config."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise RoutingError(f"{flag} must look like key=value (got {pair!r})")
        out[key.strip()] = value
    return out


# --------------------------------------------------------------------------------------------
# The capacity factor: one parser, one meaning
# --------------------------------------------------------------------------------------------


def parse_capacity_factor(value: Any, flag: str = "--capacity-factor") -> CapacityFactor:
    """A number > 0, None (from ``none`` / ``dropless``), or DEFAULT (from ``default`` or None
    meaning the flag was not given). Strings and TOML values alike; errors name ``flag``."""
    if value is None or (isinstance(value, str) and value.strip().lower() == DEFAULT):
        return DEFAULT
    if isinstance(value, str):
        text = value.strip().lower()
        if text in DROPLESS_WORDS:
            return None
        try:
            number = float(text)
        except ValueError:
            number = math.nan
    elif isinstance(value, (int, float, Fraction)) and not isinstance(value, bool):
        number = float(value)
    else:
        number = math.nan
    if not math.isfinite(number) or number <= 0:
        raise RoutingError(f"{flag} must be a number > 0, 'none' (dropless) or 'default' (got {value!r})")
    return number


def parse_capacity_factors(values: str | list[Any], flag: str = "--capacity-factor") -> list[CapacityFactor]:
    """A comma list (command line) or a list (sweep file) of capacity factors, in order, once each."""
    items = split_list(values) if isinstance(values, str) else list(values)
    out: list[CapacityFactor] = []
    for v in items:
        cf = parse_capacity_factor(v, flag)
        if cf not in out:
            out.append(cf)
    if not out:
        raise RoutingError(f"{flag} needs at least one value (got {values!r})")
    return out


@dataclass
class Notes:
    """Messages said once per run (a flag a router ignores), in the order they arose."""

    sink: Callable[[str], None] | None = None
    said: list[str] = field(default_factory=list)

    def once(self, message: str) -> None:
        if message not in self.said:
            self.said.append(message)
            if self.sink is not None:
                self.sink(message)


def router_options(
    spec: Spec,
    *,
    experts: int,
    seed: int,
    top_k: int | str | None = None,
    capacity_factor: CapacityFactor = DEFAULT,
    notes: Notes | None = None,
) -> dict[str, Any]:
    """The options ``build_router(spec.name, **opts)`` gets: the shared flags with their one
    meaning (module docstring), then the options named for this router, which win.

    top_k: None or DEFAULT keeps the router's K. capacity_factor: DEFAULT keeps the router's own.
    """
    notes = notes if notes is not None else Notes()
    cls = get_router_class(spec.name)
    opts: dict[str, Any] = {"num_experts": experts, "seed": seed}
    own = spec.opts
    if top_k not in (None, DEFAULT) and "top_k" not in own:
        why = fixed_reason(cls.config_cls, "top_k")
        if why is None:
            opts["top_k"] = top_k
        else:
            notes.once(f"{spec.label} ignores top_k={top_k}: {why}")
    if capacity_factor != DEFAULT and "capacity_factor" not in own:
        why = fixed_reason(cls.config_cls, "capacity_factor")
        if why is None:
            opts["capacity_factor"] = capacity_factor
        elif capacity_factor is not None:
            notes.once(f"{spec.label} ignores capacity_factor={capacity_factor}: {why}")
    opts.update(own)
    return opts


def resolved_capacity_factor(spec: Spec, opts: dict[str, Any]) -> float | None:
    """The capacity factor a router built from ``opts`` really runs with (None: dropless or no
    capacity), for rows and labels: the explicit option, else the config's default."""
    cf = build_router(spec.name, **opts).config.capacity_factor
    return None if cf is None else float(cf)
