"""Faults and hostile calls on real runs: broken plugins, a segfault, a full disk, SIGTERM mid-run,
damaged parts and metadata, and --resume refusing what it cannot honour. Each ends with every
finished row intact and a meta.json status that says what happened."""

from __future__ import annotations

import errno
import json
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from moe_routing_bench.bench.cli import main
from moe_routing_bench.bench.record import load_run

REPO = Path(__file__).resolve().parents[3]
SIZES = ["--tokens", "64", "--hidden", "8", "--experts", "4", "--repeats", "1"]


def invoke(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def error_lines(stderr: str) -> list[str]:
    """What follows each ``moe-bench: error:`` (a run's progress bar may precede it on its line)."""
    return stderr.split("moe-bench: error:")[1:]


def the_run(out: Path) -> Path:
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    return run


def _meta(run: Path) -> dict:
    return json.loads((run / "meta.json").read_text())


def _cli_process(args: list[str], fsize: int | None = None) -> subprocess.Popen:
    """``moe-bench`` in its own session, SIGINT at its default (a background job inherits it
    ignored), and a file-size limit (RLIMIT_FSIZE: writes past it fail as on a full disk)."""

    def setup() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.Popen(
        [sys.executable, "-m", "moe_routing_bench.bench.cli", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=setup,
    )


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished two-configuration sweep; tests copy it."""
    out = tmp_path_factory.mktemp("finished")
    res = invoke("run", "--routers", "switch,topk", "--capacity-factor", "1.0", *SIZES, "--out", out)
    assert res.exit_code == 0, res.output
    return the_run(out)


@pytest.fixture
def copy(finished, tmp_path):
    def _copy() -> Path:
        target = tmp_path / "runs" / finished.name
        shutil.copytree(finished, target)
        return target

    return _copy


def test_broken_plans_and_a_segfault_are_error_rows_and_the_sweep_goes_on(broken_plugin, tmp_path):
    routers = "broken[how=capacity],broken[how=nan],broken[how=segv],switch"
    res = invoke("run", "--plugin", broken_plugin, "--routers", routers, *SIZES, "--out", tmp_path)
    assert res.exit_code == 0, res.output
    rows, _, meta = load_run(the_run(tmp_path))
    by = rows.set_index("router")
    assert meta["status"] == "complete" and len(rows) == 4
    # NaN gates were recorded as ok, capacity -3 ran with everything dropped; a segfault is a row.
    assert by.loc["broken[how=capacity]", "status"] == "error"
    assert "capacity = -3" in by.loc["broken[how=capacity]", "error"]
    assert "weight_R = nan" in by.loc["broken[how=nan]", "error"]
    assert "signal 11" in by.loc["broken[how=segv]", "error"]
    assert "Traceback" not in by.loc["broken[how=capacity]", "error"]  # bad input needs no traceback
    assert by.loc["switch", "status"] == "ok"
    assert "error in broken[how=capacity]" in res.stderr and "capacity = -3" in res.stderr


@pytest.mark.parametrize("flags", [["--routers", "gshard", "--experts", "16"], ["--seed", "3"], ["--out", "x"]])
def test_resume_refuses_flags_that_would_change_the_sweep(copy, flags):
    run = copy()
    res = invoke("run", "--resume", run, *flags)  # exit 0, both flags ignored, before
    (line,) = error_lines(res.stderr)
    assert res.exit_code == 2 and all(f in line for f in flags if f.startswith("--")), res.output
    assert _meta(run)["status"] == "complete"


def test_resume_with_a_flag_that_keeps_the_sweep_finishes_it(copy):
    run = copy()
    res = invoke("run", "--resume", run, "--timeout", "30")
    assert res.exit_code == 0, res.output
    assert _meta(run)["status"] == "complete" and len(load_run(run)[0]) == 2


def test_resume_reads_only_its_parts_and_sets_an_unreadable_one_aside(copy):
    run = copy()
    parts = sorted((run / "rows").glob("*.parquet"))
    shutil.copy(parts[0], run / "rows" / "ffffffffffffffff.parquet")  # a stray part of no configuration
    parts[1].write_bytes(parts[1].read_bytes()[:100])  # truncated (a full disk while it was written)
    # Readers name the part and the way out (every report failed on "magic bytes" before).
    (line,) = error_lines(invoke("report", run, "--out", run / "report").stderr)
    assert parts[1].name in line and "--resume" in line
    res = invoke("run", "--resume", run)
    assert res.exit_code == 0, res.output
    assert f"unreadable part {parts[1]} moved aside" in res.stderr
    rows, _, meta = load_run(run)
    assert meta["status"] == "complete" and sorted(rows["config_id"]) == sorted(p.stem for p in parts)
    assert pq.read_table(run / "rows.parquet").num_rows == 2  # the stray part is in no table
    assert (run / "rows" / ".unreadable" / parts[1].name).is_file()


@pytest.mark.parametrize(
    "damage",
    [
        lambda meta: '{"run_id": ',  # truncated
        lambda meta: "[]",
        lambda meta: json.dumps({**meta, "blocks": [5]}),  # a TypeError traceback before
        lambda meta: json.dumps({**meta, "blocks": "x"}),
    ],
)
def test_damaged_meta_is_one_line_naming_it(copy, damage):
    run = copy()
    (run / "meta.json").write_text(damage(_meta(run)))
    res = invoke("run", "--resume", run)
    (line,) = error_lines(res.stderr)
    assert res.exit_code == 2 and "meta.json" in line, res.output


def test_retry_errors_runs_error_rows_again(broken_plugin, tmp_path):
    res = invoke("run", "--plugin", broken_plugin, "--routers", "broken", *SIZES, "--out", tmp_path,
                 env={"BROKEN_HOW": "raise"})  # fmt: skip
    assert res.exit_code == 0, res.output
    run = the_run(tmp_path)
    assert load_run(run)[0]["status"].tolist() == ["error"]
    assert invoke("run", "--resume", run).exit_code == 0  # error rows are finished rows
    assert load_run(run)[0]["status"].tolist() == ["error"]
    res = invoke("run", "--resume", run, "--retry-errors", env={"BROKEN_HOW": "ok"})
    assert res.exit_code == 0, res.output
    rows, _, meta = load_run(run)
    assert rows["status"].tolist() == ["ok"] and meta["status"] == "complete"


def test_a_full_disk_fails_the_run_and_keeps_every_finished_row(monkeypatch, tmp_path):
    import moe_routing_bench.bench.record as record

    write = record.pq.write_table
    parts = []

    def full_disk(table, where, *a, **kw):  # the second row part meets a full disk
        if Path(where).parent.name == "rows":
            parts.append(where)
            if len(parts) == 2:
                Path(where).write_bytes(b"PAR1 half")  # what a full disk leaves behind
                raise OSError(errno.ENOSPC, "No space left on device")
        return write(table, where, *a, **kw)

    monkeypatch.setattr(record.pq, "write_table", full_disk)
    args = ["run", "--routers", "switch", "--capacity-factor", "1.0,1.5,2.0", *SIZES, "--out", tmp_path]
    res = invoke(*args)  # a traceback, exit 1 and meta "complete" before
    (line,) = error_lines(res.stderr)
    assert res.exit_code == 1 and "failed" in line and "rows/" in line and "No space left on device" in line
    run = the_run(tmp_path)
    rows, _, meta = load_run(run)
    assert meta["status"] == "failed" and "No space left on device" in meta["error"]
    assert len(rows) == 1 and rows["status"].tolist() == ["ok"]  # the finished row, whole
    assert not list((run / "rows").glob(".*.tmp"))  # the half-written part was removed
    monkeypatch.setattr(record.pq, "write_table", write)
    assert invoke("run", "--resume", run).exit_code == 0
    rows, _, meta = load_run(run)
    assert meta["status"] == "complete" and len(rows) == 3


def test_a_file_size_limit_fails_the_run_in_one_line(tmp_path):
    # Writes past 16 kB fail (a row part is about 27 kB): a traceback, exit 1, meta "complete" before.
    proc = _cli_process(["run", "--routers", "switch", *SIZES, "--out", str(tmp_path)], fsize=16_000)
    _, err = proc.communicate(timeout=300)
    (line,) = error_lines(err)
    assert proc.returncode == 1 and "Traceback" not in err and "File too large" in line, err
    meta = _meta(the_run(tmp_path))
    assert meta["status"] == "failed" and "rows/" in meta["error"]


def test_sigterm_mid_configuration_leaves_an_interrupted_run(broken_plugin, tmp_path):
    # The second configuration hangs in the worker, so the signal lands mid-run, deterministically.
    args = ["run", "--plugin", str(broken_plugin), "--routers", "broken,broken[how=hang]", *SIZES]
    proc = _cli_process([*args, "--out", str(tmp_path)])
    deadline = time.time() + 240
    while time.time() < deadline and not list(tmp_path.glob("*/rows/*.parquet")):
        time.sleep(0.05)
    assert list(tmp_path.glob("*/rows/*.parquet")), "the first configuration never finished"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    rows, _, meta = load_run(the_run(tmp_path))
    assert meta["status"] == "interrupted" and rows["router"].tolist() == ["broken"]
