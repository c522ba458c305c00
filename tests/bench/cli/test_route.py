"""`moe-bench list` and `moe-bench route`: output, JSON, target drop, and one-line errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from click.testing import CliRunner

from moe_routing_bench.bench.cli import main


def _run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_list_routers_shows_builtins_with_descriptions():
    res = _run("list", "routers")
    assert res.exit_code == 0
    lines = {line.split()[0]: line for line in res.output.splitlines() if line.strip()}
    assert "switch" in lines and "topk" in lines
    assert "Switch" in lines["switch"] and len(lines["topk"].split()) > 3


def test_route_table_prints_every_metric_with_se():
    res = _run("route", "--router", "switch", "-T", "512", "-E", "8", "-B", "5", "--capacity-factor", "1.0")
    assert res.exit_code == 0, res.output
    assert "C=64" in res.output
    for metric in (
        "drop_rate",
        "tokens_dropped_frac",
        "imbalance",
        "imbalance_kept",
        "maxvio",
        "load_cv",
        "load_entropy",
        "experts_unused",
        "gate_mass_kept",
        "aux_loss",
        "z_loss",
    ):
        assert metric in res.output


def test_route_json_is_keyed_by_metric_and_valid_json():
    res = _run(
        "route",
        "--router",
        "topk",
        "-T",
        "256",
        "-E",
        "16",
        "-K",
        "4",
        "-B",
        "4",
        "--capacity-factor",
        "1.0",
        "--format",
        "json",
        "--router-opt",
        "drop_policy=probs",
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert set(out["drop_rate"]) == {"mean", "se"}
    assert 0 <= out["drop_rate"]["mean"] < 1
    assert out["config"]["capacity"] == 64 and out["config"]["drop_policy"] == "probs"
    assert out["config"]["top_k"] == 4


def test_router_opt_goes_to_the_routers_that_have_the_field():
    res = _run(
        "route",
        "--router",
        "switch,topk",
        "-T",
        "256",
        "-E",
        "8",
        "-B",
        "2",
        "--format",
        "json",
        "--router-opt",
        "drop_policy=probs",
        "--router-opt",
        "switch.batch_prioritized=true",
        "--capacity-factor",
        "1.0",
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["topk"]["config"]["drop_policy"] == "probs"
    assert out["switch"]["config"]["batch_prioritized"] is True
    # Both routers have the field (switch's `probs` is batch-prioritized routing): both get it.
    assert out["switch"]["config"]["drop_policy"] == "probs"


def test_route_is_deterministic_for_a_seed():
    args = (
        "route",
        "--router",
        "switch",
        "-T",
        "300",
        "-E",
        "8",
        "-B",
        "3",
        "--seed",
        "7",
        "--format",
        "json",
    )
    a, b = json.loads(_run(*args).output), json.loads(_run(*args).output)
    assert a["drop_rate"] == b["drop_rate"] and a["imbalance"] == b["imbalance"]


def test_target_drop_finds_the_smallest_capacity():
    res = _run(
        "route",
        "--router",
        "switch",
        "-T",
        "1024",
        "-E",
        "16",
        "-B",
        "10",
        "--target-drop",
        "0.02",
        "--format",
        "json",
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    c = out["config"]["capacity"]
    assert out["drop_rate"]["mean"] <= 0.02
    # One slot fewer must miss the target: check it with an explicit capacity factor.
    cf_below = (c - 1) * 16 / 1024
    below = json.loads(
        _run(
            "route",
            "--router",
            "switch",
            "-T",
            "1024",
            "-E",
            "16",
            "-B",
            "10",
            "--capacity-factor",
            repr(cf_below),
            "--format",
            "json",
        ).output
    )
    assert below["config"]["capacity"] == c - 1
    assert below["drop_rate"]["mean"] > 0.02
    assert math.isclose(out["config"]["capacity_factor"], c * 16 / 1024)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--router", "nope"], "unknown router 'nope'; valid routers: "),
        (["--router", "topk", "-K", "9", "-E", "8"], "top_k must be between 1 and num_experts = 8"),
        (["--router", "topk", "-K", "0"], "top_k must be an integer >= 1"),
        (["--router", "topk", "-E", "0"], "--experts must be >= 1 (got 0)"),
        (["--router", "topk", "-T", "0"], "--tokens must be >= 1"),
        (["--router", "topk", "--capacity-factor", "0"], "--capacity-factor must be a number > 0"),
        (["--router", "topk", "--capacity-factor", "-1.5"], "--capacity-factor must be a number > 0"),
        (
            ["--router", "switch", "--router-opt", "colour=red"],
            "unknown router option 'colour'; valid options",
        ),
        (["--router", "switch", "--router-opt", "oops"], "--router-opt must look like key=value"),
        (["--router", "switch", "--router-opt", "topk.top_k=2"], "names router 'topk', not one of: switch"),
        (["--router", "switch,topk", "--router-opt", "topk.colour=1"], "unknown router option 'colour'"),
        (
            ["--router", "topk", "--router-opt", "drop_policy=x"],
            "drop_policy must be one of 'position', 'probs'",
        ),
        (["--router", "switch", "--target-drop", "1.5"], "--target-drop must be in [0, 1)"),
        (["--router", "topk", "--plugin", "missing.py"], "--plugin must name an existing .py file"),
    ],
)
def test_bad_input_is_one_line_exit_2_no_traceback(args, needle):
    proc = subprocess.run(
        [sys.executable, "-m", "moe_routing_bench.bench.cli", "route", "-B", "1", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_route_gives_hidden_states_to_routers_with_their_own_gate():
    # nllb's level-1 gate reads hidden_TD: route asks the workload for hidden states.
    res = _run(
        "route",
        "--router",
        "hierarchical",
        "--router-opt",
        "form=nllb",
        "-T",
        "256",
        "-E",
        "8",
        "-B",
        "2",
        "--capacity-factor",
        "1.0",
        "--format",
        "json",
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["config"]["form"] == "nllb"


def test_route_with_a_model_preset_routes_as_that_model():
    res = CliRunner().invoke(
        main, ["route", "--model", "deepseek-v3", "-T", "512", "-B", "2", "--format", "json"], catch_exceptions=False
    )
    assert res.exit_code == 0, res.output
    cfg = json.loads(res.stdout)["config"]
    assert (cfg["router"], cfg["num_experts"], cfg["top_k"]) == ("deepseek-v3", 256, 8)
    assert (cfg["form"], cfg["num_groups"], cfg["topk_group"], cfg["score_func"]) == ("groups", 8, 4, "sigmoid")
    assert cfg["norm_topk_prob"] is True
    # The table says what the label stands for.
    res = CliRunner().invoke(main, ["route", "--model", "deepseek-v3", "-T", "512", "-B", "1"], catch_exceptions=False)
    form = res.output.splitlines()[1]
    for part in ("router hierarchical:", "form=groups", "score_func=sigmoid", "num_groups=8", "topk_group=4"):
        assert part in form, form
    # Another router at the model's shape: E comes from the model; a different -E is refused.
    res = CliRunner().invoke(main, ["route", "--model", "mixtral-8x7b", "--router", "switch", "-T", "256", "-B", "1",
                                    "--format", "json"])  # fmt: skip
    assert res.exit_code == 0 and json.loads(res.stdout)["config"]["num_experts"] == 8
    res = CliRunner().invoke(main, ["route", "--model", "mixtral-8x7b", "-E", "64"])
    assert res.exit_code == 2 and "--experts 64 conflicts with --model mixtral-8x7b" in res.output


def test_list_models_shows_every_preset_with_its_shape():
    res = CliRunner().invoke(main, ["list", "models"], catch_exceptions=False)
    assert res.exit_code == 0
    for name in ("switch-base-128", "nllb-moe-54b", "mixtral-8x7b", "mixtral-8x22b", "dbrx", "olmoe-1b-7b",
                 "qwen3-30b-a3b", "qwen3-235b-a22b", "deepseek-v3", "gpt-oss-120b"):  # fmt: skip
        assert name in res.output
    line = next(ln for ln in res.output.splitlines() if ln.startswith("deepseek-v3"))
    assert "7168" in line and "2048" in line and "256" in line and "58/61" in line
    res = CliRunner().invoke(main, ["route", "--model", "nope"])
    assert res.exit_code == 2 and "unknown model 'nope'; valid models:" in res.output
