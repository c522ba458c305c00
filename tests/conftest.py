"""Shared test fixtures, and the Triton interpreter switch for the CPU tier."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_routing_bench.routers.contract import Batch

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    # The CPU tier runs the Triton kernels in triton's interpreter, so every test that reaches the
    # triton backend (tests/test_triton_kernels.py, every-backend loops) runs on CPU tensors. Triton
    # reads TRITON_INTERPRET when a kernel is decorated, so it is set here, before any test module
    # imports kernels.triton_*. A run that selects `gpu` tests (`make test-gpu`) keeps the compiler.
    markexpr = config.getoption("markexpr", default="") or ""
    if re.search(r"(?<!not )\bgpu\b", markexpr) is None:
        os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def make_batch():
    """Batch from explicit logits (and optional token ids)."""

    def _make(logits, tokens=None) -> Batch:
        logits_TE = torch.as_tensor(logits, dtype=torch.float32)
        if tokens is None:
            tokens = torch.arange(logits_TE.shape[0])
        return Batch(logits_TE=logits_TE, token_T=torch.as_tensor(tokens, dtype=torch.int64))

    return _make


@pytest.fixture
def moe_bench():
    """``moe_bench(*args, timeout=300, **kw)``: the ``moe-bench`` command in a fresh process (a real
    file system, signals, exit codes), started in the repo root unless ``cwd`` says otherwise."""

    def _run(*args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("cwd", REPO)
        return subprocess.run(
            [sys.executable, "-m", "moe_routing_bench.bench.cli", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            **kw,
        )

    return _run


@pytest.fixture
def run_dir():
    """``run_dir(out)``: the one run directory a command wrote under ``out``."""

    def _find(out: Path) -> Path:
        dirs = [p for p in Path(out).iterdir() if p.is_dir()]
        assert len(dirs) == 1, dirs
        return dirs[0]

    return _find


@pytest.fixture
def update_calls(monkeypatch):
    """Record every ``update`` of a bias-balancing router in this process: a list of
    ``(id(router), num_tokens of the plan)``, the call still made (tests of the jobs that must
    call ``update`` after every batch they route in sequence)."""
    from moe_routing_bench.routers.balancing import BiasBalancedRouter

    calls: list[tuple[int, int]] = []
    original = BiasBalancedRouter.update

    def spy(self, plan):
        calls.append((id(self), plan.num_tokens))
        return original(self, plan)

    monkeypatch.setattr(BiasBalancedRouter, "update", spy)
    return calls
