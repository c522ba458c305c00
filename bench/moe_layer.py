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

import torch

from moe_routing_bench.kernels.dispatch import Dispatch, make_dispatch
from moe_routing_bench.kernels.experts import ExpertFFN
from moe_routing_bench.kernels.layer import StageHook, moe_forward
from moe_routing_bench.routers.contract import Plan

SHARED_WEIGHT = "shared_weight_T"
# The stages layer_forward reports through stage_hook, in order ('shared' only when the plan has one).
LAYER_STAGES = ("dispatch", "experts", "combine", "shared")


def plan_dispatch(plan: Plan) -> Dispatch:
    """The plan's ``Dispatch``: which requests are kept under its capacity, and their rows."""
    return make_dispatch(plan.token_R, plan.expert_R, plan.weight_R, plan.num_tokens, plan.num_experts, plan.capacity)


def _check_shared(shared_ffn: ExpertFFN | None, x_TD: torch.Tensor) -> ExpertFFN:
    if shared_ffn is None:
        raise ValueError(
            f"shared_ffn is required: the plan asks for a shared branch (extras[{SHARED_WEIGHT!r}]), "
            "so pass an ExpertFFN with one expert"
        )
    if not isinstance(shared_ffn, ExpertFFN) or shared_ffn.num_experts != 1:
        raise ValueError(f"shared_ffn must be an ExpertFFN with exactly one expert (got {shared_ffn!r})")
    if shared_ffn.hidden != x_TD.shape[1]:
        raise ValueError(f"shared_ffn has D={shared_ffn.hidden} but x_TD has D={x_TD.shape[1]}")
    return shared_ffn


def layer_forward(
    plan: Plan,
    x_TD: torch.Tensor,
    ffn: ExpertFFN,
    backend: str = "torch",
    layout: str | None = None,
    shared_ffn: ExpertFFN | None = None,
    stage_hook: StageHook | None = None,
) -> torch.Tensor:
    """Run one MoE layer over ``plan`` and return out_TD [T, D] in x's dtype.

    x_TD: [T, D] hidden states in the experts' dtype and device. ffn: the E experts.
    backend, layout, stage_hook: as ``kernels.layer.moe_forward`` (stages 'dispatch', 'experts',
    'combine', then 'shared' when the plan has a shared branch).
    shared_ffn: an ``ExpertFFN`` with one expert, required when ``plan.extras`` has
    ``shared_weight_T`` ([T], differentiable); then ``out += shared_weight_T[:, None] * shared(x)``,
    accumulated in float32. Raises ValueError naming the argument at fault.
    """
    shared_weight_T = plan.extras.get(SHARED_WEIGHT)
    if shared_weight_T is not None:
        shared_ffn = _check_shared(shared_ffn, x_TD)
        if tuple(shared_weight_T.shape) != (plan.num_tokens,):
            raise ValueError(
                f"plan.extras[{SHARED_WEIGHT!r}] must have shape [T] = [{plan.num_tokens}] "
                f"(got {list(shared_weight_T.shape)})"
            )
    hook: StageHook = stage_hook if stage_hook is not None else (lambda _stage: nullcontext())
    # `positions` and the row bookkeeping are part of dispatch: the hook sees 'dispatch' twice
    # (here, then around permute), and a timer adds the two.
    with hook("dispatch"):
        d = plan_dispatch(plan)
    out_TD, _ = moe_forward(x_TD, d, ffn, backend=backend, layout=layout, stage_hook=stage_hook)
    if shared_weight_T is None:
        return out_TD
    assert shared_ffn is not None
    with hook("shared"):
        return add_shared_branch(out_TD, x_TD, shared_ffn, shared_weight_T)


def add_shared_branch(
    out_TD: torch.Tensor, x_TD: torch.Tensor, shared_ffn: ExpertFFN, shared_weight_T: torch.Tensor
) -> torch.Tensor:
    """``out + w[:, None] * FFN_shared(x)`` for every token, accumulated in float32, in x's dtype:
    NLLB's dense branch beside the MoE one (the plan's gates already carry ``g``)."""
    counts = torch.tensor([x_TD.shape[0]], dtype=torch.int64, device=x_TD.device)
    shared_TD = shared_ffn.forward_compact(x_TD, counts)
    w_T1 = shared_weight_T.to(device=x_TD.device, dtype=torch.float32)[:, None]
    return (out_TD.float() + w_T1 * shared_TD.float()).to(x_TD.dtype)
