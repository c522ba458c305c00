"""Sinkhorn routing (Clark et al. 2022, "Unified Scaling Laws for Routed Language Models": S-BASE;
Megatron-core's ``sinkhorn`` load balancing).

Selection balances the batch by optimal transport instead of a loss. Rescale the rows and columns
of ``exp(logits)`` until every row sums to 1 / T and every column to 1 / E (uniform marginals:
each token sends one unit, each expert receives T / E); each token then takes the K largest
entries of its row of that matrix. The gates are the plain softmax probabilities of the chosen
experts (as Megatron-core's for K > 1; not renormalised), so gradients reach the gate exactly as
for top-K, and the balance costs no auxiliary loss: the plan has none (``aux_loss`` is NaN).

The iteration (Sinkhorn-Knopp, in the scaling vectors): with ``K_te = exp(x_te - max_e x_te)``,

    r_t = 1 / sum_e K_te d_e                  (rows of diag(r) K diag(d) sum to 1)
    share_e = d_e * sum_t K_te r_t * E / T    (column marginals over their target T / E)
    stop when max_e |share_e - 1| <= tol, else d_e <- d_e / share_e

A row's top-K of ``diag(r) K diag(d)`` is its top-K of ``x_te + log d_e`` (r_t is constant along a
row), so only ``log d`` is kept; ties go to the lower expert index (``routers.selection``). Entries
more than ``LOG_RANGE`` = 40 nats below their row's maximum (probability below 5e-18) are raised to
that floor and d is kept within ``[e^-40, 1]``, so every float32 product stays a normal number and
the iteration cannot produce an infinity or NaN for any finite logits. Each iteration is two
matrix-vector products over [T, E]; ``tol`` and ``max_iters`` are options and the iterations used
are reported (``plan.extras["iterations"]``, the ``router_iters`` metric; the final marginal error
is ``plan.extras["marginal_error"]``). On real tokens a frequent id repeats the same logits, so all
its copies go to the same experts: Sinkhorn balances the assignment, not the identical rows.

Capacity as ``topk``: dropless by default; with a capacity factor, C = ceil(cf K T / E) and
priority choice-major. Like expert choice it reads the whole batch (the column marginals), so a
decoder routing one token at a time could not balance this way at inference (Megatron-core routes
by the plain top-K there); the plan says so (``looks_at_whole_batch``).

Shape letters: T tokens, E experts, K choices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .contract import Batch, Plan, Router, RouterConfig, RoutingError, choice_major, softmax_lse, z_loss
from .registry import register_router
from .selection import top_indices

LOG_RANGE = 40.0  # nats below a row's maximum that the matrix resolves (see the module docstring)


def sinkhorn_log_scaling(logits_TE: torch.Tensor, tol: float, max_iters: int) -> tuple[torch.Tensor, int, float]:
    """Column scaling of ``exp(logits)`` to uniform marginals.

    Returns (log_d_E [E] float32 in [-LOG_RANGE, 0], iterations used, final max relative column
    marginal error). Not differentiable (selection is not).
    """
    with torch.no_grad():
        x_TE = logits_TE.detach().float()
        t, e = x_TE.shape
        kernel_TE = torch.exp((x_TE - x_TE.max(dim=-1, keepdim=True).values).clamp_min_(-LOG_RANGE))
        d_E = torch.ones(e, dtype=torch.float32, device=x_TE.device)
        floor = math.exp(-LOG_RANGE)
        error, iters = math.inf, 0
        for iters in range(1, max_iters + 1):  # noqa: B007 (the count is the result)
            r_T = (kernel_TE @ d_E).reciprocal_()
            share_E = d_E * (kernel_TE.t() @ r_T) * (e / t)
            error = float((share_E - 1.0).abs().max())
            if error <= tol:
                break
            d_E = d_E / share_E
            d_E = (d_E / d_E.max()).clamp_min_(floor)
        return d_E.log(), iters, error


@dataclass(frozen=True)
class SinkhornConfig(RouterConfig):
    """top_k: K choices per token (default 2). tol: the largest relative error of a column marginal
    at which the iteration stops (> 0). max_iters: its cap (>= 1). Dropless unless capacity_factor
    is set; then choice-major priority."""

    top_k: int = 2
    capacity_factor: float | None = None
    tol: float = 1e-3
    max_iters: int = 100

    def validate(self) -> None:
        super().validate()
        tol = self.tol
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol <= 0:
            raise RoutingError(f"tol must be a finite number > 0 (got {tol!r})")
        it = self.max_iters
        if isinstance(it, bool) or not isinstance(it, int) or it < 1:
            raise RoutingError(f"max_iters must be an integer >= 1 (got {it!r})")


@register_router("sinkhorn")
class SinkhornRouter(Router):
    """Sinkhorn (S-BASE): top-K of the Sinkhorn-balanced score matrix, gates = softmax; no aux loss."""

    config_cls = SinkhornConfig
    config: SinkhornConfig

    def route(self, batch: Batch) -> Plan:
        self.check_batch(batch)
        cfg = self.config
        logits_TE = batch.logits_TE.float()
        t = logits_TE.shape[0]
        probs_TE, lse_T = softmax_lse(logits_TE)
        log_d_E, iters, error = sinkhorn_log_scaling(logits_TE, cfg.tol, cfg.max_iters)
        expert_TK = top_indices(logits_TE.detach() + log_d_E, cfg.top_k)
        gate_TK = probs_TE.gather(1, expert_TK)
        token_R, expert_R, weight_R = choice_major(expert_TK, gate_TK)
        device = logits_TE.device
        return Plan(
            token_R=token_R,
            expert_R=expert_R,
            weight_R=weight_R,
            num_tokens=t,
            num_experts=cfg.num_experts,
            capacity=cfg.capacity_for(t),
            top_k=cfg.top_k,
            aux_loss=None,
            z_loss=z_loss(logits_TE, lse_T),
            extras={
                "iterations": torch.tensor(float(iters), device=device),
                "marginal_error": torch.tensor(error, device=device),
            },
            looks_at_whole_batch=True,
        )
