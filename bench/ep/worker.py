"""The expert-parallel worker that ``torchrun`` starts once per rank: ``python -m bench.ep_worker RUN_DIR``.

It reads ``RUN_DIR/ep_configs.json`` (written by ``moe-bench ep``), joins the process group (gloo on
CPU, NCCL on GPU, one GPU per local rank), and for each configuration runs warm-up plus measured
steps of ``bench.ep``'s phases. Each stage is timed on the host between device synchronisations.
A barrier precedes each exchange, so the a2a time is the transfer itself and the time spent waiting
for a slower rank is reported apart (``wait``): expert time plus a2a time is then a rank's *busy*
time, and the straggler ratio ``max_r busy_r / mean_r busy_r`` is not hidden by the waits.

Rank 0 gathers every rank's statistics (float64 tensors, no pickles) and writes the run's parts:
``rows/<config_id>.parquet`` (one ROW_SCHEMA row), ``loads/<config_id>.parquet`` (per-expert loads
summed over ranks, per step) and ``ep_ranks/<config_id>.parquet`` (one row per rank).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from moe_routing_bench.bench.ep.exchange import (
    COUNTS,
    DERIVED,
    STEP_STAGES,
    TIMED,
    EPPoint,
    Sharding,
    finish,
    incoming,
    local_ffn,
    outgoing,
    rank_batches,
    rank_hidden,
    run_local_experts,
    send_rows,
    wire_bytes,
)
from moe_routing_bench.bench.harness.measure import experts_of
from moe_routing_bench.bench.metrics import METRICS, batch_metrics
from moe_routing_bench.bench.moe_layer import SHARED_WEIGHT, add_shared_branch, plan_dispatch
from moe_routing_bench.bench.routing import wants_fit
from moe_routing_bench.bench.timing import StageTimer, dtype_of, quantiles, stopwatch
from moe_routing_bench.routers.contract import Plan
from moe_routing_bench.routers.registry import build_router, load_plugin
from moe_routing_bench.routers.validate import PlanError, validate_plan

CONFIGS_FILE = "ep_configs.json"
_MESSAGE_BYTES = 512  # of a failed plan check, sent from the rank that found it


def _barrier(device: torch.device) -> None:
    if device.type == "cuda":
        dist.barrier(device_ids=[device.index])
    else:
        dist.barrier()


def _gather(x: torch.Tensor, world: int) -> torch.Tensor:
    """[W, *x.shape]: every rank's x (float64 or int64, on the collective's device)."""
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x)
    return torch.stack(parts).cpu()


def whole_step_plan(plan: Plan, rank: int, world: int) -> Plan:
    """The step's plan over every rank's batch, for a stateful router's ``update``: each rank's
    requests gathered in rank order, token ids offset by ``rank * T``. Every rank then updates
    from the same global load and keeps the same state (bias), as a data-parallel trainer that
    all-reduces its token counts does. One all_gather of the sizes, then of the padded arrays."""
    dev = plan.expert_R.device
    sizes = [int(s) for s in _gather(torch.tensor([plan.num_requests], device=dev), world).reshape(-1)]
    width = max(sizes)

    def padded(x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(width)
        out[: x.shape[0]] = x
        return out

    arrays = [plan.token_R + rank * plan.num_tokens, plan.expert_R, plan.weight_R.detach().float()]
    token_R, expert_R, weight_R = (
        torch.cat([g[w, :n] for w, n in enumerate(sizes)]).to(dev) for g in (_gather(padded(a), world) for a in arrays)
    )
    return Plan(
        token_R=token_R,
        expert_R=expert_R,
        weight_R=weight_R,
        num_tokens=plan.num_tokens * world,
        num_experts=plan.num_experts,
        capacity=plan.capacity,
        top_k=plan.top_k,
    )


def _plan_problem(router, batch, plan, label: str) -> str:
    """``validate_plan``'s complaint about this rank's plan, or "" when it passes."""
    try:
        validate_plan(router, batch, plan, label)
    except PlanError as exc:
        return str(exc)
    return ""


def _agree(problem: str, device: torch.device, world: int) -> str:
    """Every rank learns whether any rank's plan failed the check, in the collective that is the
    barrier before the exchange (no extra synchronisation on the good path); returns the first
    failing rank's complaint (sent as int64 byte codes, not pickles), or ""."""
    flag = torch.tensor([1 if problem else 0], dtype=torch.int64, device=device)
    dist.all_reduce(flag)
    if not int(flag.item()):
        return ""
    raw = list(problem.encode()[:_MESSAGE_BYTES])
    msg = torch.zeros(_MESSAGE_BYTES, dtype=torch.int64, device=device)
    if raw:
        msg[: len(raw)] = torch.tensor(raw, dtype=torch.int64, device=device)
    for r, codes in enumerate(_gather(msg, world).tolist()):
        text = bytes(c for c in codes if c).decode(errors="replace")
        if text:
            return f"{text} (rank {r})"
    return "a rank's plan failed the check"


def run_config(ep: EPPoint, rank: int, world: int, device: torch.device) -> dict[str, Any]:
    """Run one configuration on this rank; returns what every rank gathered (rank 0 writes it)."""
    point = ep.point
    dtype = dtype_of(point.dtype)
    elt = torch.empty((), dtype=dtype).element_size()
    router = build_router(point.router, **point.router_options())
    workload, batches = rank_batches(point, rank, world, device)
    n_steps = len(batches)
    if wants_fit(router):
        router.fit(workload.fit_sample(point.tokens, point.experts, device))
    # The same seeded experts as a single-process layer; the routed ones sharded below.
    full, shared_ffn, always = experts_of(point, torch.device("cpu"), dtype)
    shared_ffn = shared_ffn.to(device)
    always = always.to(device) if always is not None else None
    sh = Sharding(torch.tensor(ep.owner_E, dtype=torch.int64), world)
    mine = sh.local_experts(rank)
    ffn = local_ffn(full, mine, device)
    n_local = int(mine.numel())
    hidden = rank_hidden(point, rank, n_steps, dtype, device)

    times: dict[str, list[float]] = defaultdict(list)
    counts: dict[str, list[float]] = defaultdict(list)
    metrics: list[list[float]] = []
    loads: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    with torch.inference_mode():
        for i, (batch, x_TD) in enumerate(zip(batches, hidden, strict=True)):
            if batch.hidden_TD is None:
                batch = dataclasses.replace(batch, hidden_TD=x_TD.float())
            clock = StageTimer(device, wall=True)  # collectives: what a rank waits
            total: list[float] = []
            with stopwatch(device, total):
                with clock("route"):
                    plan = router.route(batch)
                problem = _plan_problem(router, batch, plan, point.router_label)
                if not problem:
                    with clock("permute"):
                        d = plan_dispatch(plan)
                        out = outgoing(d, sh)
                        x_send = send_rows(x_TD, d, out)
                with clock("wait_dispatch"):
                    failed = _agree(problem, device, world)  # the barrier before the exchange
                if failed:
                    raise PlanError(failed)
                with clock("a2a_dispatch"):
                    recv_counts = torch.empty(world * n_local, dtype=torch.int64, device=device)
                    dist.all_to_all_single(recv_counts, out.counts_P, [n_local] * world, sh.experts_W)
                    inc = incoming(recv_counts.view(world, n_local))
                    x_recv = x_send.new_empty((sum(inc.rows_W), point.hidden))
                    dist.all_to_all_single(x_recv, x_send, inc.rows_W, out.rows_W)
                with clock("experts"):
                    y_recv = run_local_experts(x_recv, inc, ffn)
                with clock("wait_combine"):
                    _barrier(device)
                with clock("a2a_combine"):
                    y_back = y_recv.new_empty((d.num_kept, point.hidden))
                    dist.all_to_all_single(y_back, y_recv, out.rows_W, inc.rows_W)
                with clock("combine"):
                    out_TD = finish(y_back, d, out)
                shared_w = plan.extras.get(SHARED_WEIGHT)
                if shared_w is not None:  # NLLB's dense branch runs locally, as bench.moe_layer does it
                    with clock("shared"):
                        out_TD = add_shared_branch(out_TD, x_TD, shared_ffn, shared_w)
                if always is not None:  # a preset's shared experts run on every rank, locally
                    with clock("shared"):
                        out_TD = add_shared_branch(out_TD, x_TD, always, None)
            clock.times["total"] = total[0]
            # Every step, warm-up included; a stateful router learns from the whole step's load.
            router.update(whole_step_plan(plan, rank, world) if router.stateful else plan)
            if ep.dump_dir is not None:
                outputs.append(out_TD.float().cpu())
            if i < point.warmup:
                continue
            for s in STEP_STAGES:
                times[s].append(clock.times.get(s, 0.0))
            for s, parts in DERIVED.items():
                times[s].append(sum(clock.times.get(p, 0.0) for p in parts))
            row_b = point.hidden * elt
            step = {
                "experts_local": n_local,
                "tokens_in": point.tokens,
                "rows_kept": d.num_kept,
                "rows_sent": sum(out.rows_W) - out.rows_W[rank],
                "rows_local": out.rows_W[rank],
                "rows_received": sum(inc.rows_W) - inc.rows_W[rank],
                "rows_processed": sum(inc.rows_W),
                # dispatch sends rows_W and combine returns what was received; counts are int64.
                "bytes_sent": wire_bytes(out.rows_W, rank, row_b)
                + wire_bytes(inc.rows_W, rank, row_b)
                + 8 * (point.experts - sh.experts_W[rank]),
                "bytes_received": wire_bytes(inc.rows_W, rank, row_b)
                + wire_bytes(out.rows_W, rank, row_b)
                + 8 * n_local * (world - 1),
            }
            for k, v in step.items():
                counts[k].append(float(v))
            m, bl = batch_metrics(plan)
            metrics.append([m[k] for k in METRICS])
            loads.append(torch.stack([bl.requested_E, bl.kept_E]).cpu())

    if ep.dump_dir is not None:
        import numpy as np

        path = Path(ep.dump_dir) / f"{ep.config_id}_rank{rank}.npy"
        np.save(path, torch.stack(outputs).numpy(), allow_pickle=False)

    stats = []
    for s in TIMED:
        stats.extend(quantiles(times[s]))
    stats.extend(sum(counts[k]) / len(counts[k]) for k in COUNTS)
    gdev = device  # NCCL gathers device tensors; gloo CPU ones
    return {
        "top_k": float(plan.top_k),
        "capacity": plan.capacity,
        "ffn": full.ffn,
        "looks_at_whole_batch": bool(plan.looks_at_whole_batch),
        "stats_WS": _gather(torch.tensor(stats, dtype=torch.float64, device=gdev), world),
        "metrics_WBM": _gather(torch.tensor(metrics, dtype=torch.float64, device=gdev), world),
        "loads_WB2E": _gather(torch.stack(loads).to(gdev), world),
    }


def rank_table(ep: EPPoint, gathered: dict[str, Any]) -> list[dict[str, Any]]:
    """One dict per rank: counts (means per measured step) and timings (median, p20, p80)."""
    stats = gathered["stats_WS"].tolist()
    rows = []
    for r, vec in enumerate(stats):
        row: dict[str, Any] = {"rank": r}
        for j, s in enumerate(TIMED):
            row[f"{s}_median"], row[f"{s}_p20"], row[f"{s}_p80"] = vec[3 * j : 3 * j + 3]
        for j, k in enumerate(COUNTS):
            row[k] = vec[3 * len(TIMED) + j]
        rows.append(row)
    busy = [r["busy_median"] for r in rows]
    load = [r["rows_processed"] for r in rows]
    straggler = max(busy) / (sum(busy) / len(busy)) if sum(busy) > 0 else math.nan
    load_ratio = max(load) / (sum(load) / len(load)) if sum(load) > 0 else math.nan
    for row in rows:
        row.update(straggler=straggler, load_ratio=load_ratio)
    return rows


def write_results(run_path: Path, ep: EPPoint, gathered: dict[str, Any]) -> None:
    """Rank 0: the config's ROW_SCHEMA row, loads and per-rank rows, as crash-safe parts."""
    from moe_routing_bench.bench.ep.record import write_ep_config  # pyarrow only on the writing rank

    write_ep_config(run_path, ep, gathered, rank_table(ep, gathered))


def write_error_row(run_path: Path, ep: EPPoint, error: str) -> None:
    """Rank 0: the configuration's row with status=error (its plans failed the check)."""
    from moe_routing_bench.bench.ep.record import write_error
    from moe_routing_bench.bench.record import RunDir

    run = RunDir.open(run_path)
    write_error(run, ep, run.read_meta(), error)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: torchrun ... -m bench.ep_worker RUN_DIR", file=sys.stderr)
        return 2
    run_path = Path(args[0])
    spec = json.loads((run_path / CONFIGS_FILE).read_text())
    for plugin in spec.get("plugins", []):
        load_plugin(plugin)
    configs = [EPPoint.from_dict(c) for c in spec["configs"]]
    backend = configs[0].dist_backend
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    timeout = _dt.timedelta(seconds=float(spec.get("timeout_s", 600)))
    dist.init_process_group(backend, timeout=timeout)
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        for ep in configs:
            if ep.nproc != world:
                raise RuntimeError(f"config wants {ep.nproc} ranks but the group has {world}")
            torch.manual_seed(ep.point.seed)
            try:
                gathered = run_config(ep, rank, world, device)
            except PlanError as exc:  # every rank raised it together: this configuration is an error row
                if rank == 0:
                    write_error_row(run_path, ep, str(exc))
            else:
                if rank == 0:
                    write_results(run_path, ep, gathered)
            _barrier(device)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
