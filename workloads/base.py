"""The workload contract: a frozen, validated config and a seeded generator of batches.

Shape letters (DESIGN.md): T tokens, D hidden size, E experts, V vocabulary, S sequences.

A workload yields :class:`routers.contract.Batch` objects: router logits ``[T, E]`` float32, token
ids ``[T]`` int64, sequence ids ``[T]`` int64 and, on request, hidden states ``[T, D]``. The stream
is a function of the config (seed included) and of (T, E), nothing else. Every workload also has a
*fit slice*: a separate part of the stream (another seed stream for synthetic families, other
blocks of the corpus for real tokens) that routers which learn (``fit``) read instead of a
measured batch.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from moe_routing_bench.routers import options as options_module
from moe_routing_bench.routers.contract import Batch, RoutingError
from moe_routing_bench.routers.options import check_literals


class WorkloadError(RoutingError):
    """Bad workload input: the message names the option and what is allowed."""


class MissingSourceError(WorkloadError):
    """A real-token source (an OS or PyPI package) is not installed: the message says which."""


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class WorkloadConfig:
    """Fields every workload shares.

    seed:    the whole stream (measured batches and the fit slice) is a function of it.
    seq_len: tokens per sequence; each batch is cut into sequences of this length from its start
             (the last one shorter when T is not a multiple), with ids unique in the stream.
    """

    workload: ClassVar[str] = "workload"
    # Options that name files or folders: a run stores them absolute, so it resumes from anywhere.
    path_fields: ClassVar[tuple[str, ...]] = ()

    seed: int = 0
    seq_len: int = 1024

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        check_int(self, "seed", low=0)
        check_int(self, "seq_len", low=1)
        check_literals(self, WorkloadError, prefix=f"{self.workload}: ")

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def check_int(cfg: WorkloadConfig, name: str, low: int, high: int | None = None) -> None:
    v = getattr(cfg, name)
    bad = isinstance(v, bool) or not isinstance(v, int) or v < low or (high is not None and v > high)
    if bad:
        span = f">= {low}" if high is None else f"between {low} and {high}"
        raise WorkloadError(f"{cfg.workload}: {name} must be an integer {span} (got {v!r})")


def check_float(
    cfg: WorkloadConfig,
    name: str,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """A finite number in the given interval; the error states the interval."""
    v = getattr(cfg, name)
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
    if ok and low is not None:
        ok = v > low if low_open else v >= low
    if ok and high is not None:
        ok = v < high if high_open else v <= high
    if not ok:
        if low is not None and high is not None:
            span = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low is not None:
            span = f"{'>' if low_open else '>='} {low:g}"
        elif high is not None:
            span = f"{'<' if high_open else '<='} {high:g}"
        else:
            span = "finite"
        raise WorkloadError(f"{cfg.workload}: {name} must be a number {span} (got {v!r})")


def config_from_options(config_cls: type[WorkloadConfig], options: dict[str, Any]) -> WorkloadConfig:
    """Build a workload config from user options; strings (``--workload-opt k=v``) are parsed by
    the field's declared type. Unknown keys raise :class:`WorkloadError` listing the valid ones."""
    name = config_cls.workload
    return options_module.config_from_options(
        config_cls,
        options,
        WorkloadError,
        unknown=lambda key, names: f"unknown option {key!r} for workload {name!r}; valid options: {', '.join(names)}",
        bad_value=lambda key, why: f"{name}: {key} {why}",
    )


# --------------------------------------------------------------------------------------------
# Seeding and shared numerics
# --------------------------------------------------------------------------------------------


def derive_seed(seed: int, *labels: str | int) -> int:
    """A 63-bit seed for a named sub-stream of ``seed`` (e.g. ``derive_seed(3, "fit")``).

    numpy's SeedSequence mixes the labels (strings via CRC32, stable across processes), so
    sub-streams are independent of each other and of other seeds' streams.
    """
    key = [zlib.crc32(x.encode()) if isinstance(x, str) else int(x) for x in labels]
    state = np.random.SeedSequence(entropy=seed, spawn_key=key).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def generator(seed: int, *labels: str | int) -> torch.Generator:
    """A CPU torch generator for sub-stream ``labels`` of ``seed``."""
    return torch.Generator().manual_seed(derive_seed(seed, *labels))


def ar1_scan(x_TF: torch.Tensor, rho: float, start_T: torch.Tensor) -> torch.Tensor:
    """``y_t = rho * y_{t-1} + sqrt(1 - rho^2) * x_t`` along dim 0, restarting (``y_t = x_t``) where
    ``start_T`` is True. Unit-variance inputs give unit-variance outputs with lag-1 correlation
    ``rho``. A log-depth (Hillis-Steele) scan: ceil(log2 T) vectorised steps, no python loop over T.
    """
    t = x_TF.shape[0]
    if rho == 0.0 or t == 1:
        return x_TF.clone()
    c = math.sqrt(1.0 - rho * rho)
    y = x_TF * c
    y[start_T] = x_TF[start_T]
    # seg_T: index of the sequence start each token belongs to; a term may only carry inside it.
    idx = torch.arange(t)
    seg_T = torch.cummax(torch.where(start_T, idx, torch.zeros_like(idx)), 0).values
    d = 1
    while d < t:
        same = seg_T[d:] == seg_T[:-d]
        add = y[:-d] * (rho**d)
        y = y.clone()
        y[d:] += add * same.unsqueeze(-1).to(y.dtype)
        d *= 2
    return y


def zipf_probs(n: int, s: float) -> torch.Tensor:
    """[n] float64 probabilities ``p_r ~ 1 / r^s`` for ranks r = 1..n."""
    w = torch.arange(1, n + 1, dtype=torch.float64).pow(-float(s))
    return w / w.sum()


def gumbel_like(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Standard Gumbel noise: ``argmax(log p + G)`` is exactly Categorical(p) (the Gumbel-max trick)."""
    e = torch.empty(shape).exponential_(generator=gen).clamp_min_(1e-30)
    return -e.log()


def sequence_ids(num_tokens: int, seq_len: int, batch_index: int) -> torch.Tensor:
    """[T] int64 sequence ids: the batch cut into sequences of ``seq_len`` from its start, ids
    unique across batches (batch b's sequences are numbered from b * ceil(T / seq_len))."""
    per_batch = -(-num_tokens // seq_len)
    return torch.arange(num_tokens) // seq_len + batch_index * per_batch


def sequence_starts(seq_T: torch.Tensor) -> torch.Tensor:
    """[T] bool: True where a new sequence begins (the first token, and wherever the id changes)."""
    start = torch.ones_like(seq_T, dtype=torch.bool)
    start[1:] = seq_T[1:] != seq_T[:-1]
    return start


# --------------------------------------------------------------------------------------------
# The workload base class
# --------------------------------------------------------------------------------------------


@dataclass
class Parts:
    """What one generated batch holds before it becomes a :class:`Batch` (CPU tensors)."""

    logits_TE: torch.Tensor
    token_T: torch.Tensor
    seq_T: torch.Tensor
    hidden_TD: torch.Tensor | None = None


class Workload:
    """Base class: subclasses set ``config_cls`` and implement :meth:`generate`."""

    config_cls: ClassVar[type[WorkloadConfig]] = WorkloadConfig
    name: ClassVar[str] = ""

    def __init__(self, config: WorkloadConfig | None = None, **options: Any) -> None:
        if config is None:
            config = config_from_options(self.config_cls, options)
        elif options:
            config = dataclasses.replace(config, **options)
        if not isinstance(config, self.config_cls):
            raise WorkloadError(
                f"{type(self).__name__} needs a {self.config_cls.__name__} (got {type(config).__name__})"
            )
        self.config = config

    # -- what subclasses provide -----------------------------------------------------------

    def generate(
        self, num_tokens: int, num_experts: int, num_batches: int, fit: bool, hidden_dim: int | None
    ) -> Iterator[Parts]:
        """Yield ``num_batches`` batches (CPU). ``fit``: the separate fit stream instead."""
        raise NotImplementedError

    @property
    def num_experts_fixed(self) -> int | None:
        """E when the workload decides it (a captured trace), else None."""
        return None

    def check_experts(self, num_experts: int) -> None:
        """Refuse an E this workload's options cannot serve (e.g. ``expert`` >= E)."""

    # -- the public API ----------------------------------------------------------------------

    def batches(
        self,
        num_tokens: int,
        num_experts: int,
        num_batches: int,
        device: str | torch.device = "cpu",
        hidden_dim: int | None = None,
    ) -> Iterator[Batch]:
        """Yield ``num_batches`` measured batches of T tokens over E experts.

        hidden_dim: D of ``hidden_TD`` to include (None: no hidden states).
        """
        self._check(num_tokens, num_experts, num_batches, hidden_dim)
        return self._emit(num_tokens, num_experts, num_batches, False, device, hidden_dim)

    def fit_sample(
        self,
        num_tokens: int,
        num_experts: int,
        device: str | torch.device = "cpu",
        hidden_dim: int | None = None,
    ) -> Batch:
        """One batch of T tokens from the fit slice, disjoint from every measured batch."""
        self._check(num_tokens, num_experts, 1, hidden_dim)
        return next(self._emit(num_tokens, num_experts, 1, True, device, hidden_dim))

    def describe(self) -> dict[str, Any]:
        """Name and options, JSON-able, for run metadata."""
        return {"workload": self.name, **self.config.as_dict()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"

    # -- internals -----------------------------------------------------------------------------

    def _check(self, num_tokens: int, num_experts: int, num_batches: int, hidden_dim: int | None) -> None:
        for label, v in (("num_tokens T", num_tokens), ("num_experts E", num_experts)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise WorkloadError(f"{label} must be an integer >= 1 (got {v!r})")
        if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
            raise WorkloadError(f"num_batches must be an integer >= 1 (got {num_batches!r})")
        if hidden_dim is not None and (
            isinstance(hidden_dim, bool) or not isinstance(hidden_dim, int) or hidden_dim < 1
        ):
            raise WorkloadError(f"hidden_dim D must be an integer >= 1 or None (got {hidden_dim!r})")
        fixed = self.num_experts_fixed
        if fixed is not None and fixed != num_experts:
            raise WorkloadError(f"{self.name}: this workload has E = {fixed} experts (got num_experts = {num_experts})")
        self.check_experts(num_experts)

    def _emit(self, t, e, n, fit, device, hidden_dim) -> Iterator[Batch]:
        for b, parts in enumerate(self.generate(t, e, n, fit, hidden_dim)):
            hidden = parts.hidden_TD
            if hidden_dim is not None and hidden is None:
                # Synthetic hidden states: seeded N(0, 1), independent of the logits.
                gen = generator(self.config.seed, "hidden", int(fit), b)
                hidden = torch.randn(t, hidden_dim, generator=gen)
            yield Batch(
                logits_TE=parts.logits_TE.to(device=device, dtype=torch.float32),
                token_T=parts.token_T.to(device=device, dtype=torch.int64),
                seq_T=parts.seq_T.to(device=device, dtype=torch.int64),
                hidden_TD=None if hidden is None else hidden.to(device),
            )
