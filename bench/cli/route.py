"""``moe-bench list`` and ``moe-bench route``: what is registered, and routing alone over batches."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import click

from moe_routing_bench.bench.breakdown import FREQ_BUCKETS, POS_BUCKETS
from moe_routing_bench.bench.cli import options
from moe_routing_bench.bench.metrics import METRICS
from moe_routing_bench.bench.models import PRESETS
from moe_routing_bench.bench.routing import RouteReport, RouteResult, describe_config, route_specs
from moe_routing_bench.bench.spec import Spec
from moe_routing_bench.bench.timing import resolve_device
from moe_routing_bench.routers.contract import RoutingError
from moe_routing_bench.routers.registry import list_routers, loaded_plugins
from moe_routing_bench.workloads.registry import list_workloads, workload_options
from moe_routing_bench.workloads.registry import loaded_plugins as loaded_workload_plugins


@click.command("list")
@click.argument("what", type=click.Choice(["routers", "workloads", "models"]), default="routers")
@options.plugin
def list_cmd(what: str, plugins: tuple[str, ...]) -> None:
    """List registered routers, workloads (with their options) or model presets."""
    options.load_plugins(plugins)
    if what == "models":
        click.echo(f"{'model':<17}{'D':>6}{'F':>7} {'kind':<7}{'E':>5}{'K':>3}{'shared':>7}{'layers':>8}  router")
        for m in PRESETS.values():
            layers = f"{m.moe_layers}/{m.layers}"
            click.echo(
                f"{m.name:<17}{m.hidden:>6}{m.ffn:>7} {m.ffn_kind:<7}{m.experts:>5}{m.top_k:>3}{m.shared_ffn:>7}"
                f"{layers:>8}  {m.router}"
            )
        return
    rows = list_routers() if what == "routers" else list_workloads()
    width = max(len(n) for n, _ in rows)
    for name, desc in rows:
        click.echo(f"{name:<{width}}  {desc}")
        if what == "workloads":
            opts = ", ".join(
                f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in workload_options(name).items()
            )
            click.echo(f"{'':<{width}}    options: {opts}")
    for p in loaded_plugins() + loaded_workload_plugins():
        click.echo(f"plugin loaded: {p}", err=True)


@click.command("route")
@options.router_choice()
@click.option(
    "--tokens", "-T", "num_tokens", type=options.INT, default=4096, show_default=True, help="Tokens per batch T."
)
@click.option(
    "--experts", "-E", "num_experts", type=options.INT, default=None, help="Experts E [64, or a trace's own]."
)
@click.option("--batches", "-B", "num_batches", type=options.INT, default=20, show_default=True)
@options.workload_choice()
@click.option(
    "--breakdown",
    "show_breakdown",
    is_flag=True,
    help="Also split drops by token-frequency bucket and position quartile.",
)
@click.option("--target-drop", type=float, default=None, help="Report the smallest cf whose drop rate <= P.")
@options.device
@options.output_format
@options.routing_flags
def route_cmd(
    router_text: str,
    num_tokens: int,
    num_experts: int | None,
    num_batches: int,
    workloads: list[Spec],
    show_breakdown: bool,
    target_drop: float | None,
    device: str,
    fmt: str,
    flags: options.RoutingFlags,
) -> None:
    """Route B batches of a workload (default `uniform`) and print every routing metric (mean and SE)."""
    if len(workloads) != 1:
        raise RoutingError(f"--workload takes one workload here (got {len(workloads)})")
    report = route_specs(
        flags.routers(router_text),
        workloads[0],
        tokens=num_tokens,
        experts=flags.experts(num_experts, None),
        batches=num_batches,
        seed=flags.seed,
        device=resolve_device(device),
        top_k=flags.top_k,
        capacity_factor=flags.capacity_factor,
        target_drop=target_drop,
        with_breakdown=show_breakdown,
        notes=flags.notes,
    )
    if fmt == "json":
        out = _json_out(report)
        for name, split in report.splits.items():
            (out if len(report.results) == 1 else out[name])["breakdown"] = _nan_to_none(split)
        click.echo(json.dumps(out, indent=2, default=_json_default))
    else:
        _print_tables(report)
        if report.splits:
            _print_breakdown(report.splits)


def _num(x: float) -> float | None:
    return None if isinstance(x, float) and math.isnan(x) else x


def _json_default(x: Any) -> Any:
    return str(x)


def _nan_to_none(x: Any) -> Any:
    """JSON has no NaN: undefined values (expert choice's drop rate) become null."""
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    return None if isinstance(x, float) and math.isnan(x) else x


def _json_out(report: RouteReport) -> dict[str, Any]:
    wl = {"name": report.workload.name, "options": report.workload.config.as_dict()}

    def one(name: str, res: RouteResult) -> dict[str, Any]:
        out: dict[str, Any] = {k: {"mean": _num(m), "se": _num(s)} for k, (m, s) in res.summary.items()}
        out["config"] = {
            "router": name,
            **describe_config(res.router),
            "tokens": report.tokens,
            "batches": report.batches,
            "workload": wl["name"],
            "workload_options": wl["options"],
            "workload_seed": wl["options"].get("seed", report.seed),
            "capacity": res.capacity,
            "top_k_effective": res.top_k,
            "device": str(report.device),
            "route_seconds": res.seconds,
            "tokens_per_s": res.tokens_per_s,
            **report.extra.get(name, {}),
        }
        return out

    if len(report.results) == 1:
        ((name, res),) = report.results.items()
        return one(name, res)
    return {name: one(name, res) for name, res in report.results.items()}


def _fmt(x: float) -> str:
    if math.isnan(x):
        return "n/a"
    if x != 0 and abs(x) < 1e-3:
        return f"{x:.2e}"
    return f"{x:.4f}" if abs(x) < 100 else f"{x:.1f}"


def _router_form(router: Any) -> str:
    """The router and its options: what a label stands for (``deepseek-v3`` = hierarchical,
    groups form, sigmoid scores, 8 groups, 4 kept)."""
    cfg = router.config
    shown = [
        f"{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg) if f.name not in ("num_experts", "seed")
    ]
    return f"router {router.name}: {' '.join(shown)}"


def _print_tables(report: RouteReport) -> None:
    results, extra = report.results, report.extra
    for name, res in results.items():
        cfg = res.router.config
        cap = "dropless" if res.capacity is None else f"C={res.capacity}"
        cf = extra.get(name, {}).get("capacity_factor", cfg.capacity_factor)
        line = (
            f"{name}: T={report.tokens} E={cfg.num_experts} K={res.top_k:g} {cap} (cf={cf}) "
            f"batches={report.batches} seed={report.seed} workload={report.workload.name} "
            f"device={report.device}  route+metrics {res.seconds:.3f} s ({res.tokens_per_s / 1e6:.2f} M tokens/s)"
        )
        if name in extra:
            line += f"  [smallest C with drop_rate <= {extra[name]['target_drop']}]"
        click.echo(line)
        click.echo(f"  {_router_form(res.router)}")
    names = list(results)
    summaries = {n: results[n].summary for n in names}
    if len(names) == 1:
        click.echo(f"\n{'metric':<20} {'mean':>12} {'± se':>10}  definition")
        for key, (m, s) in summaries[names[0]].items():
            click.echo(f"{key:<20} {_fmt(m):>12} {_fmt(s):>10}  {METRICS.get(key, '')}")
        return
    width = max(22, *(len(n) + 2 for n in names))
    click.echo("\n" + f"{'metric':<20}" + "".join(f"{n:>{width}}" for n in names))
    for key in summaries[names[0]]:
        cells = []
        for n in names:
            m, s = summaries[n].get(key, (math.nan, math.nan))
            cells.append(f"{_fmt(m)} ± {_fmt(s)}" if not math.isnan(m) else "n/a")
        click.echo(f"{key:<20}" + "".join(f"{c:>{width}}" for c in cells))


def _print_breakdown(splits: dict[str, dict[str, Any]]) -> None:
    """drop_rate / tokens_dropped_frac per bucket, one column per router (bench/breakdown.py)."""
    names = list(splits)
    first = splits[names[0]]
    width = max(22, *(len(n) + 2 for n in names))
    click.echo(
        "\nbreakdown: drop_rate / tokens_dropped_frac, pooled over batches (frequency: thirds of token "
        "occurrences by id count; position: quartile within the sequence)"
    )
    click.echo(f"{'bucket':<16}{'tokens':>8}" + "".join(f"{n:>{width}}" for n in names))
    for group, buckets, label in (
        ("token_frequency", FREQ_BUCKETS, ""),
        ("position", POS_BUCKETS, "position "),
    ):
        for b in buckets:
            share = first[group][b]["token_share"]
            cells = []
            for n in names:
                row = splits[n][group][b]
                cells.append(f"{_fmt(row['drop_rate'])} / {_fmt(row['tokens_dropped_frac'])}")
            click.echo(f"{label + b:<16}{f'{share * 100:.1f}%':>8}" + "".join(f"{c:>{width}}" for c in cells))
