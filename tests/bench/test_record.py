"""Run directories tell the truth: the status recording() keeps, meta.json on a full disk, failed
writes that name their file, and provenance that is the harness's own whatever the directory."""

from __future__ import annotations

import errno
import json
import subprocess
from pathlib import Path

import pyarrow as pa
import pytest

from moe_routing_bench.bench import provenance, record
from moe_routing_bench.bench.record import Interrupted, RunDir, RunFailed, WriteError, recording


@pytest.fixture
def run(tmp_path) -> RunDir:
    return RunDir.create(tmp_path / "out")


def _status(run: RunDir) -> dict:
    return json.loads((run.path / "meta.json").read_text())


def test_recording_says_what_happened(run):
    with recording(run, {"run_id": run.run_id}) as meta:
        assert _status(run)["status"] == "running"
    assert _status(run)["status"] == "complete" and "finished" in meta
    with recording(run, {"run_id": run.run_id}) as meta:
        meta["status"] = "incomplete"  # a merge with configurations missing keeps its own word
    assert _status(run)["status"] == "incomplete"
    with pytest.raises(KeyboardInterrupt), recording(run, {}):
        raise Interrupted("signal 15")
    assert _status(run)["status"] == "interrupted"


def test_a_harness_failure_is_a_failed_run_with_its_reason(run):
    with pytest.raises(RunFailed) as err, recording(run, {}):
        raise OSError(errno.ENOSPC, "No space left on device")
    meta = _status(run)
    assert meta["status"] == "failed" and meta["error"] == "OSError: [Errno 28] No space left on device"
    assert str(err.value) == f"run {run.path} failed: {meta['error']}"


def test_a_failed_write_names_its_file_and_leaves_no_temporary(run, monkeypatch):
    def full(table, where, **kw):
        Path(where).write_bytes(b"PAR1")  # half a part
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(record.pq, "write_table", full)
    target = run.rows_dir / "abc.parquet"
    with pytest.raises(WriteError, match=rf"cannot write {target}: No space left on device"):
        record.atomic_write_table(target, pa.table({"x": [1]}))
    assert list(run.rows_dir.iterdir()) == []


def test_meta_json_stays_true_when_it_cannot_grow(run, monkeypatch):
    # A full disk (or a file-size limit) refuses the new meta.json, which is longer than the old
    # one; the same content, compact, overwrites it in place instead of leaving "running".
    meta = {"run_id": run.run_id, "blocks": [{"routers": ["switch"] * 20}], "status": "running"}
    run.write_meta(meta)

    def full(path, data):
        raise WriteError(errno.ENOSPC, f"cannot write {path}: No space left on device")

    monkeypatch.setattr(record, "_atomic_write_bytes", full)
    run.write_meta({**meta, "status": "failed", "error": "OSError: disk full"})
    assert _status(run)["status"] == "failed" and _status(run)["blocks"] == meta["blocks"]


def test_when_even_meta_json_cannot_be_written_the_failure_says_so(run, monkeypatch):
    def nowhere(*a, **kw):
        raise WriteError(errno.EROFS, "cannot write meta.json: Read-only file system")

    with pytest.raises(RunFailed, match=r"boom; meta\.json could not record it"), recording(run, {}):
        monkeypatch.setattr(run, "write_meta", nowhere)
        raise RuntimeError("boom")


def test_provenance_is_the_harness_checkout_whatever_the_working_directory(tmp_path, monkeypatch):
    here = provenance.git_commit()
    head = subprocess.run(["git", "-C", str(provenance.PACKAGE_ROOT), "rev-parse", "--short=12", "HEAD"],
                          capture_output=True, text=True)  # fmt: skip
    assert head.returncode == 0 and here.startswith(head.stdout.strip())
    other = tmp_path / "other-repo"
    other.mkdir()
    for cmd in (
        ["init", "-q"],
        ["-c", "user.email=x@y", "-c", "user.name=x", "commit", "-q", "--allow-empty", "-m", "x"],
    ):
        subprocess.run(["git", "-C", str(other), *cmd], check=True)
    monkeypatch.chdir(other)  # it recorded this repository's HEAD before
    assert provenance.git_commit() == here
