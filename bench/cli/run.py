"""``moe-bench run`` (a sweep into a crash-safe run directory) and ``moe-bench merge`` (shards)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from tqdm import tqdm

from moe_routing_bench.bench.cli import options
from moe_routing_bench.bench.harness.merge import merge_runs
from moe_routing_bench.bench.harness.runner import (
    SWEEP_FLAGS,
    check_executor,
    check_timeout,
    describe,
    execute,
    open_sweep,
    start_sweep,
    summary_table,
    sweep_overrides,
    todo,
)
from moe_routing_bench.bench.harness.sweep import find_config, load_blocks
from moe_routing_bench.bench.record import load_run
from moe_routing_bench.routers.contract import RoutingError

_SUMMARY_FORMATS = {
    "tokens_per_s": "{:,.0f}".format,
    "drop_rate": "{:.4f}".format,
    "tokens_dropped": "{:.4f}".format,
    "imbalance": "{:.3f}".format,
    "peak_mem_MiB": "{:.1f}".format,
}


@click.command("run")
@click.option("--config", "config_name", default=None, help="Sweep name in bench/configs/ or a .toml path.")
@click.option("--routers", default=None, help="Routers: name or name[key=value,...], comma-separated.")
@click.option("--workloads", default=None, help="Workloads: name or name[key=value,...], comma-separated.")
@click.option("--models", default=None, help="Model presets (`moe-bench list models`): their layer shapes and routers.")
@click.option("--experts", default=None, help="Comma-separated E values.")
@click.option("--tokens", default=None, help="Comma-separated T values.")
@click.option("--hidden", default=None, help="Comma-separated D values.")
@click.option("--top-k", "top_k", default=None, help="Comma-separated K values (routers whose K is free).")
@click.option(
    "--capacity-factor",
    "capacity_factor",
    default=None,
    help="Comma-separated capacity factors for every router with a capacity: numbers, 'none', 'default'.",
)
@click.option("--backend", "backends", default=None, help="Comma-separated: torch, einsum, triton.")
@click.option("--dtype", "dtypes", default=None, help="Comma-separated: float32, float16, bfloat16.")
@click.option("--device", default=None, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--repeats", type=options.INT, default=None, help="Timed repeats per configuration (after warm-up).")
@click.option("--seed", type=options.SEED, default=None)
@click.option("--mode", "modes", default=None, help="fwd or fwd+bwd (comma-separated for both).")
@options.out_dir
@click.option("--resume", type=click.Path(path_type=Path), default=None, help="Finish this run directory.")
@click.option("--retry-errors", is_flag=True, help="With --resume: run the error rows again.")
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
@options.plugin
def run_cmd(**kw) -> None:
    """Sweep routers x workloads x sizes x backends; write Parquet under results/<run_id>/."""
    ctx = click.get_current_context()
    given = [k for k in kw if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE]
    notes = options.notes()
    check_timeout(kw["timeout"])
    check_executor(kw["executor"], kw["ray_address"])
    if kw["resume"] is not None:
        flag_of = {p.name: p.opts[0] for p in ctx.command.params}
        conflicts = [flag_of[g] for g in given if g in SWEEP_FLAGS]
        if conflicts:
            raise RoutingError(
                f"--resume finishes the sweep recorded in {kw['resume']}/meta.json; it cannot change it: "
                f"drop {', '.join(conflicts)}"
            )
        sweep = open_sweep(kw["resume"], retry_errors=kw["retry_errors"], notes=notes)
    else:
        if kw["retry_errors"]:
            raise RoutingError("--retry-errors needs --resume RUN_DIR")
        if kw["models"] and (kw["experts"] or kw["hidden"]):
            raise RoutingError("--models sets each model's E and D: drop --experts and --hidden")
        plugin_paths = options.load_plugins(kw["plugins"])
        path = find_config(kw["config_name"]) if kw["config_name"] else None
        blocks = load_blocks(path, sweep_overrides(kw))
        sweep = start_sweep(
            blocks,
            kw["out_dir"],
            config=kw["config_name"] or "flags",
            plugin_paths=plugin_paths,
            shard=kw["shard"],
            notes=notes,
        )
    left = todo(sweep)
    for part in sweep.run.set_aside:
        click.echo(f"moe-bench: note: unreadable part {part} moved aside; its configuration runs again", err=True)
    click.echo(
        f"run {sweep.run.run_id}: {len(sweep.points)} configurations, {len(sweep.points) - len(left)} already "
        f"done, device {sweep.meta['device_name']}, results in {sweep.run.path}",
        err=True,
    )
    bar = tqdm(total=len(left), desc="sweep", unit="cfg", file=sys.stderr, dynamic_ncols=True)
    try:
        execute(
            sweep,
            left,
            timeout=kw["timeout"],
            executor=kw["executor"],
            ray_address=kw["ray_address"],
            progress=bar.update,
        )
    except KeyboardInterrupt:
        bar.close()  # before the line that says so
        click.echo("interrupted: finished configurations are kept; finish with --resume", err=True)
        raise SystemExit(130) from None
    finally:
        bar.close()  # before any error line: that line is the last one
    rows, _, _ = load_run(sweep.run.path)
    table = summary_table(rows)
    if not table.empty:
        click.echo(table.to_string(index=False, formatters=_SUMMARY_FORMATS, na_rep="n/a"))
    click.echo(f"\n{sweep.run.path}: {describe(rows)}")
    for _, r in rows[rows["status"] == "error"].head(5).iterrows():
        click.echo(
            f"error in {r['router']} x {r['workload']} (T={r['tokens']}, E={r['experts']}): "
            f"{str(r['error']).splitlines()[0]}",
            err=True,
        )
    click.echo(json.dumps({"run_dir": str(sweep.run.path)}), err=True)


@click.command("merge")
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@options.out_dir
@click.option("--allow-different", is_flag=True, help="Merge runs of different sweeps.")
def merge_cmd(runs: tuple[Path, ...], out_dir: Path, allow_different: bool) -> None:
    """Join run directories (e.g. the shards of one sweep) into one run for reporting."""
    merged, missing = merge_runs(list(runs), out_dir, allow_different)
    meta = merged.read_meta()
    click.echo(f"{merged.path}: {meta['configurations']} configurations from {len(runs)} runs ({meta['status']})")
    if missing:
        click.echo(f"missing {len(missing)} configurations of the sweep, e.g.: {', '.join(missing[:5])}", err=True)
