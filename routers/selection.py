"""The tie rule, once: which of several equal scores wins a slot, on every device.

DESIGN.md: among equal scores the lower expert index wins a token-choice slot, and the lower token
index wins an expert-choice slot. ``torch.topk`` promises neither (on all-equal logits with E = 8,
CPU's topk picked experts 5 and 6 for K = 2), and CPU and CUDA order equal values differently, so
every router selects through :func:`top_indices` (``argmax`` for K = 1: torch documents that it
returns the first of several maxima, on every device).

How it stays fast. ``torch.topk(x, k + 1)``, sorted by value, then only rows with a tie among those
k + 1 values need more work:

- a tie inside the first k (the set is right, its order is not): the row's k + 1 values are
  re-ordered by (value descending, index ascending), one sort of an int64 key;
- a tie at the boundary (the (k + 1)-th value equals the k-th, so the set itself is ambiguous):
  every value above the k-th is taken, then the lowest indices among those equal to it.

On continuous logits almost no row has a tie and the cost over a bare ``torch.topk`` is one more
column (measured at T = 200,000, E = 256, K = 8 on 2 CPU cores: +3%; on bf16-quantised logits,
where 39% of rows tie, +22%). For large k (expert choice, k = C tokens per expert) most rows
hold a tie somewhere, so every row is ordered by the key after an unsorted ``topk``.

Shape letters: R rows (tokens for token choice, experts for expert choice), C columns, k chosen.
"""

from __future__ import annotations

import torch

# Above this k, order every row by its key instead of looking for the rows that need it.
ORDER_ALL_ABOVE = 32


def _key(v_Rk: torch.Tensor, i_Rk: torch.Tensor) -> torch.Tensor:
    """int64 keys whose descending order is (value descending, index ascending).

    The high 32 bits are the float32 value's bits made order-preserving as a signed integer
    (negative floats have their 31 low bits flipped; ``+ 0.0`` turns -0.0 into +0.0, an equal score);
    the low 32 bits are ``2**31 - 1 - index``, so of two equal values the lower index is larger.
    """
    bits = (v_Rk.float() + 0.0).view(torch.int32)
    bits = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return (bits.to(torch.int64) << 32) | (0x7FFFFFFF - i_Rk)


def _ordered(v_Rk: torch.Tensor, i_Rk: torch.Tensor) -> torch.Tensor:
    """``i_Rk`` re-ordered per row by (value descending, index ascending); v_Rk are its values."""
    order = torch.sort(_key(v_Rk, i_Rk), dim=-1, descending=True).indices
    return i_Rk.gather(1, order)


def _resolve_boundary(x_RC: torch.Tensor, kth_R: torch.Tensor, k: int) -> torch.Tensor:
    """Rows whose k-th largest value ``kth_R`` also appears outside the top k: every value above it,
    then the lowest indices among the values equal to it; ordered by the tie rule. [R, k]."""
    above = x_RC > kth_R[:, None]
    equal = x_RC == kth_R[:, None]
    need = k - above.sum(dim=-1, keepdim=True)  # >= 1: at most k - 1 values exceed the k-th
    chosen = above | (equal & (equal.cumsum(dim=-1) <= need))
    idx_Rk = chosen.nonzero()[:, 1].view(-1, k)  # exactly k per row, in ascending index order
    return _ordered(x_RC.gather(1, idx_Rk), idx_Rk)


def top_indices(scores_RC: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores of each row, by the tie rule: [R, k] int64, ordered by score
    descending and, among equal scores, by index ascending (so the lower index wins a slot).

    scores_RC: [R, C] finite floating-point scores (logits, probabilities, biased scores).
    Not differentiable (selection is not): gather the gates from the scores with these indices.
    """
    r, c = scores_RC.shape
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= c:
        raise ValueError(f"k must be an integer between 1 and the {c} columns of scores_RC (got {k!r})")
    with torch.no_grad():
        x = scores_RC.detach()
        if k == 1:
            return x.argmax(dim=-1, keepdim=True)  # the first maximum, on every device
        if k == c:
            every = torch.arange(c, device=x.device).expand(r, c)
            return _ordered(x, every)
        if k > ORDER_ALL_ABOVE:
            v, i = torch.topk(x, k + 1, dim=-1, sorted=False)
            i = _ordered(v, i)
            v = x.gather(1, i)
        else:
            v, i = torch.topk(x, k + 1, dim=-1)
            inner_R = (v[:, 1:k] == v[:, : k - 1]).any(dim=-1)
            if bool(inner_R.any()):
                rows = inner_R.nonzero().squeeze(1)
                i[rows] = _ordered(v[rows], i[rows])
        boundary_R = v[:, k] == v[:, k - 1]
        i = i[:, :k]
        if bool(boundary_R.any()):
            rows = boundary_R.nonzero().squeeze(1)
            i[rows] = _resolve_boundary(x[rows], v[rows, k - 1], k)
        return i
