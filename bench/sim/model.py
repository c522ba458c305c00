"""A cluster simulator for one expert-parallel MoE step: real plans, modelled network and compute.

Plans are real: B batches of T tokens are routed by a registered router on a workload, and the
shared ``positions`` step decides what is kept (``bench.simulate.route_batches``). Device g of G
uses plan ``g mod B`` (tiling: B distinct plans reach thousands of devices in seconds; every
device's batch is a real one, but the pattern repeats every B devices, so per-expert sums over
devices carry the noise of B batches, not G: at G >> B the straggler is, if anything, overstated).

Expert-parallel groups. Each group of S devices holds all E experts, placed by ``bench.placement``
(one owner per expert inside the group); a cluster of G devices is G / S groups (experts replicated
once per group, data parallel across groups), and tokens go only to devices of their own group.
Default S = G when E >= G, else S = E (one expert per device; then G % E == 0 is required).

Traffic. With kept rows ``k[g, e]`` (device g's plan) and ``dst(g, e) = S * floor(g / S) + owner[e]``,
the dispatch traffic matrix is ``Bytes[g, h] = D * elt * sum_{e: dst(g, e) = h} k[g, e]``: one row per
kept (token, expert) assignment, no de-duplication of a token sent twice to one device. It is a
bincount over ``g * G + dst(g, e)``; the diagonal stays on the device and costs nothing. The combine
exchange returns the same rows: its matrix is the transpose.

Network, alpha-beta per pair. A message of b bytes from g to h costs ``alpha + b / beta``, with
(alpha, beta) = (intra_lat, intra_bw) when g and h share a node (``floor(g / K) == floor(h / K)``,
K devices per node) and (inter_lat, inter_bw) otherwise; bandwidths are per device and per
direction. A device's messages on one link class are serialised, its two link classes (NVLink and
NIC) and two directions (send, receive) run concurrently:

    t_a2a(g) = max(send_intra(g), send_inter(g), recv_intra(g), recv_inter(g))
    send_intra(g) = sum over h != g on g's node, Bytes[g, h] > 0, of (alpha_intra + Bytes[g, h] / beta_intra)
    (the others alike: recv sums column g; inter sums over the other nodes)

An all-to-all ends when its slowest device does: ``a2a = max_g t_a2a(g)``. The combine's
``t_a2a(g)`` equals the dispatch's (send and receive swap), so the two columns differ only when
a future option changes the combine's row size.

Compute, roofline per device. Device g processes the rows it receives, including its own:
``rows(g) = sum_h Bytes[h, g] / (D * elt)``; for the SwiGLU of ``kernels.experts`` (F = ffn_ratio D)

    flops(g) = 6 * rows(g) * D * F                                       (three [D, F] matmuls)
    bytes(g) = 3 * D * F * elt * active(g) + rows(g) * (3 D + 6 F) * elt  (weights of its experts
               that got rows; per row: each GEMM reads its input and writes its output, unfused)
    t_comp(g) = max(flops(g) / peak_flops, bytes(g) / mem_bw)

Step and straggler:

    step_time = a2a_dispatch + max_g t_comp(g) + a2a_combine
    straggler = max_g busy(g) / mean_g busy(g),  busy(g) = t_a2a_dispatch(g) + t_comp(g) + t_a2a_combine(g)

``bytes_total`` counts the network bytes of both exchanges (twice the off-diagonal sum of the
traffic matrix); ``bytes_inter_node`` the part between nodes.

Shape letters: G devices, E experts, B plans, S devices per EP group, P device pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from moe_routing_bench.bench.placement import make_placement
from moe_routing_bench.bench.routing import route_batches, wants_fit
from moe_routing_bench.routers.contract import RoutingError
from moe_routing_bench.routers.registry import build_router
from moe_routing_bench.workloads.registry import build_workload

# Approximate spec-sheet values (NVIDIA H100 / H200 SXM datasheets; NVLink 4 via NVSwitch: 900 GB/s
# bidirectional per GPU; one ConnectX-7 InfiniBand NDR 400 Gb/s NIC per GPU). Latencies are typical
# small-message figures, not spec values. Dense tensor-core peaks, no sparsity.
PRESETS: dict[str, dict[str, Any]] = {
    "h100": {
        "intra_bw": 450.0,
        "intra_lat": 2.0,
        "inter_bw": 50.0,
        "inter_lat": 5.0,
        "mem_bw": 3.35,
        "flops": {"fp8": 1979.0, "bf16": 989.0, "fp16": 989.0, "fp32": 494.0},
    },
    "h200": {
        "intra_bw": 450.0,
        "intra_lat": 2.0,
        "inter_bw": 50.0,
        "inter_lat": 5.0,
        "mem_bw": 4.8,
        "flops": {"fp8": 1979.0, "bf16": 989.0, "fp16": 989.0, "fp32": 494.0},
    },
}
ELEMENT_BYTES = {"fp8": 1, "bf16": 2, "fp16": 2, "fp32": 4}
_DTYPE_ALIASES = {
    "bfloat16": "bf16",
    "float16": "fp16",
    "half": "fp16",
    "float32": "fp32",
    "float": "fp32",
    "float8": "fp8",
}


def canonical_dtype(name: str) -> str:
    d = _DTYPE_ALIASES.get(name, name)
    if d not in ELEMENT_BYTES:
        raise RoutingError(f"--dtype must be one of {', '.join(ELEMENT_BYTES)} (got {name!r})")
    return d


@dataclass(frozen=True)
class Hardware:
    """Per-device link and compute figures. Bandwidths per direction: GB/s (1e9 B/s), TB/s (1e12)."""

    intra_bw: float = 450.0  # GB/s, NVLink within a node
    intra_lat: float = 2.0  # us
    inter_bw: float = 50.0  # GB/s, NIC between nodes
    inter_lat: float = 5.0  # us
    flops: float = 989.0  # TFLOP/s peak for the dtype
    mem_bw: float = 3.35  # TB/s HBM
    devices_per_node: int = 8

    def __post_init__(self) -> None:
        for name in ("intra_bw", "inter_bw", "flops", "mem_bw"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise RoutingError(f"--{name.replace('_', '-')} must be a number > 0 (got {v!r})")
        for name in ("intra_lat", "inter_lat"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise RoutingError(f"--{name.replace('_', '-')} must be a number >= 0 (got {v!r})")
        if (
            isinstance(self.devices_per_node, bool)
            or not isinstance(self.devices_per_node, int)
            or (self.devices_per_node < 1)
        ):
            raise RoutingError(f"--nodes-of must be an integer >= 1 (got {self.devices_per_node!r})")


def preset(name: str, dtype: str = "bf16", **overrides: Any) -> Hardware:
    """A preset's figures for ``dtype``, with explicit values (not None) replacing them."""
    if name not in PRESETS:
        raise RoutingError(f"--gpu must be one of {', '.join(PRESETS)} (got {name!r})")
    p = PRESETS[name]
    hw = Hardware(
        p["intra_bw"],
        p["intra_lat"],
        p["inter_bw"],
        p["inter_lat"],
        p["flops"][canonical_dtype(dtype)],
        p["mem_bw"],
    )
    return replace(hw, **{k: v for k, v in overrides.items() if v is not None})


# --------------------------------------------------------------------------------------------
# Plans, groups, traffic
# --------------------------------------------------------------------------------------------


@dataclass
class Plans:
    """Kept rows per expert of B real plans: kept_BE [B, E] int64, and their routing summary."""

    kept_BE: torch.Tensor
    tokens: int
    capacity: int | None
    top_k: float
    tokens_dropped_frac: float


def route_plans(
    router: str,
    router_opts: dict[str, Any],
    workload: str,
    workload_opts: dict[str, Any],
    tokens: int,
    experts: int,
    num_plans: int,
    seed: int,
    label: str | None = None,
) -> Plans:
    """Route ``num_plans`` batches of ``tokens`` tokens on CPU (a separate slice fits routers that
    learn); router_opts are build_router's options besides num_experts and seed. Every plan passes
    ``validate_plan`` (errors name the router as ``label``)."""
    r = build_router(router, **{"num_experts": experts, "seed": seed, **router_opts})
    wl = build_workload(workload, workload_opts, seed)
    fit = wl.fit_sample(tokens, experts, "cpu") if wants_fit(r) else None
    res = route_batches(r, wl.batches(tokens, experts, num_plans, "cpu"), "cpu", fit, label=label)
    kept = torch.stack([ld.kept_E for ld in res.loads]).to(torch.int64)
    return Plans(kept, tokens, res.capacity, float(res.top_k), res.summary["tokens_dropped_frac"][0])


def ep_group_size(devices: int, experts: int, ep_size: int | None = None) -> int:
    """Devices per expert-parallel group S (see the module docstring); refuses what cannot be placed."""
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise RoutingError(f"--devices must be integers >= 1 (got {devices!r})")
    if ep_size is None:
        if experts >= devices:
            return devices
        if devices % experts:
            raise RoutingError(
                f"--devices {devices} > --experts {experts} needs devices % experts == 0 (each expert is "
                f"replicated devices / experts times, one copy per group of {experts}); or set --ep-size"
            )
        return experts
    if ep_size < 1 or devices % ep_size or experts < ep_size:
        raise RoutingError(f"--ep-size must divide --devices {devices} and be <= --experts {experts} (got {ep_size})")
    return ep_size


def tile(kept_BE: torch.Tensor, devices: int) -> torch.Tensor:
    """[G, E] kept rows per device: device g uses plan g mod B."""
    return kept_BE[torch.arange(devices) % kept_BE.shape[0]]


def destinations(owner_E: torch.Tensor, devices: int, group: int) -> torch.Tensor:
    """[G, E] device that receives device g's rows for expert e: its own group's owner of e."""
    base_G = torch.arange(devices, dtype=torch.int64) // group * group
    return base_G[:, None] + owner_E[None, :].to(torch.int64)


def traffic_matrix(kept_GE: torch.Tensor, owner_E: torch.Tensor, group: int, row_bytes: int) -> torch.Tensor:
    """[G, G] float64 dispatch bytes from device g (row) to device h (column), diagonal included.

    A bincount over ``g * G + dst(g, e)`` weighted by the kept rows. Dense (G^2 doubles: 128 MiB at
    G = 4096); the simulator itself uses :func:`traffic_pairs`, which never builds it.
    """
    g = kept_GE.shape[0]
    key = (torch.arange(g, dtype=torch.int64)[:, None] * g + destinations(owner_E, g, group)).reshape(-1)
    flat = torch.bincount(key, weights=kept_GE.reshape(-1).double(), minlength=g * g)
    return flat.view(g, g) * row_bytes


def traffic_pairs(kept_GE: torch.Tensor, owner_E: torch.Tensor, group: int, row_bytes: int):
    """The nonzero entries of :func:`traffic_matrix` as (src_P, dst_P, bytes_P), in O(G * (E + S)).

    Traffic stays inside a group, so rows are first summed per (device, owner in its group): [G, S].
    """
    g = kept_GE.shape[0]
    rows_GS = torch.zeros(g, group, dtype=torch.float64).index_add_(1, owner_E, kept_GE.double())
    src_GS = torch.arange(g, dtype=torch.int64)[:, None].expand(g, group)
    dst_GS = (torch.arange(g, dtype=torch.int64) // group * group)[:, None] + torch.arange(group)[None, :]
    nz = rows_GS > 0
    return src_GS[nz], dst_GS[nz], rows_GS[nz] * row_bytes


def a2a_device_times(src_P, dst_P, bytes_P, devices: int, hw: Hardware) -> torch.Tensor:
    """[G] seconds each device spends in one all-to-all (the alpha-beta model of the docstring)."""
    k = hw.devices_per_node
    intra = (src_P // k) == (dst_P // k)
    cost = torch.where(
        intra,
        hw.intra_lat * 1e-6 + bytes_P / (hw.intra_bw * 1e9),
        hw.inter_lat * 1e-6 + bytes_P / (hw.inter_bw * 1e9),
    )
    cost = cost.masked_fill_(src_P == dst_P, 0.0)  # a device's rows to itself never leave it
    cost_intra = cost * intra
    cost_inter = cost - cost_intra
    queues = torch.zeros(4, devices, dtype=torch.float64)
    for i, (ends, c) in enumerate(((src_P, cost_intra), (src_P, cost_inter), (dst_P, cost_intra), (dst_P, cost_inter))):
        queues[i].index_add_(0, ends, c)
    return queues.amax(0)


# --------------------------------------------------------------------------------------------
# One simulated step
# --------------------------------------------------------------------------------------------


def simulate_step(
    plans: Plans,
    devices: int,
    placement: str,
    hidden: int,
    ffn: int,
    dtype: str,
    hw: Hardware,
    ep_size: int | None = None,
    matrices: int = 3,
) -> dict[str, Any]:
    """Model one step on G devices; returns the ``sim.parquet`` measurements (seconds, bytes, rows).
    matrices: the expert FFN's [D, F] matrices (3 for SwiGLU, 2 for a ReLU/GELU FFN)."""
    experts = int(plans.kept_BE.shape[1])
    s = ep_group_size(devices, experts, ep_size)
    elt = ELEMENT_BYTES[canonical_dtype(dtype)]
    kept_GE = tile(plans.kept_BE, devices)
    load_E = kept_GE.sum(0)
    owner_E = make_placement(placement, experts, s, load_E=load_E)
    row_bytes = hidden * elt
    src, dst, b = traffic_pairs(kept_GE, owner_E, s, row_bytes)
    t_dispatch_G = a2a_device_times(src, dst, b, devices, hw)
    t_combine_G = a2a_device_times(dst, src, b, devices, hw)

    rows_G = torch.zeros(devices, dtype=torch.float64).index_add_(0, dst, b / row_bytes)
    # an expert copy's weights are read once when its group sends it any row
    group_load = kept_GE.view(devices // s, s, experts).sum(1)  # [G / S, E]
    active_dev = (torch.arange(devices // s)[:, None] * s + owner_E[None, :])[group_load > 0]
    active_G = torch.bincount(active_dev, minlength=devices).double()
    flops_G = 2.0 * matrices * rows_G * hidden * ffn
    mem_G = matrices * hidden * ffn * elt * active_G + rows_G * (3 * hidden + 2 * matrices * ffn) * elt
    t_comp_G = torch.maximum(flops_G / (hw.flops * 1e12), mem_G / (hw.mem_bw * 1e12))

    busy_G = t_dispatch_G + t_comp_G + t_combine_G
    off = src != dst
    inter = (src // hw.devices_per_node) != (dst // hw.devices_per_node)
    mean_rows = float(rows_G.mean())
    return {
        "devices": devices,
        "nodes": math.ceil(devices / hw.devices_per_node),
        "ep_size": s,
        "step_time_s": float(t_dispatch_G.max() + t_comp_G.max() + t_combine_G.max()),
        "a2a_dispatch_s": float(t_dispatch_G.max()),
        "a2a_combine_s": float(t_combine_G.max()),
        "compute_max_s": float(t_comp_G.max()),
        "compute_mean_s": float(t_comp_G.mean()),
        "straggler": float(busy_G.max() / busy_G.mean()) if float(busy_G.mean()) > 0 else math.nan,
        "load_ratio": float(rows_G.max()) / mean_rows if mean_rows > 0 else math.nan,
        "max_device_load": float(rows_G.max()),
        "mean_device_load": mean_rows,
        "bytes_total": 2.0 * float(b[off].sum()),
        "bytes_inter_node": 2.0 * float(b[off & inter].sum()),
    }
