"""Routing cost against a bare ``softmax + torch.topk`` on the same logits, side by side.

    moe-bench route-cost [--tokens 1000000] [--experts 256] [--top-k 8] [--repeats 3]
        [--routers SPEC,...] [--dense-tokens 131072] [--bf16-logits]

For each router: route + positions + every metric (what ``moe-bench route`` does per batch),
timed alternately with the baseline on the same [T, E] logits in the same process (so both see
the same machine load, ``timing.time_alternating``), medians over repeats.

Routers are specs (``name[key=value,...]``); ``--top-k`` applies where a router's K is free
(topk, expert_choice, hierarchical), as everywhere. The default ``hierarchical`` is DeepSeek-V3's
shape (8 groups, 4 kept); the ``nllb`` form reads its level-1 gate from an extra logit column, so
it routes logits of E + 1 columns. ``dense`` requests T * E assignments (5 GiB of plan at T = 10^6,
E = 256), so it is measured at ``--dense-tokens`` with its own baseline at that T.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from moe_routing_bench.bench.metrics import batch_metrics
from moe_routing_bench.bench.routing import wants_fit
from moe_routing_bench.bench.spec import Spec, router_options
from moe_routing_bench.bench.timing import time_alternating
from moe_routing_bench.kernels.positions import positions
from moe_routing_bench.routers.contract import Batch
from moe_routing_bench.routers.registry import build_router
from moe_routing_bench.routers.validate import validate_plan

DEFAULT_ROUTERS = (
    "topk,topk[capacity_factor=1.25],topk[capacity_factor=1.25,drop_policy=random],topk[bias_update_rate=0.001],"
    "switch[capacity_factor=1.0],switch[capacity_factor=1.0,drop_policy=random],gshard[capacity_factor=1.0],"
    "expert_choice[capacity_factor=1.0],sinkhorn,topp,hash,hierarchical[num_groups=8,topk_group=4],"
    "hierarchical[bias_update_rate=0.001,num_groups=8,topk_group=4],"
    "hierarchical[capacity_factor=1.0,form=nllb,gate_source=logit_column,top_k=2],dense"
)


@dataclass
class Cost:
    """One router's routing cost: median seconds, and the baseline's on the same logits."""

    label: str
    tokens: int
    seconds: float
    baseline: float

    @property
    def ratio(self) -> float:
        return self.seconds / self.baseline


def route_cost(
    specs: list[Spec],
    tokens: int,
    experts: int,
    top_k: int,
    repeats: int,
    dense_tokens: int = 131_072,
    bf16_logits: bool = False,
) -> list[Cost]:
    """Each router against softmax + topk(K) on the same seeded logits (CPU). bf16_logits: round
    them to bfloat16 (kept float32), as a captured trace's are: many rows then hold ties."""
    gen = torch.Generator().manual_seed(0)
    # One extra column: the nllb form's level-1 gate logit. Other routers see a view of the first E.
    logits_TX = torch.randn(tokens, experts + 1, generator=gen)
    if bf16_logits:
        logits_TX = logits_TX.bfloat16().float()
    token_T = torch.randint(0, 50_000, (tokens,), generator=gen)
    logits_TE = logits_TX[:, :experts].contiguous()
    out = []
    with torch.inference_mode():
        for spec in specs:
            opts = router_options(spec, experts=experts, seed=0, top_k=top_k)
            router = build_router(spec.name, **opts)
            if wants_fit(router):  # hash[variant=balanced]: a separate slice of ids, untimed
                fit_ids = torch.randint(0, 50_000, (tokens,), generator=gen)
                router.fit(Batch(logits_TE=logits_TE[: fit_ids.shape[0]], token_T=fit_ids))
            t = tokens if spec.name != "dense" or dense_tokens <= 0 else min(dense_tokens, tokens)
            logits = logits_TX if opts.get("gate_source") == "logit_column" else logits_TE
            b = Batch(logits_TE=logits[:t], token_T=token_T[:t])
            x_TE = logits_TE[:t]

            def base_step(x_TE=x_TE):
                return torch.topk(torch.softmax(x_TE, -1), top_k, -1)

            def step(router=router, b=b):
                plan = router.route(b)
                rank_R = None if plan.capacity is None else positions(plan.expert_R, plan.num_experts)[0]
                out = batch_metrics(plan, rank_R)
                router.update(plan)  # as route does after every batch (a stateful router's bias)
                return out

            validate_plan(router, b, router.route(b), spec.label)  # once, untimed: a broken plan is no figure
            times = time_alternating({"base": base_step, "router": step}, "cpu", repeats)
            out.append(Cost(spec.label, t, statistics.median(times["router"]), statistics.median(times["base"])))
    return out
