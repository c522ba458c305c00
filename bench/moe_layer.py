"""One MoE layer from a router's plan: where routers and kernels meet.

``layer_forward`` turns a :class:`routers.Plan` into a ``kernels.Dispatch`` (capacity applied once,
by ``positions``), runs the expert layer on a dispatch backend, and adds a shared dense branch
when the plan asks for one: NLLB's conditional MoE sets ``plan.extras["shared_weight_T"] = 1 - g``
and the layer returns ``(1 - g) * FFN_shared(x) + g * MoE(x)`` (the plan's weights already carry
the ``g``). The shared FFN runs for every token, as in fairseq's CMR layer: its cost is part of
the layer, timed as the ``shared`` stage.

Shape letters: T tokens, D hidden, E experts.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

from moe_routing_bench.kernels.dispatch import Dispatch
from moe_routing_bench.kernels.experts import ExpertFFN
from moe_routing_bench.kernels.layer import StageHook, dispatch_for, moe_forward
from moe_routing_bench.kernels.workspace import Workspace
from moe_routing_bench.routers.contract import Plan

SHARED_WEIGHT = "shared_weight_T"
# The stages layer_forward reports through stage_hook, in order ('shared' only when the plan has one).
LAYER_STAGES = ("dispatch", "experts", "combine", "shared")


def plan_dispatch(plan: Plan, backend: str = "torch") -> Dispatch:
    """The plan's ``Dispatch``: which requests are kept under its capacity, and their rows, built
    with ``backend``'s positions op (the triton backend's kernel; torch's otherwise)."""
    return dispatch_for(
        backend, plan.token_R, plan.expert_R, plan.weight_R, plan.num_tokens, plan.num_experts, plan.capacity
    )


def _check_shared(shared_ffn: ExpertFFN | None, x_TD: torch.Tensor, name: str = "shared_ffn") -> ExpertFFN:
    if shared_ffn is None:
        raise ValueError(
            f"shared_ffn is required: the plan asks for a shared branch (extras[{SHARED_WEIGHT!r}]), "
            "so pass an ExpertFFN with one expert"
        )
    if not isinstance(shared_ffn, ExpertFFN) or shared_ffn.num_experts != 1:
        raise ValueError(f"{name} must be an ExpertFFN with exactly one expert (got {shared_ffn!r})")
    if shared_ffn.hidden != x_TD.shape[1]:
        raise ValueError(f"{name} has D={shared_ffn.hidden} but x_TD has D={x_TD.shape[1]}")
    return shared_ffn


def layer_forward(
    plan: Plan,
    x_TD: torch.Tensor,
    ffn: ExpertFFN,
    backend: str = "torch",
    layout: str | None = None,
    shared_ffn: ExpertFFN | None = None,
    stage_hook: StageHook | None = None,
    **kw: Any,
) -> torch.Tensor:
    """Run one MoE layer over ``plan`` and return out_TD [T, D]; see :func:`run_layer`."""
    return run_layer(plan, x_TD, ffn, backend, layout, shared_ffn, stage_hook, **kw)[0]


def run_layer(
    plan: Plan,
    x_TD: torch.Tensor,
    ffn: ExpertFFN,
    backend: str = "torch",
    layout: str | None = None,
    shared_ffn: ExpertFFN | None = None,
    stage_hook: StageHook | None = None,
    *,
    shared_experts: ExpertFFN | None = None,
    workspace: Workspace | None = None,
) -> tuple[torch.Tensor, Dispatch]:
    """Run one MoE layer over ``plan``; returns (out_TD [T, D] in x's dtype, the plan's Dispatch),
    so metrics and byte counts reuse the one ``positions`` of this step.

    x_TD: [T, D] hidden states in the experts' dtype and device. ffn: the E experts.
    backend, layout, stage_hook, workspace: as ``kernels.layer.moe_forward`` (stages 'dispatch',
    'experts', 'combine', then 'shared'); the dispatch is built with the backend's positions op.
    shared_ffn: an ``ExpertFFN`` with one expert, required when ``plan.extras`` has
    ``shared_weight_T`` ([T], differentiable; NLLB's gated dense branch): then
    ``out += shared_weight_T[:, None] * shared(x)``, accumulated in float32.
    shared_experts: always-on experts (DeepSeek-V3's shared expert), one ``ExpertFFN`` with one
    expert of the shared experts' total width: ``out += shared_experts(x)`` for every token.
    Raises ValueError naming the argument at fault.
    """
    shared_weight_T = plan.extras.get(SHARED_WEIGHT)
    if shared_weight_T is not None:
        shared_ffn = _check_shared(shared_ffn, x_TD)
        if tuple(shared_weight_T.shape) != (plan.num_tokens,):
            raise ValueError(
                f"plan.extras[{SHARED_WEIGHT!r}] must have shape [T] = [{plan.num_tokens}] "
                f"(got {list(shared_weight_T.shape)})"
            )
    if shared_experts is not None:
        shared_experts = _check_shared(shared_experts, x_TD, "shared_experts")
    hook: StageHook = stage_hook if stage_hook is not None else (lambda _stage: nullcontext())
    # `positions` and the row bookkeeping are part of dispatch: the hook sees 'dispatch' twice
    # (here, then around permute), and a timer adds the two.
    with hook("dispatch"):
        d = plan_dispatch(plan, backend)
    out_TD, _ = moe_forward(x_TD, d, ffn, backend=backend, layout=layout, stage_hook=stage_hook, workspace=workspace)
    if shared_weight_T is not None:
        assert shared_ffn is not None
        with hook("shared"):
            out_TD = add_shared_branch(out_TD, x_TD, shared_ffn, shared_weight_T)
    if shared_experts is not None:
        with hook("shared"):
            out_TD = add_shared_branch(out_TD, x_TD, shared_experts, None)
    return out_TD, d


def add_shared_branch(
    out_TD: torch.Tensor, x_TD: torch.Tensor, shared_ffn: ExpertFFN, shared_weight_T: torch.Tensor | None
) -> torch.Tensor:
    """``out + w[:, None] * FFN_shared(x)`` for every token (w = 1 when None: always-on shared
    experts), accumulated in float32, in x's dtype. NLLB's dense branch beside the MoE one passes
    its ``1 - g`` (the plan's gates already carry ``g``)."""
    counts = torch.tensor([x_TD.shape[0]], dtype=torch.int64, device=x_TD.device)
    shared_TD = shared_ffn.forward_compact(x_TD, counts).float()
    if shared_weight_T is not None:
        shared_TD = shared_weight_T.to(device=x_TD.device, dtype=torch.float32)[:, None] * shared_TD
    return (out_TD.float() + shared_TD).to(x_TD.dtype)
