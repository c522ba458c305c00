"""``moe-bench ep``: expert parallelism on torch.distributed (N ranks, all_to_all exchanges)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from moe_routing_bench.bench.cli import options
from moe_routing_bench.bench.ep.launch import LOG_FILE, EPSweep, dist_backend_for, run_ep
from moe_routing_bench.bench.spec import Spec
from moe_routing_bench.bench.timing import DTYPES


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
    type=options.INT,
    default=2,
    show_default=True,
    help="Ranks (processes) N; experts are sharded over them.",
)
@options.router_choice("switch")
@options.workload_choice()
@click.option("--tokens", "-T", type=options.INT, default=1024, show_default=True, help="Tokens per rank per step T.")
@click.option("--experts", "-E", type=options.INT, default=None, help="Experts E [8, or --model's].")
@click.option("--hidden", "-D", type=options.INT, default=None, help="Hidden size D [128, or --model's].")
@click.option("--ffn-ratio", type=float, default=2.0, show_default=True, help="F = ffn_ratio * D.")
@click.option("--placement", default="contiguous", show_default=True, help="contiguous, round-robin or FILE.json.")
@click.option("--repeats", type=options.INT, default=5, show_default=True, help="Measured steps per configuration.")
@click.option("--warmup", type=options.INT, default=1, show_default=True)
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(list(DTYPES)))
@click.option("--backend", default="torch", show_default=True, type=click.Choice(["torch"]), help="Dispatch backend.")
@click.option("--dist-backend", default="auto", show_default=True, type=click.Choice(["auto", "gloo", "nccl"]))
@options.out_dir
@click.option("--timeout", type=float, default=900.0, show_default=True, help="Seconds for the whole launch.")
@options.output_format
@click.option("--dump-outputs", "dump_dir", default=None, hidden=True, help="Save each rank's outputs as .npy.")
@options.routing_flags
def ep_cmd(
    nproc: int,
    router_text: str,
    workloads: list[Spec],
    tokens: int,
    experts: int | None,
    hidden: int | None,
    ffn_ratio: float,
    placement: str,
    repeats: int,
    warmup: int,
    dtype: str,
    backend: str,
    dist_backend: str,
    out_dir: Path,
    timeout: float,
    fmt: str,
    dump_dir: str | None,
    flags: options.RoutingFlags,
) -> None:
    """Expert parallelism on torch.distributed: N ranks, all_to_all_single exchanges, per-rank bytes,
    times and load (the straggler)."""
    m = flags.model
    ep = EPSweep(
        routers=flags.routers(router_text, "switch"),
        workloads=workloads,
        nproc=nproc,
        tokens=tokens,
        experts=flags.experts(experts, 8),
        hidden=flags.size("--hidden", hidden, "hidden", 128),
        ffn_ratio=ffn_ratio,
        top_k=flags.top_k,
        capacity_factor=flags.capacity_factor,
        placement=placement,
        repeats=repeats,
        warmup=warmup,
        seed=flags.seed,
        dtype=dtype,
        dist_backend=dist_backend_for(dist_backend, max(nproc, 1)),
        dump_dir=str(Path(dump_dir).resolve()) if dump_dir else None,
        model=None if m is None else m.name,
    )
    run, rc, summary = run_ep(ep, out_dir, timeout=timeout, plugin_paths=flags.plugin_paths, notes=flags.notes)
    if fmt == "json":
        out = {
            "run_dir": str(run.path),
            "nproc": nproc,
            "dist_backend": ep.dist_backend,
            "placement": placement,
            "configs": summary,
        }
        click.echo(json.dumps(out, indent=2))
    else:
        _print_summary(summary, nproc, ep.dist_backend, placement)
        click.echo(f"\n{run.path}", err=True)
    failed = [c for c in summary if c["status"] != "ok"]
    if rc != 0:
        click.echo(f"moe-bench: error: the ep launch failed (status {rc}); see {run.path / LOG_FILE}", err=True)
        raise SystemExit(1)
    if failed:
        first = str(failed[0]["error"]).splitlines()[0]
        click.echo(f"moe-bench: error: {len(failed)} of {len(summary)} configurations failed: {first}", err=True)
        raise SystemExit(1)
