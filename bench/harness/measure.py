"""Measure one configuration: a full MoE layer (route, dispatch, experts, combine, the shared
branch, and backward with ``fwd+bwd``), each stage timed after warm-up, device-synchronised, plus
memory, bandwidth against a copy of the same bytes, and every routing metric.

One ``positions`` per step: the layer's Dispatch (built with the backend's own positions op) is
what the metrics, the drop breakdown and the byte counts read; nothing routes a batch twice.

Byte formulas (elt = element size of the dtype, N kept rows, rows_out = N compact or E*C padded):
    permute_bytes = (N + rows_out) * D * elt        read N token rows, write the buffer
    combine_bytes = (N + T) * D * elt + 4 * N       read N expert rows and gates, write [T, D]
    copy reference: dst.copy_(src) of rows_out * D elements moves 2 * rows_out * D * elt bytes
    expert FLOPs  = 2 * m * rows * D * F            m = 3 matrices for SwiGLU, 2 for ReLU/GELU
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from typing import Any

import torch

from moe_routing_bench.bench.breakdown import DropSplit
from moe_routing_bench.bench.harness.sweep import Point
from moe_routing_bench.bench.metrics import METRICS, aggregate, batch_metrics
from moe_routing_bench.bench.moe_layer import run_layer
from moe_routing_bench.bench.routing import wants_fit
from moe_routing_bench.bench.schema import STAGES, TIMED_STAGES
from moe_routing_bench.bench.timing import (
    CpuHeap,
    RssSampler,
    StageTimer,
    copy_seconds,
    dtype_of,
    quantiles,
    resolve_device,
    stopwatch,
)
from moe_routing_bench.kernels.dispatch import Dispatch
from moe_routing_bench.kernels.experts import ExpertFFN
from moe_routing_bench.kernels.layer import get_backend
from moe_routing_bench.kernels.workspace import Workspace
from moe_routing_bench.routers.contract import Batch, Plan
from moe_routing_bench.routers.registry import build_router
from moe_routing_bench.routers.validate import validate_plan
from moe_routing_bench.workloads.registry import build_workload


def experts_of(point: Point, device: torch.device, dtype: torch.dtype) -> tuple[ExpertFFN, ExpertFFN, ExpertFFN | None]:
    """(the E routed experts, the one-expert FFN of a gated shared branch (nllb), the always-on
    shared experts of a preset or None), seeded from the point."""
    # On a GPU the weights are drawn there: a real model's layer (GBs) would take minutes on the CPU.
    kw = {"kind": point.ffn_kind, "dtype": dtype, "device": device, "init_on_device": device.type == "cuda"}
    ffn = ExpertFFN(point.experts, point.hidden, point.ffn_ratio, ffn=point.ffn, seed=point.seed, **kw)
    gated = ExpertFFN(1, point.hidden, point.ffn_ratio, ffn=point.ffn, seed=point.seed + 1, **kw)
    always = ExpertFFN(1, point.hidden, ffn=point.shared_ffn, seed=point.seed + 2, **kw) if point.shared_ffn else None
    return ffn, gated, always


def measure_point(point: Point) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """Run one configuration; returns (row fields, {"loads": per-expert load rows, "breakdown":
    drops by token-frequency and position bucket}). Raises on failure."""
    device = resolve_device(point.device)
    dtype = dtype_of(point.dtype)
    torch.manual_seed(point.seed)
    router = build_router(point.router, **point.router_options())
    workload = build_workload(point.workload, point.workload_opts, point.seed)
    n_batches = point.warmup + point.repeats
    batches = list(workload.batches(point.tokens, point.experts, n_batches, device))
    if wants_fit(router):
        router.fit(workload.fit_sample(point.tokens, point.experts, device))
    ffn, gated, always = experts_of(point, device, dtype)
    gen = torch.Generator().manual_seed(point.seed + 7)
    hidden = [torch.randn(point.tokens, point.hidden, generator=gen).to(device=device, dtype=dtype) for _ in batches]
    # The layer's input is the batch's hidden states, so a router with its own gate (nllb) reads
    # what the experts compute on.
    batches = [
        b if b.hidden_TD is not None else dataclasses.replace(b, hidden_TD=x.float())
        for b, x in zip(batches, hidden, strict=True)
    ]
    backward = point.mode == "fwd+bwd"
    if backward and point.reuse_buffers:
        raise ValueError("reuse_buffers is for forward-only steps (mode fwd): a reused buffer records no autograd")
    layout = None if point.layout == "default" else point.layout
    for m in (ffn, gated, always):
        if m is not None:
            m.requires_grad_(backward)
    workspace = Workspace() if point.reuse_buffers else None

    def step(batch: Batch, x_TD: torch.Tensor) -> tuple[dict[str, float], Plan, Dispatch]:
        timer = StageTimer(device)
        if backward:
            batch = dataclasses.replace(batch, logits_TE=batch.logits_TE.detach().requires_grad_(True))
            x_TD = x_TD.detach().requires_grad_(True)
            for m in (ffn, gated, always):  # a training step starts from no gradients (zero_grad)
                if m is not None:
                    m.zero_grad(set_to_none=True)
        total: list[float] = []
        with stopwatch(device, total), torch.set_grad_enabled(backward), timer("route"):
            plan = router.route(batch)
        # The one plan check, between the router and the layer, outside the step's time.
        validate_plan(router, batch, plan, point.router_label)
        with stopwatch(device, total), torch.set_grad_enabled(backward):
            out_TD, d = run_layer(
                plan,
                x_TD,
                ffn,
                backend=point.backend,
                layout=layout,
                shared_ffn=gated,
                stage_hook=timer,
                shared_experts=always,
                workspace=workspace,
            )
            if backward:
                grad = torch.ones_like(out_TD) / out_TD.numel()
                with timer("backward"):
                    out_TD.backward(grad)
        times = timer.collect()
        times["total"] = sum(total)
        times["other"] = times["total"] - sum(times.get(s, 0.0) for s in TIMED_STAGES)
        return times, plan, d

    stage_times: dict[str, list[float]] = defaultdict(list)
    per_batch: list[dict[str, float]] = []
    loads: list[dict[str, Any]] = []
    split = DropSplit(batches[point.warmup :])
    is_cuda = device.type == "cuda"
    # Memory is measured from before the first warm-up step: the allocator keeps what warm-up
    # freed, so a baseline taken after it would hide the layer's working set. On CPU the heap is
    # exact (RSS = live tensors) while memory is measured, over the warm-up steps, then caching
    # (pages reused, as a GPU allocator would) for the timed steps; see timing.CpuHeap.
    heap = None if is_cuda else CpuHeap()
    sampler = meter = None if is_cuda else RssSampler()
    if is_cuda:
        torch.cuda.synchronize(device)
        base_mem = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        heap.exact()
        heap.release()  # what earlier configurations freed leaves RSS before the baseline
        sampler.__enter__()
    try:
        for i in range(n_batches):
            if heap is not None and i == point.warmup > 0 and heap.available:
                sampler.__exit__(None, None, None)
                sampler = None  # the peak is the warm-up steps'
                heap.caching()
                # One untimed, unrecorded step (no router update) fills the caching heap, so the
                # first timed step does not pay the first touch the others are spared.
                step(batches[i - 1], hidden[i - 1])
            times, plan, d = step(batches[i], hidden[i])
            if i >= point.warmup:  # warm-up steps route too: a stateful router sees every batch
                for s in STAGES:
                    stage_times[s].append(times.get(s, 0.0))
                with torch.no_grad():
                    metrics, batch_loads = batch_metrics(plan, dispatch=d)
                    split.add(batches[i], plan, d.kept_R)
                per_batch.append(metrics)
                b = i - point.warmup
                req, kept = batch_loads.requested_E.tolist(), batch_loads.kept_E.tolist()
                loads += [
                    {"batch": b, "expert": e, "requested": int(req[e]), "kept": int(kept[e])}
                    for e in range(point.experts)
                ]
            router.update(plan)
    finally:
        if sampler is not None:
            sampler.__exit__(None, None, None)
        if heap is not None:
            heap.exact()
            heap.release()
    peak = torch.cuda.max_memory_allocated(device) - base_mem if is_cuda else float(meter.peak - meter.base)
    row = _cost_row(point, ffn, plan, d, dtype, device, stage_times, peak, workspace)
    for key, (mean, se) in aggregate(per_batch).items():
        row[key] = mean
        row[f"{key}_se"] = se
    assert set(METRICS) <= set(row)
    table = split.table()
    bd = [
        {"kind": kind, "bucket": bucket, **vals}
        for kind, key in (("frequency", "token_frequency"), ("position", "position"))
        for bucket, vals in table[key].items()
    ]
    return row, {"loads": loads, "breakdown": bd}


def _cost_row(
    point: Point,
    ffn: ExpertFFN,
    plan: Plan,
    d: Dispatch,
    dtype: torch.dtype,
    device: torch.device,
    stage_times: dict[str, list[float]],
    peak: float,
    workspace: Workspace | None,
) -> dict[str, Any]:
    """Times, throughput, memory, bytes and bandwidth of the measured steps (the last step's
    Dispatch for the byte counts: the buffers every step allocates are of its size)."""
    elt = torch.empty((), dtype=dtype).element_size()
    backend = get_backend(point.backend)
    used_layout = backend.check_layout(point.layout)
    n_kept = d.num_kept
    rows_out = n_kept if used_layout == "compact" else point.experts * d.padded_capacity
    permute_bytes = (n_kept + rows_out) * point.hidden * elt
    combine_bytes = (n_kept + point.tokens) * point.hidden * elt + 4 * n_kept
    copy_s = copy_seconds(rows_out * point.hidden, dtype, device, max(3, point.repeats))
    copy_gbps = 2 * rows_out * point.hidden * elt / copy_s / 1e9
    row: dict[str, Any] = {
        "top_k": float(plan.top_k),
        "capacity": plan.capacity,
        "ffn": ffn.ffn,
        "layout": used_layout,
        "looks_at_whole_batch": bool(plan.looks_at_whole_batch),
        "peak_mem_bytes": float(peak),
        "mem_kind": "cuda_max_allocated" if device.type == "cuda" else "rss_sampled",
        "dispatch_buffer_bytes": float(backend.buffer_bytes(d, point.hidden, dtype, used_layout)),
        "kept_rows": float(n_kept),
        "permute_bytes": float(permute_bytes),
        "combine_bytes": float(combine_bytes),
        "copy_gbps": copy_gbps,
        "expert_path": ffn.last_path,
        "workspace_bytes": float(workspace.nbytes) if workspace is not None else 0.0,
    }
    for s in STAGES:
        med, p20, p80 = quantiles(stage_times[s])
        row[f"time_{s}_median"], row[f"time_{s}_p20"], row[f"time_{s}_p80"] = med, p20, p80
    row["tokens_per_s"] = point.tokens / row["time_total_median"]
    t_perm, t_comb, t_exp = row["time_dispatch_median"], row["time_combine_median"], row["time_experts_median"]
    row["permute_gbps"] = permute_bytes / t_perm / 1e9 if t_perm > 0 else math.nan
    row["combine_gbps"] = combine_bytes / t_comb / 1e9 if t_comb > 0 else math.nan
    row["permute_copy_ratio"] = row["permute_gbps"] / copy_gbps
    row["combine_copy_ratio"] = row["combine_gbps"] / copy_gbps
    row["expert_tflops"] = ffn.flops(rows_out) / t_exp / 1e12 if t_exp > 0 else math.nan
    return row
