"""``moe-bench quality``'s job: train the tiny MoE LM with each router, record, and tabulate.

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

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from moe_routing_bench.bench.harness.worker import Supervisor
from moe_routing_bench.bench.metrics import METRICS, aggregate
from moe_routing_bench.bench.quality.lm import TinyMoELM, count_params
from moe_routing_bench.bench.quality.train import (
    NOT_CAUSAL,
    EvalResult,
    QualityConfig,
    QualityData,
    TrainResult,
    build_data,
    check_routers,
    evaluate,
    model_bytes,
    train,
)
from moe_routing_bench.bench.record import (
    RunDir,
    atomic_write_table,
    config_id_of,
    header,
    new_meta,
    recording,
)
from moe_routing_bench.bench.schema import HEADER
from moe_routing_bench.bench.spec import Spec
from moe_routing_bench.bench.timing import check_fits, device_name
from moe_routing_bench.routers.registry import loaded_plugins

_ROUTER = [("router", pa.string()), ("router_name", pa.string())]
STEP_SCHEMA = pa.schema(
    [("run_id", pa.string()), ("config_id", pa.string()), *_ROUTER]
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
    HEADER + _ROUTER + _SUMMARY_COLUMNS + [c for m in METRICS for c in ((m, pa.float64()), (f"{m}_se", pa.float64()))]
)


def summarize(spec: Spec, cfg: QualityConfig, tr: TrainResult, same: EvalResult, other: EvalResult) -> dict:
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
    spec: Spec,
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
        table = pa.concat_tables([pq.read_table(f, schema=schema) for f in files]) if files else schema.empty_table()
        atomic_write_table(run.path / f"{name}.parquet", table)


def run_quality(
    cfg: QualityConfig,
    specs: list[Spec],
    out_root: Path,
    device: torch.device,
    trace: Path | None = None,
    echo: Callable[[str], None] = lambda _m: None,
    run_id: str | None = None,
    plugins: list[str] | None = None,
) -> tuple[Path, list[dict[str, Any]]]:
    """Train and evaluate every router in ``specs``; returns (run directory, summary rows).

    Each router trains in a supervised worker process (``harness.worker``), as a sweep measures
    its configurations: one that raises, crashes (a segfaulting plugin) or is killed becomes an
    error row and the run goes on. A K or capacity factor no router can take, and a model that
    cannot fit the memory budget, are refused before the run directory exists."""
    check_fits(model_bytes(cfg), f"--vocab {cfg.vocab} x --width {cfg.width} (the model and its optimiser)", device)
    check_routers(specs, cfg)
    echo(
        f"quality: {len(specs)} routers x {cfg.steps} steps; L={cfg.layers} D={cfg.width} H={cfg.heads} "
        f"E={cfg.experts} V={cfg.vocab} S={cfg.seq_len} B={cfg.batch_seqs} (T={cfg.batch_seqs * cfg.seq_len}) "
        f"on {device_name(device)}"
    )
    data = build_data(cfg)
    run = RunDir.create(Path(out_root), run_id, folders=("parts",))
    meta = new_meta(
        "quality",
        run.run_id,
        device,
        config=dataclasses.asdict(cfg),
        routers=[{"name": s.name, "opts": s.opts, "label": s.label} for s in specs],
        data=data.info,
        plugin_paths=plugins or [],
        plugins=loaded_plugins(),
    )
    config_json = json.dumps(dataclasses.asdict(cfg), sort_keys=True)
    summaries: list[dict[str, Any]] = []
    with recording(run, meta), Supervisor(plugins or [], job=TRAIN_JOB) as worker:
        for i, spec in enumerate(specs):
            job = TrainJob(spec, cfg, data, device, trace, len(specs) > 1, torch.get_num_threads())
            summaries.append(_one_router(run, meta, i, job, config_json, worker, echo))
    return run.path, summaries


@dataclasses.dataclass
class TrainJob:
    """What the worker needs to train one router (sent to it; the data travels once per router)."""

    spec: Spec
    cfg: QualityConfig
    data: QualityData
    device: torch.device
    trace: Path | None
    many: bool  # several routers: trace files get the router's name
    threads: int


def train_router(job: TrainJob) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The worker's job: train, evaluate (and save the trace of) one router; returns its summary
    fields and its per-step rows. Progress goes to stderr."""
    if job.device.type == "cpu":
        torch.set_num_threads(job.threads)
    spec, cfg, data, device = job.spec, job.cfg, job.data, job.device
    tr = train(spec, cfg, data, device, progress=lambda m: print(m, file=sys.stderr, flush=True))
    same = evaluate(tr.model, data.heldout, cfg.batch_seqs, device, keep_logits=job.trace is not None)
    other = evaluate(tr.model, data.other, cfg.batch_seqs, device)
    row = summarize(spec, cfg, tr, same, other)
    if job.trace is not None and same.logits_by_layer is not None:
        path = trace_path_for(Path(job.trace), spec.label, job.many)
        save_trace(path, tr.model, data, same.logits_by_layer, spec, cfg, tr.top_k)
        row["trace_path"] = str(path)
    return row, tr.steps


TRAIN_JOB = f"{__name__}:train_router"


def _one_router(run, meta, i, job: TrainJob, config_json, worker: Supervisor, echo) -> dict[str, Any]:
    """Train one router in the worker and record it; a failure is its error row, not the end of the run."""
    spec, cfg = job.spec, job.cfg
    cid = config_id_of(spec.label + config_json)
    ids = {**header(meta, cid, cfg.seed, config_json), "router": spec.label, "router_name": spec.name}
    stem = run.path / "parts" / trace_path_for(Path(f"{i:03d}.parquet"), spec.label, True).stem
    status, result, err = worker.call(job)
    steps: list[dict[str, Any]] = []
    if status == "ok":
        fields, step_rows = result
        row = {**ids, **fields}
        steps = [
            {"run_id": run.run_id, "config_id": cid, "router": spec.label, "router_name": spec.name, **r}
            for r in step_rows
        ]
        echo(
            f"{spec.label}: held-out loss {row['heldout_loss']:.3f} ({cfg.lang}), {row['other_loss']:.3f} "
            f"({cfg.eval_lang}); {row['train_tokens_per_s']:.0f} train tokens/s"
        )
    else:
        row = {**ids, "status": "error", "error": err.splitlines()[0] if err else ""}
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
    return row


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
