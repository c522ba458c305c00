"""``moe-bench merge``: join run directories (shards of one sweep, or resumed pieces) into one run."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

import click
import pyarrow as pa
import pyarrow.parquet as pq

from moe_routing_bench.bench.record import ROW_SCHEMA, TABLES, RunDir, atomic_write_table
from moe_routing_bench.routers.contract import RoutingError


def merge_runs(sources: list[Path], out_root: Path, allow_different: bool = False) -> RunDir:
    """A new run whose rows are every source's rows, with run_id rewritten to the merged run's.

    Shards must come from the same sweep (same blocks) unless ``allow_different``. A config id
    found in two sources is refused: the merged run must hold each configuration once.
    """
    if not sources:
        raise RoutingError("merge needs at least one run directory")
    runs = [RunDir.open(p) for p in sources]
    metas = [r.read_meta() for r in runs]
    if not allow_different and any(m.get("blocks") != metas[0].get("blocks") for m in metas[1:]):
        raise RoutingError(
            "the runs come from different sweeps (meta.json blocks differ); pass --allow-different"
        )
    owner: dict[str, Path] = {}
    for run in runs:
        for cid in run.finished():
            if cid in owner:
                raise RoutingError(f"configuration {cid} is in both {owner[cid]} and {run.path}")
            owner[cid] = run.path
    out_root.mkdir(parents=True, exist_ok=True)
    merged = RunDir.create(out_root)
    for run in runs:
        # rows, loads, breakdown, and any other per-config table a command wrote (ep_ranks).
        known = {"rows": ROW_SCHEMA, **TABLES}
        for folder in sorted(p for p in run.path.iterdir() if p.is_dir() and any(p.glob("*.parquet"))):
            for part in sorted(folder.glob("*.parquet")):
                table = pq.read_table(part, schema=known.get(folder.name))
                if "run_id" in table.schema.names:
                    ids = pa.array([merged.run_id] * table.num_rows, pa.string())
                    table = table.set_column(table.schema.get_field_index("run_id"), "run_id", ids)
                (merged.path / folder.name).mkdir(exist_ok=True)
                atomic_write_table(merged.path / folder.name / part.name, table)
    meta = dict(metas[0])
    meta.update(
        run_id=merged.run_id,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        merged_from=[str(r.path) for r in runs],
        merged_status=[m.get("status") for m in metas],
        shard=None,
        configurations=len(owner),
        status="complete" if all(m.get("status") == "complete" for m in metas) else "partial",
        plugins=sorted({p for m in metas for p in m.get("plugins", [])}),
    )
    merged.write_meta(meta)
    merged.consolidate()
    return merged


@click.command("merge")
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("results"), show_default=True)
@click.option("--allow-different", is_flag=True, help="Merge runs of different sweeps.")
def merge_cmd(runs: tuple[Path, ...], out_dir: Path, allow_different: bool) -> None:
    """Join run directories (e.g. the shards of one sweep) into one run for reporting."""
    merged = merge_runs(list(runs), out_dir, allow_different)
    meta = merged.read_meta()
    click.echo(
        f"{merged.path}: {meta['configurations']} configurations from {len(runs)} runs ({meta['status']})"
    )
