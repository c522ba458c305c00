"""The memory half of timing: RSS sampling and the caching heap of a measuring worker."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

from moe_routing_bench.bench.timing import RssSampler


def _rss_after_free_in_a_child() -> dict[str, int]:
    # A fresh interpreter: mallopt settings are process-wide, and pytest's heap is not ours to set.
    code = textwrap.dedent(
        """
        import torch
        from moe_routing_bench.bench.timing import CpuHeap, RssSampler
        heap, s = CpuHeap(), RssSampler()
        assert heap.available
        def freed():
            x = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, touched
            del x
        heap.exact(); heap.release(); base = s.rss(); freed()
        exact = s.rss() - base
        heap.caching(); heap.release(); base = s.rss(); freed()
        caching = s.rss() - base
        heap.release()
        released = s.rss() - base
        print(exact, caching, released)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return dict(zip(("exact", "caching", "released"), (int(v) for v in out.stdout.split()), strict=True))


@pytest.mark.skipif(sys.platform != "linux", reason="glibc heap settings")
def test_the_heap_is_exact_for_memory_and_caching_for_time():
    rss = _rss_after_free_in_a_child()
    mib = 1 << 20
    assert rss["exact"] < 16 * mib  # freed memory leaves RSS at once: peaks are live tensors
    assert rss["caching"] > 48 * mib  # freed pages stay for the next step (no first touch) ...
    assert rss["released"] < 16 * mib  # ... until released before the next baseline


def test_both_ways_of_finding_the_peak_see_it(monkeypatch):
    import torch

    for refuse in (False, True):
        if refuse:  # a kernel or sandbox that refuses clear_refs: the sampling thread measures
            monkeypatch.setattr(RssSampler, "_reset_high_water", staticmethod(lambda: False))
        with RssSampler() as s:
            x = torch.ones(32 << 20, dtype=torch.uint8)
            x.add_(1)
            time.sleep(0.05)
            del x
        assert s.method == ("sampled" if refuse else s.method)
        assert s.peak - s.base >= 24 << 20, s.method
