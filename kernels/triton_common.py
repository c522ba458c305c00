"""Helpers shared by the Triton kernel modules: where a kernel may run, validation, block sizes.

This module does not import triton, so ``kernels.triton_backend`` can use it to decide whether
the kernels can run before importing them (``import kernels`` works where triton is missing).

Triton decides compiled vs interpreted when a kernel is decorated, from ``TRITON_INTERPRET``:
so the switch is per process and must be set before ``kernels.triton_*`` is first imported.
"""

from __future__ import annotations

import os

import torch

# Row dtypes the data-movement kernels take (float64 for tight gradient tests).
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def interpret_requested() -> bool:
    """True when this process asked triton for its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def interpreted(kernel: object) -> bool:
    """True when ``kernel`` (a decorated @triton.jit function) runs in triton's interpreter."""
    return type(kernel).__name__ == "InterpretedFunction"


def next_pow2(n: int) -> int:
    """Smallest power of two >= max(n, 1): tl.arange needs power-of-two extents."""
    return 1 << max(int(n) - 1, 0).bit_length()


def check_device(name: str, t: torch.Tensor) -> None:
    """Compiled kernels need CUDA tensors; the interpreter takes CPU ones (tests only)."""
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and interpret_requested():
        return
    raise ValueError(f"{name} is on {t.device}: triton kernels need a CUDA tensor (CPU only under TRITON_INTERPRET=1)")


def check_same_device(ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Raise ValueError naming the first tensor in ``others`` not on ``ref``'s device."""
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def check_index(name: str, t: torch.Tensor) -> None:
    """An index argument: a 1-D int64 tensor."""
    if not isinstance(t, torch.Tensor) or t.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor (got {getattr(t, 'shape', type(t))})")
    if t.dtype != torch.int64:
        raise ValueError(f"{name} must be int64 (got {t.dtype})")
