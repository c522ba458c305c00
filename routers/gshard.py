"""GShard's top-2 router with random routing (Lepikhin et al. 2020, Algorithm 1).

Softmax over E; the two largest probabilities g1 >= g2 are renormalised to ``g / (g1 + g2)``. The
first choice is always requested. The second is requested only if ``U < 2 * g2`` with
``U ~ Uniform(0, 1)`` and g2 the *renormalised* second gate (at most 0.5, so the test is just
"keep with probability 2 g2"): a token that clearly prefers one expert rarely spends a slot on its
second. A second choice skipped this way is absent from the plan: it takes no slot and is not a
drop. ``second_policy="always"`` keeps every second choice (plain top-2 of the softmax). Among
equal probabilities the lower expert index is chosen first (``routers.selection``).

``bias_update_rate`` adds auxiliary-loss-free bias balancing (``routers.balancing``): the two
choices are then the top-2 of ``softmax + b`` and the gates their unbiased probabilities,
renormalised as above (the biased first choice may then have the smaller gate; the second is kept
with probability ``min(1, 2 g2)``).

Priority is choice-major: every first choice in token order, then the surviving second choices in
token order. The capacity is GShard's ``2 T / E`` per unit of capacity factor: the shared formula
with K = 2. The aux loss is the shared one with R_e the *requested* load and K = R / T, the
assignments per token actually requested (random routing skips some second choices), so it is 1.0
at perfect balance like every other router's.

:func:`gshard_requests` is the level-2 gate of ``hierarchical``'s ``nllb`` form too; it is defined
here once and imported there.

Shape letters: T tokens, E experts, R requested assignments.
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
    load_balancing_loss,
    logsumexp_from_softmax,
    sequence_balance_loss,
    z_loss,
)
from .options import fixed
from .registry import register_router
from .selection import top_indices

SECOND_POLICIES = ("random", "always")


def check_second_policy(value: object) -> None:
    """Raise RoutingError unless ``value`` is a known second-choice policy."""
    if value not in SECOND_POLICIES:
        allowed = ", ".join(repr(p) for p in SECOND_POLICIES)
        raise RoutingError(f"second_policy must be one of {allowed} (got {value!r})")


def softmax_top2(
    logits_TE: torch.Tensor, router: BiasBalancedRouter | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax, the two chosen experts and their probabilities, and the logsumexp.

    The choices are the two largest logits (the two largest probabilities, with ties to the lower
    expert index), or, when ``router`` balances by bias, the two largest ``softmax + b``.
    Returns probs_TE [T, E], top_p_T2 [T, 2] (the chosen experts' raw softmax probabilities,
    differentiable), expert_T2 [T, 2] int64 and lse_T [T] (for the z-loss).
    """
    probs_TE = torch.softmax(logits_TE, dim=-1)
    biased_TE = None if router is None else router.selection_scores(probs_TE)
    expert_T2 = top_indices(logits_TE if biased_TE is None else biased_TE, 2)
    top_p_T2 = probs_TE.gather(1, expert_T2)
    if biased_TE is None:
        # g1 is the largest probability (>= 1/E): x[e1] - log g1 is the logsumexp, no extra pass.
        lse_T = logits_TE.gather(1, expert_T2[:, :1]).squeeze(1) - top_p_T2[:, 0].log()
    else:
        lse_T = logsumexp_from_softmax(logits_TE, probs_TE)
    return probs_TE, top_p_T2, expert_T2, lse_T


def gshard_requests(
    top_p_T2: torch.Tensor, expert_T2: torch.Tensor, uniform_T: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GShard's top-2 requests, in choice-major priority order.

    top_p_T2, expert_T2: [T, 2] the two largest softmax probabilities (differentiable) and their
        experts, from :func:`softmax_top2`.
    uniform_T: [T] draws from U(0, 1) on the same device; the second choice of token t is requested
        iff ``uniform_T[t] < 2 * g2[t]`` with g2 renormalised. None keeps every second choice
        (``second_policy=always``).
    Returns token_R, expert_R [R] int64 and weight_R [R] (the renormalised gates, differentiable),
    with R = T + number of second choices kept: all first choices in token order, then the kept
    second choices in token order.
    """
    t = top_p_T2.shape[0]
    # g1 + g2 > 0: without a bias g1 >= 1/E; with one, probabilities of finite logits are > 0
    # unless they underflow, and the floor keeps such a row finite.
    gate_T2 = top_p_T2 / top_p_T2.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    first_T = torch.arange(t, device=top_p_T2.device)
    if uniform_T is None:
        second_S = first_T
    else:
        # The draw decides whether to ask at all; it is not part of the differentiable gate.
        keep_T = uniform_T < 2.0 * gate_T2[:, 1].detach()
        second_S = torch.nonzero(keep_T).squeeze(1)
    token_R = torch.cat([first_T, second_S])
    expert_R = torch.cat([expert_T2[:, 0], expert_T2[second_S, 1]])
    weight_R = torch.cat([gate_T2[:, 0], gate_T2[second_S, 1]])
    return token_R, expert_R, weight_R


def draw_uniform(gen: torch.Generator, num_tokens: int, device: torch.device) -> torch.Tensor:
    """[T] U(0, 1) draws from the router's own CPU generator, so results do not depend on the
    device or on torch's global RNG state."""
    return torch.rand(num_tokens, generator=gen).to(device)


@dataclass(frozen=True)
class GShardConfig(BiasBalancedConfig):
    """top_k is fixed at 2. second_policy: `random` (keep the second choice iff U < 2 g2, GShard's
    random routing) or `always`. capacity_factor 1.0 gives GShard's expert capacity 2T/E; None is
    dropless."""

    top_k: int = fixed(2, "gshard routes each token to at most two experts")
    capacity_factor: float | None = 1.0
    second_policy: Literal["random", "always"] = "random"

    def validate(self) -> None:
        super().validate()
        if self.top_k != 2:
            raise RoutingError(f"gshard routes each token to at most two experts: top_k must be 2 (got {self.top_k})")
        check_second_policy(self.second_policy)


@register_router("gshard")
class GShardRouter(BiasBalancedRouter):
    """Top-2 (GShard): softmax, gates g/(g1+g2), second kept iff U < 2 g2; choice-major priority."""

    config_cls = GShardConfig
    config: GShardConfig

    def __init__(self, config: GShardConfig | None = None, **options) -> None:
        super().__init__(config, **options)
        self._gen = torch.Generator().manual_seed(self.config.seed)

    def route(self, batch: Batch) -> Plan:
        self.check_batch(batch)
        cfg = self.config
        logits_TE = batch.logits_TE.float()
        t = logits_TE.shape[0]
        probs_TE, top_p_T2, expert_T2, lse_T = softmax_top2(logits_TE, self)
        uniform_T = draw_uniform(self._gen, t, logits_TE.device) if cfg.second_policy == "random" else None
        token_R, expert_R, weight_R = gshard_requests(top_p_T2, expert_T2, uniform_T)
        return Plan(
            token_R=token_R,
            expert_R=expert_R,
            weight_R=weight_R,
            num_tokens=t,
            num_experts=cfg.num_experts,
            capacity=cfg.capacity_for(t),
            top_k=2,
            # R_e counts the requested assignments (skipped second choices are not requests);
            # K is the requests per token actually made, so the loss stays 1.0 at perfect balance.
            aux_loss=load_balancing_loss(probs_TE, expert_R, expert_R.numel() / t),
            z_loss=z_loss(logits_TE, lse_T),
            aux_loss_seq=sequence_balance_loss(probs_TE, token_R, expert_R, batch.seq_T),
        )
