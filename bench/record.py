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

import contextlib
import datetime as _dt
import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from moe_routing_bench.bench.metrics import METRICS
from moe_routing_bench.routers.contract import RoutingError

# The folder holding bench/, routers/, kernels/ and workloads/: a checkout's root, or the installed
# package's folder (site-packages/moe_routing_bench).
PACKAGE_ROOT = Path(__file__).resolve().parents[1]

# Timed stages of one step; "other" is total minus the stages before it (the step's time that no
# stage accounts for: Python between stages, the autograd engine's own work, allocation).
STAGES = ("route", "dispatch", "experts", "combine", "shared", "backward", "other", "total")
TIMED_STAGES = STAGES[:6]

# The header every table of every kind of run starts with: which run, which configuration, when,
# which harness (commit), which machine and versions, the seed and the full config as JSON.
HEADER: list[tuple[str, pa.DataType]] = [
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
    ("plugins", pa.string()),
]
_STATUS_COLUMNS: list[tuple[str, pa.DataType]] = [("status", pa.string()), ("error", pa.string())]
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
    ("model", pa.string()),
    ("ffn_kind", pa.string()),
    ("shared_ffn", pa.int64()),
    ("reuse_buffers", pa.bool_()),
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
    ("expert_path", pa.string()),
    ("workspace_bytes", pa.float64()),
]
_METRIC_COLUMNS: list[tuple[str, pa.DataType]] = [
    col for m in METRICS for col in ((m, pa.float64()), (f"{m}_se", pa.float64()))
]

ROW_SCHEMA = pa.schema(HEADER + _STATUS_COLUMNS + _CONFIG_COLUMNS + _MEASURE_COLUMNS + _METRIC_COLUMNS)
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


KINDS = ("sweep", "ep", "simulate", "quality")  # what meta.json's "kind" says; report draws each


def now() -> str:
    """UTC time, to the second, as every record writes it."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def new_meta(kind: str, run_id: str, device: Any, **fields: Any) -> dict[str, Any]:
    """A run's meta.json at its start: kind, status ``running``, provenance and machine, then
    ``fields`` (the run's config). Every kind of run starts its meta here."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)} (got {kind!r})")
    import torch

    dev = torch.device(device)
    from moe_routing_bench.bench.timing import device_name

    return {
        "run_id": run_id,
        "kind": kind,
        "status": "running",
        "created": now(),
        "git_commit": git_commit(),
        "device": str(dev),
        "device_name": device_name(dev),
        "machine": machine_info(),
        "command": " ".join(sys.argv),
        **fields,
    }


def header(meta: dict[str, Any], config_id: str, seed: int, config_json: str) -> dict[str, Any]:
    """The HEADER columns of one row of the run whose meta is ``meta``."""
    return {
        "run_id": meta["run_id"],
        "config_id": config_id,
        "timestamp": now(),
        "git_commit": meta["git_commit"],
        "device": meta["device"],
        "device_name": meta["device_name"],
        "torch_version": meta["machine"]["torch_version"],
        "triton_version": meta["machine"]["triton_version"],
        "seed": seed,
        "config_json": config_json,
        "plugins": "; ".join(meta.get("plugins", [])),
    }


def config_id_of(config_json: str) -> str:
    """A configuration's id: stable across runs and processes (what --resume matches on)."""
    return hashlib.sha1(config_json.encode()).hexdigest()[:16]


def new_run_id() -> str:
    """Sortable and unique: UTC time plus a short random suffix."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


def git_commit() -> str:
    """The harness's own provenance: the commit of the checkout this package was imported from,
    with ``-dirty`` when tracked files differ from it; the installed version when the package is
    not a checkout (a wheel). Never the working directory's repository."""
    root = PACKAGE_ROOT
    try:
        top = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--show-toplevel"], capture_output=True, text=True, timeout=10
        )
        if top.returncode == 0 and Path(top.stdout.strip()).resolve() == root:
            out = subprocess.run(
                ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            dirty = subprocess.run(
                ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            if out.returncode == 0:
                return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return f"moe-routing-bench {metadata.version('moe-routing-bench')} (installed)"
    except metadata.PackageNotFoundError:
        return "unknown"


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


UNREADABLE = ".unreadable"  # where a part that cannot be read is moved, inside its table folder


class Interrupted(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C: the run stops, finished rows stay, meta says interrupted."""


class RunDir:
    """One run's directory. Parts are append-only and atomic; metadata is rewritten atomically."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.rows_dir = self.path / "rows"
        self.loads_dir = self.path / "loads"
        self.set_aside: list[str] = []  # parts moved to .unreadable/ by finished()

    @property
    def run_id(self) -> str:
        return self.path.name

    @classmethod
    def create(cls, root: Path, run_id: str | None = None) -> RunDir:
        """A new, empty run directory under ``root`` (created if missing)."""
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise RoutingError(f"--out must be a directory (got the file {str(root)!r})")
        run = cls(root / (run_id or new_run_id()))
        run.rows_dir.mkdir(parents=True, exist_ok=False)
        run.loads_dir.mkdir(parents=True, exist_ok=True)
        return run

    @classmethod
    def open(cls, path: Path, flag: str = "--resume") -> RunDir:
        run = cls(Path(path))
        if not (run.path / "meta.json").is_file():
            raise RoutingError(f"{flag} must name a run directory holding meta.json (got {str(path)!r})")
        return run

    def read_meta(self) -> dict[str, Any]:
        path = self.path / "meta.json"
        try:
            meta = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RoutingError(f"{path} is not valid JSON ({exc}); the run's metadata is damaged") from None
        if not isinstance(meta, dict):
            raise RoutingError(f"{path} must hold a JSON object (got {type(meta).__name__})")
        return meta

    def write_meta(self, meta: dict[str, Any]) -> None:
        _atomic_write_bytes(self.path / "meta.json", json.dumps(meta, indent=2, default=str).encode())

    def finished(self, ids: set[str] | None = None) -> set[str]:
        """Config ids (among ``ids``, when given) with a whole, readable row part. A part that
        cannot be read (truncated by a full disk) is moved to rows/.unreadable/ and named in
        ``set_aside``, so the configuration runs again; temporary files are ignored."""
        done = set()
        for part in sorted(self.rows_dir.glob("*.parquet")) if self.rows_dir.is_dir() else []:
            if ids is not None and part.stem not in ids:
                continue
            try:
                pq.read_metadata(part)
            except (pa.ArrowException, OSError):
                aside = self.rows_dir / UNREADABLE
                aside.mkdir(exist_ok=True)
                os.replace(part, aside / part.name)
                self.set_aside.append(str(part))
                continue
            done.add(part.stem)
        return done

    def forget(self, ids: set[str]) -> None:
        """Remove the row parts of ``ids`` (error rows to re-run), moving them to .unreadable/."""
        aside = self.rows_dir / UNREADABLE
        for cid in ids:
            part = self.rows_dir / f"{cid}.parquet"
            if part.exists():
                aside.mkdir(exist_ok=True)
                os.replace(part, aside / f"retried-{part.name}")

    def write_result(self, row: dict[str, Any], tables: dict[str, list[dict[str, Any]]] | None = None) -> None:
        """Per-config tables (loads, breakdown) first, then the row: a row part exists only once
        everything it refers to is whole."""
        cid = row["config_id"]
        for name, records in (tables or {}).items():
            if records:
                folder = self.path / name
                folder.mkdir(exist_ok=True)
                atomic_write_table(folder / f"{cid}.parquet", pa.Table.from_pylist(records, schema=TABLES[name]))
        atomic_write_table(self.rows_dir / f"{cid}.parquet", pa.Table.from_pylist([row], schema=ROW_SCHEMA))

    def consolidate(self, ids: set[str] | None = None) -> None:
        """Write rows.parquet, loads.parquet and one file per other table folder (breakdown,
        ep_ranks, ...) from the parts of ``ids`` (every part when None): what readers use."""
        atomic_write_table(self.path / "rows.parquet", read_parts(self.rows_dir, ROW_SCHEMA, ids))
        folders = {p.name for p in self.path.iterdir() if p.is_dir() and p.name not in ("rows", "report")}
        for name in sorted(folders | {"loads"}):
            if name == "loads" or any((self.path / name).glob("*.parquet")):
                table = read_parts(self.path / name, TABLES.get(name), ids)
                atomic_write_table(self.path / f"{name}.parquet", table)


@contextmanager
def recording(run: RunDir, meta: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Keep a run's meta.json true while its body runs.

    ``running`` while it runs; ``complete`` when the body returns (unless it set another status,
    e.g. a merge with configurations missing); ``interrupted`` on Ctrl-C or SIGTERM;
    ``failed`` with the one-line reason when the harness itself raised. SIGTERM is turned into
    :class:`Interrupted` while the body runs (in the main thread).
    """
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    meta["status"] = "running"
    run.write_meta(meta)
    try:
        yield meta
        if meta["status"] == "running":
            meta["status"] = "complete"
    except KeyboardInterrupt:
        meta["status"] = "interrupted"
        raise
    except BaseException as exc:
        meta["status"] = "failed"
        meta["error"] = one_line(exc)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        meta["finished"] = now()
        with contextlib.suppress(OSError):  # a full disk: the raising error is what gets reported
            run.write_meta(meta)


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(f"signal {signum}")


def one_line(exc: BaseException) -> str:
    """``Type: message`` on one line, for meta.json and stderr."""
    text = " ".join(str(exc).split()) or "(no message)"
    return f"{type(exc).__name__}: {text}"


def read_parts(folder: Path, schema: pa.Schema | None, ids: set[str] | None = None) -> pa.Table:
    """The parts of ``folder`` (those of ``ids`` when given) as one table; none gives an empty one."""
    parts = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    if ids is not None:
        parts = [p for p in parts if p.stem in ids]
    if not parts:
        return (schema or pa.schema([])).empty_table()
    return pa.concat_tables([pq.read_table(p, schema=schema) for p in parts])


def load_run(path: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """(rows, loads, meta) of a run, from its parts, so a run still in progress reads too. Only
    parts of the run's own configurations are read (meta's ``config_ids``, where it has them)."""
    run = RunDir.open(Path(path), flag="run directory")
    meta = run.read_meta()
    ids = set(meta["config_ids"]) if isinstance(meta.get("config_ids"), list) else None
    # Nullable integers: a dropless configuration has no capacity, and that stays an integer column.
    mapper = {pa.int64(): pd.Int64Dtype(), pa.bool_(): pd.BooleanDtype()}.get
    rows = read_parts(run.rows_dir, ROW_SCHEMA, ids).to_pandas(types_mapper=mapper)
    loads = read_parts(run.loads_dir, LOADS_SCHEMA, ids).to_pandas(types_mapper=mapper)
    return rows, loads, meta
