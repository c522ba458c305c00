"""``moe-bench quality``: train the tiny MoE LM with each router, record, and print the table.

Run directory ``<out>/<run_id>/``::

    meta.json                 the run: config, data, machine, versions, commit, plugins, status
    quality_steps.parquet     one row per (router, step, MoE layer): loss, lr, every routing metric
    quality.parquet           one row per router: held-out losses, tokens/s, routing metrics
    parts/<i>-<router>.*.parquet   the same rows per router, written atomically as each finishes

A router that fails (a bad option, a crash in training) becomes a row with ``status=error`` and
the run goes on. ``--save-trace PATH`` writes the trained routers' logits on the held-out windows
as a ``trace`` workload file (one file per router: ``PATH`` itself for one router, else
``<stem>-<router>.parquet`` beside it).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from moe_routing_bench.bench.metrics import METRICS, aggregate
from moe_routing_bench.bench.quality.lm import TinyMoELM, count_params
from moe_routing_bench.bench.quality.train import (
    NOT_CAUSAL,
    EvalResult,
    QualityConfig,
    QualityData,
    RouterSpec,
    TrainResult,
    build_data,
    evaluate,
    parse_router_specs,
    train,
)
from moe_routing_bench.bench.record import RunDir, atomic_write_table, git_commit, machine_info, new_run_id
from moe_routing_bench.bench.timing import device_name, resolve_device

_META = [
    ("run_id", pa.string()),
    ("timestamp", pa.string()),
    ("git_commit", pa.string()),
    ("device", pa.string()),
    ("device_name", pa.string()),
    ("torch_version", pa.string()),
    ("seed", pa.int64()),
    ("config_json", pa.string()),
    ("router", pa.string()),
    ("router_name", pa.string()),
]
STEP_SCHEMA = pa.schema(
    [_META[0], *_META[8:]]
    + [("step", pa.int64()), ("layer", pa.int64()), ("loss", pa.float64()), ("lr", pa.float64())]
    + [("step_seconds", pa.float64())]
    + [(m, pa.float64()) for m in METRICS]
)
_SUMMARY_COLUMNS: list[tuple[str, pa.DataType]] = [
    ("router_options", pa.string()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("notes", pa.string()),
    ("looks_at_whole_batch", pa.bool_()),
    ("causal", pa.bool_()),
    ("has_aux_loss", pa.bool_()),
    ("gate_grad", pa.bool_()),
    ("gate_columns", pa.int64()),
    ("shared_branch", pa.bool_()),
    ("top_k", pa.float64()),
    ("capacity", pa.int64()),
    ("params_total", pa.int64()),
    ("params_experts", pa.int64()),
    ("steps", pa.int64()),
    ("train_loss_end", pa.float64()),
    ("heldout_lang", pa.string()),
    ("heldout_loss", pa.float64()),
    ("heldout_loss_in_vocab", pa.float64()),
    ("heldout_oov_frac", pa.float64()),
    ("other_lang", pa.string()),
    ("other_loss", pa.float64()),
    ("other_loss_in_vocab", pa.float64()),
    ("other_oov_frac", pa.float64()),
    ("log_vocab", pa.float64()),
    ("train_seconds", pa.float64()),
    ("train_tokens_per_s", pa.float64()),
    ("eval_tokens_per_s", pa.float64()),
    ("imbalance_train_end", pa.float64()),
    ("drop_rate_train_end", pa.float64()),
    ("trace_path", pa.string()),
]
SUMMARY_SCHEMA = pa.schema(
    _META + _SUMMARY_COLUMNS + [c for m in METRICS for c in ((m, pa.float64()), (f"{m}_se", pa.float64()))]
)


def summarize(
    spec: RouterSpec, cfg: QualityConfig, tr: TrainResult, same: EvalResult, other: EvalResult
) -> dict:
    """One router's quality-balance-cost row. Routing metrics: mean and SE over the held-out
    batches x layers; ``*_train_end``: mean over the last 10% of training steps and the layers."""
    last = [r for r in tr.steps if r["step"] >= cfg.steps - max(1, cfg.steps // 10)]
    total, experts = count_params(tr.model)
    agg = aggregate(same.per_batch)

    def end_mean(key: str) -> float:
        vals = [r[key] for r in last if not math.isnan(r[key])]
        return float(np.mean(vals)) if vals else math.nan

    row = {
        "router_options": json.dumps(spec.opts, sort_keys=True),
        "status": "ok",
        "error": "",
        "notes": "; ".join(tr.notes + ([NOT_CAUSAL] if tr.looks_at_whole_batch else [])),
        "looks_at_whole_batch": tr.looks_at_whole_batch,
        "causal": not tr.looks_at_whole_batch,
        "has_aux_loss": not math.isnan(agg["aux_loss"][0]),
        "gate_grad": tr.gate_grad,
        "gate_columns": tr.shape.columns,
        "shared_branch": tr.shape.shared,
        "top_k": tr.top_k,
        "capacity": tr.capacity,
        "params_total": total,
        "params_experts": experts,
        "steps": cfg.steps,
        "train_loss_end": end_mean("loss"),
        "heldout_lang": cfg.lang,
        "heldout_loss": same.loss,
        "heldout_loss_in_vocab": same.loss_in_vocab,
        "heldout_oov_frac": same.oov_frac,
        "other_lang": cfg.eval_lang,
        "other_loss": other.loss,
        "other_loss_in_vocab": other.loss_in_vocab,
        "other_oov_frac": other.oov_frac,
        "log_vocab": math.log(cfg.vocab),
        "train_seconds": tr.seconds,
        "train_tokens_per_s": tr.tokens / tr.seconds if tr.seconds > 0 else math.nan,
        "eval_tokens_per_s": same.tokens / same.seconds if same.seconds > 0 else math.nan,
        "imbalance_train_end": end_mean("imbalance"),
        "drop_rate_train_end": end_mean("drop_rate"),
    }
    for m in METRICS:
        row[m], row[f"{m}_se"] = agg[m]
    return row


def save_trace(
    path: Path,
    model: TinyMoELM,
    data: QualityData,
    logits_by_layer: list[torch.Tensor],
    spec: RouterSpec,
    cfg: QualityConfig,
    top_k: float,
) -> None:
    """The trained routers' logits on the held-out windows (every MoE layer), as a trace file.

    ``token`` is the id the model was fed (remapped), ``source_token`` the o200k id; sequences are
    the held-out windows, in order. nllb's extra level-1 logit column is kept as the last column.
    """
    from moe_routing_bench.workloads.trace import write_trace

    n_seq = logits_by_layer[0].shape[0] // cfg.seq_len
    inputs = data.heldout[:n_seq, :-1]
    source = data.heldout_source[:n_seq, :-1]
    s = cfg.seq_len
    meta = {
        "model": f"moe-bench quality tiny MoE LM ({spec.label})",
        "model_type": "moe-bench-quality",
        "router": spec.label,
        "router_options": spec.opts,
        "top_k": top_k,
        "layers": [
            {"index": i, "module": f"blocks.{i}.moe.gate", "num_experts": int(lg.shape[1])}
            for i, lg in enumerate(logits_by_layer)
        ],
        "extra_logit_column": model.blocks[0].moe.gate.out_features > cfg.experts,
        "tokens": int(inputs.numel()),
        "seq_len": s,
        "tokenizer": (
            f"o200k_base, remapped to the {cfg.vocab - 1} most frequent training ids + OOV id {cfg.vocab - 1}"
        ),
        "vocab_size": cfg.vocab,
        "workload": data.info["workload"],
        "torch_version": torch.__version__,
        "config": dataclasses.asdict(cfg),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_trace(
        path,
        inputs.reshape(-1).numpy(),
        np.repeat(np.arange(n_seq), s),
        np.tile(np.arange(s), n_seq),
        source.reshape(-1).numpy(),
        [lg.numpy() for lg in logits_by_layer],
        meta,
    )


def trace_path_for(base: Path, label: str, many: bool) -> Path:
    """``base`` for a single router, else ``<stem>-<label>.parquet`` (label made file-safe)."""
    if not many:
        return base
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_")
    return base.with_name(f"{base.stem}-{safe}{base.suffix or '.parquet'}")


def _consolidate(run: RunDir) -> None:
    parts = run.path / "parts"
    for kind, schema, name in (
        ("steps", STEP_SCHEMA, "quality_steps"),
        ("summary", SUMMARY_SCHEMA, "quality"),
    ):
        files = sorted(parts.glob(f"*.{kind}.parquet"))
        table = (
            pa.concat_tables([pq.read_table(f, schema=schema) for f in files])
            if files
            else schema.empty_table()
        )
        atomic_write_table(run.path / f"{name}.parquet", table)


def run_quality(
    cfg: QualityConfig,
    specs: list[RouterSpec],
    out_root: Path,
    device: torch.device,
    trace: Path | None = None,
    echo: Callable[[str], None] = lambda _m: None,
    run_id: str | None = None,
    plugins: list[str] | None = None,
) -> tuple[Path, list[dict[str, Any]]]:
    """Train and evaluate every router in ``specs``; returns (run directory, summary rows)."""
    data = build_data(cfg)
    run = RunDir(Path(out_root) / (run_id or new_run_id()))
    (run.path / "parts").mkdir(parents=True, exist_ok=False)
    commit, machine = git_commit(), machine_info()
    meta: dict[str, Any] = {
        "run_id": run.run_id,
        "kind": "quality",
        "status": "running",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": dataclasses.asdict(cfg),
        "routers": [dataclasses.asdict(s) for s in specs],
        "data": data.info,
        "device": str(device),
        "device_name": device_name(device),
        "git_commit": commit,
        "machine": machine,
        "plugins": plugins or [],
    }
    run.write_meta(meta)
    base = {
        "run_id": run.run_id,
        "git_commit": commit,
        "device": str(device),
        "device_name": device_name(device),
        "torch_version": torch.__version__,
        "seed": cfg.seed,
        "config_json": json.dumps(dataclasses.asdict(cfg), sort_keys=True),
    }
    summaries: list[dict[str, Any]] = []
    for i, spec in enumerate(specs):
        ids = {**base, "router": spec.label, "router_name": spec.name}
        ts = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        stem = run.path / "parts" / trace_path_for(Path(f"{i:03d}.parquet"), spec.label, True).stem
        steps: list[dict[str, Any]] = []
        try:
            tr = train(spec, cfg, data, device, progress=echo)
            same = evaluate(tr.model, data.heldout, cfg.batch_seqs, device, keep_logits=trace is not None)
            other = evaluate(tr.model, data.other, cfg.batch_seqs, device)
            row = {**ids, "timestamp": ts, **summarize(spec, cfg, tr, same, other)}
            if trace is not None and same.logits_by_layer is not None:
                path = trace_path_for(Path(trace), spec.label, len(specs) > 1)
                save_trace(path, tr.model, data, same.logits_by_layer, spec, cfg, tr.top_k)
                row["trace_path"] = str(path)
            steps = [{**ids, **r} for r in tr.steps]
            echo(
                f"{spec.label}: held-out loss {same.loss:.3f} ({cfg.lang}), {other.loss:.3f} "
                f"({cfg.eval_lang}); {row['train_tokens_per_s']:.0f} train tokens/s"
            )
        except Exception as exc:  # one router's failure is a row, not the end of the run
            row = {**ids, "timestamp": ts, "status": "error", "error": f"{type(exc).__name__}: {exc}"}
            row["router_options"] = json.dumps(spec.opts, sort_keys=True)
            echo(f"{spec.label}: error: {row['error']}")
        if steps:
            atomic_write_table(
                stem.with_name(stem.name + ".steps.parquet"), pa.Table.from_pylist(steps, schema=STEP_SCHEMA)
            )
        atomic_write_table(
            stem.with_name(stem.name + ".summary.parquet"), pa.Table.from_pylist([row], schema=SUMMARY_SCHEMA)
        )
        _consolidate(run)
        summaries.append(row)
    meta["status"] = "finished"
    meta["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    run.write_meta(meta)
    return run.path, summaries


def format_table(rows: list[dict[str, Any]], cfg: QualityConfig) -> str:
    """Quality versus balance versus cost, one line per router."""

    def f(x: Any, spec: str) -> str:
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)

    w = max([len("router"), *(len(r["router"]) for r in rows)]) + 2
    head = (
        f"{'router':<{w}}{'held-out ' + cfg.lang:>12}{'other ' + cfg.eval_lang:>10}{'imbalance':>11}"
        f"{'drop rate':>11}{'no expert':>11}{'train tok/s':>13}  causal"
    )
    lines = [head, "-" * len(head)]
    flagged = False
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"{r['router']:<{w}}  error: {r.get('error', '')}")
            continue
        causal = "yes" if r["causal"] else "no *"
        flagged |= not r["causal"]
        lines.append(
            f"{r['router']:<{w}}{f(r['heldout_loss'], '.3f'):>12}{f(r['other_loss'], '.3f'):>10}"
            f"{f(r['imbalance'], '.3f'):>11}{f(r['drop_rate'], '.3f'):>11}"
            f"{f(r['tokens_dropped_frac'], '.3f'):>11}"
            f"{f(r['train_tokens_per_s'], ',.0f'):>13}  {causal}"
        )
    lines.append(
        f"loss: nats per token over the {cfg.vocab}-id remapped vocabulary (uniform guess = log V = "
        f"{math.log(cfg.vocab):.3f}); imbalance (max/mean requested load), drop rate and no-expert share "
        f"(tokens_dropped_frac): mean over the held-out {cfg.lang} batches and the {cfg.layers} layers; "
        "tok/s: training (forward, backward, optimiser) tokens per second."
    )
    ok = [r for r in rows if r.get("status") == "ok"]
    if ok:
        lines.append(
            f"targets that are the OOV id: {ok[0]['heldout_oov_frac']:.1%} of held-out {cfg.lang}, "
            f"{ok[0]['other_oov_frac']:.1%} of {cfg.eval_lang} (losses without them: "
            "*_loss_in_vocab in quality.parquet)."
        )
    if flagged:
        lines.append(f"* looks at the whole batch ({NOT_CAUSAL}).")
    return "\n".join(lines)


@click.command("quality")
@click.option(
    "--routers",
    "routers_text",
    default="all",
    show_default=True,
    help="'all', or names and variants: switch,topk,hash[variant=balanced].",
)
@click.option("--steps", default=300, show_default=True, help="Training steps per router.")
@click.option("--experts", default=8, show_default=True, help="Experts per MoE layer (E).")
@click.option(
    "--top-k", type=int, default=None, help="K for routers that accept it (default: each router's own)."
)
@click.option(
    "--capacity-factor",
    "cf_text",
    default=None,
    help="A number, or 'none' for dropless (default: each router's own).",
)
@click.option("--layers", default=2, show_default=True, help="MoE transformer blocks.")
@click.option("--width", default=64, show_default=True, help="Model width D.")
@click.option("--heads", default=4, show_default=True, help="Attention heads.")
@click.option(
    "--vocab", default=2048, show_default=True, help="Remapped vocabulary V (most frequent ids + OOV)."
)
@click.option("--seq-len", default=64, show_default=True, help="Tokens per sequence S.")
@click.option("--batch-seqs", default=8, show_default=True, help="Sequences per step B (T = B * S tokens).")
@click.option("--lr", default=3e-3, show_default=True, help="Peak AdamW learning rate (warm-up, cosine).")
@click.option("--aux-coef", default=0.01, show_default=True, help="Weight of the router's aux loss.")
@click.option("--lang", default="en", show_default=True, help="Training text language, or 'code'.")
@click.option("--eval-lang", default="de", show_default=True, help="Other language for held-out loss.")
@click.option("--eval-batches", default=8, show_default=True, help="Held-out batches of B sequences.")
@click.option("--seed", default=0, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--backend", default="torch", show_default=True, help="Dispatch backend (torch has autograd).")
@click.option("--out", "out_root", default="results", show_default=True, type=click.Path(file_okay=False))
@click.option(
    "--save-trace",
    "trace",
    default=None,
    type=click.Path(dir_okay=False),
    help="Write the trained routers' logits on held-out text as a trace workload file.",
)
@click.option(
    "--threads",
    default=1,
    show_default=True,
    help="CPU threads (a tiny model's matmuls gain nothing from more, and lose much to contention).",
)
@click.option("--plugin", "plugins", multiple=True, metavar="FILE.py", help="Load routers from a file.")
def quality_cmd(
    routers_text,
    steps,
    experts,
    top_k,
    cf_text,
    layers,
    width,
    heads,
    vocab,
    seq_len,
    batch_seqs,
    lr,
    aux_coef,
    lang,
    eval_lang,
    eval_batches,
    seed,
    device,
    backend,
    out_root,
    trace,
    threads,
    plugins,
) -> None:
    """Train the same tiny MoE language model with each router on real text; compare held-out
    loss, load balance and cost in one table."""
    from moe_routing_bench.bench.cli import _parse_cf
    from moe_routing_bench.kernels.layer import resolve_backend
    from moe_routing_bench.workloads.registry import load_plugin

    loaded = []
    for p in plugins:
        load_plugin(p)
        loaded.append(str(Path(p).resolve()))
    dev = resolve_device(device)
    if threads < 1:
        raise ValueError(f"--threads must be >= 1 (got {threads})")
    if dev.type == "cpu":
        torch.set_num_threads(threads)
    cfg = QualityConfig(
        steps=steps,
        experts=experts,
        top_k="default" if top_k is None else top_k,
        capacity_factor=_parse_cf(cf_text),
        layers=layers,
        width=width,
        heads=heads,
        vocab=vocab,
        seq_len=seq_len,
        batch_seqs=batch_seqs,
        lr=lr,
        aux_coef=aux_coef,
        lang=lang,
        eval_lang=eval_lang,
        eval_batches=eval_batches,
        seed=seed,
        backend=resolve_backend(backend, dev),
    )
    specs = parse_router_specs(routers_text)
    click.echo(
        f"quality: {len(specs)} routers x {steps} steps; L={layers} D={width} H={heads} E={experts} "
        f"V={vocab} S={seq_len} B={batch_seqs} (T={batch_seqs * seq_len}) on {device_name(dev)}",
        err=True,
    )
    path, rows = run_quality(
        cfg,
        specs,
        Path(out_root),
        dev,
        Path(trace) if trace else None,
        echo=lambda m: click.echo(m, err=True),
        plugins=loaded,
    )
    click.echo(format_table(rows, cfg))
    click.echo(f"\nrun: {path} (quality.parquet, quality_steps.parquet, meta.json)")
    from moe_routing_bench.bench.report.figures_quality import quality_figures, read_quality_run

    for fig in quality_figures(*read_quality_run(path), path / "report"):
        click.echo(f"figure: {fig}")
    traces = [r["trace_path"] for r in rows if r.get("trace_path")]
    for t in traces:
        click.echo(f"trace: {t}")
    if any(r.get("status") != "ok" for r in rows):
        sys.exit(1)
