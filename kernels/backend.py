"""What a dispatch backend is: an object the harness asks, instead of comparing names.

A backend moves token rows into an expert-major buffer and back (``permute``, ``combine``); the
expert compute between them is the same ``ExpertFFN`` for every backend. Each backend module ends
with one ``BACKEND = Backend(...)`` and ``kernels.layer`` lists them: adding a backend touches its
own module and that list.

Shape letters: T tokens, D hidden, E experts, K choices per token, C capacity, N kept assignments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .dispatch import Dispatch


def _always(_device: torch.device) -> str | None:
    return None


def index_planned_bytes(tokens: int, experts: int, top_k: float, capacity: int | None, hidden: int, elt: int) -> int:
    """Upper bound of an index backend's dispatch buffer before a plan exists: the padded
    ``[E, C, D]`` buffer, or every requested row ``[T * K, D]`` when dropless (C unknown)."""
    rows = experts * capacity if capacity is not None else int(tokens * top_k + 0.5)
    return rows * hidden * elt


@dataclass(frozen=True)
class Backend:
    """A dispatch backend.

    layouts: the buffer layouts it supports, preferred first ('compact' [N, D], 'padded' [E, C, D]).
    permute(x_TD, d, layout) -> buffer; combine(y, d, layout) -> out_TD [T, D].
    buffer_bytes(d, hidden, dtype, layout): bytes of the dispatch buffers it allocates for a plan.
    planned_bytes(tokens, experts, top_k, capacity, hidden, element_size): an upper bound of those
    bytes before any plan exists (None capacity: dropless), so a sweep can refuse what cannot fit.
    unavailable(device): why it cannot run on ``device`` in this process, or None when it can.
    positions: the positions op its dispatch is built with (None: torch's).
    permute_into / combine_into: forward-only variants writing into a ``Workspace`` (None: none).
    """

    name: str
    description: str
    layouts: tuple[str, ...]
    permute: Callable[[torch.Tensor, Dispatch, str], torch.Tensor]
    combine: Callable[[torch.Tensor, Dispatch, str], torch.Tensor]
    buffer_bytes: Callable[[Dispatch, int, torch.dtype, str], int]
    planned_bytes: Callable[[int, int, float, int | None, int, int], int] = index_planned_bytes
    unavailable: Callable[[torch.device], str | None] = _always
    # The rank of each request inside its expert (``kernels.positions.positions``'s contract);
    # None: the torch one. The triton backend builds its dispatch with its own kernel.
    positions: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]] | None = None
    # Forward-only variants writing into a Workspace's reused buffers; None: not supported.
    permute_into: Callable[..., torch.Tensor] | None = None
    combine_into: Callable[..., torch.Tensor] | None = None

    @property
    def default_layout(self) -> str:
        return self.layouts[0]

    def check_layout(self, layout: str | None) -> str:
        """``layout`` (or the default for None) when this backend supports it; else ValueError."""
        chosen = self.default_layout if layout in (None, "default") else layout
        if chosen not in self.layouts:
            allowed = " or ".join(repr(a) for a in self.layouts)
            raise ValueError(f"layout must be {allowed} for backend {self.name!r} (got {layout!r})")
        return chosen
