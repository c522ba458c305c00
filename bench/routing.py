"""Routing alone, over many batches: the engine of ``moe-bench route`` and of the simulator.

No expert compute: each batch is routed, the shared ``positions`` step decides what is kept, and
every routing metric is computed. Fast enough for a million tokens and hundreds of experts.
:func:`route_specs` is what ``moe-bench route`` runs: routers named by specs, one workload, the
shared flags applied with their one meaning (``bench.spec``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import torch

from moe_routing_bench.bench.breakdown import DropSplit
from moe_routing_bench.bench.metrics import BatchLoads, aggregate, batch_metrics
from moe_routing_bench.bench.spec import DEFAULT, CapacityFactor, Notes, Spec, router_options
from moe_routing_bench.bench.timing import check_fits, routing_bytes, stopwatch
from moe_routing_bench.kernels.positions import kept_mask, positions
from moe_routing_bench.routers.contract import Batch, Router, RoutingError
from moe_routing_bench.routers.registry import build_router
from moe_routing_bench.routers.validate import validate_plan
from moe_routing_bench.workloads.base import Workload
from moe_routing_bench.workloads.registry import build_workload

ROUTE_HIDDEN = 64  # hidden size D of the workload's hidden states, for routers that read them
DEFAULT_EXPERTS = 64


@dataclass
class RouteResult:
    """What routing B batches produced: per-batch metrics, their aggregate, and the loads."""

    router: Router
    per_batch: list[dict[str, float]]
    loads: list[BatchLoads]
    capacity: int | None
    top_k: float
    seconds: float  # route + positions + metrics, device-synchronised, summed over batches
    tokens: int

    @property
    def summary(self) -> dict[str, tuple[float, float]]:
        return aggregate(self.per_batch)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else math.nan


def wants_fit(router: Router) -> bool:
    """Whether the router learns from a separate slice of the stream (its variant's, not its
    class's answer: plain hash needs no fit slice, balanced hash does)."""
    return router.needs_fit


def route_batches(
    router: Router,
    batches,
    device: str | torch.device = "cpu",
    fit_sample: Batch | None = None,
    split: DropSplit | None = None,
    label: str | None = None,
) -> RouteResult:
    """Route every batch, calling ``update`` after each one. Every plan passes ``validate_plan``
    (untimed) before positions and metrics read it; a broken one raises PlanError naming the
    router (``label``, default its registered name), the field and the value.

    fit_sample: a batch from a separate slice of the stream, never one of the measured batches;
    given to ``router.fit`` first (untimed) when the router learns from data. split: drops by
    bucket, counted from these very plans (untimed).
    """
    if fit_sample is not None:
        router.fit(fit_sample)
    per_batch: list[dict[str, float]] = []
    loads: list[BatchLoads] = []
    seconds: list[float] = []
    tokens = 0
    cap: int | None = None
    top_k: float = router.config.top_k
    with torch.inference_mode():
        for batch in batches:
            with stopwatch(device, seconds):
                plan = router.route(batch)
            validate_plan(router, batch, plan, label)
            with stopwatch(device, seconds):
                rank_R = None if plan.capacity is None else positions(plan.expert_R, plan.num_experts)[0]
                metrics, load = batch_metrics(plan, rank_R)
                router.update(plan)
            if split is not None:
                split.add(batch, plan, None if rank_R is None else kept_mask(rank_R, plan.capacity))
            per_batch.append(metrics)
            loads.append(load)
            tokens += plan.num_tokens
            cap, top_k = plan.capacity, plan.top_k
    if not per_batch:
        raise RoutingError("num_batches must be >= 1")
    return RouteResult(router, per_batch, loads, cap, top_k, sum(seconds), tokens)


def find_target_drop(
    router_name: str,
    options: dict[str, Any],
    make_batches: Callable[[], Any],
    num_tokens: int,
    target: float,
    device: str | torch.device = "cpu",
    fit_sample: Batch | None = None,
    split: DropSplit | None = None,
    label: str | None = None,
) -> tuple[int, Fraction, RouteResult]:
    """Smallest capacity C (and the capacity factor that gives exactly C) whose mean drop rate
    over the batches is at most ``target``. Binary search over integer C: the drop rate of a
    token-choice router never rises as C grows. Returns (C, cf, result at C); ``split`` counts the
    drops of the result's own plans."""
    if not (0.0 <= target < 1.0):
        raise RoutingError(f"--target-drop must be in [0, 1) (got {target})")
    probe = build_router(router_name, **options)
    num_experts = probe.config.num_experts
    k = Fraction(str(probe.config.top_k))

    def run_at(c: int, split: DropSplit | None = None) -> RouteResult:
        # Any cf in ((C - 1) E / (K T), C E / (K T)] gives C; the upper end is exact.
        cf = Fraction(c * num_experts) / (k * num_tokens)
        router = build_router(router_name, **{**options, "capacity_factor": cf})
        return route_batches(router, make_batches(), device, fit_sample, split, label)

    first = run_at(num_tokens)
    if first.capacity is None:
        raise RoutingError(f"router {router_name!r} has no capacity to search (--target-drop needs one)")
    if math.isnan(first.summary["drop_rate"][0]):
        raise RoutingError(f"router {router_name!r} has no drop rate (it picks tokens per expert)")
    lo, hi, best = 1, num_tokens, first
    while lo < hi:
        mid = (lo + hi) // 2
        res = run_at(mid)
        if res.summary["drop_rate"][0] <= target:
            hi, best = mid, res
        else:
            lo = mid + 1
    if best.capacity != lo or split is not None:
        best = run_at(lo, split)
    return lo, Fraction(lo * num_experts) / (k * num_tokens), best


def describe_config(router: Router) -> dict[str, Any]:
    """The router's config as plain JSON-able values."""
    out = {}
    for f in dataclasses.fields(router.config):
        v = getattr(router.config, f.name)
        out[f.name] = float(v) if isinstance(v, Fraction) else v
    return out


@dataclass
class RouteReport:
    """``route_specs``'s answer: one result per router label, in the order asked for."""

    workload: Workload
    tokens: int
    experts: int
    batches: int
    seed: int
    device: torch.device
    results: dict[str, RouteResult]
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)  # --target-drop's capacity
    splits: dict[str, dict[str, Any]] = field(default_factory=dict)  # --breakdown


def route_specs(
    specs: list[Spec],
    workload_spec: Spec,
    *,
    tokens: int,
    experts: int | None,
    batches: int,
    seed: int,
    device: torch.device,
    top_k: int | None = None,
    capacity_factor: CapacityFactor = DEFAULT,
    target_drop: float | None = None,
    with_breakdown: bool = False,
    notes: Notes | None = None,
) -> RouteReport:
    """Route ``batches`` batches of the workload with each router; the same batches for all.

    experts: E, or None for the workload's own (a trace) or DEFAULT_EXPERTS; a trace refuses an E
    other than its own. Every router is built before any routing, so a bad name or option is
    refused before work starts. Routers that learn are fitted on the workload's fit slice.
    """
    if tokens < 1:
        raise RoutingError(f"--tokens must be >= 1 (got {tokens})")
    if batches < 1:
        raise RoutingError(f"--batches must be >= 1 (got {batches})")
    if experts is not None and experts < 1:
        raise RoutingError(f"--experts must be >= 1 (got {experts})")
    if target_drop is not None and capacity_factor != DEFAULT:
        shown = "none" if capacity_factor is None else capacity_factor
        raise RoutingError(
            f"--target-drop searches the capacity factor: it cannot be given with --capacity-factor {shown}"
        )
    workload = build_workload(workload_spec.name, workload_spec.opts, seed=seed)
    num_experts = experts if experts is not None else (workload.num_experts_fixed or DEFAULT_EXPERTS)
    check_fits(routing_bytes(tokens, num_experts), f"--tokens {tokens} x --experts {num_experts}", device)
    options = {
        s.label: router_options(
            s, experts=num_experts, seed=seed, top_k=top_k, capacity_factor=capacity_factor, notes=notes
        )
        for s in specs
    }
    routers = {s.label: build_router(s.name, **options[s.label]) for s in specs}
    hidden = ROUTE_HIDDEN if any(r.needs_hidden for r in routers.values()) else None
    make_batches = lambda: workload.batches(tokens, num_experts, batches, device, hidden_dim=hidden)
    fit_cache: list[Batch] = []

    def fit_slice(router: Router) -> Batch | None:
        # Routers that learn (fit) read the workload's own fit slice, never a measured batch.
        if not wants_fit(router):
            return None
        if not fit_cache:
            fit_cache.append(workload.fit_sample(tokens, num_experts, device, hidden_dim=hidden))
        return fit_cache[0]

    report = RouteReport(workload, tokens, num_experts, batches, seed, device, {})
    for spec in specs:
        label, router = spec.label, routers[spec.label]
        split = DropSplit(make_batches()) if with_breakdown else None
        if target_drop is not None:
            c, cf, res = find_target_drop(
                spec.name, options[label], make_batches, tokens, target_drop, device, fit_slice(router), split, label
            )
            report.extra[label] = {"target_drop": target_drop, "capacity": c, "capacity_factor": float(cf)}
        else:
            res = route_batches(router, make_batches(), device, fit_slice(router), split, label)
        report.results[label] = res
        if split is not None:
            report.splits[label] = split.table()
    return report
