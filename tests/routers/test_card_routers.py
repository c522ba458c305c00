"""Every rule of DESIGN.md for the card's routers (gshard, expert_choice, hash, hierarchical,
dense) and for ``bench.layer``, each a test that fails if the rule breaks."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch
from click.testing import CliRunner
from torch.nn.functional import silu

from moe_routing_bench.bench.metrics import batch_metrics, load_stats
from moe_routing_bench.bench.moe_layer import layer_forward
from moe_routing_bench.bench.routing import route_batches, wants_fit
from moe_routing_bench.kernels.experts import ExpertFFN
from moe_routing_bench.kernels.positions import kept_mask, positions
from moe_routing_bench.routers.contract import Batch, RoutingError
from moe_routing_bench.routers.hashing import greedy_balanced_assignment, hash_experts, hash_experts_reference
from moe_routing_bench.routers.registry import build_router

CARD = ("gshard", "expert_choice", "hash", "hierarchical", "dense")


def _batch(t, e, seed=0, scale=1.0, hidden=None, vocab=1000):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, e, generator=gen) * scale
    tokens = torch.randint(0, vocab, (t,), generator=gen)
    hid = None if hidden is None else torch.randn(t, hidden, generator=gen)
    return Batch(logits_TE=logits, token_T=tokens, hidden_TD=hid)


def _kept(plan):
    return kept_mask(positions(plan.expert_R, plan.num_experts)[0], plan.capacity)


def _renormalised_top2(logits):
    top = torch.softmax(logits.float(), -1).topk(2, -1)
    return top.indices, top.values / top.values.sum(-1, keepdim=True)


# ---------------------------------------------------------------------------------------- gshard


def test_gshard_second_choice_kept_with_probability_2_g2():
    # P(U < 2 g2) = 2 g2 with g2 the *renormalised* second gate (<= 0.5). With E = 8 and scale 1.5
    # the raw softmax g2 is ~0.15 and the renormalised one ~0.35: the count tells them apart.
    t = 40_000
    batch = _batch(t, 8, seed=1, scale=1.5)
    plan = build_router("gshard", num_experts=8, capacity_factor=None, seed=3).route(batch)
    _, gate = _renormalised_top2(batch.logits_TE)
    p_T = (2 * gate[:, 1]).double()
    kept = plan.num_requests - t
    mean, sd = float(p_T.sum()), math.sqrt(float((p_T * (1 - p_T)).sum()))
    assert abs(kept - mean) < 4 * sd, (kept, mean, sd)
    # The kept second choices favour tokens with a large g2: their mean g2 exceeds the overall one.
    second_tokens = plan.token_R[t:]
    assert gate[second_tokens, 1].mean() > gate[:, 1].mean() + 0.02


def test_gshard_skipped_second_choice_is_not_requested_nor_dropped():
    t = 2000
    batch = _batch(t, 16, seed=2)
    plan = build_router("gshard", num_experts=16, capacity_factor=None).route(batch)
    expert_T2, _ = _renormalised_top2(batch.logits_TE)
    n_second = plan.num_requests - t
    assert 0 < n_second < t  # some second choices were skipped, some kept
    # Every token is requested once or twice: first choice always, second only when kept.
    per_token = torch.bincount(plan.token_R, minlength=t)
    assert per_token.min() == 1 and per_token.max() == 2 and int((per_token == 2).sum()) == n_second
    metrics, _ = batch_metrics(plan)
    assert metrics["drop_rate"] == 0.0 and metrics["tokens_dropped_frac"] == 0.0
    assert metrics["gate_mass_kept"] == 1.0
    # With a capacity, the drop rate's denominator is the requests (T + kept seconds), not 2T.
    capped = build_router("gshard", num_experts=16, capacity_factor=0.5).route(batch)
    assert capped.num_requests == plan.num_requests  # same seed, same draws
    kept = int(_kept(capped).sum())
    metrics, _ = batch_metrics(capped)
    assert metrics["drop_rate"] == pytest.approx(1 - kept / (t + n_second))
    assert torch.equal(plan.expert_R[:t], expert_T2[:, 0])


def test_gshard_always_policy_keeps_every_second_choice():
    batch = _batch(300, 6, seed=4)
    plan = build_router("gshard", num_experts=6, second_policy="always", capacity_factor=None).route(batch)
    expert_T2, gate_T2 = _renormalised_top2(batch.logits_TE)
    assert torch.equal(plan.token_R, torch.arange(300).repeat(2))
    assert torch.equal(plan.expert_R, expert_T2.t().reshape(-1))
    torch.testing.assert_close(plan.weight_R, gate_T2.t().reshape(-1))


def test_gshard_gates_are_renormalised_over_the_pair():
    t = 500
    batch = _batch(t, 8, seed=5)
    plan = build_router("gshard", num_experts=8, capacity_factor=None).route(batch)
    _, gate_T2 = _renormalised_top2(batch.logits_TE)
    torch.testing.assert_close(plan.weight_R[:t], gate_T2[:, 0])
    second = plan.token_R[t:]
    pair_sum = plan.weight_R[:t][second] + plan.weight_R[t:]
    torch.testing.assert_close(pair_sum, torch.ones_like(pair_sum))  # g1/(g1+g2) + g2/(g1+g2)
    # A token whose second choice was skipped keeps g1 / (g1 + g2) < 1: no second renormalisation.
    alone = torch.ones(t, dtype=torch.bool)
    alone[second] = False
    assert alone.any() and (plan.weight_R[:t][alone] < 1).all()


def test_gshard_choice_major_priority():
    # Token 0's *second* choice is expert 1, which tokens 1 and 2 pick *first*. C = 2 keeps
    # tokens 1 and 2 on expert 1 and drops token 0's second choice, although token 0 comes first.
    logits = torch.tensor([[5.0, 4.9, 0.0, 0.0], [0.0, 5.0, 4.9, 0.0], [0.0, 5.0, 0.0, 4.9]])
    batch = Batch(logits_TE=logits, token_T=torch.arange(3))
    plan = build_router("gshard", num_experts=4, second_policy="always", capacity_factor=1.25).route(batch)
    assert plan.capacity == 2  # ceil(1.25 * 2 * 3 / 4)
    kept = _kept(plan)
    on_e1 = plan.expert_R == 1
    assert sorted(plan.token_R[on_e1 & kept].tolist()) == [1, 2]
    assert plan.token_R[on_e1 & ~kept].tolist() == [0]
    # Random policy: first choices in token order, then the surviving seconds in token order.
    plan = build_router("gshard", num_experts=8).route(_batch(400, 8, seed=6))
    assert torch.equal(plan.token_R[:400], torch.arange(400))
    assert (plan.token_R[400:].diff() > 0).all()


def test_gshard_defaults_and_validation():
    plan = build_router("gshard", num_experts=16).route(_batch(1000, 16))
    assert plan.capacity == 125 and plan.top_k == 2  # GShard's 2T/E at cf = 1
    with pytest.raises(RoutingError, match="top_k must be 2"):
        build_router("gshard", num_experts=8, top_k=1)
    with pytest.raises(RoutingError, match="second_policy must be one of 'random', 'always'"):
        build_router("gshard", num_experts=8, second_policy="sometimes")


# --------------------------------------------------------------------------------- expert_choice


def test_expert_choice_each_expert_takes_its_top_c_tokens_by_softmax_score():
    t, e, k = 200, 8, 2
    batch = _batch(t, e, seed=7)
    plan = build_router("expert_choice", num_experts=e, top_k=k, capacity_factor=1.25).route(batch)
    c = math.ceil(1.25 * k * t / e)
    assert plan.capacity == c and plan.top_k == k
    assert torch.bincount(plan.expert_R, minlength=e).tolist() == [c] * e
    assert bool(_kept(plan).all())  # positions keeps exactly the chosen tokens
    probs = torch.softmax(batch.logits_TE, -1)
    torch.testing.assert_close(plan.weight_R, probs[plan.token_R, plan.expert_R])  # gate = score
    # Expert-major; inside each expert, the top-C scores in descending order.
    assert torch.equal(plan.expert_R, torch.arange(e).repeat_interleave(c))
    w_EC = plan.weight_R.view(e, c)
    torch.testing.assert_close(w_EC, probs.t().topk(c, -1).values)
    assert (w_EC.diff(dim=1) <= 0).all()


def test_expert_choice_tokens_get_zero_to_e_experts_and_no_drop_rate():
    t, e = 64, 8
    # K = 1: one expert per token on average, so some tokens get none and others several.
    plan = build_router("expert_choice", num_experts=e, top_k=1).route(_batch(t, e, seed=8, scale=2.0))
    per_token = torch.bincount(plan.token_R, minlength=t)
    assert (per_token == 0).any() and (per_token >= 2).any()
    metrics, _ = batch_metrics(plan)
    assert math.isnan(metrics["drop_rate"])
    assert metrics["tokens_dropped_frac"] == pytest.approx(float((per_token == 0).float().mean()))
    assert plan.looks_at_whole_batch and plan.aux_loss is None and plan.z_loss is not None
    assert metrics["imbalance"] == 1.0


def test_expert_choice_capacity_clamped_to_t_and_required():
    # C = ceil(4 * 2 * 4 / 2) = 16 > T = 4: clamped, each expert takes every token.
    plan = build_router("expert_choice", num_experts=2, capacity_factor=4.0).route(_batch(4, 2))
    assert plan.capacity == 4 and torch.bincount(plan.token_R).tolist() == [2, 2, 2, 2]
    with pytest.raises(RoutingError, match="capacity_factor must be a number > 0"):
        build_router("expert_choice", num_experts=4, capacity_factor=None)


# ------------------------------------------------------------------------------------------ hash


def test_hash_map_matches_the_plain_integer_reference():
    ids = [0, 1, 2, 7, 255, 50_000, 199_999, 2**31 + 5, 2**40 + 123, 2**62 + 9]
    got = hash_experts(torch.tensor(ids), seed=11, num_experts=13).tolist()
    assert got == [hash_experts_reference(i, 11, 13) for i in ids]


def test_hash_is_the_same_map_across_instances_and_processes_and_seeded():
    ids = torch.arange(5000)
    batch = Batch(logits_TE=torch.zeros(5000, 16), token_T=ids)
    a = build_router("hash", num_experts=16, seed=5).route(batch).expert_R
    b = build_router("hash", num_experts=16, seed=5).route(batch).expert_R
    assert torch.equal(a, b)
    code = (
        "import torch, json; from routers.hashing import hash_experts; "
        "print(json.dumps(hash_experts(torch.arange(5000), 5, 16).tolist()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout) == a.tolist()
    other = build_router("hash", num_experts=16, seed=6).route(batch).expert_R
    agree = float((a == other).float().mean())
    assert abs(agree - 1 / 16) < 0.03  # an unrelated map: agreement at chance
    # A random map: loads of 5000 distinct ids over 16 experts are near even.
    assert load_stats(torch.bincount(a, minlength=16))["imbalance"] < 1.2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hash_uses_every_expert_at_e64(seed):
    # 20000 distinct ids over 64 experts: about 312 each (sd 18). A map that never reaches one
    # expert (an off-by-one modulus, a biased bit) leaves it unused, which imbalance alone at this
    # size would not show (one empty expert moves max/mean by about 1.6%).
    ids = torch.arange(20_000) * 7919 + seed
    load_E = torch.bincount(hash_experts(ids, seed, 64), minlength=64)
    assert int((load_E == 0).sum()) == 0
    assert int(load_E.min()) > 312 - 6 * 18 and int(load_E.max()) < 312 + 6 * 18, load_E.tolist()


def test_hash_ignores_logits_gate_is_one_and_dropless():
    tokens = torch.randint(0, 100, (300,), generator=torch.Generator().manual_seed(0))
    r = build_router("hash", num_experts=8)
    p1 = r.route(Batch(logits_TE=torch.randn(300, 8), token_T=tokens))
    p2 = r.route(Batch(logits_TE=torch.randn(300, 8) * 10, token_T=tokens))
    assert torch.equal(p1.expert_R, p2.expert_R)
    assert torch.equal(p1.token_R, torch.arange(300))
    assert torch.equal(p1.weight_R, torch.ones(300)) and not p1.weight_R.requires_grad
    assert p1.capacity is None and p1.top_k == 1
    # The same id always lands on the same expert.
    for tok in tokens.unique()[:10]:
        assert p1.expert_R[tokens == tok].unique().numel() == 1


def test_greedy_assignment_most_frequent_first_to_least_loaded():
    # 5 -> e0 (5), 3 -> e1 (3), 3 -> e1 (6), 2 -> e0 (7), 1 -> e1 (7); ties: lowest expert index.
    assert greedy_balanced_assignment(torch.tensor([5, 3, 3, 2, 1]), 2).tolist() == [0, 1, 1, 0, 1]
    assert greedy_balanced_assignment(torch.tensor([1, 1, 1]), 3).tolist() == [0, 1, 2]
    # Order of ids is not the order of frequencies: id 2 is the most frequent.
    assert greedy_balanced_assignment(torch.tensor([1, 2, 9]), 2).tolist() == [1, 1, 0]


def _zipf(n, vocab, gen):
    p = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    return torch.multinomial(p / p.sum(), n, replacement=True, generator=gen)


def test_hash_balanced_fit_on_one_slice_balances_another():
    # Zipf(1) over 20k ids: the top id is 9.5% of the stream, below 1/E = 12.5% at E = 8, so a
    # balanced assignment is possible. Fit on one slice, measure on a different one.
    e = 8
    gen = torch.Generator().manual_seed(0)
    fit_slice, measured = _zipf(100_000, 20_000, gen), _zipf(100_000, 20_000, gen)
    as_batch = lambda tok: Batch(logits_TE=torch.zeros(tok.shape[0], e), token_T=tok)
    balanced = build_router("hash", num_experts=e, variant="balanced")
    with pytest.raises(RoutingError, match=r"fit.*separate slice"):
        balanced.route(as_batch(measured))
    assert wants_fit(balanced)
    res = route_batches(balanced, [as_batch(measured)], fit_sample=as_batch(fit_slice))
    imb_balanced = res.summary["imbalance"][0]
    imb_random = load_stats(
        torch.bincount(build_router("hash", num_experts=e).route(as_batch(measured)).expert_R, minlength=e)
    )["imbalance"]
    assert imb_balanced < 1.10, imb_balanced  # measured 1.016
    assert imb_random > 1.3 and imb_random > imb_balanced + 0.25, imb_random  # measured 1.65


def test_hash_balanced_unseen_ids_fall_back_to_the_random_map():
    r = build_router("hash", num_experts=4, variant="balanced", seed=2)
    r.fit(Batch(logits_TE=torch.zeros(6, 4), token_T=torch.tensor([10, 10, 10, 20, 20, 30])))
    tokens = torch.tensor([10, 20, 30, 40, 999])
    got = r.route(Batch(logits_TE=torch.zeros(5, 4), token_T=tokens)).expert_R.tolist()
    assert got[:3] == [0, 1, 2]  # most frequent first, each to the least-loaded expert
    assert got[3:] == hash_experts(tokens[3:], 2, 4).tolist()


def test_hash_balanced_fit_balances_a_200k_vocabulary_exactly():
    # Every id of a 200k vocabulary seen twice: equal frequencies, so the greedy assignment gives
    # each of the 64 experts exactly 200000 / 64 = 3125 ids (6250 requests), none unused.
    tokens = torch.randperm(200_000, generator=torch.Generator().manual_seed(0)).repeat(2)
    r = build_router("hash", num_experts=64, variant="balanced")
    batch = Batch(logits_TE=torch.zeros(tokens.shape[0], 1).expand(-1, 64), token_T=tokens)
    r.fit(batch)
    load_E = torch.bincount(r.route(batch).expert_R, minlength=64)
    assert load_E.tolist() == [6250] * 64


# ------------------------------------------------------------------------------ hierarchical: nllb


def test_nllb_layer_is_shared_and_moe_mixed_by_the_sigmoid_gate():
    t, e, d = 40, 6, 8
    batch = _batch(t, e, seed=9, hidden=d)
    router = build_router("hierarchical", form="nllb", num_experts=e, capacity_factor=1.0, seed=4)
    plan = router.route(batch)
    g_T = torch.sigmoid(batch.hidden_TD @ router.gate_weight(d, torch.device("cpu")))
    torch.testing.assert_close(plan.extras["shared_weight_T"], 1 - g_T)
    # Level 2 is gshard with the same seed: same requests, gates scaled by g.
    inner = build_router("gshard", num_experts=e, capacity_factor=1.0, seed=4).route(batch)
    assert torch.equal(plan.token_R, inner.token_R) and torch.equal(plan.expert_R, inner.expert_R)
    torch.testing.assert_close(plan.weight_R, g_T[inner.token_R] * inner.weight_R)
    ffn, shared = ExpertFFN(e, d, seed=1), ExpertFFN(1, d, seed=2)
    out = layer_forward(plan, batch.hidden_TD, ffn, shared_ffn=shared)
    moe = layer_forward(inner, batch.hidden_TD, ffn)
    x = batch.hidden_TD
    shared_out = (silu(x @ shared.w_gate[0]) * (x @ shared.w_up[0])) @ shared.w_down[0]
    expected = (1 - g_T)[:, None] * shared_out + g_T[:, None] * moe
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="shared_ffn"):
        layer_forward(plan, batch.hidden_TD, ffn)


def test_nllb_logit_column_mode_and_its_width():
    t, e = 30, 4
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(t, e + 1, generator=gen)
    batch = Batch(logits_TE=logits, token_T=torch.arange(t))
    router = build_router(
        "hierarchical", form="nllb", gate_source="logit_column", num_experts=e, second_policy="always"
    )
    plan = router.route(batch)
    g_T = torch.sigmoid(logits[:, e])
    torch.testing.assert_close(plan.extras["shared_weight_T"], 1 - g_T)
    expert_T2, gate_T2 = _renormalised_top2(logits[:, :e])
    assert torch.equal(plan.expert_R, expert_T2.t().reshape(-1))
    torch.testing.assert_close(plan.weight_R, (g_T[:, None] * gate_T2).t().reshape(-1))
    with pytest.raises(RoutingError, match="num_experts \\+ 1 = 5 columns"):
        router.route(Batch(logits_TE=logits[:, :e], token_T=torch.arange(t)))


def test_nllb_hidden_gate_needs_hidden_states_and_is_differentiable():
    router = build_router("hierarchical", form="nllb", num_experts=4)
    with pytest.raises(RoutingError, match="hidden_TD"):
        router.route(_batch(10, 4))
    batch = _batch(10, 4, hidden=6)
    batch.hidden_TD.requires_grad_(True)
    batch.logits_TE.requires_grad_(True)
    plan = router.route(batch)
    (plan.extras["shared_weight_T"].sum() + plan.weight_R.sum()).backward()
    assert batch.hidden_TD.grad.abs().sum() > 0 and batch.logits_TE.grad.abs().sum() > 0
    again = build_router("hierarchical", form="nllb", num_experts=4).gate_weight(6, torch.device("cpu"))
    assert torch.equal(router.gate_weight(6, torch.device("cpu")), again)  # a function of (seed, D)
    with pytest.raises(RoutingError, match="top_k must be 2"):
        build_router("hierarchical", form="nllb", num_experts=8, top_k=3)


def test_layer_times_the_shared_stage():
    t, e, d = 12, 4, 8
    batch = _batch(t, e, hidden=d)
    plan = build_router("hierarchical", form="nllb", num_experts=e).route(batch)
    seen = []

    @contextmanager
    def hook(stage):
        seen.append(stage)
        yield

    layer_forward(plan, batch.hidden_TD, ExpertFFN(e, d), shared_ffn=ExpertFFN(1, d), stage_hook=hook)
    # 'dispatch' twice: positions and row bookkeeping, then permute (a timer adds the two).
    assert seen == ["dispatch", "dispatch", "experts", "combine", "shared"]


# ---------------------------------------------------------------------------- hierarchical: groups


def _kept_groups(scores, g, topk_group):
    """Reference group selection by a loop: group score = sum of its two largest scores."""
    p = scores.shape[1] // g
    out = []
    for row in scores.tolist():
        group_scores = [sum(sorted(row[i * p : (i + 1) * p], reverse=True)[:2]) for i in range(g)]
        out.append(set(sorted(range(g), key=lambda i: -group_scores[i])[:topk_group]))
    return out


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_groups_choose_only_inside_the_kept_groups(score_func):
    e, g, tg, k = 16, 4, 2, 3
    router = build_router("hierarchical", num_experts=e, num_groups=g, topk_group=tg, top_k=k, score_func=score_func)
    for seed in range(30):
        batch = _batch(32, e, seed=seed, scale=2.0)
        plan = router.route(batch)
        expert_TK = plan.expert_R.view(k, -1).t()
        logits = batch.logits_TE
        scores = torch.sigmoid(logits) if score_func == "sigmoid" else torch.softmax(logits, -1)
        allowed = _kept_groups(scores, g, tg)
        mask = torch.zeros(32, e, dtype=torch.bool)
        for ti, groups in enumerate(allowed):
            for gi in groups:
                mask[ti, gi * 4 : gi * 4 + 4] = True
            assert {int(x) // 4 for x in expert_TK[ti]} <= groups
        # ... and they are the top-K experts among the kept groups' experts.
        best = scores.masked_fill(~mask, -1).topk(k, -1).indices
        assert torch.equal(expert_TK.sort(-1).values, best.sort(-1).values)


def test_group_score_is_the_sum_of_the_top_two():
    # Two groups of three. Token 0: group A [3, -5, -5] has the best expert (top-1 would pick A)
    # but group B [1, 1, 1] has the larger top-2 sum. Token 1: group A [2, 2, -9] has the larger
    # top-2 sum, while the sum over all three would pick B.
    logits = torch.tensor([[3.0, -5.0, -5.0, 1.0, 1.0, 1.0], [2.0, 2.0, -9.0, 1.0, 1.0, 1.0]])
    router = build_router("hierarchical", num_experts=6, num_groups=2, topk_group=1, top_k=1)
    plan = router.route(Batch(logits_TE=logits, token_T=torch.arange(2)))
    assert plan.expert_R[0] >= 3 and plan.expert_R[1] < 3
    # One expert per group: the group score is that expert's score; the choice is plain top-K.
    batch = _batch(50, 8, seed=1)
    one = build_router("hierarchical", num_experts=8, num_groups=8, topk_group=3, top_k=3).route(batch)
    top = batch.logits_TE.topk(3, -1).indices
    assert torch.equal(one.expert_R.view(3, -1).t().sort(-1).values, top.sort(-1).values)


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_groups_gates_score_func_and_norm_topk_prob(score_func):
    batch = _batch(40, 8, seed=2)
    opts = {"num_experts": 8, "num_groups": 4, "topk_group": 2, "top_k": 2, "score_func": score_func}
    raw = build_router("hierarchical", norm_topk_prob=False, **opts).route(batch)
    normed = build_router("hierarchical", **opts).route(batch)
    logits = batch.logits_TE
    scores = torch.sigmoid(logits) if score_func == "sigmoid" else torch.softmax(logits, -1)
    torch.testing.assert_close(raw.weight_R, scores[raw.token_R, raw.expert_R])  # the chosen scores
    assert torch.equal(raw.expert_R, normed.expert_R)
    w_KT = normed.weight_R.view(2, -1)
    torch.testing.assert_close(w_KT.sum(0), torch.ones(40))
    torch.testing.assert_close(w_KT, raw.weight_R.view(2, -1) / raw.weight_R.view(2, -1).sum(0))
    # aux loss: P_e is the mean of per-token-normalised scores; R_e the requested load.
    p_E = (scores / scores.sum(-1, keepdim=True)).mean(0)
    r_E = torch.bincount(raw.expert_R, minlength=8).float()
    torch.testing.assert_close(raw.aux_loss, 8 / (2 * 40) * (r_E * p_E).sum())
    assert raw.capacity is None and raw.token_R[:40].tolist() == list(range(40))


def test_groups_validation_names_the_field():
    with pytest.raises(RoutingError, match="num_groups must be a divisor of num_experts = 10"):
        build_router("hierarchical", num_experts=10, num_groups=4)
    with pytest.raises(RoutingError, match="topk_group must be an integer between 1 and num_groups = 4"):
        build_router("hierarchical", num_experts=8, topk_group=5)
    with pytest.raises(RoutingError, match="top_k must be <= topk_group"):
        build_router("hierarchical", num_experts=8, num_groups=4, topk_group=1, top_k=3)
    with pytest.raises(RoutingError, match="form must be one of 'nllb', 'groups'"):
        build_router("hierarchical", form="tree")


# ----------------------------------------------------------------------------------------- dense


def test_dense_layer_is_the_softmax_weighted_sum_over_every_expert():
    t, e, d = 20, 5, 6
    batch = _batch(t, e, seed=3, hidden=d)
    plan = build_router("dense", num_experts=e).route(batch)
    assert plan.top_k == e and plan.capacity is None and plan.num_requests == t * e
    ffn = ExpertFFN(e, d, seed=5)
    out = layer_forward(plan, batch.hidden_TD, ffn)
    probs = torch.softmax(batch.logits_TE, -1)
    x = batch.hidden_TD
    expected = torch.zeros(t, d)
    for i in range(e):
        expected += probs[:, i : i + 1] * ((silu(x @ ffn.w_gate[i]) * (x @ ffn.w_up[i])) @ ffn.w_down[i])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert float(plan.aux_loss) == pytest.approx(1.0)


def test_dense_top_k_is_every_expert():
    assert build_router("dense", num_experts=12).config.top_k == 12
    assert build_router("dense", num_experts=12, top_k=12).config.top_k == 12
    with pytest.raises(RoutingError, match="top_k must be unset or num_experts = 12"):
        build_router("dense", num_experts=12, top_k=2)


# ------------------------------------------------------------------------------ every card router


def _card_options(name):
    return {"hierarchical": {"form": "nllb"}}.get(name, {})


@pytest.mark.parametrize("name", CARD)
def test_card_router_is_deterministic_given_its_seed(name):
    batches = [_batch(64, 8, seed=s, hidden=4) for s in range(3)]
    a = build_router(name, num_experts=8, seed=1, **_card_options(name))
    b = build_router(name, num_experts=8, seed=1, **_card_options(name))
    for batch in batches:
        pa, pb = a.route(batch), b.route(batch)
        assert torch.equal(pa.token_R, pb.token_R) and torch.equal(pa.expert_R, pb.expert_R)
        assert torch.equal(pa.weight_R, pb.weight_R)


@pytest.mark.parametrize("name", [n for n in CARD if n != "hash"])
def test_card_router_gates_are_differentiable(name):
    batch = _batch(32, 8, seed=4, hidden=4)
    batch.logits_TE.requires_grad_(True)
    plan = build_router(name, num_experts=8, **_card_options(name)).route(batch)
    (plan.weight_R * torch.linspace(0.5, 1.5, plan.num_requests)).sum().backward()
    assert batch.logits_TE.grad is not None and batch.logits_TE.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("name", "opts"),
    [(n, _card_options(n)) for n in CARD if n != "hash"] + [("hierarchical", {"score_func": "softmax"})],
)
def test_card_router_z_loss_is_mean_squared_logsumexp(name, opts):
    # The routers take the logsumexp from the softmax's largest entry (x_max - log p_max): it must
    # agree with torch.logsumexp, also for large and very peaked logits.
    batch = _batch(200, 8, seed=5, scale=30.0, hidden=4)
    plan = build_router(name, num_experts=8, **opts).route(batch)
    expected = torch.logsumexp(batch.logits_TE, -1).square().mean()
    torch.testing.assert_close(plan.z_loss, expected, rtol=1e-5, atol=0)


def test_cli_lists_and_routes_every_card_router_with_defaults():
    from moe_routing_bench.bench.cli import main

    res = CliRunner().invoke(main, ["list", "routers"], catch_exceptions=False)
    assert res.exit_code == 0
    listed = {line.split()[0] for line in res.output.splitlines() if line.strip()}
    assert {"switch", "topk", *CARD} <= listed
    for e in ("16", "64"):
        res = CliRunner().invoke(
            main, ["route", "--router", "all", "-T", "512", "-E", e, "-B", "2"], catch_exceptions=False
        )
        assert res.exit_code == 0, res.output
        for name in CARD:
            assert f"{name}: T=512 E={e}" in res.output


def test_gshard_aux_loss_uses_requests_per_token_and_is_one_at_balance(make_batch):
    # iid logits: a near-even requested load, so the normalised aux loss is close to 1.0 although
    # random routing skipped many second choices (K = R / T, not 2, which would give about 0.8).
    e, t = 4, 4000
    logits = torch.randn(t, e, generator=torch.Generator().manual_seed(0))
    plan = build_router("gshard", num_experts=e, capacity_factor=None, seed=1).route(make_batch(logits))
    r = plan.num_requests
    assert t < r < 2 * t  # some second choices were skipped
    load = torch.bincount(plan.expert_R, minlength=e).double()
    p_mean = torch.softmax(logits, -1).mean(0).double()
    torch.testing.assert_close(plan.aux_loss.double(), e / r * (load * p_mean).sum(), rtol=1e-5, atol=1e-6)
    assert abs(float(plan.aux_loss) - 1.0) < 0.05


def test_nllb_level1_gate_weight_is_seeded_normal_with_variance_one_over_d():
    for seed, d in [(0, 6), (3, 64)]:
        got = build_router("hierarchical", form="nllb", num_experts=4, seed=seed).gate_weight(d, torch.device("cpu"))
        want = torch.randn(d, generator=torch.Generator().manual_seed(seed * 1_000_003 + d)) / d**0.5
        assert torch.equal(got, want)


def test_sigmoid_share_mean_by_hand_with_an_underflowing_row():
    from moe_routing_bench.routers.hierarchical import sigmoid_share_mean

    # Row 1's sigmoids all underflow in float32; float64 still holds them, so the ratio is exact.
    logits = torch.tensor([[0.5, -1.0, 2.0], [-110.0, -105.0, -108.0], [-120.0, -121.0, -100.0]])
    scores = torch.sigmoid(logits)
    assert scores[1].sum() < 1e-30 and scores[2].sum() < 1e-30
    s64 = torch.sigmoid(logits.double())
    want = (s64 / s64.sum(-1, keepdim=True)).mean(0)
    torch.testing.assert_close(sigmoid_share_mean(logits, scores).double(), want, rtol=1e-5, atol=1e-7)
    # and its gradient is finite through both branches
    x = logits.clone().requires_grad_(True)
    sigmoid_share_mean(x, torch.sigmoid(x)).pow(2).sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize(
    ("opts", "match"),
    [
        (
            {"top_k": 9},
            r"top_k must be <= topk_group \* num_experts / num_groups = 8, the experts in the kept "
            r"groups \(got 9\)",
        ),
        ({"num_groups": 0}, r"num_groups must be a divisor of num_experts = 16 \(got 0\)"),
        ({"num_groups": 3}, r"num_groups must be a divisor of num_experts = 16 \(got 3\)"),
        ({"topk_group": 0}, r"topk_group must be an integer between 1 and num_groups = 4 \(got 0\)"),
        ({"topk_group": 5}, r"topk_group must be an integer between 1 and num_groups = 4 \(got 5\)"),
        ({"topk_group": True}, r"topk_group must be an integer between 1 and num_groups = 4 \(got True\)"),
        ({"num_groups": True}, r"num_groups must be a divisor of num_experts = 16 \(got True\)"),
    ],
)
def test_hierarchical_groups_config_errors(opts, match):
    with pytest.raises(RoutingError, match=match):
        build_router("hierarchical", **{"num_experts": 16, "num_groups": 4, "topk_group": 2, **opts})


@pytest.mark.parametrize("opts", [{"num_groups": 1, "topk_group": 1}, {"num_groups": 4, "topk_group": 4}])
def test_hierarchical_groups_edges_are_plain_topk(make_batch, opts):
    # One group, or every group kept: the group limit removes nothing, so top-K of the scores.
    logits = torch.randn(12, 16, generator=torch.Generator().manual_seed(4))
    plan = build_router("hierarchical", num_experts=16, top_k=3, **opts).route(make_batch(logits))
    want = torch.sigmoid(logits).topk(3, dim=-1).indices
    assert plan.expert_R.tolist() == want.t().reshape(-1).tolist()


def test_group_limited_topk_by_hand_with_three_experts_per_group():
    from moe_routing_bench.routers.hierarchical import group_limited_topk

    # E = 6, two groups of P = 3 (not a power of two: expert = group * P + local, an addition).
    scores = torch.tensor([[0.1, 0.2, 0.3, 0.9, 0.8, 0.0], [0.5, 0.6, 0.1, 0.0, 0.4, 0.3]])
    # row 0: group sums of top-2: g0 = .5, g1 = 1.7 -> keep g1 -> experts 3, 4
    # row 1: g0 = 1.1, g1 = .7 -> keep g0 -> experts 1, 0
    assert group_limited_topk(scores, 2, 1, 2).tolist() == [[3, 4], [1, 0]]
    # both groups kept: the best experts overall, expert ids from both groups
    assert group_limited_topk(scores, 2, 2, 3).tolist() == [[3, 4, 2], [1, 0, 4]]


def test_hierarchical_needs_hidden_only_for_nllb_with_its_own_gate():
    assert build_router("hierarchical", num_experts=8).needs_hidden is False  # groups (gate_source ignored)
    assert build_router("hierarchical", num_experts=8, gate_source="logit_column").needs_hidden is False
    assert build_router("hierarchical", form="nllb", num_experts=8).needs_hidden is True
    nllb_col = build_router("hierarchical", form="nllb", num_experts=8, gate_source="logit_column")
    assert nllb_col.needs_hidden is False


def test_hierarchical_logit_column_wants_exactly_e_plus_one_columns(make_batch):
    router = build_router("hierarchical", form="nllb", num_experts=5, gate_source="logit_column")
    for cols in (5, 7):
        with pytest.raises(RoutingError, match=rf"num_experts \+ 1 = 6 columns, the last being .* \(got {cols}\)"):
            router.route(make_batch(torch.zeros(3, cols)))
    plan = router.route(make_batch(torch.randn(3, 6, generator=torch.Generator().manual_seed(0))))
    assert plan.top_k == 2 and plan.num_experts == 5
    # the groups form ignores gate_source: E columns route
    groups = build_router("hierarchical", num_experts=8, gate_source="logit_column")
    assert groups.route(make_batch(torch.zeros(3, 8))).num_experts == 8


def test_hierarchical_defaults_are_deepseek_like():
    cfg = build_router("hierarchical", num_experts=8).config
    assert (cfg.form, cfg.score_func, cfg.num_groups, cfg.topk_group, cfg.top_k) == ("groups", "sigmoid", 4, 2, 2)
    assert (cfg.norm_topk_prob, cfg.capacity_factor) == (True, None)


def test_hash_is_splitmix64_on_its_published_first_output():
    # splitmix64 seeded with 0 first returns 0xE220A8397B1DCDAF (Steele, Lea and Flood 2014;
    # the vector xoshiro's authors publish): id 0 with seed 0 is that state. The hash keeps the top
    # 63 bits, so with E above 2**62 nothing is folded away.
    first = 0xE220A8397B1DCDAF
    assert hash_experts_reference(0, 0, 1 << 63) == first >> 1
    e = (1 << 62) + 1
    assert hash_experts(torch.tensor([0]), 0, e).item() == (first >> 1) % e


def test_as_int64_wraps_at_two_to_the_63():
    from moe_routing_bench.routers.hashing import _as_int64

    assert _as_int64((1 << 63) - 1) == (1 << 63) - 1
    assert _as_int64(1 << 63) == -(1 << 63)
    assert _as_int64((1 << 64) - 1) == -1
    assert _as_int64((1 << 64) + 5) == 5


@pytest.mark.parametrize("k", [1, 3])
def test_hierarchical_nllb_takes_top_two_only(k):
    with pytest.raises(
        RoutingError, match=rf"form 'nllb' runs GShard top-2 in its MoE branch: top_k must be 2 \(got {k}\)"
    ):
        build_router("hierarchical", form="nllb", num_experts=8, top_k=k)
