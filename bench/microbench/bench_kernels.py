"""Microbenchmarks of the dispatch kernels on this machine's device (pytest-benchmark).

    make bench-kernels            # JSON under results/kernels/, a table, and the copy ratios

Not collected by ``make test`` (it lives outside tests/ and is not named test_*). Declared as
data: ``CASE`` per device, ``OPS`` x ``PROVIDERS``; every callable and its byte count come from
``bench.microbench.kernel_cases`` (setup + make_fn + bytes_moved), the same code the GPU check times.

Providers: ``torch`` (the reference, and the CPU path of torch ops), ``native`` (the C kernels,
on a CPU where a C compiler is found), ``triton`` (CUDA only: on a CPU it runs only interpreted,
which measures numpy), and ``copy``, a plain device copy moving the same
bytes as the op it stands beside. The last test prints, per layout, the ratio the CPU goal is
stated in: copy time of permute's and combine's bytes over their time (100% = copy speed), timed
interleaved round by round so that a shared machine's drifting load hits both sides alike.
"""

from __future__ import annotations

import statistics

import pytest
import torch

from moe_routing_bench.bench.microbench import peers
from moe_routing_bench.bench.microbench.kernel_cases import DTYPES, Case, bytes_moved, copy_fn, make_fn, setup
from moe_routing_bench.bench.timing import CpuHeap, sync, time_alternating
from moe_routing_bench.kernels.layer import get_backend

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# CPU: the goal's shape (T = 16384, D = 1024, float32; top-2 of 64 experts). GPU: the same in bf16.
CASE = Case(16384, 1024, 64, 2, dtype="float32" if DEVICE.type == "cpu" else "bfloat16")
OPS = [
    ("positions", "compact"),
    ("permute", "compact"),
    ("permute", "padded"),
    ("combine", "compact"),
    ("combine", "padded"),
]
PROVIDERS = (
    ["torch", "copy"]
    + (["triton"] if DEVICE.type == "cuda" else [])
    + (["native"] if get_backend("native").unavailable(DEVICE) is None else [])
)
_SETUPS: dict[str, object] = {}


def _setup(layout: str):
    if layout not in _SETUPS:
        cf = None if layout == "compact" else 1.25
        _SETUPS[layout] = setup(Case(**{**CASE.as_row(), "layout": layout, "cf": cf}), DEVICE)
    return _SETUPS[layout]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("op, layout", OPS, ids=[f"{o}-{la}" for o, la in OPS])
def test_dispatch_op(benchmark, op, layout, provider):
    s = _setup(layout)
    nbytes = bytes_moved(op, "fwd", s)
    fn = copy_fn(nbytes, DEVICE) if provider == "copy" else make_fn(provider, op, "fwd", s)

    def run():
        fn()
        sync(DEVICE)

    benchmark.group = f"{op}-{layout}"
    benchmark.extra_info.update(
        {
            **CASE.as_row(),
            "layout": layout,
            "op": op,
            "bytes": nbytes,
            "device": str(DEVICE),
            "threads": torch.get_num_threads(),
        }
    )
    benchmark.pedantic(run, rounds=15, iterations=1, warmup_rounds=2)
    benchmark.extra_info["GBps"] = nbytes / benchmark.stats.stats.median / 1e9


def _interleaved_medians(fns: dict[str, object], rounds: int = 15) -> dict[str, float]:
    """Median seconds of each callable, timed in turn round after round: a machine whose load
    drifts (other jobs on a shared CPU) then shifts every provider alike."""
    return {k: statistics.median(v) for k, v in time_alternating(fns, DEVICE, rounds).items()}


def test_permute_plus_combine_vs_copy(request):
    """Per layout and provider: (copy time of permute's bytes + of combine's bytes) over
    (permute + combine), timed interleaved in this one test; 100% = copy speed."""
    if request.config.getoption("benchmark_disable") and not request.config.getoption("benchmark_enable"):
        pytest.skip("benchmarks disabled")
    print(
        f"T={CASE.tokens} D={CASE.hidden} E={CASE.experts} K={CASE.top_k} {CASE.dtype} on {DEVICE} "
        f"({torch.get_num_threads()} threads), medians of 15 interleaved rounds:"
    )
    for layout in ("compact", "padded"):
        s = _setup(layout)
        for provider in [p for p in PROVIDERS if p != "copy"]:
            fns = {}
            for op in ("permute", "combine"):
                fns[op] = make_fn(provider, op, "fwd", s)
                fns[f"copy-{op}"] = copy_fn(bytes_moved(op, "fwd", s), DEVICE)
            med = _interleaved_medians(fns)
            op_s, copy_s = med["permute"] + med["combine"], med["copy-permute"] + med["copy-combine"]
            print(
                f"  {provider} permute+combine ({layout}): {op_s * 1e3:.1f} ms "
                f"(permute {med['permute'] * 1e3:.1f}, combine {med['combine'] * 1e3:.1f}); copy of the "
                f"same bytes {copy_s * 1e3:.1f} ms -> {copy_s / op_s:.0%} of copy speed"
            )


def test_round_trip_against_the_peers(request):
    """The dispatch round trip (dispatch build, permute, combine) against Megatron-core's unfused
    permute/unpermute and copies of the same bytes, timed interleaved; every output checked equal
    to ours first (``bench.microbench.peers``)."""
    if request.config.getoption("benchmark_disable") and not request.config.getoption("benchmark_enable"):
        pytest.skip("benchmarks disabled")
    rt = peers.setup(CASE.tokens, CASE.hidden, CASE.experts, CASE.top_k, DTYPES[CASE.dtype], DEVICE)
    provs = peers.providers(rt)
    reference = provs["ours"][0]()
    fns = {}
    for name, (fn, why) in provs.items():
        if fn is None:
            print(f"  {name}: skipped: {why}")
            continue
        if not name.startswith("copy"):
            verdict = peers.check_equal(reference, fn(), name)
            assert verdict == "ok", verdict
        fns[name] = fn
    # Two allocator regimes on CPU: fresh pages for every allocation (glibc mapping each large
    # tensor, first touch included, as a fresh process sees) and a caching heap (freed pages
    # reused, the steady state a GPU's caching allocator gives). Both sides get the same one.
    heap = CpuHeap() if DEVICE.type == "cpu" else None
    regimes = ["exact", "caching"] if heap is not None and heap.available else ["device"]
    for regime in regimes:
        if heap is not None and heap.available:
            getattr(heap, regime)()
            heap.release()
        med = _interleaved_medians(fns)
        print(
            f"round trip T={CASE.tokens} D={CASE.hidden} E={CASE.experts} K={CASE.top_k} {CASE.dtype} on {DEVICE} "
            f"({torch.get_num_threads()} threads, allocator: {_REGIME[regime]}), {rt.nbytes / 2**20:.0f} MiB "
            "moved, medians of 15 interleaved rounds:"
        )
        for name, s in med.items():
            print(f"  {name:<22} {s * 1e3:8.1f} ms  {rt.nbytes / s / 1e9:6.2f} GB/s")
        for name in [n for n in med if n.startswith("ours")]:
            if "megatron" in med:
                print(f"  {name} is {med['megatron'] / med[name]:.2f}x Megatron-core's unfused permute+unpermute")
            if name.endswith("+workspace"):
                print(f"  {name} runs at {med['copy-reused'] / med[name]:.0%} of a copy into reused memory")
    if heap is not None:
        heap.exact()


_REGIME = {
    "exact": "fresh pages per allocation",
    "caching": "caching heap, pages reused",
    "device": "the device's allocator",
}
