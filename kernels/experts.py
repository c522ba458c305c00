"""Expert compute: one FFN per expert over a permuted buffer, identical across dispatch backends.

Kinds (the presets use each):

- ``swiglu``: ``y = (silu(x @ w_gate[e]) * (x @ w_up[e])) @ w_down[e]`` (Mixtral, DeepSeek, Qwen3).
- ``relu`` / ``gelu``: the classic two-matrix FFN ``y = act(x @ w_up[e]) @ w_down[e]`` (Switch
  Transformer and NLLB-MoE use ReLU).

No bias, so the zero padding rows of the padded ``[E, C, D]`` buffer stay zero.

The compact ``[N, D]`` buffer (rows grouped by expert, sizes ``counts_E``) runs as one grouped
matmul per projection, forward and backward, where ``torch._grouped_mm`` runs (probed once per
device and dtype, both directions, never assumed); elsewhere the stacked weights are split once
per call (``unbind``) and each expert's rows meet their own slice. Both paths cost O(E D F) in
backward: indexing one stacked weight per expert (``w[e]``) would write E zero-filled copies of
the whole weight, O(E^2 D F). The padded buffer runs as batched matmuls.

Shape letters: D hidden, F ffn width, E experts, C capacity, N kept rows.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch.nn.functional import gelu, relu, silu

__all__ = ["FFN_KINDS", "ExpertFFN", "expert_flops", "ffn_width", "grouped_mm_works"]

FFN_KINDS = ("swiglu", "relu", "gelu")
PATHS = ("auto", "grouped", "split")
_PROBED: dict[tuple[str, torch.dtype], bool] = {}


def ffn_width(hidden: int, ffn_ratio: float) -> int:
    """F, the expert FFN's inner width: ``round(ffn_ratio * D)``, at least 1."""
    return max(1, round(ffn_ratio * hidden))


def expert_flops(n_rows: int, hidden: int, ffn: int, kind: str = "swiglu") -> int:
    """Forward FLOPs over ``n_rows`` rows, 2 per multiply-add: three [D, F] matmuls for SwiGLU,
    two for a ReLU/GELU FFN. Backward costs about twice this. Pass E * C rows for the padded layout,
    which computes its zero slots too. Elementwise work is ignored."""
    return 2 * (3 if kind == "swiglu" else 2) * n_rows * hidden * ffn


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: ``_grouped_mm``'s backward
    refuses an expanded gradient (stride 0, as ``out.sum().backward()`` gives)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def _grouped(x_ND: torch.Tensor, w_EDF: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    return _ContiguousGrad.apply(torch._grouped_mm(x_ND, w_EDF, offs=offs_E))


def grouped_mm_works(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs forward and backward, and matches a plain matmul, on
    ``device`` in ``dtype`` in this process. Probed once (a private API: signatures and the
    supported devices and dtypes vary across torch builds)."""
    dev = torch.device(device)
    key = (dev.type, dtype)
    if key not in _PROBED:
        _PROBED[key] = _probe(dev, dtype)
    return _PROBED[key]


def _probe(dev: torch.device, dtype: torch.dtype) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    # Whatever mode the caller is in (no_grad, inference_mode), the probe needs autograd.
    with torch.inference_mode(False), torch.enable_grad():
        return _probe_grad(dev, dtype)


def _probe_grad(dev: torch.device, dtype: torch.dtype) -> bool:
    try:
        gen = torch.Generator().manual_seed(0)
        counts = torch.tensor([3, 0, 5], dtype=torch.int64)
        x = torch.randn(8, 16, generator=gen).to(dev, dtype).requires_grad_(True)
        w = torch.randn(3, 16, 16, generator=gen).to(dev, dtype).requires_grad_(True)
        y = _grouped(x, w, torch.cumsum(counts, 0).to(device=dev, dtype=torch.int32))
        y.sum().backward()
        ref = torch.cat([x[:3] @ w[0], x[3:] @ w[2]])
        tol = 1e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4
        ok = torch.allclose(y.float(), ref.float(), atol=tol, rtol=tol)
        return bool(ok and x.grad is not None and w.grad is not None and bool(torch.isfinite(w.grad).all()))
    except (RuntimeError, TypeError, NotImplementedError, ValueError):
        return False


class ExpertFFN(torch.nn.Module):
    """E independent FFNs with stacked weights.

    Parameters: w_up [E, D, F], w_down [E, F, D], and w_gate [E, D, F] for ``swiglu`` (None for the
    two-matrix kinds). F = ``ffn`` when given, else round(ffn_ratio * D). Init is seeded and
    device-independent (drawn on a CPU generator, then moved), so every backend and every device
    sees the same experts for a given seed (``init_on_device`` trades that for speed: a real
    model's weights drawn on a GPU).

    path: how the compact buffer runs: ``grouped`` (``torch._grouped_mm``), ``split`` (weights
    split once per call), or ``auto``: grouped wherever the probe passes (CUDA bf16 on sm_90, CPU
    float32 in recent torch; on CPU it measured as fast as split at E=8 and faster from E=64 on),
    else split. ``last_path`` says which ran.
    """

    def __init__(
        self,
        num_experts: int,
        hidden: int,
        ffn_ratio: float = 2.0,
        *,
        ffn: int | None = None,
        kind: Literal["swiglu", "relu", "gelu"] = "swiglu",
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        path: str = "auto",
        init_on_device: bool = False,
    ) -> None:
        super().__init__()
        for name, v in (("num_experts", num_experts), ("hidden", hidden)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1 (got {v!r})")
        if ffn is not None and (isinstance(ffn, bool) or not isinstance(ffn, int) or ffn < 1):
            raise ValueError(f"ffn must be an integer >= 1 (got {ffn!r})")
        if ffn is None and not ffn_ratio > 0:
            raise ValueError(f"ffn_ratio must be > 0 (got {ffn_ratio!r})")
        if kind not in FFN_KINDS:
            raise ValueError(f"kind must be one of {', '.join(FFN_KINDS)} (got {kind!r})")
        if path not in PATHS:
            raise ValueError(f"path must be one of {', '.join(PATHS)} (got {path!r})")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype (got {dtype})")
        self.num_experts = num_experts
        self.hidden = hidden
        self.ffn = ffn if ffn is not None else ffn_width(hidden, ffn_ratio)
        self.kind = kind
        self.path = path
        self.last_path = ""
        e, d, f = num_experts, hidden, self.ffn
        # Drawn on a CPU generator unless init_on_device: then on the device's own (fast for a
        # real model's weights on a GPU; other values, the same distribution).
        gen_device = torch.device(device) if init_on_device and device is not None else torch.device("cpu")
        gen = torch.Generator(device=gen_device).manual_seed(seed)

        def init(shape: tuple[int, int, int], fan_in: int) -> torch.nn.Parameter:
            # std 1/sqrt(fan_in) keeps activations O(1) through each matmul, so float32 tolerances
            # in tests mean the same thing at every D.
            w = torch.randn(shape, generator=gen, dtype=torch.float32, device=gen_device).mul_(fan_in**-0.5)
            return torch.nn.Parameter(w.to(device=device, dtype=dtype))

        self.w_gate = init((e, d, f), d) if kind == "swiglu" else None
        self.w_up = init((e, d, f), d)
        self.w_down = init((e, f, d), f)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, hidden={self.hidden}, ffn={self.ffn}, kind={self.kind}"

    @property
    def dtype(self) -> torch.dtype:
        return self.w_up.dtype

    @property
    def device(self) -> torch.device:
        return self.w_up.device

    def flops(self, n_rows: int) -> int:
        return expert_flops(n_rows, self.hidden, self.ffn, self.kind)

    def _act(self, gate: torch.Tensor | None, up: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            assert gate is not None
            return silu(gate) * up
        return relu(up) if self.kind == "relu" else gelu(up)

    def _check_x(self, x: torch.Tensor, name: str, dims: int) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != dims or x.shape[-1] != self.hidden:
            want = "[N, D]" if dims == 2 else "[E, C, D]"
            raise ValueError(f"{name} must be {want} with D={self.hidden} (got {getattr(x, 'shape', x)})")
        if x.dtype != self.dtype:
            raise ValueError(f"{name} dtype {x.dtype} differs from the experts' {self.dtype}")
        if x.device != self.device:
            raise ValueError(f"{name} is on {x.device} but the experts are on {self.device}")

    def compact_path(self, x_ND: torch.Tensor) -> str:
        """The path ``forward_compact`` takes for ``x_ND``: 'grouped' or 'split'."""
        if self.path == "split":
            return "split"
        aligned = self.hidden % 8 == 0 and self.ffn % 8 == 0  # 16-byte rows for the bf16 kernel
        works = aligned and grouped_mm_works(x_ND.device, x_ND.dtype)
        if self.path == "grouped":
            if not works:
                raise ValueError(
                    f"path='grouped': torch._grouped_mm does not run on {x_ND.device.type} {x_ND.dtype} here"
                    + ("" if aligned else f" (D={self.hidden} and F={self.ffn} must be multiples of 8)")
                )
            return "grouped"
        return "grouped" if works else "split"

    def _forward_grouped(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        # offs are the cumulative row ends of each expert's group, int32 as the kernel requires.
        offs = torch.cumsum(counts_E, 0).to(torch.int32)
        gate = _grouped(x_ND, self.w_gate, offs) if self.w_gate is not None else None
        return _grouped(self._act(gate, _grouped(x_ND, self.w_up, offs)), self.w_down, offs)

    def _forward_split(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        # One host sync for the group sizes; the weights are split once, so backward stacks the
        # E slices' gradients once (O(E D F)) instead of indexing per expert.
        sizes = counts_E.tolist()
        ups, downs = self.w_up.unbind(0), self.w_down.unbind(0)
        gates = self.w_gate.unbind(0) if self.w_gate is not None else [None] * self.num_experts
        pieces = []
        for e, x in enumerate(torch.split(x_ND, sizes)):
            if x.shape[0]:
                g = x @ gates[e] if gates[e] is not None else None
                pieces.append(self._act(g, x @ ups[e]) @ downs[e])
        if not pieces:
            # No rows at all: still go through the graph so backward sees a connected output.
            x = x_ND[:0]
            g = x @ gates[0] if gates[0] is not None else None
            return self._act(g, x @ ups[0]) @ downs[0]
        return torch.cat(pieces, 0)

    def forward_compact(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """The FFNs over a compact buffer: x_ND [N, D] grouped by expert, counts_E [E] int64 sizes.
        Returns y_ND [N, D] in x's dtype."""
        self._check_x(x_ND, "x_ND", 2)
        if counts_E.dim() != 1 or counts_E.shape[0] != self.num_experts:
            raise ValueError(f"counts_E must be [E] with E={self.num_experts} (got {tuple(counts_E.shape)})")
        self.last_path = self.compact_path(x_ND)
        if self.last_path == "grouped":
            return self._forward_grouped(x_ND, counts_E)
        return self._forward_split(x_ND, counts_E)

    def forward_padded(self, x_ECD: torch.Tensor) -> torch.Tensor:
        """The FFNs over a padded buffer: x_ECD [E, C, D] -> y_ECD [E, C, D], batched matmuls."""
        self._check_x(x_ECD, "x_ECD", 3)
        if x_ECD.shape[0] != self.num_experts:
            raise ValueError(f"x_ECD must have E={self.num_experts} experts (got {x_ECD.shape[0]})")
        self.last_path = "bmm"
        gate = torch.bmm(x_ECD, self.w_gate) if self.w_gate is not None else None
        return torch.bmm(self._act(gate, torch.bmm(x_ECD, self.w_up)), self.w_down)

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Alias of ``forward_compact``."""
        return self.forward_compact(x_ND, counts_E)
