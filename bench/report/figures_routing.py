"""Report figures about routing: drops against capacity, balance, per-expert load distributions,
load drift across batches, drops by token frequency and position, and per-layer load of traces.

Same contract as the cost figures (``report.style``): each function returns a ``FigureOut`` or a ``LeftOut``
with the reason (a figure with no data is left out, never drawn empty).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.lines import Line2D

from moe_routing_bench.bench.report.data import ReportData, loads_changing
from moe_routing_bench.bench.report.style import (
    LINESTYLES,
    MARKERS,
    FigureOut,
    LeftOut,
    colors_for,
    grouped_bars,
    legend_right,
    new_figure,
    ordered,
    rotate_if_crowded,
    short,
    titled,
)

MAX_HEATMAPS = 4


def _run_cols(data: ReportData) -> list[str]:
    return ["run"] if data.several_runs else []


def _line_legend(fig, routers, series, colors, title="router") -> None:
    handles = [Line2D([], [], color=colors[r], lw=3) for r in routers]
    names = list(routers)
    if len(series) > 1:
        handles += [Line2D([], [], color="0.3", linestyle=LINESTYLES[i % 4]) for i in range(len(series))]
        names += list(series)
    legend_right(fig, handles, names, title)


def drop_vs_capacity(data: ReportData) -> FigureOut | LeftOut:
    name, title = "drops_vs_capacity", "Drops against capacity factor"
    free = ("capacity_factor",)
    df = data.slice(free=free)
    no_cf = sorted(set(df.loc[df["capacity_factor"].isna(), "router_disp"]))
    df = df[df["capacity_factor"].notna()]
    if df.empty:
        return LeftOut(name, title, "no router in the run has a capacity factor (all dropless)")
    cols = ["tokens_dropped_frac", "tokens_dropped_frac_se", "drop_rate", "drop_rate_se"]
    keys = [*_run_cols(data), "router_disp", "workload", "series", "capacity_factor"]
    table = df.groupby(keys, as_index=False)[cols].median()
    panels = [("tokens_dropped_frac", "tokens with no expert")]
    if table["drop_rate"].notna().any():
        panels.append(("drop_rate", "assignments dropped"))
    fig, axes = new_figure(len(panels), sharey=True)
    routers, series = ordered(table["router_disp"]), ordered(table["series"])
    colors = colors_for(routers)
    for ax, (col, sub_title) in zip(axes, panels, strict=True):
        for (r, s), g in table.groupby(["router_disp", "series"]):
            g = g.dropna(subset=[col]).sort_values("capacity_factor")
            if g.empty:
                continue
            ax.errorbar(
                g["capacity_factor"],
                g[col],
                yerr=g[f"{col}_se"].fillna(0),
                color=colors[r],
                linestyle=LINESTYLES[series.index(s) % 4],
                marker="o",
                linewidth=2,
                capsize=3,
            )
        ax.set_xlabel("capacity factor cf")
        ax.set_title(sub_title)
    axes[0].set_ylabel("fraction dropped")
    _line_legend(fig, routers, series, colors)
    titled(fig, title, data.describe(free=free))
    whole = sorted(set(table.loc[table["drop_rate"].isna(), "router_disp"]))
    caption = (
        "Mean over batches, error bars ± 1 standard error. tokens_dropped_frac (left) is defined for "
        "every router and is the cross-router comparison; drop_rate (right) is 1 - kept/requested "
        "assignments."
        + (
            f" drop_rate is undefined (NaN) for {', '.join(whole)}: routers that look at the whole "
            "batch (expert choice) pick tokens per expert, so nothing is refused."
            if whole
            else ""
        )
        + (f" Without a capacity factor (dropless at their default): {', '.join(no_cf)}." if no_cf else "")
        + f" Slice: {data.describe(free=free)}."
    )
    table = table.drop(columns="series").rename(columns={"router_disp": "router"})
    return FigureOut(name, title, caption, fig, table)


def balance(data: ReportData) -> FigureOut | LeftOut:
    name, title = "balance", "Load balance per router and workload"
    df = data.slice().dropna(subset=["imbalance"])
    if df.empty:
        return LeftOut(name, title, "no ok configuration with load statistics")
    cols = ["imbalance", "imbalance_se", "load_cv", "load_cv_se"]
    keys = [*_run_cols(data), "router_disp", "workload", "series"]
    table = df.groupby(keys, as_index=False)[cols].median()
    for c in ("imbalance", "load_cv"):
        se = table[f"{c}_se"].fillna(0)
        table[f"{c}_lo"], table[f"{c}_hi"] = table[c] - se, table[c] + se
    fig, axes = new_figure(2)
    colors = colors_for(ordered(table["series"]))
    for ax, col, label, ideal in zip(
        axes,
        ("imbalance", "load_cv"),
        ("imbalance (max / mean load)", "load CV (std / mean load)"),
        (1, 0),
        strict=True,
    ):
        grouped_bars(ax, table, "router_disp", "series", col, f"{col}_lo", f"{col}_hi", colors)
        ax.axhline(ideal, color="0.3", linewidth=1, linestyle="--")
        ax.set_ylabel(label)
        ax.set_xlabel("router")
    handles, labels = axes[0].get_legend_handles_labels()
    legend_right(fig, handles, labels, "workload")
    titled(fig, title, data.describe())
    caption = (
        "On the requested load (before capacity). Error bars ± 1 standard error over batches; dashed: "
        f"perfect balance. Slice: {data.describe()}."
        + (f" Not in this slice: {', '.join(data.missing_routers(df))}." if data.missing_routers(df) else "")
    )
    table = table[[*keys, *cols]].drop(columns="series").rename(columns={"router_disp": "router"})
    return FigureOut(name, title, caption, fig, table)


def _slice_loads(data: ReportData, free: tuple[str, ...] = ()) -> pd.DataFrame:
    """Loads of the slice's configurations, with the display labels of their rows."""
    if data.loads.empty:
        return pd.DataFrame()
    rows = data.slice(free=free)[["run", "config_id", "router_disp", "series"]]
    loads = data.loads.drop(columns=[c for c in ("router_disp", "series") if c in data.loads])
    return loads.merge(rows, on=["run", "config_id"], how="inner")


def expert_loads(data: ReportData) -> FigureOut | LeftOut:
    name, title = "expert_loads", "Per-expert load distribution (sorted)"
    loads = _slice_loads(data)
    if loads.empty:
        return LeftOut(name, title, "no per-expert loads recorded for the reference slice")
    if "layer" in loads:
        loads = loads[loads["layer"].isna()] if loads["layer"].isna().any() else loads
    curves = []
    for (run, _cid, r, s), g in loads.groupby(["run", "config_id", "router_disp", "series"]):
        m = g.pivot_table(index="batch", columns="expert", values="requested", aggfunc="sum").to_numpy(float)
        mean = m.mean(axis=1, keepdims=True)
        norm = np.sort(np.divide(m, mean, out=np.zeros_like(m), where=mean > 0), axis=1)[:, ::-1]
        curve = norm.mean(axis=0)
        curves.append({"run": run, "router_disp": r, "series": s, "curve": curve})
    fig, axes = new_figure(1)
    ax = axes[0]
    routers, series = (
        ordered(pd.Series([c["router_disp"] for c in curves])),
        ordered(pd.Series([c["series"] for c in curves])),
    )
    colors = colors_for(routers)
    rows = []
    for i, c in enumerate(curves):
        k = np.arange(1, len(c["curve"]) + 1)
        # later lines thinner, so identical curves (dense and expert choice are both flat) stay visible
        width = max(1.5, 4.0 - 0.4 * i)
        ax.plot(
            k,
            c["curve"],
            color=colors[c["router_disp"]],
            linewidth=width,
            drawstyle="steps-mid",
            linestyle=LINESTYLES[series.index(c["series"]) % 4],
        )
        q = c["curve"]
        rows.append(
            {
                **({"run": c["run"]} if data.several_runs else {}),
                "router": c["router_disp"],
                "series": c["series"],
                "experts": len(q),
                "max_over_mean": q.max(),
                "p90_over_mean": np.quantile(q, 0.9),
                "median_over_mean": np.median(q),
                "p10_over_mean": np.quantile(q, 0.1),
                "min_over_mean": q.min(),
            }
        )
    ax.axhline(1.0, color="0.3", linewidth=1, linestyle="--")
    ax.set_xlabel("expert rank (1 = most loaded in its batch)")
    ax.set_ylabel("requested load / mean load")
    _line_legend(fig, routers, series, colors)
    titled(fig, title, data.describe())
    caption = (
        "Each batch's requested loads sorted from most to least loaded and divided by the mean load, "
        "averaged over batches; a flat line at 1 (dashed) is perfect balance. "
        f"Slice: {data.describe()}."
    )
    table = pd.DataFrame(rows).rename(columns={"series": "workload"})
    return FigureOut(name, title, caption, fig, table)


def load_drift(data: ReportData) -> FigureOut | LeftOut:
    """Heatmaps of load share per expert and batch, for configurations whose loads move."""
    name, title = "load_drift", "Per-expert load across batches (drifting workloads)"
    loads = _slice_loads(data, free=("capacity_factor",))
    if loads.empty:
        return LeftOut(name, title, "no per-expert loads recorded")
    if "layer" in loads:
        loads = loads[loads["layer"].isna()]
    found, rows = [], []
    for (run, cid, r, s), g in loads.groupby(["run", "config_id", "router_disp", "series"]):
        m = g.pivot_table(index="expert", columns="batch", values="requested", aggfunc="sum").fillna(0)
        if loads_changing(m.to_numpy(float).T):
            found.append((r, s, m))
            rows.append(
                {
                    **({"run": run} if data.several_runs else {}),
                    "router": r,
                    "workload": s,
                    "config_id": cid,
                    "batches": m.shape[1],
                    "experts": m.shape[0],
                }
            )
    if not found:
        return LeftOut(
            name,
            title,
            "per-expert loads do not change across batches beyond sampling noise "
            "(chi-square test of homogeneity) in any configuration of the slice",
        )
    found = found[:MAX_HEATMAPS]
    fig, axes = new_figure(len(found), sharey=True)
    vmax = max(float((m / m.mean(axis=0)).to_numpy().max()) for _, _, m in found)
    for i, (ax, (r, s, m)) in enumerate(zip(axes, found, strict=True)):
        share = m / m.mean(axis=0).replace(0, np.nan)
        sns.heatmap(
            share,
            ax=ax,
            cmap="viridis",
            vmin=0,
            vmax=vmax,
            cbar=i == len(found) - 1,
            cbar_kws={"label": "load / mean load"},
            xticklabels="auto",
            yticklabels="auto",
        )
        ax.set_title(f"{short(r)}\n{short(s)}", fontsize="medium")
        ax.set_xlabel("batch")
        ax.set_ylabel("expert" if i == 0 else "")
    titled(fig, title, data.describe(free=("capacity_factor",)))
    caption = (
        "Requested load of each expert in each batch, divided by that batch's mean load. Shown only for "
        "configurations whose loads change across batches beyond sampling noise (chi-square test of "
        f"homogeneity, 5 sigma); at most {MAX_HEATMAPS} panels, all listed in the table."
    )
    return FigureOut(name, title, caption, fig, pd.DataFrame(rows))


def drops_breakdown(data: ReportData) -> FigureOut | LeftOut:
    name, title = "drops_breakdown", "Drops by token frequency and by sequence position"
    bd = data.breakdown
    if bd is None or bd.empty:
        return LeftOut(name, title, "the run has no breakdown.parquet")
    rows = data.ok[["run", "config_id", "router_disp", "series"]]
    bd = bd.merge(rows, on=["run", "config_id"], how="inner")
    in_slice = bd["config_id"].isin(data.slice()["config_id"])
    if in_slice.any():
        bd = bd[in_slice]
    if bd.empty:
        return LeftOut(name, title, "breakdown.parquet matches no ok configuration")
    bd = bd.assign(bucket=bd["bucket"].astype(str))
    kinds = list(pd.unique(bd["kind"].astype(str)))
    fig, axes = new_figure(len(kinds))
    routers, series = ordered(bd["router_disp"]), ordered(bd["series"])
    colors = colors_for(routers)
    keys = [*_run_cols(data), "kind", "router_disp", "series", "bucket"]
    tables = []
    for ax, kind in zip(axes, kinds, strict=True):
        sub = bd[bd["kind"].astype(str) == kind]
        buckets = list(pd.unique(sub["bucket"]))  # the table's own order
        t = sub.groupby(keys, as_index=False, sort=False)[["tokens_dropped_frac", "drop_rate"]].mean()
        t["_pos"] = t["bucket"].map({b: i for i, b in enumerate(buckets)})
        t = t.sort_values("_pos")
        for (r, s), g in t.groupby(["router_disp", "series"]):
            ax.plot(
                g["_pos"],
                g["tokens_dropped_frac"],
                color=colors[r],
                marker="o",
                linewidth=2,
                linestyle=LINESTYLES[series.index(s) % 4],
            )
        ax.set_xticks(range(len(buckets)), [short(b, 12) for b in buckets])
        rotate_if_crowded(ax, len(buckets) if max(map(len, buckets)) > 3 else 0)
        ax.set_xlabel(f"{kind} bucket")
        ax.set_title(f"by {kind}")
        tables.append(t.drop(columns="_pos"))
    axes[0].set_ylabel("tokens dropped (fraction)")
    _line_legend(fig, routers, series, colors)
    titled(fig, title, data.describe() if in_slice.any() else "all configurations (mean)")
    caption = (
        "tokens_dropped_frac per bucket (from breakdown.parquet), averaged over the configurations of "
        "the slice: which tokens lose their expert when capacity runs out (rare or frequent tokens, "
        "early or late positions)."
    )
    table = pd.concat(tables, ignore_index=True).drop(columns="series")
    return FigureOut(name, title, caption, fig, table.rename(columns={"router_disp": "router"}))


def layer_loads(data: ReportData) -> FigureOut | LeftOut:
    name, title = "layer_loads", "Per-layer load balance (traces)"
    if data.loads.empty or "layer" not in data.loads.columns or data.loads["layer"].isna().all():
        return LeftOut(name, title, "the loads table has no layer column (only traces have layers)")
    loads = data.loads[data.loads["layer"].notna()]
    rows = data.ok[["run", "config_id", "router_disp", "series"]]
    loads = loads.drop(columns=[c for c in ("router_disp", "series") if c in loads]).merge(
        rows, on=["run", "config_id"], how="inner"
    )
    if loads.empty:
        return LeftOut(name, title, "layered loads match no ok configuration")
    per = loads.groupby(["run", "config_id", "router_disp", "series", "layer", "batch"])["requested"]
    stats = per.agg(lambda v: v.max() / v.mean() if v.mean() > 0 else np.nan).rename("imbalance").to_frame()
    stats["load_cv"] = per.agg(lambda v: v.std(ddof=0) / v.mean() if v.mean() > 0 else np.nan)
    keys = [*_run_cols(data), "router_disp", "series", "layer"]
    table = stats.reset_index().groupby(keys, as_index=False)[["imbalance", "load_cv"]].mean()
    fig, axes = new_figure(2)
    routers, series = ordered(table["router_disp"]), ordered(table["series"])
    colors = colors_for(routers)
    for ax, col, label in zip(axes, ("imbalance", "load_cv"), ("imbalance (max / mean)", "load CV"), strict=True):
        for (r, s), g in table.groupby(["router_disp", "series"]):
            g = g.sort_values("layer")
            ax.plot(
                g["layer"],
                g[col],
                color=colors[r],
                marker=MARKERS[0],
                linewidth=2,
                linestyle=LINESTYLES[series.index(s) % 4],
            )
        ax.set_xlabel("layer")
        ax.set_ylabel(label)
    _line_legend(fig, routers, series, colors)
    titled(fig, title, "requested load per layer, mean over batches")
    caption = "Balance of the requested load at each layer of a captured trace, mean over batches."
    return FigureOut(name, title, caption, fig, table.rename(columns={"router_disp": "router", "series": "workload"}))
