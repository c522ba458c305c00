"""The ``triton`` dispatch backend: permute and combine on the shared Triton kernels, with autograd.

Same signatures as ``torch_backend``: ``permute(x_TD, d, layout)`` and ``combine(y, d, layout)``
for layouts 'compact' ([N, D]) and 'padded' ([E, C, D]). The kernels live in
``kernels.triton_permute`` (and ``kernels.triton_positions``); this module turns a ``Dispatch``
into the index arrays they read and registers two differentiable ops with ``torch.library``, so
``torch.compile`` traces a layer that uses them as single nodes, with no graph break:

- ``moe_bench::permute(x_TD, token_M, csr_ptr_T1, csr_row_N) -> x_MD``: a row gather (token -1 =
  zero row). Backward: grad_x[t] = sum of grad rows of t's kept assignments (``segment_sum``).
- ``moe_bench::combine(y_MD, weight_N, csr_ptr_T1, csr_row_N, csr_n_N, token_M, n_M) -> out_TD``:
  per token, the gate-weighted sum of its kept rows in priority order, float32 accumulation, no
  atomics, so the same bits on every run. Backward: ``combine_backward`` gives the gradients to
  the expert outputs and to the gates in one pass.

Triton is imported lazily, on the first call that can run: ``import kernels`` works where triton
is missing (macOS), and on a CPU the backend refuses unless ``TRITON_INTERPRET=1`` (tests); see
``require_runtime``. Index arrays are built once per (Dispatch, layout) with torch ops and cached
while the Dispatch lives; call ``prepare(d, layout)`` outside a compiled region to keep that
host-side work out of the trace.

Shape letters: T tokens, D hidden, E experts, C capacity, N kept assignments, M buffer rows
(N compact, E * C padded).
"""

from __future__ import annotations

import importlib.util
import weakref
from dataclasses import dataclass

import torch

from .backend import Backend
from .dispatch import LAYOUTS, Dispatch, analytic_buffer_bytes, check_layout
from .torch_backend import _check_x, _check_y, token_major_order
from .triton_common import interpret_requested

NO_GPU = "triton backend needs a CUDA GPU; on CPU it runs only under TRITON_INTERPRET=1 (tests)"
NO_TRITON = "triton backend needs the triton package, which is not installed here (Linux: pip install triton)"


def triton_installed() -> bool:
    """True when ``import triton`` would succeed (checked without importing it)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a broken or blocked install counts as missing
        return False


def runtime_error(device: torch.device | str) -> str | None:
    """Why the triton backend cannot run on ``device`` in this process, or None when it can."""
    if not triton_installed():
        return NO_TRITON
    dev = torch.device(device)
    if dev.type == "cuda":
        return None
    if dev.type == "cpu" and interpret_requested():
        from . import triton_permute

        if not triton_permute.INTERPRETED:
            return (
                "triton kernels were compiled for the GPU in this process before TRITON_INTERPRET=1 "
                "was set; set it before kernels.triton_* is first imported"
            )
        return None
    return NO_GPU


def require_runtime(device: torch.device | str) -> None:
    """Raise ValueError saying why the triton backend cannot run on ``device``, if it cannot."""
    reason = runtime_error(device)
    if reason is not None:
        raise ValueError(reason)


# ---------------------------------------------------------------------------------------------
# Index arrays, built once per (Dispatch, layout)


@dataclass(frozen=True)
class TritonPlan:
    """What the kernels read for one Dispatch and layout.

    token_M: [M] int64 token held by each buffer row, -1 for an unused padded slot.
    n_M: [M] int64 kept assignment (index into the ``*_N`` arrays) of each row, -1 unused.
    csr_ptr_T1: [T + 1] int64; token t's kept assignments are entries ptr[t] .. ptr[t+1]-1 of
    csr_n_N ([N] int64, priority order inside each token) and csr_row_N ([N] int64, their rows).
    """

    token_M: torch.Tensor
    n_M: torch.Tensor
    csr_ptr_T1: torch.Tensor
    csr_row_N: torch.Tensor
    csr_n_N: torch.Tensor


_PLANS: weakref.WeakKeyDictionary[Dispatch, dict[str, TritonPlan]] = weakref.WeakKeyDictionary()


def _build_plan(d: Dispatch, layout: str) -> TritonPlan:
    n, dev = d.num_kept, d.device
    arange_N = torch.arange(n, device=dev)
    if layout == "compact":
        row_N = d.row_N
        token_M = d.token_by_row_N
        n_M = torch.empty(n, dtype=torch.int64, device=dev)
        n_M[row_N] = arange_N
    else:
        row_N = d.slot_N
        m = d.num_experts * d.padded_capacity
        token_M = torch.full((m,), -1, dtype=torch.int64, device=dev)
        token_M[row_N] = d.token_N
        n_M = torch.full((m,), -1, dtype=torch.int64, device=dev)
        n_M[row_N] = arange_N
    # Token-major lists; the stable sort keeps priority order inside each token, which fixes the
    # summation order of combine (and of permute's backward).
    csr_n_N = token_major_order(d.token_N)
    csr_ptr_T1 = torch.zeros(d.num_tokens + 1, dtype=torch.int64, device=dev)
    torch.cumsum(torch.bincount(d.token_N, minlength=d.num_tokens), 0, out=csr_ptr_T1[1:])
    return TritonPlan(token_M, n_M, csr_ptr_T1, row_N[csr_n_N], csr_n_N)


def prepare(d: Dispatch, layout: str = "compact") -> TritonPlan:
    """The index arrays of ``d`` for ``layout``, built on first use and cached while d lives."""
    check_layout(layout, LAYOUTS)
    per_layout = _PLANS.setdefault(d, {})
    if layout not in per_layout:
        per_layout[layout] = _build_plan(d, layout)
    return per_layout[layout]


# ---------------------------------------------------------------------------------------------
# torch.library ops: opaque to torch.compile, differentiable through register_autograd


@torch.library.custom_op("moe_bench::permute", mutates_args=())
def permute_op(
    x_TD: torch.Tensor, token_M: torch.Tensor, csr_ptr_T1: torch.Tensor, csr_row_N: torch.Tensor
) -> torch.Tensor:
    """x_MD [M, D] = x_TD[token_M] with zero rows where token_M is -1 (the CSR feeds backward)."""
    from .triton_permute import gather_rows

    return gather_rows(x_TD, token_M)


@permute_op.register_fake
def _(x_TD, token_M, csr_ptr_T1, csr_row_N):
    return x_TD.new_empty((token_M.shape[0], x_TD.shape[1]))


def _permute_setup(ctx, inputs, output) -> None:
    _, _, csr_ptr_T1, csr_row_N = inputs
    ctx.save_for_backward(csr_ptr_T1, csr_row_N)


def _permute_backward(ctx, grad_MD):
    csr_ptr_T1, csr_row_N = ctx.saved_tensors
    return segment_sum_op(grad_MD, csr_ptr_T1, csr_row_N, None, None), None, None, None


@torch.library.custom_op("moe_bench::segment_sum", mutates_args=())
def segment_sum_op(
    src_SD: torch.Tensor,
    ptr_T1: torch.Tensor,
    index_P: torch.Tensor,
    weight_N: torch.Tensor | None,
    widx_P: torch.Tensor | None,
) -> torch.Tensor:
    """out_TD [T, D]: per CSR list, the (weighted) sum of src rows, float32 accumulation."""
    from .triton_permute import segment_sum

    return segment_sum(src_SD, ptr_T1, index_P, weight_N, widx_P)


@segment_sum_op.register_fake
def _(src_SD, ptr_T1, index_P, weight_N, widx_P):
    return src_SD.new_empty((ptr_T1.shape[0] - 1, src_SD.shape[1]))


@torch.library.custom_op("moe_bench::combine", mutates_args=())
def combine_op(
    y_MD: torch.Tensor,
    weight_N: torch.Tensor,
    csr_ptr_T1: torch.Tensor,
    csr_row_N: torch.Tensor,
    csr_n_N: torch.Tensor,
    token_M: torch.Tensor,
    n_M: torch.Tensor,
) -> torch.Tensor:
    """out_TD [T, D] = per token, sum of weight_N[n] * y_MD[row of n] in priority order."""
    from .triton_permute import segment_sum

    return segment_sum(y_MD, csr_ptr_T1, csr_row_N, weight_N, csr_n_N)


@combine_op.register_fake
def _(y_MD, weight_N, csr_ptr_T1, csr_row_N, csr_n_N, token_M, n_M):
    return y_MD.new_empty((csr_ptr_T1.shape[0] - 1, y_MD.shape[1]))


def _combine_setup(ctx, inputs, output) -> None:
    y_MD, weight_N, _, _, _, token_M, n_M = inputs
    ctx.save_for_backward(y_MD, weight_N, token_M, n_M)


def _combine_backward(ctx, grad_TD):
    y_MD, weight_N, token_M, n_M = ctx.saved_tensors
    grad_y, grad_w = combine_backward_op(grad_TD.contiguous(), y_MD, token_M, n_M, weight_N)
    return grad_y, grad_w, None, None, None, None, None


@torch.library.custom_op("moe_bench::combine_backward", mutates_args=())
def combine_backward_op(
    grad_TD: torch.Tensor,
    y_MD: torch.Tensor,
    token_M: torch.Tensor,
    n_M: torch.Tensor,
    weight_N: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_y_MD, grad_w_N) of combine, one pass over the buffer rows."""
    from .triton_permute import combine_backward

    return combine_backward(grad_TD, y_MD, token_M, n_M, weight_N)


@combine_backward_op.register_fake
def _(grad_TD, y_MD, token_M, n_M, weight_N):
    return torch.empty_like(y_MD), torch.empty_like(weight_N)


permute_op.register_autograd(_permute_backward, setup_context=_permute_setup)
combine_op.register_autograd(_combine_backward, setup_context=_combine_setup)


# ---------------------------------------------------------------------------------------------
# The backend interface


def permute(x_TD: torch.Tensor, d: Dispatch, layout: str = "compact") -> torch.Tensor:
    """Gather kept token rows into an expert-major buffer, as ``torch_backend.permute``.

    x_TD: [T, D] float32/float16/bfloat16/float64. Returns compact x_ND [N, D] or padded x_ECD
    [E, C, D] (unused slots zero), same dtype and device; an exact copy of the rows.
    """
    check_layout(layout, LAYOUTS)
    _check_x(x_TD, d)
    require_runtime(x_TD.device)
    p = prepare(d, layout)
    x_MD = permute_op(x_TD, p.token_M, p.csr_ptr_T1, p.csr_row_N)
    if layout == "compact":
        return x_MD
    return x_MD.view(d.num_experts, d.padded_capacity, x_TD.shape[1])


def combine(y: torch.Tensor, d: Dispatch, layout: str = "compact") -> torch.Tensor:
    """Gate-weighted sum of expert outputs back to tokens, as ``torch_backend.combine``.

    y: compact y_ND [N, D] or padded y_ECD [E, C, D]. Returns out_TD [T, D] in y's dtype,
    accumulated in float32 (float64 for float64 y) in a fixed order: deterministic.
    """
    check_layout(layout, LAYOUTS)
    _check_y(y, d, layout)
    require_runtime(y.device)
    p = prepare(d, layout)
    y_MD = y.reshape(-1, y.shape[-1])
    return combine_op(y_MD, d.weight_N, p.csr_ptr_T1, p.csr_row_N, p.csr_n_N, p.token_M, p.n_M)


def positions(expert_R: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton positions kernel (``kernels.triton_positions``), imported on first use: the
    dispatch of this backend is built with it, bit-identical to the torch ``positions``."""
    require_runtime(expert_R.device)
    from . import triton_positions

    return triton_positions.positions(expert_R, num_experts)


BACKEND = Backend(
    name="triton",
    description="the shared Triton kernels: positions, permute, deterministic combine (CUDA; CPU interpreter in tests)",
    layouts=LAYOUTS,
    permute=permute,
    combine=combine,
    buffer_bytes=analytic_buffer_bytes,
    unavailable=runtime_error,
    positions=positions,
)
