"""The harness's view of workloads: the registry's names and a workload built by name."""

from __future__ import annotations

from typing import Any

from moe_routing_bench.workloads.base import Workload
from moe_routing_bench.workloads.registry import build_workload, workload_names

__all__ = ["make_workload", "workload_names"]


def make_workload(name: str, opts: dict[str, Any], seed: int) -> Workload:
    """Workload ``name`` with options ``opts``; ``seed`` unless the options set their own."""
    return build_workload(name, opts, seed)
