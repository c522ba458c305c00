"""``moe-bench compare A B``: what changed between two runs, configuration by configuration.

Configurations are matched by ``config_id`` (identical configurations have identical ids), then,
for rows left over, by their labels (router, workload, tokens, experts, top_k, capacity_factor,
hidden, backend, dtype, mode) when those are unique on both sides. Each compared metric gets:

    change      (B - A) / |A| in percent
    spread      what repeats alone could move it:
                  time_*_median   max over the runs of (p80 - p20)
                  tokens_per_s    max over the runs of (T / p20 - T / p80) of the total time
                  routing metrics 2 * sqrt(se_A^2 + se_B^2) (a missing SE counts as 0)
                  peak_mem_bytes  no repeats: 4 MiB for a sampled RSS (its granularity), 0 on GPU
    verdict     same | noise (|B - A| <= spread) | within (|change| < threshold) |
                regressed / improved (by the metric's direction) | changed (no direction) | n/a

A configuration that was ok in A and is error or skipped in B counts as a regression too.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from moe_routing_bench.bench.metrics import HIGHER_IS_BETTER, LOWER_IS_BETTER, METRICS
from moe_routing_bench.bench.record import load_run
from moe_routing_bench.bench.report.data import CONFIG_LABELS, check_run_dir
from moe_routing_bench.bench.schema import STAGES

HIGHER_BETTER = frozenset({"tokens_per_s"}) | HIGHER_IS_BETTER
LOWER_BETTER = frozenset({f"time_{s}_median" for s in STAGES} | {"peak_mem_bytes"}) | LOWER_IS_BETTER
MEM_NOISE_BYTES = {"rss_sampled": 4 * 2**20, "cuda_max_allocated": 0.0}
DEFAULT_THRESHOLD_PCT = 10.0


@dataclass
class Change:
    config: str
    config_id: str
    metric: str
    a: float
    b: float
    change_pct: float
    spread: float
    direction: str  # higher | lower | ?
    verdict: str


@dataclass
class Comparison:
    a: dict[str, Any]
    b: dict[str, Any]
    threshold_pct: float
    matched_by_id: int
    matched_by_labels: int
    only_in_a: list[str]
    only_in_b: list[str]
    status_changes: list[dict[str, str]]
    changes: list[Change]

    @property
    def regressions(self) -> list[Change]:
        return [c for c in self.changes if c.verdict == "regressed"]

    @property
    def lost(self) -> list[dict[str, str]]:
        """Configurations ok in A and not ok in B."""
        return [s for s in self.status_changes if s["a"] == "ok" and s["b"] != "ok"]

    @property
    def failed(self) -> bool:
        return bool(self.regressions or self.lost)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["changes"] = [{k: _num(v) for k, v in asdict(c).items()} for c in self.changes]
        d["regressions"] = len(self.regressions)
        d["failed"] = self.failed
        return d


def _num(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def metrics_compared(columns: list[str]) -> list[str]:
    times = [f"time_{s}_median" for s in STAGES]
    wanted = ["tokens_per_s", *times, "peak_mem_bytes", *METRICS]
    return [m for m in wanted if m in columns]


def _label(r: pd.Series) -> str:
    def f(v: Any) -> str:
        return "-" if pd.isna(v) else (f"{v:g}" if isinstance(v, float) else str(v))

    return (
        f"{r['router']} {r['workload']} T={f(r['tokens'])} E={f(r['experts'])} K={f(r['top_k'])} "
        f"cf={f(r['capacity_factor'])} D={f(r['hidden'])} {r['backend']} {r['dtype']} {r['mode']}"
    )


def _label_key(df: pd.DataFrame) -> pd.Series:
    def f(v: Any) -> str:
        if pd.isna(v):
            return "-"
        return repr(float(v)) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)

    keys = ["|".join(f(v) for v in rec) for rec in df[list(CONFIG_LABELS)].itertuples(index=False)]
    return pd.Series(keys, index=df.index, dtype=object)


def match(rows_a: pd.DataFrame, rows_b: pd.DataFrame) -> tuple[list[tuple[int, int]], int, int]:
    """(index pairs, matched by id, matched by labels)."""
    ida = {cid: i for i, cid in rows_a["config_id"].items()}
    pairs = [(ida[cid], j) for j, cid in rows_b["config_id"].items() if cid in ida]
    by_id = len(pairs)
    used_a, used_b = {i for i, _ in pairs}, {j for _, j in pairs}
    ra, rb = rows_a.drop(index=list(used_a)), rows_b.drop(index=list(used_b))
    ka, kb = _label_key(ra), _label_key(rb)
    unique_a, unique_b = ka[~ka.duplicated(keep=False)], kb[~kb.duplicated(keep=False)]
    lookup = {k: i for i, k in unique_a.items()}
    extra = [(lookup[k], j) for j, k in unique_b.items() if k in lookup]
    return pairs + extra, by_id, len(extra)


def _spread(metric: str, a: pd.Series, b: pd.Series) -> float:
    def g(r: pd.Series, c: str) -> float:
        v = r.get(c, math.nan)
        return math.nan if pd.isna(v) else float(v)

    if metric.startswith("time_") and metric.endswith("_median"):
        stem = metric[: -len("median")]
        widths = [g(r, stem + "p80") - g(r, stem + "p20") for r in (a, b)]
        return max([0.0, *(w for w in widths if not math.isnan(w))])
    if metric == "tokens_per_s":
        widths = []
        for r in (a, b):
            t, p20, p80 = g(r, "tokens"), g(r, "time_total_p20"), g(r, "time_total_p80")
            if p20 > 0 and p80 > 0:
                widths.append(t / p20 - t / p80)
        return max([0.0, *widths])
    if metric == "peak_mem_bytes":
        return max(MEM_NOISE_BYTES.get(str(r.get("mem_kind")), 0.0) for r in (a, b))
    se_a, se_b = g(a, f"{metric}_se"), g(b, f"{metric}_se")
    se_a, se_b = (0.0 if math.isnan(s) else s for s in (se_a, se_b))
    return 2.0 * math.hypot(se_a, se_b)


def judge(metric: str, a: float, b: float, spread: float, threshold_pct: float) -> tuple[float, str, str]:
    """(change in percent, direction, verdict) of one metric."""
    direction = "higher" if metric in HIGHER_BETTER else "lower" if metric in LOWER_BETTER else "?"
    if math.isnan(a) or math.isnan(b):
        return math.nan, direction, "n/a"
    delta = b - a
    if delta == 0:
        return 0.0, direction, "same"
    pct = delta / abs(a) * 100 if a != 0 else math.copysign(math.inf, delta)
    if abs(delta) <= spread:
        return pct, direction, "noise"
    if abs(pct) < threshold_pct:
        return pct, direction, "within"
    if direction == "?":
        return pct, direction, "changed"
    worse = delta < 0 if direction == "higher" else delta > 0
    return pct, direction, "regressed" if worse else "improved"


def _run_summary(path: Path, meta: dict[str, Any], rows: pd.DataFrame) -> dict[str, Any]:
    return {
        "path": str(path),
        "run_id": meta.get("run_id"),
        "git_commit": meta.get("git_commit"),
        "device": meta.get("device_name"),
        "configurations": len(rows),
        "status": {str(k): int(v) for k, v in rows["status"].value_counts().items()},
    }


def compare_runs(path_a: str | Path, path_b: str | Path, threshold_pct: float = DEFAULT_THRESHOLD_PCT) -> Comparison:
    if not (threshold_pct >= 0 and math.isfinite(threshold_pct)):
        raise ValueError(f"--threshold must be a percentage >= 0 (got {threshold_pct!r})")
    pa_, pb_ = check_run_dir(path_a), check_run_dir(path_b)
    rows_a, _, meta_a = load_run(pa_)
    rows_b, _, meta_b = load_run(pb_)
    rows_a, rows_b = rows_a.reset_index(drop=True), rows_b.reset_index(drop=True)
    pairs, by_id, by_labels = match(rows_a, rows_b)
    if not pairs:
        raise ValueError(
            f"no configuration of {str(pb_)!r} matches one of {str(pa_)!r} "
            "(by config_id or by labels): nothing to compare"
        )
    ia, ib = {i for i, _ in pairs}, {j for _, j in pairs}
    metrics = metrics_compared([c for c in rows_a.columns if c in rows_b.columns])
    changes: list[Change] = []
    status_changes: list[dict[str, str]] = []
    for i, j in pairs:
        a, b = rows_a.loc[i], rows_b.loc[j]
        label = _label(b)
        if a["status"] != b["status"]:
            status_changes.append(
                {
                    "config": label,
                    "config_id": str(b["config_id"]),
                    "a": str(a["status"]),
                    "b": str(b["status"]),
                    "error": str(b.get("error") or "")[:300],
                }
            )
        if a["status"] != "ok" or b["status"] != "ok":
            continue
        for m in metrics:
            va = math.nan if pd.isna(a[m]) else float(a[m])
            vb = math.nan if pd.isna(b[m]) else float(b[m])
            if math.isnan(va) and math.isnan(vb):
                continue
            if m.startswith("time_") and va == 0 and vb == 0:
                continue  # a stage neither run has (backward in fwd mode)
            spread = _spread(m, a, b)
            pct, direction, verdict = judge(m, va, vb, spread, threshold_pct)
            changes.append(Change(label, str(b["config_id"]), m, va, vb, pct, spread, direction, verdict))
    return Comparison(
        a=_run_summary(pa_, meta_a, rows_a),
        b=_run_summary(pb_, meta_b, rows_b),
        threshold_pct=threshold_pct,
        matched_by_id=by_id,
        matched_by_labels=by_labels,
        only_in_a=[_label(rows_a.loc[i]) for i in rows_a.index if i not in ia],
        only_in_b=[_label(rows_b.loc[j]) for j in rows_b.index if j not in ib],
        status_changes=status_changes,
        changes=changes,
    )


_ORDER = {"regressed": 0, "improved": 1, "changed": 2, "noise": 3, "within": 4, "n/a": 5, "same": 6}


def _fmt(v: float) -> str:
    if isinstance(v, float) and math.isnan(v):
        return "n/a"
    if isinstance(v, float) and math.isinf(v):
        return "+inf" if v > 0 else "-inf"
    return f"{v:.4g}"


def format_table(c: Comparison, show_all: bool = False) -> str:
    """Header, status changes, then regressions and improvements (every comparison with
    ``show_all``; noise is otherwise only counted)."""
    lines = [
        f"A: {c.a['path']} (commit {c.a['git_commit']}, {c.a['device']})",
        f"B: {c.b['path']} (commit {c.b['git_commit']}, {c.b['device']})",
        f"matched {c.matched_by_id + c.matched_by_labels} configurations ({c.matched_by_id} by config_id, "
        f"{c.matched_by_labels} by labels); only in A: {len(c.only_in_a)}, only in B: {len(c.only_in_b)}",
    ]
    for s in c.status_changes:
        lines.append(
            f"status {s['a']} -> {s['b']}: {s['config']}"
            + (f"  ({s['error'].splitlines()[0]})" if s["error"].strip() else "")
        )
    shown = [ch for ch in c.changes if show_all or ch.verdict in ("regressed", "improved", "changed")]
    shown.sort(
        key=lambda ch: (
            _ORDER[ch.verdict],
            -abs(ch.change_pct) if math.isfinite(ch.change_pct) else -math.inf,
            ch.config,
            ch.metric,
        )
    )
    if shown:
        head = ("verdict", "metric", "A", "B", "change", "spread", "better", "configuration")
        cells = [
            (
                ch.verdict,
                ch.metric,
                _fmt(ch.a),
                _fmt(ch.b),
                "n/a" if math.isnan(ch.change_pct) else _fmt(ch.change_pct) + "%",
                _fmt(ch.spread),
                ch.direction,
                ch.config,
            )
            for ch in shown
        ]
        widths = [max(len(str(r[k])) for r in [head, *cells]) for k in range(len(head) - 1)]
        for r in [head, *cells]:
            lines.append("  ".join(str(v).ljust(w) for v, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1])
    counts = pd.Series([ch.verdict for ch in c.changes]).value_counts().to_dict() if c.changes else {}
    lines.append(
        f"{len(c.changes)} metric comparisons: "
        + ", ".join(f"{counts.get(k, 0)} {k}" for k in ("regressed", "improved", "noise", "within", "same"))
        + f" (threshold {c.threshold_pct:g}%)"
    )
    verdict = "FAIL" if c.failed else "OK"
    lines.append(
        f"{verdict}: {len(c.regressions)} regressions beyond the threshold and not noise"
        + (f", {len(c.lost)} configurations no longer ok" if c.lost else "")
    )
    return "\n".join(lines)
