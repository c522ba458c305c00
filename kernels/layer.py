"""The MoE layer as three stages, on any dispatch backend: permute -> experts -> combine.

A backend is a ``kernels.backend.Backend``: its layouts, ``permute(x_TD, d, layout) -> buffer``
(compact [N, D] or padded [E, C, D]), ``combine(y, d, layout) -> out_TD``, its buffer bytes, and
why it cannot run on a device (``unavailable``). ``BACKENDS`` below lists every backend.

Expert compute is the same ``ExpertFFN`` for every backend, so backends differ only in data
movement. A benchmark times each stage through ``stage_hook``, a callable returning a context
manager per stage name ('dispatch', 'experts', 'combine'), e.g. a timer that synchronises the
device on entry and exit.

Shape letters: T tokens, D hidden, E experts, C capacity, N kept assignments.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch

from . import einsum_backend, native_backend, torch_backend, triton_backend
from .backend import Backend
from .dispatch import Dispatch, make_dispatch
from .experts import ExpertFFN
from .workspace import Workspace

STAGES = ("dispatch", "experts", "combine")


# Every dispatch backend, by name. Registered everywhere: the triton backend imports triton only
# when a call can run (a CUDA GPU, or the interpreter on CPU) and otherwise says why it cannot.
BACKENDS: dict[str, Backend] = {
    b.name: b for b in (torch_backend.BACKEND, einsum_backend.BACKEND, triton_backend.BACKEND, native_backend.BACKEND)
}


def list_backends() -> list[str]:
    """Names of the registered dispatch backends (whether or not each can run here)."""
    return list(BACKENDS)


def resolve_backend(name: str, device: torch.device | str) -> str:
    """The backend that really runs for ``name`` on ``device``: record this, not the request.

    'auto' picks 'triton' on a CUDA device where triton is installed, else 'torch'. A registered
    name resolves to itself when it can run there; 'triton' cannot on a CPU unless the process
    runs triton's interpreter (TRITON_INTERPRET=1, tests), nor where triton is not installed:
    then this raises ValueError saying why. An unknown name raises ValueError listing the valid.
    """
    dev = torch.device(device)
    if name == "auto":
        return "triton" if dev.type == "cuda" and BACKENDS["triton"].unavailable(dev) is None else "torch"
    why = get_backend(name).unavailable(dev)
    if why is not None:
        raise ValueError(why)
    return name


def available_backends(device: torch.device | str) -> list[str]:
    """Registered backends that can run on ``device`` in this process (see ``resolve_backend``)."""
    dev = torch.device(device)
    return [n for n, b in BACKENDS.items() if b.unavailable(dev) is None]


def get_backend(name: str) -> Backend:
    """The backend registered under ``name``; an unknown name raises ValueError listing the valid ones."""
    try:
        return BACKENDS[name]
    except (KeyError, TypeError):
        valid = ", ".join(repr(n) for n in BACKENDS)
        raise ValueError(f"backend must be one of {valid} (got {name!r})") from None


StageHook = Callable[[str], AbstractContextManager]


def moe_forward(
    x_TD: torch.Tensor,
    d: Dispatch,
    ffn: ExpertFFN,
    backend: str = "torch",
    layout: str | None = None,
    stage_hook: StageHook | None = None,
    workspace: Workspace | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run one MoE layer over a dispatched plan.

    x_TD: [T, D] hidden states in the experts' dtype and device. d: the plan's ``Dispatch``.
    backend: a name in ``BACKENDS``. layout: 'compact' or 'padded'; None picks the backend's
    preferred layout (compact for torch and triton, padded for einsum, which supports nothing
    else). 'triton' needs a CUDA device (or TRITON_INTERPRET=1 on CPU): ``resolve_backend``.
    stage_hook: called with each stage name; the returned context manager wraps that stage.
    workspace: reuse permute's and combine's buffers from step to step (forward only, for a
    backend that supports it: ``Backend.permute_into``); None allocates fresh ones every call.

    Returns (out_TD [T, D] in x's dtype, stage outputs ``{'dispatch': permuted buffer,
    'experts': expert output buffer, 'combine': out_TD}``) so a benchmark can count the bytes
    each stage wrote.
    """
    impl = get_backend(backend)
    layout = impl.check_layout(layout)
    if not isinstance(x_TD, torch.Tensor) or x_TD.dim() != 2 or x_TD.shape != (d.num_tokens, ffn.hidden):
        raise ValueError(
            f"x_TD must be [T, D] with T={d.num_tokens}, D={ffn.hidden} (got {getattr(x_TD, 'shape', x_TD)})"
        )
    if x_TD.dtype != ffn.dtype or x_TD.device != ffn.device:
        raise ValueError(
            f"x_TD dtype/device {x_TD.dtype}/{x_TD.device} differs from the experts' "
            f"{ffn.dtype}/{ffn.device} (cast with ffn.to(...))"
        )
    if ffn.num_experts != d.num_experts:
        raise ValueError(f"ffn has {ffn.num_experts} experts but the dispatch has {d.num_experts}")
    hook: StageHook = stage_hook if stage_hook is not None else (lambda _stage: nullcontext())

    permute, combine = impl.permute, impl.combine
    if workspace is not None:
        if impl.permute_into is None or impl.combine_into is None:
            raise ValueError(f"workspace: backend {backend!r} does not write into reused buffers")
        if torch.is_grad_enabled() and (x_TD.requires_grad or d.weight_N.requires_grad):
            raise ValueError("workspace: reused buffers are for forward-only steps (autograd is recording)")
        ws = workspace
        permute = lambda x, dd, lay: impl.permute_into(x, dd, lay, ws)
        combine = lambda y, dd, lay: impl.combine_into(y, dd, lay, ws)
    with hook("dispatch"):
        x_buf = permute(x_TD, d, layout)
    with hook("experts"):
        y_buf = ffn.forward_compact(x_buf, d.counts_E) if layout == "compact" else ffn.forward_padded(x_buf)
    with hook("combine"):
        out_TD = combine(y_buf, d, layout)
    return out_TD, {"dispatch": x_buf, "experts": y_buf, "combine": out_TD}


def dispatch_for(
    backend: str,
    token_R: torch.Tensor,
    expert_R: torch.Tensor,
    weight_R: torch.Tensor,
    num_tokens: int,
    num_experts: int,
    capacity: int | None,
) -> Dispatch:
    """``make_dispatch`` with ``backend``'s own positions op (the triton backend's kernel)."""
    return make_dispatch(
        token_R, expert_R, weight_R, num_tokens, num_experts, capacity, positions_fn=get_backend(backend).positions
    )
