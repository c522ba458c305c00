"""GShard-style dispatch through a one-hot mask: the memory baseline.

GShard (Lepikhin et al. 2020) and the first Switch implementations dispatched with dense tensors:
a one-hot mask ``[T, E, C]`` turns permute into ``einsum('tec,td->ecd')`` and combine into
``einsum('tec,ecd->td')`` with the gate weights in the mask. It is simple and maps onto matmul
units, but the mask grows as T * E * C (about cf * K * T^2 at fixed cf), which is exactly what
index-based dispatch avoids; the benchmark keeps it to show that cost.

Only the padded layout exists here: the mask's C axis is the padded slot. A dropless plan uses
C = the largest kept load (``Dispatch.padded_capacity``).

Shape letters: T tokens, D hidden, E experts, C capacity, N kept assignments.
"""

from __future__ import annotations

import torch

from .backend import Backend
from .dispatch import Dispatch, analytic_buffer_bytes
from .torch_backend import accumulate_dtype


def _check_layout(layout: str) -> None:
    if layout != "padded":
        # The mask's C axis is the padded slot: a compact buffer has no place in this formulation.
        raise ValueError(f"layout must be 'padded': einsum supports only 'padded' (got {layout!r})")


def dispatch_mask(d: Dispatch, dtype: torch.dtype) -> torch.Tensor:
    """One-hot dispatch mask [T, E, C] in ``dtype``: 1 where token t sits in slot c of expert e."""
    mask_TEC = torch.zeros((d.num_tokens, d.num_experts, d.padded_capacity), dtype=dtype, device=d.device)
    mask_TEC[d.token_N, d.expert_N, d.rank_N] = 1
    return mask_TEC


def combine_weights(d: Dispatch, dtype: torch.dtype) -> torch.Tensor:
    """Combine weights [T, E, C] in ``dtype``: the gate weight at each kept (t, e, c), else 0.

    Built with an out-of-place ``index_put`` so gradients reach ``weight_N`` (and the router).
    """
    zeros_TEC = torch.zeros((d.num_tokens, d.num_experts, d.padded_capacity), dtype=dtype, device=d.device)
    return zeros_TEC.index_put((d.token_N, d.expert_N, d.rank_N), d.weight_N.to(dtype))


def permute(x_TD: torch.Tensor, d: Dispatch, layout: str = "padded") -> torch.Tensor:
    """x_TD [T, D] -> x_ECD [E, C, D] through the one-hot mask (exact: one nonzero per slot)."""
    _check_layout(layout)
    if not isinstance(x_TD, torch.Tensor) or x_TD.dim() != 2 or x_TD.shape[0] != d.num_tokens:
        raise ValueError(f"x_TD must be [T, D] with T={d.num_tokens} (got {getattr(x_TD, 'shape', x_TD)})")
    if x_TD.device != d.device:
        raise ValueError(f"x_TD is on {x_TD.device} but the dispatch is on {d.device}")
    return torch.einsum("tec,td->ecd", dispatch_mask(d, x_TD.dtype), x_TD)


def combine(y: torch.Tensor, d: Dispatch, layout: str = "padded") -> torch.Tensor:
    """y_ECD [E, C, D] -> out_TD [T, D] in y's dtype, the gate-weighted sum over kept slots.

    The contraction runs in float32 (float64 for float64 y), as the torch backend accumulates,
    so the backends differ only by summation order.
    """
    _check_layout(layout)
    want = (d.num_experts, d.padded_capacity)
    if not isinstance(y, torch.Tensor) or y.dim() != 3 or tuple(y.shape[:2]) != want:
        raise ValueError(
            f"y must be [E, C, D] with E={want[0]}, C={want[1]} for layout 'padded' (got {getattr(y, 'shape', y)})"
        )
    acc = accumulate_dtype(y.dtype)
    out_TD = torch.einsum("tec,ecd->td", combine_weights(d, acc), y.to(acc))
    return out_TD.to(y.dtype)


def _buffer_bytes(d: Dispatch, hidden: int, dtype: torch.dtype, layout: str) -> int:
    _check_layout(layout)
    return analytic_buffer_bytes(d, hidden, dtype, "einsum")


def _planned_bytes(tokens: int, experts: int, top_k: float, capacity: int | None, hidden: int, elt: int) -> int:
    # The one-hot mask and the combine weights, [T, E, C] each, plus the padded [E, C, D] buffer;
    # dropless plans pad C up to the largest load, at most T.
    c = capacity if capacity is not None else tokens
    return (2 * tokens * experts * c + experts * c * hidden) * elt


BACKEND = Backend(
    name="einsum",
    description="GShard's one-hot dispatch mask [T, E, C] and two einsums: the memory baseline",
    layouts=("padded",),
    permute=permute,
    combine=combine,
    buffer_bytes=_buffer_bytes,
    planned_bytes=_planned_bytes,
)
