"""``moe-bench quality``: train the same tiny MoE LM with each router on real text and compare."""

from __future__ import annotations

import sys
from pathlib import Path

import click
import torch

from moe_routing_bench.bench.cli import options
from moe_routing_bench.bench.models import get_model
from moe_routing_bench.bench.quality.runner import format_table, run_quality
from moe_routing_bench.bench.quality.train import QualityConfig, parse_router_specs
from moe_routing_bench.bench.spec import DEFAULT, parse_capacity_factor
from moe_routing_bench.bench.timing import resolve_device
from moe_routing_bench.kernels.layer import resolve_backend


@click.command("quality")
@click.option(
    "--routers",
    "routers_text",
    default=None,
    help="'all' (the default), or names and variants: switch,topk,hash[variant=balanced]; --model's own.",
)
@click.option("--steps", type=options.INT, default=300, show_default=True, help="Training steps per router.")
@click.option("--experts", type=options.INT, default=None, help="Experts per MoE layer E [8, or --model's].")
@options.model
@click.option(
    "--top-k", type=options.INT, default=None, help="K for routers that accept it (default: each router's own)."
)
@click.option(
    "--capacity-factor",
    "cf_text",
    default=None,
    help="A number, or 'none' for dropless (default: each router's own).",
)
@click.option("--layers", type=options.INT, default=2, show_default=True, help="MoE transformer blocks.")
@click.option("--width", type=options.INT, default=64, show_default=True, help="Model width D.")
@click.option("--heads", type=options.INT, default=4, show_default=True, help="Attention heads.")
@click.option(
    "--vocab",
    type=options.INT,
    default=2048,
    show_default=True,
    help="Remapped vocabulary V (most frequent ids + OOV).",
)
@click.option("--seq-len", type=options.INT, default=64, show_default=True, help="Tokens per sequence S.")
@click.option(
    "--batch-seqs", type=options.INT, default=8, show_default=True, help="Sequences per step B (T = B * S tokens)."
)
@click.option("--lr", default=3e-3, show_default=True, help="Peak AdamW learning rate (warm-up, cosine).")
@click.option("--aux-coef", default=0.01, show_default=True, help="Weight of the router's aux loss.")
@click.option("--lang", default="en", show_default=True, help="Training text language, or 'code'.")
@click.option("--eval-lang", default="de", show_default=True, help="Other language for held-out loss.")
@click.option("--eval-batches", type=options.INT, default=8, show_default=True, help="Held-out batches of B sequences.")
@click.option("--seed", type=options.SEED, default=0, show_default=True)
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
    type=options.INT,
    default=1,
    show_default=True,
    help="CPU threads (a tiny model's matmuls gain nothing from more, and lose much to contention).",
)
@click.option("--plugin", "plugins", multiple=True, metavar="FILE.py", help="Load routers from a file.")
def quality_cmd(
    routers_text,
    steps,
    experts,
    model_name,
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
    loaded = options.load_plugins(plugins)
    dev = resolve_device(device)
    if threads < 1:
        raise ValueError(f"--threads must be >= 1 (got {threads})")
    if dev.type == "cpu":
        torch.set_num_threads(threads)
    model = get_model(model_name) if model_name else None
    if model is not None and experts is not None and experts != model.experts:
        raise ValueError(f"--experts {experts} conflicts with --model {model.name} (E = {model.experts})")
    experts = model.experts if model is not None else (experts or 8)
    cfg = QualityConfig(
        steps=steps,
        experts=experts,
        ffn_kind=model.ffn_kind if model is not None else "swiglu",
        top_k=DEFAULT if top_k is None else top_k,
        capacity_factor=parse_capacity_factor(cf_text),
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
    # A model keeps the tiny LM's width and depth: its router, E, K and FFN kind are what carry over.
    specs = (
        [model.router_spec] if model is not None and routers_text is None else parse_router_specs(routers_text or "all")
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
    click.echo(f"\nrun: {path} (quality.parquet, quality_steps.parquet, meta.json); figures: moe-bench report {path}")
    traces = [r["trace_path"] for r in rows if r.get("trace_path")]
    for t in traces:
        click.echo(f"trace: {t}")
    if any(r.get("status") != "ok" for r in rows):
        sys.exit(1)
