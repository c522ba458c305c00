"""Every registered router through every dispatch backend, held against the plain reference;
and routing memory that never grows a one-hot [T, E, C] or [T*K, E]."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from bench.metrics import batch_metrics
from kernels import positions
from kernels.dispatch import make_dispatch
from kernels.experts import ExpertFFN
from kernels.layer import list_backends, moe_forward
from kernels.reference import plain_moe_forward
from routers import Batch, build_router, router_names

CASES = {
    # (options) chosen so that capacity really drops for routers that have one
    "switch": {"capacity_factor": 0.75},
    "topk": {"top_k": 2, "capacity_factor": 0.75},
}


@pytest.mark.parametrize("backend", list_backends())
@pytest.mark.parametrize("name", router_names())
def test_router_through_backend_matches_plain_reference(name, backend):
    t, e, d = 24, 5, 12
    gen = torch.Generator().manual_seed(hash(name) % 1000)
    batch = Batch(
        logits_TE=torch.randn(t, e, generator=gen) * 2,
        token_T=torch.randint(0, 100, (t,), generator=gen),
        hidden_TD=torch.randn(t, d, generator=gen),
    )
    router = build_router(name, num_experts=e, **CASES.get(name, {}))
    plan = router.route(batch)
    ffn = ExpertFFN(e, d, ffn_ratio=1.5, seed=3)
    d_ = make_dispatch(plan.token_R, plan.expert_R, plan.weight_R, plan.num_tokens, e, plan.capacity)
    out, _ = moe_forward(batch.hidden_TD, d_, ffn, backend=backend)
    ref = plain_moe_forward(batch.hidden_TD, plan.token_R, plan.expert_R, plan.weight_R, plan.capacity, ffn)
    torch.testing.assert_close(out, ref.to(out.dtype), atol=1e-5, rtol=1e-5)
    if name in CASES:
        assert d_.num_kept < d_.num_requested  # the case really exercised capacity


@pytest.mark.parametrize(
    ("name", "opts"),
    [
        ("switch", {"capacity_factor": 1.0}),
        ("topk", {"top_k": 8, "capacity_factor": 1.25, "drop_policy": "probs"}),
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
