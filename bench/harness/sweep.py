"""Sweeps declared as data: TOML files in bench/configs/, expanded into configuration points.

A sweep file has a ``[defaults]`` table and one or more ``[[sweep]]`` blocks; each block is merged
over the defaults and expanded as a cartesian product. Keys (lists sweep, scalars fix):

    routers          specs ("topk", "topk[top_k=4]") or tables {name = "...", opts = {...}, label = "..."}
    workloads        the same, for workloads ("text[lang=de]")
    tokens, experts, hidden, top_k, capacity_factor, backends, dtypes, modes, layouts
    repeats, warmup, seed, ffn_ratio, device

``capacity_factor`` lists the forms a block wants: numbers, ``"none"`` (dropless) and
``"default"`` (each router's own, what a block that says nothing gets). It means what
``--capacity-factor`` means everywhere (``bench.spec``): it applies to every router that has a
capacity, ``topk`` included, and a router without one (``dense``) runs once, said once. ``top_k``
applies to routers whose K is free; a router with a fixed K keeps it (said once), a K one router
cannot take is skipped for it (said once), and a K (or capacity factor) no router of the block
can take is refused. Command-line flags replace the matching key in every block.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import tomllib

from moe_routing_bench.bench.models import ModelPreset, get_model
from moe_routing_bench.bench.record import config_id_of
from moe_routing_bench.bench.spec import (
    INT64_MAX,
    SEED_MAX,
    Notes,
    Spec,
    parse_capacity_factors,
    router_options,
    spec_from_entry,
)
from moe_routing_bench.bench.timing import DTYPES
from moe_routing_bench.routers.contract import RoutingError
from moe_routing_bench.routers.registry import build_router, get_router_class
from moe_routing_bench.workloads.registry import build_workload, get_workload_class, workload_names

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
MODEL_ROUTER = "model"  # in a block with models: each model's own router
MODES = ("fwd", "fwd+bwd")
LAYOUTS = ("default", "compact", "padded")

# The keys of a block; the command line's flags that set them (--routers, --top-k, ...) are what
# --resume refuses, since they would change the sweep (harness.runner).
LIST_KEYS = (
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
    "models",
    "reuse_buffers",
)
SCALAR_KEYS = ("repeats", "warmup", "seed", "ffn_ratio", "device", "description")
BUILTIN_DEFAULTS: dict[str, Any] = {
    "routers": [],  # empty: ["model"] (each model's own router) in a block with models, else ["switch"]
    "workloads": ["uniform"],
    "tokens": [2048],
    "experts": [8],
    "hidden": [128],
    "top_k": [],
    "capacity_factor": ["default"],
    "backends": ["torch"],
    "dtypes": ["float32"],
    "modes": ["fwd"],
    "layouts": ["default"],
    "models": [],
    "reuse_buffers": [False],
    "repeats": 5,
    "warmup": 2,
    "seed": 0,
    "ffn_ratio": 2.0,
    "device": "auto",
}


@dataclass(frozen=True)
class Point:
    """One configuration: router x workload x size x backend x dtype x mode.

    router_opts: every option the router is built with besides num_experts and seed (the shared
    K and capacity factor included, as applied). top_k / capacity_factor: what the router really
    runs with (capacity_factor None: dropless, or a router without capacity).
    """

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
    capacity_factor: float | None
    backend: str
    layout: str
    dtype: str
    mode: str
    repeats: int
    warmup: int
    seed: int
    ffn_ratio: float
    device: str
    model: str | None = None  # a preset (bench.models) whose layer shape this point has
    ffn: int | None = None  # F given outright (a preset); None: round(ffn_ratio * hidden)
    ffn_kind: str = "swiglu"
    shared_ffn: int = 0  # width of the always-on shared experts (0: none)
    reuse_buffers: bool = False  # permute and combine write into a reused workspace (forward only)
    index: int = field(default=0, compare=False)

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d.pop("index")
        return json.dumps(d, sort_keys=True, default=str)

    @property
    def config_id(self) -> str:
        """Stable across runs and processes: what --resume matches on."""
        return config_id_of(self.to_json())

    def router_options(self) -> dict[str, Any]:
        return {"num_experts": self.experts, "seed": self.seed, **self.router_opts}

    def columns(self) -> dict[str, Any]:
        """The configuration columns of the sweep's row schema (after the run header)."""
        return {
            "router": self.router_label,
            "router_name": self.router,
            "workload": self.workload_label,
            "workload_name": self.workload,
            "tokens": self.tokens,
            "experts": self.experts,
            "top_k": float(self.top_k) if self.top_k is not None else math.nan,
            "capacity_factor": self.capacity_factor if self.capacity_factor is not None else math.nan,
            "hidden": self.hidden,
            "backend": self.backend,
            "backend_ran": self.backend,
            "layout": self.layout,
            "dtype": self.dtype,
            "mode": self.mode,
            "repeats": self.repeats,
            "model": self.model or "",
            "ffn_kind": self.ffn_kind,
            "shared_ffn": self.shared_ffn,
            "reuse_buffers": self.reuse_buffers,
        }


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
    """Blocks of the sweep file (or one block of built-in defaults), with flags applied. A file
    that defines no sweep, or whose tables have the wrong shape, is refused naming it; workload
    options that name files are made absolute (a run resumes from any directory)."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_toml(path)
    defaults = raw.get("defaults", {})
    blocks = raw.get("sweep", [{}])
    if not isinstance(defaults, dict):
        raise RoutingError(f"--config {path}: defaults must be a table ([defaults]), not {_shown(defaults)}")
    if not isinstance(blocks, list) or not blocks or not all(isinstance(b, dict) for b in blocks):
        raise RoutingError(f"--config {path}: sweep must be one or more [[sweep]] tables, not {_shown(blocks)}")
    out = []
    for block in blocks:
        merged = {**BUILTIN_DEFAULTS, **defaults, **block, **{k: v for k, v in overrides.items() if v is not None}}
        bad = set(merged) - set(LIST_KEYS) - set(SCALAR_KEYS)
        if bad:
            allowed = ", ".join(LIST_KEYS + SCALAR_KEYS)
            raise RoutingError(f"unknown sweep keys {sorted(bad)}; allowed: {allowed}")
        for key in LIST_KEYS:
            if not isinstance(merged[key], list):
                merged[key] = [merged[key]]
        merged["workloads"] = [_absolute_paths(w) for w in merged["workloads"]]
        out.append(merged)
    return out


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise RoutingError(f"--config {path}: not valid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RoutingError(f"--config {path}: cannot be read ({exc})") from None
    unknown = set(raw) - {"defaults", "sweep", "description"}
    if unknown:
        raise RoutingError(f"--config {path}: unknown top-level keys {sorted(unknown)}; allowed: defaults, sweep")
    if not raw.get("defaults") and "sweep" not in raw:
        raise RoutingError(f"--config {path}: the file defines no sweep (give a [defaults] table or [[sweep]] blocks)")
    return raw


def _shown(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"[:80]


def _absolute_paths(entry: Any) -> Any:
    """A workload entry whose file options (``path_fields``: a trace's path) are absolute."""
    spec = spec_from_entry(entry, "workloads")
    if spec.name not in workload_names():
        return entry  # refused by expand, naming the valid workloads
    fields = get_workload_class(spec.name).config_cls.path_fields
    rel = {f: v for f, v in spec.opts.items() if f in fields and isinstance(v, str) and v and not Path(v).is_absolute()}
    if not rel:
        return entry
    opts = {**spec.opts, **{f: str(Path(v).resolve()) for f, v in rel.items()}}
    return {"name": spec.name, "opts": opts, "label": spec.label}


def _check_block(block: dict[str, Any], workload_names: list[str], backend_names: list[str]) -> None:
    for key, flag, allowed in (
        ("backends", "--backend", backend_names),
        ("dtypes", "--dtype", list(DTYPES)),
        ("modes", "--mode", list(MODES)),
        ("layouts", "layouts", list(LAYOUTS)),
    ):
        for v in block[key]:
            if v not in allowed:
                raise RoutingError(f"{flag} must be one of {', '.join(allowed)} (got {v!r})")
    for key in ("tokens", "experts", "hidden", "top_k"):
        for v in block[key]:
            _check_int(f"--{key.replace('_', '-')}", v, 1)
    _check_int("--repeats", block["repeats"], 1)
    _check_int("warmup", block["warmup"], 0)
    _check_int("--seed", block["seed"], 0, SEED_MAX)
    ratio = block["ffn_ratio"]
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (math.isfinite(ratio) and ratio > 0):
        raise RoutingError(f"ffn_ratio must be a number > 0 (got {ratio!r})")
    if block["device"] not in ("auto", "cpu", "cuda"):
        raise RoutingError(f"--device must be one of auto, cpu, cuda (got {block['device']!r})")


def _check_int(what: str, v: Any, low: int, high: int = INT64_MAX) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
        raise RoutingError(f"{what} must be an integer between {low} and {high} (got {v!r})")


def expand(
    blocks: list[dict[str, Any]],
    workload_names: list[str],
    backend_names: list[str],
    notes: Notes | None = None,
) -> list[Point]:
    """Every configuration point, validated: unknown names and options (a workload's too: a trace's
    metadata is read) are refused before any work starts; what a router ignores or cannot take is
    said once through ``notes``, once the whole sweep is known to be accepted."""
    pending = Notes()  # said only if the sweep is not refused: the refusal says it all
    points: list[Point] = []
    seen: set[str] = set()
    for block in blocks:
        _check_block(block, workload_names, backend_names)
        models = [get_model(m) for m in block["models"]]
        names = block["routers"] or (["model"] if models else ["switch"])
        routers = [spec_from_entry(r, "routers") for r in names]
        workloads = [spec_from_entry(w, "workloads") for w in block["workloads"]]
        for spec in routers:
            if spec.name == MODEL_ROUTER and not models:
                raise RoutingError("router 'model' (each model's own router) needs models = [...] in its block")
            if spec.name != MODEL_ROUTER:
                get_router_class(spec.name)  # raises with the list of valid routers
        for spec in workloads:
            if spec.name not in workload_names:
                raise RoutingError(f"unknown workload {spec.name!r}; valid workloads: {', '.join(workload_names)}")
            build_workload(spec.name, spec.opts, block["seed"])  # its options (and a trace's metadata)
        cfs = parse_capacity_factors(block["capacity_factor"])
        ks: list[int | None] = list(block["top_k"]) or [None]
        taken: set[tuple[str, Any]] = set()
        why: dict[tuple[str, Any], str] = {}
        for shape, rspec0, wspec in itertools.product(_shapes(block, models), routers, workloads):
            rspec = shape.model.router_spec if rspec0.name == MODEL_ROUTER and shape.model else rspec0
            e = shape.experts
            build_router(rspec.name, **router_options(rspec, experts=e, seed=block["seed"]))  # its own options
            for cf, k in itertools.product(cfs, ks):
                opts = _applied(rspec, e, block["seed"], k, cf, pending)
                if isinstance(opts, str):
                    why.setdefault(("top_k", k), opts)
                    why.setdefault(("capacity_factor", cf), opts)
                    continue
                taken.update({("capacity_factor", cf), ("top_k", k)})
                router = build_router(rspec.name, **opts)
                for t, backend, dtype, mode, layout, reuse in itertools.product(
                    block["tokens"],
                    block["backends"],
                    block["dtypes"],
                    block["modes"],
                    block["layouts"],
                    block["reuse_buffers"],
                ):
                    p = _point(rspec, wspec, router, opts, t, shape, backend, layout, dtype, mode, block)
                    p = dataclasses.replace(p, reuse_buffers=bool(reuse))
                    if p.config_id not in seen:
                        seen.add(p.config_id)
                        points.append(dataclasses.replace(p, index=len(points)))
        for key, values in (("top_k", [k for k in ks if k is not None]), ("capacity_factor", cfs)):
            for v in values:
                if (key, v) not in taken:
                    names = ", ".join(s.label for s in routers)
                    shown = "none" if v is None else v
                    reason = f" ({why[(key, v)]})" if (key, v) in why else ""
                    raise RoutingError(f"no router of the sweep ({names}) can take {key} = {shown}{reason}")
    if not points:
        raise RoutingError("the sweep has no configurations")
    for message in pending.said:
        (notes or Notes()).once(message)
    return points


def _applied(spec: Spec, experts: int, seed: int, k: int | None, cf: Any, notes: Notes) -> dict | str:
    """The router's options with the shared K and capacity factor applied, or why the router
    cannot take this combination (a K above its limit, dropless expert choice; said once)."""
    opts = router_options(spec, experts=experts, seed=seed, top_k=k, capacity_factor=cf, notes=notes)
    try:
        build_router(spec.name, **opts)
    except RoutingError as exc:
        what = ", ".join(f"{n}={v}" for n, v in (("top_k", k), ("capacity_factor", cf)) if v is not None)
        notes.once(f"{spec.label} cannot take {what} at E={experts}, skipped: {exc}")
        return str(exc)
    return opts


@dataclass(frozen=True)
class _Shape:
    """A layer shape: a model preset's, or E x D from the block with F = ffn_ratio * D."""

    experts: int
    hidden: int
    model: ModelPreset | None = None


def _shapes(block: dict[str, Any], models: list[ModelPreset]) -> list[_Shape]:
    if models:  # a preset fixes E, D, F, the FFN kind and shared experts: `experts`, `hidden` do not apply
        return [_Shape(m.experts, m.hidden, m) for m in models]
    return [_Shape(e, d) for e, d in itertools.product(block["experts"], block["hidden"])]


def _point(rspec, wspec, router, opts, t, shape, backend, layout, dtype, mode, block) -> Point:
    # The options as the config parsed them ("none" -> None, "2" -> 2): one id per configuration.
    own = {k: _plain(getattr(router.config, k)) for k in opts if k not in ("num_experts", "seed")}
    cf = router.config.capacity_factor
    m = shape.model
    return Point(
        router=rspec.name,
        router_label=rspec.label,
        router_opts=own,
        workload=wspec.name,
        workload_label=wspec.label,
        workload_opts=wspec.opts,
        tokens=t,
        experts=shape.experts,
        hidden=shape.hidden,
        top_k=int(router.config.top_k),
        capacity_factor=None if cf is None else float(cf),
        backend=backend,
        layout=layout,
        dtype=dtype,
        mode=mode,
        repeats=block["repeats"],
        warmup=block["warmup"],
        seed=block["seed"],
        ffn_ratio=float(block["ffn_ratio"]) if m is None else m.ffn / m.hidden,
        device=block["device"],
        model=None if m is None else m.name,
        ffn=None if m is None else m.ffn,
        ffn_kind="swiglu" if m is None else m.ffn_kind,
        shared_ffn=0 if m is None else m.shared_ffn,
    )


def _plain(value: Any) -> Any:
    return float(value) if isinstance(value, Fraction) else value
