"""Two-level routers: NLLB-200's conditional MoE and DeepSeek-V3's group-limited routing.

``form="nllb"`` (NLLB Team 2022, Conditional MoE Routing; fairseq's CMR gate). Level 1 is a soft
sigmoid gate ``g_T`` per token between a dense shared FFN and the MoE branch; level 2 is GShard's
top-2 with random routing inside the MoE branch (:func:`routers.gshard.gshard_requests`, shared,
not copied). The layer computes ``(1 - g) * FFN_shared(x) + g * MoE(x)``:

- the plan's requests are the MoE branch only, with ``weight_R = g[token] * gshard gate``, so any
  backend's combine yields ``g * MoE(x)``; metrics (drops, tokens dropped) count that branch only;
- ``plan.extras["shared_weight_T"] = 1 - g_T`` (differentiable) asks the layer to add the shared
  FFN for every token (``bench.layer.layer_forward``).

The level-1 logit comes from ``gate_source``: `hidden` (default), the router's own linear gate
``hidden_TD @ w_D`` with ``w_D ~ N(0, 1/D)`` drawn from the seed and D (fixed, not trained here);
or `logit_column`, an extra last column of ``logits_TE`` that a workload or trace provides, which
then has E + 1 columns.

``form="groups"`` (DeepSeek-V3's group-limited routing, a descendant of hierarchical mixtures of
experts). Scores are softmax or sigmoid over E (``score_func``); the E experts form ``num_groups``
equal groups; a group's score is the sum of its top-2 expert scores (top-1 when a group has one
expert); the top ``topk_group`` groups are kept; the top-K experts inside them are chosen; gates
are the chosen scores, divided by their sum when ``norm_topk_prob``. No routed scaling factor.
Ties go to the lower group, then the lower expert index.

``bias_update_rate`` (both forms) adds DeepSeek-V3's auxiliary-loss-free bias
(``routers.balancing``): in ``groups``, group scores and choices are computed on ``score + b`` (as
DeepSeek-V3's ``e_score_correction_bias``), gates from the unbiased scores; in ``nllb``, on the
level-2 softmax as in ``gshard``.

Defaults: ``num_groups=4, topk_group=2, top_k=2``, which validate for every E divisible by 4 that
the CLI uses (8, 16, 64, 256); DeepSeek-V3 itself is E=256, num_groups=8, topk_group=4, top_k=8.
Both forms are dropless by default; with a capacity factor, priority is choice-major.

Shape letters: T tokens, D hidden, E experts, K choices, G groups, P experts per group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from .balancing import BiasBalancedConfig, BiasBalancedRouter
from .contract import (
    Batch,
    Plan,
    RoutingError,
    choice_major,
    load_balancing_loss,
    load_balancing_loss_from_mean,
    sequence_balance_loss,
    softmax_lse,
    z_loss,
)
from .gshard import check_second_policy, draw_uniform, gshard_requests, softmax_top2
from .registry import register_router
from .selection import top_indices


def group_limited_topk(scores_TE: torch.Tensor, num_groups: int, topk_group: int, top_k: int) -> torch.Tensor:
    """DeepSeek-V3's selection: top-K experts among the top ``topk_group`` groups.

    scores_TE: [T, E] selection scores (softmax or sigmoid, plus the balancing bias where on), E
    divisible by num_groups. Returns expert_TK [T, K] int64, best first. Groups are ranked by the
    sum of their top-2 scores (top-1 with one expert each). Ties go to the lower group, then the
    lower expert index (``routers.selection``): the kept groups are gathered in ascending order,
    so a position among the kept scores orders as the expert index does. Only the kept groups'
    scores are gathered ([T, topk_group * P]), never a masked [T, E] copy.
    """
    t, e = scores_TE.shape
    p = e // num_groups
    with torch.no_grad():
        scores_TGP = scores_TE.detach().view(t, num_groups, p)
        # The sum of the two best scores (the only one with one expert per group).
        group_TG = scores_TGP[..., 0] if p == 1 else scores_TGP.topk(2, dim=-1).values.sum(dim=-1)
        group_Tg = top_indices(group_TG, topk_group).sort(dim=-1).values  # g = topk_group kept groups
        kept_TgP = torch.gather(scores_TGP, 1, group_Tg[:, :, None].expand(t, topk_group, p))
        local_TK = top_indices(kept_TgP.reshape(t, topk_group * p), top_k)
        return torch.gather(group_Tg, 1, local_TK // p) * p + local_TK % p


def sigmoid_share_mean(logits_TE: torch.Tensor, scores_TE: torch.Tensor) -> torch.Tensor:
    """[E] P_e = mean over tokens of ``s_te / sum_e' s_te'`` for sigmoid scores, finite for any
    finite logits.

    One matvec ``s^T (1 / rowsum)`` for the rows whose sum is a normal float; a row whose every
    score underflows (all logits below about -70) takes ``softmax(logsigmoid(x))`` instead, the
    same ratio computed in log space (before, such a row made the whole batch's P NaN through
    1 / 0). Both branches are differentiable without NaN gradients.
    """
    t = scores_TE.shape[0]
    sum_T = scores_TE.sum(dim=-1)
    ok_T = sum_T > 1e-30
    inv_T = torch.where(ok_T, torch.where(ok_T, sum_T, 1.0).reciprocal(), 0.0)
    total_E = scores_TE.t() @ inv_T
    if not bool(ok_T.all()):
        low = ~ok_T
        total_E = total_E + torch.softmax(F.logsigmoid(logits_TE[low]), dim=-1).sum(dim=0)
    return total_E / t


@dataclass(frozen=True)
class HierarchicalConfig(BiasBalancedConfig):
    """form: `groups` (DeepSeek-V3 group-limited) or `nllb` (NLLB-200 conditional MoE).

    groups: score_func `sigmoid` or `softmax`; num_groups (divides num_experts); topk_group kept
    groups (<= num_groups); top_k <= topk_group * num_experts / num_groups; norm_topk_prob.
    nllb: top_k must be 2 (GShard inside the MoE branch); second_policy `random` or `always`;
    gate_source `hidden` (own seeded linear gate on hidden_TD) or `logit_column` (E + 1 logits).
    Fields of the other form are ignored. Dropless unless capacity_factor is set.
    """

    top_k: int = 2
    capacity_factor: float | None = None
    form: Literal["nllb", "groups"] = "groups"
    score_func: Literal["softmax", "sigmoid"] = "sigmoid"
    num_groups: int = 4
    topk_group: int = 2
    norm_topk_prob: bool = True
    second_policy: Literal["random", "always"] = "random"
    gate_source: Literal["hidden", "logit_column"] = "hidden"

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.norm_topk_prob, bool):
            raise RoutingError(f"norm_topk_prob must be true or false (got {self.norm_topk_prob!r})")
        if self.form == "nllb":
            if self.top_k != 2:
                raise RoutingError(
                    f"hierarchical form 'nllb' runs GShard top-2 in its MoE branch: top_k must be 2 (got {self.top_k})"
                )
            check_second_policy(self.second_policy)
            return
        g, e = self.num_groups, self.num_experts
        if isinstance(g, bool) or not isinstance(g, int) or g < 1 or e % g:
            raise RoutingError(f"num_groups must be a divisor of num_experts = {e} (got {g!r})")
        tg = self.topk_group
        if isinstance(tg, bool) or not isinstance(tg, int) or not 1 <= tg <= g:
            raise RoutingError(f"topk_group must be an integer between 1 and num_groups = {g} (got {tg!r})")
        if self.top_k > tg * (e // g):
            raise RoutingError(
                f"top_k must be <= topk_group * num_experts / num_groups = {tg * (e // g)}, the experts "
                f"in the kept groups (got {self.top_k})"
            )


@register_router("hierarchical")
class HierarchicalRouter(BiasBalancedRouter):
    """Two-level: DeepSeek-V3 group-limited top-K (`groups`) or NLLB shared/MoE gate + GShard (`nllb`)."""

    config_cls = HierarchicalConfig
    config: HierarchicalConfig

    def __init__(self, config: HierarchicalConfig | None = None, **options) -> None:
        super().__init__(config, **options)
        self._gen = torch.Generator().manual_seed(self.config.seed)
        self._gate_w: dict[tuple[int, torch.device], torch.Tensor] = {}

    # ------------------------------------------------------------------------------ batches

    def check_batch(self, batch: Batch) -> None:
        cfg = self.config
        if cfg.form == "nllb" and cfg.gate_source == "logit_column":
            if batch.num_experts != cfg.num_experts + 1:
                raise RoutingError(
                    f"with gate_source 'logit_column', logits_TE must have num_experts + 1 = "
                    f"{cfg.num_experts + 1} columns, the last being the level-1 gate logit "
                    f"(got {batch.num_experts})"
                )
            return
        super().check_batch(batch)
        if cfg.form == "nllb" and batch.hidden_TD is None:
            raise RoutingError(
                "hierarchical form 'nllb' with gate_source 'hidden' needs hidden_TD in the batch "
                "for its level-1 gate (or use gate_source=logit_column)"
            )

    def gate_weight(self, hidden: int, device: torch.device) -> torch.Tensor:
        """[D] weights of the level-1 linear gate, N(0, 1/D), a function of (seed, D) alone so
        the gate does not depend on how many batches were routed before."""
        key = (hidden, device)
        if key not in self._gate_w:
            gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + hidden)
            self._gate_w[key] = (torch.randn(hidden, generator=gen) / hidden**0.5).to(device)
        return self._gate_w[key]

    @property
    def needs_hidden(self) -> bool:
        return self.config.form == "nllb" and self.config.gate_source == "hidden"

    def route(self, batch: Batch) -> Plan:
        self.check_batch(batch)
        return self._route_nllb(batch) if self.config.form == "nllb" else self._route_groups(batch)

    # ------------------------------------------------------------------------------ nllb

    def _route_nllb(self, batch: Batch) -> Plan:
        cfg = self.config
        e = cfg.num_experts
        logits = batch.logits_TE.float()
        t = logits.shape[0]
        if cfg.gate_source == "logit_column":
            gate_logit_T, logits_TE = logits[:, e], logits[:, :e]
        else:
            assert batch.hidden_TD is not None  # check_batch
            hidden_TD = batch.hidden_TD.float()
            gate_logit_T = hidden_TD @ self.gate_weight(hidden_TD.shape[1], hidden_TD.device)
            logits_TE = logits
        g_T = torch.sigmoid(gate_logit_T)
        probs_TE, top_p_T2, expert_T2, lse_T = softmax_top2(logits_TE, self)
        uniform_T = draw_uniform(self._gen, t, logits.device) if cfg.second_policy == "random" else None
        token_R, expert_R, gate_R = gshard_requests(top_p_T2, expert_T2, uniform_T)
        return Plan(
            token_R=token_R,
            expert_R=expert_R,
            # The MoE branch's combine then yields g * MoE(x); the shared branch gets 1 - g.
            weight_R=g_T[token_R] * gate_R,
            num_tokens=t,
            num_experts=e,
            capacity=cfg.capacity_for(t),
            top_k=2,
            # As gshard: K = requests per token actually made, so 1.0 at perfect balance.
            aux_loss=load_balancing_loss(probs_TE, expert_R, expert_R.numel() / t),
            z_loss=z_loss(logits_TE, lse_T),
            aux_loss_seq=sequence_balance_loss(probs_TE, token_R, expert_R, batch.seq_T),
            extras={"shared_weight_T": 1.0 - g_T},
        )

    # ------------------------------------------------------------------------------ groups

    def _route_groups(self, batch: Batch) -> Plan:
        cfg = self.config
        logits_TE = batch.logits_TE.float()
        t = logits_TE.shape[0]
        if cfg.score_func == "softmax":
            scores_TE, lse_T = softmax_lse(logits_TE)
            mean_prob_E = scores_TE.mean(dim=0)
        else:
            lse_T = torch.logsumexp(logits_TE, dim=-1)
            scores_TE = torch.sigmoid(logits_TE)
            # P_e = mean_t s_te / sum_e' s_te': one matvec, no normalised [T, E] copy.
            mean_prob_E = sigmoid_share_mean(logits_TE, scores_TE)
        biased_TE = self.selection_scores(scores_TE)
        expert_TK = group_limited_topk(
            scores_TE if biased_TE is None else biased_TE, cfg.num_groups, cfg.topk_group, cfg.top_k
        )
        if cfg.norm_topk_prob:
            # s_k / sum_j s_j as a softmax of log-scores over the K: finite even when every score
            # of the row underflows (sigmoid of logits below about -90).
            chosen_TK = logits_TE.gather(1, expert_TK)
            gate_TK = torch.softmax(F.logsigmoid(chosen_TK) if cfg.score_func == "sigmoid" else chosen_TK, dim=-1)
        else:
            gate_TK = scores_TE.gather(1, expert_TK)
        token_R, expert_R, weight_R = choice_major(expert_TK, gate_TK)
        seq_loss = None
        if batch.seq_T is not None:
            shares_TE = scores_TE if cfg.score_func == "softmax" else torch.softmax(F.logsigmoid(logits_TE), dim=-1)
            seq_loss = sequence_balance_loss(shares_TE, token_R, expert_R, batch.seq_T)
        return Plan(
            token_R=token_R,
            expert_R=expert_R,
            weight_R=weight_R,
            num_tokens=t,
            num_experts=cfg.num_experts,
            capacity=cfg.capacity_for(t),
            top_k=cfg.top_k,
            # P_e: the mean of per-token-normalised scores (the softmax itself for softmax scores).
            aux_loss=load_balancing_loss_from_mean(mean_prob_E, expert_R, cfg.top_k, t),
            z_loss=z_loss(logits_TE, lse_T),
            aux_loss_seq=seq_loss,
        )
