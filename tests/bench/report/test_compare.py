"""`moe-bench compare A B`: matched configurations, noise from the repeats, direction, exit status.

Runs are one tiny real run and edited copies of it, so every planted change is known exactly.
"""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
from click.testing import CliRunner

from moe_routing_bench.bench.cli import main
from moe_routing_bench.bench.record import load_run
from moe_routing_bench.bench.report.compare import compare_runs, judge


@pytest.fixture(scope="module")
def run(tiny_run):
    return tiny_run


@pytest.fixture(scope="module")
def n_ok(run) -> int:
    return int((load_run(run)[0]["status"] == "ok").sum())


def _compare(*args: str):
    return CliRunner().invoke(main, ["compare", *map(str, args)], catch_exceptions=False)


def _tight(rows: pd.DataFrame) -> pd.DataFrame:
    """Repeats that agree exactly: p20 = p80 = median for every stage."""
    for col in [c for c in rows.columns if c.startswith("time_") and c.endswith("_median")]:
        stem = col[: -len("median")]
        rows[stem + "p20"] = rows[col]
        rows[stem + "p80"] = rows[col]
    return rows


def _wide(rows: pd.DataFrame) -> pd.DataFrame:
    """Repeats that scatter: p20 half the median, p80 twice it."""
    rows["time_total_p20"] = rows["time_total_median"] * 0.5
    rows["time_total_p80"] = rows["time_total_median"] * 2.0
    return rows


def test_identical_runs_pass(run):
    res = _compare(run, run)
    assert res.exit_code == 0, res.output
    assert "matched 20 configurations (20 by config_id" in res.output
    assert "OK: 0 regressions" in res.output


def test_planted_throughput_regression_fails(run, n_ok, tmp_path, clone):
    a = clone(run, tmp_path / "a", _tight)
    b = clone(run, tmp_path / "b", lambda r: _tight(r).assign(tokens_per_s=r["tokens_per_s"] * 0.5))
    res = _compare(a, b)
    assert res.exit_code == 1, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("regressed")]
    assert len(lines) == n_ok and all("tokens_per_s" in ln and "-50%" in ln for ln in lines)
    assert f"FAIL: {n_ok} regressions" in res.output

    js = _compare(a, b, "--format", "json")
    assert js.exit_code == 1
    out = json.loads(js.output)
    reg = [c for c in out["changes"] if c["verdict"] == "regressed"]
    assert {c["metric"] for c in reg} == {"tokens_per_s"}
    assert all(math.isclose(c["change_pct"], -50.0) and c["direction"] == "higher" for c in reg)
    assert out["regressions"] == n_ok and out["failed"] is True

    # The same change read the other way is an improvement, and an improvement never fails.
    back = _compare(b, a)
    assert back.exit_code == 0 and "improved" in back.output


def test_change_inside_the_repeats_spread_is_noise(run, tmp_path, clone):
    a = clone(run, tmp_path / "a", _wide)
    b = clone(run, tmp_path / "b", lambda r: _wide(r).assign(tokens_per_s=r["tokens_per_s"] * 0.98))
    res = _compare(a, b, "--format", "json", "--all")
    assert res.exit_code == 0, res.output
    tps = [c for c in json.loads(res.output)["changes"] if c["metric"] == "tokens_per_s"]
    assert tps and {c["verdict"] for c in tps} == {"noise"}
    # Beyond the threshold but inside the spread is still noise, not a regression.
    c = clone(run, tmp_path / "c", lambda r: _wide(r).assign(tokens_per_s=r["tokens_per_s"] * 0.7))
    assert _compare(a, c).exit_code == 0


def test_routing_metrics_use_twice_the_combined_standard_error(run, tmp_path, clone):
    def shifted(factor: float, se: float):
        return lambda r: r.assign(imbalance=r["imbalance"] * factor, imbalance_se=se)

    a = clone(run, tmp_path / "a", shifted(1.0, 0.01))
    worse = clone(run, tmp_path / "worse", shifted(1.3, 0.01))
    res = _compare(a, worse, "--format", "json")
    assert res.exit_code == 1
    reg = [c for c in json.loads(res.output)["changes"] if c["verdict"] == "regressed"]
    assert {c["metric"] for c in reg} == {"imbalance"}
    assert all(math.isclose(c["spread"], 2 * math.hypot(0.01, 0.01)) for c in reg)

    noisy = clone(run, tmp_path / "noisy", shifted(1.3, 1.0))  # huge SE: the change is noise
    assert _compare(a, noisy).exit_code == 0
    assert _compare(a, worse, "--threshold", "40").exit_code == 0  # 30% is under a 40% threshold


def test_configurations_match_by_labels_when_ids_differ(run, tmp_path, clone):
    b = clone(run, tmp_path / "b", lambda r: r.assign(config_id=[f"{i:016x}" for i in range(len(r))]))
    res = _compare(run, b)
    assert res.exit_code == 0, res.output
    assert "matched 20 configurations (0 by config_id, 20 by labels)" in res.output


def test_a_configuration_that_stops_working_fails(run, tmp_path, clone):
    def broken(r):
        first_ok = r.index[r["status"] == "ok"][0]
        r.loc[first_ok, "status"] = "error"
        r.loc[first_ok, "error"] = "RuntimeError: planted"
        return r

    b = clone(run, tmp_path / "b", broken)
    res = _compare(run, b)
    assert res.exit_code == 1
    assert "status ok -> error" in res.output and "planted" in res.output


def test_bad_paths_fail_in_one_line(run, tmp_path):
    for args in ((tmp_path / "missing", run), (run, tmp_path)):
        res = _compare(*args)
        assert res.exit_code == 2
        assert res.output.strip().count("\n") == 0 and res.output.startswith("moe-bench: error:")
    assert _compare(run, run, "--threshold", "-5").exit_code == 2


def test_judge_directions():
    assert judge("tokens_per_s", 100.0, 80.0, 0.0, 10.0)[2] == "regressed"
    assert judge("time_total_median", 1.0, 1.2, 0.0, 10.0)[2] == "regressed"
    assert judge("gate_mass_kept", 0.9, 0.99, 0.0, 5.0)[2] == "improved"
    assert judge("drop_rate", 0.0, 0.1, 0.0, 10.0)[:2] == (math.inf, "lower")
    assert judge("drop_rate", math.nan, 0.1, 0.0, 10.0)[2] == "n/a"
    assert judge("tokens_per_s", 100.0, 95.0, 0.0, 10.0)[2] == "within"
    assert judge("tokens_per_s", 100.0, 50.0, 60.0, 10.0)[2] == "noise"


def test_compare_runs_api_counts(run):
    c = compare_runs(run, run)
    assert c.matched_by_id == 20 and not c.failed
    assert {ch.verdict for ch in c.changes} == {"same"}
    metrics = {ch.metric for ch in c.changes}
    assert {"tokens_per_s", "time_total_median", "peak_mem_bytes", "imbalance", "load_cv"} <= metrics
    assert "time_backward_median" in metrics
    assert "time_shared_median" not in metrics  # a stage neither run has (no shared expert)
