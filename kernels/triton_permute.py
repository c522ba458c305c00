"""Triton data movement for dispatch: gather rows, segmented weighted sums, combine's backward.

Three kernels cover permute and combine in both directions and both buffer layouts:

- ``gather_rows``: ``out[m] = src[index[m]]`` (optionally times ``scale[m]``), rows with index -1
  are zero. Permute forward: compact rows by ``token_by_row_N``; padded slots by the token of each
  slot (-1 for an unused one), so the zero padding is written in the same pass.
- ``segment_sum``: ``out[t] = sum_{p in ptr[t]..ptr[t+1]} weight[widx[p]] * src[index[p]]``, a
  CSR list per output row, summed in a fixed order in float32 (float64 for float64 rows): combine
  forward (the kept rows of each token, weighted by their gates) and permute backward (unweighted).
  No atomics: every output row is owned by one program, so the bits are the same on every run.
- ``combine_backward``: one pass over the buffer rows gives both gradients of combine, to the
  expert outputs (``weight[n] * grad_out[token]``, zero in unused slots) and to the gates
  (``dot(grad_out[token], y[row])``, each written by exactly one row).

Pure copies stay in the row dtype (exact for every float dtype, and safe in the interpreter,
which mishandles bf16 arithmetic); anything that multiplies or adds runs in float32/float64.
Loops are ``while`` loops: a runtime-bounded ``range`` breaks triton 3.6's interpreter under
numpy >= 2.4.

Shape letters: T tokens, D hidden, M buffer rows (N compact, E * C padded), N kept assignments.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import FLOAT_DTYPES, check_device, check_index, check_same_device, interpreted, next_pow2

__all__ = ["combine_backward", "gather_rows", "segment_sum"]


# src_ptr: [S, D] rows, row stride stride_s; index_ptr: [M] int64 source row of each output row,
# -1 leaves the row zero; scale_ptr: [M] float, multiplies each row when HAS_SCALE (math in ACC);
# out_ptr: [M, D], row stride stride_o. Grid: (cdiv(M, BLOCK_M), cdiv(D, BLOCK_D)).
@triton.jit
def _gather_rows_kernel(
    src_ptr,
    index_ptr,
    scale_ptr,
    out_ptr,
    M,
    D,
    stride_s,
    stride_o,
    HAS_SCALE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < M
    cmask = cols < D
    src_row = tl.load(index_ptr + rows, mask=rmask, other=-1)
    live = src_row >= 0
    vals = tl.load(
        src_ptr + src_row[:, None] * stride_s + cols[None, :],
        mask=live[:, None] & cmask[None, :],
        other=0.0,
    )
    if HAS_SCALE:
        scale = tl.load(scale_ptr + rows, mask=rmask & live, other=0.0).to(ACC)
        vals = vals.to(ACC) * scale[:, None]
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_o + cols[None, :]
    tl.store(out_ptrs, vals.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


# src_ptr: [S, D] rows (stride stride_s); ptr_ptr: [T + 1] int64 CSR offsets, output row t sums
# entries ptr[t] .. ptr[t+1]-1; index_ptr: [P] int64 source row of each entry; weight_ptr: [N]
# float gates and widx_ptr: [P] int64 gate of each entry (HAS_WEIGHT); out_ptr: [T, D] (stride
# stride_o), the sums in ACC cast to out's dtype. Grid: (cdiv(T, BLOCK_T), cdiv(D, BLOCK_D)).
@triton.jit
def _segment_sum_kernel(
    src_ptr,
    ptr_ptr,
    index_ptr,
    weight_ptr,
    widx_ptr,
    out_ptr,
    T,
    D,
    stride_s,
    stride_o,
    HAS_WEIGHT: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < T
    cmask = cols < D
    start = tl.load(ptr_ptr + rows, mask=rmask, other=0)
    count = tl.load(ptr_ptr + rows + 1, mask=rmask, other=0) - start
    longest = tl.max(count, axis=0)
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=ACC)
    # Entries j = 0, 1, ... of every row in this block, in CSR order: a fixed summation order.
    j = 0
    while j < longest:
        live = rmask & (j < count)
        src_row = tl.load(index_ptr + start + j, mask=live, other=0)
        vals = tl.load(
            src_ptr + src_row[:, None] * stride_s + cols[None, :],
            mask=live[:, None] & cmask[None, :],
            other=0.0,
        ).to(ACC)
        if HAS_WEIGHT:
            gate = tl.load(widx_ptr + start + j, mask=live, other=0)
            vals = vals * tl.load(weight_ptr + gate, mask=live, other=0.0).to(ACC)[:, None]
        acc += vals
        j += 1
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_o + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


# grad_ptr: [T, D] gradient of combine's output (stride stride_g); y_ptr: [M, D] expert outputs
# (stride stride_y); token_ptr: [M] int64 token of each buffer row, -1 for an unused slot;
# nrow_ptr: [M] int64 kept assignment n of each row (-1 unused); weight_ptr: [N] gates.
# grad_y_ptr: [M, D] out (stride stride_gy), weight[n] * grad[token], zero for unused rows;
# grad_w_ptr: [N] out, dot(grad[token], y[row]) in ACC. Grid: (cdiv(M, BLOCK_M),), a program
# walks all of D so that each dot product is summed by one program in a fixed order.
@triton.jit
def _combine_backward_kernel(
    grad_ptr,
    y_ptr,
    token_ptr,
    nrow_ptr,
    weight_ptr,
    grad_y_ptr,
    grad_w_ptr,
    M,
    D,
    stride_g,
    stride_y,
    stride_gy,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    token = tl.load(token_ptr + rows, mask=rmask, other=-1)
    n = tl.load(nrow_ptr + rows, mask=rmask, other=-1)
    live = token >= 0
    gate = tl.load(weight_ptr + n, mask=live, other=0.0).to(ACC)
    rows64 = rows.to(tl.int64)
    dot = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    d0 = 0
    while d0 < D:
        cols = d0 + tl.arange(0, BLOCK_D)
        cmask = cols < D
        lmask = live[:, None] & cmask[None, :]
        g = tl.load(grad_ptr + token[:, None] * stride_g + cols[None, :], mask=lmask, other=0.0).to(ACC)
        y = tl.load(y_ptr + rows64[:, None] * stride_y + cols[None, :], mask=lmask, other=0.0).to(ACC)
        dot += g * y
        gy = (g * gate[:, None]).to(grad_y_ptr.dtype.element_ty)
        tl.store(grad_y_ptr + rows64[:, None] * stride_gy + cols[None, :], gy, mask=rmask[:, None] & cmask[None, :])
        d0 += BLOCK_D
    tl.store(grad_w_ptr + n, tl.sum(dot, axis=1).to(grad_w_ptr.dtype.element_ty), mask=live)


# True when this process runs the kernels in triton's interpreter (decided at decoration time).
INTERPRETED = interpreted(_gather_rows_kernel)


def _acc(dtype: torch.dtype) -> tl.dtype:
    """Accumulation dtype: float64 for float64 rows, float32 otherwise (as the torch backend)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def _check_rows(name: str, t: torch.Tensor) -> torch.Tensor:
    """A [rows, D] float tensor with unit stride along D (made so when it is not)."""
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor [rows, D] (got {getattr(t, 'shape', type(t))})")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float16, bfloat16 or float64 (got {t.dtype})")
    check_device(name, t)
    return t if t.stride(1) == 1 or t.shape[1] <= 1 else t.contiguous()


def _tiles(rows: int, dim: int, interp: bool, elems: int = 4096) -> tuple[int, int]:
    """(BLOCK_rows, BLOCK_D). GPU: about ``elems`` values a program (32 a thread at 4 warps,
    no spills by ptxas -v; see kernels.triton_aot); interpreted: few, large programs."""
    if interp:
        return min(next_pow2(rows), 64), min(next_pow2(dim), 256)
    block_d = min(next_pow2(dim), 1024)
    return max(1, min(next_pow2(rows), elems // block_d)), block_d


def gather_rows(
    src_SD: torch.Tensor,
    index_M: torch.Tensor,
    scale_M: torch.Tensor | None = None,
    *,
    block: tuple[int, int] | None = None,
) -> torch.Tensor:
    """``out[m] = src[index[m]] * scale[m]`` (scale optional); rows with index -1 are zero.

    src_SD: [S, D] float rows; index_M: [M] int64 in [-1, S); scale_M: [M] float or None.
    Returns out_MD [M, D] in src's dtype: an exact copy without scale, else computed in float32
    (float64 for float64 src). block: (BLOCK_M, BLOCK_D) override, powers of two (tests).
    """
    src_SD = _check_rows("src_SD", src_SD)
    check_index("index_M", index_M)
    check_same_device("src_SD", src_SD, index_M=index_M, scale_M=scale_M)
    if scale_M is not None and (scale_M.dim() != 1 or scale_M.shape[0] != index_M.shape[0]):
        raise ValueError(f"scale_M must be [M] with M={index_M.shape[0]} (got {tuple(scale_M.shape)})")
    m, dim = index_M.shape[0], src_SD.shape[1]
    out_MD = torch.empty((m, dim), dtype=src_SD.dtype, device=src_SD.device)
    if m == 0 or dim == 0:
        return out_MD
    bm, bd = block or _tiles(m, dim, interpreted(_gather_rows_kernel))
    grid = (triton.cdiv(m, bm), triton.cdiv(dim, bd))
    _gather_rows_kernel[grid](
        src_SD,
        index_M.contiguous(),
        scale_M if scale_M is not None else index_M,  # never read without HAS_SCALE
        out_MD,
        m,
        dim,
        src_SD.stride(0),
        out_MD.stride(0),
        HAS_SCALE=scale_M is not None,
        ACC=_acc(src_SD.dtype),
        BLOCK_M=bm,
        BLOCK_D=bd,
    )
    return out_MD


def segment_sum(
    src_SD: torch.Tensor,
    ptr_T1: torch.Tensor,
    index_P: torch.Tensor,
    weight_N: torch.Tensor | None = None,
    widx_P: torch.Tensor | None = None,
    *,
    block: tuple[int, int] | None = None,
) -> torch.Tensor:
    """``out[t] = sum over p in ptr[t]..ptr[t+1]-1 of weight[widx[p]] * src[index[p]]``.

    src_SD: [S, D] float rows; ptr_T1: [T + 1] int64 CSR offsets (ptr[0] = 0, non-decreasing);
    index_P: [P] int64 rows of src; weight_N: [N] float gates with widx_P: [P] int64 into them,
    both or neither. Summed in float32 (float64 for float64 src) in CSR order, deterministic;
    returns out_TD [T, D] in src's dtype, zero rows for empty lists.
    """
    src_SD = _check_rows("src_SD", src_SD)
    check_index("ptr_T1", ptr_T1)
    check_index("index_P", index_P)
    if (weight_N is None) != (widx_P is None):
        raise ValueError("weight_N and widx_P come together: pass both or neither")
    if weight_N is not None:
        if weight_N.dim() != 1 or not weight_N.dtype.is_floating_point:
            raise ValueError(f"weight_N must be a 1-D float tensor (got {weight_N.dtype} {tuple(weight_N.shape)})")
        check_index("widx_P", widx_P)
        if widx_P.shape[0] != index_P.shape[0]:
            raise ValueError(f"widx_P must be [P] with P={index_P.shape[0]} (got {widx_P.shape[0]})")
    if ptr_T1.shape[0] < 1:
        raise ValueError("ptr_T1 must have T + 1 >= 1 entries")
    check_same_device("src_SD", src_SD, ptr_T1=ptr_T1, index_P=index_P, weight_N=weight_N, widx_P=widx_P)
    t, dim = ptr_T1.shape[0] - 1, src_SD.shape[1]
    out_TD = torch.empty((t, dim), dtype=src_SD.dtype, device=src_SD.device)
    if t == 0 or dim == 0:
        return out_TD
    bt, bd = block or _tiles(t, dim, interpreted(_segment_sum_kernel))
    grid = (triton.cdiv(t, bt), triton.cdiv(dim, bd))
    _segment_sum_kernel[grid](
        src_SD,
        ptr_T1.contiguous(),
        index_P.contiguous(),
        weight_N.contiguous() if weight_N is not None else src_SD,  # never read without HAS_WEIGHT
        widx_P.contiguous() if widx_P is not None else index_P,
        out_TD,
        t,
        dim,
        src_SD.stride(0),
        out_TD.stride(0),
        HAS_WEIGHT=weight_N is not None,
        ACC=_acc(src_SD.dtype),
        BLOCK_T=bt,
        BLOCK_D=bd,
    )
    return out_TD


def combine_backward(
    grad_TD: torch.Tensor,
    y_MD: torch.Tensor,
    token_M: torch.Tensor,
    n_M: torch.Tensor,
    weight_N: torch.Tensor,
    *,
    block: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both gradients of ``out[t] = sum_n weight[n] * y[row(n)]`` in one pass over the rows.

    grad_TD: [T, D] gradient of the output; y_MD: [M, D] expert outputs (compact or flattened
    padded); token_M, n_M: [M] int64 token and kept assignment of each row (-1 for unused slots);
    weight_N: [N] gates. Returns (grad_y_MD [M, D] in y's dtype, zero for unused rows;
    grad_w_N [N] in weight's dtype, each a dot product over D in float32/float64).
    """
    grad_TD = _check_rows("grad_TD", grad_TD)
    y_MD = _check_rows("y_MD", y_MD)
    check_index("token_M", token_M)
    check_index("n_M", n_M)
    if weight_N.dim() != 1 or not weight_N.dtype.is_floating_point:
        raise ValueError(f"weight_N must be a 1-D float tensor (got {weight_N.dtype} {tuple(weight_N.shape)})")
    m, dim = y_MD.shape
    if token_M.shape[0] != m or n_M.shape[0] != m:
        raise ValueError(f"token_M and n_M must be [M] with M={m} (got {token_M.shape[0]}, {n_M.shape[0]})")
    if grad_TD.shape[1] != dim:
        raise ValueError(f"grad_TD must be [T, D] with D={dim} (got {tuple(grad_TD.shape)})")
    check_same_device("y_MD", y_MD, grad_TD=grad_TD, token_M=token_M, n_M=n_M, weight_N=weight_N)
    grad_y = torch.empty((m, dim), dtype=y_MD.dtype, device=y_MD.device)
    grad_w = torch.zeros(weight_N.shape, dtype=weight_N.dtype, device=weight_N.device)
    if m == 0:
        return grad_y, grad_w
    acc = _acc(torch.promote_types(y_MD.dtype, grad_TD.dtype))
    bm, bd = block or _tiles(m, max(dim, 1), interpreted(_combine_backward_kernel), elems=2048)
    _combine_backward_kernel[(triton.cdiv(m, bm),)](
        grad_TD,
        y_MD,
        token_M.contiguous(),
        n_M.contiguous(),
        weight_N.contiguous(),
        grad_y,
        grad_w,
        m,
        dim,
        grad_TD.stride(0),
        y_MD.stride(0),
        grad_y.stride(0),
        ACC=acc,
        BLOCK_M=bm,
        BLOCK_D=bd,
    )
    return grad_y, grad_w
