"""The peers' dispatch beside ours: every provider gives our output on the same routing."""

from __future__ import annotations

import pytest
import torch

from moe_routing_bench.bench.microbench import peers
from moe_routing_bench.kernels.experts import ExpertFFN


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_round_trip_provider_equals_ours(dtype):
    rt = peers.setup(300, 24, 7, 2, dtype, "cpu", seed=3)
    provs = peers.providers(rt)
    ref = provs["ours"][0]()
    # The identity-expert round trip is the gated sum of each token's own row.
    want = (rt.x_TD.float() * rt.weight_TK.sum(1, keepdim=True).float()).to(dtype)
    torch.testing.assert_close(ref.float(), want.float(), atol=2e-2, rtol=2e-2)
    ran = []
    for name, (fn, why) in provs.items():
        if fn is None:
            assert name == "megatron" and "not importable" in why
            continue
        ran.append(name)
        if not name.startswith("copy"):
            assert peers.check_equal(ref, fn(), name) == "ok"
    assert {"ours", "ours+workspace", "copy", "copy-reused"} <= set(ran)


def test_megatron_is_installed_with_the_dev_extra_and_agrees():
    # The dev extra installs megatron-core (its base install is torch, numpy, packaging), so the
    # peer comparison is real in CI, not skipped.
    pytest.importorskip("megatron.core")
    rt = peers.setup(64, 8, 5, 3, torch.float32, "cpu", seed=1)
    fn, why = peers.megatron(rt)
    assert why is None
    assert peers.check_equal(peers.ours(rt)(), fn(), "megatron") == "ok"


def test_a_wrong_provider_is_caught_before_timing():
    rt = peers.setup(50, 8, 4, 2, torch.float32, "cpu")
    ref = peers.ours(rt)()
    assert "differs from ours" in peers.check_equal(ref, ref * 1.01, "broken")


def test_layer_providers_say_why_they_cannot_run_on_cpu():
    rt = peers.setup(32, 8, 4, 2, torch.float32, "cpu")
    provs = peers.layer_providers(rt, ExpertFFN(4, 8))
    assert provs["ours-layer"][0] is not None
    assert provs["vllm-fused_moe"] == (None, "vLLM's fused_moe runs on CUDA only")
    assert provs["megablocks"][0] is None and "megablocks" in provs["megablocks"][1]
