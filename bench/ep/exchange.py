"""Expert parallelism: experts sharded over ranks, token rows exchanged with ``all_to_all_single``.

One step on rank r of W (placement ``owner_E``, see ``bench.placement``):

1. route: rank r routes its own batch of T tokens; capacity ``C = ceil(cf K T / E)`` uses the
   rank's T (a per-batch decision, as in Switch and GShard, which apply capacity per device).
   Batches come from one workload stream with the run's seed, sharded like a distributed sampler:
   step i of rank r is stream batch ``i * W + r``. (Seeding each rank differently would give each
   rank its own gate on real tokens and its own hot expert on zipf: a different model per rank.)
2. permute: kept rows (``kernels.dispatch``) are put in *send order*: by owner rank, then expert
   (ascending id), then rank inside the expert.
3. counts exchange: ``all_to_all_single`` of int64 counts; rank r sends rank s the kept-row count
   of each of s's experts, so s receives a [W, L_s] matrix (L_s = experts on s).
4. dispatch exchange: ``all_to_all_single`` of the rows with uneven splits.
5. experts: received rows (source-major) are regrouped expert-major, run through the rank's slice
   of the full ``ExpertFFN`` (same seeded weights as a single-process layer), and regrouped back.
6. combine exchange: ``all_to_all_single`` back with the splits swapped; then the rows return to
   compact order and ``kernels.torch_backend.combine`` sums them weighted, in float32.

So the output is, up to float rounding, that of ``bench.layer.layer_forward`` with the full
``ExpertFFN`` on the same plan. This module holds the pure phases (testable in one process with a
loopback exchange) and what a configuration is; ``bench.ep_worker`` runs them on a process group.

Shape letters: T tokens, D hidden, E experts, W ranks, L local experts, N kept rows (sent),
M rows received, P experts in placement order.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from moe_routing_bench.bench.harness.sweep import Point
from moe_routing_bench.bench.record import config_id_of
from moe_routing_bench.kernels import torch_backend
from moe_routing_bench.kernels.dispatch import Dispatch
from moe_routing_bench.kernels.experts import ExpertFFN
from moe_routing_bench.workloads.registry import build_workload

# Rank r's hidden states are seeded with seed + RANK_STRIDE * r (+ the offset bench.measure uses):
# no two ranks share them for seeds < RANK_STRIDE, and rank 0's equal a single-process run's.
# Per-step stages each rank times; the derived ones are sums of these.
STEP_STAGES = (
    "route",
    "permute",
    "wait_dispatch",
    "a2a_dispatch",
    "experts",
    "wait_combine",
    "a2a_combine",
    "combine",
    "shared",
    "total",
)
DERIVED = {
    "dispatch": ("permute", "a2a_dispatch"),
    "combine_all": ("a2a_combine", "combine"),
    "a2a": ("a2a_dispatch", "a2a_combine"),
    "wait": ("wait_dispatch", "wait_combine"),
    "busy": ("a2a_dispatch", "experts", "a2a_combine"),
}
TIMED = (*STEP_STAGES, *DERIVED)
COUNTS = (
    "experts_local",
    "tokens_in",
    "rows_kept",
    "rows_sent",
    "rows_local",
    "rows_received",
    "rows_processed",
    "bytes_sent",
    "bytes_received",
)

RANK_STRIDE = 1_000_003
# Hidden states: the same offset as bench.measure (seed + 7), per rank.
HIDDEN_SEED_OFFSET = 7


def rank_seed(seed: int, rank: int) -> int:
    """Seed of rank ``rank``'s hidden states."""
    return seed + RANK_STRIDE * rank


# --------------------------------------------------------------------------------------------
# Sharding and the pure phases of one step
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Sharding:
    """A placement resolved for W ranks.

    owner_E: [E] int64 rank of each expert. order_P: [E] experts sorted by (owner, expert id), the
    order in which a rank lays out the rows it sends. experts_W: experts per rank (L_r).
    """

    owner_E: torch.Tensor
    world: int
    order_P: torch.Tensor = field(init=False)
    experts_W: list[int] = field(init=False)

    def __post_init__(self) -> None:
        owner = self.owner_E.to(torch.int64).cpu()
        if owner.dim() != 1 or (owner.numel() and (int(owner.min()) < 0 or int(owner.max()) >= self.world)):
            raise ValueError(f"owner_E must be [E] with values in 0..{self.world - 1}")
        object.__setattr__(self, "owner_E", owner)
        object.__setattr__(self, "order_P", torch.sort(owner, stable=True).indices)
        object.__setattr__(self, "experts_W", torch.bincount(owner, minlength=self.world).tolist())

    @property
    def num_experts(self) -> int:
        return int(self.owner_E.shape[0])

    def local_experts(self, rank: int) -> torch.Tensor:
        """[L] int64 experts held by ``rank``, ascending."""
        start = sum(self.experts_W[:rank])
        return self.order_P[start : start + self.experts_W[rank]]


def segment_order(starts: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Gather index concatenating the segments ``[starts[i], starts[i] + counts[i])`` in order.

    starts, counts: [S] int64. Returns [sum(counts)] int64, without a Python loop.
    """
    total = int(counts.sum())
    out_starts = torch.cumsum(counts, 0) - counts
    shift = torch.repeat_interleave(starts - out_starts, counts, output_size=total)
    return torch.arange(total, dtype=torch.int64, device=counts.device) + shift


@dataclass(frozen=True, eq=False)
class Outgoing:
    """What one rank sends in the dispatch exchange.

    order_S: [N] compact rows of the dispatch in send order (owner, expert, rank).
    counts_P: [E] int64 kept rows per expert in placement order (the counts exchange payload).
    rows_W: rows sent to each rank (the dispatch input splits, the combine output splits).
    """

    order_S: torch.Tensor
    counts_P: torch.Tensor
    rows_W: list[int]


def outgoing(d: Dispatch, sh: Sharding) -> Outgoing:
    """Send order and splits of a rank's dispatch under sharding ``sh``."""
    order_P = sh.order_P.to(d.counts_E.device)
    counts_P = d.counts_E[order_P]
    order_S = segment_order(d.offsets_E[order_P], counts_P)
    rows_W = torch.zeros(sh.world, dtype=torch.int64).index_add_(0, sh.owner_E, d.counts_E.cpu()).tolist()
    return Outgoing(order_S=order_S, counts_P=counts_P, rows_W=rows_W)


def send_rows(x_TD: torch.Tensor, d: Dispatch, out: Outgoing) -> torch.Tensor:
    """[N, D] token rows in send order: one gather from the tokens."""
    return x_TD.index_select(0, d.token_by_row_N.index_select(0, out.order_S))


@dataclass(frozen=True, eq=False)
class Incoming:
    """What one rank received in the dispatch exchange.

    order_M: [M] gather index from received (source-major) to expert-major rows.
    counts_L: [L] int64 rows per local expert. rows_W: rows received from each rank.
    """

    order_M: torch.Tensor
    counts_L: torch.Tensor
    rows_W: list[int]


def incoming(recv_counts_WL: torch.Tensor) -> Incoming:
    """Regrouping of received rows from the [W, L] counts matrix of the counts exchange."""
    flat = recv_counts_WL.reshape(-1)
    starts_WL = (torch.cumsum(flat, 0) - flat).view(recv_counts_WL.shape)
    order_M = segment_order(starts_WL.t().reshape(-1), recv_counts_WL.t().reshape(-1))
    return Incoming(order_M=order_M, counts_L=recv_counts_WL.sum(0), rows_W=recv_counts_WL.sum(1).tolist())


def run_local_experts(x_MD: torch.Tensor, inc: Incoming, ffn: ExpertFFN | None) -> torch.Tensor:
    """Expert outputs [M, D] in received (source-major) order."""
    if ffn is None or x_MD.shape[0] == 0:
        return torch.zeros_like(x_MD)
    y_local = ffn.forward_compact(x_MD.index_select(0, inc.order_M), inc.counts_L)
    return torch.empty_like(y_local).index_copy_(0, inc.order_M, y_local)


def finish(y_ND: torch.Tensor, d: Dispatch, out: Outgoing) -> torch.Tensor:
    """Combine returned rows [N, D] (send order) into out_TD [T, D]: weighted sum in float32."""
    y_compact = torch.empty_like(y_ND).index_copy_(0, out.order_S, y_ND)
    return torch_backend.combine(y_compact, d, "compact")


def local_ffn(full: ExpertFFN, experts_L: torch.Tensor, device: torch.device) -> ExpertFFN | None:
    """The rank's experts: a slice of the full seeded ``ExpertFFN`` (None when it holds none)."""
    n = int(experts_L.numel())
    if n == 0:
        return None
    ffn = ExpertFFN(n, full.hidden, ffn=full.ffn, kind=full.kind, seed=0, dtype=full.dtype)
    idx = experts_L.cpu()
    with torch.no_grad():
        for name in ("w_gate", "w_up", "w_down"):
            if getattr(full, name) is not None:
                setattr(ffn, name, torch.nn.Parameter(getattr(full, name)[idx].clone(), requires_grad=False))
    return ffn.to(device)


# --------------------------------------------------------------------------------------------
# One configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EPPoint:
    """One expert-parallel configuration: a sweep ``Point`` plus how it is distributed.

    owner_E: the resolved placement (expert -> rank); placement: the spec it came from.
    dist_backend: 'gloo' (CPU) or 'nccl' (GPU). dump_dir: where ranks save their outputs as
    ``.npy`` (tests compare them with a single-process layer); None saves nothing.
    """

    point: Point
    nproc: int
    placement: str
    owner_E: tuple[int, ...]
    dist_backend: str
    dump_dir: str | None = None

    def to_json(self) -> str:
        d = {
            "point": json.loads(self.point.to_json()),
            "nproc": self.nproc,
            "placement": self.placement,
            "owner_E": list(self.owner_E),
            "dist_backend": self.dist_backend,
        }
        return json.dumps(d, sort_keys=True)

    @property
    def config_id(self) -> str:
        return config_id_of("ep" + self.to_json())

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["point"] = asdict(self.point)
        d["owner_E"] = list(self.owner_E)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EPPoint:
        return cls(**{**d, "point": Point(**d["point"]), "owner_E": tuple(d["owner_E"])})


def rank_batches(point: Point, rank: int, world: int, device: torch.device | str) -> tuple[Any, list]:
    """(workload, rank ``rank``'s warm-up + measured batches): stream batches ``i * W + rank``.

    Every rank builds the same workload (the run's seed), so gates, vocabularies and expert
    popularity are shared; the fit sample (``workload.fit_sample``) is the same on every rank too.
    """
    workload = build_workload(point.workload, point.workload_opts, point.seed)
    n = point.warmup + point.repeats
    stream = workload.batches(point.tokens, point.experts, n * world, device)
    return workload, [b for j, b in enumerate(stream) if j % world == rank]


def rank_hidden(point: Point, rank: int, n_batches: int, dtype: torch.dtype, device: torch.device) -> list:
    """The hidden states [T, D] of rank ``rank``'s batches (seeded; the same on any device)."""
    gen = torch.Generator().manual_seed(rank_seed(point.seed, rank) + HIDDEN_SEED_OFFSET)
    return [
        torch.randn(point.tokens, point.hidden, generator=gen).to(device=device, dtype=dtype) for _ in range(n_batches)
    ]


def wire_bytes(rows_W: list[int], rank: int, row_bytes: int) -> int:
    """Bytes that cross the network for one exchange: rows to or from other ranks (self excluded)."""
    return (sum(rows_W) - rows_W[rank]) * row_bytes
