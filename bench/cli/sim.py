"""``moe-bench simulate``: one expert-parallel step on thousands of devices, modelled from real plans.

The model is ``bench.netsim``'s; this module sweeps it over routers x workloads x G x placements
and records ``results/<run_id>/sim.parquet`` (SIM_SCHEMA) with a ``meta.json`` of kind ``simulate``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import click
import pyarrow as pa
import pyarrow.parquet as pq

from moe_routing_bench.bench.placement import check_spec
from moe_routing_bench.bench.record import RunDir, atomic_write_table, git_commit, machine_info
from moe_routing_bench.bench.sim.model import (
    PRESETS,
    Hardware,
    canonical_dtype,
    ep_group_size,
    preset,
    route_plans,
    simulate_step,
)
from moe_routing_bench.bench.workload_adapter import workload_names
from moe_routing_bench.routers.contract import RoutingError
from moe_routing_bench.routers.registry import build_router, load_plugin

DEFAULT_OUT = Path("results")


def _names(text: str, what: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names:
        raise RoutingError(f"--{what} needs at least one name (got {text!r})")
    return names


def _positive(name: str, value: int, low: int = 1) -> None:
    if value < low:
        raise RoutingError(f"--{name} must be an integer >= {low} (got {value})")


SIM_TABLE = "sim.parquet"
SIM_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("config_id", pa.string()),
        ("timestamp", pa.string()),
        ("git_commit", pa.string()),
        ("seed", pa.int64()),
        ("config_json", pa.string()),
        ("router", pa.string()),
        ("workload", pa.string()),
        ("devices", pa.int64()),
        ("nodes", pa.int64()),
        ("devices_per_node", pa.int64()),
        ("ep_size", pa.int64()),
        ("placement", pa.string()),
        ("experts", pa.int64()),
        ("tokens_per_device", pa.int64()),
        ("top_k", pa.float64()),
        ("capacity_factor", pa.float64()),
        ("capacity", pa.int64()),
        ("hidden", pa.int64()),
        ("ffn", pa.int64()),
        ("dtype", pa.string()),
        ("plans", pa.int64()),
        ("tokens_dropped_frac", pa.float64()),
        ("step_time_s", pa.float64()),
        ("a2a_dispatch_s", pa.float64()),
        ("a2a_combine_s", pa.float64()),
        ("compute_max_s", pa.float64()),
        ("compute_mean_s", pa.float64()),
        ("straggler", pa.float64()),
        ("load_ratio", pa.float64()),
        ("max_device_load", pa.float64()),
        ("mean_device_load", pa.float64()),
        ("bytes_total", pa.float64()),
        ("bytes_inter_node", pa.float64()),
        ("intra_bw_GBps", pa.float64()),
        ("intra_lat_us", pa.float64()),
        ("inter_bw_GBps", pa.float64()),
        ("inter_lat_us", pa.float64()),
        ("peak_tflops", pa.float64()),
        ("mem_bw_TBps", pa.float64()),
    ]
)


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise RoutingError(f"--{what} must be comma-separated integers (got {text!r})") from None
    if not values or any(v < 1 for v in values):
        raise RoutingError(f"--{what} must be integers >= 1 (got {text!r})")
    return values


def simulate_rows(
    routers: list[str],
    workloads: list[str],
    devices: list[int],
    placements: list[str],
    experts: int,
    tokens: int,
    top_k: int | None,
    cf: Any,
    hidden: int,
    ffn_ratio: float,
    dtype: str,
    hw: Hardware,
    num_plans: int,
    seed: int,
    ep_size: int | None,
    router_opts: dict[str, dict[str, str]],
) -> list[dict[str, Any]]:
    """One row per router x workload x G x placement; plans are routed once per router x workload."""
    for p in placements:
        check_spec(p)
    for g in devices:  # refuse an impossible G before routing anything
        ep_group_size(g, experts, ep_size)
    valid = workload_names()
    for w in workloads:
        if w not in valid:
            raise RoutingError(f"unknown workload {w!r}; valid workloads: {', '.join(valid)}")
    ffn = max(1, round(ffn_ratio * hidden))
    rows = []
    for router in routers:
        opts: dict[str, Any] = dict(router_opts.get(router, {}))
        if top_k is not None:
            opts["top_k"] = top_k
        if cf != "default":
            opts["capacity_factor"] = cf
        build_router(router, num_experts=experts, seed=seed, **opts)  # a bad option is refused now
        for workload in workloads:
            plans = route_plans(router, opts, workload, tokens, experts, min(num_plans, max(devices)), seed)
            for g in devices:
                for placement in placements:
                    cfg = {
                        "router": router,
                        "router_opts": opts,
                        "workload": workload,
                        "devices": g,
                        "placement": placement,
                        "experts": experts,
                        "tokens_per_device": tokens,
                        "hidden": hidden,
                        "ffn": ffn,
                        "dtype": dtype,
                        "plans": num_plans,
                        "seed": seed,
                        "ep_size": ep_size,
                        "hardware": dataclasses.asdict(hw),
                    }
                    text = json.dumps(cfg, sort_keys=True, default=str)
                    rows.append(
                        {
                            "config_id": hashlib.sha1(text.encode()).hexdigest()[:16],
                            "config_json": text,
                            "seed": seed,
                            "router": router,
                            "workload": workload,
                            "placement": placement,
                            "devices_per_node": hw.devices_per_node,
                            "experts": experts,
                            "tokens_per_device": tokens,
                            "top_k": plans.top_k,
                            "capacity_factor": math.nan if cf in ("default", None) else cf,
                            "capacity": plans.capacity,
                            "hidden": hidden,
                            "ffn": ffn,
                            "dtype": dtype,
                            "plans": int(plans.kept_BE.shape[0]),
                            "tokens_dropped_frac": plans.tokens_dropped_frac,
                            "intra_bw_GBps": hw.intra_bw,
                            "intra_lat_us": hw.intra_lat,
                            "inter_bw_GBps": hw.inter_bw,
                            "inter_lat_us": hw.inter_lat,
                            "peak_tflops": hw.flops,
                            "mem_bw_TBps": hw.mem_bw,
                            **simulate_step(plans, g, placement, hidden, ffn, dtype, hw, ep_size),
                        }
                    )
    return rows


def write_sim_run(out_dir: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> RunDir:
    """A run directory holding meta.json and sim.parquet (rows/ and loads/ stay empty)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    run = RunDir.create(out_dir)
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    commit = git_commit()
    full = [{**r, "run_id": run.run_id, "timestamp": stamp, "git_commit": commit} for r in rows]
    atomic_write_table(run.path / SIM_TABLE, pa.Table.from_pylist(full, schema=SIM_SCHEMA))
    run.write_meta(
        {
            **meta,
            "run_id": run.run_id,
            "kind": "simulate",
            "created": stamp,
            "git_commit": commit,
            "machine": machine_info(),
            "rows": len(rows),
            "status": "complete",
        }
    )
    return run


def load_sim(path: str | Path):
    """The ``sim.parquet`` table of a simulate run, as a DataFrame."""
    return pq.read_table(Path(path) / SIM_TABLE, schema=SIM_SCHEMA).to_pandas()


def _print_sim(rows: list[dict[str, Any]]) -> None:
    head = (
        f"{'router':<14}{'workload':<11}{'placement':<12}{'G':>6}{'nodes':>6}{'step ms':>10}"
        f"{'a2a ms':>9}{'comp max':>10}{'comp mean':>10}{'strag':>7}{'load':>7}{'inter GB':>10}"
    )
    click.echo(head)
    for r in rows:
        click.echo(
            f"{r['router']:<14}{r['workload']:<11}{r['placement']:<12}{r['devices']:>6}{r['nodes']:>6}"
            f"{r['step_time_s'] * 1e3:>10.3f}{(r['a2a_dispatch_s'] + r['a2a_combine_s']) * 1e3:>9.3f}"
            f"{r['compute_max_s'] * 1e3:>10.3f}{r['compute_mean_s'] * 1e3:>10.3f}{r['straggler']:>7.3f}"
            f"{r['load_ratio']:>7.3f}{r['bytes_inter_node'] / 1e9:>10.3f}"
        )


@click.command("simulate")
@click.option("--devices", "-G", "devices_text", required=True, help="Device counts G, comma-separated.")
@click.option("--experts", "-E", type=int, default=256, show_default=True)
@click.option("--nodes-of", "nodes_of", type=int, default=8, show_default=True, help="Devices per node K.")
@click.option(
    "--ep-size",
    type=int,
    default=None,
    help="Devices per expert-parallel group (default: G, or E when G > E).",
)
@click.option(
    "--placement",
    "placement_spec",
    default="contiguous",
    show_default=True,
    help="contiguous, round-robin, greedy or FILE.json; comma-separated to compare.",
)
@click.option(
    "--router", "router_spec", default="switch", show_default=True, help="Router name(s), comma-separated."
)
@click.option("--workload", "workload_spec", default="uniform", show_default=True, help="Workload name(s).")
@click.option("--tokens", "-T", type=int, default=4096, show_default=True, help="Tokens per device T.")
@click.option("--top-k", "-K", "top_k", type=int, default=None)
@click.option("--capacity-factor", "cf_text", default=None, help="Capacity factor, or 'none' for dropless.")
@click.option("--hidden", "-D", type=int, default=4096, show_default=True)
@click.option("--ffn-ratio", type=float, default=2.0, show_default=True, help="F = ffn_ratio * D.")
@click.option(
    "--dtype", default="bf16", show_default=True, help="bf16, fp16, fp8 or fp32 (bytes per element)."
)
@click.option(
    "--gpu", default="h100", show_default=True, type=click.Choice(sorted(PRESETS)), help="Preset figures."
)
@click.option(
    "--intra-bw", type=float, default=None, help="GB/s per device per direction in a node [preset]."
)
@click.option("--intra-lat", type=float, default=None, help="us per message in a node [preset].")
@click.option(
    "--inter-bw", type=float, default=None, help="GB/s per device per direction between nodes [preset]."
)
@click.option("--inter-lat", type=float, default=None, help="us per message between nodes [preset].")
@click.option("--flops", type=float, default=None, help="Peak TFLOP/s per device for --dtype [preset].")
@click.option("--mem-bw", type=float, default=None, help="HBM TB/s per device [preset].")
@click.option(
    "--plans",
    "num_plans",
    type=int,
    default=8,
    show_default=True,
    help="Real batches routed (tiled over devices).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--router-opt", "router_opts", multiple=True, metavar="KEY=VALUE")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=DEFAULT_OUT, show_default=True)
@click.option("--no-save", is_flag=True, help="Print only; write no run directory.")
@click.option("--plugin", "plugins", multiple=True, metavar="FILE.py")
def simulate_cmd(
    devices_text,
    experts,
    nodes_of,
    ep_size,
    placement_spec,
    router_spec,
    workload_spec,
    tokens,
    top_k,
    cf_text,
    hidden,
    ffn_ratio,
    dtype,
    gpu,
    intra_bw,
    intra_lat,
    inter_bw,
    inter_lat,
    flops,
    mem_bw,
    num_plans,
    seed,
    router_opts,
    fmt,
    out_dir,
    no_save,
    plugins,
) -> None:
    """Model one expert-parallel step on G devices from real plans: all-to-all traffic (alpha-beta
    network), roofline expert compute, step time and straggler."""
    from moe_routing_bench.bench.cli import _parse_cf, _router_options  # cli imports this module at its end

    for p in plugins:
        load_plugin(p)
    devices = _ints(devices_text, "devices")
    for name, v in (("experts", experts), ("tokens", tokens), ("hidden", hidden), ("plans", num_plans)):
        _positive(name, v)
    if not ffn_ratio > 0:
        raise RoutingError(f"--ffn-ratio must be > 0 (got {ffn_ratio})")
    dtype = canonical_dtype(dtype)
    hw = preset(
        gpu,
        dtype,
        intra_bw=intra_bw,
        intra_lat=intra_lat,
        inter_bw=inter_bw,
        inter_lat=inter_lat,
        flops=flops,
        mem_bw=mem_bw,
        devices_per_node=nodes_of,
    )
    routers = _names(router_spec, "router")
    t0 = time.perf_counter()
    rows = simulate_rows(
        routers,
        _names(workload_spec, "workload"),
        devices,
        _names(placement_spec, "placement"),
        experts,
        tokens,
        top_k,
        _parse_cf(cf_text),
        hidden,
        ffn_ratio,
        dtype,
        hw,
        num_plans,
        seed,
        ep_size,
        _router_options(router_opts, routers),
    )
    seconds = time.perf_counter() - t0
    run = None
    if not no_save:
        run = write_sim_run(
            out_dir,
            rows,
            {
                "command": " ".join(sys.argv),
                "gpu": gpu,
                "hardware": dataclasses.asdict(hw),
                "seconds": seconds,
            },
        )
    if fmt == "json":
        click.echo(
            json.dumps(
                {"run_dir": str(run.path) if run else None, "seconds": seconds, "rows": rows},
                indent=2,
                default=str,
            )
        )
    else:
        _print_sim(rows)
        where = f"; {run.path / SIM_TABLE}" if run else ""
        click.echo(f"\n{len(rows)} simulated steps in {seconds:.2f} s{where}", err=True)
