"""``moe-bench capture``: record a Hugging Face MoE model's router logits as a ``trace`` workload."""

from __future__ import annotations

from pathlib import Path

import click

from moe_routing_bench.bench.capture.models import capture_trace
from moe_routing_bench.bench.cli import options
from moe_routing_bench.bench.spec import Spec
from moe_routing_bench.bench.timing import resolve_device
from moe_routing_bench.routers.contract import RoutingError
from moe_routing_bench.workloads.registry import build_workload


@click.command("capture")
@click.option("--model", "model_id", required=True, help="Folder from save_pretrained, or a hub id in the local cache.")
@options.workload_choice("text")
@click.option("--lang", default=None, help="Shortcut for --workload-opt lang=LANG (text workload).")
@click.option("--tokens", "-T", "num_tokens", type=options.INT, default=4096, show_default=True)
@click.option(
    "--seq-len", type=options.INT, default=512, show_default=True, help="Tokens per sequence fed to the model."
)
@click.option("--batch-size", type=options.INT, default=4, show_default=True, help="Sequences per forward pass.")
@click.option(
    "--tokenizer",
    "tokenizer_mode",
    type=click.Choice(["auto", "model", "workload"]),
    default="auto",
    show_default=True,
    help="model: the model's tokenizer on the workload's text; workload: the workload's ids % vocab_size.",
)
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto")
@options.device
@options.seed
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="Trace file (.parquet).")
def capture_cmd(
    model_id: str,
    workloads: list[Spec],
    lang: str | None,
    num_tokens: int,
    seq_len: int,
    batch_size: int,
    tokenizer_mode: str,
    dtype: str,
    device: str,
    seed: int,
    out_path: str,
) -> None:
    """Record every MoE layer's router logits (with the token ids) of a Hugging Face model to Parquet."""
    if len(workloads) != 1:
        raise RoutingError(f"--workload takes one workload here (got {len(workloads)})")
    spec = workloads[0]
    if lang is not None:
        spec = spec.with_options({"lang": lang})
    workload = build_workload(spec.name, spec.opts, seed=seed)
    layers, tokens, es, model_class, how = capture_trace(
        model_id,
        workload,
        out_path,
        num_tokens=num_tokens,
        seq_len=seq_len,
        batch_size=batch_size,
        tokenizer_mode=tokenizer_mode,
        dtype=dtype,
        device=resolve_device(device),
    )
    click.echo(
        f"captured {layers} MoE layers x {tokens} tokens (E = {', '.join(map(str, es))}) "
        f"from {model_class} -> {Path(out_path)}",
    )
    click.echo(f"tokens: {how}", err=True)
