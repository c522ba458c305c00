"""Report figures about cost: throughput, memory, stage times, and the Pareto views.

Each returns a ``FigureOut`` or a ``LeftOut`` with the reason (``report.style``); the routing
figures live in ``report.figures_routing``.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import EngFormatter, FuncFormatter

from moe_routing_bench.bench.report.data import ReportData, tokens_per_s_band
from moe_routing_bench.bench.report.style import (
    DPI,
    FIGSIZE,
    LINESTYLES,
    MARKERS,
    MODE_ORDER,
    FigureOut,
    LeftOut,
    colors_for,
    first_per,
    grouped_bars,
    legend_right,
    missing_note,
    new_figure,
    ordered,
    run_cols,
    seconds_label,
    short,
    titled,
    tokens_formatter,
)
from moe_routing_bench.bench.schema import STAGES


def throughput(data: ReportData) -> FigureOut | LeftOut:
    name, title = "throughput", "Throughput per router and workload"
    df = data.slice(free=("mode",))
    df = df[df["tokens_per_s"].notna()]
    if df.empty:
        return LeftOut(name, title, "no ok configuration with a measured time")
    lo, hi = tokens_per_s_band(df)
    df = df.assign(tokens_per_s_at_p80_time=lo, tokens_per_s_at_p20_time=hi)
    cols = ["tokens_per_s", "tokens_per_s_at_p80_time", "tokens_per_s_at_p20_time", "time_total_median"]
    keys = [*run_cols(data), "router_disp", "workload", "series", "mode"]
    table = first_per(df, keys, cols)
    modes = sorted(table["mode"].unique(), key=lambda m: (MODE_ORDER.get(m, 9), m))
    fig, axes = new_figure(len(modes))
    colors = colors_for(ordered(table["series"]))
    for ax, mode in zip(axes, modes, strict=True):
        sub = table[table["mode"] == mode]
        grouped_bars(
            ax,
            sub,
            "router_disp",
            "series",
            "tokens_per_s",
            "tokens_per_s_at_p80_time",
            "tokens_per_s_at_p20_time",
            colors,
        )
        ax.set_title(f"mode {mode}")
        ax.set_xlabel("router")
        ax.yaxis.set_major_formatter(EngFormatter(sep=""))
    axes[0].set_ylabel("tokens / s")
    handles, labels = axes[0].get_legend_handles_labels()
    legend_right(fig, handles, labels, "workload")
    titled(fig, title, data.describe(free=("mode",)))
    caption = (
        "Bars: tokens/s = T / median total time; error bars span tokens/s at the p80 and p20 "
        f"total time over repeats. Slice: {data.describe(free=('mode',))}." + missing_note(data, df)
    )
    table = table.drop(columns="series").rename(columns={"router_disp": "router"})
    return FigureOut(name, title, caption, fig, table)


def stages(data: ReportData) -> FigureOut | LeftOut:
    """Share of the step per stage, 100% stacked, so a slow router does not flatten the others;
    each bar is labelled with its median total time and the table holds the seconds. One panel per
    mode, stacked vertically, each as tall as its rows need (labels never overlap)."""
    name, title = "stages", "Where the time goes: share of the step per stage"
    df = data.slice(free=("mode",))
    stage_cols = [f"time_{s}_median" for s in STAGES if s != "total"]
    stage_cols = [c for c in stage_cols if c in df.columns and (df[c].fillna(0) > 0).any()]
    if df.empty or not stage_cols:
        return LeftOut(name, title, "no stage times measured")
    df = df.assign(label=df["router_disp"] + (" · " + df["series"] if df["series"].nunique() > 1 else ""))
    keys = [*run_cols(data), "label", "router_disp", "workload", "mode"]
    table = first_per(df, keys, [*stage_cols, "time_total_median"])
    modes = sorted(table["mode"].unique(), key=lambda m: (MODE_ORDER.get(m, 9), m))
    rows = [len(table[table["mode"] == m]) for m in modes]
    fig = Figure(figsize=(FIGSIZE[0], min(2.2 + 0.26 * sum(rows), 40.0)), dpi=DPI, layout="constrained")
    axes = fig.subplots(len(modes), 1, squeeze=False, height_ratios=[r + 1.5 for r in rows])[:, 0]
    names = [c[5:-7] for c in stage_cols]
    colors = colors_for(names)
    if "other" in colors:
        colors["other"] = (0.8, 0.8, 0.8)
    for ax, mode in zip(axes, modes, strict=True):
        sub = table[table["mode"] == mode].sort_values("label", ascending=False)
        secs = sub[stage_cols].fillna(0).clip(lower=0).to_numpy(float)
        total = sub["time_total_median"].to_numpy(float)
        share = secs / np.where(secs.sum(axis=1, keepdims=True) > 0, secs.sum(axis=1, keepdims=True), 1.0) * 100
        ypos = np.arange(len(sub))
        left = np.zeros(len(sub))
        for k, n in enumerate(names):
            if (share[:, k] > 0).any():  # a stage this mode never ran (backward in fwd) gets no bar
                ax.barh(ypos, share[:, k], left=left, color=colors[n], label=n, height=0.75)
            left += share[:, k]
        ax.set_yticks(ypos, [short(lab, 34) for lab in sub["label"]], fontsize="small")
        for y, tt in enumerate(total):
            if np.isfinite(tt):
                ax.text(101.5, y, seconds_label(tt), va="center", fontsize="x-small")
        ax.set_xlim(0, 117)
        ax.set_xticks([0, 25, 50, 75, 100])
        ax.set_ylim(-0.6, len(sub) - 0.4)
        ax.set_title(f"mode {mode}", fontsize="medium", loc="left")
    axes[-1].set_xlabel("share of the median step (%); at the right: the median step time")
    drawn = {lab for ax in axes for lab in ax.get_legend_handles_labels()[1]}
    legend_right(fig, [Patch(color=colors[n]) for n in names if n in drawn], [n for n in names if n in drawn], "stage")
    titled(fig, title, data.describe(free=("mode",)))
    caption = (
        "Median time of each stage over repeats as a share of their sum; 'other' is each step's total minus "
        "its timed stages (Python between stages, the autograd engine's own work, allocation), measured "
        "per step. Labels: median total step. Stages a configuration never ran (backward in fwd mode, the "
        "shared expert for routers without one) have no bar. Seconds per stage are in the table. Slice: "
        f"{data.describe(free=('mode',))}." + missing_note(data, df)
    )
    table = table.drop(columns="label").rename(columns={"router_disp": "router"})
    return FigureOut(name, title, caption, fig, table)


def memory(data: ReportData) -> FigureOut | LeftOut:
    """Measured peak and analytic dispatch-buffer bytes against T, per backend (log-log).

    Needs at least two token counts: memory *against tokens* is the point (the einsum mask grows
    as T * E * C, index dispatch as N * D). With one backend it still shows that growth.
    """
    name, title = "memory", "Memory against tokens per backend"
    free = ("tokens", "backend", "layout")
    df = data.slice(free=free)
    if df["tokens"].nunique() < 2:
        return LeftOut(name, title, "the run has one token count; memory against tokens needs two or more")
    keys = [*run_cols(data), "router_disp", "backend", "layout", "tokens"]
    table = first_per(df, keys, ["peak_mem_bytes", "dispatch_buffer_bytes"])
    table["backend_layout"] = table["backend"] + "/" + table["layout"]
    fig, axes = new_figure(2)
    routers, backends = ordered(table["router_disp"]), ordered(table["backend_layout"])
    runs = ordered(table["run"]) if data.several_runs else [""]
    colors = colors_for(routers)
    lines = table.assign(run_=table["run"] if data.several_runs else "")
    for ax, col, sub_title in zip(
        axes,
        ("peak_mem_bytes", "dispatch_buffer_bytes"),
        ("measured peak", "analytic dispatch buffer"),
        strict=True,
    ):
        for (r, b, run), g in lines.groupby(["router_disp", "backend_layout", "run_"]):
            g = g[g[col] > 0].sort_values("tokens")  # log scale: no growth measured, nothing to draw
            ax.plot(
                g["tokens"].astype(float),
                g[col],
                color=colors[r],
                linewidth=2,
                linestyle=LINESTYLES[backends.index(b) % 4],
                marker=MARKERS[runs.index(run) % 8],
            )
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(tokens_formatter))
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(EngFormatter(unit="B", sep=""))
        ax.set_xlabel("tokens per batch T (log scale)")
        ax.set_title(sub_title)
    dropped = int((table["peak_mem_bytes"].fillna(0) <= 0).sum())
    axes[0].set_ylabel("bytes (log scale)")
    handles = [Line2D([], [], color=colors[r], lw=3) for r in routers]
    handles += [Line2D([], [], color="0.3", linestyle=LINESTYLES[i % 4]) for i in range(len(backends))]
    names = [*routers, *backends]
    if data.several_runs:
        handles += [Line2D([], [], color="0.3", marker=MARKERS[i % 8], lw=0) for i in range(len(runs))]
        names += runs
    legend_right(fig, handles, names, "router, backend/layout")
    one = " (one backend in this run)" if len(backends) == 1 else ""
    titled(fig, title + one, data.describe(free=free))
    caption = (
        "Left: measured peak bytes during the layer (GPU: max allocated; CPU: sampled RSS growth). "
        "Right: the dispatch buffer's analytic size (einsum: the one-hot [T, E, C] mask plus the "
        "padded buffer; index dispatch: kept rows x D). Colour: router; line style: backend/layout."
        + (f" {dropped} configurations with no measurable peak growth are not drawn." if dropped else "")
        + f" Slice: {data.describe(free=free)}."
    )
    table = table.drop(columns="backend_layout").rename(columns={"router_disp": "router"})
    return FigureOut(name, title, caption, fig, table)


def pareto_front(x: np.ndarray, y: np.ndarray, x_lower_better: bool, y_lower_better: bool) -> np.ndarray:
    """Boolean mask of points that no other point beats on both axes."""
    xs = np.where(x_lower_better, x, -x)
    ys = np.where(y_lower_better, y, -y)
    keep = np.ones(len(xs), dtype=bool)
    for i in range(len(xs)):
        better = (xs <= xs[i]) & (ys <= ys[i]) & ((xs < xs[i]) | (ys < ys[i]))
        keep[i] = not better.any()
    return keep & np.isfinite(xs) & np.isfinite(ys)


def pareto(data: ReportData) -> FigureOut | LeftOut:
    name, title = "pareto", "Trade-offs: speed against drops, balance against fidelity"
    free = ("capacity_factor",)
    df = data.slice(free=free)
    cols = ["tokens_per_s", "tokens_dropped_frac", "imbalance", "gate_mass_kept"]
    df = df.dropna(subset=["tokens_dropped_frac", "imbalance"])
    if df.empty:
        return LeftOut(name, title, "no ok configuration with routing metrics")
    keys = [*run_cols(data), "router_disp", "workload", "series", "capacity_factor"]
    table = df.groupby(keys, as_index=False, dropna=False)[cols].median()
    table["front_speed_drops"] = pareto_front(
        table["tokens_dropped_frac"].to_numpy(float), table["tokens_per_s"].to_numpy(float), True, False
    )
    table["front_balance_fidelity"] = pareto_front(
        table["gate_mass_kept"].to_numpy(float), table["imbalance"].to_numpy(float), False, True
    )
    fig, axes = new_figure(2)
    routers, series = ordered(table["router_disp"]), ordered(table["series"])
    colors = colors_for(routers)
    for ax, (xc, yc, front) in zip(
        axes,
        (
            ("tokens_dropped_frac", "tokens_per_s", "front_speed_drops"),
            ("gate_mass_kept", "imbalance", "front_balance_fidelity"),
        ),
        strict=True,
    ):
        for (r, s), g in table.groupby(["router_disp", "series"]):
            ax.scatter(
                g[xc],
                g[yc],
                color=colors[r],
                marker=MARKERS[series.index(s) % 8],
                s=70,
                edgecolor="white",
                linewidth=0.6,
                zorder=3,
            )
        f = table[table[front]].sort_values(xc)
        ax.plot(f[xc], f[yc], color="0.4", linestyle="--", linewidth=1.2, zorder=2)
    axes[0].set_xlabel("tokens dropped (fraction of tokens)")
    axes[0].set_ylabel("tokens / s")
    axes[0].yaxis.set_major_formatter(EngFormatter(sep=""))
    axes[0].set_title("speed vs drops\n(up and left is better)", fontsize="medium")
    axes[1].set_xlabel("gate mass kept (fidelity)")
    axes[1].set_ylabel("imbalance (max / mean load)")
    axes[1].set_title("balance vs fidelity\n(down and right is better)", fontsize="medium")
    handles = [Line2D([], [], color=colors[r], marker="o", lw=0, markersize=9) for r in routers]
    names = list(routers)
    if len(series) > 1:
        handles += [Line2D([], [], color="0.3", marker=MARKERS[i % 8], lw=0) for i in range(len(series))]
        names += series
    handles.append(Line2D([], [], color="0.4", linestyle="--"))
    names.append("Pareto front")
    legend_right(fig, handles, names, "router")
    titled(fig, title, data.describe(free=free))
    caption = (
        "One point per router, workload and capacity factor. Dashed: the Pareto front (no other point "
        "is better on both axes). Drops are tokens_dropped_frac, defined for every router. "
        f"Slice: {data.describe(free=free)}." + missing_note(data, df)
    )
    table = table.drop(columns="series").rename(columns={"router_disp": "router"})
    return FigureOut(name, title, caption, fig, table)
