"""Reports of the runs that are not sweeps: ``simulate`` (sim.parquet) and ``quality``
(quality.parquet, quality_steps.parquet). ``moe-bench report`` reads each run's meta ``kind`` and
comes here for these; sweeps and ``ep`` runs (which share the sweep's row schema) take the main
path in ``report.build``.

Each writes the kind's PNG figures, a self-contained ``report.html`` (metadata, figures as data
URIs, the table behind them, sortable) and ``report.md``, like a sweep's report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from moe_routing_bench.bench.record import now
from moe_routing_bench.bench.report import html as H
from moe_routing_bench.bench.report.figures_quality import quality_figures, read_quality_run
from moe_routing_bench.bench.report.figures_sim import sim_figures
from moe_routing_bench.bench.sim.runner import load_sim

SIM_COLUMNS = [
    "router",
    "workload",
    "placement",
    "devices",
    "nodes",
    "experts",
    "tokens_per_device",
    "top_k",
    "capacity",
    "step_time_s",
    "a2a_dispatch_s",
    "a2a_combine_s",
    "compute_max_s",
    "straggler",
    "load_ratio",
    "bytes_inter_node",
    "tokens_dropped_frac",
]
QUALITY_COLUMNS = [
    "router",
    "status",
    "heldout_loss",
    "other_loss",
    "imbalance",
    "drop_rate",
    "tokens_dropped_frac",
    "gate_mass_kept",
    "aux_loss",
    "train_tokens_per_s",
    "causal",
    "notes",
    "error",
]
TEXT = {
    "simulate": (
        "Simulated expert-parallel step",
        "One step of an expert-parallel MoE layer on G devices, modelled from real plans: all-to-all "
        "traffic under an alpha-beta network model and roofline expert compute (moe-bench simulate).",
    ),
    "quality": (
        "Routing quality",
        "The same tiny MoE language model trained with each router on real text: held-out loss against "
        "load balance and cost (moe-bench quality). Loss in nats per token over the remapped vocabulary.",
    ),
}


def build_kind_report(kind: str, paths: list[Path], metas: list[dict[str, Any]], out_dir: Path) -> dict[str, Any]:
    """Figures, report.html and report.md for runs of ``kind`` (simulate or quality)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    frames, figures = [], []
    for path in paths:
        if kind == "simulate":
            df = load_sim(path)
            frames.append(df[[c for c in SIM_COLUMNS if c in df.columns]].assign(run=path.name))
            figures += sim_figures(df, out_dir)
        else:
            steps, summary = read_quality_run(path)
            frames.append(summary[[c for c in QUALITY_COLUMNS if c in summary.columns]].assign(run=path.name))
            figures += quality_figures(steps, summary, out_dir)
    table = pd.concat(frames, ignore_index=True)
    if len(paths) == 1:
        table = table.drop(columns="run")
    title, intro = TEXT[kind]
    html = out_dir / "report.html"
    md = out_dir / "report.md"
    html.write_text(_html(title, intro, paths, metas, figures, table), encoding="utf-8")
    md.write_text(_md(title, intro, paths, metas, figures, table), encoding="utf-8")
    return {"figures": figures, "html": html, "md": md}


def _meta_pairs(path: Path, meta: dict[str, Any]) -> list[tuple[str, Any]]:
    mach = meta.get("machine", {}) or {}
    return [
        ("run id", meta.get("run_id", path.name)),
        ("kind", meta.get("kind", "?")),
        ("status", meta.get("status", "?")),
        ("created / finished", f"{meta.get('created', '?')} / {meta.get('finished', '?')}"),
        ("device", meta.get("device_name", meta.get("device", "?"))),
        ("versions", f"python {mach.get('python', '?')}, torch {mach.get('torch_version', '?')}"),
        ("git commit", meta.get("git_commit", "?")),
        ("command", meta.get("command", "?")),
        ("plugins loaded", ", ".join(map(str, meta.get("plugins", []) or [])) or "none"),
    ]


def _html(title, intro, paths, metas, figures, table) -> str:
    parts: list[Any] = [H.tag("h1", title), H.tag("p", f"{intro} Generated {now()}.", class_="note")]
    for path, meta in zip(paths, metas, strict=True):
        parts += [H.tag("h2", f"Run {meta.get('run_id', path.name)}"), H.meta_list(_meta_pairs(path, meta))]
    for png in figures:
        parts += [H.tag("h2", png.stem.replace("_", " ")), H.tag("figure", H.image(png.read_bytes(), png.stem))]
    parts += [H.tag("h2", "Rows"), H.table(table)]
    return H.page(title, H.tag("main", H.join(parts)))


def _md(title, intro, paths, metas, figures, table) -> str:
    e = H.md_escape
    out = [f"# {e(title)}", "", e(intro), ""]
    for path, meta in zip(paths, metas, strict=True):
        out += [f"## Run {e(meta.get('run_id', path.name))}", ""]
        out += [f"- {e(k)}: {e(v)}" for k, v in _meta_pairs(path, meta)] + [""]
    for png in figures:
        out += [f"![{e(png.stem)}]({png.name})", ""]
    out += ["## Rows", "", H.md_table(table, None), ""]
    return "\n".join(out)
