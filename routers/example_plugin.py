"""An example router plugin: copy this file, rename the router, and load it with

    moe-bench list routers --plugin my_router.py
    moe-bench route --router sampled,switch --plugin my_router.py

No harness file is edited. The router samples one expert per token from the softmax (a stochastic
top-1), which balances load better than argmax on skewed logits but routes tokens inconsistently.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_routing_bench.routers.contract import (
    Batch,
    Plan,
    Router,
    RouterConfig,
    RoutingError,
    load_balancing_loss,
    z_loss,
)
from moe_routing_bench.routers.registry import register_router


@dataclass(frozen=True)
class SampledConfig(RouterConfig):
    """Fields of RouterConfig (num_experts, top_k, capacity_factor, min_capacity, seed) plus
    temperature. Validation errors name the field and what is allowed."""

    capacity_factor: float | None = 1.0
    temperature: float = 1.0

    def validate(self) -> None:
        super().validate()
        if self.top_k != 1:
            raise RoutingError(f"sampled picks one expert per token: top_k must be 1 (got {self.top_k})")
        if not self.temperature > 0:
            raise RoutingError(f"temperature must be > 0 (got {self.temperature})")


@register_router("sampled")
class SampledRouter(Router):
    """Sampled top-1: one expert drawn from softmax(logits / temperature); token-order priority."""

    config_cls = SampledConfig
    config: SampledConfig

    def __init__(self, config: SampledConfig | None = None, **options) -> None:
        super().__init__(config, **options)
        self._gen = torch.Generator().manual_seed(self.config.seed)  # deterministic given its seed

    def route(self, batch: Batch) -> Plan:
        self.check_batch(batch)
        logits_TE = batch.logits_TE.float()
        probs_TE = torch.softmax(logits_TE / self.config.temperature, dim=-1)
        # Gumbel-max: argmax(log p + Gumbel noise) is a sample from p, vectorised over tokens.
        uniform_TE = torch.rand(probs_TE.shape, generator=self._gen).clamp_min(1e-20).to(logits_TE.device)
        gumbel_TE = -torch.log(-torch.log(uniform_TE))
        expert_T = (logits_TE / self.config.temperature + gumbel_TE).argmax(dim=-1)
        t = logits_TE.shape[0]
        token_R = torch.arange(t, device=logits_TE.device)
        return Plan(
            token_R=token_R,  # priority order: earlier tokens win a slot
            expert_R=expert_T,
            weight_R=probs_TE[token_R, expert_T],  # differentiable w.r.t. the logits
            num_tokens=t,
            num_experts=self.config.num_experts,
            capacity=self.config.capacity_for(t),
            top_k=1,
            aux_loss=load_balancing_loss(probs_TE, expert_T, 1),
            z_loss=z_loss(logits_TE),
        )
