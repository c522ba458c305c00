"""Fixtures shared by the report and compare tests: a tiny real run, and edited copies of it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moe_routing_bench.bench.record import load_run
from moe_routing_bench.bench.schema import ROW_SCHEMA

REPO = Path(__file__).resolve().parents[3]

# 20 configurations: two T for memory against T, two cf for drops against cf, backward for stages,
# an expert-choice router for the whole-batch mark and its undefined drop_rate, and a dropless topk
# (its own option wins over the sweep's capacity factors: it runs once per T and backend).
TINY = (  # noqa: SIM905  (one readable command line)
    "--routers switch,topk[capacity_factor=none],expert_choice --workloads uniform --experts 8 "
    "--tokens 32,64 --hidden 8 --capacity-factor 1.0,2.0 --backend torch,einsum --mode fwd+bwd --repeats 3"
).split()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """One real run for the whole session (the report and compare tests share it); tests edit
    copies, never the run itself."""
    return make_run(tmp_path_factory.mktemp("runs"), *TINY)


@pytest.fixture(scope="session")
def clone() -> Callable[..., Path]:
    """``clone(run, dst, edit=None)``: a copy of a run, its rows replaced by ``edit(rows)``."""
    return _clone


def make_run(out: Path, *args: str, timeout: float = 240) -> Path:
    """``moe-bench run ... --out out`` in a subprocess; returns the run directory."""
    proc = subprocess.run(
        [sys.executable, "-m", "moe_routing_bench.bench.cli", "run", *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    return run


def rewrite_rows(run: Path, edit: Callable[[pd.DataFrame], pd.DataFrame]) -> None:
    """Replace the run's row parts by ``edit(rows)``, one part per row, as the harness writes them."""
    rows, _, _ = load_run(run)
    new = edit(rows.copy())
    for part in (run / "rows").glob("*.parquet"):
        part.unlink()
    (run / "rows.parquet").unlink(missing_ok=True)
    for _, row in new.iterrows():
        rec = {k: (None if _missing(v) else v) for k, v in row.items() if k in ROW_SCHEMA.names}
        table = pa.Table.from_pylist([rec], schema=ROW_SCHEMA)
        pq.write_table(table, run / "rows" / f"{row['config_id']}.parquet")
    meta = json.loads((run / "meta.json").read_text())
    meta["config_ids"] = [str(c) for c in new["config_id"]]  # the run's own configurations
    (run / "meta.json").write_text(json.dumps(meta))


def _missing(v: object) -> bool:
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def _clone(run: Path, dst: Path, edit: Callable[[pd.DataFrame], pd.DataFrame] | None = None) -> Path:
    shutil.copytree(run, dst)
    if edit is not None:
        rewrite_rows(dst, edit)
    return dst
