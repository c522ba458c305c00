"""``moe-bench report``: one or more runs into PNG figures, ``report.html`` and ``report.md``.

:func:`build_report` reads the runs (:mod:`bench.report_data`), draws every figure in
:data:`FIGURES` that has data (:mod:`bench.figures`, :mod:`bench.figures_routing`), and writes

    <out>/<figure>.png   one PNG per drawn figure (10 x 5.6 in, 150 dpi)
    <out>/report.html    self-contained: metadata, figures as data URIs, sortable tables, glossary
    <out>/report.md      for a pull request: GitHub tables and relative links to the PNGs

Rows whose status is error or skipped are drawn in no figure and listed in both documents.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from moe_routing_bench.bench.metrics import METRICS
from moe_routing_bench.bench.record import KINDS, RunDir
from moe_routing_bench.bench.report import figures_convergence as S
from moe_routing_bench.bench.report import figures_cost as C
from moe_routing_bench.bench.report import figures_ep as EP
from moe_routing_bench.bench.report import figures_routing as R
from moe_routing_bench.bench.report import html as H
from moe_routing_bench.bench.report import style as F
from moe_routing_bench.bench.report.data import CONFIG_LABELS, WHOLE_BATCH_MARK, ReportData, check_run_dir, load_runs
from moe_routing_bench.bench.report.kinds import build_kind_report
from moe_routing_bench.bench.schema import STAGES

FIGURES: list[Callable[[ReportData], F.FigureOut | F.LeftOut]] = [
    C.throughput,
    R.drop_vs_capacity,
    R.balance,
    R.expert_loads,
    R.load_drift,
    S.load_convergence,
    C.memory,
    C.pareto,
    C.stages,
    R.drops_breakdown,
    R.layer_loads,
    EP.ep_ranks,
]

_STAGE_TEXT = {
    "route": "the router's route() call: gate, choices, plan",
    "dispatch": "positions (who is kept, once per step) and permute of the kept token rows into the "
    "expert-major buffer (the einsum backend: the one-hot mask)",
    "experts": "the expert FFNs over the permuted buffer (SwiGLU, or a preset's ReLU FFN)",
    "combine": "gather expert outputs, weight by the gates, sum back to [T, D]",
    "shared": "the shared FFN of a two-level router (nllb) and a preset's always-on shared experts; 0 without",
    "backward": "autograd backward through the layer (fwd+bwd mode only)",
    "other": "each step's total minus its timed stages: Python between stages, the autograd engine's own "
    "work, allocation",
    "total": "the whole step, wall clock, device-synchronised",
}

GLOSSARY: dict[str, str] = {
    "router": "router label (its name, or the label a sweep gave it). † marks a router that looks at "
    "the whole batch (looks_at_whole_batch): expert choice picks each expert's tokens from the entire "
    "batch, so a decoder generating one token at a time could not route that way at inference.",
    "workload": "the token workload the router logits come from",
    "tokens": "T, tokens per batch (one router call)",
    "experts": "E, number of experts",
    "top_k": "K, choices per token (expert choice: average experts per token; dense: E)",
    "capacity_factor": "cf; capacity C = ceil(cf K T / E) slots per expert. Empty: the router's default "
    "without a capacity (dropless)",
    "capacity": "C, slots per expert (empty: dropless)",
    "hidden": "D, hidden size",
    "backend": "dispatch backend: torch (index based), einsum (GShard one-hot mask), triton",
    "layout": "expert buffer layout: compact (N kept rows) or padded ([E, C, D])",
    "mode": "fwd, or fwd+bwd (forward and backward)",
    "looks_at_whole_batch": "the router chose tokens per expert from the whole batch (see router)",
    **{
        f"time_{s}_median / _p20 / _p80": f"seconds, {t}; median and 20th/80th percentiles over the "
        "timed repeats after warm-up"
        for s, t in _STAGE_TEXT.items()
    },
    "tokens_per_s": "T / time_total_median",
    "tokens_per_s_at_p80_time / _at_p20_time": "T / time_total_p80 and T / time_total_p20: the error "
    "bars of the throughput figure",
    "peak_mem_bytes": "peak bytes during the layer: torch.cuda.max_memory_allocated above the baseline "
    "on GPU; growth of the sampled resident set size on CPU (see mem_kind)",
    "mem_kind": "how peak_mem_bytes was measured: cuda_max_allocated or rss_sampled",
    "dispatch_buffer_bytes": "analytic bytes of the dispatch buffer: compact N D elt, padded E C D elt, "
    "einsum (T E C + E C D) elt with the one-hot mask",
    "kept_rows": "N, assignments kept after capacity",
    "permute_bytes": "(N + rows_out) D elt: read N token rows, write the buffer (rows_out = N compact, E C padded)",
    "combine_bytes": "(N + T) D elt + 4 N: read N expert rows and gates, write [T, D]",
    "permute_gbps": "permute_bytes / time_dispatch_median, GB/s",
    "combine_gbps": "combine_bytes / time_combine_median, GB/s",
    "copy_gbps": "bandwidth of dst.copy_(src) over rows_out D elements in the same run (2 rows_out D elt "
    "bytes per copy), GB/s",
    "permute_copy_ratio": "permute_gbps / copy_gbps (1 = as fast as a plain copy)",
    "combine_copy_ratio": "combine_gbps / copy_gbps",
    "expert_tflops": "2 m rows D F / time_experts_median, TFLOP/s (m = 3 matmuls per row for SwiGLU, 2 for ReLU)",
    "expert_path": "how the compact buffer's experts ran: grouped (one torch._grouped_mm per projection), split "
    "(weights split once, one matmul per expert), bmm (padded layout)",
    "workspace_bytes": "bytes of the reused permute/combine buffers (reuse_buffers), 0 without",
    "model": "the model preset whose layer shape the configuration has (bench/models.py), empty for none",
    "ffn_kind": "expert FFN: swiglu, or a two-matrix relu/gelu FFN",
    "shared_ffn": "width of a preset's always-on shared experts (DeepSeek-V3: 2048), 0 for none",
    "reuse_buffers": "permute and combine wrote into a reused workspace (forward only), as a GPU caching "
    "allocator would give",
    **METRICS,
    "<metric>_se": "standard error of a routing metric: sample std over batches / sqrt(batches)",
}


def glossary_for(column: str) -> str | None:
    """The definition of a row column (None when the glossary has none)."""
    if column in GLOSSARY:
        return GLOSSARY[column]
    for s in STAGES:
        if column.startswith(f"time_{s}_"):
            return GLOSSARY[f"time_{s}_median / _p20 / _p80"]
    if column.endswith("_se") and column[:-3] in METRICS:
        return GLOSSARY["<metric>_se"]
    return None


@dataclass
class Report:
    out: Path
    html: Path
    md: Path
    figures: list[tuple[F.FigureOut, Path]]
    left_out: list[F.LeftOut]
    data: ReportData


def default_out(paths: list[Path]) -> Path:
    """RUN/report for one run; a new report-<time> folder beside the first run for several."""
    if len(paths) == 1:
        return Path(paths[0]) / "report"
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path(paths[0]).resolve().parent / f"report-{stamp}"


@dataclass
class Written:
    """What ``make_report`` wrote, for any kind of run: figures (title, PNG), documents, notes."""

    html: Path
    md: Path
    figures: list[tuple[str, Path]]
    notes: list[str]


def run_kinds(paths: list[Path]) -> tuple[str, list[dict[str, Any]]]:
    """The one kind of the runs (meta's ``kind``; sweeps before it was recorded say nothing) and
    their metas; runs of different kinds are refused (one report draws one kind)."""
    metas = [RunDir.open(check_run_dir(p), flag="report").read_meta() for p in paths]
    kinds = {m.get("kind", "sweep") for m in metas}
    if len(kinds) > 1:
        raise ValueError(f"report draws runs of one kind at a time (got {', '.join(sorted(kinds))})")
    kind = kinds.pop()
    if kind not in KINDS:
        raise ValueError(f"unknown run kind {kind!r} in meta.json; known: {', '.join(KINDS)}")
    return kind, metas


def make_report(paths: list[str | Path], out: str | Path | None = None) -> Written:
    """The report of one or more runs of any kind: sweep and ep runs (their rows), simulate and
    quality runs (their own tables, ``report.kinds``)."""
    paths = [Path(p) for p in paths]
    kind, metas = run_kinds(paths)
    out_dir = Path(out) if out is not None else default_out(paths)
    if kind in ("simulate", "quality"):
        res = build_kind_report(kind, paths, metas, out_dir)
        return Written(res["html"], res["md"], [(png.stem.replace("_", " "), png) for png in res["figures"]], [])
    rep = build_report(paths, out_dir)
    notes = [f"left out {lo.name}: {lo.reason}" for lo in rep.left_out]
    if len(rep.data.excluded):
        notes.append(
            f"{len(rep.data.excluded)} error/skipped configurations are listed in the report, drawn in no figure"
        )
    return Written(rep.html, rep.md, [(fo.title, png) for fo, png in rep.figures], notes)


def build_report(paths: list[str | Path], out: str | Path | None = None) -> Report:
    """The report of sweep (or ep) runs: every figure of FIGURES that has data, report.html, report.md."""
    paths = [Path(p) for p in paths]
    data = load_runs(paths)
    out_dir = Path(out) if out is not None else default_out(paths)
    out_dir.mkdir(parents=True, exist_ok=True)
    drawn: list[tuple[F.FigureOut, Path]] = []
    left_out: list[F.LeftOut] = []
    for fn in FIGURES:
        with F.figure_style():
            res = fn(data)
            if isinstance(res, F.LeftOut):
                if data.ok.empty:
                    res.reason = "no ok configuration in the run"
                left_out.append(res)
                continue
            png = out_dir / f"{res.name}.png"
            res.fig.savefig(png, dpi=F.DPI)
        drawn.append((res, png))
    rep = Report(out_dir, out_dir / "report.html", out_dir / "report.md", drawn, left_out, data)
    rep.html.write_text(render_html(rep), encoding="utf-8")
    rep.md.write_text(render_md(rep), encoding="utf-8")
    return rep


_ALL_COLUMNS = [
    *CONFIG_LABELS,
    "tokens_per_s",
    "time_total_median",
    "peak_mem_bytes",
    "dispatch_buffer_bytes",
    "drop_rate",
    "tokens_dropped_frac",
    "imbalance",
    "load_cv",
    "gate_mass_kept",
    "aux_loss",
    "config_id",
]


def all_configs(data: ReportData) -> pd.DataFrame:
    df = data.ok.assign(router=data.ok["router_disp"])
    cols = (["run"] if data.several_runs else []) + [c for c in _ALL_COLUMNS if c in df.columns]
    return df[cols]


def excluded_table(data: ReportData) -> pd.DataFrame:
    cols = ["run", "status", *CONFIG_LABELS, "error", "config_id"]
    df = data.excluded
    df = df.assign(error=df["error"].fillna("").astype(str)) if "error" in df else df
    return df[[c for c in cols if c in df.columns]]


def _first_line(text: Any) -> str:
    lines = str(text).strip().splitlines()
    return lines[0] if lines else ""


def _plugins(data: ReportData, meta: dict[str, Any], run: str) -> list[str]:
    listed = [str(p) for p in meta.get("plugins", []) or []]
    rows = pd.concat([data.ok, data.excluded])
    for cell in rows.loc[rows["run"] == run, "plugins"].dropna().unique():
        listed += [p.strip() for p in str(cell).split(";") if p.strip()]
    return list(dict.fromkeys(listed))


def _run_pairs(data: ReportData, info) -> list[tuple[str, Any]]:
    m, mach = info.meta, info.meta.get("machine", {}) or {}
    counts = ", ".join(f"{info.counts.get(k, 0)} {k}" for k in ("ok", "error", "skipped"))
    other = {k: v for k, v in info.counts.items() if k not in ("ok", "error", "skipped")}
    counts += "".join(f", {v} {k}" for k, v in other.items())
    plugins = _plugins(data, m, info.label)
    return [
        ("run id", m.get("run_id", info.label)),
        ("directory", str(info.path)),
        ("status", m.get("status", "unknown")),
        ("configurations", counts),
        ("created / finished", f"{m.get('created', '?')} / {m.get('finished', '?')}"),
        ("device", m.get("device_name", m.get("device", "?"))),
        (
            "machine",
            f"{mach.get('hostname', '?')}: {mach.get('platform', '?')}, "
            f"{mach.get('cpu_count', '?')} CPUs, GPU {mach.get('gpu') or 'none'}",
        ),
        (
            "versions",
            f"python {mach.get('python', '?')}, torch {mach.get('torch_version', '?')}, "
            f"triton {mach.get('triton_version', '?')}, CUDA {mach.get('cuda') or 'none'}",
        ),
        ("git commit", m.get("git_commit", "?")),
        ("config", m.get("config", "?")),
        ("command", m.get("command", "?")),
        ("plugins loaded", ", ".join(plugins) if plugins else "none"),
    ]


def _whole_batch_note(data: ReportData) -> str:
    marked = sorted(set(data.ok.loc[data.ok["router_disp"].str.endswith(WHOLE_BATCH_MARK), "router_disp"]))
    if not marked:
        return ""
    return (
        f"{', '.join(marked)}: looks at the whole batch (each expert picks its tokens from the entire "
        "batch), so a decoder could not use it at inference; its drop_rate is undefined."
    )


def render_html(rep: Report) -> str:
    data, H_ = rep.data, H
    parts: list[Any] = [H_.tag("h1", "MoE routing benchmark report")]
    parts.append(
        H_.tag(
            "p",
            f"Generated {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')} "
            f"from {len(data.runs)} run(s). Slice for the figures: {data.describe() or 'n/a'}.",
            class_="note",
        )
    )
    toc = [H_.tag("li", H_.tag("a", fo.title, href=f"#{fo.name}")) for fo, _ in rep.figures]
    nav = [H_.tag("h2", "Figures"), H_.tag("ul", H_.join(toc))]
    if rep.left_out:
        nav.append(
            H_.tag(
                "p",
                "Left out (nothing to draw): " + "; ".join(f"{lo.title} ({lo.reason})" for lo in rep.left_out),
                class_="note",
            )
        )
    nav.append(
        H_.tag(
            "p",
            H_.tag("a", "Excluded configurations", href="#excluded"),
            " · ",
            H_.tag("a", "All configurations", href="#all"),
            " · ",
            H_.tag("a", "Glossary", href="#glossary"),
        )
    )
    parts.append(H_.tag("nav", H_.join(nav)))
    note = _whole_batch_note(data)
    if note:
        parts.append(H_.tag("p", note, class_="note"))

    parts.append(H_.tag("h2", "Runs"))
    for info in data.runs:
        badges = H_.join(
            H_.tag("span", f"{info.counts.get(k, 0)} {k}", class_="badge") for k in ("ok", "error", "skipped")
        )
        parts += [
            H_.tag("h3", info.label),
            badges,
            H_.meta_list(_run_pairs(data, info)),
            H_.tag("details", H_.tag("summary", "sweep configuration"), H_.pre_json(info.meta.get("blocks"))),
        ]

    for fo, png in rep.figures:
        parts += [
            H_.tag("h2", fo.title, id=fo.name),
            H_.tag("figure", H_.image(png.read_bytes(), fo.title), H_.tag("figcaption", fo.caption)),
            H_.tag(
                "details",
                H_.tag("summary", f"numbers behind this figure ({len(fo.table)} rows)"),
                H_.table(fo.table),
                open="",
            ),
        ]
    if rep.left_out:
        parts.append(H_.tag("h2", "Figures left out"))
        parts.append(
            H_.tag("ul", H_.join(H_.tag("li", H_.tag("b", lo.title), f": {lo.reason}") for lo in rep.left_out))
        )

    parts.append(H_.tag("h2", "Excluded configurations (error or skipped)", id="excluded"))
    exc = excluded_table(data)
    if exc.empty:
        parts.append(H_.tag("p", "None: every configuration ran."))
    else:
        parts.append(H_.tag("p", f"{len(exc)} configurations are in no figure:", class_="note"))
        parts.append(H_.table(exc.assign(error=exc["error"].map(_first_line))))
        for r in exc.itertuples(index=False):
            if r.error.strip():
                summary = f"{r.status}: {r.router} × {r.workload} ({r.config_id})"
                parts.append(H_.tag("details", H_.tag("summary", summary), H_.tag("pre", r.error, class_="err")))
    parts += [H_.tag("h2", "All configurations", id="all"), H_.table(all_configs(data))]

    rows = [H_.tag("tr", H_.tag("th", k), H_.tag("td", v)) for k, v in GLOSSARY.items()]
    parts += [
        H_.tag("h2", "Glossary", id="glossary"),
        H_.tag("table", H_.tag("tbody", H_.join(rows)), class_="glossary"),
    ]
    return H_.page("MoE routing benchmark report", H_.tag("main", H_.join(parts)))


def render_md(rep: Report) -> str:
    data, e = rep.data, H.md_escape
    out = ["# MoE routing benchmark report", ""]
    out.append(
        f"Runs: {len(data.runs)}. Slice for the figures: {e(data.describe() or 'n/a')}. "
        "The self-contained version with sortable tables is `report.html` beside this file."
    )
    out.append("")
    runs = pd.DataFrame(
        [
            {
                "run": info.label,
                "status": info.meta.get("status", "?"),
                "ok": info.counts.get("ok", 0),
                "error": info.counts.get("error", 0),
                "skipped": info.counts.get("skipped", 0),
                "device": info.meta.get("device_name", "?"),
                "commit": info.meta.get("git_commit", "?"),
                "plugins": ", ".join(_plugins(data, info.meta, info.label)) or "none",
            }
            for info in data.runs
        ]
    )
    out += [H.md_table(runs, None), ""]
    note = _whole_batch_note(data)
    if note:
        out += [e(note), ""]
    for fo, png in rep.figures:
        out += [
            f"## {e(fo.title)}",
            "",
            f"![{e(fo.title)}]({png.name})",
            "",
            e(fo.caption),
            "",
            H.md_table(fo.table),
            "",
        ]
    if rep.left_out:
        out += ["## Figures left out", ""] + [f"- {e(lo.title)}: {e(lo.reason)}" for lo in rep.left_out] + [""]
    exc = excluded_table(data)
    out += ["## Excluded configurations (error or skipped)", ""]
    if exc.empty:
        out += ["None: every configuration ran.", ""]
    else:
        out += [H.md_table(exc.assign(error=exc["error"].map(_first_line)), None), ""]
    out += ["## Glossary", ""] + [f"- **{e(k)}**: {e(v)}" for k, v in GLOSSARY.items()] + [""]
    return "\n".join(out)
