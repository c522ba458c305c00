"""Figures of a ``moe-bench quality`` run: loss curves, balance curves, quality against cost.

``quality_figures(steps_df, summary_df, out_dir)`` reads the two tables the command writes
(``quality_steps.parquet``: one row per router, step and layer; ``quality.parquet``: one row per
router) and writes PNGs, returning their paths:

- ``quality_loss.png``: training loss per step (a 10-step moving average, nats per token) and load
  imbalance per step (max/mean requested load, mean over layers), one line per router;
- ``quality_tradeoff.png``: held-out loss against training tokens/s, one point per router, with
  the held-out imbalance in its label; routers that look at the whole batch are hollow.

Built with the object-oriented matplotlib API (no pyplot state) under a seaborn theme.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

FIGSIZE = (12.0, 5.2)
DPI = 150
SMOOTH_STEPS = 10


def _palette(labels: list[str]) -> dict[str, tuple[float, float, float]]:
    pal = sns.color_palette("colorblind", max(len(labels), 1))
    return {lab: pal[i % len(pal)] for i, lab in enumerate(labels)}


def _order(steps_df: pd.DataFrame, summary_df: pd.DataFrame) -> list[str]:
    seen: list[str] = []
    for df in (summary_df, steps_df):
        if df is not None and "router" in df:
            for r in df["router"].tolist():
                if r not in seen:
                    seen.append(r)
    return seen


def loss_figure(steps_df: pd.DataFrame, colors: dict) -> Figure:
    """Training loss and imbalance against step, one line per router."""
    per_step = (
        steps_df.groupby(["router", "step"], sort=True)
        .agg(loss=("loss", "first"), imbalance=("imbalance", "mean"))
        .reset_index()
    )
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    ax_loss, ax_imb = fig.subplots(1, 2)
    for router, color in colors.items():
        d = per_step[per_step["router"] == router]
        if d.empty:
            continue
        smooth = d[["loss", "imbalance"]].rolling(SMOOTH_STEPS, min_periods=1).mean()
        ax_loss.plot(d["step"], smooth["loss"], color=color, label=router, lw=1.6)
        ax_imb.plot(d["step"], smooth["imbalance"], color=color, label=router, lw=1.6)
    ax_loss.set(
        title=f"Training loss ({SMOOTH_STEPS}-step moving average)",
        xlabel="training step",
        ylabel="next-token loss (nats per token)",
    )
    ax_imb.set(
        title=f"Load imbalance (mean over layers, {SMOOTH_STEPS}-step moving average)",
        xlabel="training step",
        ylabel="imbalance (max / mean expert load)",
    )
    ax_imb.axhline(1.0, color="0.5", lw=0.8, ls=":")
    ax_imb.legend(fontsize="small", loc="upper right", frameon=True)
    fig.suptitle("Routing quality: the same tiny MoE LM trained with each router", fontweight="bold")
    return fig


def tradeoff_figure(summary_df: pd.DataFrame, colors: dict) -> Figure:
    """Held-out loss against training tokens/s, one point per router."""
    ok = summary_df[summary_df["status"] == "ok"]
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    ax = fig.subplots(1, 1)
    for _, r in ok.iterrows():
        color = colors.get(r["router"], "0.3")
        hollow = bool(r.get("looks_at_whole_batch", False))
        imb = r.get("imbalance", math.nan)
        ax.scatter(
            r["train_tokens_per_s"],
            r["heldout_loss"],
            s=110,
            facecolors="none" if hollow else color,
            edgecolors=color,
            linewidths=2,
            label=f"{r['router']} (imbalance {imb:.2f}{', not causal' if hollow else ''})",
        )
    lang = ok["heldout_lang"].iloc[0] if len(ok) else "?"
    ax.set(
        title=f"Held-out loss ({lang}) against training throughput; hollow = looks at the whole batch",
        xlabel="training throughput (tokens per second, forward + backward + optimiser)",
        ylabel="held-out next-token loss (nats per token)",
    )
    if len(ok):
        ax.margins(x=0.15, y=0.15)
    ax.legend(fontsize="small", loc="best", frameon=True)
    fig.suptitle("Routing quality against cost (lower and further right is better)", fontweight="bold")
    return fig


def quality_figures(steps_df: pd.DataFrame, summary_df: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Write the quality figures as PNGs into ``out_dir``; returns the paths written (a figure
    whose table is empty is left out)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    colors = _palette(_order(steps_df, summary_df))
    written: list[Path] = []
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=1.0):
        if steps_df is not None and len(steps_df):
            fig = loss_figure(steps_df, colors)
            written.append(out / "quality_loss.png")
            fig.savefig(written[-1])
        if summary_df is not None and len(summary_df) and (summary_df["status"] == "ok").any():
            fig = tradeoff_figure(summary_df, colors)
            written.append(out / "quality_tradeoff.png")
            fig.savefig(written[-1])
    return written


def read_quality_run(run_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(steps, summary) tables of a quality run directory."""
    p = Path(run_dir)
    steps = pd.read_parquet(p / "quality_steps.parquet")
    summary = pd.read_parquet(p / "quality.parquet")
    steps["imbalance"] = steps["imbalance"].astype(np.float64)
    return steps, summary
