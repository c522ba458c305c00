"""Figures of a ``moe-bench simulate`` run (its ``sim.parquet``): step time and straggler against G.

``sim_figures(sim_df, out_dir)`` draws one PNG per quantity, one line per router (style: placement;
one panel per workload when there are several), log-2 x axis. The report calls it; so can a user:

    from moe_routing_bench.bench.cli.sim import load_sim
    from moe_routing_bench.bench.report.figures_sim import sim_figures
    sim_figures(load_sim("results/<run_id>"), "results/<run_id>/report")
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

FIGURES = {
    "sim_step_time.png": (
        "step_time_ms",
        "simulated step time (ms): dispatch a2a + slowest compute + combine a2a",
    ),
    "sim_straggler.png": ("straggler", "straggler: slowest device's busy time / mean"),
}


def sim_figures(sim_df: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Write the simulator's figures into ``out_dir``; returns their paths (none for an empty table)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if sim_df.empty:
        return []
    df = sim_df.assign(step_time_ms=sim_df["step_time_s"] * 1e3)
    workloads = sorted(df["workload"].unique())
    style = "placement" if df["placement"].nunique() > 1 else None
    paths = []
    for name, (column, title) in FIGURES.items():
        fig, axes = plt.subplots(1, len(workloads), figsize=(5.5 * len(workloads), 4), squeeze=False)
        for ax, workload in zip(axes[0], workloads, strict=True):
            part = df[df["workload"] == workload].sort_values("devices")
            sns.lineplot(data=part, x="devices", y=column, hue="router", style=style, marker="o", ax=ax)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("devices G")
            ax.set_ylabel(column)
            ax.set_title(f"{workload}" if len(workloads) > 1 else title, fontsize=10)
            if column == "straggler":
                ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        if len(workloads) > 1:
            fig.suptitle(title, fontsize=11)
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
