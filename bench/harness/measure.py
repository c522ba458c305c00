"""Measure one configuration: a full MoE layer (route, dispatch, experts, combine, and backward
with ``fwd+bwd``), each stage timed after warm-up, device-synchronised, plus memory, bandwidth
against a copy of the same bytes, and every routing metric.

Byte formulas (elt = element size of the dtype, N kept rows, rows_out = N compact or E*C padded):
    permute_bytes = (N + rows_out) * D * elt        read N token rows, write the buffer
    combine_bytes = (N + T) * D * elt + 4 * N       read N expert rows and gates, write [T, D]
    copy reference: dst.copy_(src) of rows_out * D elements moves 2 * rows_out * D * elt bytes
    expert FLOPs  = 6 * rows * D * F                 SwiGLU: three [D, F] matmuls per row
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from typing import Any

import torch

from moe_routing_bench.bench.breakdown import breakdown
from moe_routing_bench.bench.harness.sweep import Point
from moe_routing_bench.bench.metrics import METRICS, aggregate, batch_metrics
from moe_routing_bench.bench.moe_layer import layer_forward
from moe_routing_bench.bench.record import STAGES
from moe_routing_bench.bench.routing import wants_fit
from moe_routing_bench.bench.timing import (
    RssSampler,
    StageTimer,
    copy_seconds,
    dtype_of,
    quantiles,
    resolve_device,
    stopwatch,
)
from moe_routing_bench.kernels.dispatch import analytic_buffer_bytes, make_dispatch
from moe_routing_bench.kernels.experts import ExpertFFN, expert_flops
from moe_routing_bench.routers.contract import Batch
from moe_routing_bench.routers.registry import build_router
from moe_routing_bench.routers.validate import validate_plan
from moe_routing_bench.workloads.registry import build_workload


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
    fit_sample = workload.fit_sample(point.tokens, point.experts, device) if wants_fit(router) else None
    if fit_sample is not None:
        router.fit(fit_sample)
    ffn = ExpertFFN(point.experts, point.hidden, ffn_ratio=point.ffn_ratio, seed=point.seed, dtype=dtype, device=device)
    shared_ffn = ExpertFFN(1, point.hidden, ffn_ratio=point.ffn_ratio, seed=point.seed + 1, dtype=dtype, device=device)
    gen = torch.Generator().manual_seed(point.seed + 7)
    hidden = [torch.randn(point.tokens, point.hidden, generator=gen).to(device=device, dtype=dtype) for _ in batches]
    # The layer's input is the batch's hidden states, so a router with its own gate (nllb) reads
    # what the experts compute on, in the timed pass and in the breakdown pass alike.
    batches = [
        b if b.hidden_TD is not None else dataclasses.replace(b, hidden_TD=x.float())
        for b, x in zip(batches, hidden, strict=True)
    ]
    backward = point.mode == "fwd+bwd"
    layout = None if point.layout == "default" else point.layout
    ffn.requires_grad_(backward)
    shared_ffn.requires_grad_(backward)

    stage_times: dict[str, list[float]] = defaultdict(list)
    per_batch: list[dict[str, float]] = []
    loads: list[dict[str, Any]] = []
    info: dict[str, Any] = {}
    is_cuda = device.type == "cuda"

    def step(i: int, batch: Batch, x_TD: torch.Tensor) -> tuple[dict[str, float], Any]:
        timer = StageTimer(device)
        if backward:
            batch = dataclasses.replace(batch, logits_TE=batch.logits_TE.detach().requires_grad_(True))
            x_TD = x_TD.detach().requires_grad_(True)
        total: list[float] = []
        with stopwatch(device, total), torch.set_grad_enabled(backward), timer("route"):
            plan = router.route(batch)
        # The one plan check, between the router and the layer, outside the step's time.
        validate_plan(router, batch, plan, point.router_label)
        with stopwatch(device, total), torch.set_grad_enabled(backward):
            out_TD = layer_forward(
                plan, x_TD, ffn, backend=point.backend, layout=layout, shared_ffn=shared_ffn, stage_hook=timer
            )
            if backward:
                grad = torch.ones_like(out_TD) / out_TD.numel()
                with timer("backward"):
                    out_TD.backward(grad)
        times = timer.collect()
        times["total"] = sum(total)
        return times, plan

    # Memory is sampled from before the first warm-up step: the allocator keeps what warm-up
    # freed, so a baseline taken after it would hide the layer's working set.
    sampler_ctx = RssSampler() if not is_cuda else None
    if is_cuda:
        torch.cuda.synchronize(device)
        base_mem = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        sampler_ctx.__enter__()
    for i in range(point.warmup):
        step(i, batches[i], hidden[i])
    try:
        for i in range(point.warmup, n_batches):
            times, plan = step(i, batches[i], hidden[i])
            for s in STAGES:
                stage_times[s].append(times.get(s, 0.0))
            with torch.no_grad():
                metrics, batch_loads = batch_metrics(plan)
            per_batch.append(metrics)
            b = i - point.warmup
            for e in range(point.experts):
                loads.append(
                    {
                        "batch": b,
                        "expert": e,
                        "requested": int(batch_loads.requested_E[e]),
                        "kept": int(batch_loads.kept_E[e]),
                    }
                )
            router.update(plan)
            info["plan"] = plan
    finally:
        if not is_cuda:
            sampler_ctx.__exit__(None, None, None)
    peak = torch.cuda.max_memory_allocated(device) - base_mem if is_cuda else float(sampler_ctx.peak - sampler_ctx.base)

    plan = info["plan"]
    with torch.no_grad():
        d = make_dispatch(
            plan.token_R,
            plan.expert_R,
            plan.weight_R.detach(),
            plan.num_tokens,
            plan.num_experts,
            plan.capacity,
        )
    elt = torch.empty((), dtype=dtype).element_size()
    used_layout = layout or ("padded" if point.backend == "einsum" else "compact")
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
        "mem_kind": "cuda_max_allocated" if is_cuda else "rss_sampled",
        "dispatch_buffer_bytes": float(
            analytic_buffer_bytes(d, point.hidden, dtype, "einsum" if point.backend == "einsum" else used_layout)
        ),
        "kept_rows": float(n_kept),
        "permute_bytes": float(permute_bytes),
        "combine_bytes": float(combine_bytes),
        "copy_gbps": copy_gbps,
    }
    for s in STAGES:
        med, p20, p80 = quantiles(stage_times[s])
        row[f"time_{s}_median"], row[f"time_{s}_p20"], row[f"time_{s}_p80"] = med, p20, p80
    row["tokens_per_s"] = point.tokens / row["time_total_median"]
    t_perm, t_comb, t_exp = (
        row["time_dispatch_median"],
        row["time_combine_median"],
        row["time_experts_median"],
    )
    row["permute_gbps"] = permute_bytes / t_perm / 1e9 if t_perm > 0 else math.nan
    row["combine_gbps"] = combine_bytes / t_comb / 1e9 if t_comb > 0 else math.nan
    row["permute_copy_ratio"] = row["permute_gbps"] / copy_gbps
    row["combine_copy_ratio"] = row["combine_gbps"] / copy_gbps
    row["expert_tflops"] = expert_flops(rows_out, point.hidden, ffn.ffn) / t_exp / 1e12 if t_exp > 0 else math.nan
    for key, (mean, se) in aggregate(per_batch).items():
        row[key] = mean
        row[f"{key}_se"] = se
    assert set(METRICS) <= set(row)
    # Drops by token frequency and by position in the sequence, over the timed batches (a second,
    # untimed routing pass with a fresh router of the same config).
    split = breakdown(router, lambda: batches[point.warmup :], fit_sample, point.router_label)
    bd = [
        {"kind": kind, "bucket": bucket, **vals}
        for kind, key in (("frequency", "token_frequency"), ("position", "position"))
        for bucket, vals in split[key].items()
    ]
    return row, {"loads": loads, "breakdown": bd}
