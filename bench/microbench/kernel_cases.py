"""Dispatch-kernel benchmarks declared as data: cases, providers, byte formulas, one setup.

Used by ``bench/gpu_check.py`` (CUDA events through ``triton.testing.do_bench``, every provider
against a device-to-device copy of the same bytes) and ``bench/bench_kernels.py`` (pytest-benchmark
on the current device). Each measured callable comes from ``setup`` + ``make_fn``, so the time,
the bytes and the correctness check all read the same tensors.

Ops: ``positions`` (forward only), ``permute`` and ``combine``, each ``fwd`` and ``bwd``.
Providers: ``torch`` (kernels.torch_backend / kernels.positions, the reference), ``triton``
(kernels.triton_backend / kernels.triton_positions), ``copy`` (``src.clone()`` moving the
same bytes: half of them read, half written, into a fresh tensor as the ops' outputs are).

Bytes moved (``bytes_moved``): each tensor read or written once, rows counted as often as the
op touches them (a token with K kept rows is read K times by permute). s = bytes per element,
N kept rows, M buffer rows (N compact, E * C padded), R requests, indices 8 bytes, gates 4:

    positions fwd  read expert_R, write rank_R                      16 R + 16 E
    permute  fwd   read N rows of x, write M buffer rows             (N + M) D s + 8 M
    permute  bwd   read N gradient rows, write T rows of grad_x      (N + T) D s + 16 N + 8 T
    combine  fwd   read N rows of y, write T output rows             (N + T) D s + 20 N + 8 T
    combine  bwd   read N rows of grad_out and of y, write M rows    (2 N + M) D s + 28 N
                   of grad_y and N gates

Shape letters: T tokens, D hidden, E experts, K choices, C capacity, N kept, M buffer rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch

from moe_routing_bench.bench.timing import DTYPES
from moe_routing_bench.kernels import torch_backend
from moe_routing_bench.kernels.dispatch import Dispatch, make_dispatch
from moe_routing_bench.kernels.positions import positions as torch_positions
from moe_routing_bench.kernels.reference import random_plan
from moe_routing_bench.routers.contract import capacity

OPS = ("positions", "permute", "combine")
DIRECTIONS = ("fwd", "bwd")
PROVIDERS = ("torch", "triton", "native")


@dataclass(frozen=True)
class Case:
    """One benchmark point. cf None is dropless (used with the compact layout)."""

    tokens: int
    hidden: int
    experts: int
    top_k: int
    layout: str = "compact"
    dtype: str = "bfloat16"
    cf: float | None = None

    def as_row(self) -> dict[str, object]:
        return asdict(self)


def capacity_of(case: Case) -> int | None:
    """The case's capacity C by the routing contract's formula; None when dropless."""
    return None if case.cf is None else capacity(case.cf, case.tokens, case.experts, case.top_k)


@dataclass
class Setup:
    """Tensors one case measures: the dispatch, inputs, and upstream gradients."""

    case: Case
    dispatch: Dispatch
    x_TD: torch.Tensor
    y: torch.Tensor  # expert outputs in the layout's shape
    grad_buf: torch.Tensor  # upstream gradient of permute's output
    grad_TD: torch.Tensor  # upstream gradient of combine's output
    weight_R: torch.Tensor  # the gates, requires_grad
    expert_R: torch.Tensor

    @property
    def buffer_rows(self) -> int:
        d = self.dispatch
        return d.num_kept if self.case.layout == "compact" else d.num_experts * d.padded_capacity


def setup(case: Case, device: torch.device | str, seed: int = 0) -> Setup:
    """Build every tensor of ``case`` on ``device``; random data (never zeros: they hide bugs)."""
    dev = torch.device(device)
    dtype = DTYPES[case.dtype]
    token_R, expert_R, weight_R = random_plan(case.tokens, case.experts, case.top_k, seed=seed, device=dev)
    weight_R = weight_R.requires_grad_(True)
    d = make_dispatch(token_R, expert_R, weight_R, case.tokens, case.experts, capacity_of(case))
    gen = torch.Generator(device=dev).manual_seed(seed + 1)
    x_TD = torch.randn(case.tokens, case.hidden, generator=gen, device=dev).to(dtype)
    m = d.num_kept if case.layout == "compact" else d.num_experts * d.padded_capacity
    shape = (m, case.hidden) if case.layout == "compact" else (d.num_experts, d.padded_capacity, case.hidden)
    y = torch.randn(shape, generator=gen, device=dev).to(dtype)
    grad_buf = torch.randn(shape, generator=gen, device=dev).to(dtype)
    grad_TD = torch.randn(case.tokens, case.hidden, generator=gen, device=dev).to(dtype)
    return Setup(case, d, x_TD, y, grad_buf, grad_TD, weight_R, expert_R)


def bytes_moved(op: str, direction: str, s: Setup) -> int:
    """Bytes an ideal implementation reads plus writes (formulas in the module docstring)."""
    case, d = s.case, s.dispatch
    elem = torch.empty((), dtype=DTYPES[case.dtype]).element_size()
    n, m, t, dim = d.num_kept, s.buffer_rows, case.tokens, case.hidden
    if op == "positions":
        return 16 * d.num_requested + 16 * case.experts
    if (op, direction) == ("permute", "fwd"):
        return (n + m) * dim * elem + 8 * m
    if (op, direction) == ("permute", "bwd"):
        return (n + t) * dim * elem + 16 * n + 8 * t
    if (op, direction) == ("combine", "fwd"):
        return (n + t) * dim * elem + 20 * n + 8 * t
    if (op, direction) == ("combine", "bwd"):
        return (2 * n + m) * dim * elem + 28 * n
    raise ValueError(f"op/direction must be one of {OPS} x {DIRECTIONS} (got {op!r}, {direction!r})")


def _backend(provider: str):
    if provider == "torch":
        return torch_backend
    if provider == "triton":
        from moe_routing_bench.kernels import triton_backend

        return triton_backend
    if provider == "native":
        from moe_routing_bench.kernels import native_backend

        return native_backend
    raise ValueError(f"provider must be one of {PROVIDERS} (got {provider!r})")


def make_fn(provider: str, op: str, direction: str, s: Setup) -> Callable[[], object]:
    """A no-argument callable running ``op`` once in ``direction`` on ``provider``.

    Backward callables run ``torch.autograd.grad`` over a graph built once here (retained), so
    they time the backward kernels alone, with nothing accumulated into ``.grad``.
    """
    d, layout = s.dispatch, s.case.layout
    if op == "positions":
        if direction != "fwd":
            raise ValueError("positions has no backward")
        own = torch_positions if provider == "torch" else _backend(provider).positions
        return lambda: own(s.expert_R, d.num_experts)
    impl = _backend(provider)
    if provider == "triton":
        impl.prepare(d, layout)  # index arrays are built once per Dispatch, outside the timing
    if op == "permute":
        if direction == "fwd":
            return lambda: impl.permute(s.x_TD, d, layout)
        x = s.x_TD.detach().requires_grad_(True)
        out = impl.permute(x, d, layout)
        return lambda: torch.autograd.grad(out, [x], s.grad_buf, retain_graph=True)
    if op == "combine":
        if direction == "fwd":
            return lambda: impl.combine(s.y, d, layout)
        y = s.y.detach().requires_grad_(True)
        out = impl.combine(y, d, layout)
        return lambda: torch.autograd.grad(out, [y, s.weight_R], s.grad_TD, retain_graph=True)
    raise ValueError(f"op must be one of {OPS} (got {op!r})")


def copy_fn(nbytes: int, device: torch.device | str) -> Callable[[], object]:
    """A plain copy moving ``nbytes`` in all: ``src.clone()`` of nbytes/2 (read once, written once).

    It allocates its output, as every op measured beside it does: on a CPU a fresh large tensor
    costs its page faults (a copy into a preallocated buffer runs several times faster there, and
    no op here writes into one); on a GPU the caching allocator makes the two the same.
    """
    src = torch.randint(0, 255, (max(1, nbytes // 2),), dtype=torch.uint8, device=device)
    return lambda: src.clone()


# The Setup fields each measured op reads: only those are upcast for the float32 reference,
# which keeps the reference's extra memory to one or two buffers at the largest sizes.
_READS = {
    ("permute", "fwd"): ("x_TD",),
    ("permute", "bwd"): ("x_TD", "grad_buf"),
    ("combine", "fwd"): ("y",),
    ("combine", "bwd"): ("y", "grad_TD"),
}


def _upcast(s: Setup, op: str, direction: str) -> Setup:
    """The same case with the tensors ``op`` reads in float32 (bf16/fp16 widen exactly)."""
    fields = {name: getattr(s, name).float() for name in _READS.get((op, direction), ())}
    return replace(s, case=replace(s.case, dtype="float32"), **fields)


def check(op: str, direction: str, s: Setup) -> str:
    """'ok', or what differs between triton and the torch reference for this case.

    The reference runs in float32 on the same values, so a bf16 result may differ from it by
    its own rounding only (half a unit in the last place, checked as one): torch's own bf16
    backward sums in bf16 (index_add), which would need a looser bound than triton deserves.
    Data movement (positions, permute forward) must be bitwise equal.
    """
    ref = s if s.case.dtype == "float32" else _upcast(s, op, direction)
    got = make_fn("triton", op, direction, s)()
    want = make_fn("torch", op, direction, ref)()
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    exact = op == "positions" or (op, direction) == ("permute", "fwd")
    for g, w in zip(got, want, strict=True):
        if g.shape != w.shape:
            return f"{op} {direction}: shape {tuple(g.shape)} != {tuple(w.shape)}"
        if exact:
            if not torch.equal(g.to(w.dtype), w):
                return f"{op} {direction}: not bitwise equal to torch"
            continue
        tol = 1e-5 if g.dtype in (torch.float32, torch.float64) else 2.0**-7
        err = (g.double() - w.double()).abs().max().item() if g.numel() else 0.0
        scale = max(1.0, w.abs().max().item() if w.numel() else 0.0)
        if not err <= tol * scale:
            return f"{op} {direction}: max abs error {err:.3g} > {tol * scale:.3g} ({g.dtype})"
    return "ok"
