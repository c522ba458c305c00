"""Expert compute: one SwiGLU FFN per expert over a permuted buffer, identical across backends.

``y = (silu(x @ w_gate[e]) * (x @ w_up[e])) @ w_down[e]`` for each row x routed to expert e. The
same module runs over the compact ``[N, D]`` buffer (rows grouped by expert, sizes ``counts_E``)
or the padded ``[E, C, D]`` buffer; zero padding rows stay zero because SwiGLU has no bias.

Shape letters: D hidden, F ffn width, E experts, C capacity, N kept rows.
"""

from __future__ import annotations

import torch
from torch.nn.functional import silu

__all__ = ["ExpertFFN", "expert_flops"]


def ffn_width(hidden: int, ffn_ratio: float) -> int:
    """F, the expert FFN's inner width: ``round(ffn_ratio * D)``, at least 1."""
    return max(1, round(ffn_ratio * hidden))


def expert_flops(n_rows: int, hidden: int, ffn: int) -> int:
    """Forward FLOPs of the SwiGLU over ``n_rows`` rows: three [D, F] matmuls, 2 FLOPs per MAC.

    ``2 * 3 * n_rows * D * F``; backward costs about twice this. Pass E * C rows for the padded
    layout, which computes its zero slots too. The elementwise silu and product are ignored.
    """
    return 2 * 3 * n_rows * hidden * ffn


class ExpertFFN(torch.nn.Module):
    """E independent SwiGLU FFNs with stacked weights.

    Parameters: w_gate [E, D, F], w_up [E, D, F], w_down [E, F, D], with F = round(ffn_ratio * D).
    Init is seeded and device-independent (drawn on a CPU generator, then moved), so every backend
    and every device sees the same experts for a given seed.
    """

    def __init__(
        self,
        num_experts: int,
        hidden: int,
        ffn_ratio: float = 2.0,
        *,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        for name, v in (("num_experts", num_experts), ("hidden", hidden)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1 (got {v!r})")
        if not ffn_ratio > 0:
            raise ValueError(f"ffn_ratio must be > 0 (got {ffn_ratio!r})")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype (got {dtype})")
        self.num_experts = num_experts
        self.hidden = hidden
        self.ffn = ffn_width(hidden, ffn_ratio)
        e, d, f = num_experts, hidden, self.ffn
        gen = torch.Generator().manual_seed(seed)

        def init(shape: tuple[int, int, int], fan_in: int) -> torch.nn.Parameter:
            # std 1/sqrt(fan_in) keeps activations O(1) through each matmul, so float32 tolerances
            # in tests mean the same thing at every D.
            w = torch.randn(shape, generator=gen, dtype=torch.float32) / fan_in**0.5
            return torch.nn.Parameter(w.to(device=device, dtype=dtype))

        self.w_gate = init((e, d, f), d)
        self.w_up = init((e, d, f), d)
        self.w_down = init((e, f, d), f)
        # Cleared after the first failure so a broken grouped GEMM is not retried on every call.
        self._grouped_ok = True

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, hidden={self.hidden}, ffn={self.ffn}"

    def _check_x(self, x: torch.Tensor, name: str, dims: int) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != dims or x.shape[-1] != self.hidden:
            want = "[N, D]" if dims == 2 else "[E, C, D]"
            raise ValueError(f"{name} must be {want} with D={self.hidden} (got {getattr(x, 'shape', x)})")
        if x.dtype != self.w_gate.dtype:
            raise ValueError(f"{name} dtype {x.dtype} differs from the experts' {self.w_gate.dtype}")
        if x.device != self.w_gate.device:
            raise ValueError(f"{name} is on {x.device} but the experts are on {self.w_gate.device}")

    def _use_grouped(self, x_ND: torch.Tensor) -> bool:
        # torch._grouped_mm is a private CUDA bf16 kernel; it needs 16-byte aligned row strides.
        return (
            self._grouped_ok
            and x_ND.is_cuda
            and x_ND.dtype == torch.bfloat16
            and hasattr(torch, "_grouped_mm")
            and self.hidden % 8 == 0
            and self.ffn % 8 == 0
        )

    def _forward_grouped(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        # offs are the cumulative row ends of each expert's group, int32 as the kernel requires.
        offs = torch.cumsum(counts_E, 0).to(torch.int32)
        gate = torch._grouped_mm(x_ND, self.w_gate, offs=offs)
        up = torch._grouped_mm(x_ND, self.w_up, offs=offs)
        return torch._grouped_mm(silu(gate) * up, self.w_down, offs=offs)

    def _forward_loop(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        # One host sync for the group sizes; acceptable on CPU, the fallback path only.
        sizes = counts_E.tolist()
        pieces = []
        start = 0
        for e, n in enumerate(sizes):
            if n:
                x = x_ND[start : start + n]
                pieces.append((silu(x @ self.w_gate[e]) * (x @ self.w_up[e])) @ self.w_down[e])
            start += n
        if not pieces:
            # No rows at all: still go through the graph so backward sees a connected output.
            x = x_ND[:0]
            return (silu(x @ self.w_gate[0]) * (x @ self.w_up[0])) @ self.w_down[0]
        return torch.cat(pieces, 0)

    def forward_compact(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """SwiGLU over a compact buffer: x_ND [N, D] grouped by expert, counts_E [E] int64 sizes.

        Returns y_ND [N, D] in x's dtype. Grouped GEMM on CUDA bf16 when available, else a loop
        of matmuls over experts.
        """
        self._check_x(x_ND, "x_ND", 2)
        if counts_E.dim() != 1 or counts_E.shape[0] != self.num_experts:
            raise ValueError(f"counts_E must be [E] with E={self.num_experts} (got {tuple(counts_E.shape)})")
        if self._use_grouped(x_ND):
            try:
                return self._forward_grouped(x_ND, counts_E)
            except (RuntimeError, TypeError, NotImplementedError):
                # Private API: its signature and constraints vary across torch builds.
                self._grouped_ok = False
        return self._forward_loop(x_ND, counts_E)

    def forward_padded(self, x_ECD: torch.Tensor) -> torch.Tensor:
        """SwiGLU over a padded buffer: x_ECD [E, C, D] -> y_ECD [E, C, D], batched matmuls."""
        self._check_x(x_ECD, "x_ECD", 3)
        if x_ECD.shape[0] != self.num_experts:
            raise ValueError(f"x_ECD must have E={self.num_experts} experts (got {x_ECD.shape[0]})")
        h_ECF = silu(torch.bmm(x_ECD, self.w_gate)) * torch.bmm(x_ECD, self.w_up)
        return torch.bmm(h_ECF, self.w_down)

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Alias of ``forward_compact``."""
        return self.forward_compact(x_ND, counts_E)
