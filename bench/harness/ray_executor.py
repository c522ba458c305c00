"""Run a sweep's configurations on a Ray cluster: one task per configuration, one GPU each where
the cluster has GPUs (one CPU each otherwise). Results come back to the driver, which alone
writes the run directory, so crash safety and ``--resume`` work exactly as with the local worker.

A task that raises, or whose worker process dies (a hard crash, an out-of-memory kill), becomes a
``status=error`` row; the sweep goes on. Ray is optional: ``pip install 'moe-routing-bench[ray]'``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from moe_routing_bench.bench.harness.sweep import Point
from moe_routing_bench.routers.contract import RoutingError


def _measure_remote(point: Point, plugins: list[str]) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """Body of the Ray task: load the run's plugins in the worker, then measure one point."""
    from moe_routing_bench.routers.registry import load_plugin, loaded_plugins

    already = " ".join(loaded_plugins())
    for path in plugins:
        if path not in already:
            load_plugin(path)
    from moe_routing_bench.bench.harness.measure import measure_point

    return measure_point(point)


def require_ray() -> Any:
    """The ray module, or RoutingError saying how to install it (checked before a run exists)."""
    try:
        import ray
    except ImportError:
        raise RoutingError(
            "--executor ray needs Ray: pip install 'moe-routing-bench[ray]' (or pip install ray)"
        ) from None
    return ray


class RayExecutor:
    """Same interface as ``worker.Supervisor``: ``results(points)`` and ``stop(kill)``."""

    def __init__(self, plugins: list[str], address: str | None = None, timeout: float | None = None) -> None:
        ray = require_ray()
        self.ray = ray
        self.plugins = list(plugins)
        self.timeout = timeout
        env = {"MALLOC_MMAP_THRESHOLD_": "131072"}  # as the local worker: freed tensors leave RSS
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {
                "address": address,
                "include_dashboard": False,
                "log_to_driver": False,
                "ignore_reinit_error": True,
                "runtime_env": {"env_vars": env},
            }
            if address is None:
                kwargs["num_cpus"] = os.cpu_count() or 1
            ray.init(**kwargs)
        gpus = ray.cluster_resources().get("GPU", 0)
        resources = {"num_gpus": 1} if gpus >= 1 else {"num_cpus": 1}
        self._task = ray.remote(max_retries=0, **resources)(_measure_remote)

    def results(self, points: list[Point]) -> Iterator[tuple[Point, str, dict[str, Any], dict[str, Any], str]]:
        """Yields (point, status, row fields, tables, error) as configurations finish."""
        ray = self.ray
        pending = {self._task.remote(p, self.plugins): p for p in points}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=self.timeout)
            if not done:  # nothing finished within the timeout: fail what is still running
                for ref, point in pending.items():
                    ray.cancel(ref, force=True)
                    yield point, "error", {}, {}, f"timed out after {self.timeout:.0f} s on the Ray cluster"
                return
            for ref in done:
                point = pending.pop(ref)
                try:
                    row, tables = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:
                    cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                    yield point, "error", {}, {}, f"{type(cause).__name__}: {cause}"
                except ray.exceptions.RayError as exc:  # the worker died: crash or OOM kill
                    yield point, "error", {}, {}, f"Ray worker died: {type(exc).__name__}: {exc}"
                else:
                    yield point, "ok", row, tables, ""

    def stop(self, kill: bool = False) -> None:
        """Leave a cluster we connected to running; shut down one we started."""
        if self.ray.is_initialized():
            self.ray.shutdown()
