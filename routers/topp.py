"""Top-p (dynamic) routing: Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic Routing in
MoE Models".

Each token takes experts in descending router probability until their cumulative probability
reaches ``p``: the smallest prefix of its sorted softmax whose sum is at least p, the expert that
crosses p included, then clamped to ``[min_k, max_k]``. A confident token takes one expert, an
unsure one several, so K varies per token. Gates are the chosen probabilities themselves (as in
the paper: not renormalised). Among equal probabilities the lower expert index comes first
(``routers.selection``).

K per token is not fixed, so the capacity formula uses the batch's mean K: with R requested
assignments, ``C = ceil(cf * (R / T) * T / E) = ceil(cf * R / E)``, computed exactly; the plan's
``top_k`` is R / T and the ``top_k_effective`` metric reports it. Dropless by default; with a
capacity factor, priority is choice-major (every token's first choice, then the second choices of
the tokens that have one, and so on, token order inside each). The aux loss is the shared one with
K = R / T, so it is 1.0 at perfect balance (as for gshard, whose second choice is also optional).
The paper's training adds an entropy ("dynamic") loss that pushes the distribution to be peaked so
fewer experts are needed; it is not part of the plan (the quality job trains with the aux loss only).

Shape letters: T tokens, E experts, M = max_k candidate choices, R requested assignments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch

from .contract import (
    Batch,
    Plan,
    Router,
    RouterConfig,
    RoutingError,
    load_balancing_loss,
    sequence_balance_loss,
    softmax_lse,
    z_loss,
)
from .options import fixed
from .registry import register_router
from .selection import top_indices


@dataclass(frozen=True)
class TopPConfig(RouterConfig):
    """p: cumulative probability each token's experts must reach, in (0, 1] (default 0.4, the
    paper's). min_k, max_k: bounds on the experts per token (1 <= min_k <= max_k <= num_experts;
    default 1 and 4). Dropless unless capacity_factor is set; then C uses the batch's mean K."""

    top_k: int = fixed(1, "topp chooses K per token, between min_k and max_k")
    capacity_factor: float | None = None
    p: float = 0.4
    min_k: int = 1
    max_k: int = 4

    def validate(self) -> None:
        super().validate()
        p = self.p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or not 0 < p <= 1:
            raise RoutingError(f"p must be a number in (0, 1] (got {p!r})")
        for name, low in (("min_k", 1), ("max_k", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise RoutingError(f"{name} must be an integer >= {low} (got {v!r})")
        if self.max_k > self.num_experts:
            raise RoutingError(f"max_k must be <= num_experts = {self.num_experts} (got {self.max_k})")
        if self.min_k > self.max_k:
            raise RoutingError(f"min_k must be <= max_k = {self.max_k} (got {self.min_k})")


def top_p_counts(sorted_prob_TM: torch.Tensor, p: float, min_k: int) -> torch.Tensor:
    """[T] experts per token: the length of the shortest prefix of each row of descending
    probabilities whose sum reaches ``p`` (the crossing one included), clamped to [min_k, M]."""
    below_T = (sorted_prob_TM.cumsum(dim=-1) < p).sum(dim=-1)
    return (below_T + 1).clamp(min=min_k, max=sorted_prob_TM.shape[1])


@register_router("topp")
class TopPRouter(Router):
    """Top-p (Huang et al. 2024): experts by probability until their sum reaches p; K varies per token."""

    config_cls = TopPConfig
    config: TopPConfig

    def route(self, batch: Batch) -> Plan:
        self.check_batch(batch)
        cfg = self.config
        logits_TE = batch.logits_TE.float()
        t = logits_TE.shape[0]
        probs_TE, lse_T = softmax_lse(logits_TE)
        # Descending logits are descending probabilities; only the first max_k can be chosen.
        expert_TM = top_indices(logits_TE, cfg.max_k)
        prob_TM = probs_TE.gather(1, expert_TM)
        count_T = top_p_counts(prob_TM.detach(), cfg.p, cfg.min_k)
        # Choice-major: column m holds every token's (m+1)-th choice, kept where the token has one.
        chosen_MT = (torch.arange(cfg.max_k, device=logits_TE.device)[:, None] < count_T[None, :]).reshape(-1)
        token_R = torch.arange(t, device=logits_TE.device).repeat(cfg.max_k)[chosen_MT]
        expert_R = expert_TM.t().reshape(-1)[chosen_MT]
        weight_R = prob_TM.t().reshape(-1)[chosen_MT]
        r = token_R.shape[0]
        return Plan(
            token_R=token_R,
            expert_R=expert_R,
            weight_R=weight_R,
            num_tokens=t,
            num_experts=cfg.num_experts,
            capacity=cfg.capacity_for(t, Fraction(r, t)),
            top_k=r / t,
            aux_loss=load_balancing_loss(probs_TE, expert_R, r / t),
            z_loss=z_loss(logits_TE, lse_T),
            aux_loss_seq=sequence_balance_loss(probs_TE, token_R, expert_R, batch.seq_T),
        )
