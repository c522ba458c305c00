"""Planning a sweep before any work: which configurations cannot run here, and which shard is ours.

A configuration that cannot fit the memory budget, or whose backend cannot run on this device, is
refused up front as a ``status=skipped`` row with the reason and the bytes it needs; it never
starts a worker. The memory check uses each backend's own upper bound (``Backend.planned_bytes``)
plus the expert weights, so the einsum mask at large T is refused before it is allocated.
"""

from __future__ import annotations

from moe_routing_bench.bench.harness.sweep import Point
from moe_routing_bench.bench.timing import BUDGET_ENV, element_size, resolve_device, routing_bytes
from moe_routing_bench.kernels.experts import ffn_width
from moe_routing_bench.kernels.layer import get_backend
from moe_routing_bench.routers.contract import RoutingError
from moe_routing_bench.routers.registry import build_router


def planned_bytes(point: Point) -> int:
    """What one configuration allocates at least: the dispatch buffers its backend plans (the
    einsum mask included, at the largest C a dropless plan can have), the expert weights (and
    their gradients in fwd+bwd), the layer's input and output."""
    router = build_router(point.router, **point.router_options())
    elt = element_size(point.dtype)
    cap = router.config.capacity_for(point.tokens)
    k = float(router.config.top_k)
    buffers = get_backend(point.backend).planned_bytes(point.tokens, point.experts, k, cap, point.hidden, elt)
    ffn = point.ffn or ffn_width(point.hidden, point.ffn_ratio)
    matrices = 3 if point.ffn_kind == "swiglu" else 2
    # The routed experts, the gated shared branch (one expert) and a preset's always-on experts.
    weights = matrices * point.hidden * ((point.experts + 1) * ffn + point.shared_ffn) * elt
    grads = weights if point.mode == "fwd+bwd" else 0
    hidden_states = 2 * point.tokens * point.hidden * elt  # the layer's input and output
    return buffers + weights + grads + hidden_states + routing_bytes(point.tokens, point.experts)


def skip_reason(point: Point, budget: int) -> str | None:
    """Why a configuration cannot run here (said in its skipped row), or None."""
    backend = get_backend(point.backend)
    why = backend.unavailable(resolve_device(point.device))
    if why is not None:
        return why
    if point.reuse_buffers and (point.mode != "fwd" or backend.permute_into is None):
        return (
            "reuse_buffers needs mode fwd and a backend that writes into reused buffers (torch); "
            f"got mode {point.mode}, backend {point.backend}"
        )
    need = planned_bytes(point)
    if need > budget:
        what = f"{point.model} expert weights" if point.model else "expert weights"
        return (
            f"needs about {need / 2**30:.2f} GiB ({need:,} bytes: {point.backend} dispatch buffers, {what}, "
            f"hidden states) > budget {budget / 2**30:.2f} GiB ({BUDGET_ENV} overrides)"
        )
    return None


def select_shard(points: list[Point], spec: str) -> list[Point]:
    """The deterministic 1/N of a sweep: points whose index (in expansion order) is I mod N."""
    i_text, sep, n_text = spec.partition("/")
    try:
        i, n = int(i_text), int(n_text)
    except ValueError:
        i, n = -1, 0
    if not sep or n < 1 or not 0 <= i < n:
        raise RoutingError(f"--shard must look like I/N with 0 <= I < N (got {spec!r})")
    return [p for p in points if p.index % n == i]
