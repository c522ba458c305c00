"""Expert-choice routing (Zhou et al. 2022): experts pick tokens, not tokens experts.

Scores are the softmax over E. Each expert takes its top-C tokens by score, with
``C = ceil(cf * K * T / E)`` from the shared capacity formula, K the *average* number of experts
per token (default 2, matching top-2's compute), so cf is the same slack knob as for every other
router. The gate of an assignment is the score itself. A token may be chosen by 0..E experts.

The plan lists each expert's chosen tokens, expert-major, by score descending, with capacity C:
``positions`` keeps exactly those C per expert (among equal scores, the lower token index wins a
slot: ``routers.selection``), so nothing is ever "dropped" (drop_rate is NaN)
while ``tokens_dropped_frac`` counts tokens no expert chose. Choosing per expert needs the whole
batch, so a decoder could not route this way at inference; the plan says so
(``looks_at_whole_batch``). No auxiliary loss: the balance is perfect by construction.

Shape letters: T tokens, E experts, C capacity per expert, R = E * C requested assignments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .contract import Batch, Plan, Router, RouterConfig, RoutingError, softmax_lse, z_loss
from .registry import register_router
from .selection import top_indices


@dataclass(frozen=True)
class ExpertChoiceConfig(RouterConfig):
    """top_k: K, the average experts per token in C = ceil(cf K T / E) (default 2).
    capacity_factor is required (default 1.0): every expert takes exactly C tokens."""

    top_k: int = 2
    capacity_factor: float | None = 1.0

    def validate(self) -> None:
        if self.capacity_factor is None:
            raise RoutingError(
                "expert_choice has no dropless form: each expert takes its top-C tokens, so "
                "capacity_factor must be a number > 0 (got None)"
            )
        super().validate()


@register_router("expert_choice")
class ExpertChoiceRouter(Router):
    """Expert choice (Zhou et al.): each expert takes its top-C tokens by softmax score; no aux loss."""

    config_cls = ExpertChoiceConfig
    config: ExpertChoiceConfig

    def route(self, batch: Batch) -> Plan:
        self.check_batch(batch)
        cfg = self.config
        logits_TE = batch.logits_TE.float()
        t, e = logits_TE.shape
        # capacity() clamps to [1, T] before min_capacity; an expert cannot take more than T tokens.
        c = min(cfg.capacity_for(t), t)
        probs_TE, lse_T = softmax_lse(logits_TE)
        # Each expert's row of a contiguous [E, T] transpose (topk on the view is 1.6x slower on
        # CPU): its C best tokens by score, the lower token index first among equal scores.
        probs_ET = probs_TE.t().contiguous()
        token_EC = top_indices(probs_ET, c)
        gate_EC = probs_ET.gather(1, token_EC)
        expert_R = torch.arange(e, device=logits_TE.device).repeat_interleave(c)
        return Plan(
            token_R=token_EC.reshape(-1),
            expert_R=expert_R,
            weight_R=gate_EC.reshape(-1),
            num_tokens=t,
            num_experts=e,
            capacity=c,
            top_k=cfg.top_k,
            aux_loss=None,
            z_loss=z_loss(logits_TE, lse_T),
            looks_at_whole_batch=True,
            experts_choose=True,
        )
