"""Every flag two or more commands share, defined once, and the one-line error handling.

A flag's meaning lives in the library (``bench.spec`` for router and workload names, options and
the capacity factor); here it is only declared. Commands read the parsed values and hand them to
one library function each.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from moe_routing_bench.bench.models import ModelPreset, get_model
from moe_routing_bench.bench.record import RunFailed, WriteError, one_line
from moe_routing_bench.bench.spec import (
    INT64_MAX,
    SEED_MAX,
    CapacityFactor,
    Notes,
    Spec,
    add_router_opts,
    key_value_pairs,
    parse_capacity_factor,
    parse_specs,
)
from moe_routing_bench.routers.contract import RoutingError
from moe_routing_bench.routers.registry import router_names
from moe_routing_bench.workloads.registry import load_plugin

ERROR_EXIT = 2  # bad input: one line on stderr naming the parameter, no traceback
FAILED_EXIT = 1  # a run that failed (meta.json says so), or a file that could not be written
INTERRUPTED_EXIT = 130
DEFAULT_OUT = Path("results")
TRACEBACK_ENV = "MOE_BENCH_TRACEBACK"  # set to 1 to see the traceback of an internal error


class Int64(click.ParamType):
    """An integer that an int64 column and a tensor can hold: one past it (``-T 99999999999999999999``)
    is refused naming the flag. Lower bounds are the library's, which says what a value means."""

    name = "integer"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        number = click.INT.convert(value, param, ctx)
        if not -INT64_MAX - 1 <= number <= INT64_MAX:
            self.fail(f"{value} is past the 64-bit integer range (|x| <= {INT64_MAX})", param, ctx)
        return number


INT = Int64()
SEED = click.IntRange(0, SEED_MAX)  # what every generator the harness seeds accepts


class MoeBenchGroup(click.Group):
    """Every failure is one line on stderr, never a traceback: bad input (a RoutingError or
    ValueError, or a flag click refuses) names the parameter, exit 2; a run that failed (RunFailed:
    meta.json says why) or a file that could not be written, exit 1; Ctrl-C or SIGTERM, exit 130;
    anything else is an internal error, exit 1 (MOE_BENCH_TRACEBACK=1 shows its traceback).
    Library warnings are one line each."""

    def invoke(self, ctx: click.Context) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = _warn_line  # one line on stderr, no source excerpt
            try:
                return super().invoke(ctx)
            except (click.exceptions.Exit, click.Abort):
                raise
            except click.ClickException as exc:
                hint = f" (see {exc.ctx.command_path} -h)" if getattr(exc, "ctx", None) is not None else ""
                _error_line(exc.format_message() + hint)
                ctx.exit(exc.exit_code)
            except RunFailed as exc:
                _error_line(str(exc))
                ctx.exit(FAILED_EXIT)
            except (RoutingError, ValueError) as exc:
                _error_line(str(exc))
                ctx.exit(ERROR_EXIT)
            except KeyboardInterrupt:
                click.echo("moe-bench: interrupted: finished work is kept", err=True)
                ctx.exit(INTERRUPTED_EXIT)
            except OSError as exc:
                _error_line(one_line(exc) if isinstance(exc, WriteError) else _os_error(exc))
                ctx.exit(FAILED_EXIT)
            except Exception as exc:
                if os.environ.get(TRACEBACK_ENV):
                    raise
                _error_line(f"internal error: {one_line(exc)} ({TRACEBACK_ENV}=1 shows the traceback)")
                ctx.exit(FAILED_EXIT)


def _error_line(message: str) -> None:
    click.echo(f"moe-bench: error: {' '.join(message.split())}", err=True)


def _os_error(exc: OSError) -> str:
    where = f": {exc.filename}" if exc.filename else ""
    return f"{exc.strerror or exc}{where}"


def _warn_line(message, category, filename, lineno, file=None, line=None) -> None:
    click.echo(f"moe-bench: warning: {message}", err=True)


def notes() -> Notes:
    """Notes said once on stderr (a flag a router ignores)."""
    return Notes(sink=lambda m: click.echo(f"moe-bench: note: {m}", err=True))


def load_plugins(paths: tuple[str, ...]) -> list[str]:
    """Execute each plugin file once (it may register routers, workloads or both); returns the
    absolute paths, which runs record so that ``--resume`` from elsewhere finds them."""
    out = []
    for path in paths:
        load_plugin(path)
        out.append(str(Path(path).resolve()))
    return out


def _compose(*decorators: Callable) -> Callable:
    def apply(fn: Callable) -> Callable:
        for deco in reversed(decorators):
            fn = deco(fn)
        return fn

    return apply


plugin = click.option(
    "--plugin",
    "plugins",
    multiple=True,
    metavar="FILE.py",
    help="Load routers and workloads from a Python file (repeatable).",
)
router_opt = click.option(
    "--router-opt",
    "router_opts",
    multiple=True,
    metavar="[ROUTER.]KEY=VALUE",
    help="A router config field: every selected router that has it, or ROUTER's only.",
)
workload_opt = click.option(
    "--workload-opt",
    "workload_opts",
    multiple=True,
    metavar="KEY=VALUE",
    help="A workload config field, e.g. s=1.2, lang=de, path=trace.parquet.",
)
capacity_factor = click.option(
    "--capacity-factor",
    "cf_text",
    default=None,
    metavar="CF",
    help="Capacity factor for every router with a capacity: a number, 'none' (dropless) or "
    "'default' (each router's own, the default).",
)
model = click.option(
    "--model",
    "model_name",
    default=None,
    metavar="NAME",
    help="A real MoE layer's shape and router (`moe-bench list models`): E, D, F, K and its router.",
)
top_k = click.option(
    "--top-k", "-K", "top_k", type=INT, default=None, help="Choices per token K where a router's K is free."
)
seed = click.option("--seed", type=SEED, default=0, show_default=True)
device = click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
output_format = click.option(
    "--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True
)
out_dir = click.option("--out", "out_dir", type=click.Path(path_type=Path), default=DEFAULT_OUT, show_default=True)


def router_choice(default: str | None = None) -> Callable:
    """``--router NAME[k=v,...],...`` (``all``: every registered router). Without it: the router of
    ``--model``, else ``default`` (a command without a default then asks for one)."""
    shown = f" [default: {default}]" if default else ""
    return click.option(
        "--router",
        "router_text",
        default=None,
        help=f"Router(s): name or name[key=value,...], comma-separated, or 'all'; --model's own{shown}.",
    )


def workload_choice(default: str = "uniform") -> Callable:
    """``--workload NAME[k=v,...]`` (a comma list where a command takes several) and
    ``--workload-opt``; the command receives ``workloads``: the specs, options applied."""

    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args: Any, workload_text: str, workload_opts: tuple[str, ...], **kw: Any) -> Any:
            extra = key_value_pairs(workload_opts, "--workload-opt")
            specs = [s.with_options(extra) for s in parse_specs(workload_text, "--workload")]
            return fn(*args, workloads=specs, **kw)

        return _compose(
            click.option(
                "--workload",
                "workload_text",
                default=default,
                show_default=True,
                help="Workload(s): name or name[key=value,...] (`moe-bench list workloads`).",
            ),
            workload_opt,
        )(wrapper)

    return deco


@dataclass
class RoutingFlags:
    """The flags every command that routes shares, parsed once (plugins already loaded)."""

    router_opts: tuple[str, ...]
    top_k: int | None
    capacity_factor: CapacityFactor
    seed: int
    plugin_paths: list[str]
    notes: Notes
    model: ModelPreset | None = None

    def routers(self, text: str | None, default: str | None = None) -> list[Spec]:
        """``--router`` specs (``all``: every registered router) with ``--router-opt`` applied;
        without ``--router``: the model's own router, else ``default``."""
        if text is None and self.model is not None:
            specs = [self.model.router_spec]
        elif text is None and default is None:
            raise RoutingError("--router is required (or --model NAME for the model's own router)")
        else:
            specs = parse_specs(text or default, "--router", router_names)
        return add_router_opts(self.router_opts, specs)

    def size(self, flag: str, given: Any, field: str, default: Any) -> Any:
        """A layer size: the model's ``field`` with ``--model`` (a flag given too must agree),
        else the flag, else ``default``."""
        if self.model is None:
            return given if given is not None else default
        value = getattr(self.model, field)
        if given is not None and given != value:
            raise RoutingError(f"{flag} {given} conflicts with --model {self.model.name} ({field} = {value})")
        return value

    def experts(self, given: int | None, default: int | None) -> int | None:
        """E: the model's with ``--model``, else the flag, else ``default``."""
        return self.size("--experts", given, "experts", default)


def routing_flags(fn: Callable) -> Callable:
    """``--router-opt``, ``--top-k``, ``--capacity-factor``, ``--seed``, ``--plugin``: the command
    receives ``flags``, a :class:`RoutingFlags` (plugins are loaded before anything is parsed)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, router_opts, top_k, cf_text, seed, plugins, model_name, **kw: Any) -> Any:
        plugin_paths = load_plugins(plugins)
        model = get_model(model_name) if model_name else None
        cf = parse_capacity_factor(cf_text)
        flags = RoutingFlags(router_opts, top_k, cf, seed, plugin_paths, notes(), model)
        return fn(*args, flags=flags, **kw)

    return _compose(model, router_opt, top_k, capacity_factor, seed, plugin)(wrapper)
