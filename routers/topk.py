"""Top-K routing as in Mixtral: top-K of the logits, softmax over those K."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .contract import Batch, Plan, Router, RouterConfig, choice_major, load_balancing_loss, z_loss
from .registry import register_router


@dataclass(frozen=True)
class TopKConfig(RouterConfig):
    """Dropless unless capacity_factor is set. drop_policy: `position` (choice-major: every
    first choice before any second, token order inside each) or `probs` (highest router
    probability softmax(logits)[t, e] first)."""

    top_k: int = 2
    capacity_factor: float | None = None
    drop_policy: Literal["position", "probs"] = "position"


@register_router("topk")
class TopKRouter(Router):
    """Top-K (Mixtral): top-K logits, gates = softmax over those K; dropless by default."""

    config_cls = TopKConfig
    config: TopKConfig

    def route(self, batch: Batch) -> Plan:
        self.check_batch(batch)
        cfg = self.config
        logits_TE = batch.logits_TE.float()
        t = logits_TE.shape[0]
        top_logits_TK, expert_TK = torch.topk(logits_TE, cfg.top_k, dim=-1)
        gate_TK = torch.softmax(top_logits_TK, dim=-1)
        token_R, expert_R, weight_R = choice_major(expert_TK, gate_TK)
        lse_T = torch.logsumexp(logits_TE, dim=-1)
        probs_TE = torch.exp(logits_TE - lse_T[:, None])
        cap = cfg.capacity_for(t)
        if cap is not None and cfg.drop_policy == "probs":
            # Priority by the router probability softmax(logits)[t, e] (the gate before the top-K
            # renormalisation, so it stays meaningful at K = 1); stable: ties keep choice-major order.
            prob_R = probs_TE[token_R, expert_R].detach()
            order_R = torch.sort(prob_R, descending=True, stable=True).indices
            token_R, expert_R, weight_R = token_R[order_R], expert_R[order_R], weight_R[order_R]
        return Plan(
            token_R=token_R,
            expert_R=expert_R,
            weight_R=weight_R,
            num_tokens=t,
            num_experts=cfg.num_experts,
            capacity=cap,
            top_k=cfg.top_k,
            aux_loss=load_balancing_loss(probs_TE, expert_TK.reshape(-1), cfg.top_k),
            z_loss=z_loss(logits_TE, lse_T),
        )
