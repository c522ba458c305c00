"""``moe-bench route-cost``: what routing costs against a bare softmax + topk on the same logits."""

from __future__ import annotations

import click
import torch

from moe_routing_bench.bench.cli import options
from moe_routing_bench.bench.microbench.route_cost import DEFAULT_ROUTERS, route_cost
from moe_routing_bench.bench.spec import parse_specs


@click.command("route-cost")
@click.option("--tokens", "num_tokens", type=options.INT, default=1_000_000, show_default=True)
@click.option("--experts", "num_experts", type=options.INT, default=256, show_default=True)
@click.option("--top-k", "top_k", type=options.INT, default=8, show_default=True)
@click.option("--repeats", type=options.INT, default=3, show_default=True)
@click.option(
    "--routers", "router_text", default=DEFAULT_ROUTERS, show_default=True, help="Router specs, comma-separated."
)
@click.option(
    "--dense-tokens",
    type=options.INT,
    default=131_072,
    show_default=True,
    help="T for `dense` (T * E requests), with its own baseline at that T; 0: the full T.",
)
@click.option(
    "--bf16-logits",
    is_flag=True,
    help="Round the logits to bfloat16 first (kept in float32): the ties of captured traces, which "
    "the tie rule resolves.",
)
def route_cost_cmd(
    num_tokens: int,
    num_experts: int,
    top_k: int,
    repeats: int,
    router_text: str,
    dense_tokens: int,
    bf16_logits: bool,
) -> None:
    """Time route + positions + metrics per router against softmax + topk(K), alternately."""
    click.echo(
        f"T={num_tokens} E={num_experts} K={top_k} threads={torch.get_num_threads()} "
        f"logits {num_tokens * num_experts * 4 / 2**20:.0f} MiB{' (bf16-rounded)' if bf16_logits else ''}; "
        "each router timed alternately with the baseline softmax + topk(K) on the same logits (median over repeats)"
    )
    click.echo(f"{'router':<60} {'route+metrics':>13} {'baseline':>9}  ratio")
    specs = parse_specs(router_text, "--routers")
    for c in route_cost(specs, num_tokens, num_experts, top_k, repeats, dense_tokens, bf16_logits):
        label = c.label + (f" (T={c.tokens})" if c.tokens != num_tokens else "")
        click.echo(f"{label:<60} {c.seconds:11.3f} s {c.baseline:7.3f} s  {c.ratio:.2f}x")
