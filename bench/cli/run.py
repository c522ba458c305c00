"""``moe-bench run``: sweep routers x workloads x sizes x backends into a crash-safe run directory."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import click
import pandas as pd
from tqdm import tqdm

from moe_routing_bench.bench.harness.sweep import Point, expand, find_config, load_blocks
from moe_routing_bench.bench.harness.worker import Supervisor
from moe_routing_bench.bench.record import RunDir, git_commit, load_run, machine_info
from moe_routing_bench.bench.timing import device_name, resolve_device
from moe_routing_bench.bench.workload_adapter import workload_names
from moe_routing_bench.kernels.layer import list_backends
from moe_routing_bench.routers.contract import RoutingError, capacity
from moe_routing_bench.routers.registry import build_router, load_plugin, loaded_plugins

DEFAULT_OUT = Path("results")
_ELT = {"float32": 4, "float16": 2, "bfloat16": 2}


def _ints(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise RoutingError(f"expected comma-separated integers (got {text!r})") from None


def _floats(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise RoutingError(f"expected comma-separated numbers (got {text!r})") from None


def _names(text: str | None) -> list[str] | None:
    return None if text is None else [v.strip() for v in text.split(",") if v.strip()]


def memory_budget_bytes(device: str) -> int:
    """What one configuration may plan to allocate: 80% of GPU memory, or half the free RAM.
    MOE_BENCH_MEMORY_BUDGET (bytes) overrides it."""
    import torch

    if os.environ.get("MOE_BENCH_MEMORY_BUDGET"):
        return int(float(os.environ["MOE_BENCH_MEMORY_BUDGET"]))

    dev = resolve_device(device)
    if dev.type == "cuda":
        return int(0.8 * torch.cuda.get_device_properties(dev).total_memory)
    try:
        with open("/proc/meminfo") as fh:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in fh}
        return info.get("MemAvailable", 8 << 30) // 2
    except OSError:
        return 8 << 30


def skip_reason(point: Point, budget: int) -> str | None:
    """Configurations that cannot fit or cannot run here are refused up front, with the reason."""
    if (
        point.backend == "triton"
        and resolve_device(point.device).type != "cuda"
        and not os.environ.get("TRITON_INTERPRET")
    ):
        return "triton backend needs a CUDA GPU (on CPU it runs only under TRITON_INTERPRET=1)"
    if point.backend == "einsum":
        router = build_router(point.router, **point.router_options())
        cf = router.config.capacity_factor
        k = router.config.top_k
        c = capacity(cf, point.tokens, point.experts, k) if cf is not None else point.tokens
        mask = 2 * point.tokens * point.experts * c * _ELT[point.dtype]  # dispatch mask + combine weights
        if mask > budget:
            return (
                f"einsum one-hot mask [T={point.tokens}, E={point.experts}, C<={c}] needs "
                f"{mask / 2**30:.1f} GiB > budget {budget / 2**30:.1f} GiB"
            )
    return None


def base_row(point: Point, run: RunDir, meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "run_id": run.run_id,
        "config_id": point.config_id,
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": meta["git_commit"],
        "device": meta["device"],
        "device_name": meta["device_name"],
        "torch_version": meta["machine"]["torch_version"],
        "triton_version": meta["machine"]["triton_version"],
        "seed": point.seed,
        "config_json": point.to_json(),
        "plugins": "; ".join(meta["plugins"]),
        "router": point.router_label,
        "router_name": point.router,
        "workload": point.workload_label,
        "workload_name": point.workload,
        "tokens": point.tokens,
        "experts": point.experts,
        "top_k": float(point.top_k) if point.top_k is not None else math.nan,
        "capacity_factor": point.capacity_factor if point.capacity_factor is not None else math.nan,
        "hidden": point.hidden,
        "backend": point.backend,
        "backend_ran": point.backend,
        "layout": point.layout,
        "dtype": point.dtype,
        "mode": point.mode,
        "repeats": point.repeats,
    }


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


def summary_table(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per router and workload over the ok configurations."""
    ok = rows[rows["status"] == "ok"]
    if ok.empty:
        return pd.DataFrame()
    g = ok.groupby(["router", "workload"], sort=True)
    out = pd.DataFrame(
        {
            "configs": g.size(),
            "tokens_per_s": g["tokens_per_s"].median(),
            "drop_rate": g["drop_rate"].mean(),
            "tokens_dropped": g["tokens_dropped_frac"].mean(),
            "imbalance": g["imbalance"].mean(),
            "peak_mem_MiB": g["peak_mem_bytes"].max() / 2**20,
        }
    )
    return out.reset_index()


@click.command("run")
@click.option("--config", "config_name", default=None, help="Sweep name in bench/configs/ or a .toml path.")
@click.option("--routers", default=None, help="Comma-separated router names (override the file).")
@click.option("--workloads", default=None, help="Comma-separated workload names.")
@click.option("--experts", default=None, help="Comma-separated E values.")
@click.option("--tokens", default=None, help="Comma-separated T values.")
@click.option("--hidden", default=None, help="Comma-separated D values.")
@click.option("--top-k", "top_k", default=None, help="Comma-separated K values (routers that accept K).")
@click.option("--capacity-factor", "capacity_factor", default=None, help="Comma-separated cf values.")
@click.option("--backend", "backends", default=None, help="Comma-separated: torch, einsum, triton.")
@click.option("--dtype", "dtypes", default=None, help="Comma-separated: float32, float16, bfloat16.")
@click.option("--device", default=None, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--repeats", type=int, default=None, help="Timed repeats per configuration (after warm-up).")
@click.option("--seed", type=int, default=None)
@click.option("--mode", "modes", default=None, help="fwd or fwd+bwd (comma-separated for both).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=DEFAULT_OUT, show_default=True)
@click.option(
    "--resume", "resume", type=click.Path(path_type=Path), default=None, help="Finish this run directory."
)
@click.option("--timeout", type=float, default=600.0, show_default=True, help="Seconds per configuration.")
@click.option("--shard", default=None, metavar="I/N", help="Run only configurations with index % N == I.")
@click.option(
    "--executor",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="local: one supervised worker process; ray: one task per configuration on a Ray cluster.",
)
@click.option("--ray-address", default=None, help="Ray cluster address (default: start a local one).")
@click.option("--plugin", "plugins", multiple=True, metavar="FILE.py", help="Load routers from a file.")
def run_cmd(
    config_name: str | None,
    routers: str | None,
    workloads: str | None,
    experts: str | None,
    tokens: str | None,
    hidden: str | None,
    top_k: str | None,
    capacity_factor: str | None,
    backends: str | None,
    dtypes: str | None,
    device: str | None,
    repeats: int | None,
    seed: int | None,
    modes: str | None,
    out_dir: Path,
    resume: Path | None,
    timeout: float,
    shard: str | None,
    executor: str,
    ray_address: str | None,
    plugins: tuple[str, ...],
) -> None:
    """Sweep routers x workloads x sizes x backends; write Parquet under results/<run_id>/."""
    if resume is not None:
        run = RunDir.open(resume)
        meta = run.read_meta()
        plugin_paths = meta.get("plugin_paths", [])
        for p in plugin_paths:
            load_plugin(p)
        blocks = meta["blocks"]
        shard = meta.get("shard")
    else:
        plugin_paths = [str(Path(p).resolve()) for p in plugins]
        for p in plugin_paths:
            load_plugin(p)
        overrides = {
            "routers": _names(routers),
            "workloads": _names(workloads),
            "experts": _ints(experts),
            "tokens": _ints(tokens),
            "hidden": _ints(hidden),
            "top_k": _ints(top_k),
            "capacity_factor": _floats(capacity_factor),
            "backends": _names(backends),
            "dtypes": _names(dtypes),
            "modes": _names(modes),
            "device": device,
            "repeats": repeats,
            "seed": seed,
        }
        path = find_config(config_name) if config_name else None
        blocks = load_blocks(path, overrides)
    points = expand(blocks, workload_names(), list_backends())  # refuses bad names before any work
    total_points = len(points)
    if shard is not None:
        points = select_shard(points, shard)
    dev = resolve_device(points[0].device)

    if resume is None:
        out_dir.mkdir(parents=True, exist_ok=True)
        run = RunDir.create(out_dir)
        meta = {
            "run_id": run.run_id,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": git_commit(),
            "device": str(dev),
            "device_name": device_name(dev),
            "machine": machine_info(),
            "config": config_name or "flags",
            "blocks": blocks,
            "plugin_paths": plugin_paths,
            "plugins": loaded_plugins(),
            "configurations": len(points),
            "sweep_configurations": total_points,
            "shard": shard,
            "status": "running",
            "command": " ".join(sys.argv),
        }
        run.write_meta(meta)
    done = run.finished()
    todo = [p for p in points if p.config_id not in done]
    click.echo(
        f"run {run.run_id}: {len(points)} configurations, {len(points) - len(todo)} already done, "
        f"device {meta['device_name']}, results in {run.path}",
        err=True,
    )
    budget = memory_budget_bytes(points[0].device)
    if executor == "ray":
        from moe_routing_bench.bench.harness.ray_executor import RayExecutor

        runner: Any = RayExecutor(plugin_paths, address=ray_address, timeout=timeout)
    else:
        runner = Supervisor(plugin_paths, timeout=timeout)
    status = "complete"
    bar = tqdm(total=len(todo), desc="sweep", unit="cfg", file=sys.stderr, dynamic_ncols=True)
    try:
        runnable = []
        for point in todo:
            reason = skip_reason(point, budget)
            if reason:
                run.write_result({**base_row(point, run, meta), "status": "skipped", "error": reason})
                bar.update(1)
            else:
                runnable.append(point)
        for point, st, fields, tables, err in runner.results(runnable):
            row = {**base_row(point, run, meta), **fields, "status": st, "error": err}
            stamp = {
                "run_id": run.run_id,
                "config_id": point.config_id,
                "router": point.router_label,
                "workload": point.workload_label,
            }
            run.write_result(row, {name: [{**stamp, **r} for r in recs] for name, recs in tables.items()})
            bar.update(1)
    except KeyboardInterrupt:
        status = "interrupted"
        click.echo("interrupted: finished configurations are kept; finish with --resume", err=True)
    finally:
        bar.close()
        runner.stop(kill=status == "interrupted")
        run.consolidate()
        meta["status"] = status
        meta["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        run.write_meta(meta)

    rows, _, _ = load_run(run.path)
    counts = rows["status"].value_counts().to_dict()
    table = summary_table(rows)
    if not table.empty:
        formats = {
            "tokens_per_s": "{:,.0f}".format,
            "drop_rate": "{:.4f}".format,
            "tokens_dropped": "{:.4f}".format,
            "imbalance": "{:.3f}".format,
            "peak_mem_MiB": "{:.1f}".format,
        }
        click.echo(table.to_string(index=False, formatters=formats, na_rep="n/a"))
    click.echo(f"\n{run.path}: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    errors = rows[rows["status"] == "error"]
    for _, r in errors.head(5).iterrows():
        click.echo(
            f"error in {r['router']} x {r['workload']} (T={r['tokens']}, E={r['experts']}): "
            f"{str(r['error']).splitlines()[0]}",
            err=True,
        )
    if status == "interrupted":
        raise SystemExit(130)
    click.echo(json.dumps({"run_dir": str(run.path)}), err=True)
