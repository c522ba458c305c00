"""The GPU check's second half: real model layers (the presets) and the peers' dispatch, timed on
the device the check runs on. ``gpu_check`` calls :func:`preset_rows` and :func:`peer_rows`.

Presets: each model's own router and layer (``bench.models``) through the harness's own
``measure_point`` in bf16, forward, at ``tokens`` tokens per step, on the triton and torch
backends; a preset whose weights do not fit is a skipped row with the bytes it needs. The dry
run rehearses every preset on CPU at 1/32 of its width (E, K and the router unchanged).

Peers: the dispatch round trip (``bench.microbench.peers``) on each provider that runs here,
each checked equal to ours before it is timed.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch

from moe_routing_bench.bench.harness.measure import measure_point
from moe_routing_bench.bench.harness.plan import skip_reason
from moe_routing_bench.bench.harness.sweep import expand, load_blocks
from moe_routing_bench.bench.microbench import peers
from moe_routing_bench.bench.models import PRESETS
from moe_routing_bench.bench.timing import memory_budget_bytes, time_alternating
from moe_routing_bench.kernels.layer import list_backends
from moe_routing_bench.workloads.registry import workload_names

KEEP = (
    "model",
    "router",
    "backend",
    "tokens",
    "experts",
    "hidden",
    "ffn",
    "top_k",
    "capacity",
    "dtype",
    "tokens_per_s",
    "time_total_median",
    "time_route_median",
    "time_dispatch_median",
    "time_experts_median",
    "time_combine_median",
    "time_shared_median",
    "time_other_median",
    "expert_tflops",
    "expert_path",
    "permute_copy_ratio",
    "combine_copy_ratio",
    "peak_mem_bytes",
    "imbalance",
    "drop_rate",
)


def preset_rows(device: torch.device, dry: bool, deadline: float, tokens: int = 16384) -> list[dict]:
    """One row per preset x backend: the harness's row (selected columns) or why it was skipped."""
    block = {
        "models": list(PRESETS),
        "tokens": [64 if dry else tokens],
        "dtypes": ["float32" if dry else "bfloat16"],
        "backends": ["triton", "torch"],
        "repeats": 2 if dry else 10,
        "warmup": 1 if dry else 3,
        "device": device.type,
    }
    budget = memory_budget_bytes(device.type)
    rows = []
    for point in expand(load_blocks(None, block), workload_names(), list_backends()):
        if dry:  # rehearse at 1/32 of the width: the same E, K and router
            point = dataclasses.replace(
                point,
                hidden=max(8, point.hidden // 32),
                ffn=max(8, (point.ffn or 8) // 32),
                shared_ffn=point.shared_ffn // 32,
            )
        base = {"model": point.model, "router": point.router_label, "backend": point.backend, "tokens": point.tokens}
        why = "time budget spent" if time.perf_counter() > deadline else skip_reason(point, budget)
        if why:
            rows.append({**base, "status": "skipped", "error": why})
            continue
        try:
            row, _ = measure_point(point)
            rows.append({**base, **{k: row.get(k) for k in KEEP if k in row}, "status": "ok", "error": ""})
        except Exception as exc:  # one failing preset is a row, not the end of the check
            rows.append({**base, "status": "error", "error": f"{type(exc).__name__}: {exc}"})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def peer_rows(device: torch.device, dry: bool) -> list[dict]:
    """The round trip per provider (T=16384, D=4096, E=64, K=2, bf16 on a GPU; tiny when dry)."""
    shape = (64, 48, 7, 2) if dry else (16384, 4096, 64, 2)
    dtype = torch.float32 if dry else torch.bfloat16
    rt = peers.setup(*shape, dtype, device)
    provs = peers.providers(rt)
    reference = provs["ours"][0]()
    fns, rows = {}, []
    base = dict(zip(("tokens", "hidden", "experts", "top_k"), shape, strict=True)) | {"dtype": str(dtype)}
    for name, (fn, why) in provs.items():
        verdict = "ok" if fn is None or name.startswith("copy") else peers.check_equal(reference, fn(), name)
        if fn is None or verdict != "ok":
            rows.append({**base, "provider": name, "status": "skipped" if fn is None else "mismatch",
                         "error": why or verdict})  # fmt: skip
        else:
            fns[name] = fn
    times = time_alternating(fns, device, 3 if dry else 20, warmup=1 if dry else 3)
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append({**base, "provider": name, "status": "ok", "error": "", "seconds": med,
                     "GBps": rt.nbytes / med / 1e9})  # fmt: skip
    return rows
