"""Synthetic workload families: each family's defining property, determinism, the fit slice,
validation, and the workload registry (names, options, plugins)."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import textwrap

import numpy as np
import pytest
import torch

from moe_routing_bench.routers.contract import RoutingError
from moe_routing_bench.routers.registry import build_router, router_names
from moe_routing_bench.workloads import registry as wl_registry
from moe_routing_bench.workloads.base import Workload, WorkloadError, ar1_scan
from moe_routing_bench.workloads.registry import (
    build_workload,
    get_workload_class,
    list_workloads,
    load_plugin,
    register_workload,
    workload_names,
)
from moe_routing_bench.workloads.synthetic import UniformConfig, UniformWorkload

SYNTHETIC = ["uniform", "zipf", "hot", "drift", "correlated", "adversarial"]


def _first_choice_loads(workload, t, e, b) -> torch.Tensor:
    """[B, E] first-choice (argmax) loads per batch."""
    return torch.stack([torch.bincount(x.logits_TE.argmax(-1), minlength=e) for x in workload.batches(t, e, b)])


def test_registry_lists_every_family_with_a_description():
    names = dict(list_workloads())
    for n in [*SYNTHETIC, "code", "text", "trace"]:
        assert n in names and len(names[n].split()) > 4, n
    assert workload_names() == sorted(names)


def test_unknown_workload_lists_the_valid_names():
    with pytest.raises(WorkloadError, match=r"unknown workload 'zipff'; valid workloads: adversarial, code, "):
        get_workload_class("zipff")


@pytest.mark.parametrize(
    ("name", "opts", "needle"),
    [
        ("zipf", {"s": "-1"}, "zipf: s must be a number >= 0 (got -1.0)"),
        ("zipf", {"s": "abc"}, "zipf: s must be float (got 'abc')"),
        ("correlated", {"rho": 1.0}, "correlated: rho must be a number in [0, 1) (got 1.0)"),
        ("drift", {"mode": "spin"}, "drift: mode must be one of 'rotate', 'walk' (got 'spin')"),
        ("hot", {"share": 1.5}, "hot: share must be a number in [0, 1] (got 1.5)"),
        ("uniform", {"vocab_size": 0}, "uniform: vocab_size must be an integer >= 1 (got 0)"),
        (
            "uniform",
            {"colour": 1},
            "unknown option 'colour' for workload 'uniform'; valid options: seed, seq_len",
        ),
        ("adversarial", {"margin": 0}, "adversarial: margin must be a number > 0 (got 0)"),
        ("text", {"lang": "xx"}, "text: lang must be one of 'de', 'en', 'es'"),
        ("code", {"context": 2}, "code: context must be a number in [0, 1] (got 2)"),
        ("trace", {}, "trace: path is required"),
    ],
)
def test_bad_options_name_the_field_and_the_allowed_values(name, opts, needle):
    with pytest.raises(WorkloadError) as info:
        build_workload(name, opts)
    assert needle in str(info.value)
    assert isinstance(info.value, RoutingError)  # the CLI turns it into one line, exit 2


@pytest.mark.parametrize(
    ("name", "opts", "needle"),
    [
        ("hot", {"expert": 8}, "hot: expert must be between 0 and num_experts - 1 = 7 (got 8)"),
        ("adversarial", {"expert": 9}, "adversarial: expert must be between 0 and num_experts - 1 = 7"),
        ("zipf", {"vocab_size": 4}, "zipf: vocab_size must be >= num_experts = 8"),
    ],
)
def test_options_that_do_not_fit_e_are_refused_at_batch_time(name, opts, needle):
    with pytest.raises(WorkloadError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        build_workload(name, opts).batches(16, 8, 1)


def test_configs_are_frozen_and_the_old_uniform_names_still_work():
    cfg = UniformConfig(seed=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 4  # type: ignore[misc]
    w = UniformWorkload(cfg)
    assert w.name == "uniform" and isinstance(w, Workload)
    b = next(w.batches(32, 4, 1))
    assert b.logits_TE.shape == (32, 4) and b.token_T.dtype == torch.int64


def test_uniform_measured_stream_is_the_historic_one():
    # The README's `make bench` numbers came from this exact stream: one generator, logits then ids.
    gen = torch.Generator().manual_seed(5)
    batches = list(UniformWorkload(UniformConfig(seed=5)).batches(64, 8, 2))
    for b in batches:
        assert torch.equal(b.logits_TE, torch.randn(64, 8, generator=gen))
        assert torch.equal(b.token_T, torch.randint(0, 50_000, (64,), generator=gen))


@pytest.mark.parametrize("name", SYNTHETIC)
def test_same_seed_same_batches_other_seed_other_batches_and_a_separate_fit_slice(name):
    a = list(build_workload(name, {}, seed=1).batches(128, 8, 3))
    b = list(build_workload(name, {}, seed=1).batches(128, 8, 3))
    c = list(build_workload(name, {}, seed=2).batches(128, 8, 3))
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.logits_TE, y.logits_TE) and torch.equal(x.token_T, y.token_T)
        assert torch.equal(x.seq_T, y.seq_T)
    assert not torch.equal(a[0].logits_TE, c[0].logits_TE)
    fit = build_workload(name, {}, seed=1).fit_sample(128, 8)
    assert all(not torch.equal(fit.logits_TE, x.logits_TE) for x in a)
    # batch b never depends on how many batches were asked for
    assert torch.equal(next(build_workload(name, {}, seed=1).batches(128, 8, 1)).logits_TE, a[0].logits_TE)


@pytest.mark.parametrize("name", SYNTHETIC)
def test_hidden_states_on_request(name):
    w = build_workload(name, {}, seed=0)
    assert next(w.batches(32, 4, 1)).hidden_TD is None
    h1 = next(w.batches(32, 4, 1, hidden_dim=16)).hidden_TD
    h2 = next(w.batches(32, 4, 1, hidden_dim=16)).hidden_TD
    assert h1.shape == (32, 16) and h1.dtype == torch.float32 and torch.equal(h1, h2)


def test_zipf_exponent_is_recovered_from_the_loads():
    # First choices are Categorical(p) with p ~ rank^-s: the log-log slope of sorted loads is -s.
    e, s = 16, 1.2
    loads = _first_choice_loads(build_workload("zipf", {"s": s}, seed=0), 4096, e, 8).sum(0).double()
    sorted_loads = loads.sort(descending=True).values
    slope = np.polyfit(np.log(np.arange(1, e + 1)), np.log(sorted_loads.numpy()), 1)[0]
    assert abs(-slope - s) < 0.08, slope
    # and the popular expert is not always expert 0 (a seeded permutation of ranks)
    tops = {int(_first_choice_loads(build_workload("zipf", {}, seed=k), 512, e, 1)[0].argmax()) for k in range(6)}
    assert len(tops) > 1


def test_zipf_ids_follow_their_first_choice():
    # Every id belongs to one expert's class: the same id always has the same first choice.
    b = next(build_workload("zipf", {"vocab_size": 1000}, seed=0).batches(4096, 8, 1))
    first = b.logits_TE.argmax(-1)
    for tok in b.token_T.unique()[:200]:
        assert first[b.token_T == tok].unique().numel() == 1
    # token_s = 0: ids uniform inside a class (many distinct ids); token_s = 2: few dominate
    flat = next(build_workload("zipf", {"token_s": 0.0}, seed=0).batches(4096, 8, 1)).token_T
    peaked = next(build_workload("zipf", {"token_s": 2.0}, seed=0).batches(4096, 8, 1)).token_T
    assert flat.unique().numel() > 3 * peaked.unique().numel()


def test_hot_expert_takes_its_share():
    e, t, b, share = 16, 4096, 4, 0.3
    loads = _first_choice_loads(build_workload("hot", {"share": share, "expert": 5}, seed=0), t, e, b)
    got = float(loads[:, 5].sum()) / (t * b)
    se = math.sqrt(share * (1 - share) / (t * b))
    assert abs(got - share) < 4 * se
    others = loads.sum(0).double()[torch.arange(e) != 5]
    assert float(others.std() / others.mean()) < 0.1  # the rest split evenly


def test_drift_rotate_moves_the_popular_expert_each_batch():
    e = 8
    loads = _first_choice_loads(build_workload("drift", {"s": 2.0, "speed": 1.0}, seed=0), 2048, e, 6)
    tops = loads.argmax(-1)
    assert all(int(tops[i]) == (int(tops[0]) + i) % e for i in range(6)), tops
    # the fit slice sees batch 0's popularity (what a router was fitted on before the drift)
    fit = build_workload("drift", {"s": 2.0}, seed=0).fit_sample(2048, e)
    assert int(fit.logits_TE.argmax(-1).bincount(minlength=e).argmax()) == int(tops[0])


def test_drift_walk_moves_more_than_a_static_workload():
    def spread(name, opts):
        loads = _first_choice_loads(build_workload(name, opts, seed=0), 4096, 16, 12).double()
        q = loads / loads.sum(-1, keepdim=True)
        return float((q[-1] - q[0]).abs().sum() / 2)  # total variation, first vs last batch

    assert spread("drift", {"mode": "walk", "speed": 0.5}) > 3 * spread("zipf", {})


def test_correlated_neighbours_route_alike():
    def same_as_previous(name, opts):
        b = next(build_workload(name, opts, seed=0).batches(4096, 16, 1))
        first = b.logits_TE.argmax(-1)
        same_seq = b.seq_T[1:] == b.seq_T[:-1]
        return float((first[1:] == first[:-1])[same_seq].double().mean())

    corr, base = same_as_previous("correlated", {"rho": 0.9, "seq_len": 256}), same_as_previous("uniform", {})
    assert base < 0.12 and corr > 0.4, (corr, base)
    # marginally still uniform over experts
    loads = _first_choice_loads(build_workload("correlated", {}, seed=0), 4096, 16, 4).sum(0).double()
    assert float(loads.max() / loads.mean()) < 1.3


def test_correlated_has_sequence_ids_and_restarts_at_each_sequence():
    b = next(build_workload("correlated", {"seq_len": 100}, seed=0).batches(250, 4, 1))
    assert b.seq_T.tolist() == [0] * 100 + [1] * 100 + [2] * 50
    b2 = next(build_workload("correlated", {"seq_len": 100}, seed=0).batches(250, 4, 2))
    nxt = list(build_workload("correlated", {"seq_len": 100}, seed=0).batches(250, 4, 2))[1]
    assert int(nxt.seq_T[0]) == 3 and torch.equal(b2.logits_TE, b.logits_TE)


def test_ar1_scan_matches_a_python_loop():
    x = torch.randn(37, 3, generator=torch.Generator().manual_seed(0))
    start = torch.zeros(37, dtype=torch.bool)
    start[[0, 10, 11, 30]] = True
    rho = 0.7
    ref = torch.empty_like(x)
    for t in range(37):
        ref[t] = x[t] if start[t] else rho * ref[t - 1] + math.sqrt(1 - rho * rho) * x[t]
    torch.testing.assert_close(ar1_scan(x, rho, start), ref, atol=1e-5, rtol=1e-5)


def test_adversarial_sends_everything_to_one_expert_for_logit_and_token_routers():
    w = build_workload("adversarial", {"expert": 3, "token_id": 77}, seed=0)
    b = next(w.batches(512, 8, 1))
    assert (b.logits_TE.argmax(-1) == 3).all() and (b.token_T == 77).all()
    switch = build_router("switch", num_experts=8, capacity_factor=None).route(b)
    assert torch.bincount(switch.expert_R, minlength=8).max() == 512
    if "hash" in router_names():  # a token router is tested as fairly: one id, one expert
        plan = build_router("hash", num_experts=8).route(b)
        assert plan.expert_R.unique().numel() == 1


def test_plugin_file_registers_a_workload(tmp_path, capsys):
    plugin = tmp_path / "my_workload.py"
    plugin.write_text(
        textwrap.dedent(
            '''
            from dataclasses import dataclass
            from typing import ClassVar
            import torch
            from moe_routing_bench.workloads.base import Parts, Workload, WorkloadConfig
            from moe_routing_bench.workloads.registry import register_workload

            @dataclass(frozen=True, kw_only=True)
            class OnesConfig(WorkloadConfig):
                workload: ClassVar[str] = "ones"

            @register_workload("ones")
            class Ones(Workload):
                """All logits one (a plugin for tests)."""
                config_cls = OnesConfig

                def generate(self, t, e, n, fit, hidden_dim):
                    zeros = torch.zeros(t, dtype=torch.long)
                    for b in range(n):
                        yield Parts(torch.ones(t, e), zeros, zeros)
            '''
        )
    )
    routers_added, added = load_plugin(plugin)
    assert added == ["ones"] or "ones" in workload_names()
    assert routers_added == []
    assert dict(list_workloads())["ones"] == "All logits one (a plugin for tests)."
    assert any("ones" in p for p in wl_registry.loaded_plugins())
    b = next(build_workload("ones", {}).batches(4, 2, 1))
    assert torch.equal(b.logits_TE, torch.ones(4, 2))


def test_entry_point_workloads_are_registered(monkeypatch):
    @register_workload("ep_test_workload")
    class _Tmp(UniformWorkload):
        """Registered through a fake entry point."""

    wl_registry._REGISTRY.classes.pop("ep_test_workload")

    class _EP:
        name, value = "ep_workload", "pkg.mod:Cls"

        def load(self):
            return _Tmp

    monkeypatch.setattr(wl_registry._REGISTRY, "entry_points_loaded", False)
    monkeypatch.setattr(
        importlib.metadata, "entry_points", lambda group: [_EP()] if group == "moe_bench.workloads" else []
    )
    assert "ep_workload" in workload_names()
    assert any("entry point ep_workload" in p for p in wl_registry.loaded_plugins())
    wl_registry._REGISTRY.classes.pop("ep_workload", None)
