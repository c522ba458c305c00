"""Auxiliary-loss-free load balancing (DeepSeek-V3, Wang et al. 2024; Megatron-core's expert bias).

A per-expert bias ``b_E`` is added to the router's scores for *selection only*: which experts a
token asks for is decided on ``score + b``, while its gates are the unbiased scores. After each
batch, ``update(plan)`` moves every expert's bias one step towards balance,

    b_e += rate * sign(mean_e' R_e' - R_e)

with R_e the batch's *requested* load (assignments asked of expert e before capacity), so an
overloaded expert becomes less attractive and an idle one more. ``bias_update_rate`` is the rate
(0 = off, the default); DeepSeek-V3 used 0.001 on sigmoid scores.

The scores the bias is added to are those the peers use: the softmax probabilities for the softmax
routers (switch, topk, gshard, the nllb form's level 2), the sigmoid scores for the groups form of
``hierarchical`` (torchtitan and Megatron-core likewise add it after the score function), so the
rate is in probability units.

State lives in the router, as a float32 [E] tensor on the device of the plans it learns from. The
jobs build a fresh router per configuration (state starts at 0) and call ``update`` after every
batch routed in sequence: ``route``, ``run``, ``simulate``, ``quality``, and ``ep``, which first
gathers the step's plan from every rank so all ranks keep the same bias (the all-reduce of
token counts a data-parallel trainer does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .contract import Plan, Router, RouterConfig, RoutingError


@dataclass(frozen=True)
class BiasBalancedConfig(RouterConfig):
    """bias_update_rate: the step of the selection bias per batch (0 = off)."""

    bias_update_rate: float = 0.0

    def validate(self) -> None:
        super().validate()
        rate = self.bias_update_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate < 0:
            raise RoutingError(f"bias_update_rate must be a finite number >= 0, 0 for off (got {rate!r})")


class BiasBalancedRouter(Router):
    """A token-choice router with the selection bias: ``selection_scores`` and ``update``."""

    config: BiasBalancedConfig

    def __init__(self, config: RouterConfig | None = None, **options) -> None:
        super().__init__(config, **options)
        self._bias_E: torch.Tensor | None = None

    @property
    def stateful(self) -> bool:
        return self.config.bias_update_rate > 0

    @property
    def expert_bias(self) -> torch.Tensor:
        """[E] float32 the current selection bias (zeros before the first update)."""
        if self._bias_E is None:
            return torch.zeros(self.config.num_experts)
        return self._bias_E.clone()

    def selection_scores(self, scores_TE: torch.Tensor) -> torch.Tensor | None:
        """``scores + b`` (detached: selection is not differentiable), or None while balancing is
        off, so a router without it selects on its own scores exactly as before."""
        if not self.stateful:
            return None
        biased = scores_TE.detach().float()
        if self._bias_E is not None:
            biased = biased + self._bias_E.to(biased.device)
        return biased

    def update(self, plan: Plan) -> None:
        """``b_e += rate * sign(mean load - R_e)`` from this batch's requested load."""
        if not self.stateful:
            return
        load_E = torch.bincount(plan.expert_R.detach(), minlength=plan.num_experts).float()
        step_E = self.config.bias_update_rate * torch.sign(load_E.mean() - load_E)
        # Out of place: the bias may be read under inference mode and updated outside it.
        bias = self._bias_E if self._bias_E is not None else torch.zeros_like(step_E)
        self._bias_E = bias.to(step_E.device) + step_E
