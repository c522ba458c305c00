"""The routing contract: configs, batches, plans, capacity and the shared losses.

Shape letters (DESIGN.md): T tokens, D hidden size, E experts, K choices per token, C capacity per
expert, R requested assignments, N kept assignments, G groups, V vocabulary.

A router is built from a frozen, validated config and maps a :class:`Batch` to a :class:`Plan`.
The plan lists *requested* assignments in priority order (earlier wins a slot); which of them are
kept is decided in one place, ``kernels.positions``, never by the router.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, ClassVar

import torch

from . import options as options_module
from .options import check_literals


class RoutingError(ValueError):
    """Bad input to a router: the message names the parameter and what is allowed."""


# --------------------------------------------------------------------------------------------
# Capacity
# --------------------------------------------------------------------------------------------


def capacity(
    capacity_factor: float | Fraction | str,
    num_tokens: int,
    num_experts: int,
    top_k: float | Fraction = 1,
    min_capacity: int = 0,
) -> int:
    """``C = ceil(cf * K * T / E)`` computed exactly, clamped to ``[1, T]``, then raised to
    ``min_capacity``.

    ``cf`` goes through ``Fraction(str(cf))`` so ``1.1 * 10`` is 11, not 11.000000000000002
    rounded up to 12. ``K`` may be fractional (expert choice's mean experts per token).
    """
    cf = capacity_factor if isinstance(capacity_factor, Fraction) else Fraction(str(capacity_factor))
    k = top_k if isinstance(top_k, Fraction) else Fraction(str(top_k))
    if cf <= 0:
        raise RoutingError(f"capacity_factor must be > 0 (got {capacity_factor})")
    if num_tokens < 1:
        raise RoutingError(f"num_tokens must be >= 1 (got {num_tokens})")
    if num_experts < 1:
        raise RoutingError(f"num_experts must be >= 1 (got {num_experts})")
    exact = cf * k * num_tokens / num_experts
    c = math.ceil(exact)
    c = min(max(c, 1), num_tokens)
    return max(c, int(min_capacity))


# --------------------------------------------------------------------------------------------
# Batch and plan
# --------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """One router call's input.

    logits_TE: [T, E] float32 router logits (from a workload's gate or a captured trace).
    token_T:   [T] int64 token ids (hash routing needs them).
    seq_T:     optional [T] int64 sequence ids.
    hidden_TD: optional [T, D] hidden states (expert compute; routers with their own gate).
    """

    logits_TE: torch.Tensor
    token_T: torch.Tensor
    seq_T: torch.Tensor | None = None
    hidden_TD: torch.Tensor | None = None

    def __post_init__(self) -> None:
        logits = self.logits_TE
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            raise RoutingError(f"logits_TE must be a 2-D tensor [T, E] (got {_describe(logits)})")
        if not logits.is_floating_point():
            raise RoutingError(f"logits_TE must be floating point (got {logits.dtype})")
        t, e = logits.shape
        if t < 1:
            raise RoutingError("num_tokens T must be >= 1 (got a batch with T = 0)")
        if e < 1:
            raise RoutingError("num_experts E must be >= 1 (got logits with E = 0)")
        if not bool(torch.isfinite(logits).all()):
            bad = int((~torch.isfinite(logits)).sum())
            raise RoutingError(f"logits_TE must be finite (found {bad} NaN or infinite values)")
        if not isinstance(self.token_T, torch.Tensor) or self.token_T.dim() != 1:
            raise RoutingError(f"token_T must be a 1-D tensor [T] (got {_describe(self.token_T)})")
        if self.token_T.shape[0] != t:
            raise RoutingError(
                f"token_T and logits_TE must have the same length T "
                f"(got {self.token_T.shape[0]} token ids and {t} rows of logits)"
            )
        if self.token_T.dtype != torch.int64:
            raise RoutingError(f"token_T must be int64 (got {self.token_T.dtype})")
        if self.seq_T is not None and tuple(self.seq_T.shape) != (t,):
            raise RoutingError(f"seq_T must have shape [T] = [{t}] (got {list(self.seq_T.shape)})")
        if self.hidden_TD is not None and (self.hidden_TD.dim() != 2 or self.hidden_TD.shape[0] != t):
            raise RoutingError(f"hidden_TD must have shape [T, D] with T = {t} (got {_describe(self.hidden_TD)})")

    @property
    def num_tokens(self) -> int:
        return int(self.logits_TE.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.logits_TE.shape[1])


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"shape {list(x.shape)}"
    return type(x).__name__


@dataclass
class Plan:
    """A router's decision for one batch, in the common form kernels and metrics consume.

    token_R, expert_R: [R] int64 requested assignments, in priority order (earlier wins a slot).
    weight_R:          [R] float32 gate weights, differentiable w.r.t. the logits.
    capacity:          C per expert, or None for dropless.
    top_k:             K used in the capacity formula (mean choices per token).
    aux_loss, z_loss:  scalar tensors, or None where the router defines none.
    aux_loss_seq:      DeepSeek-V3's sequence-wise balance loss (:func:`sequence_balance_loss`),
                       where the batch has sequence ids and the router an aux loss; else None.
    extras:            router-specific tensors (e.g. nllb's shared-branch weight per token;
                       ``iterations``, how many an iterative router such as sinkhorn used).
    """

    token_R: torch.Tensor
    expert_R: torch.Tensor
    weight_R: torch.Tensor
    num_tokens: int
    num_experts: int
    capacity: int | None
    top_k: float
    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    aux_loss_seq: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    # Routers whose choices depend on the whole batch (expert choice picks tokens per expert,
    # sinkhorn balances columns over it): a decoder could not route this way at inference, and
    # reports say so.
    looks_at_whole_batch: bool = False
    # Experts picked their tokens (expert choice): capacity refuses no request, so the drop rate
    # is undefined (NaN) while tokens no expert took still count in tokens_dropped_frac.
    experts_choose: bool = False

    def __post_init__(self) -> None:
        r = self.token_R.shape[0] if self.token_R.dim() == 1 else -1
        if r < 0 or self.expert_R.shape != (r,) or self.weight_R.shape != (r,):
            raise RoutingError(
                "plan arrays token_R, expert_R, weight_R must be 1-D of one length "
                f"(got {list(self.token_R.shape)}, {list(self.expert_R.shape)}, {list(self.weight_R.shape)})"
            )
        if self.token_R.dtype != torch.int64 or self.expert_R.dtype != torch.int64:
            raise RoutingError("plan arrays token_R and expert_R must be int64")

    @property
    def num_requests(self) -> int:
        return int(self.token_R.shape[0])

    @property
    def dropless(self) -> bool:
        return self.capacity is None


# --------------------------------------------------------------------------------------------
# Shared losses
# --------------------------------------------------------------------------------------------


def load_balancing_loss(probs_TE: torch.Tensor, expert_R: torch.Tensor, top_k: float) -> torch.Tensor:
    """``E / (K * T) * sum_e R_e * P_e``: 1.0 at perfect balance, reported without a coefficient.

    R_e is the requested load (before drops), P_e the mean softmax probability of expert e
    (the differentiable part). Switch Transformer's and Megatron's normalisation.
    """
    return load_balancing_loss_from_mean(probs_TE.mean(dim=0), expert_R, top_k, probs_TE.shape[0])


def load_balancing_loss_from_mean(
    mean_prob_E: torch.Tensor, expert_R: torch.Tensor, top_k: float, num_tokens: int
) -> torch.Tensor:
    """:func:`load_balancing_loss` from P_e [E] already averaged over the T tokens, for routers
    that get P without materialising a [T, E] probability table (e.g. normalised sigmoid scores)."""
    e = mean_prob_E.shape[0]
    load_E = torch.bincount(expert_R, minlength=e).to(mean_prob_E.dtype)
    return (e / (top_k * num_tokens)) * torch.dot(load_E, mean_prob_E)


def sequence_balance_loss(
    scores_TE: torch.Tensor, token_R: torch.Tensor, expert_R: torch.Tensor, seq_T: torch.Tensor | None
) -> torch.Tensor | None:
    """DeepSeek-V3's sequence-wise balance loss, without its coefficient: for each sequence s,
    ``sum_e f_e P_e`` with ``f_e = E / (K_s T_s) * R_e^s`` (R_e^s the assignments its tokens
    requested of expert e, K_s = R^s / T_s the requests per token) and ``P_e`` the mean over its
    T_s tokens of the per-token normalised scores; then the mean over the batch's sequences. 1.0
    when every sequence routes evenly; the batch's :func:`load_balancing_loss` when it is one sequence.

    scores_TE: [T, E] scores normalised per token (rows sum to 1; differentiable).
    token_R, expert_R: [R] the requested assignments. seq_T: [T] sequence ids, or None (then None).
    """
    if seq_T is None:
        return None
    e = scores_TE.shape[1]
    _, seq_T = torch.unique(seq_T.to(scores_TE.device), return_inverse=True)  # ids 0..S-1
    s = int(seq_T.max()) + 1
    count_SE = torch.bincount(seq_T[token_R] * e + expert_R, minlength=s * e).view(s, e).to(scores_TE.dtype)
    tokens_S = torch.bincount(seq_T, minlength=s).to(scores_TE.dtype)
    mean_SE = scores_TE.new_zeros(s, e).index_add(0, seq_T, scores_TE) / tokens_S[:, None]
    requests_S = count_SE.sum(dim=1)
    asked_S = requests_S > 0  # a sequence whose tokens requested nothing has no balance to score
    loss_S = e * (count_SE * mean_SE).sum(dim=1)[asked_S] / requests_S[asked_S]
    return loss_S.mean()


def z_loss(logits_TE: torch.Tensor, lse_T: torch.Tensor | None = None) -> torch.Tensor:
    """Router z-loss ``mean(logsumexp(logits)^2)`` (ST-MoE). ``lse_T``: a logsumexp the router
    already computed, to save a pass over [T, E]."""
    if lse_T is None:
        lse_T = torch.logsumexp(logits_TE.float(), dim=-1)
    return lse_T.square().mean()


def softmax_lse(logits_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(softmax(logits), logsumexp(logits))`` for about the price of the softmax alone.

    ``lse = x[t, j] - log(p[t, j])`` at j = argmax, where p >= 1/E keeps the log accurate: a max
    pass over [T, E] instead of a separate logsumexp (which costs more than the softmax on CPU).
    Both outputs are differentiable; the lse's gradient is the softmax, as it should be.
    Returns probs_TE [T, E] and lse_T [T] in logits' dtype.
    """
    probs_TE = torch.softmax(logits_TE, dim=-1)
    return probs_TE, logsumexp_from_softmax(logits_TE, probs_TE)


def logsumexp_from_softmax(logits_TE: torch.Tensor, probs_TE: torch.Tensor) -> torch.Tensor:
    """[T] ``logsumexp(logits)`` as ``x[t, j] - log(p[t, j])`` at j = the argmax, where p >= 1/E
    keeps the log accurate: one max pass over the softmax a router already has."""
    top_T, idx_T = probs_TE.max(dim=-1)
    return logits_TE.gather(1, idx_T[:, None]).squeeze(1) - top_T.log()


# --------------------------------------------------------------------------------------------
# Configs and the router base class
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RouterConfig:
    """Fields every router shares. Subclasses add their own, each validated in ``validate``.

    capacity_factor: None means dropless (no capacity); otherwise C from :func:`capacity`.
    """

    num_experts: int = 8
    top_k: int = 1
    capacity_factor: float | None = None
    min_capacity: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _check_int(self, "num_experts", low=1)
        _check_int(self, "top_k", low=1)
        if self.top_k > self.num_experts:
            raise RoutingError(f"top_k must be between 1 and num_experts = {self.num_experts} (got {self.top_k})")
        cf = self.capacity_factor
        if cf is not None:
            if isinstance(cf, bool) or not isinstance(cf, (int, float, Fraction)) or not math.isfinite(cf):
                raise RoutingError(f"capacity_factor must be a finite number > 0 or None (got {cf!r})")
            if cf <= 0:
                raise RoutingError(f"capacity_factor must be > 0, or None for dropless (got {cf})")
        _check_int(self, "min_capacity", low=0)
        _check_int(self, "seed", low=0)
        check_literals(self, RoutingError)

    def capacity_for(self, num_tokens: int, top_k: float | None = None) -> int | None:
        if self.capacity_factor is None:
            return None
        k = self.top_k if top_k is None else top_k
        return capacity(self.capacity_factor, num_tokens, self.num_experts, k, self.min_capacity)


def _check_int(cfg: object, name: str, low: int) -> None:
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise RoutingError(f"{name} must be an integer >= {low} (got {v!r})")


def config_from_options(config_cls: type[RouterConfig], options: dict[str, Any]) -> RouterConfig:
    """Build a config from user options, converting strings (``--router-opt k=v``) by field type.

    Unknown keys raise :class:`RoutingError` listing the valid ones.
    """
    return options_module.config_from_options(
        config_cls,
        options,
        RoutingError,
        unknown=lambda key, names: f"unknown router option {key!r}; valid options: {', '.join(names)}",
        bad_value=lambda key, why: f"router option {key} {why}",
    )


class Router:
    """Base class: subclasses set ``config_cls`` and implement :meth:`route`.

    ``fit(sample)`` learns from data other than the measured batches; ``update(plan)`` carries
    state from batch to batch. Both are optional no-ops here.
    """

    config_cls: ClassVar[type[RouterConfig]] = RouterConfig
    name: ClassVar[str] = ""

    def __init__(self, config: RouterConfig | None = None, **options: Any) -> None:
        if config is None:
            config = config_from_options(self.config_cls, options)
        elif options:
            config = dataclasses.replace(config, **options)
        if not isinstance(config, self.config_cls):
            raise RoutingError(
                f"{type(self).__name__} needs a {self.config_cls.__name__} (got {type(config).__name__})"
            )
        self.config = config

    @property
    def needs_hidden(self) -> bool:
        """Whether ``route`` reads ``batch.hidden_TD`` (a router with its own gate); the harness
        then asks the workload for hidden states."""
        return False

    @property
    def needs_fit(self) -> bool:
        """Whether ``fit`` must read a separate slice of the stream before ``route``: routers whose
        class defines ``fit``; one whose variants differ says so per config (hash)."""
        return type(self).fit is not Router.fit

    def check_batch(self, batch: Batch) -> None:
        if batch.num_experts != self.config.num_experts:
            raise RoutingError(
                f"logits_TE has E = {batch.num_experts} columns but the router has "
                f"num_experts = {self.config.num_experts}"
            )

    def route(self, batch: Batch) -> Plan:
        raise NotImplementedError

    @property
    def stateful(self) -> bool:
        """Whether ``update`` carries state from batch to batch (then jobs that split a step across
        ranks give it the whole step's plan). Default: whether the class overrides ``update``."""
        return type(self).update is not Router.update

    def fit(self, sample: Batch) -> None:
        """Learn what the router needs from a separate slice of the stream (default: nothing)."""

    def update(self, plan: Plan) -> None:
        """Carry state to the next batch (default: nothing)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


def choice_major(
    expert_TK: torch.Tensor, weight_TK: torch.Tensor, order_T: torch.Tensor | None = None
) -> tuple[torch.Tensor, ...]:
    """Flatten [T, K] choices into requests ordered choice-major: every first choice before any
    second choice, tokens in token order inside each (or in ``order_T``'s order, a permutation of
    the T tokens: random token selection). Returns token_R, expert_R, weight_R."""
    t, k = expert_TK.shape
    if order_T is None:
        token_R = torch.arange(t, device=expert_TK.device).repeat(k)
        return token_R, expert_TK.t().reshape(-1), weight_TK.t().reshape(-1)
    return order_T.repeat(k), expert_TK[order_T].t().reshape(-1), weight_TK[order_T].t().reshape(-1)
