"""Index-based dispatch in plain torch: the CPU fast path and the oracle for the other backends.

permute gathers token rows into an expert-major buffer; combine gathers each kept row back,
scales it by its gate weight and sums it into its token. Both are differentiable with respect to
the hidden states and the gate weights, and neither allocates anything of size T * E.

Shape letters: T tokens, D hidden, E experts, C capacity (padded), N kept assignments.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from .backend import Backend
from .dispatch import LAYOUTS, Dispatch, analytic_buffer_bytes, check_layout
from .workspace import Workspace


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype in which combine sums expert outputs: float32, or float64 for float64 inputs.

    Summing K bf16 products in bf16 loses bits that depend on the summation order; summing in
    float32 makes every backend agree to the final cast.
    """
    return torch.promote_types(dtype, torch.float32)


def token_major_order(token_N: torch.Tensor) -> torch.Tensor:
    """[N] int64 indices that list kept assignments by token, priority order inside each token.

    A stable sort by token. On a CPU, below N = 2**24, the keys are sorted as float64 (token ids
    are exact there): torch's stable integer sort (a parallel radix sort) measured 85-170 ms at
    N = 32768 on the 2-core development machine, the float64 path 3 ms; at millions of keys the
    radix sort is the faster again.
    """
    key = token_N.double() if token_N.device.type == "cpu" and token_N.shape[0] < 2**24 else token_N
    return torch.sort(key, stable=True).indices


def by_token(d: Dispatch, layout: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kept assignments listed by token, priority order inside each token (what combine reads).

    Returns order_N [N] (indices into the ``*_N`` arrays), rows_N [N] (each one's compact row, or
    padded slot, in that order) and bounds_T1 [T + 1] int64: token t's are ``bounds[t]:bounds[t + 1]``.
    """
    order_N = token_major_order(d.token_N)
    bounds_T1 = torch.zeros(d.num_tokens + 1, dtype=torch.int64, device=d.device)
    torch.cumsum(torch.bincount(d.token_N, minlength=d.num_tokens), 0, out=bounds_T1[1:])
    return order_N, (d.row_N if layout == "compact" else d.slot_N)[order_N], bounds_T1


def zero_unused_slots(buf_MD: torch.Tensor, d: Dispatch) -> None:
    """Zero the rows of a padded buffer ``buf_MD`` [E * C, D] that hold no kept assignment."""
    m = buf_MD.shape[0]
    if d.num_kept < m:
        unused_M = torch.ones(m, dtype=torch.bool, device=buf_MD.device)
        unused_M[d.slot_N] = False
        buf_MD.index_fill_(0, torch.nonzero(unused_M).squeeze(1), 0)


def _check_x(x_TD: torch.Tensor, d: Dispatch) -> None:
    if not isinstance(x_TD, torch.Tensor) or x_TD.dim() != 2 or x_TD.shape[0] != d.num_tokens:
        raise ValueError(f"x_TD must be [T, D] with T={d.num_tokens} (got {getattr(x_TD, 'shape', x_TD)})")
    if x_TD.device != d.device:
        raise ValueError(f"x_TD is on {x_TD.device} but the dispatch is on {d.device}")


def _check_y(y: torch.Tensor, d: Dispatch, layout: str) -> None:
    if layout == "compact":
        want: tuple[int, ...] = (d.num_kept,)
        text = f"[N, D] with N={d.num_kept}"
    else:
        want = (d.num_experts, d.padded_capacity)
        text = f"[E, C, D] with E={d.num_experts}, C={d.padded_capacity}"
    if not isinstance(y, torch.Tensor) or y.dim() != len(want) + 1 or tuple(y.shape[:-1]) != want:
        raise ValueError(f"y must be {text} for layout {layout!r} (got {getattr(y, 'shape', y)})")
    if y.device != d.device:
        raise ValueError(f"y is on {y.device} but the dispatch is on {d.device}")


def permute(x_TD: torch.Tensor, d: Dispatch, layout: str = "compact") -> torch.Tensor:
    """Gather kept token rows into an expert-major buffer.

    x_TD: [T, D]. Returns compact x_ND [N, D] (rows by expert, then rank) or padded x_ECD
    [E, C, D] with unused slots zero; same dtype and device as x_TD.
    """
    check_layout(layout, LAYOUTS)
    _check_x(x_TD, d)
    if layout == "compact":
        # token_by_row_N already lists tokens in row order: one gather, no scatter.
        return x_TD.index_select(0, d.token_by_row_N)
    e, c, dim = d.num_experts, d.padded_capacity, x_TD.shape[1]
    m, n = e * c, d.num_kept
    if n and m < 2.5 * n:
        # Mostly full buffer: gather every slot (unused ones from token 0), then zero the unused
        # rows, 3M - N rows of traffic against M + 4N for zeros + gather + scatter.
        token_M = torch.zeros(m, dtype=torch.int64, device=x_TD.device)
        token_M[d.slot_N] = d.token_N
        buf = x_TD.index_select(0, token_M)
        zero_unused_slots(buf, d)
        return buf.view(e, c, dim)
    buf = x_TD.new_zeros((m, dim))
    # In place on a fresh buffer: autograd records it, so gradient still flows back to x_TD's rows.
    buf.index_copy_(0, d.slot_N, x_TD.index_select(0, d.token_N))
    return buf.view(e, c, dim)


def combine(y: torch.Tensor, d: Dispatch, layout: str = "compact") -> torch.Tensor:
    """Weighted sum of expert outputs back to tokens.

    y: compact y_ND [N, D] or padded y_ECD [E, C, D] (as returned by the experts).
    Returns out_TD [T, D] in y's dtype: ``out[t] = sum over kept n of token t: weight_N[n] * y[n]``,
    accumulated in float32 (float64 for float64 y). Tokens with no kept expert get zeros.
    """
    check_layout(layout, LAYOUTS)
    _check_y(y, d, layout)
    dim, t = y.shape[-1], d.num_tokens
    acc = accumulate_dtype(y.dtype)
    y_MD = y.reshape(-1, dim)
    # Per token, its kept rows in priority order, then one weighted gather-sum per token:
    # embedding_bag(mode="sum", per_sample_weights) reads each kept row once and writes each output
    # row once, with no [N, D] temporary; a token with no row gets zeros.
    order_N, rows_N, bounds_T1 = by_token(d, layout)
    out_TD = F.embedding_bag(
        rows_N,
        y_MD.to(acc),
        bounds_T1[:t],
        mode="sum",
        per_sample_weights=d.weight_N[order_N].to(acc),
    )
    return out_TD.to(y.dtype)


def permute_into(x_TD: torch.Tensor, d: Dispatch, layout: str, ws: Workspace) -> torch.Tensor:
    """``permute`` writing into a reused buffer (forward only, no autograd): the same rows."""
    check_layout(layout, LAYOUTS)
    _check_x(x_TD, d)
    dim = x_TD.shape[1]
    if layout == "compact":
        buf = ws.take("permute", (d.num_kept, dim), x_TD.dtype, x_TD.device)
        return torch.index_select(x_TD, 0, d.token_by_row_N, out=buf)
    e, c = d.num_experts, d.padded_capacity
    buf = ws.take("permute", (e * c, dim), x_TD.dtype, x_TD.device)
    buf.zero_()
    buf.index_copy_(0, d.slot_N, x_TD.index_select(0, d.token_N))
    return buf.view(e, c, dim)


def gate_matrix(d: Dispatch, layout: str, dtype: torch.dtype) -> torch.Tensor:
    """combine as a sparse matrix: [T, M] CSR, row t holding token t's kept rows (columns: compact
    rows, or padded slots) with their gates, in priority order. ``out_TD = G @ y_MD``."""
    m = d.num_kept if layout == "compact" else d.num_experts * d.padded_capacity
    order_N, rows_N, bounds_T1 = by_token(d, layout)
    gates = d.weight_N.detach()[order_N].to(dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(bounds_T1, rows_N, gates, size=(d.num_tokens, m), check_invariants=False)


def _sparse_combine_runs(y: torch.Tensor) -> bool:
    # One pass (a sparse-dense product writing the output once) where the sum is already in
    # y's dtype: float32/float64 on a CPU. bf16/fp16 need their float32 upcast (three passes).
    return y.device.type == "cpu" and y.dtype in (torch.float32, torch.float64)


def combine_into(y: torch.Tensor, d: Dispatch, layout: str, ws: Workspace) -> torch.Tensor:
    """``combine`` writing into a reused [T, D] buffer (forward only, no autograd), accumulated in
    float32 (float64 for float64 y).

    float32/float64 on a CPU: one sparse-dense product ``G @ y`` (:func:`gate_matrix`), which reads
    each kept row once and writes each output row once. Otherwise three passes: the gated rows,
    a zeroed output, one ``index_add_``.
    """
    check_layout(layout, LAYOUTS)
    _check_y(y, d, layout)
    dim, acc = y.shape[-1], accumulate_dtype(y.dtype)
    y_MD = y.reshape(-1, dim)
    out = ws.take("combine", (d.num_tokens, dim), acc, y.device)
    if _sparse_combine_runs(y):
        # beta=0: out's stale contents (NaN included) are ignored, not scaled.
        return torch.addmm(out, gate_matrix(d, layout, acc), y_MD, beta=0, out=out)
    if layout == "compact":
        rows, token_by_row, w_by_row = y_MD, d.token_by_row_N, ws.take("w_rows", (d.num_kept,), acc, y.device)
        w_by_row.index_copy_(0, d.row_N, d.weight_N.to(acc))
    else:
        rows = torch.index_select(y_MD, 0, d.slot_N, out=ws.take("rows", (d.num_kept, dim), y.dtype, y.device))
        token_by_row, w_by_row = d.token_N, d.weight_N.to(acc)
    gated = ws.take("gated", (d.num_kept, dim), acc, y.device)
    torch.mul(rows, w_by_row[:, None], out=gated)
    out.zero_()
    out.index_add_(0, token_by_row, gated)
    return out.to(y.dtype)


BACKEND = Backend(
    name="torch",
    description="index-based dispatch in plain torch (index_select, embedding_bag): the CPU path and the oracle",
    layouts=LAYOUTS,
    permute=permute,
    combine=combine,
    buffer_bytes=analytic_buffer_bytes,
    permute_into=permute_into,
    combine_into=combine_into,
)
