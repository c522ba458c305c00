"""Top-K routing as in Mixtral: top-K of the logits, softmax over those K.

The choices are the K largest logits, the lower expert index first among equal ones
(``routers.selection``). Dropless by default; with a capacity factor, priority is choice-major
(every first choice before any second, token order inside each), by router probability
(``drop_policy=probs``), or choice-major over a seeded random order of the tokens
(``drop_policy=random``: DeepSpeed's random token selection, drawn anew every batch). The requested
assignments and loads are the same under every priority; only which requests win a slot changes.
``bias_update_rate``: auxiliary-loss-free bias balancing (``routers.balancing``): the choices are
then the top-K of ``softmax(logits) + b``, and the gates still the softmax over the chosen K logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .balancing import BiasBalancedConfig, BiasBalancedRouter
from .contract import Batch, Plan, choice_major, load_balancing_loss, sequence_balance_loss, z_loss
from .registry import register_router
from .selection import top_indices


@dataclass(frozen=True)
class TopKConfig(BiasBalancedConfig):
    """Dropless unless capacity_factor is set. drop_policy: `position` (choice-major: every
    first choice before any second, token order inside each), `probs` (highest router
    probability softmax(logits)[t, e] first) or `random` (choice-major, tokens in a seeded random
    order; DeepSpeed's random token selection)."""

    top_k: int = 2
    capacity_factor: float | None = None
    drop_policy: Literal["position", "probs", "random"] = "position"


@register_router("topk")
class TopKRouter(BiasBalancedRouter):
    """Top-K (Mixtral): top-K logits, gates = softmax over those K; dropless by default."""

    config_cls = TopKConfig
    config: TopKConfig

    def __init__(self, config: TopKConfig | None = None, **options) -> None:
        super().__init__(config, **options)
        self._gen = torch.Generator().manual_seed(self.config.seed)

    def route(self, batch: Batch) -> Plan:
        self.check_batch(batch)
        cfg = self.config
        logits_TE = batch.logits_TE.float()
        t = logits_TE.shape[0]
        lse_T = torch.logsumexp(logits_TE, dim=-1)
        probs_TE = torch.exp(logits_TE - lse_T[:, None])
        biased_TE = self.selection_scores(probs_TE)
        expert_TK = top_indices(logits_TE if biased_TE is None else biased_TE, cfg.top_k)
        gate_TK = torch.softmax(logits_TE.gather(1, expert_TK), dim=-1)
        cap = cfg.capacity_for(t)
        order_T = None
        if cap is not None and cfg.drop_policy == "random":
            order_T = torch.randperm(t, generator=self._gen).to(logits_TE.device)
        token_R, expert_R, weight_R = choice_major(expert_TK, gate_TK, order_T)
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
            aux_loss_seq=sequence_balance_loss(probs_TE, token_R, expert_R, batch.seq_T),
        )
