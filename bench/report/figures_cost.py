"""Report figures about cost: throughput, memory, stage times, and the Pareto views.

Every figure function takes a :class:`~bench.report_data.ReportData` and returns a
:class:`FigureOut` (the matplotlib figure, its title and caption, and the table of numbers it
draws) or a :class:`LeftOut` saying why the run has nothing to draw. Figures are built with the
object-oriented matplotlib API (no pyplot state) inside :func:`figure_style`: seaborn's
"colorblind" palette, whitegrid, font scale 1.2, 10 x 5.6 in at 150 dpi, legible on a slide.
The routing figures live in :mod:`bench.figures_routing`; the helpers here serve both.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import EngFormatter, FuncFormatter

from moe_routing_bench.bench.record import STAGES
from moe_routing_bench.bench.report.data import ReportData, tokens_per_s_band

FIGSIZE = (10.0, 5.6)
DPI = 150
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_MODE_ORDER = {"fwd": 0, "fwd+bwd": 1}


@dataclass
class FigureOut:
    name: str  # file stem of the PNG
    title: str
    caption: str  # may hold run-derived text: renderers escape it
    fig: Figure
    table: pd.DataFrame  # the numbers the figure draws


@dataclass
class LeftOut:
    name: str
    title: str
    reason: str


@contextlib.contextmanager
def figure_style() -> Iterator[None]:
    """Seaborn theme for every report figure, restored afterwards (no global state leaks)."""
    with (
        sns.axes_style("whitegrid"),
        sns.plotting_context("notebook", font_scale=1.2),
        sns.color_palette("colorblind"),
    ):
        yield


def new_figure(ncols: int = 1, sharey: bool = False, sharex: bool = False) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    axes = fig.subplots(1, ncols, sharey=sharey, sharex=sharex, squeeze=False)[0]
    return fig, list(axes)


def colors_for(levels: Sequence[str]) -> dict[str, tuple[float, float, float]]:
    pal = sns.color_palette("colorblind", max(len(levels), 1))
    return {lv: pal[i % len(pal)] for i, lv in enumerate(levels)}


def titled(fig: Figure, title: str, subtitle: str = "") -> None:
    """Title on top; what the figure holds fixed (the slice) as a footnote under the axes."""
    # Left-aligned, so a long title never runs into the legend at the upper right.
    fig.suptitle(title, fontsize="large", fontweight="bold", x=0.01, ha="left")
    if subtitle:
        fig.supxlabel(plain(subtitle), fontsize="small", color="0.35")


def seconds_label(t: float) -> str:
    return f"{t:.3g} s" if t >= 1 else f"{t * 1e3:.3g} ms" if t >= 1e-3 else f"{t * 1e6:.3g} µs"


def tokens_formatter(v: float, _pos: object = None) -> str:
    return f"{v:g}" if v < 10_000 else EngFormatter(sep="")(v)


def short(label: object, limit: int = 28) -> str:
    """Labels in figures are cut to ``limit`` characters (tables keep them whole), so one long
    sweep label cannot squeeze the axes away."""
    text = str(label)
    return plain(text if len(text) <= limit else text[: limit - 1] + "…")


def plain(text: str) -> str:
    """Run-derived text drawn by matplotlib: a '$' would otherwise start mathtext."""
    return text.replace("$", r"\$")


def legend_right(fig: Figure, handles: list, labels: list[str], title: str | None = None) -> None:
    if handles:
        fig.legend(
            handles, [short(lab) for lab in labels], loc="outside right upper", title=title, frameon=False
        )


def ordered(values: pd.Series) -> list[str]:
    return sorted(pd.unique(values.astype(str)))


def rotate_if_crowded(ax: Axes, n: int) -> None:
    if n > 4:
        for lab in ax.get_xticklabels():
            lab.set_rotation(35)
            lab.set_horizontalalignment("right")


def grouped_bars(
    ax: Axes,
    df: pd.DataFrame,
    x: str,
    hue: str,
    y: str,
    lo: str | None = None,
    hi: str | None = None,
    colors: dict | None = None,
) -> None:
    """Bars of ``y`` at each ``x``, one per ``hue`` level, with optional [lo, hi] error bars."""
    xs, hues = ordered(df[x]), ordered(df[hue])
    colors = colors or colors_for(hues)
    width = 0.8 / max(len(hues), 1)
    for j, h in enumerate(hues):
        sub = df[df[hue].astype(str) == h].set_index(x)
        pos = [i + (j - (len(hues) - 1) / 2) * width for i, xv in enumerate(xs) if xv in sub.index]
        sel = sub.loc[[xv for xv in xs if xv in sub.index]]
        vals = sel[y].to_numpy(dtype=float)
        err = None
        if lo is not None and hi is not None:
            err = np.vstack([vals - sel[lo].to_numpy(float), sel[hi].to_numpy(float) - vals]).clip(min=0)
        ax.bar(pos, vals, width * 0.95, color=colors[h], label=h, yerr=err, capsize=3, ecolor="0.2")
    ax.set_xticks(range(len(xs)), [short(x) for x in xs])
    rotate_if_crowded(ax, len(xs))


def _first(df: pd.DataFrame, keys: list[str], cols: list[str]) -> pd.DataFrame:
    """One row per ``keys`` (median of numbers, in case labels still repeat)."""
    return df.groupby(keys, as_index=False, sort=True)[cols].median(numeric_only=True)


def _run_cols(data: ReportData) -> list[str]:
    return ["run"] if data.several_runs else []


def _missing_note(data: ReportData, df: pd.DataFrame) -> str:
    missing = data.missing_routers(df)
    return f" Not in this slice: {', '.join(missing)}." if missing else ""


def throughput(data: ReportData) -> FigureOut | LeftOut:
    name, title = "throughput", "Throughput per router and workload"
    df = data.slice(free=("mode",))
    df = df[df["tokens_per_s"].notna()]
    if df.empty:
        return LeftOut(name, title, "no ok configuration with a measured time")
    lo, hi = tokens_per_s_band(df)
    df = df.assign(tokens_per_s_at_p80_time=lo, tokens_per_s_at_p20_time=hi)
    cols = ["tokens_per_s", "tokens_per_s_at_p80_time", "tokens_per_s_at_p20_time", "time_total_median"]
    keys = [*_run_cols(data), "router_disp", "workload", "series", "mode"]
    table = _first(df, keys, cols)
    modes = sorted(table["mode"].unique(), key=lambda m: (_MODE_ORDER.get(m, 9), m))
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
        f"total time over repeats. Slice: {data.describe(free=('mode',))}." + _missing_note(data, df)
    )
    table = table.drop(columns="series").rename(columns={"router_disp": "router"})
    return FigureOut(name, title, caption, fig, table)


def stages(data: ReportData) -> FigureOut | LeftOut:
    """Share of the step per stage, 100% stacked, so a slow router does not flatten the others;
    each bar is labelled with its median total time and the table holds the seconds."""
    name, title = "stages", "Where the time goes: share of the step per stage"
    df = data.slice(free=("mode",))
    stage_cols = [f"time_{s}_median" for s in STAGES if s != "total"]
    stage_cols = [c for c in stage_cols if c in df.columns and (df[c].fillna(0) > 0).any()]
    if df.empty or not stage_cols:
        return LeftOut(name, title, "no stage times measured")
    df = df.assign(label=df["router_disp"] + (" · " + df["series"] if df["series"].nunique() > 1 else ""))
    keys = [*_run_cols(data), "label", "router_disp", "workload", "mode"]
    table = _first(df, keys, [*stage_cols, "time_total_median"])
    modes = sorted(table["mode"].unique(), key=lambda m: (_MODE_ORDER.get(m, 9), m))
    fig, axes = new_figure(len(modes), sharey=True)
    parts = [*stage_cols, "other"]
    colors = colors_for(parts)
    colors["other"] = (0.8, 0.8, 0.8)
    labels = ordered(table["label"])[::-1]
    ypos = np.arange(len(labels))
    for ax, mode in zip(axes, modes, strict=True):
        sub = table[table["mode"] == mode].set_index("label").reindex(labels)
        secs = sub[stage_cols].fillna(0).to_numpy(float)
        total = sub["time_total_median"].to_numpy(float)
        other = np.clip(np.nan_to_num(total) - secs.sum(axis=1), 0, None)
        denom = np.where(secs.sum(axis=1) + other > 0, secs.sum(axis=1) + other, 1.0)
        left = np.zeros(len(labels))
        for k, c in enumerate(parts):
            vals = (secs[:, k] if c != "other" else other) / denom * 100
            if (vals > 0).any():  # a stage this mode never ran (backward in fwd) gets no bar
                ax.barh(ypos, vals, left=left, color=colors[c], label=c[5:-7] if c != "other" else c)
            left += vals
        ax.set_yticks(ypos, [short(lab) for lab in labels])
        for y, t in enumerate(total):
            if np.isfinite(t):
                ax.text(101, y, seconds_label(t), va="center", fontsize="small")
        ax.set_xlim(0, 100)
        ax.set_title(f"mode {mode}")
        ax.set_xlabel("share of the median step (%)")
    drawn = {lab for ax in axes for lab in ax.get_legend_handles_labels()[1]}
    names = [c[5:-7] if c != "other" else c for c in parts]
    handles = [Patch(color=colors[c]) for c, n in zip(parts, names, strict=True) if n in drawn]
    legend_right(fig, handles, [n for n in names if n in drawn], "stage")
    titled(fig, title, data.describe(free=("mode",)))
    caption = (
        "Median time of each stage over repeats as a share of the step; 'other' is the median total "
        "step minus the stage medians (time between stages). Labels: median total step. Stages a "
        "configuration never ran (backward in fwd mode, the shared expert for routers without one) have "
        f"no bar. Seconds per stage are in the table. Slice: {data.describe(free=('mode',))}."
        + _missing_note(data, df)
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
    keys = [*_run_cols(data), "router_disp", "backend", "layout", "tokens"]
    table = _first(df, keys, ["peak_mem_bytes", "dispatch_buffer_bytes"])
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
    keys = [*_run_cols(data), "router_disp", "workload", "series", "capacity_factor"]
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
        f"Slice: {data.describe(free=free)}." + _missing_note(data, df)
    )
    table = table.drop(columns="series").rename(columns={"router_disp": "router"})
    return FigureOut(name, title, caption, fig, table)
