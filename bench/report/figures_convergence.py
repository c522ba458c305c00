"""Report figure: per-expert load over many batches, where a stateful router shows its convergence.

Auxiliary-loss-free bias balancing (``bias_update_rate``) changes a router's selection from batch to
batch, so its balance is a curve, not a number: the default sweep routes a hot expert and a slowly
rotating popularity for 300 batches with and without it. For every configuration whose loads table
holds at least ``MIN_BATCHES`` batches, the figure draws, per batch, the most and the least loaded
expert's requested load over the batch's mean (a band that closes towards 1 as the load evens
out), one panel per workload, one colour per router. Same contract as the other figures
(``report.style``): a ``FigureOut``, or a ``LeftOut`` with the reason.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D

from moe_routing_bench.bench.report.data import ReportData
from moe_routing_bench.bench.report.style import (
    FigureOut,
    LeftOut,
    colors_for,
    legend_right,
    new_figure,
    ordered,
    short,
    titled,
)

MIN_BATCHES = 50  # fewer batches show no convergence (the default sweep's main blocks record 5)
MAX_PANELS = 4
SMOOTH = 5  # batches in the centred rolling mean of the drawn curves (the table is unsmoothed)


def _bias_rate(config_json: str) -> float:
    try:
        return float(json.loads(config_json).get("router_opts", {}).get("bias_update_rate", 0.0) or 0.0)
    except (TypeError, ValueError):
        return 0.0


def _extremes(g: pd.DataFrame) -> pd.DataFrame:
    """Per batch: the largest and smallest requested load over the mean (experts as columns)."""
    m = g.pivot_table(index="batch", columns="expert", values="requested", aggfunc="sum").fillna(0)
    mean = m.mean(axis=1).replace(0, np.nan)
    return pd.DataFrame({"max_over_mean": m.max(axis=1) / mean, "min_over_mean": m.min(axis=1) / mean})


def load_convergence(data: ReportData) -> FigureOut | LeftOut:
    name, title = "load_convergence", "Per-expert load over batches (stateful routers converging)"
    if data.loads.empty:
        return LeftOut(name, title, "no per-expert loads recorded")
    loads = data.loads
    if "layer" in loads:
        loads = loads[loads["layer"].isna()]
    counts = loads.groupby(["run", "config_id"])["batch"].nunique()
    long = counts[counts >= MIN_BATCHES].reset_index()[["run", "config_id"]]
    rows = data.ok[["run", "config_id", "router_disp", "series", "tokens", "experts", "config_json"]]
    picked = long.merge(rows, on=["run", "config_id"], how="inner")
    if picked.empty:
        return LeftOut(
            name,
            title,
            f"no configuration recorded {MIN_BATCHES} or more batches (the default sweep's bias-balancing "
            "block records 300)",
        )
    # One configuration per (run, router, workload): the one with the most batches.
    picked["batches"] = [int(counts[(r, c)]) for r, c in zip(picked["run"], picked["config_id"], strict=True)]
    picked = picked.sort_values("batches", ascending=False).drop_duplicates(["run", "router_disp", "series"])
    loads = loads.drop(columns=[c for c in ("router_disp", "series") if c in loads]).merge(
        picked, on=["run", "config_id"], how="inner"
    )
    panels = ordered(picked["series"])[:MAX_PANELS]
    routers = ordered(picked["router_disp"])
    colors = colors_for(routers)
    fig, axes = new_figure(len(panels), sharey=True)
    table = []
    for ax, series in zip(axes, panels, strict=True):
        for (router, run), g in loads[loads["series"] == series].groupby(["router_disp", "run"], sort=False):
            ext = _extremes(g)
            smooth = ext.rolling(SMOOTH, center=True, min_periods=1).mean()
            ax.plot(smooth.index, smooth["max_over_mean"], color=colors[router], linewidth=2)
            ax.plot(smooth.index, smooth["min_over_mean"], color=colors[router], linewidth=1.2, linestyle=":")
            n = len(ext)
            head, tail = ext.iloc[: max(1, n // 10)], ext.iloc[-max(1, n // 10) :]
            table.append(
                {
                    **({"run": run} if data.several_runs else {}),
                    "router": router,
                    "workload": series,
                    "bias_update_rate": _bias_rate(g["config_json"].iloc[0]),
                    "tokens": int(g["tokens"].iloc[0]),
                    "experts": int(g["experts"].iloc[0]),
                    "batches": n,
                    "imbalance_first_10pct": float(head["max_over_mean"].mean()),
                    "imbalance_last_10pct": float(tail["max_over_mean"].mean()),
                    "min_over_mean_last_10pct": float(tail["min_over_mean"].mean()),
                }
            )
        ax.axhline(1.0, color="0.3", linewidth=1, linestyle="--")
        ax.set_yscale("log")
        ax.set_xlabel("batch")
        ax.set_title(short(series), fontsize="medium")
    axes[0].set_ylabel("requested load / mean load")
    handles = [Line2D([], [], color=colors[r], lw=3) for r in routers]
    handles += [Line2D([], [], color="0.3", lw=2), Line2D([], [], color="0.3", lw=1.2, linestyle=":")]
    legend_right(fig, handles, [*routers, "most loaded expert", "least loaded expert"], "router")
    titled(fig, title, f"configurations with at least {MIN_BATCHES} batches")
    caption = (
        "For each batch, the most loaded expert's requested load (solid) and the least loaded one's "
        "(dotted) over the batch's mean, on a log scale; the dashed line is perfect balance. Curves are "
        f"a {SMOOTH}-batch rolling mean, the table is not smoothed. A router with bias balancing "
        "(bias_update_rate > 0, see the table) adds a per-expert bias to its scores for selection only "
        "and moves it by rate * sign(mean load - load) after every batch: its band closes over the "
        "first batches, while the same router without it keeps the workload's skew. Only configurations "
        f"whose loads table holds {MIN_BATCHES} or more batches are drawn (at most {MAX_PANELS} workloads)."
    )
    return FigureOut(name, title, caption, fig, pd.DataFrame(table))
