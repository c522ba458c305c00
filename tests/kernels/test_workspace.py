"""The workspace variants (``permute_into``, ``combine_into``) against the plain ops.

They write into buffers a step reuses, so the buffers hold whatever the last step left: every
case runs twice on one workspace whose buffers were first filled with NaN, and a second, smaller
batch follows a larger one (views of a longer flat buffer).
"""

from __future__ import annotations

import pytest
import torch

from moe_routing_bench.kernels import torch_backend
from moe_routing_bench.kernels.dispatch import LAYOUTS, make_dispatch
from moe_routing_bench.kernels.reference import random_plan
from moe_routing_bench.kernels.workspace import Workspace
from moe_routing_bench.routers.contract import capacity

# dtype -> (atol, rtol) of the workspace path against the plain one
TOLERANCES = {torch.float32: (1e-6, 1e-6), torch.float64: (1e-12, 1e-12), torch.bfloat16: (1e-2, 1e-2)}

# T, E, K, D, capacity factor (None: dropless), skew, empty experts
CASES = [
    pytest.param(12, 4, 2, 8, 1.25, 0.5, (), id="basic"),
    pytest.param(16, 4, 2, 8, 0.5, 1.0, (), id="drops"),  # tokens with no kept row get zeros
    pytest.param(11, 5, 2, 13, None, 0.7, (), id="dropless-D=13"),
    pytest.param(10, 6, 3, 8, 1.0, 0.0, (1, 4), id="empty-experts-K=3"),
    pytest.param(1, 4, 1, 8, 1.0, 0.0, (), id="T=1"),
]


def _dispatch(t, e, k, cf, skew, empty, seed):
    token_R, expert_R, weight_R = random_plan(t, e, k, seed=seed, skew=skew, empty=empty)
    cap = None if cf is None else capacity(cf, t, e, k)
    return make_dispatch(token_R, expert_R, weight_R, t, e, cap)


def _poisoned() -> Workspace:
    ws = Workspace()
    for name, dtype in [("permute", None), ("combine", torch.float32), ("gated", torch.float32)]:
        if dtype is not None:
            ws.take(name, (4096,), dtype, torch.device("cpu")).fill_(float("nan"))
    return ws


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("t, e, k, dim, cf, skew, empty", CASES)
def test_into_variants_match_the_plain_ops_over_stale_buffers(layout, dtype, t, e, k, dim, cf, skew, empty):
    ws = _poisoned()
    for seed in (0, 1):
        d = _dispatch(t, e, k, cf, skew, empty, seed)
        x_TD = torch.randn(t, dim, generator=torch.Generator().manual_seed(seed + 10)).to(dtype)
        # a stale NaN permute buffer of the right dtype, too
        ws.take("permute", (4096,), dtype, x_TD.device).fill_(float("nan"))
        y = torch_backend.permute_into(x_TD, d, layout, ws)
        y_plain = torch_backend.permute(x_TD, d, layout)
        assert torch.equal(y, y_plain), "permute_into moves the same rows, bit for bit"
        y = y * 1.5 - 0.25  # the experts' output, a different tensor from the permute buffer
        out = torch_backend.combine_into(y, d, layout, ws)
        ref = torch_backend.combine(y, d, layout)
        atol, rtol = TOLERANCES[dtype]
        assert out.dtype == dtype and out.shape == (t, dim)
        torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)


def test_a_smaller_batch_after_a_larger_one_reuses_the_buffers():
    ws = Workspace()
    big, small = _dispatch(64, 8, 2, None, 0.3, (), 0), _dispatch(5, 8, 2, 1.0, 0.9, (), 1)
    for d, t in [(big, 64), (small, 5)]:
        y = torch.randn(d.num_kept, 16, generator=torch.Generator().manual_seed(t))
        torch.testing.assert_close(torch_backend.combine_into(y, d, "compact", ws), torch_backend.combine(y, d))
    held = ws.nbytes
    torch_backend.combine_into(torch.randn(big.num_kept, 16), big, "compact", ws)
    assert ws.nbytes == held, "a batch no larger than before allocates nothing new"


def test_an_empty_batch_and_a_batch_with_nothing_kept():
    none = torch.zeros(0, dtype=torch.int64)
    for t in (0, 3):  # no tokens; three tokens, none routed
        d = make_dispatch(none, none, torch.ones(0), t, 4, None)
        out = torch_backend.combine_into(torch.empty(0, 8), d, "compact", _poisoned())
        assert out.shape == (t, 8) and torch.equal(out, torch.zeros(t, 8))


@pytest.mark.parametrize(
    "dtype, sparse", [(torch.float32, True), (torch.float64, True), (torch.bfloat16, False), (torch.float16, False)]
)
def test_combine_into_is_one_sparse_product_where_the_sum_needs_no_upcast(monkeypatch, dtype, sparse):
    calls = []
    real = torch_backend.gate_matrix
    monkeypatch.setattr(torch_backend, "gate_matrix", lambda *a: calls.append(a) or real(*a))
    d = _dispatch(12, 4, 2, 1.25, 0.5, (), 0)
    y = torch.randn(d.num_kept, 8).to(dtype)
    torch.testing.assert_close(
        torch_backend.combine_into(y, d, "compact", Workspace()), torch_backend.combine(y, d), atol=1e-2, rtol=1e-2
    )
    assert bool(calls) == sparse


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gate_matrix_holds_each_tokens_kept_rows_and_gates(layout):
    d = _dispatch(16, 4, 2, 0.5, 1.0, (), 3)
    g = torch_backend.gate_matrix(d, layout, torch.float64).to_dense()
    cols = d.row_N if layout == "compact" else d.slot_N
    want = torch.zeros_like(g)
    want[d.token_N, cols] = d.weight_N.double()
    assert torch.equal(g, want)
    assert g.shape[1] == (d.num_kept if layout == "compact" else d.num_experts * d.padded_capacity)
