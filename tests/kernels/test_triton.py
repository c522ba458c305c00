"""The Triton dispatch kernels on CPU, in triton's interpreter, against the torch reference.

Data movement (positions, permute) must equal the torch backend exactly; combine, whose sums run
in float32, matches within a per-dtype tolerance and is bitwise deterministic; gradients through
``moe_forward(backend="triton")`` equal the plain loop reference's. Shapes are small and tiles are
forced small where a test needs to cross tile edges: the interpreter runs programs one by one.

TRITON_INTERPRET=1 must be set before kernels.triton_* is imported (triton decides at decoration
time): tests/conftest.py sets it for every run that does not select `gpu` tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from moe_routing_bench.kernels import torch_backend, triton_backend
from moe_routing_bench.kernels.dispatch import make_dispatch
from moe_routing_bench.kernels.experts import ExpertFFN
from moe_routing_bench.kernels.layer import available_backends, moe_forward, resolve_backend
from moe_routing_bench.kernels.positions import positions
from moe_routing_bench.kernels.reference import plain_moe_forward, random_plan
from moe_routing_bench.kernels.triton_common import interpret_requested
from moe_routing_bench.routers.contract import capacity

if not interpret_requested():
    pytest.skip("needs TRITON_INTERPRET=1 (tests/conftest.py sets it on the CPU tier)", allow_module_level=True)

from moe_routing_bench.kernels import triton_permute, triton_positions

if not triton_permute.INTERPRETED:
    pytest.skip(
        "kernels/triton_*.py were imported compiled before TRITON_INTERPRET=1 was set; run this file alone",
        allow_module_level=True,
    )


def capacity_for(cf: float | None, k: int, t: int, e: int) -> int | None:
    """The contract's capacity; None (dropless) when cf is None."""
    return None if cf is None else capacity(cf, t, e, k)


ROOT = Path(__file__).resolve().parents[2]
LAYOUTS = ("compact", "padded")
# (dtype, atol, rtol) for combine against the torch backend. float32/float64: summation order
# only. bf16/fp16: one unit in the last place of the output, because the interpreter rounds
# float32 -> bf16 by truncation where a GPU and torch round to nearest even.
TOLERANCES = [
    (torch.float32, 1e-6, 1e-6),
    (torch.float64, 1e-12, 1e-12),
    (torch.bfloat16, 1e-2, 1.6e-2),
    (torch.float16, 1e-3, 2e-3),
]
ROW_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SETTINGS = settings(max_examples=40, deadline=None)


# ---------------------------------------------------------------------------------------------
# positions: exactly kernels.positions.positions


@pytest.mark.parametrize(
    "r, e, tiles",
    [
        (0, 3, None),  # no requests: counts and offsets are zero, nothing launched but the scan
        (1, 1, None),  # one request, one expert
        (5, 4, (8, 2)),  # R below one sub-block: padding lanes must match nothing
        (100, 7, (8, 3)),  # prime E; chunks of 24 cross sub-block and chunk edges
        (1000, 300, (16, 4)),  # E not a power of two and E > SUB: ranks need the running counts
        (2000, 1, (64, 2)),  # one expert: ranks are 0..R-1 across many chunks
        (3000, 5000, (32, 1)),  # E > MAX_RUNNING_E: the one-sub-block kernel, hist by scatter
        (4000, 64, None),  # default tiles
    ],
)
def test_positions_equal_torch_reference(r, e, tiles):
    expert_R = torch.randint(0, e, (r,), generator=torch.Generator().manual_seed(r + e))
    rank_R, counts_E, offsets_E = triton_positions.expert_positions(expert_R, e, tiles=tiles)
    want_rank, want_counts = positions(expert_R, e)
    assert torch.equal(rank_R, want_rank)
    assert torch.equal(counts_E, want_counts)
    assert torch.equal(offsets_E, torch.cumsum(want_counts, 0) - want_counts)
    assert triton_positions.positions(expert_R, e, tiles=tiles)[0].dtype == torch.int64


def test_positions_skewed_and_sorted_inputs():
    # Everything to a few experts, and an already sorted stream: the worst cases for a scan.
    gen = torch.Generator().manual_seed(0)
    skewed = torch.where(torch.rand(700, generator=gen) < 0.9, 3, torch.randint(0, 9, (700,), generator=gen))
    for expert_R in (skewed, torch.sort(skewed).values, torch.full((300,), 8)):
        rank_R, counts_E = triton_positions.positions(expert_R, 9, tiles=(16, 3))
        want = positions(expert_R, 9)
        assert torch.equal(rank_R, want[0]) and torch.equal(counts_E, want[1])


# ---------------------------------------------------------------------------------------------
# permute and combine against the torch backend

# T, E, K, D, cf (None = dropless), skew, empty experts
EDGE_CASES = [
    # T = 1: capacity clamps to 1, one row per expert at most.
    pytest.param(1, 4, 2, 8, 1.0, 0.0, (), id="T=1"),
    # T below one tile (the interpreter's tile is 64 rows): a partial tile with masked lanes.
    pytest.param(5, 3, 1, 8, 1.0, 0.5, (), id="T<block"),
    # Prime E: no block size divides it.
    pytest.param(13, 7, 2, 16, 1.0, 0.3, (), id="E=7-prime"),
    # K = E: every token asks every expert; CSR lists of length E.
    pytest.param(6, 3, 3, 8, 1.0, 0.0, (), id="K=E"),
    # An expert with no tokens: an all-zero padded slab, an empty compact group.
    pytest.param(10, 6, 2, 8, 1.0, 0.0, (1, 4), id="empty-expert"),
    # Capacity that drops: tokens with fewer (or no) kept rows; the latter combine to zero.
    pytest.param(16, 4, 2, 8, 0.5, 1.0, (), id="drops"),
    # D not a power of two: masked columns in every tile.
    pytest.param(9, 4, 2, 13, 1.5, 0.2, (), id="D=13"),
    # Dropless: every request kept, padded C is the largest load.
    pytest.param(11, 5, 2, 8, None, 0.7, (), id="dropless"),
    # More tokens than one interpreter tile (64): several programs along T.
    pytest.param(70, 5, 2, 8, 1.25, 0.2, (), id="T>block"),
]


def _dispatch(t, e, k, cf, skew, empty, seed=0, weight_dtype=torch.float32):
    token_R, expert_R, weight_R = random_plan(t, e, k, seed=seed, skew=skew, empty=empty)
    return make_dispatch(token_R, expert_R, weight_R.to(weight_dtype), t, e, capacity_for(cf, k, t, e))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("t, e, k, dim, cf, skew, empty", EDGE_CASES)
def test_permute_is_exactly_torch_permute(t, e, k, dim, cf, skew, empty, layout):
    d = _dispatch(t, e, k, cf, skew, empty)
    for dtype in ROW_DTYPES:
        x_TD = torch.randn(t, dim, generator=torch.Generator().manual_seed(1)).to(dtype)
        got = triton_backend.permute(x_TD, d, layout)
        want = torch_backend.permute(x_TD, d, layout)
        assert got.dtype == dtype and got.shape == want.shape
        assert torch.equal(got, want), f"{dtype} {layout}"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("t, e, k, dim, cf, skew, empty", EDGE_CASES)
def test_combine_matches_torch_combine(t, e, k, dim, cf, skew, empty, layout):
    d = _dispatch(t, e, k, cf, skew, empty)
    rows = d.num_kept if layout == "compact" else d.num_experts * d.padded_capacity
    for dtype, atol, rtol in TOLERANCES:
        y = torch.randn(rows, dim, generator=torch.Generator().manual_seed(2)).to(dtype)
        y = y if layout == "compact" else y.view(d.num_experts, d.padded_capacity, dim)
        got = triton_backend.combine(y, d, layout)
        want = torch_backend.combine(y, d, layout)
        assert got.dtype == dtype and got.shape == (t, dim)
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=lambda m, dt=dtype: f"{dt}: {m}")
    if cf is not None and not d.kept_R.all():
        dropped = torch.ones(t, dtype=torch.bool)
        dropped[d.token_N] = False
        assert torch.count_nonzero(got[dropped]) == 0  # tokens with no kept row get zeros


def test_combine_is_bitwise_deterministic():
    # Many rows per token in one float32 sum: any run-to-run change of order would show.
    d = _dispatch(40, 8, 8, None, 0.0, ())
    y = torch.randn(d.num_kept, 24, generator=torch.Generator().manual_seed(3))
    w = d.weight_N.detach().clone().requires_grad_(True)
    outs, grads = [], []
    for _ in range(2):
        d2 = make_dispatch(d.token_N, d.expert_N, w, 40, 8, None)
        yy = y.clone().requires_grad_(True)
        out = triton_backend.combine(yy, d2, "compact")
        gy, gw = torch.autograd.grad(out, [yy, w], torch.ones_like(out))
        outs.append(out.detach())
        grads.append((gy, gw))
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_launchers_cross_tile_edges():
    # Tiles forced far below the shapes, so every kernel runs many programs and loop trips.
    gen = torch.Generator().manual_seed(4)
    src = torch.randn(37, 19, generator=gen)
    index = torch.randint(-1, 37, (53,), generator=gen)
    got = triton_permute.gather_rows(src, index, block=(4, 8))
    assert torch.equal(got, torch.where((index >= 0)[:, None], src[index.clamp(min=0)], 0.0))
    d = _dispatch(29, 5, 3, None, 0.4, ())
    y = torch.randn(d.num_kept, 19, generator=gen)
    p = triton_backend.prepare(d, "compact")
    got = triton_permute.segment_sum(y, p.csr_ptr_T1, p.csr_row_N, d.weight_N, p.csr_n_N, block=(4, 8))
    torch.testing.assert_close(got, torch_backend.combine(y, d, "compact"), atol=1e-6, rtol=1e-6)
    grad = torch.randn(29, 19, generator=gen)
    gy, gw = triton_permute.combine_backward(grad, y, p.token_M, p.n_M, d.weight_N, block=(4, 8))
    torch.testing.assert_close(gy, grad[d.token_by_row_N] * d.weight_N[p.n_M][:, None])
    torch.testing.assert_close(gw, (grad[d.token_N] * y[d.row_N]).sum(1))


# ---------------------------------------------------------------------------------------------
# gradients: through moe_forward against the plain reference


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "t, e, k, dim, cf, skew, empty",
    [
        # Drops: dropped requests get exactly zero gate gradient.
        pytest.param(10, 4, 2, 6, 0.75, 0.8, (), id="drops"),
        # Dropless with an empty expert.
        pytest.param(7, 5, 2, 6, None, 0.3, (3,), id="dropless-empty"),
    ],
)
def test_gradients_match_plain_reference(t, e, k, dim, cf, skew, empty, layout):
    token_R, expert_R, weight0_R = random_plan(t, e, k, seed=0, skew=skew, empty=empty)
    weight0_R = weight0_R.double()
    cap = capacity_for(cf, k, t, e)
    ffn = ExpertFFN(e, dim, seed=1, dtype=torch.float64)
    x0_TD = torch.randn(t, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    grad_out = torch.randn(t, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(9))

    def grads(run):
        ffn.zero_grad(set_to_none=True)
        x_TD = x0_TD.clone().requires_grad_(True)
        weight_R = weight0_R.clone().requires_grad_(True)
        (run(x_TD, weight_R) * grad_out).sum().backward()
        return [x_TD.grad, weight_R.grad, *(p.grad.clone() for p in (ffn.w_gate, ffn.w_up, ffn.w_down))]

    def fast(x_TD, weight_R):
        d = make_dispatch(token_R, expert_R, weight_R, t, e, cap)
        return moe_forward(x_TD, d, ffn, backend="triton", layout=layout)[0]

    got = grads(fast)
    want = grads(lambda x_TD, weight_R: plain_moe_forward(x_TD, token_R, expert_R, weight_R, cap, ffn))
    for name, g, w in zip(["x", "weight_R", "w_gate", "w_up", "w_down"], got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES[:3])
def test_low_precision_gradients_match_torch_backend(layout, dtype, atol, rtol):
    d0 = _dispatch(12, 5, 2, 1.0, 0.5, ())
    x0 = torch.randn(12, 10, generator=torch.Generator().manual_seed(5)).to(dtype)
    scale = torch.randn(10, generator=torch.Generator().manual_seed(6)).to(dtype)

    def run(backend):
        x = x0.clone().requires_grad_(True)
        w = d0.weight_N.detach().clone().requires_grad_(True)
        d = make_dispatch(d0.token_N, d0.expert_N, w, 12, 5, d0.capacity)
        impl = triton_backend if backend == "triton" else torch_backend
        out = impl.combine(impl.permute(x, d, layout) * scale, d, layout)  # a stand-in expert
        return torch.autograd.grad(out, [x, w], torch.ones_like(out))

    for g, w in zip(run("triton"), run("torch"), strict=True):
        torch.testing.assert_close(g.float(), w.float(), atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------------------------
# properties on random plans


@st.composite
def plans(draw):
    e = draw(st.integers(1, 7))
    t = draw(st.integers(1, 9))
    r = draw(st.integers(0, 24))
    expert_R = draw(st.lists(st.integers(0, e - 1), min_size=r, max_size=r))
    token_R = draw(st.lists(st.integers(0, t - 1), min_size=r, max_size=r))
    cap = draw(st.one_of(st.none(), st.integers(1, 5)))
    return torch.tensor(token_R, dtype=torch.int64), torch.tensor(expert_R, dtype=torch.int64), t, e, cap


@SETTINGS
@given(plans(), st.integers(0, 2**16))
def test_unpermute_after_permute_restores_every_kept_row(plan, seed):
    token_R, expert_R, t, e, cap = plan
    gen = torch.Generator().manual_seed(seed)
    d = make_dispatch(token_R, expert_R, torch.rand(token_R.shape[0], generator=gen), t, e, cap)
    x_TD = torch.randn(t, 5, generator=gen, dtype=torch.float64)
    kept_weight_T = torch.zeros(t, dtype=torch.float64).index_add(0, d.token_N, d.weight_N.double())
    for layout in LAYOUTS:
        buf = triton_backend.permute(x_TD, d, layout)
        rows = buf.reshape(-1, 5)[d.row_N if layout == "compact" else d.slot_N]
        assert torch.equal(rows, x_TD[d.token_N])
        # With identity experts, combine gives x[t] times the sum of t's kept gates.
        out = triton_backend.combine(buf, d, layout)
        torch.testing.assert_close(out, x_TD * kept_weight_T[:, None], atol=1e-12, rtol=1e-12)


@SETTINGS
@given(plans())
def test_each_kept_assignment_once_and_no_expert_over_capacity(plan):
    token_R, expert_R, t, e, cap = plan
    d = make_dispatch(token_R, expert_R, torch.ones(token_R.shape[0]), t, e, cap)
    rank_R, counts_E = triton_positions.positions(expert_R, e, tiles=(4, 2))
    assert torch.equal(rank_R, positions(expert_R, e)[0]) and torch.equal(counts_E, d.requested_E)
    kept_R = rank_R < cap if cap is not None else torch.ones_like(rank_R, dtype=torch.bool)
    assert torch.equal(kept_R, d.kept_R)
    # Row r + 1 (and column j) names request r in the padded buffer: every kept one exactly once.
    n = d.num_kept
    x_ND = (torch.arange(n, dtype=torch.float32) + 1)[:, None].repeat(1, 3)
    fake = make_dispatch(torch.arange(n), d.expert_N, torch.ones(n), n, e, cap)
    buf = triton_backend.permute(x_ND, fake, "padded")
    held = buf[..., 0].flatten()
    assert sorted(held[held > 0].long().tolist()) == list(range(1, n + 1))
    per_expert = (buf[..., 0] > 0).sum(1)
    assert torch.equal(per_expert, torch.bincount(d.expert_N, minlength=e))
    assert cap is None or int(per_expert.max()) <= cap


# ---------------------------------------------------------------------------------------------
# torch.compile, registration, validation


def test_torch_compile_traces_without_graph_breaks():
    d = _dispatch(8, 4, 2, None, 0.0, ())
    ffn_scale = torch.linspace(0.5, 1.5, 16)
    triton_backend.prepare(d, "compact")

    def layer(x_TD):
        return triton_backend.combine(torch.tanh(triton_backend.permute(x_TD, d, "compact")) * ffn_scale, d)

    x = torch.randn(8, 16, requires_grad=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)  # fullgraph: a break raises
    out = compiled(x)
    (gx,) = torch.autograd.grad(out.sum(), [x])
    (gx_eager,) = torch.autograd.grad(layer(x).sum(), [x])
    assert torch.equal(out, layer(x)) and torch.equal(gx, gx_eager)


def test_backend_registration_and_refusals(monkeypatch):
    assert "triton" in available_backends("cpu") and resolve_backend("triton", "cpu") == "triton"
    assert resolve_backend("auto", "cpu") == "torch" and resolve_backend("einsum", "cpu") == "einsum"
    d = _dispatch(4, 2, 1, None, 0.0, ())
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"needs a CUDA GPU; on CPU it runs only under TRITON_INTERPRET=1"):
        moe_forward(torch.randn(4, 4), d, ExpertFFN(2, 4), backend="triton")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", "cpu")
    assert "triton" not in available_backends("cpu")
    monkeypatch.setattr(triton_backend, "triton_installed", lambda: False)
    with pytest.raises(ValueError, match="triton package, which is not installed"):
        triton_backend.permute(torch.randn(4, 4), d)
    with pytest.raises(ValueError, match="one of"):
        resolve_backend("cuda-magic", "cpu")


def test_import_kernels_without_triton():
    # Where triton is missing (macOS), our kernels package imports and the backend says why it cannot run.
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "from moe_routing_bench.kernels import layer\n"
        "print(layer.available_backends('cpu'), layer.resolve_backend('auto', 'cpu'))\n"
        "try:\n    layer.resolve_backend('triton', 'cpu')\nexcept ValueError as e:\n    print(e)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert "['torch', 'einsum'" in res.stdout and "] torch" in res.stdout and "not installed" in res.stdout


def _i64(*shape: int, device: str = "cpu") -> torch.Tensor:
    return torch.zeros(shape, dtype=torch.int64, device=device)


tpos, tperm = triton_positions.positions, triton_permute


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: tpos(_i64(3, 1), 2), "expert_R must be a 1-D"),
        (lambda: tpos(torch.zeros(3, dtype=torch.int32), 2), "expert_R must be int64"),
        (lambda: tpos(torch.tensor([0, 2]), 2), r"expert_R values must lie in \[0, 2\)"),
        (lambda: tpos(torch.tensor([0]), 0), "num_experts"),
        (lambda: tpos(torch.tensor([0]), 1, tiles=(3, 1)), "tiles"),
        (lambda: tpos(_i64(2, device="meta"), 2), "expert_R is on meta"),
        (lambda: tperm.gather_rows(torch.zeros(3), _i64(1)), "src_SD must be a 2-D"),
        (lambda: tperm.gather_rows(torch.zeros(3, 2, dtype=torch.int32), _i64(1)), "src_SD must be float32"),
        (lambda: tperm.gather_rows(torch.zeros(3, 2), torch.zeros(1)), "index_M must be int64"),
        (
            lambda: tperm.segment_sum(torch.zeros(3, 2), _i64(2), _i64(0), torch.ones(1)),
            "weight_N and widx_P",
        ),
        (
            lambda: tperm.combine_backward(torch.zeros(2, 3), torch.zeros(2, 4), _i64(2), _i64(2), torch.ones(1)),
            "grad_TD must be",
        ),
    ],
)
def test_launchers_validate_and_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_kernels_compile_for_sm90_without_a_gpu():
    # The interpreter checks far less than the compiler: compile one specialization of each kernel
    # for the H200 (sm_90) through triton's real pipeline, in a process without the interpreter.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run(
        [sys.executable, "-m", "moe_routing_bench.kernels.triton_aot", "--quick"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
        check=False,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert " 0 failed" in res.stdout


def test_gpu_check_dry_run(tmp_path):
    # `make gpu-check` rehearsed end to end on CPU: the gpu tests' own pytest process (which skips
    # without CUDA), every benchmark step at tiny sizes, the Parquet and the table.
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "moe_routing_bench.bench.microbench.gpu_check",
            "--dry-run",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        check=False,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "gpu tests FAILED" not in res.stdout and "rows: 9 ok, 0 mismatch/error, 0 skipped" in res.stdout
    assert {p.name for p in tmp_path.iterdir()} >= {
        "env.json",
        "gpu_tests.log",
        "table.txt",
        "results.parquet",
    }


def test_the_triton_backend_builds_its_dispatch_with_the_triton_positions_kernel(monkeypatch):
    from moe_routing_bench.kernels.layer import dispatch_for

    calls = []
    real = triton_positions.positions

    def counting(expert_R, num_experts, **kw):
        calls.append(num_experts)
        return real(expert_R, num_experts, **kw)

    monkeypatch.setattr(triton_positions, "positions", counting)
    token_R, expert_R, weight_R = random_plan(40, 6, 2, seed=2, skew=0.5)
    d_triton = dispatch_for("triton", token_R, expert_R, weight_R, 40, 6, 9)
    assert calls == [6]
    d_torch = dispatch_for("torch", token_R, expert_R, weight_R, 40, 6, 9)
    assert calls == [6]  # the torch backend keeps torch's positions
    for name in ("rank_N", "kept_R", "requested_E", "counts_E", "row_N", "slot_N", "token_by_row_N"):
        assert torch.equal(getattr(d_triton, name), getattr(d_torch, name)), name
