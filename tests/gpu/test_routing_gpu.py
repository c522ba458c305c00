"""Every router routes a trace the same on CPU and CUDA (DESIGN.md's tie rule: the same device-
independent winner among equal scores).

A captured trace of bf16 logits is full of ties; ``torch.topk`` breaks them differently on the two
devices, the routers' shared selection (``routers.selection``) does not. Routers that select on
the logits themselves must agree exactly, request for request. Routers that select on computed
scores (a softmax or sigmoid, Sinkhorn's scaling, a balancing bias) may see last-bit differences
between the devices' float kernels, which can flip a choice between two scores within an ulp of
each other: they must agree on all-equal logits exactly and on the trace for all but 0.1% of tokens.
The routers come from the registry, so a new one is covered. ``make test-gpu`` runs this file.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from moe_routing_bench.bench.routing import wants_fit  # noqa: E402
from moe_routing_bench.routers.contract import Batch  # noqa: E402
from moe_routing_bench.routers.registry import build_router, router_names  # noqa: E402

CUDA = torch.device("cuda")
CPU = torch.device("cpu")
E, T = 64, 8192
VARIANTS: dict[str, list[dict]] = {
    "hierarchical": [{"form": "nllb", "gate_source": "logit_column"}, {"score_func": "softmax"}],
    "hash": [{"variant": "balanced"}],
    "topk": [{"top_k": 8}, {"capacity_factor": 1.0, "drop_policy": "random"}, {"bias_update_rate": 0.01}],
    "switch": [{"bias_update_rate": 0.01}],
    "gshard": [{"second_policy": "always"}],
}
# Selection reads the logits (or token ids) directly: no float arithmetic before the comparison.
EXACT = {"switch", "topk", "gshard", "hash", "dense"}
CASES = [(n, {}) for n in router_names()] + [
    (n, o) for n, opts in VARIANTS.items() for o in opts if n in router_names()
]


def _exact(name: str, opts: dict) -> bool:
    if name == "hierarchical":
        return opts.get("form") == "nllb"
    return name in EXACT and not opts.get("bias_update_rate")


def _trace(seed: int, columns: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # bf16 logits of a gate with few distinct rows (frequent tokens repeat) and many ties.
    logits = (torch.randn(T, columns, generator=gen) * 2).bfloat16().float()
    logits[: T // 8] = logits[T // 8 : T // 4]  # repeated rows
    logits[T // 4 : T // 4 + 64] = 0.0  # a zero-initialised gate's rows
    return logits, torch.randint(0, 5000, (T,), generator=gen)


def _route(name, opts, device, batches):
    router = build_router(name, num_experts=E, seed=1, **opts)
    if wants_fit(router):
        router.fit(Batch(torch.zeros(T, E), batches[0][1].clone()))
    plans = []
    for logits, tokens in batches:
        hidden = torch.randn(T, 16, generator=torch.Generator().manual_seed(7))
        b = Batch(logits.to(device), tokens.to(device), hidden_TD=hidden.to(device))
        plan = router.route(b)
        router.update(plan)
        plans.append(plan)
    return plans


def _per_token(plan) -> list[tuple[int, ...]]:
    """Each token's (or, for expert choice, each expert's) requests in priority order."""
    key, other = (plan.expert_R, plan.token_R) if plan.experts_choose else (plan.token_R, plan.expert_R)
    n = plan.num_experts if plan.experts_choose else plan.num_tokens
    out: list[list[int]] = [[] for _ in range(n)]
    for k, o in zip(key.cpu().tolist(), other.cpu().tolist(), strict=True):
        out[k].append(o)
    return [tuple(v) for v in out]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0] + str(c[1] or ""))
def test_router_routes_the_same_trace_identically_on_cpu_and_cuda(case):
    name, opts = case
    columns = E + 1 if opts.get("gate_source") == "logit_column" else E
    batches = [_trace(s, columns) for s in range(3)]
    cpu, gpu = _route(name, opts, CPU, batches), _route(name, opts, CUDA, batches)
    for p_cpu, p_gpu in zip(cpu, gpu, strict=True):
        assert p_cpu.capacity == p_gpu.capacity
        if _exact(name, opts):
            assert torch.equal(p_cpu.token_R, p_gpu.token_R.cpu())
            assert torch.equal(p_cpu.expert_R, p_gpu.expert_R.cpu())
            torch.testing.assert_close(p_cpu.weight_R, p_gpu.weight_R.cpu(), rtol=1e-5, atol=1e-6)
        else:
            a, b = _per_token(p_cpu), _per_token(p_gpu)
            differ = sum(x != y for x, y in zip(a, b, strict=True))
            assert differ <= max(1, len(a) // 1000), f"{name}{opts}: {differ} of {len(a)} differ"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0] + str(c[1] or ""))
def test_all_equal_logits_route_identically(case):
    name, opts = case
    columns = E + 1 if opts.get("gate_source") == "logit_column" else E
    batches = [(torch.zeros(T, columns), torch.arange(T))]
    (p_cpu,), (p_gpu,) = _route(name, opts, CPU, batches), _route(name, opts, CUDA, batches)
    assert torch.equal(p_cpu.token_R, p_gpu.token_R.cpu()) and torch.equal(p_cpu.expert_R, p_gpu.expert_R.cpu())
