"""Synthetic workloads: router logits and token ids from a seeded generator.

Families (DESIGN.md "Workloads"): uniform, zipf, hot, drift, correlated, adversarial.

How the skewed families make the logits: ``logits = log p_E + G_TE`` with ``G`` iid standard
Gumbel noise. By the Gumbel-max trick the first choice (argmax) of every token is then *exactly*
Categorical(p), so the expert popularity ``p`` is a parameter, not an emergent property.

How they make the token ids (so token routers such as hash are tested as fairly as logit routers):
every expert owns a class of about V / E ids (a seeded partition of the vocabulary), and a token's
id is drawn from the class of its first-choice expert, Zipf(``token_s``) over the class (text-like
frequencies; 0 = uniform). The same id therefore always has the same first choice, as in trained
routers, whose routing is mostly decided by the token id; a hash of the id sees the id
frequencies, not the expert popularity.

The fit slice of every family is the same process drawn from another seed stream (drift: frozen
at batch 0's popularity, the data a router would have been fitted on before the drift).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from .base import (
    Parts,
    Workload,
    WorkloadConfig,
    WorkloadError,
    ar1_scan,
    check_float,
    check_int,
    derive_seed,
    generator,
    gumbel_like,
    sequence_ids,
    sequence_starts,
    zipf_probs,
)
from .registry import register_workload

# --------------------------------------------------------------------------------------------
# uniform
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class UniformConfig(WorkloadConfig):
    """iid standard-normal logits (every expert equally likely) and iid uniform token ids.

    vocab_size: V, the range of token ids.
    """

    workload: ClassVar[str] = "uniform"
    vocab_size: int = 50_000

    def validate(self) -> None:
        super().validate()
        check_int(self, "vocab_size", low=1)


@register_workload("uniform")
class UniformWorkload(Workload):
    """iid N(0, 1) logits and uniform token ids: loads are Multinomial(T, 1/E), the baseline."""

    config_cls = UniformConfig
    config: UniformConfig

    def generate(self, num_tokens, num_experts, num_batches, fit, hidden_dim) -> Iterator[Parts]:
        # The measured stream is one generator seeded with the seed, drawn in order (logits, then
        # ids, batch after batch): the numbers the README quotes for `uniform` stay reproducible.
        seed = derive_seed(self.config.seed, "fit") if fit else self.config.seed
        gen = torch.Generator().manual_seed(seed)
        for b in range(num_batches):
            logits_TE = torch.randn(num_tokens, num_experts, generator=gen)
            token_T = torch.randint(0, self.config.vocab_size, (num_tokens,), generator=gen)
            yield Parts(logits_TE, token_T, sequence_ids(num_tokens, self.config.seq_len, b))


# --------------------------------------------------------------------------------------------
# Shared by the families whose ids follow their first choice
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ClassVocabConfig(WorkloadConfig):
    """vocab_size: V (>= E). token_s: Zipf exponent of the ids inside an expert's class (0 = uniform)."""

    vocab_size: int = 50_000
    token_s: float = 1.0

    def validate(self) -> None:
        super().validate()
        check_int(self, "vocab_size", low=1)
        check_float(self, "token_s", low=0.0)


class ClassVocabWorkload(Workload):
    """Draws ids from the class of each token's first-choice expert (see the module docstring)."""

    config: ClassVocabConfig

    def check_experts(self, num_experts: int) -> None:
        if self.config.vocab_size < num_experts:
            raise WorkloadError(
                f"{self.name}: vocab_size must be >= num_experts = {num_experts} so every expert owns "
                f"token ids (got {self.config.vocab_size})"
            )

    def _vocab(self, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The class table [n, E] (row j: the rank-j id of each expert's class) and the rank CDF [n].

        The partition is a seeded permutation of the ids, fixed for the stream; each class keeps
        n = floor(V / E) ids (the V mod E left over are never drawn).
        """
        v, e = self.config.vocab_size, num_experts
        perm_V = torch.randperm(v, generator=generator(self.config.seed, "vocab", e))
        n = v // e
        table_NE = perm_V[: n * e].view(n, e)
        cdf_N = zipf_probs(n, self.config.token_s).cumsum(0)
        cdf_N[-1] = 1.0
        return table_NE, cdf_N

    def _ids(self, expert_T: torch.Tensor, vocab, gen: torch.Generator) -> torch.Tensor:
        table_NE, cdf_N = vocab
        u_T = torch.rand(expert_T.shape[0], generator=gen, dtype=torch.float64)
        rank_T = torch.searchsorted(cdf_N, u_T).clamp_max_(table_NE.shape[0] - 1)
        return table_NE[rank_T, expert_T]

    def _expert_perm(self, num_experts: int) -> torch.Tensor:
        """Which expert holds each popularity rank: a seeded permutation, so the popular expert
        is not always expert 0 (routers must not be able to rely on the index)."""
        return torch.randperm(num_experts, generator=generator(self.config.seed, "experts", num_experts))

    def _gumbel_batches(self, logp_fn, num_tokens, num_experts, num_batches, fit) -> Iterator[Parts]:
        """logits = log p(b) + Gumbel; ids from the first choice's class."""
        vocab = self._vocab(num_experts)
        gen = generator(self.config.seed, "fit" if fit else "run")
        for b in range(num_batches):
            logp_E = logp_fn(0 if fit else b).to(torch.float32)
            logits_TE = logp_E + gumbel_like((num_tokens, num_experts), gen)
            token_T = self._ids(logits_TE.argmax(-1), vocab, gen)
            yield Parts(logits_TE, token_T, sequence_ids(num_tokens, self.config.seq_len, b))


def _log_probs(p_E: torch.Tensor) -> torch.Tensor:
    # An expert with probability 0 gets log(1e-30) = -69: finite (Batch refuses inf) and never
    # the argmax in practice (a Gumbel draw above 60 has probability ~1e-26).
    return p_E.clamp_min(1e-30).log()


# --------------------------------------------------------------------------------------------
# zipf, hot, drift
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ZipfConfig(ClassVocabConfig):
    """s: exponent of expert popularity, p_e ~ 1 / rank^s (0 = uniform)."""

    workload: ClassVar[str] = "zipf"
    s: float = 1.0

    def validate(self) -> None:
        super().validate()
        check_float(self, "s", low=0.0)


@register_workload("zipf")
class ZipfWorkload(ClassVocabWorkload):
    """Expert popularity p ~ 1/rank^s: logits = log p + Gumbel, so first choices are exactly Zipf(s)."""

    config_cls = ZipfConfig
    config: ZipfConfig

    def popularity(self, num_experts: int) -> torch.Tensor:
        """[E] float64 probability that an expert is a token's first choice."""
        p_E = torch.empty(num_experts, dtype=torch.float64)
        p_E[self._expert_perm(num_experts)] = zipf_probs(num_experts, self.config.s)
        return p_E

    def generate(self, num_tokens, num_experts, num_batches, fit, hidden_dim) -> Iterator[Parts]:
        logp_E = _log_probs(self.popularity(num_experts))
        return self._gumbel_batches(lambda b: logp_E, num_tokens, num_experts, num_batches, fit)


@dataclass(frozen=True, kw_only=True)
class HotConfig(ClassVocabConfig):
    """share: probability that a token's first choice is the hot expert (the rest split evenly).
    expert: index of the hot expert (< E)."""

    workload: ClassVar[str] = "hot"
    share: float = 0.5
    expert: int = 0

    def validate(self) -> None:
        super().validate()
        check_float(self, "share", low=0.0, high=1.0)
        check_int(self, "expert", low=0)


@register_workload("hot")
class HotWorkload(ClassVocabWorkload):
    """One hot expert takes a `share` of first choices; the others split the rest evenly."""

    config_cls = HotConfig
    config: HotConfig

    def check_experts(self, num_experts: int) -> None:
        super().check_experts(num_experts)
        if self.config.expert >= num_experts:
            raise WorkloadError(
                f"hot: expert must be between 0 and num_experts - 1 = {num_experts - 1} (got {self.config.expert})"
            )

    def popularity(self, num_experts: int) -> torch.Tensor:
        if num_experts == 1:
            return torch.ones(1, dtype=torch.float64)
        p_E = torch.full((num_experts,), (1.0 - self.config.share) / (num_experts - 1), dtype=torch.float64)
        p_E[self.config.expert] = self.config.share
        return p_E

    def generate(self, num_tokens, num_experts, num_batches, fit, hidden_dim) -> Iterator[Parts]:
        logp_E = _log_probs(self.popularity(num_experts))
        return self._gumbel_batches(lambda b: logp_E, num_tokens, num_experts, num_batches, fit)


@dataclass(frozen=True, kw_only=True)
class DriftConfig(ClassVocabConfig):
    """s: Zipf exponent of the popularity profile at batch 0. mode: `rotate` (the profile moves
    round the experts by `speed` experts per batch, floor(b * speed)) or `walk` (log-popularity
    takes a Gaussian random-walk step of std `speed` per batch)."""

    workload: ClassVar[str] = "drift"
    s: float = 1.0
    mode: Literal["rotate", "walk"] = "rotate"
    speed: float = 1.0

    def validate(self) -> None:
        super().validate()
        check_float(self, "s", low=0.0)
        check_float(self, "speed", low=0.0)


@register_workload("drift")
class DriftWorkload(ClassVocabWorkload):
    """Popularity that moves from batch to batch (rotating Zipf profile, or a random walk)."""

    config_cls = DriftConfig
    config: DriftConfig

    def log_popularity(self, num_experts: int, num_batches: int) -> torch.Tensor:
        """[B, E] log-probabilities of the first choice in each batch (normalised)."""
        e, cfg = num_experts, self.config
        base_E = torch.empty(e, dtype=torch.float64)
        base_E[self._expert_perm(e)] = zipf_probs(e, cfg.s).log()
        b_B = torch.arange(num_batches)
        if cfg.mode == "rotate":
            shift_B = torch.floor(b_B.double() * cfg.speed).long()
            idx_BE = (torch.arange(e).unsqueeze(0) - shift_B.unsqueeze(1)) % e
            logp_BE = base_E[idx_BE]
        else:
            gen = generator(cfg.seed, "walk", e)
            steps_BE = torch.randn(num_batches, e, generator=gen, dtype=torch.float64) * cfg.speed
            steps_BE[0] = 0.0
            logp_BE = base_E + steps_BE.cumsum(0)
        return torch.log_softmax(logp_BE, dim=-1)

    def generate(self, num_tokens, num_experts, num_batches, fit, hidden_dim) -> Iterator[Parts]:
        logp_BE = self.log_popularity(num_experts, 1 if fit else num_batches)
        return self._gumbel_batches(lambda b: logp_BE[b], num_tokens, num_experts, num_batches, fit)


# --------------------------------------------------------------------------------------------
# correlated, adversarial
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class CorrelatedConfig(ClassVocabConfig):
    """rho: lag-1 correlation of the logits along a sequence, in [0, 1) (0 = uniform)."""

    workload: ClassVar[str] = "correlated"
    rho: float = 0.9

    def validate(self) -> None:
        super().validate()
        check_float(self, "rho", low=0.0, high=1.0, high_open=True)


@register_workload("correlated")
class CorrelatedWorkload(ClassVocabWorkload):
    """Neighbouring tokens route alike: logits are AR(1) along each sequence, N(0, 1) marginals."""

    config_cls = CorrelatedConfig
    config: CorrelatedConfig

    def generate(self, num_tokens, num_experts, num_batches, fit, hidden_dim) -> Iterator[Parts]:
        # Marginally every expert is equally likely (as in `uniform`); only neighbours agree, as
        # Mixtral's routing analysis found for consecutive tokens.
        vocab = self._vocab(num_experts)
        gen = generator(self.config.seed, "fit" if fit else "run")
        for b in range(num_batches):
            seq_T = sequence_ids(num_tokens, self.config.seq_len, b)
            noise_TE = torch.randn(num_tokens, num_experts, generator=gen)
            logits_TE = ar1_scan(noise_TE, self.config.rho, sequence_starts(seq_T))
            token_T = self._ids(logits_TE.argmax(-1), vocab, gen)
            yield Parts(logits_TE, token_T, seq_T)


@dataclass(frozen=True, kw_only=True)
class AdversarialConfig(WorkloadConfig):
    """expert: the expert every token's logits favour (< E). token_id: the one repeated id.
    margin: how far the favoured logit exceeds the row's largest other logit (> 0)."""

    workload: ClassVar[str] = "adversarial"
    expert: int = 0
    token_id: int = 0
    margin: float = 2.0

    def validate(self) -> None:
        super().validate()
        check_int(self, "expert", low=0)
        check_int(self, "token_id", low=0)
        check_float(self, "margin", low=0.0, low_open=True)


@register_workload("adversarial")
class AdversarialWorkload(Workload):
    """Every token to one expert: one repeated token id, and logits that favour one expert."""

    config_cls = AdversarialConfig
    config: AdversarialConfig

    def check_experts(self, num_experts: int) -> None:
        if self.config.expert >= num_experts:
            raise WorkloadError(
                f"adversarial: expert must be between 0 and num_experts - 1 = {num_experts - 1} "
                f"(got {self.config.expert})"
            )

    def generate(self, num_tokens, num_experts, num_batches, fit, hidden_dim) -> Iterator[Parts]:
        gen = generator(self.config.seed, "fit" if fit else "run")
        x = self.config.expert
        for b in range(num_batches):
            logits_TE = torch.randn(num_tokens, num_experts, generator=gen)
            if num_experts > 1:
                others_TE = torch.cat([logits_TE[:, :x], logits_TE[:, x + 1 :]], dim=1)
                logits_TE[:, x] = others_TE.max(-1).values + self.config.margin
            token_T = torch.full((num_tokens,), self.config.token_id, dtype=torch.int64)
            yield Parts(logits_TE, token_T, sequence_ids(num_tokens, self.config.seq_len, b))


__all__ = [
    "AdversarialConfig",
    "AdversarialWorkload",
    "CorrelatedConfig",
    "CorrelatedWorkload",
    "DriftConfig",
    "DriftWorkload",
    "HotConfig",
    "HotWorkload",
    "UniformConfig",
    "UniformWorkload",
    "ZipfConfig",
    "ZipfWorkload",
]
