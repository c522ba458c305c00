"""Drops where they hurt: drop rate and tokens dropped by token-frequency bucket and by position.

``moe-bench route --breakdown``. Definitions (pooled over the run's batches, not averaged per batch):

- Token-frequency buckets: every token id's count over the measured batches themselves (the fit
  slice is one batch, too small to rank rare ids), ids sorted by count (most frequent first, ties
  by id); ``frequent`` holds the ids that make up the first third of all token occurrences,
  ``middle`` the second third, ``rare`` the rest. Buckets hold about a third of the tokens each
  (an id is never split, so a very frequent id can make its bucket larger).
- Position buckets: quartiles of the position within the sequence, ``floor(4 * pos / L)`` with L
  the length of the sequence's run of tokens in the batch (sequence ids from the workload; a batch
  without them is one sequence).
- Per bucket: ``tokens`` (occurrences), ``token_share``, ``requests`` (requested assignments of
  those tokens), ``drop_rate`` = 1 - kept / requested (NaN for routers that choose tokens per
  expert), ``tokens_dropped_frac`` = share of the bucket's tokens left with no expert.

The routing is a second pass with a fresh router built from the measured run's config (fitted on
the same fit slice), so the timing of the main pass is not disturbed; routers are deterministic,
so the plans are the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from moe_routing_bench.kernels.positions import kept_mask, positions
from moe_routing_bench.routers.contract import Batch, Router
from moe_routing_bench.routers.validate import validate_plan

FREQ_BUCKETS = ("frequent", "middle", "rare")
POS_BUCKETS = ("q1", "q2", "q3", "q4")


def frequency_table(batches: Iterable[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids ascending [U], bucket of each id [U] in 0..2) from the ids' counts over ``batches``."""
    ids = torch.cat([b.token_T.detach().cpu() for b in batches])
    uniq_U, count_U = torch.unique(ids, return_counts=True)
    order = torch.sort(count_U, descending=True, stable=True).indices  # ties: id ascending
    before = torch.cumsum(count_U[order], 0) - count_U[order]  # occurrences of more frequent ids
    bucket_sorted = torch.clamp((3 * before) // ids.numel(), max=2)
    bucket_U = torch.empty_like(bucket_sorted)
    bucket_U[order] = bucket_sorted
    return uniq_U, bucket_U


def position_quartile(seq_T: torch.Tensor | None, num_tokens: int) -> torch.Tensor:
    """[T] int64 quartile (0..3) of each token's position within its sequence's run in the batch."""
    if seq_T is None:
        seq_T = torch.zeros(num_tokens, dtype=torch.int64)
    seq_T = seq_T.detach().cpu()
    start_T = torch.ones(num_tokens, dtype=torch.bool)
    start_T[1:] = seq_T[1:] != seq_T[:-1]
    idx = torch.arange(num_tokens)
    run_start_T = torch.cummax(torch.where(start_T, idx, torch.zeros_like(idx)), 0).values
    run_id_T = torch.cumsum(start_T.long(), 0) - 1
    run_len = torch.bincount(run_id_T)
    pos_T = idx - run_start_T
    return torch.clamp((4 * pos_T) // run_len[run_id_T], max=3)


class _Counts:
    def __init__(self, n: int) -> None:
        self.tokens = torch.zeros(n, dtype=torch.int64)
        self.served = torch.zeros(n, dtype=torch.int64)
        self.requests = torch.zeros(n, dtype=torch.int64)
        self.kept = torch.zeros(n, dtype=torch.int64)

    def add(self, bucket_T, served_T, token_R, kept_R) -> None:
        n = self.tokens.numel()
        self.tokens += torch.bincount(bucket_T, minlength=n)
        self.served += torch.bincount(bucket_T[served_T], minlength=n)
        bucket_R = bucket_T[token_R]
        self.requests += torch.bincount(bucket_R, minlength=n)
        self.kept += torch.bincount(bucket_R if kept_R is None else bucket_R[kept_R], minlength=n)

    def table(self, names: tuple[str, ...], whole_batch: bool) -> dict[str, dict[str, Any]]:
        total = int(self.tokens.sum())
        out = {}
        for i, name in enumerate(names):
            tok, req = int(self.tokens[i]), int(self.requests[i])
            out[name] = {
                "tokens": tok,
                "token_share": tok / total if total else math.nan,
                "requests": req,
                "drop_rate": math.nan if whole_batch or req == 0 else 1.0 - int(self.kept[i]) / req,
                "tokens_dropped_frac": 1.0 - int(self.served[i]) / tok if tok else math.nan,
            }
        return out


def breakdown(
    router: Router,
    make_batches: Callable[[], Iterable[Batch]],
    fit_sample: Batch | None = None,
    label: str | None = None,
) -> dict[str, Any]:
    """Route the batches again with a fresh copy of ``router`` and split drops by bucket (every
    plan checked by ``validate_plan``, the router named ``label`` in its errors)."""
    ids_U, bucket_U = frequency_table(make_batches())
    fresh = type(router)(router.config)
    if fit_sample is not None:
        fresh.fit(fit_sample)
    freq, pos = _Counts(len(FREQ_BUCKETS)), _Counts(len(POS_BUCKETS))
    whole_batch = False
    with torch.inference_mode():
        for batch in make_batches():
            plan = validate_plan(fresh, batch, fresh.route(batch), label)
            whole_batch = whole_batch or plan.looks_at_whole_batch
            token_R = plan.token_R.detach().cpu()
            kept_R = None
            if plan.capacity is not None:
                rank_R, _ = positions(plan.expert_R, plan.num_experts)
                kept_R = kept_mask(rank_R, plan.capacity).cpu()
            served_T = torch.zeros(plan.num_tokens, dtype=torch.bool)
            served_T[token_R if kept_R is None else token_R[kept_R]] = True
            tok_T = batch.token_T.detach().cpu()
            freq.add(bucket_U[torch.searchsorted(ids_U, tok_T)], served_T, token_R, kept_R)
            pos.add(position_quartile(batch.seq_T, plan.num_tokens), served_T, token_R, kept_R)
            fresh.update(plan)
    return {
        "token_frequency": freq.table(FREQ_BUCKETS, whole_batch),
        "position": pos.table(POS_BUCKETS, whole_batch),
    }
