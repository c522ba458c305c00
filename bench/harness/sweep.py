"""Sweeps declared as data: TOML files in bench/configs/, expanded into configuration points.

A sweep file has a ``[defaults]`` table and one or more ``[[sweep]]`` blocks; each block is merged
over the defaults and expanded as a cartesian product. Keys (lists sweep, scalars fix):

    routers          names, or {name = "...", opts = {...}, label = "...", capacity = true}
    workloads        names, or {name = "...", opts = {...}, label = "..."}
    tokens, experts, hidden, top_k, capacity_factor, backends, dtypes, modes, layouts
    repeats, warmup, seed, ffn_ratio, device

``capacity_factor`` applies to routers that have one (their default is not dropless) and to any
router entry with ``capacity = true``; the others run once at their own default. ``top_k`` applies
to routers that accept it; a router that accepts none of the listed values runs at its default.
Command-line flags replace the matching key in every block.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from moe_routing_bench.routers.contract import RoutingError
from moe_routing_bench.routers.registry import build_router, get_router_class

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
DTYPES = ("float32", "float16", "bfloat16")
MODES = ("fwd", "fwd+bwd")

_LIST_KEYS = (
    "routers",
    "workloads",
    "tokens",
    "experts",
    "hidden",
    "top_k",
    "capacity_factor",
    "backends",
    "dtypes",
    "modes",
    "layouts",
)
_SCALAR_KEYS = ("repeats", "warmup", "seed", "ffn_ratio", "device", "description")
BUILTIN_DEFAULTS: dict[str, Any] = {
    "routers": ["switch"],
    "workloads": ["uniform"],
    "tokens": [2048],
    "experts": [8],
    "hidden": [128],
    "top_k": [],
    "capacity_factor": [1.25],
    "backends": ["torch"],
    "dtypes": ["float32"],
    "modes": ["fwd"],
    "layouts": ["default"],
    "repeats": 5,
    "warmup": 2,
    "seed": 0,
    "ffn_ratio": 2.0,
    "device": "auto",
}


@dataclass(frozen=True)
class Point:
    """One configuration: router x workload x size x backend x dtype x mode."""

    router: str
    router_label: str
    router_opts: dict[str, Any]
    workload: str
    workload_label: str
    workload_opts: dict[str, Any]
    tokens: int
    experts: int
    hidden: int
    top_k: int | None
    capacity_factor: float | None  # None: the router's own default (maybe dropless)
    backend: str
    layout: str
    dtype: str
    mode: str
    repeats: int
    warmup: int
    seed: int
    ffn_ratio: float
    device: str
    index: int = field(default=0, compare=False)

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d.pop("index")
        return json.dumps(d, sort_keys=True, default=str)

    @property
    def config_id(self) -> str:
        """Stable across runs and processes: what --resume matches on."""
        return hashlib.sha1(self.to_json().encode()).hexdigest()[:16]

    def router_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"num_experts": self.experts, "seed": self.seed, **self.router_opts}
        if self.top_k is not None:
            opts["top_k"] = self.top_k
        if self.capacity_factor is not None:
            opts["capacity_factor"] = self.capacity_factor
        return opts


def find_config(name_or_path: str) -> Path:
    """A sweep by exact name in bench/configs/, or a path to a TOML file."""
    p = Path(name_or_path)
    if p.suffix == ".toml" and p.is_file():
        return p
    candidate = CONFIG_DIR / f"{name_or_path}.toml"
    if candidate.is_file():
        return candidate
    names = sorted(q.stem for q in CONFIG_DIR.glob("*.toml"))
    raise RoutingError(f"--config must be one of {', '.join(names)} or a .toml path (got {name_or_path!r})")


def load_blocks(path: Path | None, overrides: dict[str, Any]) -> list[dict[str, Any]]:
    """Blocks of the sweep file (or one block of built-in defaults), with flags applied."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise RoutingError(f"--config {path}: not valid TOML: {exc}") from None
    unknown = set(raw) - {"defaults", "sweep", "description"}
    if unknown:
        raise RoutingError(
            f"--config {path}: unknown top-level keys {sorted(unknown)}; allowed: defaults, sweep"
        )
    defaults = {**BUILTIN_DEFAULTS, **raw.get("defaults", {})}
    blocks = raw.get("sweep") or [{}]
    out = []
    for block in blocks:
        merged = {**defaults, **block, **{k: v for k, v in overrides.items() if v is not None}}
        bad = set(merged) - set(_LIST_KEYS) - set(_SCALAR_KEYS)
        if bad:
            allowed = ", ".join(_LIST_KEYS + _SCALAR_KEYS)
            raise RoutingError(f"unknown sweep keys {sorted(bad)}; allowed: {allowed}")
        for key in _LIST_KEYS:
            if not isinstance(merged[key], list):
                merged[key] = [merged[key]]
        out.append(merged)
    return out


def _entry(item: Any, kind: str) -> tuple[str, dict[str, Any], str, bool]:
    """(name, opts, label, sweep capacity) from a name or a {name, opts, label, capacity} table."""
    if isinstance(item, str):
        return item, {}, item, False
    if isinstance(item, dict) and isinstance(item.get("name"), str):
        opts = dict(item.get("opts", {}))
        label = item.get("label") or (
            item["name"] + ("[" + ",".join(f"{k}={v}" for k, v in sorted(opts.items())) + "]" if opts else "")
        )
        return item["name"], opts, label, bool(item.get("capacity", False))
    raise RoutingError(f"{kind} entries must be names or tables with a name (got {item!r})")


def _has_capacity(name: str) -> bool:
    """A router 'has' a capacity factor when its default config is not dropless."""
    cls = get_router_class(name)
    default = {f.name: f.default for f in dataclasses.fields(cls.config_cls)}.get("capacity_factor")
    return default is not None


def expand(blocks: list[dict[str, Any]], workload_names: list[str], backend_names: list[str]) -> list[Point]:
    """Every configuration point, validated: unknown names are refused before any work starts."""
    points: list[Point] = []
    seen: set[str] = set()
    for block in blocks:
        routers = [_entry(r, "routers") for r in block["routers"]]
        workloads = [_entry(w, "workloads") for w in block["workloads"]]
        for name, _, _, _ in routers:
            get_router_class(name)  # raises with the list of valid routers
        for name, _, _, _ in workloads:
            if name not in workload_names:
                raise RoutingError(f"unknown workload {name!r}; valid workloads: {', '.join(workload_names)}")
        for b in block["backends"]:
            if b not in backend_names:
                raise RoutingError(f"unknown backend {b!r}; valid backends: {', '.join(backend_names)}")
        for dt in block["dtypes"]:
            if dt not in DTYPES:
                raise RoutingError(f"--dtype must be one of {', '.join(DTYPES)} (got {dt!r})")
        for mode in block["modes"]:
            if mode not in MODES:
                raise RoutingError(f"--mode must be one of {', '.join(MODES)} (got {mode!r})")
        for key in ("tokens", "experts", "hidden"):
            for v in block[key]:
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise RoutingError(f"--{key} values must be integers >= 1 (got {v!r})")
        for key in ("repeats",):
            if not isinstance(block[key], int) or block[key] < 1:
                raise RoutingError(f"--{key} must be an integer >= 1 (got {block[key]!r})")
        for (rname, ropts, rlabel, rcap), (wname, wopts, wlabel) in itertools.product(
            routers, [(w[0], w[1], w[2]) for w in workloads]
        ):
            cfs: list[float | None] = (
                list(block["capacity_factor"]) if (rcap or _has_capacity(rname)) else [None]
            )
            cfs = cfs or [None]
            for e, t, d, cf, backend, dtype, mode, layout in itertools.product(
                block["experts"],
                block["tokens"],
                block["hidden"],
                cfs,
                block["backends"],
                block["dtypes"],
                block["modes"],
                block["layouts"],
            ):
                for k in _top_ks(rname, ropts, block["top_k"], e, block["seed"]):
                    p = Point(
                        router=rname,
                        router_label=rlabel,
                        router_opts=ropts,
                        workload=wname,
                        workload_label=wlabel,
                        workload_opts=wopts,
                        tokens=t,
                        experts=e,
                        hidden=d,
                        top_k=k,
                        capacity_factor=None if cf is None else float(cf),
                        backend=backend,
                        layout=layout,
                        dtype=dtype,
                        mode=mode,
                        repeats=block["repeats"],
                        warmup=block["warmup"],
                        seed=block["seed"],
                        ffn_ratio=float(block["ffn_ratio"]),
                        device=block["device"],
                    )
                    build_router(rname, **p.router_options())  # a bad option is refused now
                    if p.config_id not in seen:
                        seen.add(p.config_id)
                        points.append(dataclasses.replace(p, index=len(points)))
    if not points:
        raise RoutingError("the sweep has no configurations")
    return points


def _top_ks(name: str, opts: dict[str, Any], ks: list[int], experts: int, seed: int) -> list[int | None]:
    if not ks or "top_k" in opts:
        return [None]
    accepted = []
    for k in ks:
        try:
            build_router(name, num_experts=experts, seed=seed, top_k=k, **opts)
            accepted.append(k)
        except RoutingError:
            continue
    return accepted or [None]
