"""Buffers a layer reuses from step to step, as a GPU caching allocator would.

On a CPU a fresh large tensor is fresh memory: with glibc's mmap threshold every step's permute
buffer and combine output are new pages, and the first touch of each page costs more than the
copy itself (a 128 MB buffer, measured: the permute took 4.5 times a copy of its bytes). A
:class:`Workspace` keeps one flat buffer per name and hands out views of it, grown when a step
needs more, so a steady-state step writes into memory it has touched before.

Forward only: an operation writing into a given buffer (``out=``) records no autograd graph, so
``moe_forward`` refuses a workspace while gradients are enabled.
"""

from __future__ import annotations

import torch


class Workspace:
    """Named buffers reused across calls. ``take(name, shape, dtype, device)`` returns a view of
    at least that size; its contents are whatever the last step left (callers overwrite or zero)."""

    def __init__(self) -> None:
        self._flat: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = 1
        for s in shape:
            numel *= int(s)
        flat = self._flat.get(name)
        if flat is None or flat.dtype != dtype or flat.device != device or flat.numel() < numel:
            flat = torch.empty(max(numel, 1), dtype=dtype, device=device)
            self._flat[name] = flat
        return flat[:numel].view(shape)

    @property
    def nbytes(self) -> int:
        """Bytes the workspace holds (what reuse costs in memory)."""
        return sum(b.numel() * b.element_size() for b in self._flat.values())
