"""Recording expert-parallel runs: the ROW_SCHEMA row per configuration, and the per-rank table.

An ``moe-bench ep`` run directory is an ordinary run directory (``bench.record``) plus one table:

    ep_ranks/<config_id>.parquet   one row per rank (EP_RANKS_SCHEMA), written before the config's row
    ep_ranks.parquet               consolidated copy

The ROW_SCHEMA row of a configuration holds its status, routing metrics (mean and SE over every
rank's measured batches) and stage times of the *slowest* rank (the one the step waits for):
``time_dispatch`` = local permute + counts and rows exchange, ``time_combine`` = return exchange +
weighted sum, ``time_total`` = the whole step including waits; ``tokens_per_s`` = W * T / total.
``config_json`` carries the EP fields (nproc, placement, owner map, dist backend).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from moe_routing_bench.bench.ep.exchange import COUNTS, EPPoint
from moe_routing_bench.bench.metrics import METRICS, aggregate
from moe_routing_bench.bench.record import RunDir, atomic_write_table, header
from moe_routing_bench.kernels.experts import expert_flops

EP_RANKS = "ep_ranks"
EP_RANKS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("config_id", pa.string()),
        ("router", pa.string()),
        ("workload", pa.string()),
        ("nproc", pa.int64()),
        ("placement", pa.string()),
        ("dist_backend", pa.string()),
        ("rank", pa.int64()),
        ("experts_local", pa.int64()),
        ("tokens_in", pa.int64()),
        # rows and bytes: means per measured step; bytes exclude a rank's rows to itself
        ("rows_kept", pa.float64()),
        ("rows_sent", pa.float64()),
        ("rows_local", pa.float64()),
        ("rows_received", pa.float64()),
        ("rows_processed", pa.float64()),
        ("bytes_sent", pa.float64()),
        ("bytes_received", pa.float64()),
        ("a2a_time_median", pa.float64()),
        ("a2a_time_p20", pa.float64()),
        ("a2a_time_p80", pa.float64()),
        ("a2a_dispatch_median", pa.float64()),
        ("a2a_combine_median", pa.float64()),
        ("expert_time_median", pa.float64()),
        ("expert_time_p20", pa.float64()),
        ("expert_time_p80", pa.float64()),
        ("wait_time_median", pa.float64()),
        ("busy_time_median", pa.float64()),
        ("route_time_median", pa.float64()),
        ("total_time_median", pa.float64()),
        # per configuration, repeated on each rank's row so plots need no join
        ("straggler", pa.float64()),
        ("load_ratio", pa.float64()),
    ]
)


def _rank_rows(run_id: str, ep: EPPoint, ranks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in ranks:
        out.append(
            {
                "run_id": run_id,
                "config_id": ep.config_id,
                "router": ep.point.router_label,
                "workload": ep.point.workload_label,
                "nproc": ep.nproc,
                "placement": ep.placement,
                "dist_backend": ep.dist_backend,
                "rank": r["rank"],
                "experts_local": int(r["experts_local"]),
                "tokens_in": int(r["tokens_in"]),
                **{k: r[k] for k in (*COUNTS[2:], "straggler", "load_ratio")},  # rows and bytes
                "a2a_time_median": r["a2a_median"],
                "a2a_time_p20": r["a2a_p20"],
                "a2a_time_p80": r["a2a_p80"],
                "a2a_dispatch_median": r["a2a_dispatch_median"],
                "a2a_combine_median": r["a2a_combine_median"],
                "expert_time_median": r["experts_median"],
                "expert_time_p20": r["experts_p20"],
                "expert_time_p80": r["experts_p80"],
                "wait_time_median": r["wait_median"],
                "busy_time_median": r["busy_median"],
                "route_time_median": r["route_median"],
                "total_time_median": r["total_median"],
            }
        )
    return out


def ep_base_row(run: RunDir, ep: EPPoint, meta: dict[str, Any]) -> dict[str, Any]:
    """The ROW_SCHEMA fields every row of this configuration has, whatever its status."""
    return {
        **header(meta, ep.config_id, ep.point.seed, ep.to_json()),
        **ep.point.columns(),
        "backend_ran": f"torch+{ep.dist_backend}",
    }


def ep_row(
    run: RunDir, ep: EPPoint, meta: dict[str, Any], gathered: dict[str, Any], ranks: list[dict[str, Any]]
) -> dict[str, Any]:
    """The configuration's ROW_SCHEMA row from the gathered per-rank statistics."""
    p = ep.point
    row = ep_base_row(run, ep, meta)
    row.update(
        status="ok",
        error="",
        top_k=gathered["top_k"],
        capacity=gathered["capacity"],
        ffn=gathered["ffn"],
        layout="compact",
        looks_at_whole_batch=gathered["looks_at_whole_batch"],
        mem_kind="n/a",
    )
    # ROW_SCHEMA stage <- the worker's per-step stage (dispatch and combine include their exchange)
    stage_of = {
        "route": "route",
        "dispatch": "dispatch",
        "experts": "experts",
        "combine": "combine_all",
        "shared": "shared",
        "total": "total",
    }
    for stage, src in stage_of.items():
        for q in ("median", "p20", "p80"):
            row[f"time_{stage}_{q}"] = max(r[f"{src}_{q}"] for r in ranks)
    for q in ("median", "p20", "p80"):
        row[f"time_backward_{q}"] = 0.0
    total = row["time_total_median"]
    row["tokens_per_s"] = ep.nproc * p.tokens / total if total > 0 else math.nan
    rows_total = sum(r["rows_processed"] for r in ranks)
    row["kept_rows"] = float(sum(r["rows_kept"] for r in ranks))
    t_exp = row["time_experts_median"]
    row["expert_tflops"] = (
        expert_flops(int(rows_total), p.hidden, gathered["ffn"]) / t_exp / 1e12 if t_exp > 0 else math.nan
    )
    metrics = gathered["metrics_WBM"].reshape(-1, len(METRICS)).tolist()
    for key, (mean, se) in aggregate([dict(zip(METRICS, m, strict=True)) for m in metrics]).items():
        row[key], row[f"{key}_se"] = mean, se
    return row


def write_ep_config(run_path: Path, ep: EPPoint, gathered: dict[str, Any], ranks: list[dict[str, Any]]) -> None:
    """Per-rank part, then loads and the row (the row part marks the configuration finished)."""
    run = RunDir.open(run_path)
    meta = run.read_meta()
    folder = run.path / EP_RANKS
    folder.mkdir(exist_ok=True)
    table = pa.Table.from_pylist(_rank_rows(run.run_id, ep, ranks), schema=EP_RANKS_SCHEMA)
    atomic_write_table(folder / f"{ep.config_id}.parquet", table)
    loads_WB2E = gathered["loads_WB2E"].sum(0)  # summed over ranks: the load each expert's owner sees
    loads = [
        {
            "run_id": run.run_id,
            "config_id": ep.config_id,
            "router": ep.point.router_label,
            "workload": ep.point.workload_label,
            "batch": b,
            "expert": e,
            "requested": int(loads_WB2E[b, 0, e]),
            "kept": int(loads_WB2E[b, 1, e]),
        }
        for b in range(loads_WB2E.shape[0])
        for e in range(loads_WB2E.shape[2])
    ]
    run.write_result(ep_row(run, ep, meta, gathered, ranks), {"loads": loads})


def write_error(run: RunDir, ep: EPPoint, meta: dict[str, Any], error: str) -> None:
    """A configuration the launch did not finish becomes a row with status=error."""
    row = ep_base_row(run, ep, meta)
    row.update(status="error", error=error)
    run.write_result(row)


def consolidate(run: RunDir) -> None:
    """rows.parquet, loads.parquet and ep_ranks.parquet from the parts."""
    run.consolidate()
    parts = sorted((run.path / EP_RANKS).glob("*.parquet"))
    table = (
        pa.concat_tables([pq.read_table(p, schema=EP_RANKS_SCHEMA) for p in parts])
        if parts
        else (EP_RANKS_SCHEMA.empty_table())
    )
    atomic_write_table(run.path / f"{EP_RANKS}.parquet", table)


def load_ep_ranks(path: str | Path) -> pd.DataFrame:
    """The per-rank table of an ``moe-bench ep`` run, from its parts."""
    parts = sorted((Path(path) / EP_RANKS).glob("*.parquet"))
    if not parts:
        return EP_RANKS_SCHEMA.empty_table().to_pandas()
    return pa.concat_tables([pq.read_table(p, schema=EP_RANKS_SCHEMA) for p in parts]).to_pandas()
