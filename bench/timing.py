"""Timing and devices, defined once: every number of seconds and bytes the harness reports comes
through here (the sweep's stages, expert parallelism, routing cost, the kernel microbenchmarks,
the GPU check).

- :func:`sync`, :func:`resolve_device`, :func:`device_name`: devices.
- :data:`DTYPES`, :func:`dtype_of`, :func:`element_size`: the dtype names runs record.
- :class:`StageTimer`: seconds per named stage of one step; CUDA events on a GPU (no host stall
  inside the step), or host wall time synchronised on both ends (``wall=True``: what a rank of a
  collective waits, and every timer on CPU).
- :func:`time_calls`: seconds of each call of a function, after warm-up, synchronised;
  :func:`time_alternating` times several functions in turns, so all see the same machine load.
- :func:`quantiles`: median, p20, p80: the form every timing is quoted in.
- :func:`copy_seconds`: the device's copy of the same bytes, the bandwidth reference.
- :class:`RssSampler`: peak resident memory of this process, sampled in a thread (CPU).
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def dtype_of(name: str) -> torch.dtype:
    """The torch dtype of a recorded dtype name; an unknown name raises naming the allowed ones."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)} (got {name!r})") from None


def element_size(name: str) -> int:
    """Bytes per element of a recorded dtype name."""
    return torch.empty((), dtype=dtype_of(name)).element_size()


def sync(device: str | torch.device) -> None:
    """Wait for queued device work, so a wall-clock interval covers it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA when present, else CPU; `cuda` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA GPU (use auto or cpu)")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be one of auto, cpu, cuda (got {device!r})")
    return torch.device(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


BUDGET_ENV = "MOE_BENCH_MEMORY_BUDGET"


def memory_budget_bytes(device: str | torch.device) -> int:
    """What one configuration may plan to allocate: 80% of GPU memory, or half the free RAM.
    MOE_BENCH_MEMORY_BUDGET (bytes) overrides it."""
    if os.environ.get(BUDGET_ENV):
        try:
            budget = float(os.environ[BUDGET_ENV])
        except ValueError:
            budget = math.nan
        if not (math.isfinite(budget) and budget > 0):
            raise ValueError(f"{BUDGET_ENV} must be a number of bytes > 0 (got {os.environ[BUDGET_ENV]!r})")
        return int(budget)
    dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
    if dev.type == "cuda":
        return int(0.8 * torch.cuda.get_device_properties(dev).total_memory)
    try:
        with open("/proc/meminfo") as fh:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in fh}
        return info.get("MemAvailable", 8 << 30) // 2
    except OSError:
        return 8 << 30


def routing_bytes(tokens: int, experts: int) -> int:
    """The least one batch's routing holds: logits and probabilities [T, E] in float32."""
    return 8 * tokens * experts


def check_fits(need: int, what: str, device: str | torch.device) -> None:
    """Refuse up front, with the bytes it needs, what cannot fit the memory budget."""
    budget = memory_budget_bytes(device)
    if need > budget:
        raise ValueError(
            f"{what} needs at least {need:,} bytes ({need / 2**30:,.1f} GiB) > the memory budget of "
            f"{budget:,} bytes ({budget / 2**30:,.1f} GiB; {BUDGET_ENV} overrides)"
        )


class StageTimer:
    """Accumulates seconds per stage name over one step.

    ``with timer("route"): ...``; a stage may be entered several times (its times add up).
    On a GPU the default records CUDA events and reads them in :meth:`collect`; ``wall=True``
    synchronises on entry and exit and reads the host clock instead (collectives, CPU).
    """

    def __init__(self, device: torch.device | str, wall: bool = False) -> None:
        self.device = torch.device(device)
        self.events = self.device.type == "cuda" and not wall
        self.times: dict[str, float] = defaultdict(float)
        self._pending: list[tuple[str, Any, Any]] = []

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        if self.events:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._pending.append((stage, start, end))
        else:
            sync(self.device)
            t0 = time.perf_counter()
            yield
            sync(self.device)
            self.times[stage] += time.perf_counter() - t0

    def collect(self) -> dict[str, float]:
        """Seconds per stage (synchronises the device once when events are pending)."""
        if self._pending:
            torch.cuda.synchronize(self.device)
            for stage, start, end in self._pending:
                self.times[stage] += start.elapsed_time(end) / 1e3
            self._pending.clear()
        return dict(self.times)


@contextmanager
def stopwatch(device: torch.device | str, into: list[float]) -> Iterator[None]:
    """Append the synchronised wall seconds of the block to ``into``."""
    sync(device)
    t0 = time.perf_counter()
    yield
    sync(device)
    into.append(time.perf_counter() - t0)


def time_alternating(
    fns: dict[str, Callable[[], object]], device: torch.device | str, repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds of each call of each function, the functions called in turns (a, b, a, b, ...)
    after ``warmup`` calls of each, so all see the same machine load. CUDA events on a GPU."""
    dev = torch.device(device)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            timer = StageTimer(dev)
            with timer(name):
                fn()
            times[name].append(timer.collect()[name])
    return times


def time_calls(fn: Callable[[], object], device: torch.device | str, repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` calls."""
    return time_alternating({"fn": fn}, device, repeats, warmup)["fn"]


def quantiles(values: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80) of ``values``; NaN for none. p20/p80 are nearest-rank."""
    if not values:
        return math.nan, math.nan, math.nan
    vs = sorted(values)
    q = lambda p: vs[min(len(vs) - 1, max(0, round(p * (len(vs) - 1))))]
    return statistics.median(vs), q(0.2), q(0.8)


def copy_seconds(numel: int, dtype: torch.dtype, device: torch.device | str, repeats: int) -> float:
    """Median seconds of ``dst.copy_(src)`` over ``numel`` elements into preallocated memory: the
    device's copy of the same bytes, which permute and combine are compared with."""
    src = torch.randn(max(numel, 1), device=device).to(dtype)
    dst = torch.empty_like(src)
    return statistics.median(time_calls(lambda: dst.copy_(src), device, repeats, warmup=2))


class RssSampler:
    """Peak resident set size of this process, sampled every ``interval`` seconds in a thread."""

    def __init__(self, interval: float = 0.0005) -> None:
        self.interval = interval
        self.base = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self) -> RssSampler:
        self.base = self.rss()
        self.peak = self.base
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())
