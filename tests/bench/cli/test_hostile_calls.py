"""Hostile calls, as a new user makes them: every bad input is one line on stderr naming the flag
or file, exit 2, no traceback and no run directory; a broken plugin's plan is one line naming the
router, the field and the value; nothing is silently replaced.

In-process through click's runner (fast). Runs that need a real file system, a worker process or a
signal are in tests/bench/harness/test_faults.py; tests/hostile_calls.py measures the whole list.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from moe_routing_bench.bench.cli import main
from moe_routing_bench.workloads.trace import META_KEY, write_trace

HUGE = "99999999999999999999"  # past int64
SIM = ["simulate", "-G", "8", "-E", "8", "-T", "64", "-D", "64"]
QUALITY = ["quality", "--steps", "2", "--experts", "4", "--width", "16", "--heads", "2", "--vocab", "256"]


def invoke(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def refused(res, *needles: str, code: int = 2) -> str:
    """The call was refused in one line naming ``needles``, with exit status ``code``."""
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == code, res.output
    assert len(lines) == 1 and lines[0].startswith("moe-bench: error:"), res.stderr
    assert all(n in lines[0] for n in needles), (needles, lines[0])
    assert "Traceback" not in res.output and isinstance(res.exception, SystemExit), res.exception
    return lines[0]


@pytest.fixture
def place(tmp_path) -> Path:
    """A folder of bad inputs: files where folders belong, sweep files that define no sweep, and
    traces whose metadata is damaged."""
    (tmp_path / "afile").write_text("x")
    for name, text in {
        "empty": "",
        "comments": "# nothing here\n",
        "sweep5": "sweep = 5\n",
        "defaults5": "defaults = 5\n",
        "sweep_empty": "sweep = []\n",
        "sweep_strings": 'sweep = ["a"]\n',
        "ffn_x": '[defaults]\nffn_ratio = "x"\n',
        "warmup_neg": "[defaults]\nwarmup = -1\n",
        "tokens_huge": f"[defaults]\ntokens = [{HUGE}]\n",
    }.items():
        (tmp_path / f"{name}.toml").write_text(text)
    n, e = 128, 8
    rng = np.random.default_rng(0)
    good = tmp_path / "good.parquet"
    meta = {"model": "m", "layers": [{"index": 0, "module": "gate", "num_experts": e}], "tokens": n, "seq_len": 64}
    write_trace(good, rng.integers(0, 99, n), np.repeat([0, 1], 64), np.tile(np.arange(64), 2), np.full(n, -1),
                [rng.standard_normal((n, e)).astype(np.float32)], meta)  # fmt: skip
    table = pq.read_table(good)
    for name, raw in {
        "not_json": b"{oops",
        "a_list": b"[1, 2]",
        "no_layers": json.dumps({"format": "moe-bench-trace", "version": 1}),
        "bad_experts": json.dumps(
            {"format": "moe-bench-trace", "version": 1, "layers": [{"num_experts": "x"}]}
        ).encode(),
    }.items():
        metadata = {META_KEY: raw if isinstance(raw, bytes) else raw.encode()}
        pq.write_table(table.replace_schema_metadata(metadata), tmp_path / f"{name}.parquet")
    pq.write_table(table.drop(["logits"]), tmp_path / "no_logits.parquet")
    return tmp_path


@pytest.mark.parametrize(
    ("how", "needles"),
    [
        ("capacity", ("capacity = -3", "integer >= 1")),  # route printed C=-3, drop_rate 1.0
        ("nan", ("weight_R = nan",)),  # gate_mass_kept n/a, recorded as ok
        ("negative", ("weight_R = -",)),
        ("token", ("token_R = ", "[0, T = 64)")),  # an IndexError traceback before
        ("expert", ("expert_R = ", "[0, E = 8)")),  # named no router before
        ("num_tokens", ("num_tokens = 69",)),
        ("top_k", ("top_k = nan",)),
        ("none", ("returned NoneType, not a Plan",)),  # an AttributeError traceback before
    ],
)
def test_route_refuses_a_broken_plan_naming_router_field_and_value(broken_plugin, how, needles):
    res = invoke("route", "--plugin", broken_plugin, "--router", f"broken[how={how}]", "-T", 64, "-E", 8, "-B", 1)
    refused(res, f"router 'broken[how={how}]'", *needles)


def test_simulate_refuses_a_broken_plan(broken_plugin, tmp_path):
    res = invoke(*SIM, "--plugin", broken_plugin, "--router", "broken[how=capacity]", "--out", tmp_path / "o")
    refused(res, "router 'broken[how=capacity]'", "capacity = -3")
    assert not any((tmp_path / "o").iterdir())  # no run directory: nothing was simulated


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        # integers past int64 (a C++ or overflow traceback before), and what cannot fit memory
        (["route", "--router", "topk", "-T", HUGE], ("'--tokens'", "64-bit")),
        (["route", "--router", "topk", "-E", HUGE], ("'--experts'",)),
        (["route", "--router", "topk", "--seed", HUGE], ("'--seed'",)),
        (["route", "--router", "topk", "-T", "1099511627776", "-B", "1"], ("--tokens 1099511627776", "bytes")),
        (["simulate", "-G", HUGE, "--no-save"], ("--devices", "between 1 and")),
        (["simulate", "-G", "8", "-T", "1099511627776", "--no-save"], ("--tokens 1099511627776", "bytes")),
        (["simulate", "-G", "10485760", "-E", "256", "--no-save"], ("--devices 10485760", "bytes")),
        (["run", "--tokens", HUGE, "--out", "{tmp}/o"], ("--tokens",)),
        (["run", "--repeats", HUGE, "--out", "{tmp}/o"], ("'--repeats'",)),
        (["run", "--config", "{tmp}/tokens_huge.toml", "--out", "{tmp}/o"], ("--tokens", HUGE)),
        (["ep", "--tokens", HUGE, "--out", "{tmp}/o"], ("'--tokens'",)),
        ([*QUALITY, "--vocab", "99999999999", "--out", "{tmp}/o"], ("--vocab 99999999999", "bytes")),
        ([*QUALITY, "--steps", HUGE, "--out", "{tmp}/o"], ("'--steps'",)),
        # a time limit that would fail everything, or that is no number (it named no flag)
        (["run", "--routers", "switch", "--timeout", "0", "--out", "{tmp}/o"], ("--timeout",)),
        (["run", "--routers", "switch", "--timeout", "-1", "--out", "{tmp}/o"], ("--timeout",)),
        (["run", "--routers", "switch", "--timeout", "nan", "--out", "{tmp}/o"], ("--timeout", "nan")),
        (["run", "--routers", "switch", "--timeout", "inf", "--out", "{tmp}/o"], ("--timeout",)),
        (["ep", "--timeout", "0", "--out", "{tmp}/o"], ("--timeout",)),
        # sweep files that define no sweep, or the wrong shapes (a TypeError traceback before)
        (["run", "--config", "{tmp}/empty.toml", "--out", "{tmp}/o"], ("empty.toml", "defines no sweep")),
        (["run", "--config", "{tmp}/comments.toml", "--out", "{tmp}/o"], ("comments.toml",)),
        (["run", "--config", "{tmp}/sweep_empty.toml", "--out", "{tmp}/o"], ("sweep_empty.toml", "sweep")),
        (["run", "--config", "{tmp}/sweep5.toml", "--out", "{tmp}/o"], ("sweep5.toml", "sweep must be", "5")),
        (["run", "--config", "{tmp}/sweep_strings.toml", "--out", "{tmp}/o"], ("sweep_strings.toml",)),
        (["run", "--config", "{tmp}/defaults5.toml", "--out", "{tmp}/o"], ("defaults5.toml", "defaults")),
        (["run", "--config", "{tmp}/ffn_x.toml", "--out", "{tmp}/o"], ("ffn_ratio", "'x'")),
        (["run", "--config", "{tmp}/warmup_neg.toml", "--out", "{tmp}/o"], ("warmup", "-1")),
        # where results cannot go (a NotADirectoryError / PermissionError traceback before)
        (["run", "--routers", "switch", "--out", "{tmp}/afile"], ("--out", "afile")),
        (["run", "--routers", "switch", "--out", "{tmp}/afile/sub"], ("--out", "afile/sub")),
        (["run", "--routers", "switch", "--out", "/proc/moe-bench-results"], ("--out", "/proc/moe-bench")),
        ([*SIM, "--out", "{tmp}/afile"], ("--out",)),
        (["ep", "--out", "{tmp}/afile"], ("--out",)),
        ([*QUALITY, "--out", "{tmp}/afile"], ("--out",)),
        (["capture", "--model", "{tmp}/nomodel", "--out", "{tmp}/missing/t.parquet"], ("--out", "missing")),
        # flags that conflict, or mean nothing together
        (["route", "--router", "topk", "--target-drop", "0.01", "--capacity-factor", "none"], ("--target-drop",)),
        (["route", "--router", "topk", "--target-drop", "0.01", "--capacity-factor", "1.0"], ("--capacity-factor",)),
        ([*SIM, "--no-save", "--out", "{tmp}/o"], ("--no-save", "--out")),
        (["run", "--routers", "switch", "--ray-address", "x", "--out", "{tmp}/o"], ("--ray-address",)),
        (["run", "--retry-errors", "--out", "{tmp}/o"], ("--retry-errors",)),
        # a value no router can take (K = 2 ran instead of K = 100 before)
        (["run", "--routers", "topk", "--top-k", "100", "--experts", "8", "--out", "{tmp}/o"], ("top_k = 100",)),
        ([*QUALITY, "--routers", "topk", "--top-k", "100", "--out", "{tmp}/o"], ("top_k", "100")),
        # traces whose metadata is damaged (a KeyError or JSON traceback before)
        (["route", "--router", "switch", "--workload", "trace[path={tmp}/not_json.parquet]"], ("not_json.parquet",)),
        (["route", "--router", "switch", "--workload", "trace[path={tmp}/a_list.parquet]"], ("a_list.parquet",)),
        (["route", "--router", "switch", "--workload", "trace[path={tmp}/no_layers.parquet]"], ("layers",)),
        (["route", "--router", "switch", "--workload", "trace[path={tmp}/bad_experts.parquet]"], ("num_experts",)),
        (["route", "--router", "switch", "--workload", "trace[path={tmp}/no_logits.parquet]"], ("logits",)),
        (["run", "--workloads", "trace[path={tmp}/no_layers.parquet]", "--out", "{tmp}/o"], ("layers",)),
        # click's own refusals are one line too
        (["rnu"], ("rnu",)),
        (["route", "--router", "switch", "--device", "tpu"], ("'--device'",)),
        (["route", "-T", "64"], ("--router is required",)),  # required: ran with no router before
    ],
)
def test_bad_input_is_one_line_naming_it_and_leaves_no_run(place, args, needles):
    res = invoke(*[a.replace("{tmp}", str(place)) for a in args], env={"MOE_BENCH_MEMORY_BUDGET": str(8 << 30)})
    refused(res, *(n.replace("{tmp}", str(place)) for n in needles))
    assert not (place / "o").exists() or not any((place / "o").iterdir())


def test_a_bad_memory_budget_is_refused_before_the_run_exists(tmp_path):
    res = invoke("run", "--routers", "switch", "--out", tmp_path, env={"MOE_BENCH_MEMORY_BUDGET": "lots"})
    refused(res, "MOE_BENCH_MEMORY_BUDGET", "'lots'")
    assert not any(tmp_path.iterdir())


def test_hash_needs_a_fit_slice_only_when_balanced(place):
    trace = f"trace[path={place / 'good.parquet'},fit_every=0]"
    res = invoke("route", "--router", "hash", "--workload", trace, "-T", 64, "-B", 2)
    assert res.exit_code == 0, res.output  # refused before: the check looked at the class
    refused(invoke("route", "--router", "hash[variant=balanced]", "--workload", trace, "-T", 64, "-B", 2), "fit")


def test_flags_a_router_ignores_are_said_once():
    res = invoke("route", "--router", "switch,dense", "-K", 2, "--capacity-factor", "1.0", "-T", 64, "-B", 2)
    assert res.exit_code == 0, res.output
    assert res.stderr.count("switch ignores top_k=2") == 1 and res.stderr.count("dense ignores capacity_factor") == 1


def test_simulate_columns_stay_apart_at_ten_million_devices():
    res = invoke("simulate", "-G", "8,10000000", "-E", 1, "-T", 16, "-D", 16, "--plans", 1, "--no-save")
    assert res.exit_code == 0, res.output
    rows = [ln.split() for ln in res.stdout.splitlines()[1:] if ln.strip()]
    assert [len(r) for r in rows] == [12, 12], res.stdout  # G ran into nodes before: 11 fields
    assert [(r[3], r[4]) for r in rows] == [("8", "1"), ("10000000", "1250000")]


def test_trace_paths_of_a_sweep_are_stored_absolute(place, tmp_path, monkeypatch):
    from moe_routing_bench.bench.harness.sweep import load_blocks

    monkeypatch.chdir(place)
    (block,) = load_blocks(None, {"workloads": ["trace[path=good.parquet]"]})
    entry = block["workloads"][0]
    assert entry["opts"]["path"] == str(place / "good.parquet") and entry["label"] == "trace[path=good.parquet]"


def test_unreadable_part_is_named_by_readers(tmp_path):
    from moe_routing_bench.bench.record import RunDir, load_run

    run = RunDir.create(tmp_path)
    run.write_meta({"run_id": run.run_id, "kind": "sweep", "status": "complete"})
    (run.rows_dir / "abc.parquet").write_bytes(b"PAR1 truncated")
    with pytest.raises(ValueError, match=r"rows/abc.parquet cannot be read .* --resume"):
        load_run(run.path)
    # (pyarrow said "Parquet magic bytes not found" without naming the file before)
