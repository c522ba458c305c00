"""Shared test fixtures."""

from __future__ import annotations

import pytest
import torch

from routers.contract import Batch


@pytest.fixture
def make_batch():
    """Batch from explicit logits (and optional token ids)."""

    def _make(logits, tokens=None) -> Batch:
        logits_TE = torch.as_tensor(logits, dtype=torch.float32)
        if tokens is None:
            tokens = torch.arange(logits_TE.shape[0])
        return Batch(logits_TE=logits_TE, token_T=torch.as_tensor(tokens, dtype=torch.int64))

    return _make
