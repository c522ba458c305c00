"""Fixtures shared by the command tests: a router plugin whose plans break the contract on demand."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

BROKEN = textwrap.dedent(
    '''
    import os, signal, time
    from dataclasses import dataclass
    import torch
    from moe_routing_bench.routers.registry import register_router
    from moe_routing_bench.routers.switch import SwitchConfig, SwitchRouter

    @dataclass(frozen=True)
    class BrokenConfig(SwitchConfig):
        how: str = "ok"

    @register_router("broken")
    class Broken(SwitchRouter):
        """Switch whose plans break the contract on demand (BROKEN_HOW overrides the option)."""
        config_cls = BrokenConfig

        def route(self, batch):
            plan = super().route(batch)
            how = os.environ.get("BROKEN_HOW", self.config.how)
            if how == "capacity": plan.capacity = -3
            elif how == "nan": plan.weight_R = plan.weight_R * float("nan")
            elif how == "negative": plan.weight_R = plan.weight_R - 2.0
            elif how == "token": plan.token_R = plan.token_R + plan.num_tokens
            elif how == "expert": plan.expert_R = plan.expert_R + plan.num_experts
            elif how == "num_tokens": plan.num_tokens = plan.num_tokens + 5
            elif how == "top_k": plan.top_k = float("nan")
            elif how == "none": return None
            elif how == "raise": raise RuntimeError("planted failure")
            elif how == "segv": os.kill(os.getpid(), signal.SIGSEGV)
            elif how == "hang": time.sleep(600)
            return plan
    '''
)


@pytest.fixture
def broken_plugin(tmp_path) -> Path:
    """A plugin file registering ``broken``: switch whose plan breaks (``how=capacity``: C = -3;
    ``nan``, ``negative``: gate weights; ``token``, ``expert``: ids out of range; ``num_tokens``,
    ``top_k``; ``none``: no plan), or that raises, segfaults or hangs."""
    path = tmp_path / "broken.py"
    path.write_text(BROKEN)
    return path
