"""validate_plan: every built-in router's plans pass it; each broken field is one PlanError naming
the router, the field and the bad value."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moe_routing_bench.routers.contract import Batch, Plan
from moe_routing_bench.routers.registry import build_router, router_names
from moe_routing_bench.routers.validate import PlanError, validate_plan

T, E = 32, 8


def _batch(columns: int = E) -> Batch:
    gen = torch.Generator().manual_seed(0)
    return Batch(
        torch.randn(T, columns, generator=gen),
        torch.randint(0, 1000, (T,), generator=gen),
        hidden_TD=torch.randn(T, 16, generator=gen),
    )


@pytest.mark.parametrize("name", router_names())
def test_every_builtin_router_plan_passes(name):
    router = build_router(name, num_experts=E, capacity_factor=1.25 if name != "dense" else None)
    batch = _batch()
    if router.needs_fit:  # balanced hash learns from a separate slice first
        router.fit(_batch())
    assert validate_plan(router, batch, router.route(batch)) is not None


def _switch_plan():
    router = build_router("switch", num_experts=E)
    batch = _batch()
    return router, batch, router.route(batch)


NAN = float("nan")


@pytest.mark.parametrize(
    ("change", "needles"),
    [
        # capacity below 1 (a plugin's arithmetic gone wrong), a fraction, a bool
        ({"capacity": -3}, ("capacity = -3", "integer >= 1")),
        ({"capacity": 0}, ("capacity = 0",)),
        ({"capacity": 2.5}, ("capacity = 2.5",)),
        ({"capacity": True}, ("capacity = True",)),
        # sizes that do not match the batch or the router
        ({"num_tokens": T + 1}, (f"num_tokens = {T + 1}", f"T = {T}")),
        ({"num_experts": E + 1}, (f"num_experts = {E + 1}", f"E = {E}")),
        ({"top_k": NAN}, ("top_k = nan",)),
        ({"top_k": 0}, ("top_k = 0",)),
        ({"top_k": E + 1}, (f"top_k = {E + 1}",)),
        # losses that would poison training
        ({"aux_loss": torch.tensor(NAN)}, ("aux_loss = nan",)),
        ({"z_loss": torch.ones(3)}, ("z_loss = a tensor of shape [3]",)),
    ],
)
def test_broken_scalar_fields_name_router_field_and_value(change, needles):
    router, batch, plan = _switch_plan()
    with pytest.raises(PlanError) as err:
        validate_plan(router, batch, dataclasses.replace(plan, **change), "mine[x=1]")
    assert "router 'mine[x=1]'" in str(err.value) and all(n in str(err.value) for n in needles), err.value


@pytest.mark.parametrize(
    ("field", "values", "needle"),
    [
        ("token_R", lambda p: p.token_R + T, f"token_R = {2 * T - 1}"),  # past the last token
        ("token_R", lambda p: p.token_R - 1, "token_R = -1"),
        ("expert_R", lambda p: p.expert_R + E, "expert_R = "),  # past the last expert
        ("expert_R", lambda p: p.expert_R * 0 - 2, "expert_R = -2"),
        ("weight_R", lambda p: p.weight_R * NAN, "weight_R = nan"),
        ("weight_R", lambda p: p.weight_R + float("inf"), "weight_R = inf"),
        ("weight_R", lambda p: p.weight_R - 2.0, "weight_R = -"),  # negative gates
    ],
)
def test_broken_arrays_name_a_bad_value(field, values, needle):
    router, batch, plan = _switch_plan()
    bad = dataclasses.replace(plan, **{field: values(plan)})
    with pytest.raises(PlanError, match="router 'switch'") as err:
        validate_plan(router, batch, bad)
    assert needle in str(err.value), err.value


def test_not_a_plan_and_non_float_weights():
    router, batch, plan = _switch_plan()
    with pytest.raises(PlanError, match="returned NoneType, not a Plan"):
        validate_plan(router, batch, None)
    ints = dataclasses.replace(plan, weight_R=torch.ones(plan.num_requests, dtype=torch.int64))
    with pytest.raises(PlanError, match=r"weight_R\.dtype"):
        validate_plan(router, batch, ints)
    nan_extra = dataclasses.replace(plan, extras={"shared_weight_T": torch.full((T,), NAN)})
    with pytest.raises(PlanError, match=r"extras\['shared_weight_T'\] = nan"):
        validate_plan(router, batch, nan_extra)


def test_an_empty_plan_and_a_dropless_one_pass():
    # a router may request nothing (every second choice skipped); dropless is capacity None
    router, batch, plan = _switch_plan()
    empty = torch.empty(0, dtype=torch.int64)
    nothing = Plan(empty, empty, torch.empty(0), T, E, None, 1.0)
    assert validate_plan(router, batch, nothing) is nothing
    assert validate_plan(router, batch, dataclasses.replace(plan, capacity=None)) is not None


def test_hash_needs_a_fit_slice_only_in_its_balanced_variant():
    assert not build_router("hash", num_experts=E).needs_fit
    assert build_router("hash", num_experts=E, variant="balanced").needs_fit
    assert not build_router("switch", num_experts=E).needs_fit
