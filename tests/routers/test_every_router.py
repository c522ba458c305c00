"""Rules every router must keep, enumerated from the registry, so a router added later (built-in or
plugin) is checked without editing this file: the tie rule on all-equal logits, determinism given
the seed, differentiable gates, the shared z-loss, aux loss and sequence-wise aux loss, and finite
plans for any finite logits. A router that departs from a shared definition is named below with
the reason (and fails here until it is)."""

from __future__ import annotations

import pytest
import torch

from moe_routing_bench.bench.routing import wants_fit
from moe_routing_bench.routers.contract import Batch
from moe_routing_bench.routers.registry import build_router, router_names

E = 8
# Variants beyond each router's defaults: other forms and options that change what is selected.
VARIANTS: dict[str, list[dict]] = {
    "hierarchical": [{"form": "nllb"}, {"score_func": "softmax"}, {"bias_update_rate": 0.05}],
    "hash": [{"variant": "balanced"}],
    "topk": [{"bias_update_rate": 0.05}, {"capacity_factor": 1.0, "drop_policy": "random"}],
    "switch": [{"bias_update_rate": 0.05}, {"drop_policy": "random"}],
    "gshard": [{"bias_update_rate": 0.05}],
    "topp": [{"p": 0.9, "max_k": 8}],
}
LOGIT_FREE = {"hash": "the expert is a function of the token id; there are no scores to tie"}
NO_AUX = {
    "expert_choice": "balanced by construction (each expert takes C tokens)",
    "hash": "no learned gate",
    "sinkhorn": "balanced by construction (Sinkhorn's column marginals)",
}
CASES = [(n, {}) for n in router_names()] + [
    (n, o) for n, opts in VARIANTS.items() for o in opts if n in router_names()
]


def _id(case) -> str:
    name, opts = case
    return name + ("[" + ",".join(f"{k}={v}" for k, v in opts.items()) + "]" if opts else "")


def _router(name, opts, seed=0):
    r = build_router(name, num_experts=E, seed=seed, **opts)
    if wants_fit(r):
        r.fit(Batch(torch.zeros(64, E), torch.arange(64)))
    return r


def _batch(t=64, seed=0, scale=1.0, logits=None, seq=None):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, E, generator=gen) * scale if logits is None else logits
    t = x.shape[0]
    return Batch(logits_TE=x, token_T=torch.arange(t), seq_T=seq, hidden_TD=torch.randn(t, 4, generator=gen))


def _shares(router, logits):
    """P's per-token shares: the softmax, except the sigmoid groups' normalised sigmoid."""
    cfg = router.config
    if getattr(cfg, "form", None) == "groups" and cfg.score_func == "sigmoid":
        return torch.softmax(torch.nn.functional.logsigmoid(logits), dim=-1)
    return torch.softmax(logits, dim=-1)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_ties_go_to_the_lower_index(case):
    # All-equal logits (a zero-initialised gate): each token asks for experts 0, 1, ... in that
    # order; an expert that picks tokens takes tokens 0, 1, ... (DESIGN.md's tie rule).
    name, opts = case
    if name in LOGIT_FREE:
        pytest.skip(LOGIT_FREE[name])
    plan = _router(name, opts).route(_batch(logits=torch.zeros(40, E)))
    if plan.experts_choose:
        for e in range(E):
            tokens = plan.token_R[plan.expert_R == e].tolist()
            assert tokens == list(range(len(tokens))), (e, tokens)
        return
    for t in range(40):
        experts = plan.expert_R[plan.token_R == t].tolist()
        assert experts == list(range(len(experts))), (t, experts)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_deterministic_given_the_seed_with_state_carried(case):
    name, opts = case
    a, b = _router(name, opts, seed=3), _router(name, opts, seed=3)
    for s in range(4):
        batch = _batch(seed=s, scale=2.0)
        pa, pb = a.route(batch), b.route(batch)
        assert torch.equal(pa.token_R, pb.token_R) and torch.equal(pa.expert_R, pb.expert_R)
        assert torch.equal(pa.weight_R, pb.weight_R)
        a.update(pa)
        b.update(pb)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_gates_are_differentiable_and_finite(case):
    name, opts = case
    if name in LOGIT_FREE:
        pytest.skip(LOGIT_FREE[name])
    batch = _batch(seed=4)
    batch.logits_TE.requires_grad_(True)
    plan = _router(name, opts).route(batch)
    (plan.weight_R * torch.linspace(0.5, 1.5, plan.num_requests)).sum().backward()
    grad = batch.logits_TE.grad
    assert grad is not None and grad.abs().sum() > 0 and bool(torch.isfinite(grad).all())


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_z_loss_is_mean_squared_logsumexp(case):
    # Routers take the logsumexp from the softmax's largest entry or a chosen logit: it must agree
    # with torch.logsumexp, also for large and very peaked logits.
    name, opts = case
    batch = _batch(t=200, seed=5, scale=30.0)
    plan = _router(name, opts).route(batch)
    if name in LOGIT_FREE:
        assert plan.z_loss is None
        return
    expected = torch.logsumexp(batch.logits_TE, -1).square().mean()
    torch.testing.assert_close(plan.z_loss, expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_aux_loss_is_the_shared_definition(case):
    # E / (K T) sum_e R_e P_e with R_e the requested load, K = R / T and P_e the mean share.
    name, opts = case
    router = _router(name, opts)
    batch = _batch(t=300, seed=6, scale=2.0)
    plan = router.route(batch)
    assert (plan.aux_loss is None) == (name in NO_AUX), NO_AUX.get(name, "defines no aux loss")
    assert (plan.aux_loss_seq is None) == (plan.aux_loss is None or batch.seq_T is None)
    if plan.aux_loss is None:
        return
    load_E = torch.bincount(plan.expert_R, minlength=E).double()
    p_E = _shares(router, batch.logits_TE).mean(0).double()
    expected = E / plan.num_requests * (load_E * p_E).sum()
    torch.testing.assert_close(plan.aux_loss.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_aux_loss_seq_per_sequence_and_equal_to_aux_for_one_sequence(case):
    name, opts = case
    if name in NO_AUX:
        pytest.skip(NO_AUX[name])
    t = 240
    seq = torch.arange(t) // 60 + 7  # four sequences, ids not starting at 0
    batch = _batch(t=t, seed=7, scale=2.0, seq=seq)
    router = _router(name, opts)
    plan = router.route(batch)
    shares = _shares(router, batch.logits_TE).double()
    losses = []
    for s in seq.unique():
        in_s = seq == s
        req_s = in_s[plan.token_R]
        load_E = torch.bincount(plan.expert_R[req_s], minlength=E).double()
        losses.append(E / int(req_s.sum()) * (load_E * shares[in_s].mean(0)).sum())
    torch.testing.assert_close(plan.aux_loss_seq.double(), torch.stack(losses).mean(), rtol=1e-5, atol=1e-6)
    one = _router(name, opts).route(_batch(t=t, seed=7, scale=2.0, seq=torch.zeros(t, dtype=torch.int64)))
    torch.testing.assert_close(one.aux_loss_seq, one.aux_loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_plan_is_finite_for_extreme_logits(case):
    # One token with every logit far below -90 (sigmoid underflows to 0), one far above +90, one
    # with a 400-nat spread: gates, losses and gradients stay finite.
    name, opts = case
    logits = torch.randn(16, E, generator=torch.Generator().manual_seed(8))
    logits[0] = -120.0 - torch.arange(E)
    logits[1] = 150.0 + torch.arange(E)
    logits[2] = torch.linspace(-200, 200, E)
    batch = _batch(logits=logits.clone().requires_grad_(True), seq=torch.arange(16) // 8)
    plan = _router(name, opts).route(batch)
    for what in ("weight_R", "aux_loss", "z_loss", "aux_loss_seq"):
        v = getattr(plan, what)
        assert v is None or bool(torch.isfinite(v).all()), (what, v)
    assert bool((plan.weight_R >= 0).all())
    if name not in LOGIT_FREE:
        loss = plan.weight_R.sum() + sum(x for x in (plan.aux_loss, plan.z_loss, plan.aux_loss_seq) if x is not None)
        loss.backward()
        assert bool(torch.isfinite(batch.logits_TE.grad).all())


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_gate_gradients_match_finite_differences(case):
    # Not only "some gradient is non-zero": the analytic derivative of every gate with respect to
    # every logit equals the central difference. Routers compute in float32, so the step is 1e-3
    # (truncation error ~1e-6, rounding ~1e-4) and logits are spread 0.1 apart, far above it, so
    # the selection stays fixed while the gates move. A fresh router per call keeps random choices
    # (gshard's second expert, random drops) the same.
    name, opts = case
    if name in LOGIT_FREE:
        pytest.skip(LOGIT_FREE[name])
    gen = torch.Generator().manual_seed(8)
    t, eps = 6, 1e-3
    logits = torch.randperm(t * E, generator=gen).double().reshape(t, E) / 10
    hidden = torch.randn(t, 4, generator=gen)

    def gates(x):
        return _router(name, opts).route(Batch(logits_TE=x.float(), token_T=torch.arange(t), hidden_TD=hidden)).weight_R

    analytic = torch.autograd.functional.jacobian(gates, logits).double()  # [R, T, E]
    numeric = torch.zeros_like(analytic)
    for idx in range(t * E):
        step = torch.zeros(t * E, dtype=torch.float64)
        step[idx] = eps
        step = step.reshape(t, E)
        numeric.view(analytic.shape[0], -1)[:, idx] = (gates(logits + step) - gates(logits - step)).double() / (2 * eps)
    torch.testing.assert_close(analytic, numeric, atol=2e-3, rtol=1e-2)
