"""From a plan to a dispatch: which requests are kept, and where each kept row lives.

A plan lists requested assignments ``token_R, expert_R, weight_R`` in priority order. ``positions``
ranks each request inside its expert; a request is kept iff its rank is below the capacity C (all
are kept when the plan is dropless). Every backend consumes the same ``Dispatch`` so that "who is
kept" and "which row holds it" are decided once, here.

Two buffer layouts:

- ``compact`` ``[N, D]``: kept rows only, ordered by expert then rank. Because the kept ranks of
  expert e are exactly ``0..L_e-1``, ``row_N = offsets_E[expert_N] + rank_N`` is already that order,
  so no second sort is needed.
- ``padded`` ``[E, C, D]``: ``slot_N = expert_N * C + rank_N``; unused slots are zero. For a
  dropless plan the padded C is the largest kept load (at least 1), the smallest buffer that fits.

Shape letters: T tokens, D hidden, E experts, C capacity, R requested, N kept.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .positions import positions

LAYOUTS = ("compact", "padded")
PositionsFn = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True, eq=False)
class Dispatch:
    """Kept assignments of one plan and their rows in each buffer layout.

    All tensors live on the plan's device. ``*_N`` arrays list kept requests in priority order.

    token_N, expert_N, rank_N: [N] int64 token, expert, and rank inside the expert.
    weight_N: [N] gate weight of each kept request; a view of ``weight_R`` through indexing, so
        gradients flow back to the router.
    kept_R: [R] bool, request kept under capacity (metrics read drops from here).
    requested_E: [E] int64 requested load (before capacity); counts_E: [E] int64 kept load.
    offsets_E: [E] int64 exclusive scan of counts_E: first compact row of each expert.
    row_N: [N] int64 compact row of each kept request (a permutation of ``0..N-1``).
    token_by_row_N: [N] int64 token held by each compact row (the inverse of ``row_N``), so permute
        is a single ``index_select``.
    slot_N: [N] int64 flat padded slot ``expert_N * padded_capacity + rank_N``.
    capacity: the plan's C, or None when dropless; padded_capacity: the C of the padded layout.
    """

    token_N: torch.Tensor
    expert_N: torch.Tensor
    weight_N: torch.Tensor
    rank_N: torch.Tensor
    kept_R: torch.Tensor
    requested_E: torch.Tensor
    counts_E: torch.Tensor
    offsets_E: torch.Tensor
    row_N: torch.Tensor
    token_by_row_N: torch.Tensor
    slot_N: torch.Tensor
    num_tokens: int
    num_experts: int
    capacity: int | None
    padded_capacity: int

    @property
    def num_kept(self) -> int:
        """N, the number of kept assignments."""
        return int(self.token_N.shape[0])

    @property
    def num_requested(self) -> int:
        """R, the number of requested assignments."""
        return int(self.kept_R.shape[0])

    @property
    def device(self) -> torch.device:
        return self.token_N.device


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_plan(
    token_R: torch.Tensor,
    expert_R: torch.Tensor,
    weight_R: torch.Tensor,
    num_tokens: int,
    num_experts: int,
    capacity: int | None,
) -> None:
    """Raise ValueError naming the first argument that breaks the plan contract."""
    for name, t in (("token_R", token_R), ("expert_R", expert_R), ("weight_R", weight_R)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1:
            raise ValueError(f"{name} must be a 1-D tensor [R] (got {getattr(t, 'shape', type(t))})")
    for name, t in (("token_R", token_R), ("expert_R", expert_R)):
        if t.dtype != torch.int64:
            raise ValueError(f"{name} must be int64 (got {t.dtype})")
    if not weight_R.dtype.is_floating_point:
        raise ValueError(f"weight_R must be a floating-point tensor, float32 by contract (got {weight_R.dtype})")
    r = token_R.shape[0]
    if expert_R.shape[0] != r or weight_R.shape[0] != r:
        raise ValueError(
            "token_R, expert_R and weight_R must have equal lengths "
            f"(got {r}, {expert_R.shape[0]}, {weight_R.shape[0]})"
        )
    if expert_R.device != token_R.device or weight_R.device != token_R.device:
        raise ValueError(
            "token_R, expert_R and weight_R must be on one device "
            f"(got {token_R.device}, {expert_R.device}, {weight_R.device})"
        )
    if not _is_int(num_tokens) or num_tokens < 0:
        raise ValueError(f"num_tokens must be an integer >= 0 (got {num_tokens!r})")
    if not _is_int(num_experts) or num_experts < 1:
        raise ValueError(f"num_experts must be an integer >= 1 (got {num_experts!r})")
    if capacity is not None and (not _is_int(capacity) or capacity < 1):
        raise ValueError(f"capacity must be None (dropless) or an integer >= 1 (got {capacity!r})")
    if r:
        # One host sync per plan; a silent out-of-range index would corrupt memory in a kernel.
        lo, hi = int(token_R.min()), int(token_R.max())
        if lo < 0 or hi >= num_tokens:
            raise ValueError(f"token_R values must lie in [0, {num_tokens}) (got {lo}..{hi})")
        lo, hi = int(expert_R.min()), int(expert_R.max())
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"expert_R values must lie in [0, {num_experts}) (got {lo}..{hi})")


def make_dispatch(
    token_R: torch.Tensor,
    expert_R: torch.Tensor,
    weight_R: torch.Tensor,
    num_tokens: int,
    num_experts: int,
    capacity: int | None,
    *,
    positions_fn: PositionsFn | None = None,
) -> Dispatch:
    """Apply capacity to a plan and lay out its kept rows.

    token_R, expert_R: [R] int64 requested assignments in priority order (earlier wins a slot).
    weight_R: [R] float gate weights (float32 by contract), differentiable.
    num_tokens: T; num_experts: E; capacity: C >= 1, or None for a dropless plan.
    positions_fn: the positions op (``positions``'s contract); None is the torch one. A backend
    passes its own (the triton backend, its kernel): every implementation gives the same ranks.
    Returns a ``Dispatch``; raises ValueError naming the offending argument.
    """
    _check_plan(token_R, expert_R, weight_R, num_tokens, num_experts, capacity)
    rank_R, requested_E = (positions_fn or positions)(expert_R, num_experts)
    device = token_R.device
    if capacity is None:
        kept_R = torch.ones_like(rank_R, dtype=torch.bool)
        token_N, expert_N, weight_N, rank_N = token_R, expert_R, weight_R, rank_R
        counts_E = requested_E
    else:
        kept_R = rank_R < capacity
        # nonzero keeps ascending request order, so kept arrays stay in priority order.
        keep_N = torch.nonzero(kept_R).squeeze(1)
        token_N, expert_N, rank_N = token_R[keep_N], expert_R[keep_N], rank_R[keep_N]
        weight_N = weight_R[keep_N]
        # Kept ranks of expert e are the prefix 0..L_e-1, so its kept load is min(R_e, C).
        counts_E = requested_E.clamp(max=capacity)
    offsets_E = torch.cumsum(counts_E, 0) - counts_E
    row_N = offsets_E[expert_N] + rank_N
    n = int(token_N.shape[0])
    token_by_row_N = torch.empty(n, dtype=torch.int64, device=device)
    token_by_row_N[row_N] = token_N
    # Dropless: the smallest padded buffer that fits every kept row (never 0, so shapes stay valid).
    padded_capacity = capacity if capacity is not None else max(1, int(counts_E.max()))
    slot_N = expert_N * padded_capacity + rank_N
    return Dispatch(
        token_N=token_N,
        expert_N=expert_N,
        weight_N=weight_N,
        rank_N=rank_N,
        kept_R=kept_R,
        requested_E=requested_E,
        counts_E=counts_E,
        offsets_E=offsets_E,
        row_N=row_N,
        token_by_row_N=token_by_row_N,
        slot_N=slot_N,
        num_tokens=num_tokens,
        num_experts=num_experts,
        capacity=capacity,
        padded_capacity=padded_capacity,
    )


def check_layout(layout: str, allowed: tuple[str, ...] = LAYOUTS, who: str = "layout") -> None:
    """Raise ValueError unless ``layout`` is one of ``allowed``."""
    if layout not in allowed:
        raise ValueError(f"{who} must be one of {', '.join(repr(a) for a in allowed)} (got {layout!r})")


def analytic_buffer_bytes(d: Dispatch, hidden: int, dtype: torch.dtype, layout: str) -> int:
    """Bytes of the dispatch buffer one layout allocates for hidden size D in ``dtype``.

    compact: N * D; padded: E * C * D; einsum: the one-hot mask T * E * C plus its padded
    E * C * D buffer (both in ``dtype``). The einsum combine weights, another T * E * C built at
    combine time, are not counted: this is the dispatch stage's footprint.
    """
    check_layout(layout, (*LAYOUTS, "einsum"))
    if not _is_int(hidden) or hidden < 1:
        raise ValueError(f"hidden must be an integer >= 1 (got {hidden!r})")
    item = torch.empty((), dtype=dtype).element_size()
    padded = d.num_experts * d.padded_capacity * hidden
    if layout == "compact":
        return d.num_kept * hidden * item
    if layout == "padded":
        return padded * item
    return (d.num_tokens * d.num_experts * d.padded_capacity + padded) * item
