"""A supervised worker process: jobs run one at a time in a child process, so an exception, a hard
crash or an out-of-memory kill in one becomes an error result and the run goes on.

The child is started with the ``spawn`` method (no inherited CUDA or thread state), loads the
run's plugins, ignores Ctrl-C (the parent decides), and is restarted after a crash. What it runs
is named, ``"module:function"``: a sweep measures configurations (``measure.measure_point``, the
default), ``moe-bench quality`` trains one router per job. The parent alone writes the run
directory, from the results it receives.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing as mp
import os
import signal
import traceback
from typing import Any

from moe_routing_bench.bench.harness.sweep import Point
from moe_routing_bench.routers.contract import RoutingError

MEASURE = "moe_routing_bench.bench.harness.measure:measure_point"

_SIGNAL_HINTS = {
    signal.SIGKILL: "SIGKILL: killed, e.g. by the out-of-memory killer",
    signal.SIGSEGV: "SIGSEGV: segmentation fault",
    signal.SIGABRT: "SIGABRT: aborted",
    signal.SIGBUS: "SIGBUS: bus error",
}


def error_text(exc: BaseException) -> str:
    """``Type: message``; with the traceback's last frames unless it is bad input (a RoutingError,
    a broken plan), whose message already says what is wrong."""
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, RoutingError):
        return text
    return f"{text}\n{traceback.format_exc(limit=6)}"


def _child(conn, plugins: list[str], job: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from moe_routing_bench.routers.registry import load_plugin

    for path in plugins:
        load_plugin(path)
    module, _, name = job.partition(":")
    fn = getattr(importlib.import_module(module), name)
    while True:
        try:
            payload = conn.recv()
        except EOFError:
            return
        if payload is None:
            return
        try:
            result = fn(payload)
        except BaseException as exc:
            conn.send(("error", None, error_text(exc)))
        else:
            conn.send(("ok", result, ""))


class Supervisor:
    """Runs jobs in a child process; restarts it after a crash or a time-out."""

    def __init__(self, plugins: list[str], timeout: float | None = None, job: str = MEASURE) -> None:
        self.plugins = list(plugins)
        self.timeout = timeout
        self.job = job
        self._ctx = mp.get_context("spawn")
        self._proc: Any = None
        self._conn: Any = None

    def _start(self) -> None:
        # A fixed mmap threshold stops glibc from keeping freed large tensors on its heap, so
        # the sampled RSS peak of one configuration is not hidden by memory a previous one freed.
        os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
        parent, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(target=_child, args=(child, self.plugins, self.job), daemon=True)
        self._proc.start()
        child.close()
        self._conn = parent

    def call(self, payload: Any) -> tuple[str, Any, str]:
        """(status, result, error text) of one job: ``ok`` with the job's return value, or ``error``
        (it raised, the worker died, or it timed out) with None."""
        if self._proc is None or not self._proc.is_alive():
            self._start()
        try:
            self._conn.send(payload)
            if not self._conn.poll(self.timeout):
                self.stop(kill=True)
                return "error", None, f"timed out after {self.timeout:g} s (worker killed and restarted)"
            return self._conn.recv()
        except (EOFError, BrokenPipeError, ConnectionResetError, OSError):
            self._proc.join(timeout=5)
            code = self._proc.exitcode
            self._proc = None
            if code is not None and code < 0:
                sig = signal.Signals(-code)
                why = _SIGNAL_HINTS.get(sig, sig.name)
                return "error", None, f"worker process died by signal {-code} ({why})"
            return "error", None, f"worker process exited with status {code} during the job"

    def run(self, point: Point) -> tuple[str, dict[str, Any], dict[str, list[dict[str, Any]]], str]:
        """(status, row fields, per-config tables, error text) for one sweep point."""
        status, result, err = self.call(point)
        row, tables = result if result is not None else ({}, {})
        return status, row, tables, err

    def results(self, points: list[Point]):
        """Run points one after another; yields (point, status, row fields, tables, error)."""
        for point in points:
            yield (point, *self.run(point))

    def stop(self, kill: bool = False) -> None:
        if self._proc is None:
            return
        if kill:
            self._proc.kill()
        else:
            with contextlib.suppress(BrokenPipeError, OSError):
                self._conn.send(None)
        self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        self._proc = None

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(kill=exc[0] is not None)
