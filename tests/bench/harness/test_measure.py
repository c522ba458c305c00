"""Measuring one configuration in process: one positions per step, stage accounting, presets."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from moe_routing_bench.bench.harness import measure
from moe_routing_bench.bench.harness.sweep import expand, load_blocks
from moe_routing_bench.bench.schema import STAGES, TIMED_STAGES
from moe_routing_bench.bench.timing import CpuHeap
from moe_routing_bench.kernels import dispatch as dispatch_module
from moe_routing_bench.kernels import positions as positions_module
from moe_routing_bench.kernels.layer import list_backends
from moe_routing_bench.workloads.registry import workload_names


def _point(**over):
    block = {
        "routers": ["gshard"],  # random routing: a second routing pass would draw other seconds
        "tokens": [96],
        "experts": [8],
        "hidden": [16],
        "capacity_factor": [0.75],
        "repeats": 3,
        "warmup": 2,
        **over,
    }
    (p,) = expand(load_blocks(None, block), workload_names(), list_backends())
    return p


def test_one_positions_call_per_step_and_metrics_from_the_measured_plans(monkeypatch):
    calls = []
    real = positions_module.positions

    def counting(expert_R, num_experts):
        calls.append(int(expert_R.shape[0]))
        return real(expert_R, num_experts)

    # make_dispatch is the only caller the layer has; metrics and the breakdown must not rank again.
    monkeypatch.setattr(dispatch_module, "positions", counting)
    monkeypatch.setattr(positions_module, "positions", counting)
    monkeypatch.setattr("moe_routing_bench.bench.metrics.positions", counting)
    monkeypatch.setattr("moe_routing_bench.bench.breakdown.positions", counting)
    p = _point()
    row, tables = measure.measure_point(p)
    # One per step: warm-up, timed, and on CPU the one untimed step that fills the caching heap.
    settle = 1 if p.warmup and CpuHeap().available else 0
    assert len(calls) == p.warmup + settle + p.repeats
    # The breakdown is of the measured plans: its pooled drops are the loads table's, exactly.
    freq = [r for r in tables["breakdown"] if r["kind"] == "frequency"]
    pooled = 1 - sum(r["requests"] * (1 - r["drop_rate"]) for r in freq) / sum(r["requests"] for r in freq)
    loads = tables["loads"]
    from_loads = 1 - sum(r["kept"] for r in loads) / sum(r["requested"] for r in loads)
    assert row["drop_rate"] > 0 and pooled == pytest.approx(from_loads, abs=1e-12)


def test_other_is_total_minus_the_timed_stages():
    row, _ = measure.measure_point(_point(modes=["fwd+bwd"], routers=["switch"]))
    assert "other" in STAGES and set(TIMED_STAGES) < set(STAGES)
    stages = sum(row[f"time_{s}_median"] for s in TIMED_STAGES)
    # Medians of sums are not sums of medians; each step's other is exact, the median close.
    assert row["time_other_median"] == pytest.approx(
        row["time_total_median"] - stages, abs=0.25 * row["time_total_median"]
    )
    assert row["time_backward_median"] > 0 and not math.isnan(row["time_other_p80"])


def test_reuse_buffers_gives_the_same_layer_output():
    p = _point(routers=["topk"], capacity_factor=["none"])
    ffn, _, _ = measure.experts_of(p, torch.device("cpu"), torch.float32)
    from moe_routing_bench.bench.moe_layer import run_layer
    from moe_routing_bench.kernels.workspace import Workspace
    from moe_routing_bench.routers.registry import build_router
    from moe_routing_bench.workloads.registry import build_workload

    router = build_router(p.router, **p.router_options())
    batches = list(build_workload("uniform", {}, 0).batches(96, 8, 3, "cpu"))
    ws = Workspace()
    with torch.no_grad():
        for i, b in enumerate(batches):
            x = torch.randn(96, 16, generator=torch.Generator().manual_seed(i))
            plan = router.route(b)
            fresh, _ = run_layer(plan, x, ffn)
            reused, _ = run_layer(plan, x, ffn, workspace=ws)
            torch.testing.assert_close(reused, fresh, atol=1e-5, rtol=1e-5)
    assert ws.nbytes > 0
    row, _ = measure.measure_point(dataclasses.replace(p, reuse_buffers=True))
    assert row["workspace_bytes"] > 0


def test_reuse_buffers_refuses_autograd():
    p = _point(routers=["topk"], modes=["fwd+bwd"], reuse_buffers=[True])
    with pytest.raises(ValueError, match="forward-only"):
        measure.measure_point(p)


def test_a_preset_point_has_the_models_shape():
    (p,) = [q for q in expand(load_blocks(None, {"models": ["olmoe-1b-7b"], "tokens": [32]}), workload_names(),
                              list_backends())]  # fmt: skip
    assert (p.model, p.experts, p.hidden, p.ffn, p.ffn_kind, p.top_k) == ("olmoe-1b-7b", 64, 2048, 1024, "swiglu", 8)
    assert p.router == "hierarchical" and p.router_label == "olmoe-1b-7b" and p.router_opts["norm_topk_prob"] is False
    with pytest.raises(Exception, match="unknown model 'nope'; valid models: switch-base-128"):
        expand(load_blocks(None, {"models": ["nope"]}), workload_names(), list_backends())


def test_the_settling_step_leaves_a_stateful_router_as_the_timed_steps_left_it(monkeypatch):
    # The untimed step that fills the caching heap routes, but never updates the router: the
    # router sees warm-up + repeats batches, as on a GPU where there is no such step.
    from moe_routing_bench.routers.registry import build_router

    seen = []
    p = _point()
    router = build_router(p.router, **p.router_options())
    real_update = type(router).update

    def counting(self, plan):
        seen.append(plan)
        return real_update(self, plan)

    monkeypatch.setattr(type(router), "update", counting)
    measure.measure_point(p)
    assert len(seen) == p.warmup + p.repeats


def test_memory_is_the_warm_up_steps_working_set_on_an_exact_heap():
    # The einsum one-hot tensors of T=1024, E=64 are several MiB: an exact heap sees them.
    row, _ = measure.measure_point(_point(backends=["einsum"], routers=["switch"], tokens=[1024], experts=[64]))
    assert row["peak_mem_bytes"] > 1 << 20


def test_measure_updates_after_every_batch_and_the_loads_converge(update_calls):
    p = dataclasses.replace(
        _point(),
        router="topk",
        router_label="topk",
        router_opts={"bias_update_rate": 0.02, "capacity_factor": 1.0},
        workload="hot",
        workload_label="hot",
        tokens=256,
        experts=16,
        repeats=60,
        warmup=2,
    )
    _, parts = measure.measure_point(p)
    routers = list(dict.fromkeys(rid for rid, _ in update_calls))
    # One router, updated after each of the 2 warm-up + 60 timed batches (the settling step on
    # CPU routes without updating); the breakdown reads the measured plans, no second router.
    assert len(routers) == 1 and len(update_calls) == 62
    by_batch: dict[int, list[int]] = {}
    for rec in parts["loads"]:
        by_batch.setdefault(rec["batch"], []).append(rec["requested"])
    imbalance = [max(v) / (sum(v) / len(v)) for _, v in sorted(by_batch.items())]
    assert sum(imbalance[-10:]) / 10 < 0.5 * sum(imbalance[:3]) / 3, imbalance
    kept = sum(
        round(v["requests"] * (1 - v["drop_rate"])) for v in (b for b in parts["breakdown"] if b["kind"] == "position")
    )
    assert kept == sum(rec["kept"] for rec in parts["loads"])
