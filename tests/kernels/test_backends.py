"""Dispatch backends against the plain reference: data movement exactly, arithmetic per dtype.

Every backend and layout runs the same plans as ``kernels.reference.plain_moe_forward``, a loop
over requests that shares no code with them, so a rule broken in ``make_dispatch``, a permute or
a combine shows up as a mismatch here rather than as two backends agreeing on the same mistake.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_routing_bench.kernels import einsum_backend, torch_backend
from moe_routing_bench.kernels.dispatch import analytic_buffer_bytes, make_dispatch
from moe_routing_bench.kernels.experts import FFN_KINDS, ExpertFFN, expert_flops, grouped_mm_works
from moe_routing_bench.kernels.layer import BACKENDS, STAGES, get_backend, moe_forward
from moe_routing_bench.kernels.positions import kept_mask, positions
from moe_routing_bench.kernels.reference import plain_moe_forward, plain_positions, random_plan
from moe_routing_bench.routers.contract import capacity


def capacity_for(cf: float | None, k: int, t: int, e: int) -> int | None:
    """The contract's capacity; None (dropless) when cf is None."""
    return None if cf is None else capacity(cf, t, e, k)


# (backend, layout) pairs every plan must run on; the native backend where a C compiler works.
_NATIVE_WHY = BACKENDS["native"].unavailable(torch.device("cpu"))
PAIRS = [("torch", "compact"), ("torch", "padded"), ("einsum", "padded")]
PAIRS += [] if _NATIVE_WHY else [("native", "compact"), ("native", "padded")]
PATHS = PAIRS + [
    pytest.param("native", layout, marks=pytest.mark.skip(reason=_NATIVE_WHY))
    for layout in ("compact", "padded")
    if _NATIVE_WHY
]
# (dtype, atol, rtol) against the float64 reference.
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-10, 1e-10), torch.bfloat16: (6e-2, 6e-2)}
SETTINGS = settings(max_examples=30, deadline=None)


# name, T, E, K, D, cf (None = dropless), skew, empty experts
EDGE_CASES = [
    # A plain mid-size case that keeps every rule busy at once.
    pytest.param(12, 4, 2, 8, 1.25, 0.5, (), id="basic"),
    # One token: capacity clamps to T = 1 and every expert holds at most one row.
    pytest.param(1, 4, 2, 8, 1.0, 0.0, (), id="T=1"),
    # Prime E: no stride or block size divides it.
    pytest.param(10, 7, 2, 8, 1.0, 0.3, (), id="E=7-prime"),
    # K = 1 (switch): one request per token, a dropped token gets zeros.
    pytest.param(9, 4, 1, 8, 1.0, 0.8, (), id="K=1"),
    # K = E: every token asks every expert, so all experts are equally loaded.
    pytest.param(6, 3, 3, 8, 1.0, 0.0, (), id="K=E"),
    # Capacity far below the load: most requests drop and priority order decides who stays.
    pytest.param(16, 4, 2, 8, 0.5, 1.0, (), id="drops"),
    # Experts with no tokens: empty groups in the compact loop, all-zero padded slabs.
    pytest.param(10, 6, 2, 8, 1.0, 0.0, (1, 4), id="empty-experts"),
    # Dropless: padded C becomes the largest load; nothing is dropped.
    pytest.param(11, 5, 2, 8, None, 0.7, (), id="dropless"),
    # D not a power of two (13, so F = 26 too) catches hard-coded block sizes and alignment.
    pytest.param(8, 4, 2, 13, 1.5, 0.2, (), id="D=13"),
    # Fewer tokens than experts: several experts stay empty by arithmetic, not by skew.
    pytest.param(3, 8, 1, 8, 2.0, 0.0, (), id="T<E"),
]


def _setup(t, e, k, dim, cf, skew, empty, dtype, seed=0):
    token_R, expert_R, weight_R = random_plan(t, e, k, seed=seed, skew=skew, empty=empty)
    cap = capacity_for(cf, k, t, e)
    ffn = ExpertFFN(e, dim, ffn_ratio=2.0, seed=seed + 1, dtype=dtype)
    x_TD = torch.randn(t, dim, generator=torch.Generator().manual_seed(seed + 2)).to(dtype)
    return token_R, expert_R, weight_R, cap, ffn, x_TD


# ---------------------------------------------------------------------------------------------
# positions: exact equality with the counter loop


@pytest.mark.parametrize(
    "expert_R, num_experts",
    [
        ([], 3),  # no requests at all
        ([0], 1),  # one request, one expert
        ([2, 2, 2, 2], 3),  # everything to one expert: ranks 0..R-1
        ([0, 1, 2, 0, 1, 2, 0], 3),  # round robin
        ([4, 0, 4, 4, 0], 5),  # unused experts between used ones
    ],
)
def test_positions_match_plain_on_edges(expert_R, num_experts):
    rank_R, counts_E = positions(torch.tensor(expert_R, dtype=torch.int64), num_experts)
    plain_rank, plain_counts = plain_positions(expert_R, num_experts)
    assert rank_R.tolist() == plain_rank
    assert counts_E.tolist() == plain_counts


@pytest.mark.parametrize("r, e, seed", [(1000, 7, 0), (513, 64, 1), (64, 1, 2)])
def test_positions_match_plain_random(r, e, seed):
    expert_R = torch.randint(0, e, (r,), generator=torch.Generator().manual_seed(seed))
    rank_R, counts_E = positions(expert_R, e)
    plain_rank, plain_counts = plain_positions(expert_R, e)
    assert rank_R.tolist() == plain_rank
    assert counts_E.tolist() == plain_counts


# ---------------------------------------------------------------------------------------------
# forward: every backend and layout against the plain reference


@pytest.mark.parametrize("backend, layout", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("t, e, k, dim, cf, skew, empty", EDGE_CASES)
def test_forward_matches_plain_reference(backend, layout, dtype, t, e, k, dim, cf, skew, empty):
    token_R, expert_R, weight_R, cap, ffn, x_TD = _setup(t, e, k, dim, cf, skew, empty, dtype)
    d = make_dispatch(token_R, expert_R, weight_R, t, e, cap)
    out_TD, stages = moe_forward(x_TD, d, ffn, backend=backend, layout=layout)
    ref_TD = plain_moe_forward(x_TD, token_R, expert_R, weight_R, cap, ffn)
    atol, rtol = TOLERANCES[dtype]
    assert out_TD.dtype == dtype and out_TD.shape == (t, dim)
    torch.testing.assert_close(out_TD, ref_TD, atol=atol, rtol=rtol)
    assert stages["combine"] is out_TD


@pytest.mark.parametrize("backend, layout", PATHS)
def test_forward_bf16_close_to_reference(backend, layout):
    # bf16 is the benchmark dtype: expert matmuls round, combine still sums in float32.
    token_R, expert_R, weight_R, cap, ffn, x_TD = _setup(16, 4, 2, 16, 1.0, 0.5, (), torch.bfloat16)
    d = make_dispatch(token_R, expert_R, weight_R, 16, 4, cap)
    out_TD, _ = moe_forward(x_TD, d, ffn, backend=backend, layout=layout)
    ref_TD = plain_moe_forward(x_TD, token_R, expert_R, weight_R, cap, ffn)
    atol, rtol = TOLERANCES[torch.bfloat16]
    assert out_TD.dtype == torch.bfloat16
    torch.testing.assert_close(out_TD.float(), ref_TD.float(), atol=atol, rtol=rtol)


def test_dropped_tokens_get_zeros_and_drops_follow_priority():
    # Four tokens all to expert 0 with C = 2: tokens 0 and 1 (earlier in priority) keep the slots.
    token_R = torch.tensor([0, 1, 2, 3])
    expert_R = torch.zeros(4, dtype=torch.int64)
    weight_R = torch.ones(4)
    d = make_dispatch(token_R, expert_R, weight_R, 4, 2, 2)
    assert d.token_N.tolist() == [0, 1]
    assert d.kept_R.tolist() == [True, True, False, False]
    assert d.counts_E.tolist() == [2, 0] and d.requested_E.tolist() == [4, 0]
    ffn = ExpertFFN(2, 4, seed=0)
    out_TD, _ = moe_forward(torch.randn(4, 4), d, ffn)
    assert torch.count_nonzero(out_TD[2:]) == 0 and torch.count_nonzero(out_TD[:2]) > 0


def test_dropless_padded_capacity_is_max_load():
    token_R = torch.tensor([0, 1, 2, 0, 1])
    expert_R = torch.tensor([2, 2, 2, 0, 1])
    d = make_dispatch(token_R, expert_R, torch.ones(5), 3, 4, None)
    assert d.capacity is None and d.padded_capacity == 3 and d.num_kept == 5
    empty = make_dispatch(
        torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), torch.ones(0), 2, 3, None
    )
    assert empty.padded_capacity == 1 and empty.num_kept == 0


# ---------------------------------------------------------------------------------------------
# backward: gradients through the backends equal gradients through the plain loop


@pytest.mark.parametrize("backend, layout", PATHS)
@pytest.mark.parametrize(
    "t, e, k, dim, cf, skew, empty",
    [
        # Drops: dropped requests must get exactly zero weight gradient.
        pytest.param(10, 4, 2, 6, 0.75, 0.8, (), id="drops"),
        # Dropless with an empty expert: no gradient for its weights, all others flow.
        pytest.param(7, 5, 2, 6, None, 0.3, (3,), id="dropless-empty"),
    ],
)
def test_gradients_match_plain_reference(backend, layout, t, e, k, dim, cf, skew, empty):
    token_R, expert_R, weight0_R, cap, ffn, x0_TD = _setup(t, e, k, dim, cf, skew, empty, torch.float64)
    grad_out_TD = torch.randn(t, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(9))

    def grads(run):
        ffn.zero_grad(set_to_none=True)
        x_TD = x0_TD.clone().requires_grad_(True)
        weight_R = weight0_R.clone().requires_grad_(True)
        (run(x_TD, weight_R) * grad_out_TD).sum().backward()
        params = [p.grad.clone() for p in (ffn.w_gate, ffn.w_up, ffn.w_down)]
        return [x_TD.grad, weight_R.grad, *params]

    def fast(x_TD, weight_R):
        d = make_dispatch(token_R, expert_R, weight_R, t, e, cap)
        return moe_forward(x_TD, d, ffn, backend=backend, layout=layout)[0]

    def plain(x_TD, weight_R):
        return plain_moe_forward(x_TD, token_R, expert_R, weight_R, cap, ffn)

    got, want = grads(fast), grads(plain)
    for name, g, w in zip(["x", "weight_R", "w_gate", "w_up", "w_down"], got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10, msg=lambda m, n=name: f"grad {n}: {m}")
    if cap is not None:
        d = make_dispatch(token_R, expert_R, weight0_R, t, e, cap)
        assert not d.kept_R.all(), "case must drop something"
        assert torch.count_nonzero(got[1][~d.kept_R]) == 0


# ---------------------------------------------------------------------------------------------
# properties of make_dispatch and the data movement, on random plans


@st.composite
def plans(draw):
    e = draw(st.integers(1, 7))
    t = draw(st.integers(1, 9))
    r = draw(st.integers(0, 30))
    expert_R = draw(st.lists(st.integers(0, e - 1), min_size=r, max_size=r))
    token_R = draw(st.lists(st.integers(0, t - 1), min_size=r, max_size=r))
    cap = draw(st.one_of(st.none(), st.integers(1, 6)))
    return (
        torch.tensor(token_R, dtype=torch.int64),
        torch.tensor(expert_R, dtype=torch.int64),
        t,
        e,
        cap,
    )


@SETTINGS
@given(plans())
def test_kept_ranks_are_a_prefix_and_respect_capacity(plan):
    token_R, expert_R, t, e, cap = plan
    weight_R = torch.rand(token_R.shape[0])
    d = make_dispatch(token_R, expert_R, weight_R, t, e, cap)
    plain_rank, plain_counts = plain_positions(expert_R, e)
    kept = [cap is None or rk < cap for rk in plain_rank]
    assert d.kept_R.tolist() == kept
    # Kept arrays are the kept requests, still in priority order.
    assert d.token_N.tolist() == [tk for tk, k in zip(token_R.tolist(), kept, strict=True) if k]
    assert torch.equal(d.weight_N, weight_R[d.kept_R])
    for x in range(e):
        ranks = sorted(d.rank_N[d.expert_N == x].tolist())
        assert ranks == list(range(len(ranks)))  # exactly 0..L_e-1
        assert len(ranks) == (plain_counts[x] if cap is None else min(plain_counts[x], cap))
        assert cap is None or len(ranks) <= cap
    assert d.counts_E.tolist() == torch.bincount(d.expert_N, minlength=e).tolist()
    assert d.requested_E.tolist() == plain_counts
    assert d.offsets_E.tolist() == [sum(d.counts_E.tolist()[:x]) for x in range(e)]
    # Compact rows: a permutation of 0..N-1, ordered by (expert, rank).
    n = d.num_kept
    assert sorted(d.row_N.tolist()) == list(range(n))
    by_row = sorted(zip(d.row_N.tolist(), d.expert_N.tolist(), d.rank_N.tolist(), strict=True))
    assert [(ex, rk) for _, ex, rk in by_row] == sorted((ex, rk) for _, ex, rk in by_row)
    assert cap is None or d.padded_capacity == cap


@SETTINGS
@given(plans())
def test_padded_buffer_holds_each_kept_assignment_once(plan):
    token_R, expert_R, t, e, cap = plan
    d = make_dispatch(token_R, expert_R, torch.ones(token_R.shape[0]), t, e, cap)
    # Row t is t + 1 everywhere, so a slot's value names the token it holds (0 = unused).
    x_TD = (torch.arange(t, dtype=torch.float32) + 1).unsqueeze(1).repeat(1, 3)
    for backend in ("torch", "einsum"):
        buf_ECD = get_backend(backend).permute(x_TD, d, "padded")
        assert buf_ECD.shape == (e, d.padded_capacity, 3)
        assert torch.equal(buf_ECD[d.expert_N, d.rank_N], x_TD[d.token_N])
        used = torch.zeros(e, d.padded_capacity, dtype=torch.bool)
        used[d.expert_N, d.rank_N] = True
        assert int(used.sum()) == d.num_kept  # no two kept requests share a slot
        assert torch.count_nonzero(buf_ECD[~used]) == 0  # unused slots are zero


@SETTINGS
@given(plans(), st.integers(0, 2**16))
def test_combine_of_permute_restores_kept_rows(plan, seed):
    token_R, expert_R, t, e, cap = plan
    gen = torch.Generator().manual_seed(seed)
    weight_R = torch.rand(token_R.shape[0], generator=gen)
    d = make_dispatch(token_R, expert_R, weight_R, t, e, cap)
    x_TD = torch.randn(t, 5, generator=gen, dtype=torch.float64)
    # With identity experts, out[t] = x[t] * (sum of t's kept gate weights).
    kept_weight_T = torch.zeros(t, dtype=torch.float64).index_add(0, d.token_N, d.weight_N.double())
    for backend, layout in PAIRS:
        impl = get_backend(backend)
        buf = impl.permute(x_TD, d, layout)
        rows_ND = buf.reshape(-1, 5)[d.row_N if layout == "compact" else d.slot_N]
        assert torch.equal(rows_ND, x_TD[d.token_N])
        out_TD = impl.combine(buf, d, layout)
        torch.testing.assert_close(out_TD, x_TD * kept_weight_T.unsqueeze(1), atol=1e-12, rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# buffers, experts, the layer's plumbing


def test_analytic_buffer_bytes_match_allocations():
    token_R, expert_R, weight_R = random_plan(12, 5, 2, seed=3, skew=0.5)
    d = make_dispatch(token_R, expert_R, weight_R, 12, 5, 4)
    x_TD = torch.randn(12, 6, dtype=torch.bfloat16)
    compact = torch_backend.permute(x_TD, d, "compact")
    padded = torch_backend.permute(x_TD, d, "padded")
    mask = einsum_backend.dispatch_mask(d, x_TD.dtype)
    assert analytic_buffer_bytes(d, 6, torch.bfloat16, "compact") == compact.nbytes == d.num_kept * 6 * 2
    assert analytic_buffer_bytes(d, 6, torch.bfloat16, "padded") == padded.nbytes == 5 * 4 * 6 * 2
    assert analytic_buffer_bytes(d, 6, torch.bfloat16, "einsum") == mask.nbytes + padded.nbytes
    with pytest.raises(ValueError, match="layout"):
        analytic_buffer_bytes(d, 6, torch.bfloat16, "dense")


def test_expert_ffn_shapes_seed_and_layout_agreement():
    ffn = ExpertFFN(3, 10, ffn_ratio=2.5, seed=7)
    assert ffn.ffn == 25
    assert ffn.w_gate.shape == (3, 10, 25) and ffn.w_up.shape == (3, 10, 25) and ffn.w_down.shape == (3, 25, 10)
    assert torch.equal(ExpertFFN(3, 10, ffn_ratio=2.5, seed=7).w_down, ffn.w_down)
    assert not torch.equal(ExpertFFN(3, 10, ffn_ratio=2.5, seed=8).w_down, ffn.w_down)
    # The same rows through the compact loop and the padded bmm give the same outputs.
    x_ECD = torch.randn(3, 4, 10)
    x_ECD[1] = 0  # an all-padding expert must output zeros
    counts_E = torch.tensor([4, 0, 4])
    y_ND = ffn.forward_compact(torch.cat([x_ECD[0], x_ECD[2]]), counts_E)
    y_ECD = ffn.forward_padded(x_ECD)
    torch.testing.assert_close(y_ND, torch.cat([y_ECD[0], y_ECD[2]]), atol=1e-6, rtol=1e-6)
    assert torch.count_nonzero(y_ECD[1]) == 0
    assert expert_flops(5, 10, 25) == 2 * 3 * 5 * 10 * 25


def test_expert_ffn_no_rows_stays_in_graph():
    ffn = ExpertFFN(2, 4)
    y_ND = ffn.forward_compact(torch.zeros(0, 4, requires_grad=True), torch.zeros(2, dtype=torch.int64))
    assert y_ND.shape == (0, 4) and y_ND.requires_grad


def test_stage_hook_wraps_each_stage_in_order():
    token_R, expert_R, weight_R = random_plan(6, 3, 2, seed=0)
    d = make_dispatch(token_R, expert_R, weight_R, 6, 3, 4)
    seen = []

    @contextmanager
    def hook(stage):
        seen.append(("enter", stage))
        yield
        seen.append(("exit", stage))

    moe_forward(torch.randn(6, 4), d, ExpertFFN(3, 4), backend="einsum", stage_hook=hook)
    assert seen == [(edge, s) for s in STAGES for edge in ("enter", "exit")]


def test_default_layout_is_backend_preferred():
    token_R, expert_R, weight_R = random_plan(6, 3, 2, seed=0)
    d = make_dispatch(token_R, expert_R, weight_R, 6, 3, 4)
    ffn = ExpertFFN(3, 4)
    _, torch_stages = moe_forward(torch.randn(6, 4), d, ffn, backend="torch")
    _, einsum_stages = moe_forward(torch.randn(6, 4), d, ffn, backend="einsum")
    assert torch_stages["dispatch"].shape == (d.num_kept, 4)
    assert einsum_stages["dispatch"].shape == (3, 4, 4)


# ---------------------------------------------------------------------------------------------
# validation: every error names what is wrong


def _good():
    return {
        "token_R": torch.tensor([0, 1, 2]),
        "expert_R": torch.tensor([1, 0, 1]),
        "weight_R": torch.ones(3),
        "num_tokens": 3,
        "num_experts": 2,
        "capacity": 2,
    }


@pytest.mark.parametrize(
    "change, match",
    [
        ({"token_R": torch.tensor([0.0, 1.0, 2.0])}, "token_R must be int64"),
        ({"token_R": torch.zeros(3, 1, dtype=torch.int64)}, "token_R must be a 1-D"),
        ({"expert_R": torch.tensor([1, 0, 1], dtype=torch.int32)}, "expert_R must be int64"),
        ({"weight_R": torch.ones(3, dtype=torch.int64)}, "weight_R must be a floating-point"),
        ({"weight_R": torch.ones(2)}, "equal lengths"),
        ({"token_R": torch.tensor([0, 1, 3])}, r"token_R values must lie in \[0, 3\)"),
        ({"token_R": torch.tensor([-1, 1, 2])}, "token_R values"),
        ({"expert_R": torch.tensor([1, 2, 1])}, r"expert_R values must lie in \[0, 2\)"),
        ({"num_tokens": -1}, "num_tokens"),
        ({"num_experts": 0}, "num_experts"),
        ({"capacity": 0}, "capacity must be None"),
        ({"capacity": 1.5}, "capacity"),
        ({"capacity": True}, "capacity"),
    ],
)
def test_make_dispatch_validation_names_the_argument(change, match):
    with pytest.raises(ValueError, match=match):
        make_dispatch(**{**_good(), **change})


def test_backend_and_layer_validation():
    d = make_dispatch(**_good())
    ffn = ExpertFFN(2, 4)
    x_TD = torch.randn(3, 4)
    with pytest.raises(ValueError, match="'torch', 'einsum'"):
        get_backend("nccl")
    assert {"torch", "einsum"} <= set(BACKENDS)
    with pytest.raises(ValueError, match="einsum supports only 'padded'"):
        einsum_backend.permute(x_TD, d, "compact")
    with pytest.raises(ValueError, match="layout"):
        moe_forward(x_TD, d, ffn, backend="einsum", layout="compact")
    with pytest.raises(ValueError, match="layout"):
        torch_backend.permute(x_TD, d, "sparse")
    with pytest.raises(ValueError, match="x_TD"):
        moe_forward(torch.randn(4, 4), d, ffn)
    with pytest.raises(ValueError, match="x_TD dtype"):
        moe_forward(x_TD.double(), d, ffn)
    with pytest.raises(ValueError, match="experts"):
        moe_forward(x_TD, d, ExpertFFN(3, 4))
    with pytest.raises(ValueError, match="y must be"):
        torch_backend.combine(torch.randn(5, 4), d, "compact")
    with pytest.raises(ValueError, match="hidden"):
        ExpertFFN(2, 0)


# ---------------------------------------------------------------------------------------------
# expert compute: every FFN kind and every path, values and gradients against the plain loop

EXPERT_PATHS = ["split"] + (["grouped"] if grouped_mm_works("cpu", torch.float32) else [])


@pytest.mark.parametrize("kind", FFN_KINDS)
@pytest.mark.parametrize("path", EXPERT_PATHS)
@pytest.mark.parametrize("backend, layout", PATHS)
def test_expert_kinds_and_paths_match_plain_reference(kind, path, backend, layout):
    # Drops and an empty expert in one plan; float32 so the grouped kernel runs where it can.
    t, e, k, dim = 9, 5, 2, 8
    token_R, expert_R, weight0_R = random_plan(t, e, k, seed=4, skew=0.6, empty=(2,))
    cap = capacity_for(1.0, k, t, e)
    ffn = ExpertFFN(e, dim, ffn=16, kind=kind, seed=3, path=path)
    x0 = torch.randn(t, dim, generator=torch.Generator().manual_seed(5))
    g_out = torch.randn(t, dim, generator=torch.Generator().manual_seed(6))
    params = [p for p in (ffn.w_gate, ffn.w_up, ffn.w_down) if p is not None]

    def grads(run):
        ffn.zero_grad(set_to_none=True)
        x, w = x0.clone().requires_grad_(True), weight0_R.clone().requires_grad_(True)
        out = run(x, w)
        (out * g_out).sum().backward()
        return [out.detach(), x.grad, w.grad, *(p.grad.clone() for p in params)]

    def fast(x, w):
        return moe_forward(x, make_dispatch(token_R, expert_R, w, t, e, cap), ffn, backend=backend, layout=layout)[0]

    got = grads(fast)
    want = grads(lambda x, w: plain_moe_forward(x, token_R, expert_R, w, cap, ffn))
    if layout == "compact":
        assert ffn.last_path == path
    for name, g, w in zip(["out", "x", "weight_R", *("w" * len(params))], got, want, strict=True):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=2e-5, msg=lambda m, n=name: f"{kind}/{path}: {n}: {m}")


@pytest.mark.parametrize("path", EXPERT_PATHS)
def test_backward_reaches_each_stacked_weight_through_one_node(path):
    # Indexing one stacked weight per expert (w[e]) puts E SelectBackward nodes on each weight, and
    # each writes a zero-filled copy of the whole [E, D, F] weight in backward: O(E^2 D F). The
    # grouped and split paths reach each weight through one node (a grouped matmul, or one unbind).
    e = 6
    ffn = ExpertFFN(e, 8, ffn=8, seed=0, path=path)
    counts = torch.tensor([2, 0, 3, 1, 1, 2])
    y = ffn.forward_compact(torch.randn(9, 8, requires_grad=True), counts)
    for w in (ffn.w_gate, ffn.w_up, ffn.w_down):
        users = _nodes_reaching(y.grad_fn, w)
        assert len(users) == 1, f"{path}: {len(users)} backward nodes reach one weight: {sorted(users)}"


def _nodes_reaching(root, param) -> set[str]:
    """Names of the backward nodes with an edge to ``param``'s gradient accumulator."""
    seen, found, stack = set(), set(), [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for nxt, _ in node.next_functions:
            if nxt is not None and getattr(nxt, "variable", None) is param:
                found.add(f"{type(node).__name__}@{id(node)}")
            stack.append(nxt)
    return found


def test_the_grouped_probe_answers_the_same_in_any_grad_mode(monkeypatch):
    # The probe runs a backward: asked first inside no_grad or inference_mode (a forward-only
    # sweep point, routing alone), it must not cache "does not run" for the whole process.
    from moe_routing_bench.kernels import experts

    monkeypatch.setattr(experts, "_PROBED", {})
    free = experts.grouped_mm_works("cpu", torch.float32)
    for mode in (torch.no_grad, torch.inference_mode):
        monkeypatch.setattr(experts, "_PROBED", {})
        with mode():
            assert experts.grouped_mm_works("cpu", torch.float32) == free


@pytest.mark.parametrize(
    ("expert_R", "num_experts", "match"),
    [
        ([0, 1], 2, "expert_R must be a 1-D tensor"),  # a list, not a tensor
        (torch.zeros(2, 2, dtype=torch.int64), 2, "expert_R must be a 1-D tensor"),
        (torch.tensor([0, 1], dtype=torch.int32), 2, "expert_R must be int64"),
        (torch.tensor([0, 1]), 0, r"num_experts must be an integer in \[1, 2\*\*31\)"),
        (torch.tensor([0, 1]), 2**31, r"num_experts must be an integer in \[1, 2\*\*31\)"),
        (torch.tensor([0, 1]), 2**32, r"num_experts must be an integer in \[1, 2\*\*31\)"),
        (torch.tensor([0, 1]), True, "num_experts must be an integer"),
        (torch.tensor([0, 2]), 2, r"expert_R values must lie in \[0, 2\) \(got 0..2\)"),
        (torch.tensor([-1, 1]), 2, r"expert_R values must lie in \[0, 2\) \(got -1..1\)"),
    ],
)
def test_positions_refuses_a_broken_request_list_naming_it(expert_R, num_experts, match):
    with pytest.raises(ValueError, match=match):
        positions(expert_R, num_experts)


def test_positions_ranks_on_hand_examples():
    # Ranks count earlier requests to the same expert, in list order; counts are the loads.
    rank, counts = positions(torch.tensor([2, 0, 2, 2, 1, 0]), 4)
    assert rank.tolist() == [0, 0, 1, 2, 0, 1] and counts.tolist() == [2, 1, 3, 0]
    rank, counts = positions(torch.tensor([], dtype=torch.int64), 3)
    assert rank.tolist() == [] and counts.tolist() == [0, 0, 0]
    assert kept_mask(torch.tensor([0, 3, 1, 2]), 2).tolist() == [True, False, True, False]
    assert kept_mask(torch.tensor([0, 3]), None).tolist() == [True, True]


def test_positions_refuses_ids_past_the_end_and_scalars_and_accepts_large_e():
    from moe_routing_bench.kernels.positions import check_expert_R

    with pytest.raises(ValueError, match=r"expert_R values must lie in \[0, 2\) \(got 0..5\)"):
        positions(torch.tensor([0, 5]), 2)  # far past the end, not only the first id past it
    with pytest.raises(ValueError, match="expert_R must be a 1-D tensor"):
        positions(torch.tensor(3), 4)  # a 0-d tensor
    check_expert_R(torch.tensor([0, 1]), 2**30)  # any E below 2**31 (int32 sort keys) is allowed
    check_expert_R(torch.tensor([0, 1]), 2**31 - 1)


@pytest.mark.parametrize(
    ("token_R", "expert_R", "match"),
    [
        ([0, 4], [0, 1], r"token_R values must lie in \[0, 4\) \(got 0..4\)"),
        ([-1, 1], [0, 1], r"token_R values must lie in \[0, 4\) \(got -1..1\)"),
        ([0, 1], [0, 3], r"expert_R values must lie in \[0, 3\) \(got 0..3\)"),
        ([0, 1], [-2, 1], r"expert_R values must lie in \[0, 3\) \(got -2..1\)"),
    ],
)
def test_make_dispatch_refuses_ids_out_of_range_on_either_side(token_R, expert_R, match):
    from moe_routing_bench.kernels.dispatch import make_dispatch

    with pytest.raises(ValueError, match=match):
        make_dispatch(torch.tensor(token_R), torch.tensor(expert_R), torch.ones(2), 4, 3, None)


def test_make_dispatch_array_lengths_an_empty_batch_and_buffer_bytes_edges():
    from moe_routing_bench.kernels.dispatch import analytic_buffer_bytes, make_dispatch

    with pytest.raises(ValueError, match="must have equal lengths"):
        make_dispatch(torch.tensor([0, 1]), torch.tensor([0, 1, 1]), torch.ones(2), 4, 3, None)  # longer
    empty = torch.tensor([], dtype=torch.int64)
    d = make_dispatch(empty, empty, torch.tensor([]), 0, 3, None)  # T = 0: an empty batch is allowed
    assert d.num_kept == 0
    d = make_dispatch(torch.tensor([0, 1]), torch.tensor([2, 2]), torch.ones(2), 2, 3, None)
    assert analytic_buffer_bytes(d, 1, torch.float32, "compact") == 2 * 1 * 4  # D = 1 is a size
    with pytest.raises(ValueError, match=r"hidden must be an integer >= 1 \(got 0\)"):
        analytic_buffer_bytes(d, 0, torch.float32, "compact")


def _never_positions(expert_R, num_experts):
    raise AssertionError("make_dispatch must refuse a broken plan before a positions kernel sees it")


@pytest.mark.parametrize(
    ("token_R", "expert_R", "weight_R", "match"),
    [
        # ids out of range, each side alone (a kernel's positions need not check: make_dispatch must)
        ([0, 5], [0, 1], [1.0, 1.0], r"token_R values must lie in \[0, 4\) \(got 0..5\)"),
        ([-1, 1], [0, 1], [1.0, 1.0], r"token_R values must lie in \[0, 4\) \(got -1..1\)"),
        ([0, 1], [-1, 1], [1.0, 1.0], r"expert_R values must lie in \[0, 3\) \(got -1..1\)"),
        ([0, 1], [0, 5], [1.0, 1.0], r"expert_R values must lie in \[0, 3\) \(got 0..5\)"),
        ([0, 1], [0, 3], [1.0, 1.0], r"expert_R values must lie in \[0, 3\) \(got 0..3\)"),
        # lengths: either other array longer or shorter than token_R
        ([0, 1], [0], [1.0, 1.0], r"equal lengths \(got 2, 1, 2\)"),
        ([0, 1], [0, 1, 2], [1.0, 1.0], r"equal lengths \(got 2, 3, 2\)"),
        ([0, 1], [0, 1], [1.0], r"equal lengths \(got 2, 2, 1\)"),
        ([0, 1], [0, 1], [1.0, 1.0, 1.0], r"equal lengths \(got 2, 2, 3\)"),
        # a 0-d tensor is not 1-D
        (3, [0], [1.0], r"token_R must be a 1-D tensor \[R\]"),
    ],
)
def test_make_dispatch_refuses_a_broken_plan_before_positions(token_R, expert_R, weight_R, match):
    with pytest.raises(ValueError, match=match):
        make_dispatch(torch.tensor(token_R), torch.tensor(expert_R), torch.tensor(weight_R), 4, 3, None,
                      positions_fn=_never_positions)  # fmt: skip


@pytest.mark.parametrize("which", ["expert_R", "weight_R"])
def test_make_dispatch_refuses_arrays_on_two_devices(which):
    arrays = {"token_R": torch.tensor([0, 1]), "expert_R": torch.tensor([0, 1]), "weight_R": torch.ones(2)}
    arrays[which] = arrays[which].to("meta")
    with pytest.raises(ValueError, match="must be on one device"):
        make_dispatch(**arrays, num_tokens=4, num_experts=3, capacity=None, positions_fn=_never_positions)


def test_a_dispatch_is_frozen_and_hashed_by_identity():
    import dataclasses

    d = make_dispatch(torch.tensor([0, 1]), torch.tensor([0, 1]), torch.ones(2), 2, 2, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.capacity = 3  # type: ignore[misc]
    twin = make_dispatch(torch.tensor([0, 1]), torch.tensor([0, 1]), torch.ones(2), 2, 2, None)
    assert d != twin and len({d, twin}) == 2, "compared by identity: tensors have no truth value to compare"
