"""`moe-bench run`: Parquet schema read back with pandas, crash safety, resume, skips, refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

from moe_routing_bench.bench.metrics import METRICS
from moe_routing_bench.bench.record import load_run
from moe_routing_bench.bench.schema import ROW_SCHEMA

REPO = Path(__file__).resolve().parents[3]


def test_run_writes_parquet_that_pandas_reads_with_every_column(tmp_path, moe_bench, run_dir, small):
    res = moe_bench(
        "run",
        "--routers",
        "switch,topk",
        "--workloads",
        "uniform",
        "--capacity-factor",
        "1.0,2.0",
        "--backend",
        "torch,einsum",
        "--out",
        str(tmp_path),
        *small,
    )
    assert res.returncode == 0, res.stderr
    run = run_dir(tmp_path)
    rows, loads, meta = load_run(run)
    # The capacity factor applies to every router with a capacity, topk included: 2 x 2 x 2 backends.
    assert len(rows) == 8 and set(rows["status"]) == {"ok"}, rows[["router", "status", "error"]]
    assert set(rows.loc[rows.router == "topk", "capacity_factor"]) == {1.0, 2.0}
    assert list(rows.columns) == ROW_SCHEMA.names
    assert rows["config_id"].is_unique
    for col in ("tokens", "experts", "hidden", "repeats", "seed", "capacity"):
        assert pd.api.types.is_integer_dtype(rows[col]), col
    for col in ("tokens_per_s", "time_total_median", "peak_mem_bytes", "permute_gbps", *METRICS):
        assert pd.api.types.is_float_dtype(rows[col]), col
    assert (rows["tokens_per_s"] > 0).all() and (rows["time_total_p20"] <= rows["time_total_p80"]).all()
    assert (rows["time_dispatch_median"] > 0).all() and (rows["time_experts_median"] > 0).all()
    assert set(rows["backend_ran"]) == {"torch", "einsum"}
    # Every row carries the run's metadata and its full config.
    assert rows["git_commit"].str.len().min() > 0 and (rows["run_id"] == run.name).all()
    cfg = json.loads(rows["config_json"].iloc[0])
    assert cfg["tokens"] == 128 and cfg["workload"] == "uniform"
    # einsum's analytic buffer (one-hot mask) is larger than index dispatch's for the same config.
    sw = rows[(rows.router == "switch") & (rows.capacity_factor == 1.0)].set_index("backend")
    assert sw.loc["einsum", "dispatch_buffer_bytes"] > sw.loc["torch", "dispatch_buffer_bytes"]
    # Loads: requested and kept per expert per batch; kept never exceeds capacity.
    assert set(loads.columns) >= {"config_id", "batch", "expert", "requested", "kept"}
    assert len(loads) == 8 * 2 * 8
    merged = loads.merge(rows[["config_id", "capacity"]], on="config_id")
    capped = merged.dropna(subset=["capacity"])
    assert (capped["kept"] <= capped["capacity"]).all() and (loads["kept"] <= loads["requested"]).all()
    assert meta["status"] == "complete" and meta["configurations"] == 8 and meta["kind"] == "sweep"
    assert (run / "rows.parquet").is_file() and (run / "loads.parquet").is_file()
    assert "tokens_per_s" in res.stdout  # the summary table


def test_failures_become_error_rows_and_the_sweep_goes_on(tmp_path, moe_bench, run_dir, trouble_plugin):
    plugin = trouble_plugin
    config = tmp_path / "sweep.toml"
    config.write_text(
        textwrap.dedent("""
        [defaults]
        tokens = [128]
        hidden = [16]
        experts = [8]
        repeats = 2
        capacity_factor = [1.0]
        workloads = ["uniform"]
        [[sweep]]
        routers = [{ name = "trouble", opts = { trouble = "raise" }, label = "raises" },
                   { name = "trouble", opts = { trouble = "kill" }, label = "killed" },
                   "switch"]
        [[sweep]]
        routers = ["switch"]
        backends = ["einsum"]
        tokens = [100000]
    """)
    )
    out = tmp_path / "out"
    res = moe_bench(
        "run",
        "--config",
        str(config),
        "--plugin",
        str(plugin),
        "--out",
        str(out),
        env={**os.environ, "MOE_BENCH_MEMORY_BUDGET": str(64 << 20)},
    )
    assert res.returncode == 0, res.stderr
    rows, _, meta = load_run(run_dir(out))
    by = rows.set_index("router")
    assert by.loc["raises", "status"] == "error" and "planted failure" in by.loc["raises", "error"]
    assert by.loc["killed", "status"] == "error" and "signal 9" in by.loc["killed", "error"]
    ok = rows[(rows.router == "switch") & (rows.status == "ok")]
    assert len(ok) == 1 and ok["tokens_per_s"].iloc[0] > 0  # the worker was restarted after the kill
    skipped = rows[rows.status == "skipped"]
    assert len(skipped) == 1 and "einsum dispatch buffers" in skipped["error"].iloc[0]
    assert "needs about" in skipped["error"].iloc[0] and "bytes" in skipped["error"].iloc[0]
    assert any("trouble.py" in p for p in meta["plugins"])  # the run says which plugins it loaded


SLEEPY = """
[defaults]
routers = [{ name = "trouble", opts = { trouble = "sleep" } }]
workloads = ["uniform"]
capacity_factor = [0.5, 1.0, 1.5, 2.0, 3.0, 4.0]
"""


def _sleepy_args(tmp_path: Path, plugin: Path, small: list[str]) -> list[str]:
    # trouble=sleep makes each configuration slow enough to stop the run part-way.
    config = tmp_path / "sleepy.toml"
    config.write_text(SLEEPY)
    return ["run", "--config", str(config), "--plugin", str(plugin), "--out", str(tmp_path / "out"), *small]


def test_kill_part_way_then_resume_finishes_without_duplicates(tmp_path, moe_bench, trouble_plugin, small):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moe_routing_bench.bench.cli", *_sleepy_args(tmp_path, trouble_plugin, small)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 120
    rows_dir = None
    while time.time() < deadline:
        dirs = [p for p in out.iterdir() if p.is_dir()] if out.exists() else []
        if dirs and len(list((dirs[0] / "rows").glob("*.parquet"))) >= 2:
            rows_dir = dirs[0] / "rows"
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert rows_dir is not None, "the run never finished two configurations"
    before = {p.name: p.stat().st_mtime_ns for p in rows_dir.glob("*.parquet")}
    assert 2 <= len(before) < 6
    res = moe_bench("run", "--resume", str(rows_dir.parent))
    assert res.returncode == 0, res.stderr
    rows, _, meta = load_run(rows_dir.parent)
    assert len(rows) == 6 and rows["config_id"].is_unique and set(rows["status"]) == {"ok"}
    assert sorted(rows["capacity_factor"]) == [0.5, 1.0, 1.5, 2.0, 3.0, 4.0]
    for name, mtime in before.items():  # finished rows were not repeated
        assert (rows_dir / name).stat().st_mtime_ns == mtime
    assert meta["status"] == "complete"
    assert not list(rows_dir.glob(".*.tmp"))


BLOCKING = """
[defaults]
workloads = ["uniform"]

[[sweep]]
routers = [{ name = "trouble", opts = { trouble = "none" }, label = "fine" }]
capacity_factor = [0.5, 1.0]

[[sweep]]
routers = [{ name = "trouble", opts = { trouble = "block" }, label = "stuck" }]
capacity_factor = [1.0]
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_leaves_a_consistent_run(tmp_path, run_dir, trouble_plugin, small, sig):
    # The signal arrives while the run is known to be inside its third configuration (the router
    # wrote the marker and blocks): the two before it are finished rows, nothing else is.
    out, marker = tmp_path / "out", tmp_path / "reached"
    config = tmp_path / "blocking.toml"
    config.write_text(BLOCKING)
    args = ["run", "--config", str(config), "--plugin", str(trouble_plugin), "--out", str(out), *small]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moe_routing_bench.bench.cli", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TROUBLE_MARKER": str(marker)},
        # A shell's background job (a CI runner's, `make test &`) inherits SIGINT ignored, and
        # Python then installs no Ctrl-C handler: restore the default, as a terminal has it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.time() + 240
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert marker.exists(), proc.communicate(timeout=30)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # never leave a run blocked in its router behind
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err  # SIGTERM is handled as Ctrl-C
    rows, _, meta = load_run(run_dir(out))
    assert meta["status"] == "interrupted"
    assert sorted(rows["router"]) == ["fine", "fine"] and set(rows["status"]) == {"ok"}
    assert rows["config_id"].is_unique


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--routers", "nope"], "unknown router 'nope'; valid routers:"),
        (["--workloads", "nope"], "unknown workload 'nope'; valid workloads:"),
        (["--backend", "cuda-magic"], "--backend must be one of torch, einsum, triton, native (got 'cuda-magic')"),
        (["--dtype", "float8"], "--dtype must be one of float32, float16, bfloat16"),
        (["--config", "nope"], "--config must be one of"),
        (["--routers", "switch", "--top-k", "x"], "--top-k expects comma-separated integers"),
    ],
)
def test_bad_names_are_refused_before_any_work(tmp_path, args, needle, moe_bench):
    res = moe_bench("run", *args, "--out", str(tmp_path / "out"))
    assert res.returncode == 2 and needle in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_three_shards_merged_equal_the_whole_sweep(tmp_path, moe_bench, run_dir):
    sweep = [
        "--routers",
        "switch,topk",
        "--workloads",
        "uniform",
        "--capacity-factor",
        "1.0,2.0",
        "--experts",
        "4,8",
        "--tokens",
        "64",
        "--hidden",
        "8",
        "--repeats",
        "2",
    ]
    whole = moe_bench("run", *sweep, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    for i in range(3):
        res = moe_bench("run", *sweep, "--shard", f"{i}/3", "--out", str(tmp_path / "shards"))
        assert res.returncode == 0, res.stderr
    shards = sorted(p for p in (tmp_path / "shards").iterdir())
    sizes = [len(load_run(p)[0]) for p in shards]
    assert len(shards) == 3 and sum(sizes) == 8 and min(sizes) >= 1
    partial = moe_bench("merge", *map(str, shards[:2]), "--out", str(tmp_path / "partial"))
    assert partial.returncode == 0, partial.stderr
    _, _, partial_meta = load_run(run_dir(tmp_path / "partial"))
    assert partial_meta["status"] == "incomplete" and len(partial_meta["missing"]) == sizes[2]
    assert "missing" in partial.stderr
    res = moe_bench("merge", *map(str, shards), "--out", str(tmp_path / "merged"))
    assert res.returncode == 0, res.stderr
    merged_rows, merged_loads, meta = load_run(run_dir(tmp_path / "merged"))
    whole_rows, whole_loads, _ = load_run(run_dir(tmp_path / "whole"))
    key = "config_id"
    a = merged_rows.sort_values(key).reset_index(drop=True)
    b = whole_rows.sort_values(key).reset_index(drop=True)
    assert list(a[key]) == list(b[key]) and meta["configurations"] == 8 and meta["status"] == "complete"
    for m in METRICS:  # routing is deterministic: the metrics are exactly equal
        pd.testing.assert_series_equal(a[m], b[m], check_names=False)
    assert a["time_total_median"].notna().all() and (a["run_id"] == meta["run_id"]).all()
    cols = ["config_id", "batch", "expert"]
    la, lb = (
        merged_loads.sort_values(cols).reset_index(drop=True),
        whole_loads.sort_values(cols).reset_index(drop=True),
    )
    assert (la[["requested", "kept"]].to_numpy() == lb[["requested", "kept"]].to_numpy()).all()
    # The same shard twice is refused: each configuration once.
    dup = moe_bench("merge", str(shards[0]), str(shards[0]), "--out", str(tmp_path / "dup"))
    assert dup.returncode == 2 and "is in both" in dup.stderr
    bad = moe_bench("run", *sweep, "--shard", "3/3", "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "--shard must look like I/N" in bad.stderr


def test_routers_with_their_own_gate_run_in_the_sweep(tmp_path, moe_bench, run_dir, small):
    # nllb reads hidden states for its level-1 gate: the harness gives the batch the layer's input.
    config = tmp_path / "nllb.toml"
    config.write_text(
        '[defaults]\nrouters = [{ name = "hierarchical", opts = { form = "nllb" } }]\nworkloads = ["uniform"]\n'
    )
    res = moe_bench("run", "--config", str(config), "--out", str(tmp_path / "out"), *small)
    assert res.returncode == 0, res.stderr
    rows, _, _ = load_run(run_dir(tmp_path / "out"))
    assert list(rows["status"]) == ["ok"], rows["error"].tolist()
    assert rows["time_shared_median"].iloc[0] > 0  # the shared FFN ran for every token


def test_run_and_route_mean_the_same_capacity_factor(tmp_path, moe_bench, run_dir):
    # One meaning everywhere: --capacity-factor 1.0 gives topk a capacity in `run` as in `route`,
    # and on the same batches (no warm-up, the same seed) both drop exactly the same requests.
    config = tmp_path / "same.toml"
    config.write_text("[defaults]\nwarmup = 0\nrepeats = 3\n")
    sizes = ["--tokens", "256", "--experts", "8", "--hidden", "8"]
    res = moe_bench(
        "run",
        "--config",
        str(config),
        "--routers",
        "topk",
        "--capacity-factor",
        "1.0",
        *sizes,
        "--out",
        str(tmp_path / "out"),
    )
    assert res.returncode == 0, res.stderr
    rows, _, _ = load_run(run_dir(tmp_path / "out"))
    routed = moe_bench(
        "route", "--router", "topk", "-T", "256", "-E", "8", "-B", "3", "--capacity-factor", "1.0", "--format", "json"
    )
    assert routed.returncode == 0, routed.stderr
    out = json.loads(routed.stdout)
    assert len(rows) == 1 and rows["capacity"].iloc[0] == out["config"]["capacity"] == 64
    assert rows["drop_rate"].iloc[0] > 0
    assert rows["drop_rate"].iloc[0] == pytest.approx(out["drop_rate"]["mean"], abs=1e-12)
    assert rows["imbalance"].iloc[0] == pytest.approx(out["imbalance"]["mean"], abs=1e-12)
