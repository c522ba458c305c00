"""Running a sweep into a crash-safe run directory, and finishing one with ``--resume``.

:func:`start_sweep` expands the sweep (refusing bad names and options before any work) and
creates the run directory; :func:`open_sweep` reopens one to finish exactly the sweep its meta
records; :func:`execute` runs what is left, one configuration at a time in a supervised worker
(or on Ray), writing each row as it finishes. meta.json stays true throughout (``record.recording``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from moe_routing_bench.bench.harness.plan import select_shard, skip_reason
from moe_routing_bench.bench.harness.sweep import LIST_KEYS, SCALAR_KEYS, Point, expand
from moe_routing_bench.bench.harness.worker import Supervisor
from moe_routing_bench.bench.record import RunDir, header, new_meta, read_parts, recording
from moe_routing_bench.bench.schema import ROW_SCHEMA
from moe_routing_bench.bench.spec import Notes, parse_capacity_factors, split_list
from moe_routing_bench.bench.timing import memory_budget_bytes, resolve_device
from moe_routing_bench.kernels.layer import list_backends
from moe_routing_bench.routers.contract import RoutingError
from moe_routing_bench.routers.registry import loaded_plugins
from moe_routing_bench.workloads.registry import load_plugin, workload_names

# Parameters of `moe-bench run` that shape the sweep: every block key a flag sets, the sweep file,
# the shard, the plugins and where the run goes. --resume finishes the sweep its meta records and
# refuses them; flags such as --timeout or --executor only change how it runs, and are kept.
SWEEP_FLAGS = (*LIST_KEYS, *SCALAR_KEYS, "config_name", "shard", "plugins", "out_dir")


@dataclass
class Sweep:
    """A run directory, its meta, and the configurations it must hold (its shard's)."""

    run: RunDir
    meta: dict[str, Any]
    points: list[Point]
    notes: list[str] = field(default_factory=list)


def base_row(point: Point, meta: dict[str, Any]) -> dict[str, Any]:
    """The run header and configuration columns every row of ``point`` has, whatever its status."""
    return {
        **header(meta, point.config_id, point.seed, point.to_json()),
        **point.columns(),
    }


def start_sweep(
    blocks: list[dict[str, Any]],
    out_dir: Path,
    *,
    config: str,
    plugin_paths: list[str],
    shard: str | None = None,
    notes: Notes | None = None,
) -> Sweep:
    """Expand ``blocks`` (every name and option checked first) and create the run directory."""
    points = expand(blocks, workload_names(), list_backends(), notes)
    total = len(points)
    if shard is not None:
        points = select_shard(points, shard)
    device = resolve_device(points[0].device)
    memory_budget_bytes(points[0].device)  # a bad MOE_BENCH_MEMORY_BUDGET is refused before the run exists
    run = RunDir.create(out_dir)
    meta = new_meta(
        "sweep",
        run.run_id,
        device,
        config=config,
        blocks=blocks,
        plugin_paths=plugin_paths,
        plugins=loaded_plugins(),
        configurations=len(points),
        sweep_configurations=total,
        shard=shard,
        config_ids=[p.config_id for p in points],
    )
    run.write_meta(meta)
    return Sweep(run, meta, points)


def check_timeout(timeout: float, flag: str = "--timeout") -> None:
    """A time limit is a finite number of seconds > 0 (0, a negative or NaN would fail everything)."""
    if not (math.isfinite(timeout) and timeout > 0):
        raise RoutingError(f"{flag} must be a finite number of seconds > 0 (got {timeout})")


def check_executor(executor: str, ray_address: str | None) -> None:
    """--ray-address means something only to the Ray executor, which needs Ray installed."""
    if ray_address is not None and executor != "ray":
        raise RoutingError(f"--ray-address needs --executor ray (got --executor {executor})")
    if executor == "ray":
        from moe_routing_bench.bench.harness.ray_executor import require_ray

        require_ray()


def open_sweep(path: Path, *, retry_errors: bool = False, notes: Notes | None = None) -> Sweep:
    """Reopen a sweep to finish it: the blocks, shard and plugins its meta records, nothing else.

    Parts that cannot be read are moved aside (``RunDir.set_aside``) and their configurations run
    again; with ``retry_errors`` the error rows do too.
    """
    run = RunDir.open(path)
    meta = run.read_meta()
    if meta.get("kind", "sweep") != "sweep":
        raise RoutingError(f"--resume {path}: not a sweep run (kind {meta.get('kind')!r}); only sweeps resume")
    if not isinstance(meta.get("blocks"), list) or not all(isinstance(b, dict) for b in meta["blocks"]):
        raise RoutingError(f"--resume {path}: meta.json's blocks are damaged (not a list of sweep blocks)")
    for plugin in meta.get("plugin_paths", []):
        if not Path(plugin).is_file():
            raise RoutingError(f"--resume {path}: the run's plugin {plugin} is missing; put it back to resume")
        load_plugin(plugin)
    try:
        points = expand(meta["blocks"], workload_names(), list_backends(), notes)
        if meta.get("shard"):
            points = select_shard(points, meta["shard"])
    except (RoutingError, TypeError, KeyError, AttributeError) as exc:
        what = f"{type(exc).__name__}: {exc}" if not isinstance(exc, RoutingError) else str(exc)
        raise RoutingError(f"--resume {path}: meta.json's sweep cannot be expanded again ({what})") from None
    meta["config_ids"] = [p.config_id for p in points]
    if points:
        memory_budget_bytes(points[0].device)
    sweep = Sweep(run, meta, points)
    if retry_errors:
        rows = _read_rows(run, set(meta["config_ids"]))
        run.forget(set(rows.loc[rows["status"] == "error", "config_id"]))
    return sweep


def _read_rows(run: RunDir, ids: set[str]) -> pd.DataFrame:
    run.finished(ids)  # sets unreadable parts aside first
    return read_parts(run.rows_dir, ROW_SCHEMA, ids).to_pandas()


def todo(sweep: Sweep) -> list[Point]:
    """The sweep's configurations without a readable row yet."""
    done = sweep.run.finished({p.config_id for p in sweep.points})
    return [p for p in sweep.points if p.config_id not in done]


def execute(
    sweep: Sweep,
    points: list[Point],
    *,
    timeout: float,
    executor: str = "local",
    ray_address: str | None = None,
    progress: Callable[[int], None] = lambda _n: None,
) -> None:
    """Run ``points`` and write one row each (ok, error or skipped), keeping meta.json true.

    A configuration that cannot run here is a skipped row; one that raises, crashes the worker or
    times out is an error row, and the sweep goes on. Ctrl-C or SIGTERM stops it (finished rows
    stay, meta says interrupted); a failure of the harness itself (a full disk) marks it failed.
    """
    check_timeout(timeout)
    run, meta = sweep.run, sweep.meta
    plugins = meta.get("plugin_paths", [])
    runner: Any
    if executor == "ray":
        from moe_routing_bench.bench.harness.ray_executor import RayExecutor

        runner = RayExecutor(plugins, address=ray_address, timeout=timeout)
    else:
        runner = Supervisor(plugins, timeout=timeout)
    budget = memory_budget_bytes(points[0].device) if points else 0
    interrupted = failed = False
    with recording(run, meta):
        try:
            runnable = []
            for point in points:
                reason = skip_reason(point, budget)
                if reason:
                    run.write_result({**base_row(point, meta), "status": "skipped", "error": reason})
                    progress(1)
                else:
                    runnable.append(point)
            for point, status, fields, tables, err in runner.results(runnable):
                row = {**base_row(point, meta), **fields, "status": status, "error": err}
                stamp = {
                    "run_id": run.run_id,
                    "config_id": point.config_id,
                    "router": point.router_label,
                    "workload": point.workload_label,
                }
                run.write_result(row, {name: [{**stamp, **r} for r in recs] for name, recs in tables.items()})
                progress(1)
        except KeyboardInterrupt:
            interrupted = True
            raise
        except BaseException:
            failed = True
            raise
        finally:
            runner.stop(kill=interrupted)
            try:
                run.consolidate(set(meta["config_ids"]))
            except (OSError, RoutingError):
                if not (failed or interrupted):  # else the first error is the one to report
                    raise


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


def sweep_overrides(values: dict[str, Any]) -> dict[str, Any]:
    """Command-line values to sweep keys: comma lists of specs (brackets kept), integers, names."""

    def ints(key: str, text: str | None) -> list[int] | None:
        if text is None:
            return None
        try:
            return [int(v) for v in split_list(text)]
        except ValueError:
            flag = "--" + key.replace("_", "-")
            raise RoutingError(f"{flag} expects comma-separated integers (got {text!r})") from None

    names = lambda text: None if text is None else split_list(text)
    cf = values.get("capacity_factor")
    return {
        "routers": names(values.get("routers")),
        "models": names(values.get("models")),
        "workloads": names(values.get("workloads")),
        "experts": ints("experts", values.get("experts")),
        "tokens": ints("tokens", values.get("tokens")),
        "hidden": ints("hidden", values.get("hidden")),
        "top_k": ints("top_k", values.get("top_k")),
        "capacity_factor": None if cf is None else [_toml_cf(v) for v in parse_capacity_factors(cf)],
        "backends": names(values.get("backends")),
        "dtypes": names(values.get("dtypes")),
        "modes": names(values.get("modes")),
        "device": values.get("device"),
        "repeats": values.get("repeats"),
        "seed": values.get("seed"),
    }


def _toml_cf(cf: Any) -> Any:
    # Blocks are stored in meta.json as JSON: dropless is written "none", as a sweep file writes it.
    return "none" if cf is None else cf


def describe(rows: pd.DataFrame) -> str:
    """``N ok, M error, ...`` for the end of a run."""
    counts = rows["status"].value_counts().to_dict()
    return ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "no rows"
