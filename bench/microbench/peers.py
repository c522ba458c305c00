"""The dispatch round trip side by side with the peers' on the same routing: ours against
Megatron-core's unfused permute/unpermute (CPU and GPU) and, on a GPU, vLLM's fused_moe, each
checked equal to ours before it is timed.

The round trip starts where a router ends, from each token's K experts and gates
(``expert_TK``, ``weight_TK``), and ends with the gated sum per token, ``out[t] = sum_k w[t, k] *
x[t]`` (identity experts: only data movement is measured). "Dispatch build included": ours builds
its ``Dispatch`` (``positions`` included), Megatron-core its routing map and probs, in the timed
region. Providers:

- ``ours``: make_dispatch + permute + combine (the torch backend, compact layout);
- ``ours+workspace``: the same writing into a reused ``Workspace`` (forward only);
- ``ours-native``: the native backend (C kernels: streaming row scatter, counting-sort combine),
  CPU, where a C compiler is found; ``ours-native+workspace`` writing into a reused ``Workspace``;
- ``ours-triton``: the triton backend (its positions kernel, permute and combine), where it runs;
- ``megatron``: ``megatron.core.transformer.moe.moe_utils.permute`` + ``unpermute`` (unfused);
- ``copy``: a copy of the same bytes into a fresh buffer, ``copy-reused``: into a preallocated one.

vLLM's ``fused_moe`` runs the experts too, so it is compared as a whole layer (:func:`layer_providers`).
Each provider is ``(callable, None)`` or ``(None, why it cannot run here)``.

Shape letters: T tokens, D hidden, E experts, K choices per token, N = T K kept rows.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from moe_routing_bench.kernels.dispatch import make_dispatch
from moe_routing_bench.kernels.experts import ExpertFFN
from moe_routing_bench.kernels.layer import dispatch_for, get_backend, moe_forward
from moe_routing_bench.kernels.workspace import Workspace

Provider = tuple[Callable[[], torch.Tensor] | None, str | None]


@dataclass
class RoundTrip:
    """One routed batch: x_TD [T, D], each token's K experts and gates [T, K]."""

    x_TD: torch.Tensor
    expert_TK: torch.Tensor
    weight_TK: torch.Tensor
    num_experts: int

    @property
    def nbytes(self) -> int:
        """Bytes an ideal permute + combine moves (compact, dropless, N = T K): permute reads N
        token rows and writes N; combine reads N rows and writes T (gates and indices ignored)."""
        t, k = self.expert_TK.shape
        return (3 * t * k + t) * self.x_TD.shape[1] * self.x_TD.element_size()


def setup(tokens: int, hidden: int, experts: int, top_k: int, dtype: torch.dtype, device, seed: int = 0) -> RoundTrip:
    """Top-K of seeded uniform scores per token (each expert gets about T K / E rows), softmax gates."""
    gen = torch.Generator(device=device).manual_seed(seed)
    top, expert_TK = torch.rand(tokens, experts, generator=gen, device=device).topk(top_k, dim=1)
    x = torch.randn(tokens, hidden, generator=gen, device=device).to(dtype)
    return RoundTrip(x, expert_TK, torch.softmax(top, dim=1), experts)


def _plan(rt: RoundTrip) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    t, k = rt.expert_TK.shape
    token_R = torch.arange(t, device=rt.x_TD.device).repeat(k)
    return token_R, rt.expert_TK.t().reshape(-1), rt.weight_TK.t().reshape(-1)


def ours(rt: RoundTrip, workspace: Workspace | None = None, backend: str = "torch") -> Callable[[], torch.Tensor]:
    t = rt.x_TD.shape[0]
    impl = get_backend(backend)

    def run() -> torch.Tensor:
        d = dispatch_for(backend, *_plan(rt), t, rt.num_experts, None)
        if workspace is None:
            return impl.combine(impl.permute(rt.x_TD, d, "compact"), d, "compact")
        y = impl.permute_into(rt.x_TD, d, "compact", workspace)
        return impl.combine_into(y, d, "compact", workspace)

    return run


def megatron(rt: RoundTrip) -> Provider:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Transformer Engine and Apex are not installed" on CPU
            moe_utils = importlib.import_module("megatron.core.transformer.moe.moe_utils")
    except Exception as exc:  # not installed, or broken here
        return (
            None,
            f"megatron-core not importable ({type(exc).__name__}: {exc}); pip install 'moe-routing-bench[peers]'",
        )
    t, k = rt.expert_TK.shape

    def run() -> torch.Tensor:
        # Megatron's router hands its dispatcher a [T, E] routing map and probs: built here.
        routing_map = torch.zeros(t, rt.num_experts, dtype=torch.bool, device=rt.x_TD.device)
        routing_map.scatter_(1, rt.expert_TK, True)
        probs = torch.zeros(t, rt.num_experts, dtype=rt.weight_TK.dtype, device=rt.x_TD.device)
        probs.scatter_(1, rt.expert_TK, rt.weight_TK)
        px, _, idx = moe_utils.permute(rt.x_TD, routing_map, num_out_tokens=t * k)
        return moe_utils.unpermute(px, idx, rt.x_TD.shape, probs=probs, routing_map=routing_map)

    return run, None


def copies(rt: RoundTrip) -> dict[str, Provider]:
    """A copy of the round trip's bytes: into a fresh buffer (first touch included), and into a
    preallocated one (the reference the workspace is held to)."""
    src = torch.empty(max(1, rt.nbytes // 2), dtype=torch.uint8, device=rt.x_TD.device).random_(0, 255)
    dst = torch.empty_like(src)
    return {"copy": (lambda: src.clone(), None), "copy-reused": (lambda: dst.copy_(src), None)}


def providers(rt: RoundTrip) -> dict[str, Provider]:
    """Every round-trip provider, ours first."""

    def ours_on(backend: str, workspace: Workspace | None = None) -> Provider:
        why = get_backend(backend).unavailable(rt.x_TD.device)
        return (ours(rt, workspace, backend), None) if why is None else (None, why)

    return {
        "ours": ours_on("torch"),
        "ours+workspace": ours_on("torch", Workspace()),
        "ours-native": ours_on("native"),
        "ours-native+workspace": ours_on("native", Workspace()),
        "ours-triton": ours_on("triton"),
        "megatron": megatron(rt),
        **copies(rt),
    }


def check_equal(reference: torch.Tensor, got: torch.Tensor, name: str) -> str:
    """'ok', or how a provider's output differs from ours (checked before timing)."""
    tol = 1e-5 if reference.dtype in (torch.float32, torch.float64) else 2e-2
    try:
        torch.testing.assert_close(got.float(), reference.float(), atol=tol, rtol=tol)
    except AssertionError as exc:
        return f"{name} differs from ours: {str(exc).splitlines()[0]}"
    return "ok"


def layer_providers(rt: RoundTrip, ffn: ExpertFFN) -> dict[str, Provider]:
    """Whole MoE layers (dispatch, SwiGLU experts, combine): ours against vLLM's fused_moe and
    MegaBlocks where importable (GPU). Gates: ours as given; vLLM recomputes them from logits."""
    t = rt.x_TD.shape[0]

    def ours_layer() -> torch.Tensor:
        d = make_dispatch(*_plan(rt), t, rt.num_experts, None)
        return moe_forward(rt.x_TD, d, ffn, backend="torch")[0]

    out: dict[str, Provider] = {"ours-layer": (ours_layer, None)}
    out["vllm-fused_moe"] = _vllm(rt, ffn)
    try:
        importlib.import_module("megablocks")
        out["megablocks"] = (None, "megablocks is importable, but its dMoE owns its weights; no adapter yet")
    except Exception as exc:
        out["megablocks"] = (None, f"megablocks not importable ({type(exc).__name__})")
    return out


def _vllm(rt: RoundTrip, ffn: ExpertFFN) -> Provider:
    if not rt.x_TD.is_cuda:
        return None, "vLLM's fused_moe runs on CUDA only"
    if ffn.kind != "swiglu":
        return None, "vLLM's fused_moe computes SwiGLU experts only"
    try:
        fused = importlib.import_module("vllm.model_executor.layers.fused_moe").fused_moe
    except Exception as exc:
        return None, f"vllm not importable ({type(exc).__name__})"
    # vLLM's layout: w1 [E, 2F, D] (gate rows, then up rows), w2 [E, D, F]; it routes from logits
    # with softmax + top-k + renormalise: log-gates reproduce our (normalised) gates exactly.
    w1 = torch.cat([ffn.w_gate, ffn.w_up], dim=2).transpose(1, 2).contiguous()
    w2 = ffn.w_down.transpose(1, 2).contiguous()
    logits = torch.full((rt.x_TD.shape[0], rt.num_experts), -1e4, device=rt.x_TD.device, dtype=torch.float32)
    logits.scatter_(1, rt.expert_TK, rt.weight_TK.float().log())
    k = rt.expert_TK.shape[1]
    return (lambda: fused(rt.x_TD, w1, w2, logits, k, renormalize=True)), None
