"""The tie rule (DESIGN.md): among equal scores the lower index wins, in ``top_indices`` and in every
router that selects through it; bf16-quantised logits (full of ties) route alike in switch and topk."""

from __future__ import annotations

import pytest
import torch

from moe_routing_bench.routers.contract import Batch
from moe_routing_bench.routers.registry import build_router
from moe_routing_bench.routers.selection import ORDER_ALL_ABOVE, top_indices


def _reference(x: torch.Tensor, k: int) -> torch.Tensor:
    """A stable descending sort keeps equal values in index order: its first k are the rule."""
    return torch.sort(x, dim=-1, descending=True, stable=True).indices[:, :k]


@pytest.mark.parametrize(
    ("rows", "cols", "k", "levels"),
    [
        (500, 8, 2, 3),  # three values per row: ties inside the top k and at its boundary
        (500, 8, 1, 2),  # k = 1: argmax, the first maximum
        (300, 8, 8, 2),  # k = C: the whole row ordered
        (200, 64, 8, 5),  # the common shape, ties everywhere
        (50, 300, ORDER_ALL_ABOVE + 7, 4),  # k above the threshold: every row ordered by its key
        (40, 16, 15, 1),  # all equal: indices 0..k-1
        (1, 5, 3, 2),  # one row
    ],
)
def test_top_indices_is_a_stable_descending_sort(rows, cols, k, levels):
    gen = torch.Generator().manual_seed(rows + cols + k)
    x = torch.randint(0, levels, (rows, cols), generator=gen).float() - 1.0  # negatives too
    assert torch.equal(top_indices(x, k), _reference(x, k))


def test_top_indices_treats_signed_zeros_as_equal_and_continuous_rows_as_topk():
    x = torch.tensor([[0.0, -0.0, 0.0, -1.0], [-0.0, 0.0, -2.0, 0.0]])
    assert top_indices(x, 2).tolist() == [[0, 1], [0, 1]]
    y = torch.randn(1000, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(top_indices(y, 4), torch.topk(y, 4, dim=-1).indices)
    with pytest.raises(ValueError, match="k must be an integer between 1 and the 4 columns"):
        top_indices(x, 5)


def test_bf16_logits_route_alike_in_switch_and_topk():
    # 20,000 rows of bf16-quantised logits (a captured trace): full of ties. Dropless switch and
    # topk with K = 1 must choose the same expert on every row, the lowest index among the maxima;
    # topk's K = 2 and gshard's always-kept top-2 agree the same way.
    e = 64
    logits = (torch.randn(20_000, e, generator=torch.Generator().manual_seed(0)) * 2).bfloat16().float()
    batch = Batch(logits_TE=logits, token_T=torch.arange(20_000))
    assert int((torch.topk(logits, 2, -1).values.diff(dim=-1) == 0).sum()) > 100  # ties are there
    switch = build_router("switch", num_experts=e, capacity_factor=None).route(batch)
    top1 = build_router("topk", num_experts=e, top_k=1).route(batch)
    assert torch.equal(switch.expert_R, top1.expert_R)
    assert torch.equal(top1.expert_R, _reference(logits, 1).squeeze(1))
    top2 = build_router("topk", num_experts=e, top_k=2).route(batch)
    gshard = build_router("gshard", num_experts=e, second_policy="always", capacity_factor=None).route(batch)
    assert torch.equal(top2.expert_R, gshard.expert_R)
    assert torch.equal(top2.expert_R.view(2, -1).t(), _reference(logits, 2))


def test_expert_choice_ties_go_to_the_lower_token():
    # Tokens 0..9 have identical logits, so every expert scores them equally; the C = 5 slots of
    # each expert go to tokens 0..4 (not to an arbitrary five of the ten).
    logits = torch.randn(1, 4, generator=torch.Generator().manual_seed(1)).expand(10, 4).contiguous()
    plan = build_router("expert_choice", num_experts=4, top_k=2, capacity_factor=1.0).route(
        Batch(logits_TE=logits, token_T=torch.arange(10))
    )
    assert plan.capacity == 5
    assert plan.token_R.view(4, 5).tolist() == [[0, 1, 2, 3, 4]] * 4


def test_groups_ties_go_to_the_lower_group_then_the_lower_expert():
    # All scores equal: groups 0 and 1 (of 4) are kept and experts 0 and 1 chosen; with the kept
    # groups gathered by score, a tie could have chosen group 1's experts first.
    router = build_router("hierarchical", num_experts=16, num_groups=4, topk_group=2, top_k=3)
    plan = router.route(Batch(logits_TE=torch.zeros(5, 16), token_T=torch.arange(5)))
    assert plan.expert_R.view(3, 5).t().tolist() == [[0, 1, 2]] * 5
    # Groups 2 and 3 win on score; inside them every score is equal: experts 8, 9, 10.
    logits = torch.zeros(5, 16)
    logits[:, 8:] = 1.0
    plan = router.route(Batch(logits_TE=logits, token_T=torch.arange(5)))
    assert plan.expert_R.view(3, 5).t().tolist() == [[8, 9, 10]] * 5


def test_tie_keys_keep_values_that_differ_below_one_ulp_of_one_apart():
    # The inner tie (5, 5) sends the row through the int64 keys; 2e-9 > 1e-9 must still order
    # above it (a key built from v - 1 would merge them and hand the slot to the lower index).
    x = torch.tensor([[1e-9, 2e-9, 5.0, 5.0]])
    assert top_indices(x, 3).tolist() == [[2, 3, 1]]
    # -0.0 and +0.0 are one score: the lower index wins
    assert top_indices(torch.tensor([[0.0, -0.0, 1.0, 1.0]]), 3).tolist() == [[2, 3, 0]]
    assert top_indices(torch.tensor([[-0.0, 0.0, 1.0, 1.0]]), 3).tolist() == [[2, 3, 0]]


def test_tie_keys_order_negative_scores_to_the_last_bit():
    # Negative floats need their 31 low bits flipped to order as integers; every one of those bits
    # counts: -1.0 (0xBF800000) is above -1.0000001 (0xBF800001), which differs in bit 0 only.
    below = torch.tensor(0xBF800001 - (1 << 32), dtype=torch.int32).view(torch.float32).item()
    assert below < -1.0
    assert top_indices(torch.tensor([[below, -1.0, 5.0, 5.0]]), 3).tolist() == [[2, 3, 1]]
    assert top_indices(torch.tensor([[-2.0, -1.0, 5.0, 5.0]]), 3).tolist() == [[2, 3, 1]]


@pytest.mark.parametrize("k", [True, 0, 5, 2.0])
def test_top_indices_refuses_a_k_that_is_not_an_integer_in_range(k):
    with pytest.raises(ValueError, match=r"k must be an integer between 1 and the 4 columns"):
        top_indices(torch.zeros(2, 4), k)
