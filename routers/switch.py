"""Switch Transformer's top-1 router (Fedus et al. 2021)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .contract import Batch, Plan, Router, RouterConfig, RoutingError, load_balancing_loss, z_loss
from .options import fixed
from .registry import register_router


@dataclass(frozen=True)
class SwitchConfig(RouterConfig):
    """top_k is fixed at 1. batch_prioritized: priority by gate, descending (Riquelme et al.
    2021), instead of token order. jitter: multiplicative noise U(1 - j, 1 + j) on the logits
    (training only; off in benchmarks)."""

    top_k: int = fixed(1, "switch routes each token to one expert")
    capacity_factor: float | None = 1.0
    batch_prioritized: bool = False
    jitter: float = 0.0

    def validate(self) -> None:
        super().validate()
        if self.top_k != 1:
            raise RoutingError(f"switch routes each token to one expert: top_k must be 1 (got {self.top_k})")
        if isinstance(self.batch_prioritized, bool) is False:
            raise RoutingError(f"batch_prioritized must be true or false (got {self.batch_prioritized!r})")
        if not (isinstance(self.jitter, (int, float)) and 0.0 <= self.jitter < 1.0):
            raise RoutingError(f"jitter must be in [0, 1) (got {self.jitter!r})")


@register_router("switch")
class SwitchRouter(Router):
    """Top-1 (Switch): softmax over E, argmax expert, gate = its probability; token-order priority."""

    config_cls = SwitchConfig
    config: SwitchConfig

    def __init__(self, config: SwitchConfig | None = None, **options) -> None:
        super().__init__(config, **options)
        self._gen = torch.Generator().manual_seed(self.config.seed)

    def route(self, batch: Batch) -> Plan:
        self.check_batch(batch)
        cfg = self.config
        logits_TE = batch.logits_TE.float()
        if cfg.jitter > 0:
            noise = torch.empty(logits_TE.shape).uniform_(1 - cfg.jitter, 1 + cfg.jitter, generator=self._gen)
            logits_TE = logits_TE * noise.to(logits_TE.device)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        # The gate is the chosen probability itself: no renormalisation for top-1.
        gate_T, expert_T = probs_TE.max(dim=-1)
        t = logits_TE.shape[0]
        token_R = torch.arange(t, device=logits_TE.device)
        if cfg.batch_prioritized:
            # Highest-confidence tokens claim slots first; ties keep token order.
            token_R = torch.sort(gate_T.detach(), descending=True, stable=True).indices
        return Plan(
            token_R=token_R,
            expert_R=expert_T[token_R],
            weight_R=gate_T[token_R],
            num_tokens=t,
            num_experts=cfg.num_experts,
            capacity=cfg.capacity_for(t),
            top_k=1,
            aux_loss=load_balancing_loss(probs_TE, expert_T, 1),
            z_loss=z_loss(logits_TE),
        )
