"""Routing metrics on hand-computed plans, and Switch's drop rate against the exact binomial law."""

from __future__ import annotations

import math

import pytest
import torch

from moe_routing_bench.bench.metrics import METRICS, aggregate, batch_metrics, load_stats
from moe_routing_bench.bench.routing import route_batches
from moe_routing_bench.routers.contract import Plan
from moe_routing_bench.routers.registry import build_router
from moe_routing_bench.workloads.synthetic import UniformConfig, UniformWorkload


def _plan(tokens, experts, weights, t, e, cap, **kw) -> Plan:
    return Plan(
        token_R=torch.tensor(tokens),
        expert_R=torch.tensor(experts),
        weight_R=torch.tensor(weights, dtype=torch.float32),
        num_tokens=t,
        num_experts=e,
        capacity=cap,
        top_k=1,
        **kw,
    )


def test_metrics_on_a_hand_computed_plan():
    # Requests in priority order: (t0,e0) (t1,e0) (t2,e1) (t3,e0) (t3,e2); C = 1.
    # Ranks on e0: t0 -> 0, t1 -> 1, t3 -> 2. Kept: (t0,e0) (t2,e1) (t3,e2). R = [3,1,1], L = [1,1,1].
    plan = _plan([0, 1, 2, 3, 3], [0, 0, 1, 0, 2], [0.5, 0.4, 0.3, 0.2, 0.1], t=4, e=3, cap=1)
    m, loads = batch_metrics(plan)
    assert loads.requested_E.tolist() == [3, 1, 1]
    assert loads.kept_E.tolist() == [1, 1, 1]
    assert m["drop_rate"] == pytest.approx(1 - 3 / 5)
    assert m["tokens_dropped_frac"] == pytest.approx(1 / 4)  # only t1 has no expert; t3 kept e2
    assert m["imbalance"] == pytest.approx(3 / (5 / 3))
    assert m["maxvio"] == pytest.approx(3 / (5 / 3) - 1)
    assert m["imbalance_kept"] == pytest.approx(1.0)
    assert m["load_cv"] == pytest.approx(math.sqrt(8 / 9) / (5 / 3))
    q = [0.6, 0.2, 0.2]
    assert m["load_entropy"] == pytest.approx(-sum(x * math.log(x) for x in q) / math.log(3))
    assert m["experts_unused"] == 0
    assert m["gate_mass_kept"] == pytest.approx((0.5 + 0.3 + 0.1) / 1.5)
    assert math.isnan(m["aux_loss"]) and math.isnan(m["z_loss"])  # the plan defines none
    assert list(m) == list(METRICS)


def test_dropless_plan_keeps_everything_and_counts_unused_experts():
    plan = _plan([0, 1, 2], [0, 0, 3], [1.0, 1.0, 1.0], t=3, e=4, cap=None)
    m, loads = batch_metrics(plan)
    assert m["drop_rate"] == 0 and m["tokens_dropped_frac"] == 0 and m["gate_mass_kept"] == 1
    assert m["experts_unused"] == 2
    assert m["imbalance"] == pytest.approx(2 / (3 / 4))
    assert torch.equal(loads.kept_E, loads.requested_E)


def test_expert_choice_plan_has_no_drop_rate():
    # An expert-choice plan: tokens chosen by experts; token 2 picked by no one.
    plan = _plan([0, 1, 1, 0], [0, 0, 1, 1], [0.5] * 4, t=3, e=2, cap=2, looks_at_whole_batch=True, experts_choose=True)
    m, _ = batch_metrics(plan)
    assert math.isnan(m["drop_rate"])
    assert m["tokens_dropped_frac"] == pytest.approx(1 / 3)
    # A plan that only reads the whole batch (sinkhorn) but whose tokens ask: capacity refuses one.
    plan = _plan([0, 1, 2], [0, 0, 0], [0.5] * 3, t=3, e=2, cap=2, looks_at_whole_batch=True)
    m, _ = batch_metrics(plan)
    assert m["drop_rate"] == pytest.approx(1 / 3)


def test_load_stats_perfect_balance_and_single_expert():
    even = load_stats(torch.tensor([5, 5, 5, 5]))
    assert even["imbalance"] == 1 and even["load_cv"] == 0 and even["load_entropy"] == pytest.approx(1)
    one = load_stats(torch.tensor([0, 0, 8, 0]))
    assert one["imbalance"] == 4 and one["experts_unused"] == 3 and one["load_entropy"] == 0


def test_aggregate_mean_and_standard_error():
    agg = aggregate([{"x": 1.0}, {"x": 2.0}, {"x": 6.0}])
    mean, se = agg["x"]
    assert mean == pytest.approx(3.0)
    assert se == pytest.approx(math.sqrt(((2**2) + 1 + 3**2) / 2) / math.sqrt(3))
    assert math.isnan(aggregate([{"x": 1.0}])["x"][1])


def expected_switch_drop_rate(t: int, e: int, c: int) -> float:
    """Exact E[drop rate] of Switch on iid logits: each expert's load X ~ Binomial(T, 1/E);
    an expert drops (X - C)+ tokens, so E[drop rate] = E * E[(X - C)+] / T."""
    p = 1.0 / e
    excess = 0.0
    for x in range(c + 1, t + 1):
        log_pmf = math.lgamma(t + 1) - math.lgamma(x + 1) - math.lgamma(t - x + 1)
        log_pmf += x * math.log(p) + (t - x) * math.log1p(-p)
        excess += (x - c) * math.exp(log_pmf)
    return e * excess / t


@pytest.mark.parametrize(("cf", "cap"), [(1.0, 64), (1.25, 80)])
def test_switch_drop_rate_matches_binomial_expectation(cf, cap):
    t, e, n = 4096, 64, 300
    router = build_router("switch", num_experts=e, capacity_factor=cf)
    res = route_batches(router, UniformWorkload(UniformConfig(seed=11)).batches(t, e, n))
    assert res.capacity == cap
    mean, se = res.summary["drop_rate"]
    expected = expected_switch_drop_rate(t, e, cap)
    assert abs(mean - expected) < 4 * se, (mean, se, expected)
    # The bound is informative: a rule change (e.g. dropping at rank <= C) moves the mean far away.
    assert se < 0.1 * expected


def test_top_k_effective_is_requests_per_token():
    # 6 requests over 4 tokens (a top-p batch): 1.5, a ratio, not a remainder or a bit mask.
    plan = Plan(
        token_R=torch.tensor([0, 0, 1, 2, 2, 3]),
        expert_R=torch.tensor([0, 1, 1, 2, 3, 0]),
        weight_R=torch.full((6,), 0.5),
        num_tokens=4,
        num_experts=4,
        capacity=None,
        top_k=1.5,
    )
    metrics, _ = batch_metrics(plan)
    assert metrics["top_k_effective"] == 1.5


def test_one_expert_is_perfectly_balanced():
    # E = 1: entropy over one expert is defined as 1 (even), imbalance 1, CV 0.
    stats = load_stats(torch.tensor([5]))
    assert stats["load_entropy"] == 1.0 and stats["imbalance"] == 1.0 and stats["load_cv"] == 0.0


def test_metrics_from_the_layers_dispatch_equal_metrics_computed_here():
    # The harness passes the step's Dispatch (one positions per step): a capacity plan's kept
    # mask must come from it, not be taken as "all kept".
    from moe_routing_bench.kernels.dispatch import make_dispatch

    plan = _plan([0, 1, 2, 3, 3], [0, 0, 1, 0, 2], [0.05, 0.04, 0.03, 0.02, 0.01], t=4, e=3, cap=1)
    d = make_dispatch(plan.token_R, plan.expert_R, plan.weight_R, 4, 3, 1)
    here, _ = batch_metrics(plan)
    from_dispatch, _ = batch_metrics(plan, dispatch=d)
    assert from_dispatch == pytest.approx(here, nan_ok=True)
    assert here["tokens_dropped_frac"] == pytest.approx(1 / 4)
    # Gates summing to well under 1 (0.15) still give a kept share.
    assert here["gate_mass_kept"] == pytest.approx((0.05 + 0.03 + 0.01) / 0.15)


def test_a_plan_with_no_requests_drops_nothing():
    empty = torch.tensor([], dtype=torch.int64)
    plan = Plan(empty, empty, torch.tensor([]), num_tokens=3, num_experts=2, capacity=1, top_k=1)
    m, _ = batch_metrics(plan)
    assert m["drop_rate"] == 0.0 and m["tokens_dropped_frac"] == 1.0


def test_load_stats_of_a_single_request_and_se_of_two_batches():
    assert load_stats(torch.tensor([1, 0]))["imbalance"] == 2.0
    out = aggregate([{"drop_rate": 0.1}, {"drop_rate": 0.3}])
    mean, se = out["drop_rate"]
    assert mean == pytest.approx(0.2) and se == pytest.approx(0.1)  # std 0.1414 / sqrt(2)


def test_two_expert_entropy_zero_gates_and_maxvio_past_one():
    q = [0.75, 0.25]
    assert load_stats(torch.tensor([3, 1]))["load_entropy"] == pytest.approx(
        -sum(x * math.log(x) for x in q) / math.log(2)
    )
    stats = load_stats(torch.tensor([2, 0, 0, 0]))
    assert stats["imbalance"] == 4.0 and stats["maxvio"] == 3.0  # max/mean - 1, not a remainder
    plan = _plan([0, 1], [0, 1], [0.0, 0.0], t=2, e=2, cap=None)
    assert math.isnan(batch_metrics(plan)[0]["gate_mass_kept"])  # no gate mass: undefined
