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
- :class:`RssSampler`: peak resident memory of this process (the kernel's high-water mark, reset
  per measurement; a sampling thread where that is refused).
- :class:`CpuHeap`: glibc's heap as an exact meter of live memory (measuring peaks) or as a
  caching allocator (timing steady-state steps), switched at run time.
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


class CpuHeap:
    """glibc's malloc in one of two behaviours, switched at run time (``mallopt``).

    - ``exact()``: every allocation of 128 KiB or more is its own mapping, unmapped on free, so
      the RSS follows live tensors: peak memory is what the step holds (as
      ``torch.cuda.max_memory_allocated`` on a GPU), not what the heap kept from before.
    - ``caching()``: allocations come from the heap and freed pages stay resident, so a
      steady-state step reuses the pages of the step before, as a GPU caching allocator does,
      instead of paying the kernel's first touch of fresh zeroed pages for every weight gradient
      and activation (at E=256, T=2048, D=128 that first touch was a third of fwd+bwd).
    - ``release()``: hand freed pages back to the OS (``malloc_trim``) before a new baseline.

    Off glibc (macOS, musl) every call is a no-op and ``available`` is False.
    """

    _M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4

    def __init__(self) -> None:
        self._libc: Any = None
        if platform.system() == "Linux":
            try:
                import ctypes

                libc = ctypes.CDLL("libc.so.6")
                if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim"):
                    self._libc = libc
            except OSError:
                pass
        self.mode = "default"

    @property
    def available(self) -> bool:
        return self._libc is not None

    def _set(self, **params: int) -> None:
        if self._libc is None:
            return
        for name, value in params.items():
            if self._libc.mallopt(getattr(self, f"_M_{name}"), value) != 1:
                raise OSError(f"mallopt({name}={value}) was refused")

    def exact(self) -> None:
        self._set(MMAP_THRESHOLD=128 << 10, MMAP_MAX=1 << 20, TRIM_THRESHOLD=128 << 10)
        self.mode = "exact"

    def caching(self) -> None:
        self._set(MMAP_MAX=0, TRIM_THRESHOLD=(1 << 31) - 1)
        self.mode = "caching"

    def release(self) -> None:
        import gc

        gc.collect()
        if self._libc is not None:
            self._libc.malloc_trim(0)


class RssSampler:
    """Peak resident set size of this process between ``__enter__`` and ``__exit__``.

    On Linux the kernel keeps the peak itself (VmHWM), and writing 5 to /proc/self/clear_refs
    resets it: exact, and nothing runs beside the measured step. Where that is refused, a thread
    samples the RSS every ``interval`` seconds (it competes for the cores, and misses peaks
    shorter than the interval). ``method`` says which measured.
    """

    def __init__(self, interval: float = 0.0005) -> None:
        self.interval = interval
        self.base = 0
        self.peak = 0
        self.method = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * self._page

    @staticmethod
    def _status_bytes(field: str) -> int:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise OSError(f"/proc/self/status has no {field}")

    @staticmethod
    def _reset_high_water() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            return True
        except OSError:
            return False

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self) -> RssSampler:
        self.base = self.rss()
        self.peak = self.base
        if self._reset_high_water():
            self.method = "VmHWM"
        else:
            self.method = "sampled"
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        else:
            self.peak = max(self.peak, self._status_bytes("VmHWM"))
        self.peak = max(self.peak, self.rss())
