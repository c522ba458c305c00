"""Shared test fixtures, and the Triton interpreter switch for the CPU tier."""

from __future__ import annotations

import os
import re

import pytest
import torch

from moe_routing_bench.routers.contract import Batch


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
