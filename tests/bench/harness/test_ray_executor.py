"""`moe-bench run --executor ray`: the same rows as the local worker, on a local Ray cluster."""

from __future__ import annotations

import textwrap

import pandas as pd
import pytest

from moe_routing_bench.bench.metrics import METRICS
from moe_routing_bench.bench.record import load_run

pytest.importorskip("ray", reason="Ray is in the dev extra; `make setup` installs it")


def test_ray_executor_matches_the_local_worker_and_records_failures(
    tmp_path, moe_bench, run_dir, trouble_plugin, small
):
    plugin = trouble_plugin
    config = tmp_path / "sweep.toml"
    config.write_text(
        textwrap.dedent("""
        [defaults]
        workloads = ["uniform", "zipf"]
        capacity_factor = [1.0, 2.0]
        routers = ["switch", "topk", { name = "trouble", opts = { trouble = "raise" }, label = "raises" }]
        """)
    )
    common = ["run", "--config", str(config), "--plugin", str(plugin), *small]
    local = moe_bench(*common, "--out", str(tmp_path / "local"))
    assert local.returncode == 0, local.stderr
    on_ray = moe_bench(*common, "--executor", "ray", "--out", str(tmp_path / "ray"))
    assert on_ray.returncode == 0, on_ray.stderr
    a, _, _ = load_run(run_dir(tmp_path / "local"))
    b, _, meta = load_run(run_dir(tmp_path / "ray"))
    # 2 workloads x (switch, topk, raises) x 2 capacity factors: topk takes them too.
    assert len(a) == len(b) == 2 * 3 * 2 and meta["status"] == "complete"
    a, b = (
        a.sort_values("config_id").reset_index(drop=True),
        b.sort_values("config_id").reset_index(drop=True),
    )
    assert list(a["config_id"]) == list(b["config_id"]) and list(a["status"]) == list(b["status"])
    for m in METRICS:  # routing is deterministic wherever it runs
        pd.testing.assert_series_equal(a[m], b[m], check_names=False)
    errors = b[b.status == "error"]
    assert set(errors["router"]) == {"raises"} and errors["error"].str.contains("planted failure").all()
    assert (b.loc[b.status == "ok", "tokens_per_s"] > 0).all()


def test_ray_executor_without_ray_says_how_to_install(monkeypatch):
    import builtins

    from moe_routing_bench.bench.harness.ray_executor import RayExecutor
    from moe_routing_bench.routers.contract import RoutingError

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray":
            raise ImportError("no ray")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(RoutingError, match=r"pip install 'moe-routing-bench\[ray\]'"):
        RayExecutor([])
