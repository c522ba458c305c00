"""Every registered router through every dispatch backend (via bench.layer, so nllb's shared branch
too), held against the plain reference;
and routing memory that never grows a one-hot [T, E, C] or [T*K, E]."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from moe_routing_bench.bench.metrics import batch_metrics
from moe_routing_bench.bench.moe_layer import layer_forward, plan_dispatch
from moe_routing_bench.kernels.experts import ExpertFFN
from moe_routing_bench.kernels.layer import list_backends
from moe_routing_bench.kernels.positions import positions
from moe_routing_bench.kernels.reference import plain_moe_forward
from moe_routing_bench.routers.contract import Batch
from moe_routing_bench.routers.registry import build_router, router_names

# Per router, the option sets it runs with (an absent router runs once with its defaults), chosen
# so that capacity really drops where a router has one; `expect` says what the case must show.
CASES: dict[str, list[dict]] = {
    "switch": [{"capacity_factor": 0.75}],
    "topk": [{"top_k": 2, "capacity_factor": 0.75}],
    "gshard": [{"capacity_factor": 0.75}],
    # Expert choice never drops a request it made; tokens no expert chose are its "drops"
    # (C = 4: 20 assignments for 24 tokens).
    "expert_choice": [{"top_k": 1, "capacity_factor": 0.75, "expect": "unserved"}],
    "hash": [{"capacity_factor": 0.75}],
    "hierarchical": [
        # E = 5 is prime: five groups of one expert.
        {"num_groups": 5, "topk_group": 3, "top_k": 2, "capacity_factor": 0.75},
        {"num_groups": 5, "topk_group": 3, "top_k": 2, "score_func": "softmax", "norm_topk_prob": False},
        # nllb: the shared branch goes through the layer; its gate from hidden states or a column.
        {"form": "nllb", "capacity_factor": 0.75},
        {"form": "nllb", "gate_source": "logit_column", "capacity_factor": 0.75},
    ],
    # C = ceil(0.5 * T): half of each expert's tokens are dropped.
    "dense": [{"capacity_factor": 0.5}],
}


def _cases() -> list:
    out = []
    for name in router_names():
        for i, opts in enumerate(CASES.get(name, [{}])):
            out.append(pytest.param(name, opts, id=f"{name}-{i}"))
    return out


@pytest.mark.parametrize("backend", list_backends())
@pytest.mark.parametrize(("name", "opts"), _cases())
def test_router_through_backend_matches_plain_reference(name, opts, backend):
    t, e, d = 24, 5, 12
    opts = dict(opts)
    expect = opts.pop("expect", "drops" if "capacity_factor" in opts else None)
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    width = e + 1 if opts.get("gate_source") == "logit_column" else e
    batch = Batch(
        logits_TE=torch.randn(t, width, generator=gen) * 2,
        token_T=torch.randint(0, 100, (t,), generator=gen),
        hidden_TD=torch.randn(t, d, generator=gen),
    )
    router = build_router(name, num_experts=e, **opts)
    plan = router.route(batch)
    ffn = ExpertFFN(e, d, ffn_ratio=1.5, seed=3)
    shared = ExpertFFN(1, d, ffn_ratio=1.5, seed=4)
    out = layer_forward(plan, batch.hidden_TD, ffn, backend=backend, shared_ffn=shared)
    ref = plain_moe_forward(batch.hidden_TD, plan.token_R, plan.expert_R, plan.weight_R, plan.capacity, ffn)
    if "shared_weight_T" in plan.extras:
        # The shared branch as one more plain "expert" that every token visits.
        every = torch.arange(t)
        w_T = plan.extras["shared_weight_T"]
        ref = ref + plain_moe_forward(batch.hidden_TD, every, torch.zeros_like(every), w_T, None, shared)
    torch.testing.assert_close(out, ref.to(out.dtype), atol=1e-5, rtol=1e-5)
    d_ = plan_dispatch(plan)
    if expect == "drops":
        assert d_.num_kept < d_.num_requested  # the case really exercised capacity
    elif expect == "unserved":
        assert torch.bincount(d_.token_N, minlength=t).eq(0).any()


@pytest.mark.parametrize(
    ("name", "opts"),
    [
        ("switch", {"capacity_factor": 1.0}),
        ("topk", {"top_k": 8, "capacity_factor": 1.25, "drop_policy": "probs"}),
        ("gshard", {"capacity_factor": 1.0}),
        ("expert_choice", {"top_k": 8}),
        ("hash", {"capacity_factor": 1.0}),
        ("hierarchical", {"num_groups": 8, "topk_group": 4, "top_k": 8, "capacity_factor": 1.0}),
    ],
)
def test_routing_allocates_nothing_larger_than_the_logits(name, opts):
    # A one-hot [T*K, E] (or [T, E, C]) would be K (or C) times the logits: the largest single
    # allocation while routing, ranking and measuring stays within the logits' own size.
    t, e = 20_000, 64
    batch = Batch(logits_TE=torch.randn(t, e), token_T=torch.arange(t))
    router = build_router(name, num_experts=e, **opts)
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        plan = router.route(batch)
        batch_metrics(plan, positions(plan.expert_R, e)[0])
    largest = max(ev.cpu_memory_usage for ev in prof.events())
    assert 0 < largest <= t * e * 4
