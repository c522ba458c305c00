"""Triton ``positions``: expert histogram, offsets and each request's rank inside its expert.

The same contract as ``kernels.positions.positions`` (the torch reference), bit for bit: for
requests in priority order, ``rank_R[r]`` is the number of earlier requests to the same expert.
Three passes, no sort and no atomics on the result, so it is the same on every run:

1. Chunks of CHUNK consecutive requests, one program each. ``_chunk_rank_kernel`` (E up to
   ``MAX_RUNNING_E``) walks its chunk in sub-blocks of SUB requests, keeping a running count per
   expert in registers: a request's rank inside the chunk is the running count of its expert
   (``tl.gather``) plus the earlier requests of its sub-block with the same expert (one
   [SUB, SUB] comparison); then the sub-block's ``tl.histogram`` joins the running counts, whose
   final value is the chunk's row of the histogram. For larger E, ``_block_rank_kernel`` uses
   one sub-block per chunk and lets the last request of each expert write the chunk's count.
2. ``_scan_blocks_kernel``: per expert, an exclusive scan of the chunk counts over chunks (the
   requests to that expert before each chunk); its total is ``counts_E``. ``_offsets_kernel``
   scans ``counts_E`` into ``offsets_E`` (the first compact row of each expert).
3. ``_add_prefix_kernel``: global rank = rank inside the chunk + the chunk's prefix.

Work O(R * SUB + NB * E) with NB = ceil(R / CHUNK), memory O(R + NB * E). Loops are ``while``
loops or have constexpr bounds: a runtime-bounded ``range`` breaks triton 3.6's interpreter under
numpy >= 2.4.

Shape letters: R requests, E experts, NB chunks of requests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .positions import check_expert_R
from .triton_common import check_device, interpreted, next_pow2

__all__ = ["MAX_RUNNING_E", "expert_positions", "positions"]

# Largest E whose running counts live in registers (_chunk_rank_kernel); beyond, one sub-block
# per chunk (_block_rank_kernel).
MAX_RUNNING_E = 4096


# expert_ptr: [R] int64 expert of each request, priority order. local_ptr: [R] int64 out, rank
# inside its chunk of SUB * N_SUB requests; hist_ptr: [NB, E] int32 out, requests per expert in
# each chunk. E_P2 = next power of two >= E. Grid: (NB,).
@triton.jit
def _chunk_rank_kernel(
    expert_ptr, local_ptr, hist_ptr, R, E, SUB: tl.constexpr, N_SUB: tl.constexpr, E_P2: tl.constexpr
):
    pid = tl.program_id(0)
    i = tl.arange(0, SUB)
    base = pid.to(tl.int64) * (SUB * N_SUB)
    running = tl.zeros([E_P2], dtype=tl.int32)
    for s in range(N_SUB):
        offs = base + s * SUB + i
        valid = offs < R
        # Padding lanes get expert -1: they match no real request and are masked out below.
        e = tl.load(expert_ptr + offs, mask=valid, other=-1).to(tl.int32)
        same = e[:, None] == e[None, :]
        before = tl.sum((same & (i[None, :] < i[:, None])).to(tl.int32), axis=1)
        e_safe = tl.where(valid, e, 0)
        prior = tl.gather(running, e_safe, axis=0)
        tl.store(local_ptr + offs, (prior + before).to(tl.int64), mask=valid)
        running += tl.histogram(e_safe, E_P2, mask=valid)
    bins = tl.arange(0, E_P2)
    tl.store(hist_ptr + pid.to(tl.int64) * E + bins, running, mask=bins < E)


# expert_ptr: [R] int64; local_ptr: [R] int64 out, rank inside its block of BLOCK_R requests;
# hist_ptr: [NB, E] int32, zero on entry, out hist[b, e] = requests to e in block b. Any E.
# Grid: (NB,).
@triton.jit
def _block_rank_kernel(expert_ptr, local_ptr, hist_ptr, R, E, BLOCK_R: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    valid = offs < R
    e = tl.load(expert_ptr + offs, mask=valid, other=-1)
    i = tl.arange(0, BLOCK_R)
    same = e[:, None] == e[None, :]
    before = tl.sum((same & (i[None, :] < i[:, None])).to(tl.int32), axis=1)
    after = tl.sum((same & (i[None, :] > i[:, None])).to(tl.int32), axis=1)
    tl.store(local_ptr + offs, before.to(tl.int64), mask=valid)
    # The last request of each expert in the block knows the block's count: rank + 1.
    last = valid & (after == 0)
    tl.store(hist_ptr + pid.to(tl.int64) * E + e, before + 1, mask=last)


# hist_ptr: [NB, E] int32 block counts. prefix_ptr: [NB, E] int32 out, requests to e in blocks
# before b (exclusive scan over b); counts_ptr: [E] int64 out, requests per expert.
# Grid: (cdiv(E, BLOCK_E),); each program walks all NB blocks for its BLOCK_E experts.
@triton.jit
def _scan_blocks_kernel(hist_ptr, prefix_ptr, counts_ptr, NB, E, BLOCK_B: tl.constexpr, BLOCK_E: tl.constexpr):
    pid = tl.program_id(0)
    cols = pid * BLOCK_E + tl.arange(0, BLOCK_E)
    cmask = cols < E
    carry = tl.zeros([BLOCK_E], dtype=tl.int32)
    b0 = 0
    while b0 < NB:
        rows = b0 + tl.arange(0, BLOCK_B)
        mask = (rows < NB)[:, None] & cmask[None, :]
        ptrs = rows.to(tl.int64)[:, None] * E + cols[None, :]
        tile = tl.load(hist_ptr + ptrs, mask=mask, other=0)
        excl = tl.cumsum(tile, axis=0) - tile + carry[None, :]
        tl.store(prefix_ptr + ptrs, excl, mask=mask)
        carry += tl.sum(tile, axis=0)
        b0 += BLOCK_B
    tl.store(counts_ptr + cols, carry.to(tl.int64), mask=cmask)


# counts_ptr: [E] int64 requests per expert; offsets_ptr: [E] int64 out, exclusive scan.
# Grid: (1,); E is small next to R, so one program walking E in BLOCK_E chunks is enough.
@triton.jit
def _offsets_kernel(counts_ptr, offsets_ptr, E, BLOCK_E: tl.constexpr):
    carry = tl.zeros([1], dtype=tl.int64)
    e0 = 0
    while e0 < E:
        cols = e0 + tl.arange(0, BLOCK_E)
        cmask = cols < E
        c = tl.load(counts_ptr + cols, mask=cmask, other=0)
        tl.store(offsets_ptr + cols, tl.cumsum(c, axis=0) - c + carry, mask=cmask)
        carry += tl.sum(c, axis=0)
        e0 += BLOCK_E


# expert_ptr: [R] int64; rank_ptr: [R] int64 in: rank inside the chunk, out: global rank;
# prefix_ptr: [NB, E] int32 from _scan_blocks_kernel, chunks of CHUNK requests.
# Grid: (cdiv(R, BLOCK_R),).
@triton.jit
def _add_prefix_kernel(expert_ptr, rank_ptr, prefix_ptr, R, E, CHUNK: tl.constexpr, BLOCK_R: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    valid = offs < R
    e = tl.load(expert_ptr + offs, mask=valid, other=0)
    before = tl.load(prefix_ptr + (offs // CHUNK) * E + e, mask=valid, other=0)
    local = tl.load(rank_ptr + offs, mask=valid, other=0)
    tl.store(rank_ptr + offs, local + before.to(tl.int64), mask=valid)


def _check(expert_R: torch.Tensor, num_experts: int, tiles: tuple[int, int] | None) -> None:
    check_expert_R(expert_R, num_experts)
    if tiles is not None:
        sub, n_sub = tiles
        if sub < 1 or sub & (sub - 1) or n_sub < 1:
            raise ValueError(f"tiles must be (SUB, N_SUB) with SUB a power of two (got {tiles!r})")
    check_device("expert_R", expert_R)


def _default_tiles(r: int, e: int, interp: bool) -> tuple[int, int]:
    """(SUB, N_SUB). GPU: [64, 64] comparisons (32 values a thread at 4 warps), chunks of 1024
    so that NB stays small; the interpreter runs programs one after another: few, large ones."""
    if e > MAX_RUNNING_E:
        return (min(next_pow2(r), 512), 1) if interp else (64, 1)
    if interp:
        return min(next_pow2(r), 256), 4
    return 64, 16


def expert_positions(
    expert_R: torch.Tensor, num_experts: int, *, tiles: tuple[int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank of each request inside its expert, the expert histogram and its exclusive scan.

    expert_R: [R] int64 expert of each request in priority order, on CUDA (or CPU under
    TRITON_INTERPRET=1). tiles: (SUB, N_SUB) override, requests per sub-block (a power of two)
    and sub-blocks per chunk (tests use small ones to cross every edge; N_SUB is 1 when
    E > MAX_RUNNING_E). Returns (rank_R [R] int64, counts_E [E] int64, offsets_E [E] int64),
    equal to ``kernels.positions.positions`` and ``cumsum(counts_E) - counts_E``.
    Raises ValueError naming the argument for a bad rank, dtype, device or out-of-range value.
    """
    _check(expert_R, num_experts, tiles)
    r, e, dev = expert_R.shape[0], num_experts, expert_R.device
    if r:
        # One host sync, as in the reference: an out-of-range expert would write outside hist.
        lo, hi = int(expert_R.min()), int(expert_R.max())
        if lo < 0 or hi >= e:
            raise ValueError(f"expert_R values must lie in [0, {e}) (got {lo}..{hi})")
    if r >= 2**31:
        raise ValueError(f"expert_R has {r} requests; int32 chunk counts hold fewer than 2**31")
    counts_E = torch.empty(e, dtype=torch.int64, device=dev)
    offsets_E = torch.empty(e, dtype=torch.int64, device=dev)
    rank_R = torch.empty(r, dtype=torch.int64, device=dev)
    interp = interpreted(_chunk_rank_kernel)
    sub, n_sub = tiles or _default_tiles(r, e, interp)
    running = e <= MAX_RUNNING_E
    n_sub = n_sub if running else 1
    chunk = sub * n_sub
    nb = triton.cdiv(r, chunk)
    if r:
        x = expert_R.contiguous()
        if running:
            hist = torch.empty((nb, e), dtype=torch.int32, device=dev)
            _chunk_rank_kernel[(nb,)](x, rank_R, hist, r, e, SUB=sub, N_SUB=n_sub, E_P2=next_pow2(e))
        else:
            hist = torch.zeros((nb, e), dtype=torch.int32, device=dev)
            _block_rank_kernel[(nb,)](x, rank_R, hist, r, e, BLOCK_R=sub)
        prefix = torch.empty_like(hist)
        # About 2K counts a scan step (more spills, ptxas -v); one program per BLOCK_E experts
        # walks all chunks.
        block_e = min(next_pow2(e), 1024 if interp else 32)
        block_b = min(next_pow2(nb), max(1, (16384 if interp else 2048) // block_e))
        _scan_blocks_kernel[(triton.cdiv(e, block_e),)](hist, prefix, counts_E, nb, e, BLOCK_B=block_b, BLOCK_E=block_e)
        block_r = min(next_pow2(r), 4096 if interp else 1024)
        _add_prefix_kernel[(triton.cdiv(r, block_r),)](x, rank_R, prefix, r, e, CHUNK=chunk, BLOCK_R=block_r)
    else:
        counts_E.zero_()
    _offsets_kernel[(1,)](counts_E, offsets_E, e, BLOCK_E=min(next_pow2(e), 1024))
    return rank_R, counts_E, offsets_E


def positions(
    expert_R: torch.Tensor, num_experts: int, *, tiles: tuple[int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for ``kernels.positions.positions``: (rank_R [R] int64, counts_E [E] int64)."""
    rank_R, counts_E, _ = expert_positions(expert_R, num_experts, tiles=tiles)
    return rank_R, counts_E
