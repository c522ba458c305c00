"""Synthetic workloads: batches of router logits and token ids from a seeded generator."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from routers.contract import Batch, RoutingError


@dataclass(frozen=True)
class UniformConfig:
    """iid standard-normal logits (every expert equally likely) and iid uniform token ids.

    vocab_size: V, the range of token ids. seed: the whole stream is a function of it.
    """

    vocab_size: int = 50_000
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, int) or self.vocab_size < 1:
            raise RoutingError(f"vocab_size must be an integer >= 1 (got {self.vocab_size!r})")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise RoutingError(f"seed must be an integer >= 0 (got {self.seed!r})")


class UniformWorkload:
    """iid N(0, 1) logits: argmax is uniform over experts, so loads are Multinomial(T, 1/E)."""

    name = "uniform"

    def __init__(self, config: UniformConfig | None = None) -> None:
        self.config = config or UniformConfig()

    def batches(
        self, num_tokens: int, num_experts: int, num_batches: int, device: str | torch.device = "cpu"
    ) -> Iterator[Batch]:
        """Yield ``num_batches`` batches of T tokens over E experts, deterministic for the seed."""
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
            raise RoutingError(f"num_tokens T must be an integer >= 1 (got {num_tokens!r})")
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise RoutingError(f"num_experts E must be an integer >= 1 (got {num_experts!r})")
        if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
            raise RoutingError(f"num_batches must be an integer >= 1 (got {num_batches!r})")
        gen = torch.Generator().manual_seed(self.config.seed)
        for _ in range(num_batches):
            logits_TE = torch.randn(num_tokens, num_experts, generator=gen)
            token_T = torch.randint(0, self.config.vocab_size, (num_tokens,), generator=gen)
            yield Batch(logits_TE=logits_TE.to(device), token_T=token_T.to(device))
