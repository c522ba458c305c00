"""The one shared step that decides what is kept: each request's rank inside its expert.

For requests listed in priority order, ``rank_R[r]`` is the number of earlier requests to the same
expert. With capacity C, request r is kept iff ``rank_R[r] < C``; inside an expert, rows are ordered
by rank. This is the torch reference; the Triton kernel implements the same contract, and metrics
are computed from its result, so "who drops" is defined once.
"""

from __future__ import annotations

import torch


def check_expert_R(expert_R: torch.Tensor, num_experts: int) -> None:
    """Raise ValueError naming ``expert_R`` or ``num_experts`` when either breaks the contract."""
    if not isinstance(expert_R, torch.Tensor) or expert_R.dim() != 1:
        raise ValueError(f"expert_R must be a 1-D tensor [R] (got {getattr(expert_R, 'shape', type(expert_R))})")
    if expert_R.dtype != torch.int64:
        raise ValueError(f"expert_R must be int64 (got {expert_R.dtype})")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or not 1 <= num_experts < 2**31:
        raise ValueError(f"num_experts must be an integer in [1, 2**31) (got {num_experts!r})")


def check_expert_ids(expert_R: torch.Tensor, num_experts: int) -> None:
    """``check_expert_R``, then every id inside [0, num_experts) (one host sync): a kernel indexing
    counts by an id out of range would write past its memory."""
    check_expert_R(expert_R, num_experts)
    if expert_R.shape[0] and (int(expert_R.min()) < 0 or int(expert_R.max()) >= num_experts):
        lo, hi = int(expert_R.min()), int(expert_R.max())
        raise ValueError(f"expert_R values must lie in [0, {num_experts}) (got {lo}..{hi})")


def expert_counts(expert_R: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] int64 number of requests per expert."""
    check_expert_R(expert_R, num_experts)
    return torch.bincount(expert_R, minlength=num_experts)


def positions(expert_R: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank of each request among the requests to the same expert, in priority order.

    expert_R: [R] int64 expert of each request, listed in priority order.
    Returns (rank_R [R] int64, counts_E [E] int64 requested load per expert).
    Memory O(R + E): a stable sort by expert, never a one-hot [R, E].
    """
    check_expert_ids(expert_R, num_experts)
    r = expert_R.shape[0]
    counts_E = torch.bincount(expert_R, minlength=num_experts)
    # int32 keys sort twice as fast and E < 2**31 fits; stability keeps priority order per expert.
    order_R = torch.sort(expert_R.to(torch.int32), stable=True).indices
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    rank_sorted = torch.arange(r, device=expert_R.device) - starts_E[expert_R[order_R]]
    rank_R = torch.empty_like(rank_sorted)
    rank_R[order_R] = rank_sorted
    return rank_R, counts_E


def kept_mask(rank_R: torch.Tensor, capacity: int | None) -> torch.Tensor:
    """[R] bool: request kept under capacity C (all kept when dropless, capacity None)."""
    if capacity is None:
        return torch.ones_like(rank_R, dtype=torch.bool)
    return rank_R < capacity
