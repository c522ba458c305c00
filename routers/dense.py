"""The dense mixture of experts: every token to every expert, softmax weights, weighted sum.

The classic mixture (Jacobs et al. 1991) is the quality and cost ceiling the sparse routers are
measured against: K = E, so the plan holds ``T * E`` requests (at T = 10^6 and E = 256 that is 256M
requests, 5 GiB of plan arrays; benchmarks size it accordingly).

Request order is expert-major: expert 0's tokens in token order, then expert 1's, and so on. Only
the order *within* an expert matters to ``positions``, and that is token order, the same as a
choice-major order would give; expert-major needs no sort. Dropless by default. With a capacity
factor, ``C = ceil(cf * E * T / E) = ceil(cf * T)``: any cf >= 1 keeps everything, and cf < 1
keeps each expert's first C tokens.

aux_loss is defined and equals 1.0 by construction (every R_e = T, and the softmax sums to 1);
it is returned as ``sum_e P_e`` so it keeps the contract's form (and a zero gradient).

Shape letters: T tokens, E experts, R = T * E requested assignments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .contract import Batch, Plan, Router, RouterConfig, RoutingError, sequence_balance_loss, softmax_lse, z_loss
from .options import fixed
from .registry import register_router


@dataclass(frozen=True)
class DenseConfig(RouterConfig):
    """top_k is every expert: leave it unset (it becomes num_experts) or pass num_experts.
    Dropless unless capacity_factor is set."""

    # top_k is fixed to num_experts in __post_init__; capacity_factor stays None unless set on
    # dense itself (the shared --capacity-factor does not apply: dense is the dropless ceiling).
    top_k: int | None = fixed(None, "dense sends every token to every expert")  # type: ignore[assignment]
    capacity_factor: float | None = fixed(None, "dense has no capacity: every token goes to every expert")

    def __post_init__(self) -> None:
        if self.top_k is None and isinstance(self.num_experts, int):
            object.__setattr__(self, "top_k", self.num_experts)
        self.validate()

    def validate(self) -> None:
        super().validate()
        if self.top_k != self.num_experts:
            raise RoutingError(
                f"dense sends every token to every expert: top_k must be unset or num_experts = "
                f"{self.num_experts} (got {self.top_k})"
            )


@register_router("dense")
class DenseRouter(Router):
    """Dense mixture: every expert, softmax weights over E (the ceiling the sparse routers face)."""

    config_cls = DenseConfig
    config: DenseConfig

    def route(self, batch: Batch) -> Plan:
        self.check_batch(batch)
        cfg = self.config
        logits_TE = batch.logits_TE.float()
        t, e = logits_TE.shape
        device = logits_TE.device
        probs_TE, lse_T = softmax_lse(logits_TE)
        token_R = torch.arange(t, device=device).repeat(e)
        expert_R = torch.arange(e, device=device).repeat_interleave(t)
        return Plan(
            token_R=token_R,
            expert_R=expert_R,
            weight_R=probs_TE.t().reshape(-1),
            num_tokens=t,
            num_experts=e,
            capacity=cfg.capacity_for(t),
            top_k=e,
            # E / (E T) * sum_e T * P_e = sum_e P_e = 1: no bincount over T * E requests needed.
            aux_loss=probs_TE.mean(dim=0).sum(),
            z_loss=z_loss(logits_TE, lse_T),
            aux_loss_seq=sequence_balance_loss(probs_TE, token_R, expert_R, batch.seq_T),
        )
