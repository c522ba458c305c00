"""Expert placement: which device (rank) holds each expert, for expert parallelism and its simulator.

A placement is an ``owner_E`` [E] int64 tensor: ``owner_E[e]`` is the device in ``0..G-1`` that holds
expert e. Every expert has exactly one owner inside a group of G devices (a larger cluster repeats
the group; see ``bench.netsim``). Built-in kinds:

- ``contiguous``   ``owner[e] = floor(e * G / E)``: blocks of consecutive experts (Megatron, DeepSpeed).
- ``round-robin``  ``owner[e] = e mod G``: neighbouring experts on different devices.
- ``greedy``       load-aware (longest-processing-time first): experts sorted by observed load,
                   heaviest first, each to the device with the least load so far among devices
                   holding fewer than ``ceil(E / G)`` experts (ties: fewer experts, then lower
                   index). With ``E % G == 0`` every device holds exactly ``E / G`` experts.
- a JSON file      ``{"0": 1, "1": 0, ...}`` (expert -> device) or a list ``[1, 0, ...]`` of E owners.

Every kind needs ``E >= G`` (the built-ins then give every device at least one expert; a file may
leave a device empty). ``E % G != 0`` is allowed: expert counts per device then differ by one.

Shape letters: E experts, G devices.
"""

from __future__ import annotations

import heapq
import json
import math
from pathlib import Path

import torch

from moe_routing_bench.routers.contract import RoutingError

PLACEMENTS = ("contiguous", "round-robin", "greedy")


def _check_sizes(num_experts: int, num_devices: int) -> None:
    for name, v in (("experts E", num_experts), ("devices G", num_devices)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise RoutingError(f"{name} must be an integer >= 1 (got {v!r})")
    if num_experts < num_devices:
        raise RoutingError(
            f"placement needs experts E >= devices G per expert-parallel group (got E = {num_experts}, "
            f"G = {num_devices}); use fewer devices per group"
        )


def contiguous(num_experts: int, num_devices: int) -> torch.Tensor:
    """[E] owners: consecutive blocks of ``E / G`` experts (sizes differ by at most one)."""
    _check_sizes(num_experts, num_devices)
    return torch.arange(num_experts, dtype=torch.int64) * num_devices // num_experts


def round_robin(num_experts: int, num_devices: int) -> torch.Tensor:
    """[E] owners: ``e mod G``."""
    _check_sizes(num_experts, num_devices)
    return torch.arange(num_experts, dtype=torch.int64) % num_devices


def greedy(load_E: torch.Tensor, num_devices: int) -> torch.Tensor:
    """[E] owners balancing the observed per-expert load ``load_E`` [E] over G devices.

    Longest-processing-time first with at most ``ceil(E / G)`` experts per device, so expert
    memory stays balanced too. Deterministic: stable sort, ties broken by device index.
    """
    if not isinstance(load_E, torch.Tensor) or load_E.dim() != 1:
        raise RoutingError(f"load_E must be a 1-D tensor [E] (got {getattr(load_E, 'shape', load_E)!r})")
    e = int(load_E.shape[0])
    _check_sizes(e, num_devices)
    slots = math.ceil(e / num_devices)
    order = torch.sort(load_E.double().cpu(), descending=True, stable=True).indices.tolist()
    values = load_E.double().cpu().tolist()
    owner = [0] * e
    # Heap of (load, experts held, device): O(E log G); a full device leaves the heap.
    heap = [(0.0, 0, g) for g in range(num_devices)]
    for expert in order:
        load, held, dev = heapq.heappop(heap)
        owner[expert] = dev
        if held + 1 < slots:
            heapq.heappush(heap, (load + values[expert], held + 1, dev))
    return torch.tensor(owner, dtype=torch.int64)


def from_file(path: str | Path, num_experts: int, num_devices: int) -> torch.Tensor:
    """[E] owners read from a JSON file: ``{"expert": device, ...}`` covering every expert, or a list."""
    p = Path(path)
    try:
        raw = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RoutingError(f"--placement {str(path)!r}: cannot read a JSON placement ({exc})") from None
    _check_sizes(num_experts, num_devices)
    if isinstance(raw, list):
        pairs = list(enumerate(raw))
    elif isinstance(raw, dict):
        try:
            pairs = [(int(k), v) for k, v in raw.items()]
        except ValueError:
            raise RoutingError(f"--placement {p}: keys must be expert indices (got {sorted(raw)[:3]})") from None
    else:
        raise RoutingError(f"--placement {p}: expected a JSON object expert -> device, or a list")
    owner = [-1] * num_experts
    for expert, dev in pairs:
        if not 0 <= expert < num_experts:
            raise RoutingError(f"--placement {p}: expert {expert} is outside 0..{num_experts - 1}")
        if isinstance(dev, bool) or not isinstance(dev, int) or not 0 <= dev < num_devices:
            raise RoutingError(f"--placement {p}: expert {expert} -> {dev!r}, not a device in 0..{num_devices - 1}")
        owner[expert] = dev
    missing = [e for e, o in enumerate(owner) if o < 0]
    if missing:
        raise RoutingError(f"--placement {p}: experts without a device: {missing[:8]}")
    return torch.tensor(owner, dtype=torch.int64)


def check_spec(spec: str, allowed: tuple[str, ...] = PLACEMENTS) -> None:
    """Refuse a placement that is neither a built-in kind in ``allowed`` nor a ``.json`` file."""
    if spec in allowed:
        return
    if spec.endswith(".json"):
        if not Path(spec).is_file():
            raise RoutingError(f"--placement file {spec!r} does not exist")
        return
    raise RoutingError(f"--placement must be one of {', '.join(allowed)} or a FILE.json (got {spec!r})")


def make_placement(spec: str, num_experts: int, num_devices: int, load_E: torch.Tensor | None = None) -> torch.Tensor:
    """[E] int64 owners for a placement spec: a built-in kind or a ``.json`` file.

    load_E: observed per-expert load, required by ``greedy``.
    """
    check_spec(spec)
    if spec == "contiguous":
        return contiguous(num_experts, num_devices)
    if spec == "round-robin":
        return round_robin(num_experts, num_devices)
    if spec == "greedy":
        if load_E is None:
            raise RoutingError("--placement greedy needs observed expert loads")
        if load_E.shape[0] != num_experts:
            raise RoutingError(f"load_E has {load_E.shape[0]} experts, expected {num_experts}")
        return greedy(load_E, num_devices)
    return from_file(spec, num_experts, num_devices)


def device_loads(owner_E: torch.Tensor, load_E: torch.Tensor, num_devices: int) -> torch.Tensor:
    """[G] float64 load per device: the sum of its experts' loads."""
    return torch.zeros(num_devices, dtype=torch.float64).index_add_(0, owner_E, load_E.double().cpu())
