"""``moe-bench ep``: expert parallelism on torch.distributed (``moe-bench simulate``, its model for
thousands of devices, lives in ``bench.sim_cmd`` and is re-exported here).

``ep`` validates every configuration here, writes them to ``RUN_DIR/ep_configs.json``, and launches
``python -m torch.distributed.run --standalone --nproc-per-node N -m bench.ep_worker RUN_DIR``
(gloo on CPU, NCCL when there are N GPUs). Rank 0 writes each finished configuration; one the
launch did not finish (a crash, a time-out) becomes a ``status=error`` row with the log's tail.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import torch

from moe_routing_bench.bench.cli.sim import _names, _positive, simulate_cmd
from moe_routing_bench.bench.ep.exchange import EPPoint
from moe_routing_bench.bench.ep.record import consolidate, load_ep_ranks, write_error
from moe_routing_bench.bench.ep.worker import CONFIGS_FILE
from moe_routing_bench.bench.harness.sweep import DTYPES, Point
from moe_routing_bench.bench.placement import check_spec, make_placement
from moe_routing_bench.bench.record import RunDir, git_commit, load_run, machine_info
from moe_routing_bench.bench.timing import device_name
from moe_routing_bench.bench.workload_adapter import make_workload, workload_names
from moe_routing_bench.routers.contract import RoutingError
from moe_routing_bench.routers.registry import build_router, load_plugin, loaded_plugins

DEFAULT_OUT = Path("results")
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


def ep_points(
    routers: list[str],
    workloads: list[str],
    nproc: int,
    tokens: int,
    experts: int,
    hidden: int,
    top_k: int | None,
    cf: Any,
    placement: str,
    repeats: int,
    warmup: int,
    seed: int,
    dtype: str,
    ffn_ratio: float,
    dist_backend: str,
    router_opts: dict[str, dict[str, str]],
    dump_dir: str | None,
) -> list[EPPoint]:
    """Every configuration, validated: a bad name, option or placement is refused before launch.

    cf: 'default' (the router's own), None (dropless) or a number > 0.
    """
    _positive("nproc", nproc)
    for name, v in (("tokens", tokens), ("experts", experts), ("hidden", hidden), ("repeats", repeats)):
        _positive(name, v)
    _positive("warmup", warmup, 0)
    if dtype not in DTYPES:
        raise RoutingError(f"--dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    check_spec(placement, ("contiguous", "round-robin"))
    owner_E = tuple(make_placement(placement, experts, nproc).tolist())
    valid_workloads = workload_names()
    points = []
    for wname in workloads:
        if wname not in valid_workloads:
            raise RoutingError(f"unknown workload {wname!r}; valid workloads: {', '.join(valid_workloads)}")
        make_workload(wname, {}, seed)
        for rname in routers:
            opts = dict(router_opts.get(rname, {}))
            if cf is None:
                opts["capacity_factor"] = None  # dropless, asked for explicitly
            point = Point(
                router=rname,
                router_label=rname,
                router_opts=opts,
                workload=wname,
                workload_label=wname,
                workload_opts={},
                tokens=tokens,
                experts=experts,
                hidden=hidden,
                top_k=top_k,
                capacity_factor=cf if isinstance(cf, float) else None,
                backend="torch",
                layout="compact",
                dtype=dtype,
                mode="fwd",
                repeats=repeats,
                warmup=warmup,
                seed=seed,
                ffn_ratio=ffn_ratio,
                device="cuda" if dist_backend == "nccl" else "cpu",
            )
            build_router(rname, **point.router_options())  # a bad option is refused now
            points.append(EPPoint(point, nproc, placement, owner_E, dist_backend, dump_dir))
    return points


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
            os.killpg(proc.pid, signal.SIGTERM)  # the session we started: torchrun and its ranks
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = 124
    lines = log_path.read_text(errors="replace").splitlines()
    errors = [ln for ln in lines if "Error" in ln or "error:" in ln]
    tail = "\n".join((errors[-3:] if errors else []) + lines[-8:])
    return rc, tail


def _summary(rows, ranks, order: list[str]) -> list[dict[str, Any]]:
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
                "tokens_dropped_frac": None
                if math.isnan(r["tokens_dropped_frac"])
                else r["tokens_dropped_frac"],
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


def _print_summary(summary: list[dict[str, Any]], nproc: int, backend: str, placement: str) -> None:
    click.echo(f"expert parallelism: {nproc} ranks ({backend}), placement {placement}; per rank, per step:")
    head = (
        f"{'router':<14}{'workload':<11}{'rank':>4}{'experts':>8}{'sent':>8}{'recv':>8}{'rows':>8}"
        f"{'MB out':>9}{'MB in':>9}{'a2a ms':>9}{'exp ms':>9}{'wait ms':>9}"
    )
    click.echo(head)
    for c in summary:
        for r in c["ranks"]:
            click.echo(
                f"{c['router']:<14}{c['workload']:<11}{r['rank']:>4}{r['experts_local']:>8}"
                f"{r['rows_sent']:>8.0f}{r['rows_received']:>8.0f}{r['rows_processed']:>8.0f}"
                f"{r['bytes_sent'] / 1e6:>9.3f}{r['bytes_received'] / 1e6:>9.3f}"
                f"{r['a2a_time_median'] * 1e3:>9.3f}{r['expert_time_median'] * 1e3:>9.3f}"
                f"{r['wait_time_median'] * 1e3:>9.3f}"
            )
    click.echo("")
    for c in summary:
        if c["status"] != "ok":
            click.echo(f"{c['router']} x {c['workload']}: {c['status']}: {str(c['error']).splitlines()[0]}")
            continue
        click.echo(
            f"{c['router']} x {c['workload']}: straggler {c['straggler']:.3f} (slowest rank's a2a + expert "
            f"time / mean), load ratio {c['load_ratio']:.3f} (rows), step {c['step_time_s'] * 1e3:.3f} ms "
            f"(slowest rank), tokens dropped {c['tokens_dropped_frac']:.4f}"
        )


@click.command("ep")
@click.option(
    "--nproc",
    type=int,
    default=2,
    show_default=True,
    help="Ranks (processes) N; experts are sharded over them.",
)
@click.option(
    "--router", "router_spec", default="switch", show_default=True, help="Router name(s), comma-separated."
)
@click.option(
    "--workload",
    "workload_spec",
    default="uniform",
    show_default=True,
    help="Workload name(s), comma-separated.",
)
@click.option("--tokens", "-T", type=int, default=1024, show_default=True, help="Tokens per rank per step T.")
@click.option("--experts", "-E", type=int, default=8, show_default=True)
@click.option("--hidden", "-D", type=int, default=128, show_default=True)
@click.option("--ffn-ratio", type=float, default=2.0, show_default=True, help="F = ffn_ratio * D.")
@click.option("--top-k", "-K", "top_k", type=int, default=None, help="Choices per token K (router default).")
@click.option("--capacity-factor", "cf_text", default=None, help="Capacity factor, or 'none' for dropless.")
@click.option(
    "--placement",
    default="contiguous",
    show_default=True,
    help="contiguous, round-robin or FILE.json (expert -> rank).",
)
@click.option("--repeats", type=int, default=5, show_default=True, help="Measured steps per configuration.")
@click.option("--warmup", type=int, default=1, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(list(DTYPES)))
@click.option(
    "--backend", default="torch", show_default=True, type=click.Choice(["torch"]), help="Dispatch backend."
)
@click.option(
    "--dist-backend", default="auto", show_default=True, type=click.Choice(["auto", "gloo", "nccl"])
)
@click.option(
    "--router-opt", "router_opts", multiple=True, metavar="KEY=VALUE", help="Any router config field."
)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=DEFAULT_OUT, show_default=True)
@click.option("--timeout", type=float, default=900.0, show_default=True, help="Seconds for the whole launch.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--plugin", "plugins", multiple=True, metavar="FILE.py", help="Load routers from a file.")
@click.option(
    "--dump-outputs", "dump_dir", default=None, hidden=True, help="Save each rank's outputs as .npy."
)
def ep_cmd(
    nproc,
    router_spec,
    workload_spec,
    tokens,
    experts,
    hidden,
    ffn_ratio,
    top_k,
    cf_text,
    placement,
    repeats,
    warmup,
    seed,
    dtype,
    backend,
    dist_backend,
    router_opts,
    out_dir,
    timeout,
    fmt,
    plugins,
    dump_dir,
) -> None:
    """Expert parallelism on torch.distributed: N ranks, all_to_all_single exchanges, per-rank bytes,
    times and load (the straggler)."""
    from moe_routing_bench.bench.cli import _parse_cf, _router_options  # cli imports this module at its end

    for p in plugins:
        load_plugin(p)
    routers = _names(router_spec, "router")
    cf = _parse_cf(cf_text)
    backend_name = dist_backend_for(dist_backend, max(nproc, 1))
    points = ep_points(
        routers,
        _names(workload_spec, "workload"),
        nproc,
        tokens,
        experts,
        hidden,
        top_k,
        cf,
        placement,
        repeats,
        warmup,
        seed,
        dtype,
        ffn_ratio,
        backend_name,
        _router_options(router_opts, routers),
        str(Path(dump_dir).resolve()) if dump_dir else None,
    )
    if dump_dir:
        Path(dump_dir).mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = RunDir.create(out_dir)
    dev = torch.device("cuda" if backend_name == "nccl" else "cpu")
    meta = {
        "run_id": run.run_id,
        "kind": "ep",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "device": str(dev),
        "device_name": device_name(dev),
        "machine": machine_info(),
        "config": "flags",
        "plugin_paths": list(plugins),
        "plugins": loaded_plugins(),
        "configurations": len(points),
        "status": "running",
        "command": " ".join(sys.argv),
        "ep": {
            "nproc": nproc,
            "dist_backend": backend_name,
            "placement": placement,
            "owner_E": list(points[0].owner_E),
        },
    }
    run.write_meta(meta)
    spec = {
        "configs": [p.as_dict() for p in points],
        "plugins": [str(Path(p).resolve()) for p in plugins],
        "timeout_s": timeout,
    }
    (run.path / CONFIGS_FILE).write_text(json.dumps(spec, indent=2))
    click.echo(
        f"ep run {run.run_id}: {len(points)} configurations on {nproc} ranks ({backend_name}), "
        f"results in {run.path}",
        err=True,
    )
    rc, tail = launch(run, nproc, timeout)
    done = run.finished()
    for p in points:
        if p.config_id not in done:
            why = "timed out" if rc == 124 else f"torchrun exited with status {rc}"
            write_error(
                run, p, meta, f"{why} before this configuration finished; log {run.path / LOG_FILE}:\n{tail}"
            )
    consolidate(run)
    meta.update(
        status="complete" if rc == 0 else "error",
        finished=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )
    run.write_meta(meta)
    rows, _, _ = load_run(run.path)
    summary = _summary(rows, load_ep_ranks(run.path), [p.config_id for p in points])
    if fmt == "json":
        click.echo(
            json.dumps(
                {
                    "run_dir": str(run.path),
                    "nproc": nproc,
                    "dist_backend": backend_name,
                    "placement": placement,
                    "configs": summary,
                },
                indent=2,
            )
        )
    else:
        _print_summary(summary, nproc, backend_name, placement)
        click.echo(f"\n{run.path}", err=True)
    if rc != 0:
        click.echo(
            f"moe-bench: error: the ep launch failed (status {rc}); see {run.path / LOG_FILE}", err=True
        )
        raise SystemExit(1)


__all__ = ["ep_cmd", "simulate_cmd"]
