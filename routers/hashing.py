"""Hash routing (Roller et al. 2021, "Hash Layers For Large Sparse Models").

The expert of a token is a fixed function of its token id, not of the logits: no router weights,
no learned balance, gate 1. Two variants:

- ``random``: a seeded random map of the token id, computed as a seeded 64-bit integer hash
  (splitmix64's finaliser) of the id, modulo E. Vectorised in torch int64, needs no vocabulary
  size, and gives the same map for the same seed in every process and on every device.
- ``balanced``: ``fit(sample)`` reads a token-frequency table from a *separate* slice of the stream
  and assigns ids greedily, most frequent first, each to the expert with the least expected load so
  far (ties: the lowest expert index). Ids the sample never saw fall back to the random map. The
  paper's "balanced assignment" hash; routing before ``fit`` is an error, because fitting on the
  measured batches would report a balance no deployed model could have.

Dropless by default (capacity_factor None), K = 1; with a capacity factor, token order is the
priority. No aux loss and no z-loss: nothing is learned from the logits.

Shape letters: T tokens, E experts, V distinct token ids seen by ``fit``.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Literal

import torch

from .contract import Batch, Plan, Router, RouterConfig, RoutingError
from .options import fixed
from .registry import register_router

_MASK64 = (1 << 64) - 1
# splitmix64 (Steele, Lea and Flood 2014): the golden-ratio increment and the finaliser's multipliers.
_GOLDEN = 0x9E3779B97F4A7C15
_MUL1 = 0xBF58476D1CE4E5B9
_MUL2 = 0x94D049BB133111EB


def _as_int64(x: int) -> int:
    """The signed int64 with the same 64 bits as the unsigned value ``x mod 2**64``."""
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` is arithmetic on signed integers)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def hash_experts(token_T: torch.Tensor, seed: int, num_experts: int) -> torch.Tensor:
    """[T] int64 expert of each token id under the seeded random map.

    ``splitmix64(id + (seed + 1) * golden) mod E``, in wrapping int64 arithmetic: a bijective mix
    of the id's bits, so ids that differ in one bit land on unrelated experts. The top 63 bits are
    taken before the modulo so the result is never negative.
    """
    z = token_T.to(torch.int64) + _as_int64((seed + 1) * _GOLDEN)
    z = (z ^ _shr(z, 30)) * _as_int64(_MUL1)
    z = (z ^ _shr(z, 27)) * _as_int64(_MUL2)
    z = z ^ _shr(z, 31)
    return _shr(z, 1) % num_experts


def hash_experts_reference(token_id: int, seed: int, num_experts: int) -> int:
    """The same map in plain python integers, for tests: one id at a time."""
    z = (token_id + (seed + 1) * _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * _MUL1) & _MASK64
    z = ((z ^ (z >> 27)) * _MUL2) & _MASK64
    z ^= z >> 31
    return (z >> 1) % num_experts


def greedy_balanced_assignment(counts_V: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assign V ids, given their frequencies, to E experts: most frequent first, each to the expert
    with the least load so far (ties: the lowest expert index). Returns [V] int64 experts.

    Ties in frequency are taken in the order given (callers pass ids ascending, so the result is
    deterministic). A heap of (load, expert) makes it O(V log E): about 0.1 s for 200k ids.
    """
    order_V = torch.sort(counts_V, descending=True, stable=True).indices
    heap = [(0, e) for e in range(num_experts)]  # already a heap: loads equal, experts ascending
    assigned = [0] * counts_V.shape[0]
    replace = heapq.heapreplace
    for v, c in zip(order_V.tolist(), counts_V[order_V].tolist(), strict=True):
        load, e = heap[0]
        assigned[v] = e
        replace(heap, (load + c, e))
    return torch.tensor(assigned, dtype=torch.int64)


@dataclass(frozen=True)
class HashConfig(RouterConfig):
    """top_k is fixed at 1. variant: `random` (seeded hash of the token id) or `balanced` (greedy
    assignment by frequency, learned by fit on a separate slice). Dropless unless capacity_factor."""

    top_k: int = fixed(1, "hash routes each token to one expert")
    capacity_factor: float | None = None
    variant: Literal["random", "balanced"] = "random"

    def validate(self) -> None:
        super().validate()
        if self.top_k != 1:
            raise RoutingError(f"hash routes each token to one expert: top_k must be 1 (got {self.top_k})")


@register_router("hash")
class HashRouter(Router):
    """Hash (Roller et al.): expert = seeded random map of the token id (or balanced by fit); gate 1."""

    config_cls = HashConfig
    config: HashConfig

    def __init__(self, config: HashConfig | None = None, **options) -> None:
        super().__init__(config, **options)
        # The balanced table: ids ascending and their experts, on CPU; copies per device on demand.
        self._ids_V: torch.Tensor | None = None
        self._expert_V: torch.Tensor | None = None
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def fitted(self) -> bool:
        return self._ids_V is not None

    @property
    def needs_fit(self) -> bool:
        """Only the balanced variant learns from a fit slice; the random map needs none."""
        return self.config.variant == "balanced"

    def fit(self, sample: Batch) -> None:
        """Balanced variant: learn the id -> expert table from the token frequencies of ``sample``,
        which must be a slice of the stream other than the measured batches. No-op for `random`."""
        if self.config.variant != "balanced":
            return
        ids_V, counts_V = torch.unique(sample.token_T.detach().cpu(), sorted=True, return_counts=True)
        self._expert_V = greedy_balanced_assignment(counts_V, self.config.num_experts)
        self._ids_V = ids_V
        self._on_device = {}

    def experts_of(self, token_T: torch.Tensor) -> torch.Tensor:
        """[T] int64 expert of each token id under this router's map."""
        cfg = self.config
        random_T = hash_experts(token_T, cfg.seed, cfg.num_experts)
        if cfg.variant == "random":
            return random_T
        if self._ids_V is None or self._expert_V is None:
            raise RoutingError(
                "hash variant 'balanced' needs fit(sample) before route: call fit with a separate "
                "slice of the token stream (not the measured batches) to learn its frequency table"
            )
        dev = token_T.device
        if dev not in self._on_device:
            self._on_device[dev] = (self._ids_V.to(dev), self._expert_V.to(dev))
        ids_V, expert_V = self._on_device[dev]
        # Lookup by binary search in the sorted ids; ids the sample never saw keep the random map.
        idx_T = torch.searchsorted(ids_V, token_T).clamp_(max=ids_V.shape[0] - 1)
        seen_T = ids_V[idx_T] == token_T
        return torch.where(seen_T, expert_V[idx_T], random_T)

    def route(self, batch: Batch) -> Plan:
        self.check_batch(batch)
        t = batch.num_tokens
        device = batch.token_T.device
        expert_T = self.experts_of(batch.token_T)
        return Plan(
            token_R=torch.arange(t, device=device),
            expert_R=expert_T,
            # Gate 1 for every token: a constant, no gradient to the logits (there is no router).
            weight_R=torch.ones(t, dtype=torch.float32, device=device),
            num_tokens=t,
            num_experts=self.config.num_experts,
            capacity=self.config.capacity_for(t),
            top_k=1,
            aux_loss=None,
            z_loss=None,
        )
