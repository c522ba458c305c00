"""Run directories: crash-safe Parquet parts, run metadata, and reading a run back.

Layout of ``results/<run_id>/``::

    meta.json             run metadata (machine, versions, commit, sweep, plugins, status)
    rows/<config_id>.parquet    one row per finished configuration (ok, error or skipped)
    loads/<config_id>.parquet   per-expert loads per batch, long format
    rows.parquet, loads.parquet consolidated copies written at the end of a run (or a resume)

A part is written to a temporary name and renamed into place, so a killed run leaves only whole
parts; ``--resume`` skips every configuration that has one.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from moe_routing_bench.bench.metrics import METRICS

STAGES = ("route", "dispatch", "experts", "combine", "shared", "backward", "total")

_META_COLUMNS: list[tuple[str, pa.DataType]] = [
    ("run_id", pa.string()),
    ("config_id", pa.string()),
    ("timestamp", pa.string()),
    ("git_commit", pa.string()),
    ("device", pa.string()),
    ("device_name", pa.string()),
    ("torch_version", pa.string()),
    ("triton_version", pa.string()),
    ("seed", pa.int64()),
    ("config_json", pa.string()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("plugins", pa.string()),
]
_CONFIG_COLUMNS: list[tuple[str, pa.DataType]] = [
    ("router", pa.string()),
    ("router_name", pa.string()),
    ("workload", pa.string()),
    ("workload_name", pa.string()),
    ("tokens", pa.int64()),
    ("experts", pa.int64()),
    ("top_k", pa.float64()),
    ("capacity_factor", pa.float64()),
    ("capacity", pa.int64()),
    ("hidden", pa.int64()),
    ("ffn", pa.int64()),
    ("backend", pa.string()),
    ("backend_ran", pa.string()),
    ("layout", pa.string()),
    ("dtype", pa.string()),
    ("mode", pa.string()),
    ("repeats", pa.int64()),
    ("looks_at_whole_batch", pa.bool_()),
]
_MEASURE_COLUMNS: list[tuple[str, pa.DataType]] = [
    *[(f"time_{s}_{q}", pa.float64()) for s in STAGES for q in ("median", "p20", "p80")],
    ("tokens_per_s", pa.float64()),
    ("peak_mem_bytes", pa.float64()),
    ("mem_kind", pa.string()),
    ("dispatch_buffer_bytes", pa.float64()),
    ("kept_rows", pa.float64()),
    ("permute_bytes", pa.float64()),
    ("combine_bytes", pa.float64()),
    ("permute_gbps", pa.float64()),
    ("combine_gbps", pa.float64()),
    ("copy_gbps", pa.float64()),
    ("permute_copy_ratio", pa.float64()),
    ("combine_copy_ratio", pa.float64()),
    ("expert_tflops", pa.float64()),
]
_METRIC_COLUMNS: list[tuple[str, pa.DataType]] = [
    col for m in METRICS for col in ((m, pa.float64()), (f"{m}_se", pa.float64()))
]

ROW_SCHEMA = pa.schema(_META_COLUMNS + _CONFIG_COLUMNS + _MEASURE_COLUMNS + _METRIC_COLUMNS)
LOADS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("config_id", pa.string()),
        ("router", pa.string()),
        ("workload", pa.string()),
        ("batch", pa.int64()),
        ("expert", pa.int64()),
        ("requested", pa.int64()),
        ("kept", pa.int64()),
    ]
)


BREAKDOWN_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("config_id", pa.string()),
        ("router", pa.string()),
        ("workload", pa.string()),
        ("kind", pa.string()),  # "frequency" or "position"
        ("bucket", pa.string()),  # frequent/middle/rare, or q1..q4 of the position in the sequence
        ("tokens", pa.int64()),
        ("token_share", pa.float64()),
        ("requests", pa.int64()),
        ("drop_rate", pa.float64()),
        ("tokens_dropped_frac", pa.float64()),
    ]
)
TABLES = {"loads": LOADS_SCHEMA, "breakdown": BREAKDOWN_SCHEMA}


def new_run_id() -> str:
    """Sortable and unique: UTC time plus a short random suffix."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


def git_commit(cwd: Path | None = None) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10, cwd=cwd
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=cwd,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if out.returncode != 0:
        return "unknown"
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def machine_info() -> dict[str, Any]:
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # triton is optional off Linux
        triton_version = "absent"
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_version": torch.__version__,
        "triton_version": triton_version,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_table(path: Path, table: pa.Table) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


class RunDir:
    """One run's directory. Parts are append-only and atomic; metadata is rewritten atomically."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.rows_dir = self.path / "rows"
        self.loads_dir = self.path / "loads"

    @property
    def run_id(self) -> str:
        return self.path.name

    @classmethod
    def create(cls, root: Path, run_id: str | None = None) -> RunDir:
        run = cls(Path(root) / (run_id or new_run_id()))
        run.rows_dir.mkdir(parents=True, exist_ok=False)
        run.loads_dir.mkdir(parents=True, exist_ok=True)
        return run

    @classmethod
    def open(cls, path: Path) -> RunDir:
        run = cls(Path(path))
        if not (run.path / "meta.json").is_file():
            raise ValueError(f"--resume must name a run directory holding meta.json (got {str(path)!r})")
        run.rows_dir.mkdir(exist_ok=True)
        run.loads_dir.mkdir(exist_ok=True)
        return run

    def read_meta(self) -> dict[str, Any]:
        return json.loads((self.path / "meta.json").read_text())

    def write_meta(self, meta: dict[str, Any]) -> None:
        _atomic_write_bytes(self.path / "meta.json", json.dumps(meta, indent=2, default=str).encode())

    def finished(self) -> set[str]:
        """Config ids with a whole row part (temporary files are ignored)."""
        return {p.stem for p in self.rows_dir.glob("*.parquet")}

    def write_result(
        self, row: dict[str, Any], tables: dict[str, list[dict[str, Any]]] | None = None
    ) -> None:
        """Per-config tables (loads, breakdown) first, then the row: a row part exists only once
        everything it refers to is whole."""
        cid = row["config_id"]
        for name, records in (tables or {}).items():
            if records:
                folder = self.path / name
                folder.mkdir(exist_ok=True)
                atomic_write_table(
                    folder / f"{cid}.parquet", pa.Table.from_pylist(records, schema=TABLES[name])
                )
        atomic_write_table(self.rows_dir / f"{cid}.parquet", pa.Table.from_pylist([row], schema=ROW_SCHEMA))

    def consolidate(self) -> None:
        """Write rows.parquet, loads.parquet and one file per other table folder (breakdown,
        ep_ranks, ...) from the parts: what readers and reports use."""
        atomic_write_table(self.path / "rows.parquet", _read_parts(self.rows_dir, ROW_SCHEMA))
        folders = {p.name for p in self.path.iterdir() if p.is_dir() and p.name != "rows"} | {"loads"}
        for name in sorted(folders):
            if name == "loads" or any((self.path / name).glob("*.parquet")):
                atomic_write_table(
                    self.path / f"{name}.parquet", _read_parts(self.path / name, TABLES.get(name))
                )


def _read_parts(folder: Path, schema: pa.Schema | None) -> pa.Table:
    parts = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    if not parts:
        return (schema or pa.schema([])).empty_table()
    return pa.concat_tables([pq.read_table(p, schema=schema) for p in parts])


def load_run(path: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """(rows, loads, meta) of a run, from its parts, so a run still in progress reads too."""
    run = RunDir.open(Path(path))
    # Nullable integers: a dropless configuration has no capacity, and that stays an integer column.
    mapper = {pa.int64(): pd.Int64Dtype(), pa.bool_(): pd.BooleanDtype()}.get
    rows = _read_parts(run.rows_dir, ROW_SCHEMA).to_pandas(types_mapper=mapper)
    loads = _read_parts(run.loads_dir, LOADS_SCHEMA).to_pandas(types_mapper=mapper)
    return rows, loads, run.read_meta()
