"""``bench.routing``: routing alone over batches calls ``update`` after each one, with a fresh router
per configuration, so a stateful router's state never leaks from one configuration to the next."""

from __future__ import annotations

import torch

from moe_routing_bench.bench.breakdown import DropSplit
from moe_routing_bench.bench.routing import route_batches, route_specs
from moe_routing_bench.bench.spec import parse_spec
from moe_routing_bench.routers.registry import build_router
from moe_routing_bench.workloads.registry import build_workload


def test_route_specs_updates_after_every_batch_with_a_fresh_router_per_spec(update_calls):
    specs = [parse_spec("topk[bias_update_rate=0.05]"), parse_spec("switch[bias_update_rate=0.05]")]
    report = route_specs(specs, parse_spec("hot"), tokens=256, experts=8, batches=6, seed=0, device=torch.device("cpu"))
    routers = {id(r.router) for r in report.results.values()}
    assert len(routers) == 2
    assert [c for c in update_calls] == [
        (rid, 256) for rid in (id(report.results[s.label].router) for s in specs) for _ in range(6)
    ]
    # The state is what the batches taught: the hot expert's bias went down.
    bias = report.results[specs[0].label].router.expert_bias
    assert float(bias.min()) < 0 < float(bias.max())


def test_a_second_configuration_starts_from_zero_and_the_breakdown_is_of_the_routed_plans():
    batches = list(build_workload("hot", {}, seed=0).batches(256, 8, 10, "cpu"))
    opts = {"num_experts": 8, "bias_update_rate": 0.05, "capacity_factor": 1.0}
    split = DropSplit(batches)
    first = route_batches(build_router("topk", **opts), batches, split=split)
    second = route_batches(build_router("topk", **opts), batches)
    assert first.per_batch == second.per_batch  # no state leaked from the first router
    assert float(first.router.expert_bias.abs().sum()) > 0
    # The breakdown counts the very plans the stateful router made, batch after batch as it
    # learned: it keeps what the loads say was kept.
    table = split.table()
    kept = sum(round(v["requests"] * (1 - v["drop_rate"])) for v in table["position"].values())
    assert kept == sum(int(ld.kept_E.sum()) for ld in first.loads)
    assert kept < sum(int(ld.requested_E.sum()) for ld in first.loads)  # capacity dropped some
