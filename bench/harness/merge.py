"""Merging run directories (the shards of one sweep, or resumed pieces) into one run.

The merged run holds each configuration once, its ``run_id`` rewritten; it is ``complete`` only
when every configuration of the sweep is present (the sweep is expanded again from the blocks the
shards recorded), and otherwise ``incomplete``, listing what is missing.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from moe_routing_bench.bench.harness.sweep import expand
from moe_routing_bench.bench.record import RunDir, atomic_write_table, now, recording
from moe_routing_bench.bench.schema import ROW_SCHEMA, TABLES
from moe_routing_bench.kernels.layer import list_backends
from moe_routing_bench.routers.contract import RoutingError
from moe_routing_bench.workloads.registry import load_plugin, workload_names


def merge_runs(sources: list[Path], out_root: Path, allow_different: bool = False) -> tuple[RunDir, list[str]]:
    """A new run whose rows are every source's rows; returns it and the sweep's missing config ids.

    Shards must come from the same sweep (same blocks) unless ``allow_different``. A config id
    found in two sources is refused: the merged run must hold each configuration once.
    """
    if not sources:
        raise RoutingError("merge needs at least one run directory")
    runs = [RunDir.open(p, flag="merge") for p in sources]
    metas = [r.read_meta() for r in runs]
    if not allow_different and any(m.get("blocks") != metas[0].get("blocks") for m in metas[1:]):
        raise RoutingError(
            "merge: the runs come from different sweeps (meta.json blocks differ); pass --allow-different"
        )
    owner: dict[str, Path] = {}
    for run, meta in zip(runs, metas, strict=True):
        ids = set(meta["config_ids"]) if isinstance(meta.get("config_ids"), list) else None
        for cid in run.finished(ids):
            if cid in owner:
                raise RoutingError(f"merge: configuration {cid} is in both {owner[cid]} and {run.path}")
            owner[cid] = run.path
    expected = _sweep_ids(metas)
    missing = sorted(set(expected) - set(owner)) if expected is not None else []
    merged = RunDir.create(out_root)
    meta = dict(metas[0])
    meta.update(
        run_id=merged.run_id,
        created=now(),
        merged_from=[str(r.path) for r in runs],
        merged_status=[m.get("status") for m in metas],
        shard=None,
        configurations=len(owner),
        config_ids=sorted(owner) if expected is None else expected,
        missing=missing,
        plugins=sorted({p for m in metas for p in m.get("plugins", [])}),
    )
    meta.pop("error", None)
    with recording(merged, meta):
        for run in runs:
            _copy_parts(run, merged, owner)
        merged.consolidate(set(owner))
        if missing:
            meta["status"] = "incomplete"
    return merged, missing


def _copy_parts(run: RunDir, merged: RunDir, owner: dict[str, Path]) -> None:
    """rows, loads, breakdown, and any other per-config table a command wrote (ep_ranks), with the
    merged run's id; parts of no configuration of the sweep (strays, parts set aside) stay out."""
    known = {"rows": ROW_SCHEMA, **TABLES}
    for folder in sorted(p for p in run.path.iterdir() if p.is_dir() and any(p.glob("*.parquet"))):
        for part in sorted(folder.glob("*.parquet")):
            if part.stem not in owner:
                continue
            table = pq.read_table(part, schema=known.get(folder.name))
            if "run_id" in table.schema.names:
                ids = pa.array([merged.run_id] * table.num_rows, pa.string())
                table = table.set_column(table.schema.get_field_index("run_id"), "run_id", ids)
            (merged.path / folder.name).mkdir(exist_ok=True)
            atomic_write_table(merged.path / folder.name / part.name, table)


def _sweep_ids(metas: list[dict]) -> list[str] | None:
    """Every config id of the sweep the shards come from, or None when they do not say (runs of
    different sweeps, or without blocks)."""
    blocks = metas[0].get("blocks")
    if not isinstance(blocks, list) or any(m.get("blocks") != blocks for m in metas[1:]):
        return None
    for plugin in metas[0].get("plugin_paths", []):
        if Path(plugin).is_file():
            load_plugin(plugin)
    try:
        return [p.config_id for p in expand(blocks, workload_names(), list_backends())]
    except (RoutingError, TypeError, KeyError, AttributeError) as exc:
        raise RoutingError(f"merge: the runs' meta.json blocks cannot be expanded again ({exc})") from None
