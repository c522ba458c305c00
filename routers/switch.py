"""Switch Transformer's top-1 router (Fedus et al. 2021).

Softmax over E, expert = the argmax (the lower index among equal logits: ``routers.selection``),
gate = its probability, not renormalised. Priority: token order (earlier tokens win a slot), or by
gate descending (``drop_policy=probs`` or ``batch_prioritized``, Riquelme et al. 2021), or a seeded
random order of the tokens (``drop_policy=random``: DeepSpeed's random token selection, which keeps late tokens from
always being the ones dropped). The requested assignments and loads are the same under every
priority; only which requests win a slot changes. ``bias_update_rate``: auxiliary-loss-free bias
balancing (``routers.balancing``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .balancing import BiasBalancedConfig, BiasBalancedRouter
from .contract import (
    Batch,
    Plan,
    RoutingError,
    choice_major,
    load_balancing_loss,
    logsumexp_from_softmax,
    sequence_balance_loss,
    z_loss,
)
from .options import fixed
from .registry import register_router


@dataclass(frozen=True)
class SwitchConfig(BiasBalancedConfig):
    """top_k is fixed at 1. drop_policy, the priority for slots: `position` (token order),
    `probs` (gate descending: batch-prioritized routing, Riquelme et al. 2021; also
    `batch_prioritized=true`, its name there) or `random` (a seeded random order of the tokens, new
    every batch; DeepSpeed's random token selection). jitter: multiplicative noise U(1 - j, 1 + j)
    on the logits (training only; off in benchmarks)."""

    top_k: int = fixed(1, "switch routes each token to one expert")
    capacity_factor: float | None = 1.0
    batch_prioritized: bool = False
    drop_policy: Literal["position", "probs", "random"] = "position"
    jitter: float = 0.0

    def validate(self) -> None:
        super().validate()
        if self.top_k != 1:
            raise RoutingError(f"switch routes each token to one expert: top_k must be 1 (got {self.top_k})")
        if isinstance(self.batch_prioritized, bool) is False:
            raise RoutingError(f"batch_prioritized must be true or false (got {self.batch_prioritized!r})")
        if self.batch_prioritized and self.drop_policy == "random":
            raise RoutingError(
                f"batch_prioritized and drop_policy={self.drop_policy} both set the priority: choose one"
            )
        if not (isinstance(self.jitter, (int, float)) and 0.0 <= self.jitter < 1.0):
            raise RoutingError(f"jitter must be in [0, 1) (got {self.jitter!r})")


@register_router("switch")
class SwitchRouter(BiasBalancedRouter):
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
        t = logits_TE.shape[0]
        probs_TE = torch.softmax(logits_TE, dim=-1)
        biased_TE = self.selection_scores(probs_TE)
        if biased_TE is None:
            # argmax of the logits: the argmax of the softmax, with ties to the lower index.
            expert_T = logits_TE.detach().argmax(dim=-1)
            gate_T = probs_TE.gather(1, expert_T[:, None]).squeeze(1)
            # gate = the largest probability (>= 1/E), so x - log(gate) is the logsumexp.
            lse_T = logits_TE.gather(1, expert_T[:, None]).squeeze(1) - gate_T.log()
        else:
            expert_T = biased_TE.argmax(dim=-1)
            gate_T = probs_TE.gather(1, expert_T[:, None]).squeeze(1)
            lse_T = logsumexp_from_softmax(logits_TE, probs_TE)
        cap = cfg.capacity_for(t)
        order_T = None
        if cfg.batch_prioritized or cfg.drop_policy == "probs":
            # Highest-confidence tokens claim slots first; ties keep token order.
            order_T = torch.sort(gate_T.detach(), descending=True, stable=True).indices
        elif cfg.drop_policy == "random" and cap is not None:
            # Dropless has no slot to win: no draw.
            order_T = torch.randperm(t, generator=self._gen).to(logits_TE.device)
        token_R, expert_R, weight_R = choice_major(expert_T[:, None], gate_T[:, None], order_T)
        return Plan(
            token_R=token_R,
            expert_R=expert_R,
            weight_R=weight_R,
            num_tokens=t,
            num_experts=cfg.num_experts,
            capacity=cap,
            top_k=1,
            aux_loss=load_balancing_loss(probs_TE, expert_T, 1),
            z_loss=z_loss(logits_TE, lse_T),
            aux_loss_seq=sequence_balance_loss(probs_TE, token_R, expert_R, batch.seq_T),
        )
