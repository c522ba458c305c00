"""`moe-bench quality`: the tiny MoE LM trains through every router, and the claims it makes hold.

Tiny sizes throughout (E = 4, D = 16, V = 256, 4 sequences of 16 tokens per step), one CPU thread
(a tiny model's matmuls lose far more to thread contention on busy cores than they gain).
"""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from moe_routing_bench.bench.quality.train import (
    QualityConfig,
    build_data,
    build_model,
    evaluate,
    parse_router_specs,
    train,
)
from moe_routing_bench.routers.contract import RoutingError
from moe_routing_bench.routers.registry import get_router_class
from moe_routing_bench.workloads import corpus

TINY = dict(experts=4, layers=2, width=16, heads=2, vocab=256, seq_len=16, batch_seqs=4, eval_batches=2)
CPU = torch.device("cpu")


def _need_text(*langs: str) -> None:
    """Real prose needs `debian-reference-LANG` (.ci/run installs it); outside CI a missing package
    skips, in CI (CI=true) it fails."""
    for lang in langs:
        if not (corpus.DEBIAN_REFERENCE_DIR / f"ch01.{lang}.html").is_file() and not os.environ.get("CI"):
            pytest.skip(f"apt-get install debian-reference-{lang}")


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data():
    _need_text("en", "de")
    return build_data(QualityConfig(**TINY))


def test_router_specs_parse_variants_and_refuse_unknown_names():
    specs = parse_router_specs("switch, hash[variant=balanced],hierarchical[form=nllb,gate_source=logit_column]")
    assert [(s.name, s.opts) for s in specs] == [
        ("switch", {}),
        ("hash", {"variant": "balanced"}),
        ("hierarchical", {"form": "nllb", "gate_source": "logit_column"}),
    ]
    with pytest.raises(RoutingError, match="valid routers"):
        parse_router_specs("switch,nosuchrouter")
    labels = [s.label for s in parse_router_specs("all")]
    assert "switch" in labels and "expert_choice" in labels
    assert len(labels) == len(set(labels))


def test_vocabulary_is_remapped_from_the_training_slice(data):
    # Every id is below V; the OOV id is V - 1; held-out windows continue the stream (stride S).
    v = TINY["vocab"]
    for w in (data.train, data.heldout, data.other):
        assert int(w.min()) >= 0 and int(w.max()) < v
    assert torch.equal(data.heldout[1:, 0], data.heldout[:-1, -1])
    assert data.info["oov_id"] == v - 1 and 0 < data.info["train_oov_frac"] < 1


@pytest.mark.parametrize("spec", parse_router_specs("all"), ids=lambda s: s.label)
def test_gate_gets_gradient_through_every_differentiable_router(spec, data):
    """The LM loss alone (no aux loss) must reach every layer's gate through the plan's gate weights;
    hash routing has no differentiable gate (expert = f(token id), weight 1): its gate gets none."""
    cfg = QualityConfig(**TINY, aux_coef=0.0)
    model, _, _ = build_model(spec, cfg, data, CPU)
    win = data.train[: cfg.batch_seqs]
    logits, plans, _ = model(win[:, :-1])
    F.cross_entropy(logits.reshape(-1, cfg.vocab), win[:, 1:].reshape(-1)).backward()
    grads = [g.weight.grad for g in model.gates()]
    if spec.name == "hash":
        assert all(not p.weight_R.requires_grad for p in plans)
        assert all(g is None or not bool(g.any()) for g in grads)
    else:
        assert all(p.weight_R.requires_grad for p in plans)
        for layer, g in enumerate(grads):
            assert g is not None and bool(g.any()), f"{spec.label}: layer {layer} gate got no gradient"
            assert bool(torch.isfinite(g).all())


def test_aux_loss_lowers_imbalance(data):
    """Switch at E = 4, 40 steps: with a strong aux coefficient the requested load ends far more
    even than without (about 1.3 against 2.3 at seed 0)."""
    spec = parse_router_specs("switch")[0]

    def end_imbalance(coef: float) -> float:
        cfg = QualityConfig(**TINY, steps=40, aux_coef=coef)
        tr = train(spec, cfg, data, CPU)
        return float(np.mean([r["imbalance"] for r in tr.steps if r["step"] >= 30]))

    with_aux, without = end_imbalance(1.0), end_imbalance(0.0)
    assert with_aux < 0.8 * without, (with_aux, without)


def test_same_seed_same_curve_other_seed_other_curve(data):
    # gshard draws random numbers (second-choice routing): the router's own seeded generator.
    spec = parse_router_specs("gshard")[0]

    def curve(seed: int) -> list[float]:
        return [r["loss"] for r in train(spec, QualityConfig(**TINY, steps=6, seed=seed), data, CPU).steps]

    first = curve(0)
    assert first == curve(0)  # bitwise on CPU
    assert first != curve(1)


def test_routers_that_fit_learn_from_the_training_slice(data, monkeypatch):
    seen = []
    cls = get_router_class("hash")
    original = cls.fit
    monkeypatch.setattr(cls, "fit", lambda self, sample: (seen.append(sample.token_T.clone()), original(self, sample)))
    spec = parse_router_specs("hash[variant=balanced]")[0]
    build_model(spec, QualityConfig(**TINY), data, CPU)
    # One fit per layer (the probe fits a throwaway router on its own ids, which is not counted).
    fits = [s for s in seen if s.shape == data.fit_ids.shape]
    assert len(fits) == TINY["layers"]
    assert all(torch.equal(s, data.fit_ids) for s in fits)


def test_a_router_that_cannot_run_becomes_an_error_row(data, tmp_path):
    from moe_routing_bench.bench.quality.runner import run_quality

    cfg = QualityConfig(**TINY, steps=2, capacity_factor=None)  # expert choice has no dropless form
    _, rows = run_quality(cfg, parse_router_specs("expert_choice,switch"), tmp_path, CPU)
    assert rows[0]["status"] == "error" and "capacity_factor" in rows[0]["error"]
    assert rows[1]["status"] == "ok"  # the run goes on
    # A value no router of the selection can take is refused before any run directory exists.
    with pytest.raises(RoutingError, match="no router of --routers can run"):
        run_quality(cfg, parse_router_specs("expert_choice"), tmp_path / "none", CPU)
    assert not (tmp_path / "none").exists()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The command end to end, once: two routers, one of them not causal, with a saved trace."""
    _need_text("en", "de")
    from moe_routing_bench.bench.cli import main

    out = tmp_path_factory.mktemp("quality")
    args = ["quality", "--routers", "switch,expert_choice", "--steps", "30", "--experts", "4"]
    args += ["--width", "16", "--heads", "2", "--vocab", "256", "--seq-len", "16", "--batch-seqs", "4"]
    args += ["--eval-batches", "2", "--lr", "1e-2", "--device", "cpu", "--out", str(out)]
    args += ["--save-trace", str(out / "trace.parquet")]
    t0 = time.perf_counter()
    result = CliRunner().invoke(main, args)
    seconds = time.perf_counter() - t0
    assert result.exit_code == 0, result.output
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    return result.stdout, run_dir, seconds, out


def test_tiny_run_records_rows_and_fits_the_budget(tiny_run):
    output, run_dir, _, _ = tiny_run
    summary = pd.read_parquet(run_dir / "quality.parquet")
    steps = pd.read_parquet(run_dir / "quality_steps.parquet")
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["status"] == "complete" and meta["kind"] == "quality"
    assert list(summary["router"]) == ["switch", "expert_choice"]
    assert (summary["status"] == "ok").all()
    assert len(steps) == 2 * 30 * 2  # routers x steps x layers
    # Held-out loss is finite and beats a uniform guess over the remapped vocabulary.
    for col in ("heldout_loss", "other_loss"):
        assert summary[col].map(math.isfinite).all()
    assert (summary["heldout_loss"] < math.log(256)).all()
    ec = summary.set_index("router").loc["expert_choice"]
    assert bool(ec["looks_at_whole_batch"]) and not bool(ec["causal"]) and math.isnan(ec["drop_rate"])
    assert (summary["train_tokens_per_s"] > 0).all()
    # The table marks the router a decoder cannot use.
    assert "not causal: a decoder cannot use it at inference" in output
    line = next(ln for ln in output.splitlines() if ln.startswith("expert_choice"))
    assert line.rstrip().endswith("no *")


def test_quality_figures_are_written(tiny_run, tmp_path):
    from moe_routing_bench.bench.report.figures_quality import quality_figures, read_quality_run

    _, run_dir, _, _ = tiny_run
    paths = quality_figures(*read_quality_run(run_dir), tmp_path)
    assert [p.name for p in paths] == ["quality_loss.png", "quality_tradeoff.png"]
    assert all(p.stat().st_size > 10_000 for p in paths)


def test_saved_trace_replays_through_the_trace_workload(tiny_run, data):
    trace = pytest.importorskip("moe_routing_bench.workloads.trace")
    from moe_routing_bench.workloads.registry import build_workload

    _, _, _, out = tiny_run
    path = out / "trace-switch.parquet"
    meta = trace.read_trace_meta(path)
    assert [lay["num_experts"] for lay in meta["layers"]] == [4, 4]
    t = TINY["batch_seqs"] * TINY["seq_len"]
    for layer in (0, 1):
        rows = trace.read_trace_layer(path, layer)
        # The trace holds every held-out input token once, in order, with the model's ids.
        assert np.array_equal(rows["token"], data.heldout[:, :-1].reshape(-1).numpy())
        replay = build_workload("trace", {"path": str(path), "layer": layer, "fit_every": 0})
        batch = next(iter(replay.batches(t, 4, 1)))
        assert torch.equal(batch.logits_TE, torch.from_numpy(rows["logits"][:t]))
        assert torch.equal(batch.token_T, data.heldout[: TINY["batch_seqs"], :-1].reshape(-1))


def test_trace_logits_are_the_trained_gates_logits(data, tmp_path):
    pytest.importorskip("moe_routing_bench.workloads.trace")
    from moe_routing_bench.bench.quality.runner import save_trace
    from moe_routing_bench.workloads.trace import read_trace_layer

    spec = parse_router_specs("topk")[0]
    cfg = QualityConfig(**TINY, steps=3)
    tr = train(spec, cfg, data, CPU)
    same = evaluate(tr.model, data.heldout, cfg.batch_seqs, CPU, keep_logits=True)
    path = tmp_path / "t.parquet"
    save_trace(path, tr.model, data, same.logits_by_layer, spec, cfg, tr.top_k)
    with torch.no_grad():
        _, _, logits = tr.model(data.heldout[: cfg.batch_seqs, :-1])
    for layer in range(cfg.layers):
        rows = read_trace_layer(path, layer)
        assert torch.allclose(torch.from_numpy(rows["logits"][: logits[layer].shape[0]]), logits[layer])


def test_report_draws_a_quality_run(tiny_run, tmp_path):
    from moe_routing_bench.bench.cli import main

    _, run_dir, _, _ = tiny_run
    res = CliRunner().invoke(main, ["report", str(run_dir), "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert {"quality_loss.png", "quality_tradeoff.png"} <= {p.name for p in tmp_path.glob("*.png")}
    html = (tmp_path / "report.html").read_text()
    assert "Routing quality" in html and "heldout_loss" in html and "expert_choice" in html
    assert "quality_loss" in (tmp_path / "report.md").read_text()


def test_training_updates_each_layers_router_after_every_step(data, update_calls):
    # topk[bias]: DeepSeek-V3's bias balancing learns from every step's plan of its own layer; each
    # router (one per layer, per trained router) starts from zero.
    spec = parse_router_specs("topk[bias_update_rate=0.01]")[0]
    tr = train(spec, QualityConfig(**TINY, steps=5), data, CPU)
    routers = tr.model.routers
    assert len(routers) == TINY["layers"]
    assert [sum(rid == id(r) for rid, _ in update_calls) for r in routers] == [5, 5]
    assert all(float(r.expert_bias.abs().sum()) > 0 for r in routers)
    assert "topk[bias]" in [s.label for s in parse_router_specs("all")]


def test_each_router_trains_in_its_own_worker(broken_plugin, tmp_path):
    """A plugin that segfaults was the end of the whole run (exit 139); NaN gates were caught only
    as NaN logits a step later. Now each is an error row naming why, and the run goes on."""
    _need_text("en", "de")
    from moe_routing_bench.bench.cli import main

    args = ["quality", "--plugin", str(broken_plugin), "--routers", "broken[how=segv],broken[how=nan],switch"]
    args += ["--steps", "2", "--experts", "4", "--width", "16", "--heads", "2", "--vocab", "256", "--seq-len", "16"]
    args += ["--batch-seqs", "4", "--eval-batches", "2", "--device", "cpu", "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output  # some router failed
    (run_dir,) = list((tmp_path / "o").iterdir())
    summary = pd.read_parquet(run_dir / "quality.parquet").set_index("router")
    assert "signal 11" in summary.loc["broken[how=segv]", "error"]
    assert "weight_R = nan" in summary.loc["broken[how=nan]", "error"]
    assert summary.loc["switch", "status"] == "ok"
    assert json.loads((run_dir / "meta.json").read_text())["status"] == "complete"
