"""What a report draws from: one or more run directories read back, and the reference slice.

A sweep varies many things at once (T, E, D, backend, dtype, mode, capacity factor), so a figure
that puts routers side by side fixes everything it does not show. The *reference slice* is one
value per configuration key, chosen from the ok rows of every run given:

    tokens, experts, hidden   among values every run has, the one covering the most
                              routers x workloads (ties: the larger)
    backend                   triton, else torch (the index dispatch), else the most common
    mode                      fwd, else the most common;  dtype, layout: the most common
    capacity_factor           per router, the value nearest 1.25 (routers without one: their default)

Each figure frees the keys on its axes or facets (``ReportData.slice(free=...)``) and states the
rest in its caption. Rows whose status is not ``ok`` are kept apart (``excluded``): the report
lists them and no figure draws them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from moe_routing_bench.bench.record import load_run

# The labels that name a configuration to a reader: report tables show them, compare matches on
# them when two runs' config ids differ.
CONFIG_LABELS = (
    "router",
    "workload",
    "tokens",
    "experts",
    "top_k",
    "capacity_factor",
    "hidden",
    "backend",
    "dtype",
    "mode",
)
SLICE_KEYS = ("tokens", "experts", "hidden", "backend", "layout", "dtype", "mode", "capacity_factor")
REFERENCE_CF = 1.25
WHOLE_BATCH_MARK = " †"  # appended to router labels of rows with looks_at_whole_batch
_BACKEND_PREFERENCE = ("triton", "torch")
_MODE_PREFERENCE = ("fwd",)


@dataclass
class RunInfo:
    """One run directory as given on the command line."""

    label: str  # unique among the runs of one report (the directory name, numbered if repeated)
    path: Path
    meta: dict[str, Any]
    counts: dict[str, int]


@dataclass
class ReportData:
    """Rows of every run (``ok`` and ``excluded``), their loads, an optional breakdown table."""

    runs: list[RunInfo]
    ok: pd.DataFrame
    excluded: pd.DataFrame
    loads: pd.DataFrame
    breakdown: pd.DataFrame | None
    reference: dict[str, Any] = field(default_factory=dict)
    ranks: pd.DataFrame | None = None  # per-rank rows of ep runs (ep_ranks.parquet)

    @property
    def several_runs(self) -> bool:
        return len(self.runs) > 1

    def slice(self, free: tuple[str, ...] = ()) -> pd.DataFrame:
        """Ok rows at the reference values of every slice key not in ``free``."""
        df = self.ok
        for key in SLICE_KEYS:
            if key in free or key not in self.reference or key not in df.columns:
                continue
            if key == "capacity_factor":
                df = df[_nearest_cf_mask(df, self.reference[key])]
            else:
                df = df[_equals(df[key], self.reference[key])]
        return df

    def describe(self, free: tuple[str, ...] = ()) -> str:
        """The fixed part of a slice, in words, for captions (run-derived text: escape it)."""
        r = self.reference
        parts = []
        for key, fmt in (
            ("tokens", "T={}"),
            ("experts", "E={}"),
            ("hidden", "D={}"),
            ("backend", "backend={}"),
            ("layout", "layout={}"),
            ("dtype", "{}"),
            ("mode", "mode={}"),
        ):
            if key not in free and key in r:
                parts.append(fmt.format(r[key]))
        if "capacity_factor" not in free and "capacity_factor" in r:
            parts.append(f"cf nearest {r['capacity_factor']:g} per router")
        return ", ".join(parts)

    def missing_routers(self, df: pd.DataFrame) -> list[str]:
        """Routers with ok rows somewhere but none in ``df`` (a slice left them out)."""
        return sorted(set(self.ok["router_disp"]) - set(df["router_disp"]))


def _equals(col: pd.Series, value: Any) -> pd.Series:
    """Plain boolean mask; a missing value (nullable columns) never matches."""
    return (col == value).fillna(False).astype(bool)


def _nearest_cf_mask(df: pd.DataFrame, target: float) -> pd.Series:
    """Per (run, router, workload): keep the capacity factor nearest ``target``; NaN cf always."""
    cf = df["capacity_factor"]
    keep = cf.isna()
    has = df[~keep]
    if has.empty:
        return keep
    dist = (has["capacity_factor"] - target).abs()
    best = dist.groupby([has["run"], has["router_disp"], has["workload"]]).transform("min")
    chosen = has.index[(dist - best).abs() < 1e-12]
    return keep | df.index.isin(chosen)


def _read_table(paths: list[Path]) -> pd.DataFrame:
    """Parquet files read without a fixed schema, so extra columns (``layer``) survive."""
    if not paths:
        return pd.DataFrame()
    tables = [pq.read_table(p) for p in paths]
    return pa.concat_tables(tables, promote_options="permissive").to_pandas()


def _read_loads(path: Path) -> pd.DataFrame:
    parts = sorted((path / "loads").glob("*.parquet"))
    if parts:
        return _read_table(parts)
    whole = path / "loads.parquet"
    return _read_table([whole]) if whole.is_file() else pd.DataFrame()


def check_run_dir(path: str | Path) -> Path:
    """A run directory holds meta.json; anything else is refused with one line (ValueError)."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"no such run directory: {str(p)!r}")
    if not (p / "meta.json").is_file():
        raise ValueError(f"not a run directory (no meta.json): {str(p)!r}")
    return p


def _unique_labels(paths: list[Path]) -> list[str]:
    labels: list[str] = []
    for p in paths:
        base = p.resolve().name
        label, n = base, 2
        while label in labels:
            label, n = f"{base}#{n}", n + 1
        labels.append(label)
    return labels


def _display_router(df: pd.DataFrame) -> pd.Series:
    """Router label, with K where one router ran at several K for the same E, and a mark for routers
    that look at the whole batch (expert choice: no decoder could route that way at inference)."""
    if df.empty:
        return pd.Series([], dtype=object, index=df.index)
    k_count = df.groupby(["router", "experts"], dropna=False)["top_k"].transform("nunique")
    label = (
        df["router"]
        .astype(str)
        .where(k_count <= 1, df["router"].astype(str) + " K=" + df["top_k"].map(lambda k: f"{k:g}"))
    )
    whole = df["looks_at_whole_batch"].fillna(False).astype(bool)
    return label.where(~whole, label + WHOLE_BATCH_MARK)


def _pick(values: list[Any], key: str) -> Any:
    if key == "capacity_factor":
        return min(values, key=lambda v: (abs(v - REFERENCE_CF), v))
    prefer = {"backend": _BACKEND_PREFERENCE, "mode": _MODE_PREFERENCE}.get(key, ())
    for p in prefer:
        if p in values:
            return p
    return values[0]  # values come most common first


def reference_values(ok: pd.DataFrame) -> dict[str, Any]:
    """One value per slice key: among values every run has where possible (module docstring)."""
    ref: dict[str, Any] = {}
    rest = ok  # narrowed key by key, so the slice is never empty (layout follows backend)
    for key in SLICE_KEYS:
        if key not in rest.columns:
            continue
        col = rest[key].dropna()
        if col.empty:
            continue
        common = None
        for _, g in rest.groupby("run")[key]:
            vals = set(g.dropna().tolist())
            common = vals if common is None else common & vals
        ordered = [v for v in col.value_counts().index.tolist() if not common or v in common]
        if key in ("tokens", "experts", "hidden"):
            # The size that shows the most routers x workloads (a sweep's main block, not a side
            # sweep at one large T); ties go to the larger size.
            cover = rest.groupby(key)[["router", "workload"]].apply(lambda g: len(g.drop_duplicates()))
            ref[key] = max(ordered, key=lambda v: (int(cover.get(v, 0)), v))
        else:
            ref[key] = _pick(ordered, key)
        if key != "capacity_factor":
            rest = rest[_equals(rest[key], ref[key])]
    for key in ("tokens", "experts", "hidden"):
        if key in ref:
            ref[key] = int(ref[key])
    if "capacity_factor" in ref:
        ref["capacity_factor"] = float(ref["capacity_factor"])
    return ref


def load_runs(paths: list[str | Path]) -> ReportData:
    """Read every run (rows, loads, meta, optional breakdown.parquet) into one ReportData."""
    if not paths:
        raise ValueError("give at least one run directory")
    dirs = [check_run_dir(p) for p in paths]
    labels = _unique_labels(dirs)
    runs: list[RunInfo] = []
    rows_all, loads_all, breakdowns, ranks = [], [], [], []
    for label, path in zip(labels, dirs, strict=True):
        rows, _, meta = load_run(path)
        rows = rows.copy()
        rows.insert(0, "run", label)
        counts = {str(k): int(v) for k, v in rows["status"].value_counts().items()}
        runs.append(RunInfo(label=label, path=path, meta=meta, counts=counts))
        rows_all.append(rows)
        loads = _read_loads(path)
        if not loads.empty:
            loads.insert(0, "run", label)
            loads_all.append(loads)
        for name, into in (("breakdown", breakdowns), ("ep_ranks", ranks)):
            if (path / f"{name}.parquet").is_file():
                table = pd.read_parquet(path / f"{name}.parquet")
                table.insert(0, "run", label)
                into.append(table)
    rows = pd.concat(rows_all, ignore_index=True)
    rows["router_disp"] = _display_router(rows)
    rows["series"] = _series(rows, len(runs) > 1)
    status = rows["status"].fillna("")
    ok = rows[status == "ok"].reset_index(drop=True)
    excluded = rows[status != "ok"].reset_index(drop=True)
    loads = pd.concat(loads_all, ignore_index=True) if loads_all else pd.DataFrame()
    breakdown = pd.concat(breakdowns, ignore_index=True) if breakdowns else None
    return ReportData(
        runs=runs,
        ok=ok,
        excluded=excluded,
        loads=loads,
        breakdown=breakdown,
        reference=reference_values(ok) if not ok.empty else {},
        ranks=pd.concat(ranks, ignore_index=True) if ranks else None,
    )


def _series(rows: pd.DataFrame, several_runs: bool) -> pd.Series:
    """The hue of figures with routers on an axis: the workload, and the run when several."""
    s = rows["workload"].astype(str)
    if several_runs:
        s = s + " · " + rows["run"].astype(str)
    return s


def tokens_per_s_band(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """tokens/s at the p80 and p20 total time: T / time_total_p80 .. T / time_total_p20."""
    t = df["tokens"].astype(float).to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        lo = t / df["time_total_p80"].astype(float).to_numpy()
        hi = t / df["time_total_p20"].astype(float).to_numpy()
    return lo, hi


def loads_changing(requested_BE: np.ndarray, sigmas: float = 5.0) -> bool:
    """Do the per-expert loads change across batches beyond sampling noise?

    A chi-square test of homogeneity on the batches x experts table of requested loads: under
    iid batches chi2 / dof is about 1 with standard deviation sqrt(2 / dof); more than ``sigmas``
    of those above 1 means the popularity moves (drift-like workloads).
    """
    table = np.asarray(requested_BE, dtype=float)
    table = table[:, table.sum(axis=0) > 0]
    b, e = table.shape if table.ndim == 2 else (0, 0)
    if b < 2 or e < 2 or table.sum() <= 0:
        return False
    expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0, keepdims=True) / table.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        chi2 = float(np.nansum(np.where(expected > 0, (table - expected) ** 2 / expected, 0.0)))
    dof = (b - 1) * (e - 1)
    return chi2 / dof > 1.0 + sigmas * math.sqrt(2.0 / dof)
