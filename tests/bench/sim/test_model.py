"""The cluster simulator (bench/netsim.py, `moe-bench simulate`), placements and the sim figures."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from moe_routing_bench.bench.cli import main
from moe_routing_bench.bench.placement import contiguous, device_loads, greedy, make_placement, round_robin
from moe_routing_bench.bench.sim.model import (
    Hardware,
    Plans,
    a2a_device_times,
    destinations,
    preset,
    route_plans,
    simulate_step,
    tile,
    traffic_matrix,
    traffic_pairs,
)
from moe_routing_bench.bench.sim.runner import SIM_SCHEMA, load_sim
from moe_routing_bench.kernels.dispatch import make_dispatch

# Hand-written plans of 4 devices (T = 4 tokens each) over 8 experts, capacity C = 2.
# Contiguous placement: experts {0,1} -> device 0, {2,3} -> 1, {4,5} -> 2, {6,7} -> 3.
# Nodes of 2 devices: {0, 1} and {2, 3}.
HAND_PLANS = [
    # (token_R, expert_R): device 0 sends e0 to itself, e2 twice to device 1, e7 to device 3
    ([0, 1, 2, 3], [0, 2, 2, 7]),
    # device 1: e3 three times (C = 2 keeps two) stay home, e4 goes to device 2
    ([0, 1, 2, 3], [3, 3, 3, 4]),
    # device 2, top-2 tokens: e1 twice -> device 0, e6 -> device 3, e5 stays
    ([0, 0, 1, 1], [1, 6, 1, 5]),
    # device 3: every token asks e0; C = 2 keeps two, both to device 0
    ([0, 1, 2, 3], [0, 0, 0, 0]),
]
HAND_ROWS = [  # kept rows from device g (row) to device h (column)
    [1, 2, 0, 1],
    [0, 2, 1, 0],
    [2, 0, 1, 1],
    [2, 0, 0, 0],
]
ROW_BYTES = 4 * 4  # D = 4, fp32


def _hand_kept() -> torch.Tensor:
    kept = []
    for tokens, experts in HAND_PLANS:
        t, e = torch.tensor(tokens), torch.tensor(experts)
        d = make_dispatch(t, e, torch.ones(4), 4, 8, capacity=2)
        kept.append(d.counts_E)
    return torch.stack(kept)


HW = Hardware(intra_bw=1.0, intra_lat=1.0, inter_bw=0.5, inter_lat=2.0, flops=1.0, mem_bw=1.0, devices_per_node=2)


def test_traffic_matrix_equals_hand_computed():
    kept_GE = _hand_kept()
    want = torch.tensor(HAND_ROWS, dtype=torch.float64) * ROW_BYTES
    torch.testing.assert_close(traffic_matrix(kept_GE, contiguous(8, 4), 4, ROW_BYTES), want)
    src, dst, b = traffic_pairs(kept_GE, contiguous(8, 4), 4, ROW_BYTES)
    dense = torch.zeros(4, 4, dtype=torch.float64)
    dense[src, dst] = b
    torch.testing.assert_close(dense, want)


def test_alpha_beta_times_equal_hand_computed():
    src, dst, b = traffic_pairs(_hand_kept(), contiguous(8, 4), 4, ROW_BYTES)
    got = a2a_device_times(src, dst, b, 4, HW)
    us = 1e-6
    # device 0: receives 32 B from device 2 and 32 B from device 3, both inter-node, one NIC queue
    t0 = 2 * (2 * us + 32 / 0.5e9)
    # device 1: sends 16 B to device 2 (inter); its intra receive (32 B) is shorter
    t1 = 2 * us + 16 / 0.5e9
    # devices 2 and 3: each sends 32 B to device 0 over the NIC
    t2 = t3 = 2 * us + 32 / 0.5e9
    torch.testing.assert_close(got, torch.tensor([t0, t1, t2, t3], dtype=torch.float64))


def test_step_roofline_and_totals_on_hand_plans():
    plans = Plans(kept_BE=_hand_kept(), tokens=4, capacity=2, top_k=1.0, tokens_dropped_frac=0.0)
    hidden, ffn = 4, 8
    # flop-bound: 1e-9 TFLOP/s = 1000 FLOP/s; device 0 processes 5 rows (1 + 2 + 2)
    hw = Hardware(**{**HW.__dict__, "flops": 1e-9, "mem_bw": 1e3})
    out = simulate_step(plans, 4, "contiguous", hidden, ffn, "fp32", hw)
    assert out["max_device_load"] == 5 and out["mean_device_load"] == pytest.approx(13 / 4)
    assert out["compute_max_s"] == pytest.approx(6 * 5 * hidden * ffn / 1000)
    assert out["a2a_dispatch_s"] == pytest.approx(2 * (2e-6 + 32 / 0.5e9))
    assert out["a2a_combine_s"] == pytest.approx(out["a2a_dispatch_s"])  # the transpose, same model
    assert out["step_time_s"] == pytest.approx(out["a2a_dispatch_s"] + out["compute_max_s"] + out["a2a_combine_s"])
    # off-diagonal rows: 9 in all, 6 of them between nodes; both exchanges count
    assert out["bytes_total"] == 2 * 9 * ROW_BYTES and out["bytes_inter_node"] == 2 * 6 * ROW_BYTES
    assert out["nodes"] == 2 and out["ep_size"] == 4
    # memory-bound: device 0 reads both its experts' weights and its rows' activations
    hw = Hardware(**{**HW.__dict__, "flops": 1e3, "mem_bw": 1e-9})
    out = simulate_step(plans, 4, "contiguous", hidden, ffn, "fp32", hw)
    mem0 = 3 * hidden * ffn * 4 * 2 + 5 * (3 * hidden + 6 * ffn) * 4
    assert out["compute_max_s"] == pytest.approx(mem0 / 1000)


def test_tiling_and_groups():
    kept_BE = torch.arange(6).view(3, 2)
    assert tile(kept_BE, 7)[:, 0].tolist() == [0, 2, 4, 0, 2, 4, 0]  # device g uses plan g mod B
    # G = 8 devices, E = 4 experts: two groups of 4, tokens stay inside their group
    dest = destinations(round_robin(4, 4), 8, 4)
    assert dest[1].tolist() == [0, 1, 2, 3] and dest[5].tolist() == [4, 5, 6, 7]


def test_sparse_pairs_equal_dense_matrix():
    gen = torch.Generator().manual_seed(0)
    kept = torch.randint(0, 5, (64, 32), generator=gen)
    owner = greedy(torch.rand(32, generator=gen), 16)  # 4 groups of 16 devices, 2 experts each
    src, dst, b = traffic_pairs(kept, owner, 16, 10)
    dense = torch.zeros(64, 64, dtype=torch.float64)
    dense[src, dst] = b
    torch.testing.assert_close(dense, traffic_matrix(kept, owner, 16, 10))
    assert (dst // 16 == src // 16).all()  # no traffic between groups


# --------------------------------------------------------------------------------------------
# Placements
# --------------------------------------------------------------------------------------------


def test_builtin_placements():
    assert contiguous(8, 4).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert round_robin(8, 4).tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert contiguous(5, 2).tolist() == [0, 0, 0, 1, 1]  # E % G != 0: counts differ by one


def test_greedy_balances_a_skewed_load_better_than_contiguous():
    load = torch.tensor([100.0, 50, 30, 20, 10, 5, 3, 2])
    cont = device_loads(contiguous(8, 4), load, 4)
    owner = greedy(load, 4)
    gl = device_loads(owner, load, 4)
    assert cont.max() == 150 and gl.max() == 102  # LPT: the hot expert alone sets the floor
    assert torch.bincount(owner, minlength=4).tolist() == [2, 2, 2, 2]  # memory stays balanced
    # the same through the simulator: a zipf-like skew over 16 experts on 4 devices
    kept = (1000 / torch.arange(1, 17).double() ** 1.2).round().long().repeat(8, 1)
    plans = Plans(kept, tokens=int(kept[0].sum()), capacity=None, top_k=1.0, tokens_dropped_frac=0.0)
    hw = preset("h100")
    a = simulate_step(plans, 4, "contiguous", 1024, 2048, "bf16", hw)
    g = simulate_step(plans, 4, "greedy", 1024, 2048, "bf16", hw)
    assert g["load_ratio"] < a["load_ratio"] and g["straggler"] < a["straggler"]
    assert g["step_time_s"] < a["step_time_s"]


def test_make_placement_refuses_bad_specs(tmp_path):
    from moe_routing_bench.routers.contract import RoutingError

    with pytest.raises(RoutingError, match="--placement must be one of"):
        make_placement("diagonal", 8, 4)
    with pytest.raises(RoutingError, match="E >= devices"):
        make_placement("contiguous", 2, 4)
    with pytest.raises(RoutingError, match="greedy needs"):
        make_placement("greedy", 8, 4)
    f = tmp_path / "p.json"
    f.write_text(json.dumps([0, 1, 1]))
    with pytest.raises(RoutingError, match="without a device"):
        make_placement(str(f), 4, 2)


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def _cli(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_simulate_4096_devices():
    res = _cli("simulate", "--devices", "64,4096", "--experts", "256", "--tokens", "512", "--plans", "8",
               "--router", "topk", "--no-save", "--format", "json")  # fmt: skip
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)["rows"]
    assert [r["devices"] for r in rows] == [64, 4096]
    big = rows[1]
    assert big["ep_size"] == 256 and big["nodes"] == 512
    assert big["step_time_s"] > 0 and big["straggler"] >= 1.0 and big["bytes_inter_node"] > 0


def test_simulate_writes_sim_table_and_figures(tmp_path):
    res = _cli("simulate", "--devices", "4,8,16", "--experts", "16", "--tokens", "256", "--plans", "4",
               "--router", "switch,topk", "--placement", "contiguous,greedy", "--hidden", "256",
               "--out", str(tmp_path))  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "switch" in res.stdout and "greedy" in res.stdout
    (run_dir,) = list(tmp_path.iterdir())
    df = load_sim(run_dir)
    assert list(df.columns) == SIM_SCHEMA.names and len(df) == 2 * 3 * 2
    assert df["step_time_s"].gt(0).all() and df["straggler"].ge(1.0).all()
    assert json.loads((run_dir / "meta.json").read_text())["kind"] == "simulate"
    # `moe-bench report` draws a simulate run like any other kind.
    rep = _cli("report", str(run_dir), "--out", str(tmp_path / "report"))
    assert rep.exit_code == 0, rep.output
    paths = sorted((tmp_path / "report").glob("*.png"))
    assert [p.name for p in paths] == ["sim_step_time.png", "sim_straggler.png"]
    assert all(p.stat().st_size > 1000 for p in paths)
    html = (tmp_path / "report" / "report.html").read_text()
    assert "Simulated expert-parallel step" in html and "straggler" in html


def test_simulate_takes_workload_options():
    # --workload-opt reaches the workload (it was dropped before): a steeper zipf is less balanced.
    common = ["simulate", "--devices", "8", "--experts", "16", "--tokens", "1024", "--plans", "2", "--no-save"]
    loads = {}
    for s in ("0.5", "2.0"):
        res = _cli(*common, "--workload", "zipf", "--workload-opt", f"s={s}", "--format", "json")
        assert res.exit_code == 0, res.output
        loads[s] = json.loads(res.stdout)["rows"][0]["load_ratio"]
    same = _cli(*common, "--workload", "zipf[s=2.0]", "--format", "json")
    assert json.loads(same.stdout)["rows"][0]["load_ratio"] == loads["2.0"] > loads["0.5"]


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--devices", "0"], "--devices"),  # no devices
        (["--devices", "12", "--experts", "8"], "devices % experts"),  # G > E, not a multiple of E
        (["--devices", "8", "--placement", "diagonal"], "--placement"),  # unknown placement
        (["--devices", "8", "--experts", "8", "--ep-size", "3"], "--ep-size"),  # does not divide G
        (["--devices", "8", "--dtype", "int8"], "--dtype"),
        (["--devices", "8", "--nodes-of", "0"], "--nodes-of"),
        (["--devices", "8", "--inter-bw", "0"], "--inter-bw"),
        (["--devices", "8", "--router", "nope"], "unknown router"),
    ],
)
def test_simulate_bad_input_is_one_line_exit_2(args, needle, tmp_path):
    res = _cli("simulate", "--out", str(tmp_path), *args)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("moe-bench: error:") and needle in lines[0], res.output


def test_route_plans_updates_a_stateful_router_after_every_plan(update_calls):
    plans = route_plans("topk", {"bias_update_rate": 0.05}, "hot", {}, 256, 8, 12, 0)
    assert len({rid for rid, _ in update_calls}) == 1 and len(update_calls) == 12
    without = route_plans("topk", {}, "hot", {}, 256, 8, 12, 0)
    # The same batches: the first plan is the same, the last one balanced by the bias.
    assert torch.equal(plans.kept_BE[0], without.kept_BE[0])
    assert int(plans.kept_BE[-1].max()) < int(without.kept_BE[-1].max())


def test_simulate_on_a_full_disk_is_a_failed_run_in_one_line(tmp_path, monkeypatch):
    import errno

    import moe_routing_bench.bench.record as record

    def full(table, where, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(record.pq, "write_table", full)
    res = CliRunner().invoke(main, ["simulate", "-G", "8", "-E", "8", "-T", "64", "-D", "64", "--out", str(tmp_path)])
    assert res.exit_code == 1 and "Traceback" not in res.output  # a traceback before
    (line,) = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert "failed: cannot write" in line and "sim.parquet: No space left on device" in line
    (run_dir,) = list(tmp_path.iterdir())
    assert json.loads((run_dir / "meta.json").read_text())["status"] == "failed"
