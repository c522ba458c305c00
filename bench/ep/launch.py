"""``moe-bench ep``'s job: validate every configuration, launch the ranks under torchrun, record.

:func:`ep_points` builds the configurations the way a sweep does (``harness.sweep.expand`` on one
block: the same specs, capacity factor and K rules) and wraps each in an :class:`EPPoint`.
:func:`run_ep` writes them to ``RUN_DIR/ep_configs.json`` and launches ``python -m
torch.distributed.run --standalone --nproc-per-node N -m moe_routing_bench.bench.ep.worker RUN_DIR``
(gloo on CPU, NCCL when there are N GPUs). Rank 0 writes each finished configuration; one the
launch did not finish (a crash, a time-out) becomes a ``status=error`` row with the log's tail.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moe_routing_bench.bench.ep.exchange import EPPoint
from moe_routing_bench.bench.ep.record import consolidate, load_ep_ranks, write_error
from moe_routing_bench.bench.ep.worker import CONFIGS_FILE
from moe_routing_bench.bench.harness.plan import planned_bytes
from moe_routing_bench.bench.harness.runner import check_timeout
from moe_routing_bench.bench.harness.sweep import Point, expand, load_blocks
from moe_routing_bench.bench.placement import check_spec, make_placement
from moe_routing_bench.bench.record import RunDir, load_run, new_meta, recording
from moe_routing_bench.bench.spec import DEFAULT, CapacityFactor, Notes, Spec
from moe_routing_bench.bench.timing import check_fits, element_size
from moe_routing_bench.kernels.layer import list_backends
from moe_routing_bench.routers.contract import RoutingError
from moe_routing_bench.routers.registry import loaded_plugins
from moe_routing_bench.workloads.registry import workload_names

LOG_FILE = "ep_log.txt"
WORKER_MODULE = "moe_routing_bench.bench.ep.worker"  # run by torchrun once per rank, with the run directory


def dist_backend_for(choice: str, nproc: int) -> str:
    """gloo on CPU; NCCL when asked or (auto) when there is one GPU per rank."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if choice == "auto":
        return "nccl" if gpus >= nproc else "gloo"
    if choice == "nccl" and gpus < nproc:
        raise RoutingError(f"--dist-backend nccl needs {nproc} GPUs, one per rank (found {gpus})")
    return choice


@dataclass(frozen=True)
class EPSweep:
    """What ``moe-bench ep`` runs: routers x workloads on N ranks, one size."""

    routers: list[Spec]
    workloads: list[Spec]
    nproc: int = 2
    tokens: int = 1024
    experts: int = 8
    hidden: int = 128
    ffn_ratio: float = 2.0
    top_k: int | None = None
    capacity_factor: CapacityFactor = DEFAULT
    placement: str = "contiguous"
    repeats: int = 5
    warmup: int = 1
    seed: int = 0
    dtype: str = "float32"
    dist_backend: str = "gloo"
    dump_dir: str | None = None
    model: str | None = None  # a preset: its E, D, F, FFN kind and shared experts


def ep_points(ep: EPSweep, notes: Notes | None = None) -> list[EPPoint]:
    """Every configuration, validated: a bad name, option or placement is refused before launch."""
    if isinstance(ep.nproc, bool) or not isinstance(ep.nproc, int) or ep.nproc < 1:
        raise RoutingError(f"--nproc must be an integer >= 1 (got {ep.nproc!r})")
    if isinstance(ep.warmup, bool) or not isinstance(ep.warmup, int) or ep.warmup < 0:
        raise RoutingError(f"--warmup must be an integer >= 0 (got {ep.warmup!r})")
    check_spec(ep.placement, ("contiguous", "round-robin"))
    owner_E = tuple(make_placement(ep.placement, ep.experts, ep.nproc).tolist())
    cf = "none" if ep.capacity_factor is None else ep.capacity_factor
    block = {
        "routers": [{"name": s.name, "opts": s.opts, "label": s.label} for s in ep.routers],
        "workloads": [{"name": s.name, "opts": s.opts, "label": s.label} for s in ep.workloads],
        "tokens": [ep.tokens],
        "experts": [ep.experts],
        "hidden": [ep.hidden],
        "top_k": [] if ep.top_k is None else [ep.top_k],
        "capacity_factor": [cf],
        "backends": ["torch"],
        "dtypes": [ep.dtype],
        "modes": ["fwd"],
        "layouts": ["compact"],
        "repeats": ep.repeats,
        "warmup": ep.warmup,
        "seed": ep.seed,
        "ffn_ratio": ep.ffn_ratio,
        "device": "cuda" if ep.dist_backend == "nccl" else "cpu",
        "models": [ep.model] if ep.model else [],
    }
    points = expand(load_blocks(None, block), workload_names(), list_backends(), notes)
    gpu = ep.dist_backend == "nccl"  # one GPU per rank; on CPU the ranks share the host's memory
    sharing = 1 if gpu else ep.nproc
    for p in points:
        check_fits(sharing * rank_bytes(p), _sizes(ep, p, sharing), block["device"])
    return [EPPoint(p, ep.nproc, ep.placement, owner_E, ep.dist_backend, ep.dump_dir) for p in points]


def rank_bytes(p: Point) -> int:
    """What one rank holds at least: the whole layer a single process would plan (every rank
    builds the whole seeded expert set before taking its shard), plus its exchange buffers (the
    rows it sends and receives, there and back: at most 4 T D elements)."""
    return planned_bytes(p) + 4 * p.tokens * p.hidden * element_size(p.dtype)


def _sizes(ep: EPSweep, p: Point, sharing: int) -> str:
    who = f"{sharing} ranks sharing this host" if sharing > 1 else "one rank on its own device"
    shape = f"--model {p.model}" if p.model else f"--experts {p.experts} x --hidden {p.hidden}"
    return f"ep ({who}): --tokens {p.tokens} x {shape} ({p.router_label or p.router})"


def launch(run: RunDir, nproc: int, timeout: float) -> tuple[int, str]:
    """Run the worker under torchrun; returns (exit status, tail of the log). 124 on time-out."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        WORKER_MODULE,
        str(run.path),
    ]
    log_path = run.path / LOG_FILE
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop(proc)
            rc = 124
        except BaseException:  # Ctrl-C, SIGTERM: the ranks must not outlive the command
            _stop(proc)
            raise
    lines = log_path.read_text(errors="replace").splitlines()
    errors = [ln for ln in lines if "Error" in ln or "error:" in ln]
    tail = "\n".join((errors[-3:] if errors else []) + lines[-8:])
    return rc, tail


def _stop(proc: subprocess.Popen) -> None:
    """End the session we started (torchrun and its ranks): SIGTERM, then SIGKILL after 15 s."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def summarize(rows, ranks, order: list[str]) -> list[dict[str, Any]]:
    """Per configuration (in ``order`` of config ids): status, straggler and the per-rank figures."""
    out = []
    rows = rows.set_index("config_id", drop=False).loc[[c for c in order if c in set(rows["config_id"])]]
    for _, r in rows.iterrows():
        rk = ranks[ranks["config_id"] == r["config_id"]].sort_values("rank")
        out.append(
            {
                "router": r["router"],
                "workload": r["workload"],
                "status": r["status"],
                "error": r["error"] or None,
                "tokens_per_rank": int(r["tokens"]),
                "experts": int(r["experts"]),
                "step_time_s": None if math.isnan(r["time_total_median"]) else r["time_total_median"],
                "straggler": float(rk["straggler"].iloc[0]) if len(rk) else None,
                "load_ratio": float(rk["load_ratio"].iloc[0]) if len(rk) else None,
                "tokens_dropped_frac": None if math.isnan(r["tokens_dropped_frac"]) else r["tokens_dropped_frac"],
                "ranks": [
                    {
                        k: (int(v) if k in ("rank", "experts_local", "tokens_in") else float(v))
                        for k, v in q.items()
                        if k
                        in (
                            "rank",
                            "experts_local",
                            "tokens_in",
                            "rows_sent",
                            "rows_received",
                            "rows_processed",
                            "bytes_sent",
                            "bytes_received",
                            "a2a_time_median",
                            "expert_time_median",
                            "wait_time_median",
                            "busy_time_median",
                        )
                    }
                    for q in rk.to_dict("records")
                ],
            }
        )
    return out


def run_ep(
    ep: EPSweep, out_dir: Path, *, timeout: float, plugin_paths: list[str], notes: Notes | None = None
) -> tuple[RunDir, int, list[dict[str, Any]]]:
    """Validate, launch, record. Returns (run directory, torchrun's exit status, per-config summary)."""
    check_timeout(timeout)
    points = ep_points(ep, notes)
    if ep.dump_dir:
        Path(ep.dump_dir).mkdir(parents=True, exist_ok=True)
    run = RunDir.create(out_dir)
    meta = new_meta(
        "ep",
        run.run_id,
        "cuda" if ep.dist_backend == "nccl" else "cpu",
        config="flags",
        plugin_paths=plugin_paths,
        plugins=loaded_plugins(),
        configurations=len(points),
        config_ids=[p.config_id for p in points],
        ep={
            "nproc": ep.nproc,
            "dist_backend": ep.dist_backend,
            "placement": ep.placement,
            "owner_E": list(points[0].owner_E),
        },
    )
    with recording(run, meta):
        spec = {"configs": [p.as_dict() for p in points], "plugins": plugin_paths, "timeout_s": timeout}
        (run.path / CONFIGS_FILE).write_text(json.dumps(spec, indent=2))
        rc, tail = launch(run, ep.nproc, timeout)
        done = run.finished()
        for p in points:
            if p.config_id not in done:
                why = "timed out" if rc == 124 else f"torchrun exited with status {rc}"
                write_error(
                    run, p, meta, f"{why} before this configuration finished; log {run.path / LOG_FILE}:\n{tail}"
                )
        consolidate(run)
        if rc != 0:
            meta["status"] = "failed"
            meta["error"] = f"the ep launch failed (status {rc}); see {run.path / LOG_FILE}"
    rows, _, _ = load_run(run.path)
    return run, rc, summarize(rows, load_ep_ranks(run.path), [p.config_id for p in points])
