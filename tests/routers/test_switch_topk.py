"""Every rule of DESIGN.md for `switch` and `topk`, each a test that fails if the rule breaks."""

from __future__ import annotations

import pytest
import torch

from moe_routing_bench.kernels.positions import kept_mask, positions
from moe_routing_bench.routers.contract import RoutingError
from moe_routing_bench.routers.registry import build_router


def _kept(plan):
    rank_R, _ = positions(plan.expert_R, plan.num_experts)
    return kept_mask(rank_R, plan.capacity)


# ---------------------------------------------------------------------------------------- switch


def test_switch_argmax_and_unrenormalised_gate(make_batch):
    logits = torch.randn(50, 6, generator=torch.Generator().manual_seed(1))
    plan = build_router("switch", num_experts=6, capacity_factor=None).route(make_batch(logits))
    probs = torch.softmax(logits, -1)
    assert torch.equal(plan.token_R, torch.arange(50))
    assert torch.equal(plan.expert_R, logits.argmax(-1))
    # The gate is the softmax probability itself, not renormalised to 1 (top-1 would give 1.0).
    torch.testing.assert_close(plan.weight_R, probs.max(-1).values)
    assert (plan.weight_R < 1).all()


def test_switch_token_order_priority(make_batch):
    # Every token wants expert 0; C = ceil(1.0 * 6 / 3) = 2: the two earliest tokens win.
    logits = torch.tensor([[1.0, 0.0, 0.0]] * 6) + torch.linspace(0, 0.5, 6)[:, None] * torch.tensor([1.0, 0, 0])
    plan = build_router("switch", num_experts=3, capacity_factor=1.0).route(make_batch(logits))
    assert plan.capacity == 2
    kept = _kept(plan)
    assert plan.token_R[kept].tolist() == [0, 1]


def test_switch_batch_prioritized_keeps_most_confident(make_batch):
    # Later tokens are more confident about expert 0: batch-prioritized routing keeps them instead.
    conf = torch.tensor([0.1, 0.5, 0.2, 3.0, 2.0, 0.3])
    logits = torch.stack([conf, torch.zeros(6), torch.zeros(6)], dim=1)
    router = build_router("switch", num_experts=3, capacity_factor=1.0, batch_prioritized=True)
    plan = router.route(make_batch(logits))
    assert plan.token_R.tolist() == [3, 4, 1, 5, 2, 0]  # gate descending
    assert sorted(plan.token_R[_kept(plan)].tolist()) == [3, 4]


def test_switch_batch_prioritized_ties_keep_token_order(make_batch):
    logits = torch.tensor([[2.0, 0.0]] * 5)
    plan = build_router("switch", num_experts=2, capacity_factor=1.0, batch_prioritized=True).route(make_batch(logits))
    assert plan.token_R.tolist() == [0, 1, 2, 3, 4]


def test_switch_jitter_is_seeded_and_off_by_default(make_batch):
    logits = torch.randn(64, 8, generator=torch.Generator().manual_seed(2))
    b = make_batch(logits)
    plain = build_router("switch", num_experts=8).route(b)
    torch.testing.assert_close(plain.weight_R, torch.softmax(logits, -1).max(-1).values)
    a1 = build_router("switch", num_experts=8, jitter=0.5, seed=3).route(b)
    a2 = build_router("switch", num_experts=8, jitter=0.5, seed=3).route(b)
    a3 = build_router("switch", num_experts=8, jitter=0.5, seed=4).route(b)
    assert torch.equal(a1.expert_R, a2.expert_R) and torch.equal(a1.weight_R, a2.weight_R)
    assert not torch.equal(a1.weight_R, a3.weight_R)


def test_switch_jitter_by_hand(make_batch):
    # Multiplicative noise U(1 - j, 1 + j) from the router's seeded generator; selection and gates
    # both from the jittered logits.
    t, e, j, seed = 32, 8, 0.3, 7
    logits = torch.randn(t, e, generator=torch.Generator().manual_seed(1))
    plan = build_router("switch", num_experts=e, jitter=j, seed=seed, capacity_factor=None).route(make_batch(logits))
    noise = torch.empty(t, e).uniform_(1 - j, 1 + j, generator=torch.Generator().manual_seed(seed))
    probs = torch.softmax(logits * noise, -1)
    assert plan.expert_R.tolist() == probs.argmax(-1).tolist()
    torch.testing.assert_close(plan.weight_R, probs.max(-1).values)
    assert not torch.equal(probs.argmax(-1), torch.softmax(logits, -1).argmax(-1)), "the noise changed a choice"


def test_switch_without_jitter_draws_no_noise(make_batch):
    # jitter = 0 leaves the generator alone: the random drop order is the seed's first permutation.
    logits = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    plan = build_router("switch", num_experts=4, drop_policy="random", seed=5).route(make_batch(logits))
    order = torch.randperm(16, generator=torch.Generator().manual_seed(5))
    assert plan.token_R.tolist() == order.tolist()


@pytest.mark.parametrize(
    ("opts", "match"),
    [
        ({"jitter": -0.5}, r"jitter must be in \[0, 1\)"),
        ({"jitter": 1.0}, r"jitter must be in \[0, 1\)"),
        ({"jitter": 1.5}, r"jitter must be in \[0, 1\)"),
        ({"jitter": "x"}, r"jitter"),
        ({"batch_prioritized": 2}, "batch_prioritized must be true or false"),
    ],
)
def test_switch_config_errors(opts, match):
    with pytest.raises(RoutingError, match=match):
        build_router("switch", num_experts=4, **opts)


def test_switch_capacity_factor_defaults_to_one(make_batch):
    router = build_router("switch", num_experts=8)
    assert router.config.capacity_factor == 1.0
    plan = router.route(make_batch(torch.zeros(64, 8)))
    assert plan.capacity == 8 and plan.top_k == 1  # ceil(64 * 1 / 8 * 1.0); K = 1


def test_switch_aux_loss_by_hand(make_batch):
    # T = 2, E = 2: token 0 -> expert 0 (p = .73), token 1 -> expert 0 (p = .5 tie -> argmax 0).
    logits = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    plan = build_router("switch", num_experts=2).route(make_batch(logits))
    p = torch.softmax(logits, -1)
    mean_p = p.mean(0)
    expected = 2 / (1 * 2) * (2 * mean_p[0] + 0 * mean_p[1])
    torch.testing.assert_close(plan.aux_loss, expected)
    torch.testing.assert_close(plan.z_loss, torch.logsumexp(logits, -1).square().mean())


def test_aux_loss_is_one_at_perfect_balance(make_batch):
    # Uniform probabilities and an even assignment: the normalised aux loss is exactly 1.
    e = 4
    logits = torch.eye(e) * 1e-6
    plan = build_router("switch", num_experts=e).route(make_batch(logits))
    assert torch.bincount(plan.expert_R, minlength=e).tolist() == [1] * e
    assert abs(float(plan.aux_loss) - 1.0) < 1e-5
    plan_k = build_router("topk", num_experts=e, top_k=2).route(make_batch(logits))
    assert abs(float(plan_k.aux_loss) - 1.0) < 1e-5


@pytest.mark.parametrize("name", ["switch", "topk"])
def test_gates_are_differentiable(name, make_batch):
    logits = torch.randn(16, 5, generator=torch.Generator().manual_seed(0), requires_grad=True)
    b = make_batch(logits.detach())
    b.logits_TE = logits  # keep the graph
    plan = build_router(name, num_experts=5).route(b)
    (plan.weight_R * torch.arange(plan.num_requests)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    logits.grad = None
    plan = build_router(name, num_experts=5).route(b)
    plan.aux_loss.backward()
    assert logits.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------ topk


def test_topk_choices_and_gates(make_batch):
    logits = torch.randn(30, 7, generator=torch.Generator().manual_seed(5))
    plan = build_router("topk", num_experts=7, top_k=3).route(make_batch(logits))
    top_v, top_i = logits.topk(3, -1)
    assert plan.capacity is None  # dropless by default
    # Choice-major: all first choices in token order, then all second choices, then third.
    assert torch.equal(plan.token_R, torch.arange(30).repeat(3))
    assert torch.equal(plan.expert_R, top_i.t().reshape(-1))
    gates = torch.softmax(top_v, -1)  # softmax over the K logits only
    torch.testing.assert_close(plan.weight_R, gates.t().reshape(-1))
    torch.testing.assert_close(plan.weight_R.view(3, 30).sum(0), torch.ones(30))


def test_topk_choice_major_priority_drops_late_second_choices(make_batch):
    # Token 0's *second* choice is expert 1; tokens 1 and 2 pick expert 1 *first*. With C = 2
    # a choice-major order keeps both first choices and drops token 0's second choice, although
    # token 0 comes first in token order.
    logits = torch.tensor([[5.0, 4.0, 0.0, 0.0], [0.0, 5.0, 4.0, 0.0], [0.0, 5.0, 0.0, 4.0]])
    plan = build_router("topk", num_experts=4, top_k=2, capacity_factor=1.0).route(make_batch(logits))
    assert plan.capacity == 2  # ceil(1.0 * 2 * 3 / 4)
    kept = _kept(plan)
    on_e1 = plan.expert_R == 1
    assert sorted(plan.token_R[on_e1 & kept].tolist()) == [1, 2]
    assert plan.token_R[on_e1 & ~kept].tolist() == [0]


def test_topk_probs_policy_keeps_highest_gates(make_batch):
    # Expert 0 is everyone's first choice, with increasing confidence; C = 2 keeps the two tokens
    # with the highest gate under `probs`, the two earliest under `position`.
    logits = torch.tensor([[1.0, 0.0, -9.0], [2.0, 0.0, -9.0], [3.0, 0.0, -9.0], [4.0, 0.0, -9.0]])
    b = make_batch(logits)
    by_pos = build_router("topk", num_experts=3, top_k=1, capacity_factor=1.5).route(b)
    by_prob = build_router("topk", num_experts=3, top_k=1, capacity_factor=1.5, drop_policy="probs").route(b)
    assert by_pos.capacity == by_prob.capacity == 2
    assert sorted(by_pos.token_R[_kept(by_pos)].tolist()) == [0, 1]
    assert sorted(by_prob.token_R[_kept(by_prob)].tolist()) == [2, 3]


def test_topk_probs_policy_crosses_choices(make_batch):
    # Expert 1 is token 0's *second* choice with probability .475 and token 1's *first* choice
    # with probability .30. C = 1: choice-major keeps token 1, `probs` keeps token 0.
    logits = torch.tensor([[5.0, 4.9, -9.0, -9.0], [0.5, 1.0, 0.9, 0.8]])
    b = make_batch(logits)
    by_pos = build_router("topk", num_experts=4, top_k=2, capacity_factor=1.0).route(b)
    by_prob = build_router("topk", num_experts=4, top_k=2, capacity_factor=1.0, drop_policy="probs").route(b)
    assert by_pos.capacity == by_prob.capacity == 1
    assert by_pos.token_R[(by_pos.expert_R == 1) & _kept(by_pos)].tolist() == [1]
    assert by_prob.token_R[(by_prob.expert_R == 1) & _kept(by_prob)].tolist() == [0]
    probs = torch.softmax(logits, -1)[by_prob.token_R, by_prob.expert_R]
    assert torch.all(probs[:-1] >= probs[1:])  # the priority list is sorted by probability


def test_router_is_deterministic(make_batch):
    logits = torch.randn(100, 16, generator=torch.Generator().manual_seed(9))
    a = build_router("topk", num_experts=16, top_k=4, capacity_factor=1.0).route(make_batch(logits))
    b = build_router("topk", num_experts=16, top_k=4, capacity_factor=1.0).route(make_batch(logits))
    assert torch.equal(a.expert_R, b.expert_R) and torch.equal(a.token_R, b.token_R)


def test_k_equals_e_uses_every_expert(make_batch):
    logits = torch.randn(9, 5, generator=torch.Generator().manual_seed(3))
    plan = build_router("topk", num_experts=5, top_k=5).route(make_batch(logits))
    assert torch.bincount(plan.expert_R, minlength=5).tolist() == [9] * 5
