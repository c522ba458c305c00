"""Fixtures of the harness tests: small sweep sizes and a router plugin that misbehaves on demand."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

PLUGIN = textwrap.dedent(
    '''
    import os, signal, time
    from dataclasses import dataclass
    from moe_routing_bench.routers.registry import register_router
    from moe_routing_bench.routers.contract import RouterConfig, RoutingError
    from moe_routing_bench.routers.switch import SwitchRouter, SwitchConfig

    @dataclass(frozen=True)
    class TroubleConfig(SwitchConfig):
        trouble: str = "none"   # none | raise | kill | sleep | block
        block_after: int = 0   # block: route this many batches normally first

    @register_router("trouble")
    class Trouble(SwitchRouter):
        """Switch that misbehaves on demand (tests of the harness)."""
        config_cls = TroubleConfig

        def route(self, batch):
            if self.config.trouble == "raise":
                raise RuntimeError("planted failure")
            if self.config.trouble == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if self.config.trouble == "sleep":
                time.sleep(0.4)
            if self.config.trouble == "block":
                # Say "reached" through a file, then never return: a test signals the run at a
                # point it knows the run is in, not after a guessed sleep.
                self._routed = getattr(self, "_routed", 0) + 1
                if self._routed > self.config.block_after:
                    open(os.environ["TROUBLE_MARKER"], "w").close()
                    time.sleep(600)
            return super().route(batch)
    '''
)


@pytest.fixture
def small() -> list[str]:
    """Sizes that keep one configuration well under a second on 2 CPU cores."""
    return ["--tokens", "128", "--hidden", "16", "--repeats", "2", "--experts", "8"]


@pytest.fixture
def trouble_plugin(tmp_path) -> Path:
    """A plugin file registering ``trouble``: switch that raises, kills itself or sleeps on demand."""
    path = tmp_path / "trouble.py"
    path.write_text(PLUGIN)
    return path
