"""``moe-bench simulate``: one expert-parallel step on thousands of devices, modelled from real plans."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from moe_routing_bench.bench.cli import options
from moe_routing_bench.bench.sim.model import PRESETS, canonical_dtype, preset
from moe_routing_bench.bench.sim.runner import SIM_TABLE, SimSweep, simulate_run
from moe_routing_bench.bench.spec import Spec, split_list
from moe_routing_bench.routers.contract import RoutingError


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in split_list(text)]
    except ValueError:
        raise RoutingError(f"--{what} must be comma-separated integers (got {text!r})") from None
    if not values or any(not 1 <= v <= options.INT64_MAX for v in values):
        raise RoutingError(f"--{what} must be integers between 1 and {options.INT64_MAX} (got {text!r})")
    return values


def _print_sim(rows: list[dict[str, Any]]) -> None:
    # Every column is as wide as its widest entry, two spaces apart: G = 10,000,000 never runs into nodes.
    cols = [
        ("router", "<", lambda r: r["router"]),
        ("workload", "<", lambda r: r["workload"]),
        ("placement", "<", lambda r: r["placement"]),
        ("G", ">", lambda r: str(r["devices"])),
        ("nodes", ">", lambda r: str(r["nodes"])),
        ("step ms", ">", lambda r: f"{r['step_time_s'] * 1e3:.3f}"),
        ("a2a ms", ">", lambda r: f"{(r['a2a_dispatch_s'] + r['a2a_combine_s']) * 1e3:.3f}"),
        ("comp max", ">", lambda r: f"{r['compute_max_s'] * 1e3:.3f}"),
        ("comp mean", ">", lambda r: f"{r['compute_mean_s'] * 1e3:.3f}"),
        ("strag", ">", lambda r: f"{r['straggler']:.3f}"),
        ("load", ">", lambda r: f"{r['load_ratio']:.3f}"),
        ("inter GB", ">", lambda r: f"{r['bytes_inter_node'] / 1e9:.3f}"),
    ]
    cells = [[get(r) for _, _, get in cols] for r in rows]
    widths = [max([len(name), *(len(c[i]) for c in cells)]) for i, (name, _, _) in enumerate(cols)]

    def line(values: list[str]) -> str:
        return "  ".join(f"{v:{a}{w}}" for v, (_, a, _), w in zip(values, cols, widths, strict=True)).rstrip()

    click.echo(line([name for name, _, _ in cols]))
    for c in cells:
        click.echo(line(c))


@click.command("simulate")
@click.option("--devices", "-G", "devices_text", required=True, help="Device counts G, comma-separated.")
@click.option("--experts", "-E", type=options.INT, default=None, help="Experts E [256, or --model's].")
@click.option("--nodes-of", "nodes_of", type=options.INT, default=8, show_default=True, help="Devices per node K.")
@click.option(
    "--ep-size",
    type=options.INT,
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
@click.option("--tokens", "-T", type=options.INT, default=4096, show_default=True, help="Tokens per device T.")
@click.option("--hidden", "-D", type=options.INT, default=None, help="Hidden size D [4096, or --model's].")
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
    type=options.INT,
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
    out_given = click.get_current_context().get_parameter_source("out_dir") == click.core.ParameterSource.COMMANDLINE
    if no_save and out_given:
        raise RoutingError("--no-save writes no run directory: it cannot be given with --out")
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
    rows, run, seconds = simulate_run(sweep, None if no_save else out_dir, flags.notes, gpu=gpu)
    if fmt == "json":
        out = {"run_dir": str(run.path) if run else None, "seconds": seconds, "rows": rows}
        click.echo(json.dumps(out, indent=2, default=str))
    else:
        _print_sim(rows)
        where = f"; {run.path / SIM_TABLE}" if run else ""
        click.echo(f"\n{len(rows)} simulated steps in {seconds:.2f} s{where}", err=True)
