"""`moe-bench capture` on tiny random-weight Hugging Face MoE models, offline, and the `trace`
workload that replays what it stored."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from moe_routing_bench.bench.capture.models import capture_logits, find_gates
from moe_routing_bench.bench.cli import main
from moe_routing_bench.workloads import corpus
from moe_routing_bench.workloads.base import WorkloadError
from moe_routing_bench.workloads.registry import build_workload
from moe_routing_bench.workloads.trace import read_trace_layer, read_trace_meta, write_trace

if os.environ.get("CI"):
    import transformers  # the dev extra installs it: in CI its absence is a failure
else:
    transformers = pytest.importorskip("transformers", reason="pip install 'moe-routing-bench[capture]'")

CODE = ["--workload", "code", "--workload-opt", "max_mb=0.3"]  # real tokens, no OS package needed


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv(corpus.CACHE_ENV, str(tmp_path / "cache"))


@pytest.fixture
def tiny_mixtral(tmp_path):
    """A 2-layer, 8-expert, top-2 Mixtral with random weights, saved with save_pretrained."""
    cfg = transformers.MixtralConfig(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    path = tmp_path / "tiny-mixtral"
    transformers.MixtralForCausalLM(cfg).save_pretrained(path)
    return path


def _run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_capture_then_trace_replays_the_hooked_logits(offline, tiny_mixtral, tmp_path):
    out = tmp_path / "trace.parquet"
    res = _run(
        "capture",
        "--model",
        str(tiny_mixtral),
        *CODE,
        "--tokens",
        "600",
        "--seq-len",
        "128",
        "--batch-size",
        "3",
        "--out",
        str(out),
    )
    assert res.exit_code == 0, res.output
    assert "captured 2 MoE layers x 600 tokens (E = 8)" in res.output

    meta = read_trace_meta(out)
    assert [x["num_experts"] for x in meta["layers"]] == [8, 8]
    assert meta["layers"][0]["module"].endswith("layers.0.mlp.gate") and meta["tokens"] == 600
    assert "% vocab_size (512)" in meta["tokenizer"] and meta["workload"]["workload"] == "code"

    # What transformers itself reports as router logits, sequence by sequence, is what was stored.
    rows = read_trace_layer(out, 0)
    assert np.array_equal(rows["token"], rows["source_token"] % 512)
    assert rows["seq"].tolist() == np.repeat(np.arange(5), [128, 128, 128, 128, 88]).tolist()
    model = transformers.MixtralForCausalLM.from_pretrained(tiny_mixtral).eval()
    expected = [[], []]
    with torch.inference_mode():
        for s in range(5):
            ids = torch.from_numpy(rows["token"][rows["seq"] == s]).unsqueeze(0)
            router_logits = model(input_ids=ids, output_router_logits=True).router_logits
            for layer in range(2):
                expected[layer].append(router_logits[layer].reshape(-1, 8).float())
    for layer in range(2):
        replay = build_workload("trace", {"path": str(out), "layer": layer, "fit_every": 0})
        batch = next(replay.batches(600, 8, 1))
        torch.testing.assert_close(batch.logits_TE, torch.cat(expected[layer]), atol=1e-5, rtol=1e-5)
        assert np.array_equal(batch.token_T.numpy(), rows["token"])

    # ... and `moe-bench route --workload trace` takes E from the trace.
    res = _run(
        "route",
        "--router",
        "topk",
        "-T",
        "200",
        "-B",
        "3",
        "--format",
        "json",
        "--workload",
        "trace",
        "--workload-opt",
        f"path={out}",
        "--workload-opt",
        "layer=1",
        "--workload-opt",
        "fit_every=0",
    )
    assert res.exit_code == 0, res.output
    cfg = json.loads(res.output)["config"]
    assert cfg["num_experts"] == 8 and cfg["workload"] == "trace" and cfg["workload_options"]["layer"] == 1
    res = _run("route", "--router", "topk", "-E", "64", "--workload", "trace", "--workload-opt", f"path={out}")
    assert res.exit_code == 2 and "this workload has E = 8 experts (got num_experts = 64)" in res.stderr


def test_trace_fit_slice_is_whole_sequences(tmp_path):
    n, e = 40, 4
    logits = np.arange(n * e, dtype=np.float32).reshape(n, e)
    seq = np.repeat(np.arange(4), 10)
    path = tmp_path / "t.parquet"
    write_trace(
        path,
        np.arange(n),
        seq,
        np.tile(np.arange(10), 4),
        np.arange(n),
        [logits],
        {"layers": [{"index": 0, "module": "m", "num_experts": e}]},
    )
    w = build_workload("trace", {"path": str(path), "fit_every": 2})
    assert w.fit_sample(20, e).token_T.tolist() == [*range(10, 20), *range(30, 40)]
    assert next(w.batches(20, e, 1)).token_T.tolist() == [*range(0, 10), *range(20, 30)]
    with pytest.raises(WorkloadError, match="layer must be between 0 and 0"):
        build_workload("trace", {"path": str(path), "layer": 1})
    with pytest.raises(WorkloadError, match="not a file"):
        build_workload("trace", {"path": str(tmp_path / "missing.parquet")})


def test_a_parquet_file_that_is_not_a_trace_is_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "other.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), path)
    with pytest.raises(WorkloadError, match="is not a moe-bench trace"):
        build_workload("trace", {"path": str(path)})


def _tiny(kind: str):
    small = {
        "vocab_size": 256,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    if kind == "qwen2_moe":
        return transformers.Qwen2MoeConfig(
            **small,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
            num_experts=6,
            num_experts_per_tok=2,
        ), 6
    if kind == "olmoe":
        return transformers.OlmoeConfig(**small, num_experts=6, num_experts_per_tok=2), 6
    if kind == "switch":
        return transformers.SwitchTransformersConfig(
            vocab_size=256,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            num_experts=4,
            encoder_sparse_step=1,
            decoder_sparse_step=1,
        ), 4
    return transformers.NllbMoeConfig(
        vocab_size=256,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        num_experts=4,
        encoder_sparse_step=1,
        decoder_sparse_step=1,
    ), 4


# Each family keeps its router somewhere else: Qwen2-MoE beside a shared-expert gate (not a
# router), OLMoE plainly, Switch and NLLB-MoE as a router with a classifier in an encoder-decoder
# (only the encoder runs, so only its two routers fire).
@pytest.mark.parametrize("kind", ["qwen2_moe", "olmoe", "switch", "nllb_moe"])
def test_gates_are_found_in_other_moe_families(kind):
    cfg, e = _tiny(kind)
    torch.manual_seed(0)
    auto = transformers.AutoModelForSeq2SeqLM if cfg.is_encoder_decoder else transformers.AutoModelForCausalLM
    model = auto.from_config(cfg).eval()
    gates, logits, seq, pos = capture_logits(model, cfg, np.arange(90) % 256, 40, 2, torch.device("cpu"))
    assert len(gates) == 2 and all(x.shape == (90, e) for x in logits)
    assert not any("shared_expert" in g.name for g in gates)
    assert seq.tolist() == [0] * 40 + [1] * 40 + [2] * 10 and pos[40] == 0


def test_gates_found_by_name_when_the_model_declares_nothing():
    # transformers 4.x and custom models: a Linear named `gate`, or a router with a `classifier`.
    class SparseMoeBlock(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = torch.nn.Linear(8, 4)

    class Router(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.classifier = torch.nn.Linear(8, 4)

    class SparseMLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.router = Router()

    model = torch.nn.Sequential(SparseMoeBlock(), torch.nn.Linear(8, 8), SparseMLP())
    model[1].gate = torch.nn.Linear(8, 1)  # a `gate` outside an MoE block is not a router
    assert [g.name for g in find_gates(model)] == ["0.gate", "2.router.classifier"]


def test_capture_refuses_what_it_cannot_load_offline(offline, tmp_path):
    res = _run("capture", "--model", str(tmp_path / "nothing-here"), *CODE, "--out", str(tmp_path / "t.parquet"))
    assert res.exit_code == 2
    assert "no local model found (capture never downloads" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
