"""A triton configuration in the harness off a GPU: run under the interpreter when the process asked
for it (TRITON_INTERPRET=1), a skipped row naming why otherwise, with ``TRITON_INTERPRET=0`` meaning
off. One helper decides everywhere: ``kernels.triton_common.interpret_requested`` through the
backend's ``unavailable``."""

from __future__ import annotations

import os

import pytest

from moe_routing_bench.bench.harness.plan import skip_reason
from moe_routing_bench.bench.harness.sweep import expand, load_blocks
from moe_routing_bench.bench.record import load_run
from moe_routing_bench.kernels.layer import list_backends
from moe_routing_bench.kernels.triton_backend import NO_GPU
from moe_routing_bench.kernels.triton_common import interpret_requested
from moe_routing_bench.workloads.registry import workload_names

pytest.importorskip("triton")


def _triton_point():
    block = {"routers": ["switch"], "tokens": [64], "experts": [4], "hidden": [16], "backends": ["triton"]}
    (p,) = expand(load_blocks(None, block), workload_names(), list_backends())
    return p


@pytest.mark.parametrize(
    ("value", "on"),
    [(None, False), ("0", False), ("", False), ("false", False), ("1", True), ("true", True)],
)
def test_one_helper_reads_triton_interpret(monkeypatch, value, on):
    if value is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", value)
    assert interpret_requested() is on
    # The harness asks the same helper: off means a skipped row with the reason, on means it runs.
    why = skip_reason(_triton_point(), 1 << 40)
    assert why == (None if on else NO_GPU)


@pytest.mark.parametrize("interpret", ["1", "0", None])
def test_a_triton_point_runs_interpreted_or_is_skipped(tmp_path, moe_bench, run_dir, interpret):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret is not None:
        env["TRITON_INTERPRET"] = interpret
    out = tmp_path / "out"
    args = ["run", "--routers", "switch", "--backend", "triton", "--tokens", "64", "--experts", "4"]
    res = moe_bench(*args, "--hidden", "16", "--repeats", "1", "--out", str(out), env=env)
    assert res.returncode == 0, res.stderr
    rows, _, meta = load_run(run_dir(out))
    (row,) = rows.to_dict("records")
    assert meta["status"] == "complete"
    if interpret == "1":
        assert row["status"] == "ok" and row["backend_ran"] == "triton", row["error"]
    else:
        assert row["status"] == "skipped" and row["error"] == NO_GPU
