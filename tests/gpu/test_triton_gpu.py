"""The compiled Triton dispatch kernels on a CUDA GPU, at realistic sizes, against torch.

Run in their own process (``make test-gpu``, or ``make gpu-check``, which runs this first): the
CPU tier runs triton's interpreter, a per-process switch, so these tests skip under it. Inputs are
random and freshly drawn; outputs of the kernels are written into memory poisoned with NaN first,
so a row a kernel forgot to write shows up as a mismatch.
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip("TRITON_INTERPRET is set: these tests need compiled kernels", allow_module_level=True)
pytest.importorskip("triton")

from moe_routing_bench.bench.microbench.kernel_cases import DIRECTIONS, Case, check, setup  # noqa: E402
from moe_routing_bench.kernels import torch_backend, triton_backend  # noqa: E402
from moe_routing_bench.kernels.dispatch import make_dispatch  # noqa: E402
from moe_routing_bench.kernels.experts import ExpertFFN  # noqa: E402
from moe_routing_bench.kernels.layer import moe_forward  # noqa: E402
from moe_routing_bench.kernels.positions import positions  # noqa: E402
from moe_routing_bench.kernels.triton_positions import MAX_RUNNING_E, expert_positions  # noqa: E402

CUDA = torch.device("cuda")


def _poison() -> None:
    """Fill the caching allocator's free blocks with NaN so torch.empty hands out poisoned memory."""
    free, _ = torch.cuda.mem_get_info()
    junk = torch.full((min(free // 8, 2**30),), float("nan"), dtype=torch.float32, device=CUDA)
    del junk


@pytest.mark.parametrize(
    "r, e",
    [
        (131072 * 8, 256),  # the largest benchmark shape: T = 131072, K = 8
        (4096, 8),  # few experts: long runs of one expert inside a chunk
        (1_000_003, 61),  # prime R and E: partial chunk, E not a power of two
        (50_000, MAX_RUNNING_E + 3),  # beyond the register running counts: the scatter kernel
        (1, 1),  # one request
    ],
)
def test_positions_exact(r, e):
    _poison()
    expert_R = torch.randint(0, e, (r,), device=CUDA)
    rank_R, counts_E, offsets_E = expert_positions(expert_R, e)
    want_rank, want_counts = positions(expert_R, e)
    assert torch.equal(rank_R, want_rank) and torch.equal(counts_E, want_counts)
    assert torch.equal(offsets_E, torch.cumsum(want_counts, 0) - want_counts)


@pytest.mark.parametrize(
    "case",
    [
        Case(32768, 4096, 64, 8),  # realistic top-8, compact dropless
        Case(32768, 1024, 256, 2, layout="padded", cf=1.25),  # padded with drops and zero slots
        Case(4096, 1000, 7, 2, dtype="float32"),  # D not a multiple of the tile, prime E, float32
        Case(131072, 1024, 8, 1),  # switch shape, many tokens
        Case(3, 4096, 8, 8, layout="padded", cf=1.0),  # T = 3 < K: tiny capacity, empty experts
    ],
    ids=str,
)
def test_permute_combine_forward_backward(case):
    _poison()
    s = setup(case, CUDA, seed=case.tokens + case.experts)
    for op in ("permute", "combine"):
        for direction in DIRECTIONS:
            assert check(op, direction, s) == "ok"


def test_combine_is_deterministic():
    s = setup(Case(32768, 2048, 64, 8), CUDA)
    d = s.dispatch
    y = s.y.detach().requires_grad_(True)
    runs = []
    for _ in range(3):
        out = triton_backend.combine(y, d)
        runs.append((out, *torch.autograd.grad(out, [y, s.weight_R], s.grad_TD)))
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            assert torch.equal(a, b)


def test_layer_end_to_end_and_grouped_experts():
    # The whole layer in bf16, triton vs torch backends: same dispatch, same experts.
    t, e, dim = 8192, 16, 1024
    gen = torch.Generator(device=CUDA).manual_seed(0)
    expert_TK = torch.rand(t, e, device=CUDA, generator=gen).topk(2, dim=1).indices
    token_R = torch.arange(t, device=CUDA).repeat(2)
    expert_R = expert_TK.T.reshape(-1).contiguous()
    weight_R = torch.rand(2 * t, device=CUDA, generator=gen)
    d = make_dispatch(token_R, expert_R, weight_R, t, e, None)
    ffn = ExpertFFN(e, dim, seed=1, dtype=torch.bfloat16, device=CUDA)
    x = torch.randn(t, dim, device=CUDA, generator=gen).to(torch.bfloat16)
    out_triton, stages = moe_forward(x, d, ffn, backend="triton")
    out_torch, _ = moe_forward(x, d, ffn, backend="torch")
    assert ffn.last_path == "grouped", "torch._grouped_mm did not run on CUDA bf16 (the split path ran)"
    torch.testing.assert_close(out_triton.float(), out_torch.float(), atol=2e-2, rtol=2e-2)
    # Grouped GEMM against the split path it replaces.
    y_loop = ffn._forward_split(stages["dispatch"], d.counts_E)
    torch.testing.assert_close(stages["experts"].float(), y_loop.float(), atol=3e-2, rtol=3e-2)


def test_padded_layer_matches_torch_backend():
    t, e, dim = 4096, 8, 512
    gen = torch.Generator(device=CUDA).manual_seed(1)
    expert_R = torch.randint(0, e, (t,), device=CUDA, generator=gen)
    d = make_dispatch(torch.arange(t, device=CUDA), expert_R, torch.rand(t, device=CUDA, generator=gen), t, e, 400)
    x = torch.randn(t, dim, device=CUDA, generator=gen)
    buf = triton_backend.permute(x, d, "padded")
    assert torch.equal(buf, torch_backend.permute(x, d, "padded"))
    torch.testing.assert_close(triton_backend.combine(buf, d, "padded"), torch_backend.combine(buf, d, "padded"))
