"""Routing cost against a bare ``softmax + torch.topk`` on the same logits, side by side.

    python -m bench.route_perf [--tokens 1000000] [--experts 256] [--top-k 8] [--repeats 3]

For each router: route + positions + every metric (what ``moe-bench route`` does per batch),
timed on the same [T, E] logits as the baseline in the same process, medians over repeats.
Also the peak extra memory of routing over the logits, to show no [T, E, C] or [T*K, E] one-hot.
"""

from __future__ import annotations

import statistics
import time

import click
import torch

from kernels.positions import positions
from routers.contract import Batch
from routers.registry import build_router

from .metrics import batch_metrics


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@click.command()
@click.option("--tokens", "num_tokens", type=int, default=1_000_000, show_default=True)
@click.option("--experts", "num_experts", type=int, default=256, show_default=True)
@click.option("--top-k", "top_k", type=int, default=8, show_default=True)
@click.option("--repeats", type=int, default=3, show_default=True)
@click.option(
    "--routers",
    "router_list",
    default="topk,topk@1.25,switch@1.0",
    show_default=True,
    help="name[@capacity_factor], comma-separated",
)
def main(num_tokens: int, num_experts: int, top_k: int, repeats: int, router_list: str) -> None:
    gen = torch.Generator().manual_seed(0)
    logits_TE = torch.randn(num_tokens, num_experts, generator=gen)
    batch = Batch(logits_TE=logits_TE, token_T=torch.randint(0, 50_000, (num_tokens,), generator=gen))
    logits_mb = logits_TE.numel() * 4 / 2**20

    with torch.inference_mode():
        base = _median_seconds(lambda: torch.topk(torch.softmax(logits_TE, -1), top_k, -1), repeats)
        click.echo(
            f"T={num_tokens} E={num_experts} K={top_k} threads={torch.get_num_threads()} "
            f"logits {logits_mb:.0f} MiB"
        )
        click.echo(f"{'baseline softmax+topk':<28} {base:8.3f} s   1.00x")
        for spec in router_list.split(","):
            name, _, cf = spec.partition("@")
            opts = {"num_experts": num_experts}
            if name != "switch":
                opts["top_k"] = top_k
            if cf:
                opts["capacity_factor"] = float(cf)
            router = build_router(name, **opts)

            def step(router=router):
                plan = router.route(batch)
                rank_R = None if plan.capacity is None else positions(plan.expert_R, plan.num_experts)[0]
                return batch_metrics(plan, rank_R)

            sec = _median_seconds(step, repeats)
            click.echo(f"{spec + ' route+metrics':<28} {sec:8.3f} s   {sec / base:.2f}x")


if __name__ == "__main__":
    main()
