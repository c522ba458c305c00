"""Expert parallelism (bench/ep.py, bench/ep_worker.py, `moe-bench ep`).

The exchange's pure phases are checked in one process against a loopback all-to-all (any W, uneven
placements); one real 2-rank gloo launch under torchrun checks the whole path: its combined output
equals a single-process ``bench.layer.layer_forward`` over the same plans, to float32 tolerance.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from moe_routing_bench.bench.cli import main
from moe_routing_bench.bench.ep.exchange import (
    EPPoint,
    Sharding,
    finish,
    incoming,
    local_ffn,
    outgoing,
    rank_hidden,
    run_local_experts,
    segment_order,
    send_rows,
)
from moe_routing_bench.bench.ep.record import load_ep_ranks
from moe_routing_bench.bench.moe_layer import layer_forward, plan_dispatch
from moe_routing_bench.bench.record import load_run
from moe_routing_bench.bench.routing import wants_fit
from moe_routing_bench.kernels.experts import ExpertFFN
from moe_routing_bench.routers.registry import build_router, router_names
from moe_routing_bench.workloads.registry import build_workload

CPU = torch.device("cpu")
ATOL, RTOL = 1e-5, 1e-5  # float32: the expert matmuls see different row batches than one process


def _cli(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


# --------------------------------------------------------------------------------------------
# Pure phases
# --------------------------------------------------------------------------------------------


def test_segment_order_concatenates_segments():
    starts = torch.tensor([5, 0, 9, 2])
    counts = torch.tensor([2, 1, 0, 3])
    assert segment_order(starts, counts).tolist() == [5, 6, 0, 2, 3, 4]
    # all segments empty: an empty index, not an error
    assert segment_order(starts, torch.zeros(4, dtype=torch.int64)).tolist() == []


def test_sharding_orders_experts_by_owner():
    sh = Sharding(torch.tensor([1, 0, 1, 2, 0]), world=4)  # rank 3 holds nothing
    assert sh.order_P.tolist() == [1, 4, 0, 2, 3]
    assert sh.experts_W == [2, 2, 1, 0]
    assert sh.local_experts(1).tolist() == [0, 2]
    assert sh.local_experts(3).tolist() == []
    with pytest.raises(ValueError, match="owner_E"):
        Sharding(torch.tensor([0, 4]), world=4)


def _loopback(plans, xs, sh: Sharding, full: ExpertFFN) -> list[torch.Tensor]:
    """One EP step for every rank, with all_to_all_single's semantics done by hand."""
    w = sh.world
    ds = [plan_dispatch(p) for p in plans]
    outs = [outgoing(d, sh) for d in ds]
    sends = [send_rows(x, d, o) for x, d, o in zip(xs, ds, outs, strict=True)]
    bounds = np.cumsum([0, *sh.experts_W]).tolist()
    incs, y_recv = [], []
    for s in range(w):
        counts = torch.stack([outs[r].counts_P[bounds[s] : bounds[s + 1]] for r in range(w)])
        inc = incoming(counts)
        x_recv = torch.cat([torch.split(sends[r], outs[r].rows_W)[s] for r in range(w)])
        assert x_recv.shape[0] == sum(inc.rows_W)
        incs.append(inc)
        y_recv.append(run_local_experts(x_recv, inc, local_ffn(full, sh.local_experts(s), torch.device("cpu"))))
    results = []
    for r in range(w):
        y_back = torch.cat([torch.split(y_recv[s], incs[s].rows_W)[r] for s in range(w)])
        results.append(finish(y_back, ds[r], outs[r]))
    return results


# Each case: (router, options, owner_E, why)
LOOPBACK_CASES = [
    ("switch", {"capacity_factor": 1.0}, [0, 0, 1, 1, 2, 2], "contiguous, capacity drops"),
    ("topk", {"top_k": 2}, [0, 1, 2, 0, 1, 2], "round-robin, dropless top-2"),
    ("topk", {"top_k": 3, "capacity_factor": 0.5}, [2, 2, 2, 2, 1, 0], "uneven file-like map, heavy drops"),
    ("switch", {}, [1, 1, 1, 1, 1, 1], "ranks 0 and 2 hold no expert"),
]


@pytest.mark.parametrize("router,opts,owner,why", LOOPBACK_CASES, ids=[c[3] for c in LOOPBACK_CASES])
def test_phases_equal_single_process_layer(router, opts, owner, why):
    e, t, dim = 6, 24, 8
    full = ExpertFFN(e, dim, seed=3)
    sh = Sharding(torch.tensor(owner), world=3)
    gen = torch.Generator().manual_seed(1)
    r = build_router(router, num_experts=e, seed=0, **opts)
    from moe_routing_bench.routers.contract import Batch

    batches = [Batch(torch.randn(t, e, generator=gen), torch.arange(t)) for _ in range(3)]
    xs = [torch.randn(t, dim, generator=gen) for _ in range(3)]
    plans = [r.route(b) for b in batches]
    got = _loopback(plans, xs, sh, full)
    for plan, x, out in zip(plans, xs, got, strict=True):
        want = layer_forward(plan, x, full)
        torch.testing.assert_close(out, want, atol=ATOL, rtol=RTOL)


# --------------------------------------------------------------------------------------------
# A real 2-rank gloo launch
# --------------------------------------------------------------------------------------------

# topk with a large bias step: a stateful router whose ranks must learn from the whole step's load.
EP_ROUTERS = [n for n in ("switch", "topk", "expert_choice", "hierarchical") if n in router_names()] + [
    "topk[bias_update_rate=0.2]"
]


def _reference(ep: EPPoint, rank: int, whole_step: bool = True) -> torch.Tensor:
    """[steps, T, D]: rank ``rank``'s batches through one process's layer with the full experts.

    A stateful router updates from the whole step's requests (every rank's batch, routed with the
    same state), as the worker's ranks do; ``whole_step=False`` updates from the rank's own plan."""
    p = ep.point
    n, w = p.warmup + p.repeats, ep.nproc
    router = build_router(p.router, **p.router_options())
    wl = build_workload(p.workload, p.workload_opts, p.seed)
    # the rank's shard of one stream: step i of rank r is batch i * W + r
    stream = list(wl.batches(p.tokens, p.experts, n * w, "cpu"))
    batches = stream[rank::w]
    if wants_fit(router):
        router.fit(wl.fit_sample(p.tokens, p.experts, "cpu"))
    ffn = ExpertFFN(p.experts, p.hidden, ffn_ratio=p.ffn_ratio, seed=p.seed)
    shared = ExpertFFN(1, p.hidden, ffn_ratio=p.ffn_ratio, seed=p.seed + 1)
    outs = []
    with torch.inference_mode():
        for i, (batch, x) in enumerate(zip(batches, rank_hidden(p, rank, n, torch.float32, CPU), strict=True)):
            if batch.hidden_TD is None:  # as the worker does: routers with their own gate read x
                batch.hidden_TD = x
            plan = router.route(batch)
            outs.append(layer_forward(plan, x, ffn, shared_ffn=shared))
            if router.stateful and whole_step:
                step = [router.route(b) for b in stream[i * w : (i + 1) * w]]
                expert_R = torch.cat([q.expert_R for q in step])
                zeros = torch.zeros_like(expert_R)
                plan = dataclasses.replace(plan, token_R=zeros, expert_R=expert_R, weight_R=zeros.float())
            router.update(plan)
    return torch.stack(outs)


@pytest.fixture(scope="module")
def ep_run(tmp_path_factory):
    """One torchrun launch (2 ranks, gloo) covering every router under test: ~10 s on 2 cores."""
    tmp = tmp_path_factory.mktemp("ep")
    res = _cli(
        "ep", "--nproc", "2", "--router", ",".join(EP_ROUTERS), "--tokens", "32", "--experts", "4",
        "--hidden", "8", "--repeats", "2", "--warmup", "1", "--placement", "round-robin",
        "--router-opt", "hierarchical.form=nllb", "--dist-backend", "gloo", "--format", "json",
        "--out", str(tmp / "results"), "--dump-outputs", str(tmp / "dump"), "--timeout", "240",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    return Path(out["run_dir"]), out, tmp / "dump"


def test_ep_two_ranks_equal_single_process(ep_run):
    run_dir, _, dump = ep_run
    spec = json.loads((run_dir / "ep_configs.json").read_text())
    configs = [EPPoint.from_dict(c) for c in spec["configs"]]
    assert sorted(c.point.router_label for c in configs) == sorted(EP_ROUTERS)
    for ep in configs:
        assert ep.owner_E == (0, 1, 0, 1)  # round-robin over 2 ranks
        same_as_local = []
        for rank in range(2):
            got = torch.from_numpy(np.load(dump / f"{ep.config_id}_rank{rank}.npy", allow_pickle=False))
            want = _reference(ep, rank)
            assert got.shape == want.shape == (3, 32, 8)
            torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL, msg=f"{ep.point.router_label} rank {rank}")
            same_as_local.append(torch.allclose(got, _reference(ep, rank, whole_step=False), atol=ATOL, rtol=RTOL))
        if build_router(ep.point.router, **ep.point.router_options()).stateful:
            # The check has teeth: ranks that learned from their own load alone would differ.
            assert not all(same_as_local)


def test_ep_run_directory_tables(ep_run):
    run_dir, out, _ = ep_run
    rows, loads, meta = load_run(run_dir)
    assert meta["kind"] == "ep" and meta["status"] == "complete" and meta["ep"]["nproc"] == 2
    assert len(rows) == len(EP_ROUTERS) and set(rows["status"]) == {"ok"}
    assert rows["time_total_median"].gt(0).all() and rows["tokens_per_s"].gt(0).all()
    assert json.loads(rows["config_json"].iloc[0])["nproc"] == 2
    ranks = load_ep_ranks(run_dir)
    assert len(ranks) == 2 * len(EP_ROUTERS)
    for cid, g in ranks.groupby("config_id"):
        g = g.sort_values("rank")
        # with two ranks, what one sends to the other is what the other receives
        assert g["rows_sent"].tolist() == g["rows_received"].tolist()[::-1]
        assert (g["rows_processed"] == g["rows_local"] + g["rows_received"]).all()
        assert (g["rows_sent"] + g["rows_local"] == g["rows_kept"]).all()
        # float32 rows of D = 8, both exchanges, plus the int64 counts of the peer's experts
        assert (g["bytes_sent"] == (g["rows_sent"] + g["rows_received"]) * 8 * 4 + 8 * 2).all()
        assert g["straggler"].nunique() == 1 and g["straggler"].iloc[0] >= 1.0
        assert g["a2a_time_median"].gt(0).all() and g["expert_time_median"].ge(0).all()
        # the loads table holds the per-step load over both ranks; its kept sum equals the kept rows
        kept = loads[loads["config_id"] == cid].groupby("batch")["kept"].sum().mean()
        assert kept == pytest.approx(g["rows_kept"].sum())
    assert {c["router"] for c in out["configs"]} == set(EP_ROUTERS)
    assert all(len(c["ranks"]) == 2 and c["straggler"] >= 1.0 for c in out["configs"])


def test_ep_launch_failure_becomes_error_rows(tmp_path, monkeypatch):
    import moe_routing_bench.bench.ep.launch as ep_launch

    monkeypatch.setattr(ep_launch, "launch", lambda run, nproc, timeout: (1, "RuntimeError: boom"))
    res = _cli("ep", "--nproc", "2", "--tokens", "8", "--experts", "2", "--hidden", "4", "--out", str(tmp_path))
    assert res.exit_code == 1
    run_dir = next(tmp_path.iterdir())
    rows, _, meta = load_run(run_dir)
    assert meta["status"] == "failed" and rows["status"].tolist() == ["error"]
    assert "status 1" in meta["error"]
    assert "boom" in rows["error"].iloc[0] and math.isnan(rows["time_total_median"].iloc[0])


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--nproc", "0"], "--nproc"),  # no ranks
        (["--nproc", "3", "--experts", "2"], "E >= devices"),  # fewer experts than ranks
        (["--placement", "diagonal"], "--placement"),  # unknown placement
        (["--placement", "greedy"], "--placement"),  # greedy needs loads the ep command does not have
        (["--router", "nope"], "unknown router"),
        (["--workload", "nope"], "unknown workload"),
        (["--tokens", "0"], "--tokens"),
    ],
)
def test_ep_bad_input_is_one_line_exit_2(args, needle, tmp_path):
    res = _cli("ep", "--out", str(tmp_path), *args)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("moe-bench: error:") and needle in lines[0], res.output
    assert not any(tmp_path.iterdir())  # refused before any run directory is made


def test_ep_placement_file(tmp_path):
    from moe_routing_bench.bench.placement import from_file

    f = tmp_path / "map.json"
    f.write_text(json.dumps({"0": 1, "1": 1, "2": 0, "3": 1}))
    assert from_file(f, 4, 2).tolist() == [1, 1, 0, 1]
    f.write_text(json.dumps({"0": 1, "1": 2}))
    res = _cli("ep", "--nproc", "2", "--experts", "2", "--placement", str(f), "--out", str(tmp_path / "r"))
    assert res.exit_code == 2 and "not a device" in res.output


def test_report_draws_an_ep_run_with_its_per_rank_figure(ep_run, tmp_path):
    run_dir, _, _ = ep_run
    res = _cli("report", str(run_dir), "--out", str(tmp_path / "report"))
    assert res.exit_code == 0, res.output
    assert (tmp_path / "report" / "ep_ranks.png").stat().st_size > 10_000
    assert (tmp_path / "report" / "throughput.png").is_file()
    assert "Expert parallelism: work and time per rank" in (tmp_path / "report" / "report.html").read_text()


def test_ep_broken_plan_is_an_error_row_and_the_next_configuration_runs(broken_plugin, tmp_path):
    # capacity -3 failed the whole launch before; every rank now checks its plans and they agree
    sizes = ["--tokens", "32", "--experts", "4", "--hidden", "8", "--repeats", "1", "--out", str(tmp_path / "o")]
    res = _cli("ep", "--plugin", str(broken_plugin), "--router", "broken[how=capacity],switch", *sizes)
    assert res.exit_code == 1 and "1 of 2 configurations failed" in res.stderr, res.output
    rows, _, meta = load_run(next((tmp_path / "o").iterdir()))
    by = rows.set_index("router")
    assert "capacity = -3" in by.loc["broken[how=capacity]", "error"] and by.loc["switch", "status"] == "ok"
    assert meta["status"] == "complete"


def test_one_memory_check_per_rank_counts_the_ranks_that_share_memory(monkeypatch):
    from moe_routing_bench.bench.ep.launch import EPSweep, ep_points, rank_bytes
    from moe_routing_bench.bench.spec import Spec

    ep = EPSweep(routers=[Spec("topk")], workloads=[Spec("uniform")], nproc=4, tokens=64, experts=8, hidden=32)
    monkeypatch.delenv("MOE_BENCH_MEMORY_BUDGET", raising=False)
    (point,) = ep_points(ep)
    per_rank = rank_bytes(point.point)
    assert per_rank > 4 * 64 * 32 * 4, "a rank holds its layer and its exchange buffers"
    monkeypatch.setenv("MOE_BENCH_MEMORY_BUDGET", str(2 * per_rank))
    # gloo: four ranks share this host's memory, 4x a rank > the budget
    with pytest.raises(ValueError, match=r"ep \(4 ranks sharing this host\): --tokens 64 x --experts 8 x --hidden 32"):
        ep_points(ep)
    # nccl: each rank has its own GPU, so one rank against the budget
    assert len(ep_points(dataclasses.replace(ep, dist_backend="nccl"))) == 1
    monkeypatch.setenv("MOE_BENCH_MEMORY_BUDGET", str(per_rank - 1))
    with pytest.raises(ValueError, match="one rank on its own device"):
        ep_points(dataclasses.replace(ep, dist_backend="nccl"))
    # a preset's shape, not the flags', is what is counted
    monkeypatch.setenv("MOE_BENCH_MEMORY_BUDGET", str(10 * per_rank))
    with pytest.raises(ValueError, match="--model mixtral-8x7b"):
        ep_points(dataclasses.replace(ep, model="mixtral-8x7b"))
