"""A supervised worker process: configurations run one at a time in a child process, so an
exception, a hard crash or an out-of-memory kill in one becomes an error row and the sweep goes on.

The child is started with the ``spawn`` method (no inherited CUDA or thread state), loads the
run's plugins, ignores Ctrl-C (the parent decides), and is restarted after a crash.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import traceback
from typing import Any

from moe_routing_bench.bench.harness.sweep import Point

_SIGNAL_HINTS = {
    signal.SIGKILL: "SIGKILL: killed, e.g. by the out-of-memory killer",
    signal.SIGSEGV: "SIGSEGV: segmentation fault",
    signal.SIGABRT: "SIGABRT: aborted",
    signal.SIGBUS: "SIGBUS: bus error",
}


def _child(conn, plugins: list[str]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from moe_routing_bench.routers.registry import load_plugin

    for path in plugins:
        load_plugin(path)
    from moe_routing_bench.bench.harness.measure import measure_point

    while True:
        try:
            point = conn.recv()
        except EOFError:
            return
        if point is None:
            return
        try:
            row, tables = measure_point(point)
            conn.send(("ok", row, tables, ""))
        except BaseException as exc:
            tb = traceback.format_exc(limit=6)
            conn.send(("error", {}, {}, f"{type(exc).__name__}: {exc}\n{tb}"))


class Supervisor:
    """Runs points in a child process; restarts it after a crash or a time-out."""

    def __init__(self, plugins: list[str], timeout: float | None = None) -> None:
        self.plugins = list(plugins)
        self.timeout = timeout
        self._ctx = mp.get_context("spawn")
        self._proc: Any = None
        self._conn: Any = None

    def _start(self) -> None:
        # A fixed mmap threshold stops glibc from keeping freed large tensors on its heap, so
        # the sampled RSS peak of one configuration is not hidden by memory a previous one freed.
        os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
        parent, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(target=_child, args=(child, self.plugins), daemon=True)
        self._proc.start()
        child.close()
        self._conn = parent

    def run(self, point: Point) -> tuple[str, dict[str, Any], dict[str, list[dict[str, Any]]], str]:
        """(status, row fields, per-config tables, error text) for one point."""
        if self._proc is None or not self._proc.is_alive():
            self._start()
        try:
            self._conn.send(point)
            if not self._conn.poll(self.timeout):
                self.stop(kill=True)
                return "error", {}, {}, f"timed out after {self.timeout:.0f} s (worker killed and restarted)"
            return self._conn.recv()
        except (EOFError, BrokenPipeError, ConnectionResetError, OSError):
            self._proc.join(timeout=5)
            code = self._proc.exitcode
            self._proc = None
            if code is not None and code < 0:
                sig = signal.Signals(-code)
                why = _SIGNAL_HINTS.get(sig, sig.name)
                return "error", {}, {}, f"worker process died by signal {-code} ({why})"
            return "error", {}, {}, f"worker process exited with status {code} during the configuration"

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
