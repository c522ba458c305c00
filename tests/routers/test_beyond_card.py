"""The routers beyond the card (DESIGN.md): auxiliary-loss-free bias balancing, sinkhorn, top-p,
random token selection and the sequence-wise aux loss, each rule a test that fails if it breaks."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from moe_routing_bench.bench.metrics import batch_metrics, load_stats
from moe_routing_bench.bench.routing import route_batches
from moe_routing_bench.kernels.positions import kept_mask, positions
from moe_routing_bench.routers.contract import Batch, RoutingError, sequence_balance_loss
from moe_routing_bench.routers.registry import build_router
from moe_routing_bench.routers.sinkhorn import sinkhorn_log_scaling
from moe_routing_bench.workloads.registry import build_workload


def _batches(workload, t, e, n, **opts):
    return list(build_workload(workload, opts, seed=0).batches(t, e, n, "cpu"))


def _kept(plan):
    return kept_mask(positions(plan.expert_R, plan.num_experts)[0], plan.capacity)


# ------------------------------------------------------------------------------ bias balancing


def test_bias_balancing_lowers_topk_imbalance_on_hot_with_unbiased_gates():
    # One expert takes half the first choices (E = 64: 24x the mean load). Over 300 batches the
    # selection bias brings the requested imbalance down to a few times the mean; the same router
    # without it stays at 24.
    batches = _batches("hot", 1024, 64, 300)
    plain = route_batches(build_router("topk", num_experts=64), batches)
    biased_router = build_router("topk", num_experts=64, bias_update_rate=0.01)
    biased = route_batches(biased_router, batches)
    imb = [m["imbalance"] for m in biased.per_batch]
    plain_end = sum(m["imbalance"] for m in plain.per_batch[-50:]) / 50
    biased_end = sum(imb[-50:]) / 50
    assert plain_end > 20 and biased_end < 4, (plain_end, biased_end)  # measured 24.1 and 2.2
    assert imb[0] == plain.per_batch[0]["imbalance"]  # the bias starts at 0
    # Selection only: the gates are the softmax over the chosen experts' unbiased logits.
    bias = biased_router.expert_bias
    assert float(bias.abs().max()) > 0.1
    batch = batches[-1]
    plan = biased_router.route(batch)
    expert_KT = plan.expert_R.view(2, -1)
    gates = torch.softmax(batch.logits_TE.gather(1, expert_KT.t()), dim=-1).t()
    torch.testing.assert_close(plan.weight_R.view(2, -1), gates)
    # ... and the choices are the top-2 of softmax + bias, which differ from the logits' top-2.
    want = torch.topk(torch.softmax(batch.logits_TE, -1) + bias, 2, -1).indices
    assert torch.equal(expert_KT.t(), want)
    assert not torch.equal(expert_KT.t(), torch.topk(batch.logits_TE, 2, -1).indices)


def test_bias_update_is_rate_times_sign_of_mean_minus_load():
    router = build_router("switch", num_experts=4, capacity_factor=None, bias_update_rate=0.25)
    # Loads 3, 1, 0, 0 (mean 1): expert 0 down, expert 1 unchanged, experts 2 and 3 up.
    logits = torch.tensor([[5.0, 0, 0, 0]] * 3 + [[0, 5.0, 0, 0]])
    plan = router.route(Batch(logits_TE=logits, token_T=torch.arange(4)))
    router.update(plan)
    assert router.expert_bias.tolist() == [-0.25, 0.0, 0.25, 0.25]
    router.update(plan)
    assert router.expert_bias.tolist() == [-0.5, 0.0, 0.5, 0.5]
    # A router without balancing has no state and routes as before.
    off = build_router("switch", num_experts=4, capacity_factor=None)
    assert not off.stateful and build_router("switch", num_experts=4, bias_update_rate=0.1).stateful
    off.update(plan)
    assert off.expert_bias.tolist() == [0.0] * 4


@pytest.mark.parametrize(
    ("name", "opts"),
    [("switch", {"capacity_factor": None}), ("gshard", {"second_policy": "always"}), ("hierarchical", {})],
)
def test_bias_balancing_lowers_imbalance_of_every_token_choice_router(name, opts):
    batches = _batches("hot", 512, 16, 200)
    plain = route_batches(build_router(name, num_experts=16, **opts), batches).per_batch
    biased = route_batches(build_router(name, num_experts=16, bias_update_rate=0.02, **opts), batches).per_batch
    end = lambda rows: sum(r["imbalance"] for r in rows[-40:]) / 40
    assert end(biased) < 0.5 * end(plain), (end(biased), end(plain))


def test_each_route_batches_call_starts_a_fresh_state_when_given_a_fresh_router():
    batches = _batches("hot", 256, 8, 20)
    runs = [route_batches(build_router("topk", num_experts=8, bias_update_rate=0.05), batches) for _ in range(2)]
    assert runs[0].per_batch == runs[1].per_batch


# ------------------------------------------------------------------------------------ sinkhorn


def test_sinkhorn_balances_zipf_at_most_half_of_topk_imbalance():
    batches = _batches("zipf", 4096, 64, 5)
    topk = route_batches(build_router("topk", num_experts=64), batches).summary["imbalance"][0]
    res = route_batches(build_router("sinkhorn", num_experts=64), batches)
    sk = res.summary["imbalance"][0]
    assert sk <= 0.5 * topk, (sk, topk)  # measured 1.16 against 12.7
    assert 1 <= res.summary["router_iters"][0] <= 100


def test_sinkhorn_scaling_reaches_uniform_marginals_and_reports_iterations():
    logits = torch.randn(2000, 16, generator=torch.Generator().manual_seed(0)) * 2 + torch.linspace(0, 4, 16)
    log_d, iters, err = sinkhorn_log_scaling(logits, tol=1e-5, max_iters=500)
    assert err <= 1e-5 and 1 < iters < 500
    kernel = torch.exp(logits.double() + log_d.double())
    p = kernel / kernel.sum(-1, keepdim=True) / 2000  # rows sum to 1/T
    torch.testing.assert_close(p.sum(0), torch.full((16,), 1 / 16, dtype=torch.float64), rtol=1e-4, atol=0)
    # The cap stops it, and says so: one iteration, the error above the tolerance.
    _, iters, err = sinkhorn_log_scaling(logits, tol=1e-9, max_iters=1)
    assert iters == 1 and err > 1e-9


def test_sinkhorn_selection_gates_and_plan():
    batch = Batch(
        logits_TE=torch.randn(500, 8, generator=torch.Generator().manual_seed(1)) * 3, token_T=torch.arange(500)
    )
    router = build_router("sinkhorn", num_experts=8, top_k=2, tol=1e-4)
    plan = router.route(batch)
    log_d, iters, _ = sinkhorn_log_scaling(batch.logits_TE, 1e-4, 100)
    want = torch.topk(batch.logits_TE + log_d, 2, -1).indices
    assert torch.equal(plan.expert_R.view(2, -1).t(), want)
    probs = torch.softmax(batch.logits_TE, -1)
    torch.testing.assert_close(plan.weight_R, probs[plan.token_R, plan.expert_R])  # plain softmax gates
    assert plan.aux_loss is None and plan.capacity is None and plan.looks_at_whole_batch
    assert int(plan.extras["iterations"]) == iters
    metrics, _ = batch_metrics(plan)
    assert metrics["router_iters"] == iters and metrics["drop_rate"] == 0.0
    capped = build_router("sinkhorn", num_experts=8, capacity_factor=1.0).route(batch)
    assert capped.capacity == 125 and torch.equal(capped.token_R, torch.arange(500).repeat(2))  # choice-major
    for bad, match in (({"tol": 0}, "tol must be a finite number > 0"), ({"max_iters": 0}, "max_iters must be")):
        with pytest.raises(RoutingError, match=match):
            build_router("sinkhorn", **bad)


# ---------------------------------------------------------------------------------------- topp


def test_topp_mean_k_grows_with_p_and_stays_in_bounds():
    batches = _batches("zipf", 2048, 64, 3)
    means = []
    for p in (0.2, 0.4, 0.6, 0.8, 0.95):
        res = route_batches(build_router("topp", num_experts=64, p=p, max_k=8), batches)
        k = res.summary["top_k_effective"][0]
        assert 1 <= k <= 8 and res.top_k == pytest.approx(res.per_batch[-1]["top_k_effective"])
        means.append(k)
    assert all(a < b for a, b in itertools.pairwise(means)), means


def test_topp_takes_experts_until_their_probability_reaches_p():
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.9, 0.05, 0.03, 0.02], [0.25, 0.25, 0.25, 0.25]])
    batch = Batch(logits_TE=probs.log(), token_T=torch.arange(3))
    plan = build_router("topp", num_experts=4, p=0.75, max_k=4).route(batch)
    per_token = [plan.expert_R[plan.token_R == t].tolist() for t in range(3)]
    # 0.5 < 0.75 <= 0.8; 0.9 >= 0.75 at once; 0.25 + 0.25 + 0.25 reaches 0.75 (equal: lower index first)
    assert per_token == [[0, 1], [0], [0, 1, 2]]
    torch.testing.assert_close(plan.weight_R, probs[plan.token_R, plan.expert_R])  # not renormalised
    assert plan.top_k == pytest.approx(6 / 3) and plan.token_R.tolist() == [0, 1, 2, 0, 2, 2]  # choice-major
    clamped = build_router("topp", num_experts=4, p=0.75, min_k=2, max_k=2).route(batch)
    assert torch.bincount(clamped.token_R).tolist() == [2, 2, 2]
    # Capacity from the batch's mean K: C = ceil(cf * R / E) = ceil(1.0 * 6 / 4).
    assert build_router("topp", num_experts=4, p=0.75, capacity_factor=1.0).route(batch).capacity == 2
    with pytest.raises(RoutingError, match="max_k must be <= num_experts = 4"):
        build_router("topp", num_experts=4, max_k=5)
    with pytest.raises(RoutingError, match=r"p must be a number in \(0, 1\]"):
        build_router("topp", p=1.5)


# --------------------------------------------------------------------------- random token selection


@pytest.mark.parametrize(("name", "k"), [("switch", 1), ("topk", 2)])
def test_rts_priority_differs_from_position_but_loads_do_not(name, k):
    batch = _batches("zipf", 2048, 16, 1)[0]
    opts = {"num_experts": 16, "capacity_factor": 1.0, "seed": 5} | ({"top_k": k} if name == "topk" else {})
    pos = build_router(name, **opts).route(batch)
    rts_router = build_router(name, drop_policy="random", **opts)
    rts = rts_router.route(batch)
    # The same requests (set and loads), in another order: other requests win the slots.
    assert sorted(zip(pos.token_R.tolist(), pos.expert_R.tolist(), strict=True)) == sorted(
        zip(rts.token_R.tolist(), rts.expert_R.tolist(), strict=True)
    )
    assert torch.equal(torch.bincount(pos.expert_R, minlength=16), torch.bincount(rts.expert_R, minlength=16))
    assert not torch.equal(pos.token_R, rts.token_R)
    kept_pos, kept_rts = _kept(pos), _kept(rts)
    assert int(kept_pos.sum()) == int(kept_rts.sum())  # the same number kept per expert
    assert set(pos.token_R[~kept_pos].tolist()) != set(rts.token_R[~kept_rts].tolist())
    # Position priority drops the end of the batch; random priority spreads drops over it.
    late = lambda plan, kept: float((plan.token_R[~kept] >= 1024).float().mean())
    assert late(pos, kept_pos) > 0.6 and abs(late(rts, kept_rts) - 0.5) < 0.1
    # Choice-major still: every first choice before any second, tokens in one random order each.
    t = batch.num_tokens
    assert sorted(rts.token_R[:t].tolist()) == list(range(t))
    if k == 2:
        assert torch.equal(rts.token_R[:t], rts.token_R[t:])
    # Seeded, and drawn anew each batch.
    again = build_router(name, drop_policy="random", **opts).route(batch)
    assert torch.equal(again.token_R, rts.token_R)
    assert not torch.equal(rts_router.route(batch).token_R, rts.token_R)


def test_rts_refuses_a_second_priority():
    with pytest.raises(RoutingError, match="batch_prioritized and drop_policy=random both set the priority"):
        build_router("switch", batch_prioritized=True, drop_policy="random")


# ---------------------------------------------------------------------- sequence-wise aux loss


def test_a_sequence_that_routes_uniformly_gives_aux_loss_seq_one():
    # Two sequences of 8 tokens over E = 4: in each, every expert is asked by two tokens.
    e = 4
    logits = torch.full((16, e), -3.0)
    logits[torch.arange(16), torch.arange(16) % e] = 3.0
    seq = torch.arange(16) // 8
    plan = build_router("switch", num_experts=e, capacity_factor=None).route(
        Batch(logits_TE=logits, token_T=torch.arange(16), seq_T=seq)
    )
    assert float(plan.aux_loss_seq) == pytest.approx(1.0, abs=1e-6)
    # Evenly spread as a batch, skewed in each sequence: the batch loss is 1, the sequence one is not.
    logits = torch.full((16, e), -3.0)
    logits[torch.arange(16), torch.arange(16) // 4] = 3.0  # sequence 0 uses experts 0, 1; sequence 1 2, 3
    plan = build_router("switch", num_experts=e, capacity_factor=None).route(
        Batch(logits_TE=logits, token_T=torch.arange(16), seq_T=seq)
    )
    assert float(plan.aux_loss) == pytest.approx(1.0, abs=1e-3)
    assert float(plan.aux_loss_seq) > 1.9
    # Without sequence ids it is not defined: None in the plan, NaN in the metrics.
    plain = build_router("switch", num_experts=e).route(Batch(logits_TE=logits, token_T=torch.arange(16)))
    assert plain.aux_loss_seq is None and math.isnan(batch_metrics(plain)[0]["aux_loss_seq"])


def test_sequence_balance_loss_by_hand():
    # One sequence of 2 tokens, E = 2, K = 1: both ask expert 0; P = (0.75, 0.25).
    # f = E / (K T) * R = (2, 0); sum f P = 1.5.
    scores = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    loss = sequence_balance_loss(scores, torch.tensor([0, 1]), torch.tensor([0, 0]), torch.tensor([3, 3]))
    assert float(loss) == pytest.approx(1.5)
    assert load_stats(torch.tensor([2, 0]))["imbalance"] == 2.0


def test_switch_probs_policy_is_batch_prioritized_routing(make_batch):
    conf = torch.tensor([0.1, 0.5, 0.2, 3.0, 2.0, 0.3])
    b = make_batch(torch.stack([conf, torch.zeros(6), torch.zeros(6)], dim=1))
    by_name = build_router("switch", num_experts=3, batch_prioritized=True).route(b)
    by_policy = build_router("switch", num_experts=3, drop_policy="probs").route(b)
    assert by_policy.token_R.tolist() == by_name.token_R.tolist() == [3, 4, 1, 5, 2, 0]


def _biased(name, e, make_batch, **opts):
    """A router whose bias, after one batch that sent every token to the first K experts, is -1
    on those and +1 on the rest (rate 1: larger than any probability gap)."""
    router = build_router(name, num_experts=e, bias_update_rate=1.0, capacity_factor=None, **opts)
    router.update(router.route(make_batch(torch.tensor([[9.0, 5.0] + [0.0] * (e - 2)] * 8))))
    k = router.config.top_k
    assert router.expert_bias.tolist() == [-1.0] * k + [1.0] * (e - k)
    return router


def test_switch_under_bias_selects_on_biased_scores_and_gates_with_unbiased_ones(make_batch):
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0], [2.0, 0.5, 1.5, 0.0], [0.0, 0.0, 4.0, 0.0]])
    plan = _biased("switch", 4, make_batch).route(make_batch(logits))
    probs = torch.softmax(logits, -1)
    chosen = (probs + torch.tensor([-1.0, 1.0, 1.0, 1.0])).argmax(-1)
    assert plan.expert_R.tolist() == chosen.tolist() == [1, 2, 2]
    torch.testing.assert_close(plan.weight_R, probs[torch.arange(3), chosen])
    torch.testing.assert_close(plan.z_loss, torch.logsumexp(logits, -1).pow(2).mean())


def test_gshard_under_bias_gates_and_z_loss_by_hand(make_batch):
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0], [2.0, 0.5, 1.5, 0.0]])
    plan = _biased("gshard", 4, make_batch, second_policy="always").route(make_batch(logits))
    probs = torch.softmax(logits, -1)
    top = (probs + torch.tensor([-1.0, -1.0, 1.0, 1.0])).topk(2, dim=-1).indices  # experts 2 and 3
    p = probs.gather(1, top)
    gates = p / p.sum(-1, keepdim=True)
    assert plan.expert_R.tolist() == top.t().reshape(-1).tolist()
    torch.testing.assert_close(plan.weight_R, gates.t().reshape(-1))
    # z-loss from the true logsumexp, not from the first choice's probability (which is not the
    # largest once the bias has steered the choice)
    torch.testing.assert_close(plan.z_loss, torch.logsumexp(logits, -1).pow(2).mean())


def test_gshard_gates_stay_finite_when_both_chosen_probabilities_underflow(make_batch):
    # The bias steers the choice to experts 2 and 3, whose float32 probabilities are exactly 0.
    logits = torch.tensor([[0.0, 0.0, -200.0, -200.0]])
    plan = _biased("gshard", 4, make_batch, second_policy="always").route(make_batch(logits))
    assert torch.softmax(logits, -1)[0, 2:].tolist() == [0.0, 0.0]
    assert plan.expert_R.tolist() == [2, 3] and torch.isfinite(plan.weight_R).all()
    # the z-loss's logsumexp does not go through the chosen (underflowed) probability either
    torch.testing.assert_close(plan.z_loss, torch.logsumexp(logits, -1).pow(2).mean())


def test_gshard_needs_two_experts_and_takes_exactly_two(make_batch):
    with pytest.raises(RoutingError, match=r"top_k must be between 1 and num_experts = 1 \(got 2\)"):
        build_router("gshard", num_experts=1)
    plan = build_router("gshard", num_experts=2, second_policy="always").route(make_batch(torch.tensor([[1.0, 0.0]])))
    assert plan.expert_R.tolist() == [0, 1]


@pytest.mark.parametrize(
    ("opts", "match"),
    [
        ({"p": 0.0}, r"p must be a number in \(0, 1\] \(got 0.0\)"),
        ({"p": -0.5}, r"p must be a number in \(0, 1\] \(got -0.5\)"),
        ({"p": True}, r"p must be a number in \(0, 1\] \(got True\)"),
        ({"min_k": True}, r"min_k must be an integer >= 1 \(got True\)"),
        ({"max_k": 0}, r"max_k must be an integer >= 1 \(got 0\)"),
        ({"min_k": 0}, r"min_k must be an integer >= 1 \(got 0\)"),
    ],
)
def test_topp_config_errors(opts, match):
    with pytest.raises(RoutingError, match=match):
        build_router("topp", num_experts=4, **opts)


def test_topp_bounds_and_defaults(make_batch):
    cfg = build_router("topp", num_experts=8).config
    assert (cfg.p, cfg.min_k, cfg.max_k, cfg.capacity_factor, cfg.top_k) == (0.4, 1, 4, None, 1)
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    # p = 1 is allowed (every expert up to max_k); max_k = 1 is allowed (top-1)
    assert build_router("topp", num_experts=4, p=1.0).route(make_batch(logits)).expert_R.numel() == 4
    assert build_router("topp", num_experts=4, max_k=1).route(make_batch(logits)).expert_R.tolist() == [0]


def test_top_p_counts_never_exceed_the_candidates():
    from moe_routing_bench.routers.topp import top_p_counts

    # M = 2 candidates of 8 experts whose sum stays below p: every row takes both, never 3,
    # whatever the number of rows.
    sorted_prob = torch.full((5, 2), 0.1)
    assert top_p_counts(sorted_prob, 0.9, 1).tolist() == [2] * 5
    assert top_p_counts(torch.tensor([[0.6, 0.3], [0.2, 0.1]]), 0.5, 1).tolist() == [1, 2]
