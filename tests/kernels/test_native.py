"""The native backend's C kernels against the torch backend: exact data movement, float32 sums
and gradients to tolerance, on the paths the small shapes of test_backends.py never take
(streaming stores, several threads, tokens with more kept rows than one pass sums, odd row
sizes), and a clear reason where no C compiler works."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moe_routing_bench.kernels import layer
from moe_routing_bench.kernels import native_backend as nb
from moe_routing_bench.kernels import torch_backend as tb
from moe_routing_bench.kernels.dispatch import make_dispatch
from moe_routing_bench.kernels.layer import dispatch_for
from moe_routing_bench.kernels.positions import positions as torch_positions
from moe_routing_bench.kernels.reference import random_plan
from moe_routing_bench.kernels.workspace import Workspace

pytestmark = pytest.mark.skipif(nb.runtime_error("cpu") is not None, reason=str(nb.runtime_error("cpu")))


@pytest.fixture(params=["plain", "streamed-threaded"])
def regime(request, monkeypatch):
    """plain: small buffers, one thread, regular stores. streamed-threaded: every buffer written
    with non-temporal stores (where rows allow) and split over two threads whatever its size."""
    if request.param == "streamed-threaded":
        monkeypatch.setattr(nb, "STREAM_MIN_BYTES", 0)
        monkeypatch.setattr(nb, "_BYTES_PER_THREAD", 1)
        threads = torch.get_num_threads()
        torch.set_num_threads(2)
        yield request.param
        torch.set_num_threads(threads)
    else:
        yield request.param


def _plan(t: int, e: int, k: int, cap: int | None, seed: int, requires_grad: bool = False):
    token_R, expert_R, weight_R = random_plan(t, e, k, seed=seed)
    weight_R.requires_grad_(requires_grad)
    return make_dispatch(token_R, expert_R, weight_R, t, e, cap), weight_R


# D = 8 (32-byte rows: streamable), 13 (52 bytes: never streamed, no 8-float block), 24, 1031
# (odd, past a multiple of 8: a scalar tail after the vector blocks).
SHAPES = [(33, 6, 2, 8), (17, 5, 3, 13), (40, 8, 2, 24), (9, 4, 2, 1031)]


@pytest.mark.parametrize("layout", ["compact", "padded"])
@pytest.mark.parametrize("cap", [None, 4])
@pytest.mark.parametrize("t, e, k, dim", SHAPES)
def test_forward_matches_torch_backend(regime, t, e, k, dim, cap, layout):
    d, _ = _plan(t, e, k, cap, seed=t + dim)
    x = torch.randn(t, dim)
    buf = nb.permute(x, d, layout)
    assert torch.equal(buf, tb.permute(x, d, layout))
    y = torch.randn_like(buf)
    torch.testing.assert_close(nb.combine(y, d, layout), tb.combine(y, d, layout), atol=1e-6, rtol=1e-6)
    ws = Workspace()
    # Stale contents (NaN) in the reused buffers must never leak into the result.
    ws.take("permute", (buf.numel(),), x.dtype, x.device).fill_(float("nan"))
    ws.take("combine", (t * dim,), torch.float32, x.device).fill_(float("nan"))
    assert torch.equal(nb.permute_into(x, d, layout, ws), buf)
    torch.testing.assert_close(nb.combine_into(y, d, layout, ws), tb.combine(y, d, layout), atol=1e-6, rtol=1e-6)


def test_a_token_with_more_rows_than_one_pass_sums_keeps_priority_order(regime):
    # Token 0 asks all 40 experts (more than the kernel's 16 rows per pass), token 2 none: its
    # row must be zeros. Weights of very different sizes make the summation order visible.
    e, dim = 40, 16
    token_R = torch.cat([torch.zeros(e, dtype=torch.int64), torch.ones(3, dtype=torch.int64)])
    expert_R = torch.cat([torch.arange(e), torch.tensor([1, 5, 7])])
    weight_R = torch.logspace(-8, 8, e + 3, dtype=torch.float32)
    d = make_dispatch(token_R, expert_R, weight_R, 3, e, None)
    y = torch.randn(d.num_kept, dim)
    got = nb.combine(y, d)
    want = torch.zeros(3, dim, dtype=torch.float64)
    for n in range(d.num_kept):  # priority order, float32 sums: what the kernel promises
        want[d.token_N[n]] = (want[d.token_N[n]].float() + d.weight_N[n] * y[d.row_N[n]]).double()
    assert torch.equal(got, want.float())
    assert torch.count_nonzero(got[2]) == 0


@pytest.mark.parametrize("layout", ["compact", "padded"])
def test_gradients_match_torch_backend_in_float32(regime, layout):
    t, e, k, dim = 21, 6, 2, 24
    grads = {}
    for name, impl in (("native", nb), ("torch", tb)):
        d, weight_R = _plan(t, e, k, 4, seed=5, requires_grad=True)
        x = torch.randn(t, dim, generator=torch.Generator().manual_seed(1), requires_grad=True)
        buf = impl.permute(x, d, layout)
        out = impl.combine(buf * torch.linspace(0.5, 2.0, dim), d, layout)
        g = torch.randn(t, dim, generator=torch.Generator().manual_seed(2))
        grads[name] = torch.autograd.grad(out, (x, weight_R), g)
    for got, want in zip(grads["native"], grads["torch"], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    d, _ = _plan(t, e, k, 4, seed=5)
    assert not d.kept_R.all()  # drops: their gates get exactly zero gradient
    assert torch.count_nonzero(grads["native"][1][~d.kept_R]) == 0


@pytest.mark.parametrize("r, e, seed", [(0, 3, 0), (1, 1, 0), (1000, 7, 1), (4097, 64, 2), (300, 300, 3)])
def test_positions_equal_torch_positions_bit_for_bit(r, e, seed):
    gen = torch.Generator().manual_seed(seed)
    # Skewed ids (squares pile requests onto low experts), read through a strided view.
    expert_R = (torch.rand(2 * r, generator=gen).pow(2) * e).long().clamp(max=e - 1)[::2]
    rank, counts = nb.positions(expert_R, e)
    want_rank, want_counts = torch_positions(expert_R, e)
    assert torch.equal(rank, want_rank) and torch.equal(counts, want_counts)
    assert rank.dtype == counts.dtype == torch.int64


def test_the_dispatch_is_built_with_the_native_positions(monkeypatch):
    calls = []
    real = nb.positions
    counted = dataclasses.replace(nb.BACKEND, positions=lambda *a: calls.append(1) or real(*a))
    monkeypatch.setitem(layer.BACKENDS, "native", counted)
    token_R = torch.arange(6).repeat(2)
    expert_R = torch.tensor([0, 1, 1, 2, 0, 1, 2, 2, 0, 0, 1, 1])
    got = dispatch_for("native", token_R, expert_R, torch.ones(12), 6, 3, 2)
    want = make_dispatch(token_R, expert_R, torch.ones(12), 6, 3, 2)
    assert calls == [1]
    for field in ("rank_N", "token_N", "row_N", "slot_N", "kept_R", "counts_E", "requested_E"):
        assert torch.equal(getattr(got, field), getattr(want, field)), field


@pytest.mark.parametrize(
    "expert_R, e, match",
    [
        (torch.tensor([0, 3]), 3, r"expert_R values must lie in \[0, 3\) \(got 0..3\)"),
        (torch.tensor([-1, 0]), 3, r"expert_R values must lie in \[0, 3\)"),
        (torch.tensor([0, 1], dtype=torch.int32), 3, "expert_R must be int64"),
        (torch.tensor([0]), 0, "num_experts must be an integer"),
    ],
)
def test_positions_refuses_bad_ids_naming_them(expert_R, e, match):
    with pytest.raises(ValueError, match=match):
        nb.positions(expert_R, e)


def test_other_dtypes_copy_exactly_and_sum_through_torch():
    d, _ = _plan(12, 4, 2, None, seed=3)
    for dtype in (torch.bfloat16, torch.float16, torch.float64, torch.int32):
        x = (torch.randn(12, 10) * 100).to(dtype)
        assert torch.equal(nb.permute(x, d), tb.permute(x, d))
    y = torch.randn(d.num_kept, 10, dtype=torch.bfloat16)
    assert torch.equal(nb.combine(y, d), tb.combine(y, d))


def test_non_contiguous_inputs_and_an_empty_plan():
    d, _ = _plan(10, 4, 2, 3, seed=4)
    x = torch.randn(16, 10).t()[:, :16][:10]  # a strided view, [10, 16]
    assert torch.equal(nb.permute(x, d), tb.permute(x, d))
    none = torch.zeros(0, dtype=torch.int64)
    empty = make_dispatch(none, none, torch.ones(0), 5, 3, None)
    assert nb.permute(torch.randn(5, 4), empty).shape == (0, 4)
    assert torch.equal(nb.combine(torch.zeros(0, 4), empty), torch.zeros(5, 4))
    assert torch.equal(nb.permute(torch.randn(5, 4), empty, "padded"), torch.zeros(3, 1, 4))


def test_unavailable_says_why(monkeypatch, tmp_path):
    assert "CPU tensors only" in nb.runtime_error("cuda")
    monkeypatch.setenv("MOE_BENCH_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    nb._library.cache_clear()
    try:
        reason = nb.runtime_error("cpu")
        assert reason is not None and "no-such-cc" in reason
        d, _ = _plan(4, 2, 1, None, seed=0)
        with pytest.raises(ValueError, match="no-such-cc"):
            nb.permute(torch.randn(4, 3), d)
    finally:
        nb._library.cache_clear()
    monkeypatch.delenv("CC")
    assert nb.runtime_error("cpu") is None  # compiles into the fresh cache
    assert list(tmp_path.glob("native-*.so"))
