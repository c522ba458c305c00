"""What every report figure shares: the result types, the seaborn style, and small drawing helpers.

A figure function takes a :class:`~moe_routing_bench.bench.report.data.ReportData` and returns a
:class:`FigureOut` (the matplotlib figure, its title and caption, and the table of numbers it
draws) or a :class:`LeftOut` saying why the run has nothing to draw. Figures are built with the
object-oriented matplotlib API (no pyplot state) inside :func:`figure_style`: seaborn's
"colorblind" palette, whitegrid, font scale 1.2, 10 x 5.6 in at 150 dpi, legible on a slide.
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
from matplotlib.ticker import EngFormatter

from moe_routing_bench.bench.report.data import ReportData

FIGSIZE = (10.0, 5.6)
DPI = 150
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
MODE_ORDER = {"fwd": 0, "fwd+bwd": 1}


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
        fig.legend(handles, [short(lab) for lab in labels], loc="outside right upper", title=title, frameon=False)


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


def first_per(df: pd.DataFrame, keys: list[str], cols: list[str]) -> pd.DataFrame:
    """One row per ``keys`` (median of numbers, in case labels still repeat)."""
    return df.groupby(keys, as_index=False, sort=True)[cols].median(numeric_only=True)


def run_cols(data: ReportData) -> list[str]:
    return ["run"] if data.several_runs else []


def missing_note(data: ReportData, df: pd.DataFrame) -> str:
    missing = data.missing_routers(df)
    return f" Not in this slice: {', '.join(missing)}." if missing else ""
