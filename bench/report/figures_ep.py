"""Report figure of expert-parallel runs (``moe-bench ep``): what each rank did in one step.

Rows processed and bytes sent per rank (the straggler is the rank with the most), and the step's
time split per rank into all-to-all, expert compute and waiting, one panel per router x workload.
"""

from __future__ import annotations

import pandas as pd

from moe_routing_bench.bench.report.data import ReportData
from moe_routing_bench.bench.report.style import FigureOut, LeftOut, colors_for, new_figure, short, titled

MAX_PANELS = 4
_PARTS = (("a2a_time_median", "all-to-all"), ("expert_time_median", "experts"), ("wait_time_median", "waiting"))


def ep_ranks(data: ReportData) -> FigureOut | LeftOut:
    name, title = "ep_ranks", "Expert parallelism: work and time per rank"
    if data.ranks is None or data.ranks.empty:
        return LeftOut(name, title, "no per-rank table (only `moe-bench ep` runs have one)")
    ranks = data.ranks
    keys = ["run", "router", "workload"] if data.several_runs else ["router", "workload"]
    groups = list(ranks.groupby(keys, sort=True))[:MAX_PANELS]
    fig, axes = new_figure(ncols=len(groups), sharey=True)
    colors = colors_for([label for _, label in _PARTS])
    table = []
    for ax, (key, part) in zip(axes, groups, strict=True):
        part = part.sort_values("rank")
        x = part["rank"].astype(int).to_numpy()
        bottom = None
        for col, label in _PARTS:
            ms = part[col].to_numpy(float) * 1e3
            ax.bar(x, ms, 0.7, bottom=bottom, color=colors[label], label=label)
            bottom = ms if bottom is None else bottom + ms
        for xi, rows in zip(x, part["rows_processed"].to_numpy(float), strict=True):
            ax.annotate(
                f"{rows:.0f} rows", (xi, 0), xytext=(0, 3), textcoords="offset points", ha="center", fontsize="x-small"
            )
        label = " × ".join(short(k, 18) for k in (key if isinstance(key, tuple) else (key,)))
        strag = float(part["straggler"].iloc[0])
        ax.set_title(f"{label}\nstraggler {strag:.2f}", fontsize="small")
        ax.set_xlabel("rank")
        ax.set_xticks(x)
        table.append(part[[*keys, "rank", "rows_processed", "bytes_sent", *[c for c, _ in _PARTS], "straggler"]])
    axes[0].set_ylabel("ms per step (median)")
    axes[0].legend(fontsize="small", loc="upper left")
    titled(fig, title, "per rank: all-to-all, expert compute and barrier wait; rows processed under each bar")
    caption = (
        "Each rank's median time per step in the all-to-all exchanges, its local experts and waiting for "
        "the slowest rank; the label under a bar is the rows that rank's experts processed. The straggler is "
        "the slowest rank's busy time over the mean: the whole step waits for it."
    )
    return FigureOut(name, title, caption, fig, pd.concat(table, ignore_index=True))
