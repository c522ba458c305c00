"""The load-convergence figure: drawn from configurations with many batches, the band of a
stateful router closing while a stateless one keeps its skew; left out, with the reason, otherwise."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from moe_routing_bench.bench.report import figures_convergence as C
from moe_routing_bench.bench.report import style as S
from moe_routing_bench.bench.report.data import load_runs


def test_convergence_is_left_out_without_long_configurations(tiny_run):
    out = C.load_convergence(load_runs([tiny_run]))
    assert isinstance(out, S.LeftOut) and "50 or more batches" in out.reason


def test_convergence_draws_the_band_of_each_router(tiny_run, tmp_path, clone):
    dst = clone(tiny_run, tmp_path / "run")
    data = load_runs([dst])
    ok = data.ok
    first = ok.loc[ok["router"] == "switch", "config_id"].iloc[0]
    second = ok.loc[ok["router"] != "switch", "config_id"].iloc[0]
    batches, experts = 120, 8
    b, e = np.meshgrid(np.arange(batches), np.arange(experts), indexing="ij")
    # Expert 0 hot in both; in the first configuration its excess decays with the batch index.
    excess = np.where(e == 0, 70 * np.exp(-b / 20.0), 0)
    for cid, requested in ((first, 10 + excess), (second, np.where(e == 0, 80, 10))):
        part = pd.read_parquet(dst / "loads" / f"{cid}.parquet").iloc[:1]
        long = pd.DataFrame(
            {
                "run_id": part["run_id"].iloc[0],
                "config_id": cid,
                "router": part["router"].iloc[0],
                "workload": part["workload"].iloc[0],
                "batch": b.ravel(),
                "expert": e.ravel(),
                "requested": np.rint(requested).astype(np.int64).ravel(),
                "kept": np.rint(requested).astype(np.int64).ravel(),
            }
        )
        long.to_parquet(dst / "loads" / f"{cid}.parquet")
    # The first one is a bias-balancing configuration, as its config says.
    rows_dir = dst / "rows" / f"{first}.parquet"
    rows = pd.read_parquet(rows_dir)
    cfg = json.loads(rows["config_json"].iloc[0])
    cfg["router_opts"] = {**cfg.get("router_opts", {}), "bias_update_rate": 0.01}
    rows["config_json"] = json.dumps(cfg)
    rows.to_parquet(rows_dir)
    (dst / "rows.parquet").unlink(missing_ok=True)
    data = load_runs([dst])
    with S.figure_style():
        fo = C.load_convergence(data)
    assert isinstance(fo, S.FigureOut), fo
    fo.fig.savefig(tmp_path / "conv.png", dpi=S.DPI)
    assert (tmp_path / "conv.png").stat().st_size > 10_000
    assert len(fo.table) == 2 and set(fo.table["batches"]) == {batches}
    by_rate = fo.table.set_index("bias_update_rate")
    assert by_rate.loc[0.01, "imbalance_first_10pct"] > 3 * by_rate.loc[0.01, "imbalance_last_10pct"]
    assert by_rate.loc[0.0, "imbalance_first_10pct"] == by_rate.loc[0.0, "imbalance_last_10pct"]
