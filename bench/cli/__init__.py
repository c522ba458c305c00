"""The ``moe-bench`` command line."""

from __future__ import annotations

import json
import math
import sys
import warnings
from typing import Any

import click

from moe_routing_bench.bench.breakdown import FREQ_BUCKETS, POS_BUCKETS, breakdown
from moe_routing_bench.bench.metrics import METRICS
from moe_routing_bench.bench.routing import (
    RouteResult,
    describe_config,
    find_target_drop,
    route_batches,
    wants_fit,
)
from moe_routing_bench.bench.timing import resolve_device
from moe_routing_bench.routers.contract import RoutingError
from moe_routing_bench.routers.registry import (
    build_router,
    config_fields,
    list_routers,
    loaded_plugins,
    router_names,
)
from moe_routing_bench.workloads.registry import build_workload, list_workloads, workload_options
from moe_routing_bench.workloads.registry import load_plugin as load_any_plugin
from moe_routing_bench.workloads.registry import loaded_plugins as loaded_workload_plugins

ERROR_EXIT = 2
ROUTE_HIDDEN = 64  # hidden size D of the workload's hidden states, for routers that read them


class _Group(click.Group):
    """Bad input becomes one line naming the parameter, exit status 2, no traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (RoutingError, ValueError) as exc:
            click.echo(f"moe-bench: error: {exc}", err=True)
            ctx.exit(ERROR_EXIT)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Benchmark and simulate Mixture-of-Experts routing strategies."""


def _load_plugins(plugins: tuple[str, ...]) -> None:
    # One execution per file: it may register routers, workloads or both.
    for path in plugins:
        load_any_plugin(path)


plugin_option = click.option(
    "--plugin",
    "plugins",
    multiple=True,
    metavar="FILE.py",
    help="Load routers and workloads from a Python file (repeatable).",
)


@main.command("list")
@click.argument("what", type=click.Choice(["routers", "workloads"]), default="routers")
@plugin_option
def list_cmd(what: str, plugins: tuple[str, ...]) -> None:
    """List registered routers, or workloads (with their options), with one-line descriptions."""
    _load_plugins(plugins)
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


def _router_options(pairs: tuple[str, ...], names: list[str]) -> dict[str, dict[str, str]]:
    """Split ``--router-opt`` pairs per router. ``key=value`` goes to every selected router whose
    config has that field; ``name.key=value`` to router ``name`` only. A key no selected router
    has is refused, listing the valid ones."""
    per_router: dict[str, dict[str, str]] = {n: {} for n in names}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise RoutingError(f"--router-opt must look like key=value or router.key=value (got {pair!r})")
        target, dot, field = key.rpartition(".")
        if dot:
            if target not in per_router:
                raise RoutingError(
                    f"--router-opt {pair!r} names router {target!r}, not one of: {', '.join(names)}"
                )
            per_router[target][field] = value  # validated when the router is built
            continue
        takers = [n for n in names if key in config_fields(n)]
        if not takers:
            valid = sorted({f for n in names for f in config_fields(n)})
            raise RoutingError(f"unknown router option {key!r}; valid options: {', '.join(valid)}")
        for n in takers:
            per_router[n][key] = value
    return per_router


def _workload_options(pairs: tuple[str, ...]) -> dict[str, str]:
    """``--workload-opt key=value`` pairs; values are parsed by the workload config's field types."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise RoutingError(f"--workload-opt must look like key=value (got {pair!r})")
        out[key.strip()] = value
    return out


def _warn_line(message, category, filename, lineno, file=None, line=None) -> None:
    click.echo(f"moe-bench: warning: {message}", err=True)


def _parse_cf(text: str | None) -> float | str | None:
    """None: the router's default. 'none'/'dropless': no capacity. Else a number > 0."""
    if text is None:
        return "default"
    if text.strip().lower() in ("none", "dropless"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise RoutingError(f"--capacity-factor must be a number > 0 or 'none' (got {text!r})") from None
    if not math.isfinite(value) or value <= 0:
        raise RoutingError(f"--capacity-factor must be a number > 0 or 'none' (got {text!r})")
    return value


@main.command("route")
@click.option("--router", "router_spec", required=True, help="Router name, comma-separated names, or 'all'.")
@click.option(
    "--tokens", "-T", "num_tokens", type=int, default=4096, show_default=True, help="Tokens per batch T."
)
@click.option("--experts", "-E", "num_experts", type=int, default=64, show_default=True, help="Experts E.")
@click.option("--top-k", "-K", "top_k", type=int, default=None, help="Choices per token K (router default).")
@click.option("--capacity-factor", "cf_text", default=None, help="Capacity factor, or 'none' for dropless.")
@click.option("--batches", "-B", "num_batches", type=int, default=20, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--router-opt", "router_opts", multiple=True, metavar="KEY=VALUE", help="Any router config field."
)
@click.option(
    "--workload",
    "workload_name",
    default="uniform",
    show_default=True,
    help="Workload that makes the batches (`moe-bench list workloads`).",
)
@click.option(
    "--workload-opt",
    "workload_opts",
    multiple=True,
    metavar="KEY=VALUE",
    help="Any workload config field, e.g. s=1.2, lang=de, path=trace.parquet.",
)
@click.option(
    "--breakdown",
    "show_breakdown",
    is_flag=True,
    help="Also split drops by token-frequency bucket and position quartile.",
)
@click.option("--target-drop", type=float, default=None, help="Report the smallest cf whose drop rate <= P.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@plugin_option
def route_cmd(
    router_spec: str,
    num_tokens: int,
    num_experts: int,
    top_k: int | None,
    cf_text: str | None,
    num_batches: int,
    seed: int,
    router_opts: tuple[str, ...],
    workload_name: str,
    workload_opts: tuple[str, ...],
    show_breakdown: bool,
    target_drop: float | None,
    device: str,
    fmt: str,
    plugins: tuple[str, ...],
) -> None:
    """Route B batches of a workload (default `uniform`) and print every routing metric (mean and SE)."""
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = _warn_line  # one line on stderr, no source excerpt
        _route(**locals())


def _route(
    router_spec: str,
    num_tokens: int,
    num_experts: int,
    top_k: int | None,
    cf_text: str | None,
    num_batches: int,
    seed: int,
    router_opts: tuple[str, ...],
    workload_name: str,
    workload_opts: tuple[str, ...],
    show_breakdown: bool,
    target_drop: float | None,
    device: str,
    fmt: str,
    plugins: tuple[str, ...],
) -> None:
    _load_plugins(plugins)
    dev = resolve_device(device)
    names = router_names() if router_spec.strip() == "all" else [n.strip() for n in router_spec.split(",")]
    if num_tokens < 1:
        raise RoutingError(f"--tokens must be >= 1 (got {num_tokens})")
    if num_batches < 1:
        raise RoutingError(f"--batches must be >= 1 (got {num_batches})")
    cf = _parse_cf(cf_text)
    workload = build_workload(workload_name, _workload_options(workload_opts), seed=seed)
    fixed_e = workload.num_experts_fixed  # a trace decides E; an explicit, different -E is refused
    if fixed_e is not None:
        source = click.get_current_context().get_parameter_source("num_experts")
        if source in (click.core.ParameterSource.DEFAULT, click.core.ParameterSource.DEFAULT_MAP):
            num_experts = fixed_e
    hidden: dict[str, int | None] = {"dim": None}  # set once the routers are built
    make_batches = lambda: workload.batches(
        num_tokens, num_experts, num_batches, dev, hidden_dim=hidden["dim"]
    )
    fit_cache: list[Any] = []

    def fit_slice():
        # Routers that learn (fit) read the workload's own fit slice, never a measured batch.
        if not fit_cache:
            fit_cache.append(workload.fit_sample(num_tokens, num_experts, dev, hidden_dim=hidden["dim"]))
        return fit_cache[0]

    per_router = _router_options(router_opts, names)

    def options_for(name: str) -> dict[str, Any]:
        opts: dict[str, Any] = {"num_experts": num_experts, "seed": seed}
        if top_k is not None:
            opts["top_k"] = top_k
        if cf != "default":
            opts["capacity_factor"] = cf
        opts.update(per_router[name])
        return opts

    # Build every router first: a bad name or option is refused before any work starts.
    routers = {name: build_router(name, **options_for(name)) for name in names}
    if any(r.needs_hidden for r in routers.values()):
        hidden["dim"] = ROUTE_HIDDEN  # routers with their own gate (nllb) read hidden states
    results: dict[str, RouteResult] = {}
    extra: dict[str, dict[str, Any]] = {}
    for name, router in routers.items():
        fit_sample = fit_slice() if wants_fit(router) else None
        if target_drop is not None:
            c, cf_found, res = find_target_drop(
                name, options_for(name), make_batches, num_tokens, target_drop, dev, fit_sample
            )
            extra[name] = {"target_drop": target_drop, "capacity": c, "capacity_factor": float(cf_found)}
            results[name] = res
        else:
            results[name] = route_batches(router, make_batches(), dev, fit_sample)

    splits: dict[str, dict[str, Any]] = {}
    if show_breakdown:
        for name, res in results.items():
            fit_sample = fit_slice() if wants_fit(res.router) else None
            splits[name] = breakdown(res.router, make_batches, fit_sample)

    wl = {"name": workload.name, "options": workload.config.as_dict()}
    if fmt == "json":
        out = _json_out(results, extra, num_tokens, num_batches, seed, str(dev), wl)
        for name, split in splits.items():
            (out if len(results) == 1 else out[name])["breakdown"] = _nan_to_none(split)
        click.echo(json.dumps(out, indent=2, default=_json_default))
    else:
        _print_tables(results, extra, num_tokens, num_batches, seed, str(dev), wl)
        if splits:
            _print_breakdown(splits)


def _num(x: float) -> float | None:
    return None if isinstance(x, float) and math.isnan(x) else x


def _json_default(x: Any) -> Any:
    return str(x)


def _nan_to_none(x: Any) -> Any:
    """JSON has no NaN: undefined values (expert choice's drop rate) become null."""
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    return None if isinstance(x, float) and math.isnan(x) else x


def _json_out(results, extra, num_tokens, num_batches, seed, device, wl) -> dict[str, Any]:
    def one(name: str, res: RouteResult) -> dict[str, Any]:
        out: dict[str, Any] = {k: {"mean": _num(m), "se": _num(s)} for k, (m, s) in res.summary.items()}
        out["config"] = {
            "router": name,
            **describe_config(res.router),
            "tokens": num_tokens,
            "batches": num_batches,
            "workload": wl["name"],
            "workload_options": wl["options"],
            "workload_seed": wl["options"].get("seed", seed),
            "capacity": res.capacity,
            "top_k_effective": res.top_k,
            "device": device,
            "route_seconds": res.seconds,
            "tokens_per_s": res.tokens_per_s,
            **extra.get(name, {}),
        }
        return out

    if len(results) == 1:
        ((name, res),) = results.items()
        return one(name, res)
    return {name: one(name, res) for name, res in results.items()}


def _fmt(x: float) -> str:
    if math.isnan(x):
        return "n/a"
    if x != 0 and abs(x) < 1e-3:
        return f"{x:.2e}"
    return f"{x:.4f}" if abs(x) < 100 else f"{x:.1f}"


def _print_tables(results, extra, num_tokens, num_batches, seed, device, wl) -> None:
    for name, res in results.items():
        cfg = res.router.config
        cap = "dropless" if res.capacity is None else f"C={res.capacity}"
        cf = extra.get(name, {}).get("capacity_factor", cfg.capacity_factor)
        line = (
            f"{name}: T={num_tokens} E={cfg.num_experts} K={res.top_k:g} {cap} (cf={cf}) "
            f"batches={num_batches} seed={seed} workload={wl['name']} device={device}  route+metrics "
            f"{res.seconds:.3f} s ({res.tokens_per_s / 1e6:.2f} M tokens/s)"
        )
        if name in extra:
            line += f"  [smallest C with drop_rate <= {extra[name]['target_drop']}]"
        click.echo(line)
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


from moe_routing_bench.bench.capture.models import capture_cmd  # noqa: E402
from moe_routing_bench.bench.cli.run import run_cmd  # noqa: E402
from moe_routing_bench.bench.harness.merge import merge_cmd  # noqa: E402  (each command group lives in its own module)

main.add_command(run_cmd)
from moe_routing_bench.bench.cli.report import compare_cmd, report_cmd  # noqa: E402  (report and compare)

main.add_command(report_cmd)
main.add_command(compare_cmd)
main.add_command(merge_cmd)

from moe_routing_bench.bench.cli.ep import ep_cmd, simulate_cmd  # noqa: E402  (expert parallelism and the cluster simulator)

main.add_command(ep_cmd)
main.add_command(simulate_cmd)
main.add_command(capture_cmd)
from moe_routing_bench.bench.cli.quality import quality_cmd  # noqa: E402  (routing quality: train a tiny MoE LM per router)

main.add_command(quality_cmd)

if __name__ == "__main__":
    sys.exit(main())
