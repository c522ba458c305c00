"""``moe-bench simulate``: one expert-parallel step on thousands of devices, modelled from real plans."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

from moe_routing_bench.bench.cli import options
from moe_routing_bench.bench.sim.model import PRESETS, canonical_dtype, preset
from moe_routing_bench.bench.sim.runner import SIM_TABLE, SimSweep, simulate_rows, write_sim_run
from moe_routing_bench.bench.spec import Spec, split_list
from moe_routing_bench.routers.contract import RoutingError


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in split_list(text)]
    except ValueError:
        raise RoutingError(f"--{what} must be comma-separated integers (got {text!r})") from None
    if not values or any(v < 1 for v in values):
        raise RoutingError(f"--{what} must be integers >= 1 (got {text!r})")
    return values


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
@click.option("--experts", "-E", type=int, default=None, help="Experts E [256, or --model's].")
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
@options.router_choice("switch")
@options.workload_choice()
@click.option("--tokens", "-T", type=int, default=4096, show_default=True, help="Tokens per device T.")
@click.option("--hidden", "-D", type=int, default=None, help="Hidden size D [4096, or --model's].")
@click.option("--ffn-ratio", type=float, default=2.0, show_default=True, help="F = ffn_ratio * D.")
@click.option("--dtype", default="bf16", show_default=True, help="bf16, fp16, fp8 or fp32 (bytes per element).")
@click.option("--gpu", default="h100", show_default=True, type=click.Choice(sorted(PRESETS)), help="Preset figures.")
@click.option("--intra-bw", type=float, default=None, help="GB/s per device per direction in a node [preset].")
@click.option("--intra-lat", type=float, default=None, help="us per message in a node [preset].")
@click.option("--inter-bw", type=float, default=None, help="GB/s per device per direction between nodes [preset].")
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
@options.output_format
@options.out_dir
@click.option("--no-save", is_flag=True, help="Print only; write no run directory.")
@options.routing_flags
def simulate_cmd(
    devices_text: str,
    experts: int | None,
    nodes_of: int,
    ep_size: int | None,
    placement_spec: str,
    router_text: str,
    workloads: list[Spec],
    tokens: int,
    hidden: int | None,
    ffn_ratio: float,
    dtype: str,
    gpu: str,
    intra_bw: float | None,
    intra_lat: float | None,
    inter_bw: float | None,
    inter_lat: float | None,
    flops: float | None,
    mem_bw: float | None,
    num_plans: int,
    fmt: str,
    out_dir: Path,
    no_save: bool,
    flags: options.RoutingFlags,
) -> None:
    """Model one expert-parallel step on G devices from real plans: all-to-all traffic (alpha-beta
    network), roofline expert compute, step time and straggler."""
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
    m = flags.model
    sweep = SimSweep(
        routers=flags.routers(router_text, "switch"),
        workloads=workloads,
        devices=_ints(devices_text, "devices"),
        placements=split_list(placement_spec),
        experts=flags.experts(experts, 256),
        tokens=tokens,
        hidden=flags.size("--hidden", hidden, "hidden", 4096),
        ffn_ratio=ffn_ratio,
        ffn=None if m is None else m.ffn,
        ffn_kind="swiglu" if m is None else m.ffn_kind,
        model=None if m is None else m.name,
        dtype=dtype,
        hw=hw,
        plans=num_plans,
        seed=flags.seed,
        ep_size=ep_size,
        top_k=flags.top_k,
        capacity_factor=flags.capacity_factor,
    )
    t0 = time.perf_counter()
    rows = simulate_rows(sweep, flags.notes)
    seconds = time.perf_counter() - t0
    run = None if no_save else write_sim_run(out_dir, sweep, rows, gpu=gpu, seconds=seconds)
    if fmt == "json":
        out = {"run_dir": str(run.path) if run else None, "seconds": seconds, "rows": rows}
        click.echo(json.dumps(out, indent=2, default=str))
    else:
        _print_sim(rows)
        where = f"; {run.path / SIM_TABLE}" if run else ""
        click.echo(f"\n{len(rows)} simulated steps in {seconds:.2f} s{where}", err=True)
