"""Model presets: every preset's router routes at the model's E and K, and the commands take them."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from moe_routing_bench.bench.cli import main
from moe_routing_bench.bench.models import PRESETS, get_model
from moe_routing_bench.bench.spec import router_options
from moe_routing_bench.routers.contract import Batch
from moe_routing_bench.routers.registry import build_router

NAMES = ("switch-base-128", "nllb-moe-54b", "mixtral-8x7b", "mixtral-8x22b", "dbrx", "olmoe-1b-7b",
         "qwen3-30b-a3b", "qwen3-235b-a22b", "deepseek-v3", "gpt-oss-120b")  # fmt: skip


def test_the_ten_presets_are_there_by_name():
    assert tuple(PRESETS) == NAMES
    for p in PRESETS.values():
        assert p.source and p.ffn_kind in ("swiglu", "relu") and 0 < p.moe_layers <= p.layers


@pytest.mark.parametrize("name", NAMES)
def test_each_presets_router_routes_with_the_models_experts_and_k(name):
    p = get_model(name)
    spec = p.router_spec
    router = build_router(spec.name, **router_options(spec, experts=p.experts, seed=0))
    assert router.config.num_experts == p.experts and router.config.top_k == p.top_k
    gen = torch.Generator().manual_seed(0)
    t = 64
    extra = 1 if getattr(router.config, "gate_source", "") == "logit_column" else 0
    batch = Batch(torch.randn(t, p.experts + extra, generator=gen), torch.randint(0, 1000, (t,), generator=gen))
    plan = router.route(batch)
    if name != "nllb-moe-54b":  # second_policy=always: every token asks for two
        assert plan.num_requests == t * p.top_k
    assert int(plan.expert_R.max()) < p.experts


def test_weight_bytes_count_every_matrix():
    ds = get_model("deepseek-v3")
    assert ds.weight_bytes(2) == 3 * 7168 * (256 * 2048 + 2048) * 2
    sw = get_model("switch-base-128")
    assert sw.weight_bytes(4) == 2 * 768 * 128 * 3072 * 4  # ReLU FFN: two matrices


def test_simulate_takes_a_model():
    args = ["simulate", "--model", "mixtral-8x7b", "--devices", "8", "-T", "512", "--plans", "2", "--no-save"]
    res = CliRunner().invoke(main, [*args, "--format", "json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    (row,) = json.loads(res.stdout)["rows"]
    assert (row["experts"], row["hidden"], row["ffn"], row["router"]) == (8, 4096, 14336, "mixtral-8x7b")
