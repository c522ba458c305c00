"""`moe-bench list workloads` and `moe-bench route --workload/--workload-opt/--breakdown`."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from click.testing import CliRunner

from moe_routing_bench.bench.breakdown import frequency_table, position_quartile
from moe_routing_bench.bench.cli import main
from moe_routing_bench.routers.contract import Batch
from moe_routing_bench.workloads import corpus

ROUTE = ["route", "-T", "512", "-E", "16", "-B", "3"]


@pytest.fixture(autouse=True)
def _cache(monkeypatch, tmp_path_factory):
    monkeypatch.setenv(corpus.CACHE_ENV, str(tmp_path_factory.getbasetemp() / "cli-cache"))


def _run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_list_workloads_shows_each_with_its_options():
    res = _run("list", "workloads")
    assert res.exit_code == 0
    lines = res.output.splitlines()
    names = [line.split()[0] for line in lines if line and not line.startswith(" ")]
    assert {"uniform", "zipf", "hot", "drift", "correlated", "adversarial", "code", "text", "trace"} <= set(names)
    zipf = lines.index(next(line for line in lines if line.startswith("zipf")))
    assert "options:" in lines[zipf + 1] and "s=1.0" in lines[zipf + 1]


def test_route_default_workload_is_uniform_and_json_names_it():
    out = json.loads(_run(*ROUTE, "--router", "switch", "--format", "json").output)
    assert out["config"]["workload"] == "uniform" and out["config"]["workload_seed"] == 0
    assert out["config"]["workload_options"]["vocab_size"] == 50_000


def test_workload_and_its_options_change_the_loads():
    def imbalance(*extra):
        res = _run(*ROUTE, "--router", "switch", "--format", "json", *extra)
        assert res.exit_code == 0, res.output
        return json.loads(res.output)

    uniform = imbalance()
    zipf = imbalance("--workload", "zipf", "--workload-opt", "s=1.5")
    assert zipf["config"]["workload_options"]["s"] == 1.5
    assert zipf["imbalance"]["mean"] > 2 * uniform["imbalance"]["mean"]
    adv = imbalance("--workload", "adversarial", "--capacity-factor", "none")
    assert adv["imbalance"]["mean"] == 16.0


def test_code_workload_routes_less_evenly_than_uniform_for_top1():
    def imb(workload, *opts):
        args = [
            "route",
            "-T",
            "2048",
            "-E",
            "64",
            "-B",
            "3",
            "--router",
            "topk",
            "-K",
            "1",
            "--format",
            "json",
        ]
        res = _run(*args, "--workload", workload, *opts)
        assert res.exit_code == 0, res.output
        return json.loads(res.output)["imbalance"]["mean"]

    # the probe gate routes by token id; frequent ids pile onto their expert
    assert imb("code", "--workload-opt", "max_mb=0.3") > 1.8 * imb("uniform")


def test_breakdown_table_and_json():
    res = _run(*ROUTE, "--router", "switch,topk", "--capacity-factor", "1.0", "--breakdown", "--workload", "zipf")
    assert res.exit_code == 0, res.output
    assert "breakdown: drop_rate / tokens_dropped_frac" in res.output
    for bucket in ("frequent", "middle", "rare", "position q1", "position q4"):
        assert bucket in res.output

    res = _run(
        *ROUTE,
        "--router",
        "switch",
        "--capacity-factor",
        "1.0",
        "--breakdown",
        "--format",
        "json",
        "--workload",
        "zipf",
    )
    out = json.loads(res.output)
    split = out["breakdown"]
    assert set(split["token_frequency"]) == {"frequent", "middle", "rare"}
    assert set(split["position"]) == {"q1", "q2", "q3", "q4"}
    total = sum(b["tokens"] for b in split["position"].values())
    assert total == 512 * 3
    # pooled over buckets, the drops add up to the run's drop rate (switch: one request a token)
    dropped = sum(b["tokens_dropped_frac"] * b["tokens"] for b in split["position"].values())
    assert math.isclose(dropped / total, out["drop_rate"]["mean"], rel_tol=1e-9, abs_tol=1e-12)
    # token-order priority: late positions lose the slots, early ones keep them
    assert split["position"]["q4"]["drop_rate"] > split["position"]["q1"]["drop_rate"]


def test_breakdown_json_has_null_where_a_rate_is_undefined():
    res = _run(*ROUTE, "--router", "expert_choice,switch", "--breakdown", "--format", "json")
    assert res.exit_code == 0 and "NaN" not in res.output
    out = json.loads(res.output)
    assert out["expert_choice"]["breakdown"]["position"]["q1"]["drop_rate"] is None
    assert out["switch"]["breakdown"]["position"]["q1"]["drop_rate"] is not None


def test_breakdown_buckets_are_thirds_of_occurrences_and_quartiles_of_position():
    import torch

    tokens = torch.tensor([7] * 6 + [3] * 3 + [1, 2, 4], dtype=torch.int64)
    b = Batch(logits_TE=torch.zeros(12, 2), token_T=tokens, seq_T=torch.tensor([0] * 8 + [1] * 4))
    ids, bucket = frequency_table([b])
    assert dict(zip(ids.tolist(), bucket.tolist(), strict=True)) == {1: 2, 2: 2, 3: 1, 4: 2, 7: 0}
    assert position_quartile(b.seq_T, 12).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 0, 1, 2, 3]
    assert position_quartile(None, 4).tolist() == [0, 1, 2, 3]


def test_routers_that_fit_read_the_workloads_fit_slice(monkeypatch):
    from moe_routing_bench.workloads.synthetic import ZipfWorkload

    calls = []
    original = ZipfWorkload.fit_sample

    def spy(self, *a, **k):
        calls.append(a)
        return original(self, *a, **k)

    monkeypatch.setattr(ZipfWorkload, "fit_sample", spy)
    res = _run(*ROUTE, "--router", "hash", "--router-opt", "variant=balanced", "--workload", "zipf")
    assert res.exit_code == 0, res.output
    assert calls == [(512, 16, calls[0][2])]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--workload", "nope"], "unknown workload 'nope'; valid workloads: adversarial, code, correlated"),
        (
            ["--workload", "zipf", "--workload-opt", "colour=red"],
            "unknown option 'colour' for workload 'zipf'",
        ),
        (["--workload", "zipf", "--workload-opt", "s=-2"], "zipf: s must be a number >= 0 (got -2.0)"),
        (["--workload-opt", "oops"], "--workload-opt must look like key=value"),
        (["--workload", "trace"], "trace: path is required"),
    ],
)
def test_bad_workload_input_is_one_line_exit_2(args, needle):
    res = _run("route", "--router", "switch", "-B", "1", *args)
    assert res.exit_code == 2
    assert needle in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_bad_workload_in_a_fresh_process_has_no_traceback():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "moe_routing_bench.bench.cli",
            "route",
            "--router",
            "switch",
            "--workload",
            "zipf",
            "--workload-opt",
            "mode=x",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown option 'mode' for workload 'zipf'; valid options:" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_missing_text_package_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(corpus, "DEBIAN_REFERENCE_DIR", tmp_path)
    res = _run("route", "--router", "switch", "-B", "1", "--workload", "text", "--workload-opt", "lang=it")
    assert res.exit_code == 2
    assert res.stderr.strip() == (
        "moe-bench: error: text workload lang=it needs the Debian package debian-reference-it: "
        "apt-get install debian-reference-it"
    )
