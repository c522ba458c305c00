"""``bench.harness.measure``: one configuration in process. A stateful router is updated after every
batch it routes, warm-up included, and the breakdown pass replays the same state."""

from __future__ import annotations

from moe_routing_bench.bench.harness.measure import measure_point
from moe_routing_bench.bench.harness.sweep import Point


def _point(router_opts: dict, repeats: int, warmup: int) -> Point:
    return Point(
        router="topk",
        router_label="topk",
        router_opts=router_opts,
        workload="hot",
        workload_label="hot",
        workload_opts={},
        tokens=256,
        experts=16,
        hidden=8,
        top_k=None,
        capacity_factor=1.0,
        backend="torch",
        layout="default",
        dtype="float32",
        mode="fwd",
        repeats=repeats,
        warmup=warmup,
        seed=0,
        ffn_ratio=2.0,
        device="cpu",
    )


def test_measure_updates_after_every_batch_and_the_loads_converge(update_calls):
    _, parts = measure_point(_point({"bias_update_rate": 0.02, "capacity_factor": 1.0}, repeats=60, warmup=2))
    routers = list(dict.fromkeys(rid for rid, _ in update_calls))
    # The measured router: 2 warm-up + 60 timed batches; then the breakdown's fresh router, the same.
    assert len(routers) == 2 and [sum(rid == r for rid, _ in update_calls) for r in routers] == [62, 62]
    loads = parts["loads"]
    by_batch: dict[int, list[int]] = {}
    for rec in loads:
        by_batch.setdefault(rec["batch"], []).append(rec["requested"])
    imbalance = [max(v) / (sum(v) / len(v)) for _, v in sorted(by_batch.items())]
    assert sum(imbalance[-10:]) / 10 < 0.5 * sum(imbalance[:3]) / 3, imbalance
    # The breakdown replayed the measured pass: the kept requests it counts are the loads' kept.
    kept = sum(
        round(v["requests"] * (1 - v["drop_rate"])) for v in (b for b in parts["breakdown"] if b["kind"] == "position")
    )
    assert kept == sum(rec["kept"] for rec in loads)
