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
import signal
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from moe_routing_bench.bench import provenance
from moe_routing_bench.bench.schema import LOADS_SCHEMA, ROW_SCHEMA, TABLES
from moe_routing_bench.routers.contract import RoutingError

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
        "git_commit": provenance.git_commit(),
        "device": str(dev),
        "device_name": device_name(dev),
        "machine": provenance.machine_info(),
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


class WriteError(OSError):
    """A run's file could not be written (disk full, read-only, not a directory), named with why."""


@contextmanager
def _atomically(path: Path) -> Iterator[Path]:
    """Write to a temporary name, then rename it to ``path``; a write that fails removes its temporary
    file (on a full disk that frees its blocks) and raises WriteError naming ``path``."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise WriteError(exc.errno, f"cannot write {path}: {_reason(exc)}") from exc


def _reason(exc: OSError) -> str:
    return os.strerror(exc.errno) if exc.errno else " ".join(str(exc).split())


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    with _atomically(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_table(path: Path, table: pa.Table) -> None:
    """``table`` as Parquet at ``path``, atomically (see :func:`_atomically`)."""
    with _atomically(path) as tmp:
        pq.write_table(table, tmp)


UNREADABLE = ".unreadable"  # where a part that cannot be read is moved, inside its table folder


def check_out_dir(root: Path | str, flag: str = "--out") -> Path:
    """``root`` as an existing directory (made with its parents), or RoutingError naming ``flag``."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise RoutingError(f"{flag} must be a directory (got the file {str(root)!r})")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RoutingError(f"{flag} {root}: cannot create the directory ({_reason(exc)})") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise RoutingError(f"{flag} {root}: the directory is not writable")
    return root


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
    def create(cls, root: Path, run_id: str | None = None, folders: tuple[str, ...] = ("rows", "loads")) -> RunDir:
        """A new run directory under ``root`` (see :func:`check_out_dir`) with empty ``folders``."""
        run = cls(check_out_dir(root) / (run_id or new_run_id()))
        try:
            run.path.mkdir(exist_ok=False)
            for name in folders:
                (run.path / name).mkdir()
        except OSError as exc:
            raise RoutingError(f"--out {root}: cannot create the run directory {run.path} ({_reason(exc)})") from None
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
        """Rewrite meta.json atomically; where that fails (a full disk) the status must still not lie:
        the same content, compact, overwrites the indented file in place, needing no new blocks."""
        path = self.path / "meta.json"
        try:
            _atomic_write_bytes(path, json.dumps(meta, indent=2, default=str).encode())
        except WriteError:
            compact = json.dumps(meta, separators=(",", ":"), default=str).encode()
            if not path.is_file() or path.stat().st_size < len(compact):
                raise
            with open(path, "r+b") as fh:
                fh.write(compact)
                fh.truncate()
                fh.flush()
                os.fsync(fh.fileno())

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


class RunFailed(Exception):
    """The harness raised while a run was recording (meta.json says ``failed``, and why): exit 1."""

    def __init__(self, run: RunDir, reason: str) -> None:
        super().__init__(f"run {run.path} failed: {reason}")
        self.run, self.reason = run, reason


@contextmanager
def recording(run: RunDir, meta: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Keep a run's meta.json true while its body runs.

    ``running``; ``complete`` when the body returns (unless it set another status: a merge with
    configurations missing); ``interrupted`` on Ctrl-C or SIGTERM (re-raised; SIGTERM raises
    :class:`Interrupted` in the main thread); ``failed`` with the one-line reason when the harness
    raised, re-raised as :class:`RunFailed` (which says so if even meta.json could not record it).
    """
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    meta["status"] = "running"
    failure: BaseException | None = None
    try:
        run.write_meta(meta)
        yield meta
        if meta["status"] == "running":
            meta["status"] = "complete"
    except KeyboardInterrupt:
        meta["status"] = "interrupted"
        raise
    except BaseException as exc:
        meta["status"] = "failed"
        meta["error"] = one_line(exc)
        failure = exc
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        meta["finished"] = now()
        unrecorded = None
        try:
            run.write_meta(meta)
        except OSError as exc:
            unrecorded = exc
            if failure is None:
                failure = exc
                meta["error"] = one_line(exc)
    if failure is not None:
        reason = meta.get("error") or one_line(failure)
        if unrecorded is not None and unrecorded is not failure:
            reason += f"; meta.json could not record it ({one_line(unrecorded)})"
        if not isinstance(failure, Exception):
            raise failure
        raise RunFailed(run, reason) from failure


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(f"signal {signum}")


def one_line(exc: BaseException) -> str:
    """``Type: message`` on one line, for meta.json and stderr (a failed write: its message)."""
    text = " ".join(str(exc).split()) or "(no message)"
    if isinstance(exc, WriteError):
        return text.removeprefix(f"[Errno {exc.errno}] ")
    return f"{type(exc).__name__}: {text}"


def read_parts(folder: Path, schema: pa.Schema | None, ids: set[str] | None = None) -> pa.Table:
    """The parts of ``folder`` (those of ``ids`` when given) as one table; none gives an empty one."""
    parts = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    if ids is not None:
        parts = [p for p in parts if p.stem in ids]
    if not parts:
        return (schema or pa.schema([])).empty_table()
    return pa.concat_tables([_read_part(p, schema) for p in parts])


def _read_part(part: Path, schema: pa.Schema | None) -> pa.Table:
    try:
        return pq.read_table(part, schema=schema)
    except (pa.ArrowException, OSError) as exc:
        why = f"{part} cannot be read ({' '.join(str(exc).split())}); `moe-bench run --resume {part.parent.parent}`"
        raise RoutingError(why + " sets it aside and runs its configuration again") from None


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
