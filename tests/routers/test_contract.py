"""The capacity formula, batch validation and config validation."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from moe_routing_bench.routers.contract import Batch, Plan, RoutingError, capacity
from moe_routing_bench.routers.registry import build_router


@pytest.mark.parametrize(
    ("cf", "k", "t", "e", "expected"),
    [
        (1.0, 1, 4096, 64, 64),
        (1.25, 1, 4096, 64, 80),
        (1.25, 2, 4096, 64, 160),
        # 1.1 * 100 / 10 is 11.000000000000002 in floats: ceil would give 12; exactly it is 11.
        (1.1, 1, 100, 10, 11),
        (1.1, 1, 100, 2, 55),  # floats: 55.00000000000001 -> 56
        (1.1, 8, 100, 10, 88),  # floats: 88.00000000000001 -> 89
        (0.7, 3, 10, 1, 10),  # 21 clamped to T
        (0.01, 1, 100, 64, 1),  # clamped up to 1
        (8.0, 1, 100, 2, 100),  # clamped down to T
        (1.0, 2, 3, 4, 2),  # ceil(6 / 4)
    ],
)
def test_capacity_exact(cf, k, t, e, expected):
    assert capacity(cf, t, e, k) == expected
    # The same figure from exact rationals, independent of the implementation.
    assert expected == min(max(math.ceil(Fraction(str(cf)) * k * t / e), 1), t)


def test_float_rounding_cases_really_differ():
    # Guards the cases above: the naive float formula gives a different answer here.
    assert math.ceil(1.1 * 1 * 100 / 10) == 12
    assert math.ceil(1.1 * 8 * 100 / 10) == 89
    assert capacity(1.1, 100, 10) == 11


# Fractional parts on both sides of one half, none of them hidden by the clamp to [1, T]: ceil
# takes every one up; round-half-up, round-half-even, floor or truncation each get some wrong.
@pytest.mark.parametrize(
    ("cf", "k", "t", "e", "exact", "expected"),
    [
        (1.0, 1, 100, 8, Fraction(25, 2), 13),  # 12.5: half (round-half-even gives 12)
        (1.0, 1, 100, 7, Fraction(100, 7), 15),  # 14.29: below one half (rounding gives 14)
        (1.0, 1, 100, 6, Fraction(50, 3), 17),  # 16.67: above one half
        (1.0, 1, 1000, 64, Fraction(125, 8), 16),  # 15.625
        (1.25, 2, 100, 16, Fraction(125, 8), 16),  # 15.625
        (1.0, 1, 130, 8, Fraction(65, 4), 17),  # 16.25: below one half
        (1.0, 1, 101, 10, Fraction(101, 10), 11),  # 10.1: just above an integer
        (1.0, 1, 99, 10, Fraction(99, 10), 10),  # 9.9: just below one
        (1.5, 1, 9, 2, Fraction(27, 4), 7),  # 6.75
        (1.0, 1, 13, 2, Fraction(13, 2), 7),  # 6.5 (round-half-even gives 6)
        (1.0, 1, 11, 2, Fraction(11, 2), 6),  # 5.5 (round-half-even gives 6 too: paired with 6.5)
    ],
)
def test_capacity_takes_every_fraction_up(cf, k, t, e, exact, expected):
    assert Fraction(str(cf)) * k * t / e == exact and 1 < exact < t and exact.denominator > 1
    assert capacity(cf, t, e, k) == expected == math.ceil(exact)


def test_the_fraction_table_tells_the_roundings_apart():
    # Each plausible wrong rounding gets at least one row of the table above wrong.
    rows = [(Fraction(25, 2), 13), (Fraction(100, 7), 15), (Fraction(13, 2), 7), (Fraction(11, 2), 6)]
    for wrong in (round, lambda x: math.floor(x + Fraction(1, 2)), math.floor, int):
        assert any(wrong(x) != want for x, want in rows), wrong


def test_min_capacity_raises_after_clamp():
    # min_capacity is applied after the clamp to T, so it may exceed T (a padded buffer larger
    # than the batch, as some frameworks allow): min_capacity 150 with T = 100 gives 150, where
    # clamping after raising would give 100.
    assert capacity(0.01, 100, 64, 1, min_capacity=150) == 150
    assert capacity(8.0, 100, 2, 1, min_capacity=120) == 120  # 400 clamped to 100, then raised
    assert capacity(0.01, 100, 64, 1, min_capacity=4) == 4  # raised above the clamp's 1
    assert capacity(1.0, 100, 4, 1, min_capacity=3) == 25  # a smaller minimum changes nothing
    assert build_router("switch", num_experts=64, capacity_factor=0.01, min_capacity=4).config.capacity_for(100) == 4


def test_capacity_fractional_k_and_fraction_cf():
    assert capacity(Fraction(5, 4), 4096, 64, Fraction(1)) == 80
    assert capacity(1.0, 10, 4, 1.5) == 4  # ceil(15 / 4)


@pytest.mark.parametrize("cf", [0, -1.0])
def test_capacity_rejects_non_positive(cf):
    with pytest.raises(RoutingError, match="capacity_factor"):
        capacity(cf, 10, 2)


def test_batch_validation_names_the_parameter():
    with pytest.raises(RoutingError, match="finite"):
        Batch(logits_TE=torch.tensor([[0.0, float("nan")]]), token_T=torch.tensor([0]))
    with pytest.raises(RoutingError, match="finite"):
        Batch(logits_TE=torch.tensor([[0.0, float("inf")]]), token_T=torch.tensor([0]))
    with pytest.raises(RoutingError, match="same length"):
        Batch(logits_TE=torch.zeros(3, 2), token_T=torch.tensor([0, 1]))
    with pytest.raises(RoutingError, match="T = 0"):
        Batch(logits_TE=torch.zeros(0, 2), token_T=torch.zeros(0, dtype=torch.int64))
    with pytest.raises(RoutingError, match="2-D"):
        Batch(logits_TE=torch.zeros(4), token_T=torch.zeros(4, dtype=torch.int64))
    with pytest.raises(RoutingError, match="int64"):
        Batch(logits_TE=torch.zeros(2, 2), token_T=torch.zeros(2, dtype=torch.int32))


@pytest.mark.parametrize(
    ("opts", "match"),
    [
        ({"num_experts": 4, "top_k": 5}, "top_k must be between 1 and num_experts = 4"),
        ({"num_experts": 4, "top_k": 0}, "top_k must be an integer >= 1"),
        ({"num_experts": 0}, "num_experts must be an integer >= 1"),
        ({"capacity_factor": 0.0}, "capacity_factor must be > 0"),
        ({"capacity_factor": -2}, "capacity_factor must be > 0"),
        ({"capacity_factor": float("nan")}, "capacity_factor must be a finite number"),
        ({"drop_policy": "lottery"}, "drop_policy must be one of 'position', 'probs', 'random'"),
        ({"bias_update_rate": -0.1}, "bias_update_rate must be a finite number >= 0"),
        ({"seed": -1}, "seed must be an integer >= 0"),
        ({"colour": "red"}, "unknown router option 'colour'; valid options: num_experts"),
        ({"top_k": "two"}, "router option top_k must be int"),
    ],
)
def test_config_errors(opts, match):
    with pytest.raises(RoutingError, match=match):
        build_router("topk", **opts)


def test_string_options_are_parsed_by_field_type():
    r = build_router("topk", num_experts="8", top_k="2", capacity_factor="1.5", drop_policy="probs")
    assert (r.config.num_experts, r.config.top_k, r.config.capacity_factor) == (8, 2, 1.5)
    assert build_router("topk", capacity_factor="none").config.capacity_factor is None
    assert build_router("switch", batch_prioritized="true").config.batch_prioritized is True


def test_router_rejects_batch_with_other_expert_count(make_batch):
    with pytest.raises(RoutingError, match="num_experts = 4"):
        build_router("switch", num_experts=4).route(make_batch(torch.zeros(3, 5)))


def test_plan_validates_its_arrays():
    with pytest.raises(RoutingError, match="one length"):
        Plan(
            torch.zeros(3, dtype=torch.int64),
            torch.zeros(2, dtype=torch.int64),
            torch.zeros(3),
            3,
            2,
            None,
            1,
        )
    # a 2-D token_R is refused whatever the other arrays' length (one row, or none)
    for token_R, n in [(torch.zeros(1, 1, dtype=torch.int64), 1), (torch.zeros(0, 2, dtype=torch.int64), 0)]:
        with pytest.raises(RoutingError, match="1-D of one length"):
            Plan(token_R, torch.zeros(n, dtype=torch.int64), torch.zeros(n), 3, 2, None, 1)


def test_stateful_is_true_only_for_routers_that_update():
    # ep gathers the whole step's plan only for a stateful router; the flag must not invert.
    assert build_router("switch", num_experts=8).stateful is False
    assert build_router("topk", num_experts=8).stateful is False
    assert build_router("topk", num_experts=8, bias_update_rate=0.01).stateful is True
    # The base rule (a router is stateful when its class defines update), for routers that do
    # not carry a bias, and the default of needs_hidden (only routers with their own gate).
    from moe_routing_bench.routers.contract import Router

    for name in ("expert_choice", "hash", "dense"):
        router = build_router(name, num_experts=8)
        assert router.stateful is False and router.needs_hidden is False, name

    class Learns(Router):
        def update(self, plan):
            pass

    assert Learns(num_experts=4).stateful is True and Learns(num_experts=4).needs_hidden is False


def test_batch_refuses_hidden_states_of_the_wrong_rank():
    logits = torch.zeros(4, 3)
    for hidden in (torch.zeros(4), torch.zeros(4, 2, 2), torch.zeros(5, 2)):
        with pytest.raises(RoutingError, match="hidden_TD"):
            Batch(logits_TE=logits, token_T=torch.arange(4), hidden_TD=hidden)


@pytest.mark.parametrize("e", [6, 8])
def test_sequence_balance_loss_against_a_loop(e):
    # A loop over sequences and experts, at an E that is not a power of two (where packing the
    # (sequence, expert) pair into one index must multiply and add, not combine bits).
    from moe_routing_bench.routers.contract import sequence_balance_loss

    gen = torch.Generator().manual_seed(3)
    t, k = 24, 2
    scores = torch.softmax(torch.randn(t, e, generator=gen), -1)
    expert_R = torch.randint(0, e, (t * k,), generator=gen)
    token_R = torch.arange(t).repeat(k)
    seq_T = torch.tensor([7] * 10 + [3] * 9 + [11] * 5)
    losses = []
    for s in seq_T.unique().tolist():
        in_s = seq_T == s
        req = in_s[token_R]
        counts = torch.bincount(expert_R[req], minlength=e).double()
        mean_p = scores[in_s].double().mean(0)
        losses.append(e / req.sum() * (counts * mean_p).sum())
    torch.testing.assert_close(
        sequence_balance_loss(scores, token_R, expert_R, seq_T).double(), torch.stack(losses).mean()
    )


def _plan(**over):
    arrays = {"token_R": torch.tensor([0, 1]), "expert_R": torch.tensor([1, 0]), "weight_R": torch.ones(2)}
    return Plan(**{**arrays, **over}, num_tokens=2, num_experts=2, capacity=None, top_k=1)


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"token_R": torch.tensor(0)}, "must be 1-D of one length"),  # 0-d: a RoutingError, not IndexError
        ({"token_R": torch.zeros(2, 1, dtype=torch.int64)}, "must be 1-D of one length"),
        ({"expert_R": torch.tensor([1, 0, 1])}, "must be 1-D of one length"),
        ({"weight_R": torch.ones(3)}, "must be 1-D of one length"),
        ({"weight_R": torch.ones(1)}, "must be 1-D of one length"),
        ({"token_R": torch.tensor([0, 1], dtype=torch.int32)}, "must be int64"),  # either one alone
        ({"expert_R": torch.tensor([1, 0], dtype=torch.int32)}, "must be int64"),
    ],
)
def test_plan_refuses_malformed_arrays(over, match):
    with pytest.raises(RoutingError, match=match):
        _plan(**over)


def test_batch_refuses_no_experts_and_sequence_ids_of_another_length():
    with pytest.raises(RoutingError, match="num_experts E must be >= 1"):
        Batch(logits_TE=torch.zeros(4, 0), token_T=torch.arange(4))
    for seq in (torch.zeros(5, dtype=torch.int64), torch.zeros(3, dtype=torch.int64)):
        with pytest.raises(RoutingError, match="seq_T"):
            Batch(logits_TE=torch.zeros(4, 2), token_T=torch.arange(4), seq_T=seq)


def test_a_router_refuses_a_batch_with_other_e_either_way():
    router = build_router("topk", num_experts=8)
    for e in (4, 16):
        with pytest.raises(RoutingError, match=f"logits_TE has E = {e} columns"):
            router.route(Batch(logits_TE=torch.zeros(3, e), token_T=torch.arange(3)))


def test_z_loss_from_logits_alone_is_over_each_tokens_experts():
    from moe_routing_bench.routers.contract import z_loss

    logits = torch.randn(5, 3, generator=torch.Generator().manual_seed(1)) * 4  # T != E: the axis matters
    torch.testing.assert_close(z_loss(logits), torch.logsumexp(logits, -1).square().mean())


def test_sequence_balance_loss_skips_a_sequence_that_requested_nothing():
    from moe_routing_bench.routers.contract import sequence_balance_loss

    # Expert choice can leave a sequence with no request: it scores nothing (not 0 / 0 = NaN).
    scores = torch.full((4, 2), 0.5)
    seq_T = torch.tensor([0, 0, 1, 1])
    token_R, expert_R = torch.tensor([0, 1]), torch.tensor([0, 1])  # only sequence 0 requested
    assert float(sequence_balance_loss(scores, token_R, expert_R, seq_T)) == pytest.approx(1.0)


def test_batch_refuses_logits_and_token_ids_of_the_wrong_rank():
    with pytest.raises(RoutingError, match="logits_TE must be a 2-D tensor"):
        Batch(logits_TE=torch.zeros(2, 3, 4), token_T=torch.arange(2))
    with pytest.raises(RoutingError, match="token_T"):
        Batch(logits_TE=torch.zeros(1, 3), token_T=torch.tensor(0))  # 0-d


def test_capacity_of_a_one_token_batch():
    assert capacity(1.0, 1, 4) == 1 and capacity(0.5, 1, 1) == 1 and capacity(4.0, 1, 2, 2) == 1


def test_router_config_defaults_to_eight_experts():
    # The documented default (README, `moe-bench route` without -E uses the CLI's own).
    from moe_routing_bench.routers.contract import RouterConfig

    assert RouterConfig().num_experts == 8 and RouterConfig().top_k == 1
    # A plan says it looked at the whole batch only when its router does.
    batch = Batch(logits_TE=torch.randn(6, 4), token_T=torch.arange(6))
    assert build_router("switch", num_experts=4).route(batch).looks_at_whole_batch is False
    assert build_router("expert_choice", num_experts=4).route(batch).looks_at_whole_batch is True


def test_one_expert_and_fractional_config_integers():
    Batch(logits_TE=torch.zeros(3, 1), token_T=torch.arange(3))  # E = 1 is a batch
    with pytest.raises(RoutingError, match="num_experts must be an integer"):
        build_router("switch", num_experts=2.5)


def test_batch_edges_name_what_is_wrong():
    logits = torch.zeros(4, 3)
    logits[0, 1], logits[2, 2] = float("nan"), float("inf")
    with pytest.raises(RoutingError, match=r"logits_TE must be finite \(found 2 NaN or infinite values\)"):
        Batch(logits_TE=logits, token_T=torch.arange(4))
    with pytest.raises(RoutingError, match="token_T must be a 1-D tensor"):
        Batch(logits_TE=torch.zeros(2, 3), token_T=[0, 1])  # a list, not a tensor
    for n in (3, 5):  # fewer or more token ids than rows
        with pytest.raises(RoutingError, match=f"got {n} token ids and 4 rows"):
            Batch(logits_TE=torch.zeros(4, 3), token_T=torch.arange(n))
    with pytest.raises(RoutingError, match="hidden_TD"):
        Batch(logits_TE=torch.zeros(4, 3), token_T=torch.arange(4), hidden_TD=torch.zeros(3, 2))


def test_capacity_and_config_refuse_what_cannot_be():
    with pytest.raises(RoutingError, match="num_experts must be >= 1"):
        capacity(1.0, 10, 0)
    with pytest.raises(RoutingError, match="min_capacity must be an integer >= 0"):
        build_router("switch", num_experts=4, min_capacity=-1)


def test_sequence_balance_loss_scores_a_sequence_of_one_request():
    from moe_routing_bench.routers.contract import sequence_balance_loss

    scores = torch.tensor([[0.75, 0.25], [0.5, 0.5], [0.5, 0.5]])
    seq_T = torch.tensor([0, 1, 1])
    token_R, expert_R = torch.tensor([0, 1, 2]), torch.tensor([0, 0, 1])
    # Sequence 0: one request, to expert 0: E / (1 * 1) * 1 * 0.75 = 1.5. Sequence 1: 2 * (0.5 + 0.5) / 2 = 1.
    assert float(sequence_balance_loss(scores, token_R, expert_R, seq_T)) == pytest.approx((1.5 + 1.0) / 2)


def test_capacity_takes_k_exactly_and_refuses_a_boolean_cf():
    # K as a float goes through Fraction(str(K)) like cf: 1.1 * 100 / 10 is 11, not 12.
    assert capacity(1.0, 100, 10, 1.1) == 11
    with pytest.raises(RoutingError, match="capacity_factor"):
        build_router("switch", num_experts=4, capacity_factor=True)


def test_capacity_refuses_an_empty_batch_and_batch_refuses_2d_token_ids():
    with pytest.raises(RoutingError, match="num_tokens must be >= 1"):
        capacity(1.0, 0, 4)
    with pytest.raises(RoutingError, match="token_T must be a 1-D tensor"):
        Batch(logits_TE=torch.zeros(2, 3), token_T=torch.zeros(2, 1, dtype=torch.int64))


def test_shared_defaults_are_the_documented_ones():
    # Rows record every option; a silently changed default would change every "default" row.
    for name in ("switch", "topk", "gshard", "expert_choice", "hash", "hierarchical", "sinkhorn", "topp"):
        cfg = build_router(name, num_experts=8).config
        assert (cfg.seed, cfg.min_capacity) == (0, 0), name


def test_expert_choice_k_defaults_to_two(make_batch):
    # DESIGN: K defaults to 2, matching top-2's compute: C = ceil(T K cf / E)
    router = build_router("expert_choice", num_experts=8)
    assert router.config.top_k == 2
    assert router.route(make_batch(torch.zeros(64, 8))).capacity == 16
