"""Routing cost against a bare ``softmax + torch.topk`` on the same logits, side by side.

    python -m bench.route_perf [--tokens 1000000] [--experts 256] [--top-k 8] [--repeats 3]
        [--routers SPEC,...] [--dense-tokens 131072]

For each router: route + positions + every metric (what ``moe-bench route`` does per batch),
timed alternately with the baseline on the same [T, E] logits in the same process (so both see
the same machine load), medians over repeats.

A router spec is ``name[@capacity_factor][:key=value...]``. K applies where the router has a free
K (topk, expert_choice, hierarchical groups); gshard is top-2, switch and hash top-1, dense top-E.
The default `hierarchical` is DeepSeek-V3's shape (8 groups, 4 kept) when E allows it; the `nllb`
form reads its level-1 gate from an extra logit column, so it routes logits of E + 1 columns.
`dense` requests T * E assignments (5 GiB of plan at T = 10^6, E = 256), so it is measured at
``--dense-tokens`` with its own baseline at that T; the ratio is what compares.
"""

from __future__ import annotations

import statistics
import time

import click
import torch

from moe_routing_bench.bench.metrics import batch_metrics
from moe_routing_bench.kernels.positions import positions
from moe_routing_bench.routers.contract import Batch
from moe_routing_bench.routers.registry import build_router


def _paired_medians(base_fn, fn, repeats: int) -> tuple[float, float]:
    """Median seconds of ``base_fn`` and ``fn``, timed alternately after one warm-up of each, so
    both see the same machine load (on a shared machine the load drifts between minutes)."""
    base_fn()
    fn()
    base_times, times = [], []
    for _ in range(repeats):
        for f, out in ((base_fn, base_times), (fn, times)):
            t0 = time.perf_counter()
            f()
            out.append(time.perf_counter() - t0)
    return statistics.median(base_times), statistics.median(times)


DEFAULT_ROUTERS = (
    "topk,topk@1.25,switch@1.0,gshard@1.0,expert_choice@1.0,hash,hierarchical,"
    "hierarchical@1.0:form=nllb:gate_source=logit_column,dense"
)
# Routers whose K is free; the others fix it (gshard 2, switch and hash 1, dense E).
_FREE_K = ("topk", "expert_choice", "hierarchical")


def _parse_spec(spec: str, num_experts: int, top_k: int) -> tuple[str, dict[str, object]]:
    """``name[@cf][:key=value...]`` -> (name, build_router options)."""
    head, *pairs = spec.split(":")
    name, _, cf = head.partition("@")
    opts: dict[str, object] = {"num_experts": num_experts}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise click.BadParameter(f"router option must be key=value (got {pair!r} in {spec!r})")
        opts[key] = value
    if name in _FREE_K and opts.get("form", "groups") == "groups":
        opts.setdefault("top_k", top_k)
    if name == "hierarchical" and "form" not in opts and num_experts % 8 == 0:
        # DeepSeek-V3's grouping: 8 groups, the best 4 kept.
        opts.setdefault("num_groups", 8)
        opts.setdefault("topk_group", 4)
    if cf:
        opts["capacity_factor"] = float(cf)
    return name, opts


@click.command()
@click.option("--tokens", "num_tokens", type=int, default=1_000_000, show_default=True)
@click.option("--experts", "num_experts", type=int, default=256, show_default=True)
@click.option("--top-k", "top_k", type=int, default=8, show_default=True)
@click.option("--repeats", type=int, default=3, show_default=True)
@click.option(
    "--routers",
    "router_list",
    default=DEFAULT_ROUTERS,
    show_default=True,
    help="name[@capacity_factor][:key=value...], comma-separated",
)
@click.option(
    "--dense-tokens",
    type=int,
    default=131_072,
    show_default=True,
    help="T for `dense` (T * E requests), with its own baseline at that T; 0: the full T.",
)
def main(
    num_tokens: int, num_experts: int, top_k: int, repeats: int, router_list: str, dense_tokens: int
) -> None:
    gen = torch.Generator().manual_seed(0)
    # One extra column: the nllb form's level-1 gate logit. Other routers see a view of the first E.
    logits_TX = torch.randn(num_tokens, num_experts + 1, generator=gen)
    token_T = torch.randint(0, 50_000, (num_tokens,), generator=gen)
    logits_TE = logits_TX[:, :num_experts].contiguous()
    batch = Batch(logits_TE=logits_TE, token_T=token_T)
    logits_mb = logits_TE.numel() * 4 / 2**20

    with torch.inference_mode():
        click.echo(
            f"T={num_tokens} E={num_experts} K={top_k} threads={torch.get_num_threads()} "
            f"logits {logits_mb:.0f} MiB; each router timed alternately with the baseline "
            "softmax + topk(K) on the same logits (median over repeats)"
        )
        click.echo(f"{'router':<52} {'route+metrics':>13} {'baseline':>9}  ratio")
        for spec in router_list.split(","):
            name, opts = _parse_spec(spec.strip(), num_experts, top_k)
            router = build_router(name, **opts)
            t = num_tokens if name != "dense" or dense_tokens <= 0 else min(dense_tokens, num_tokens)
            if opts.get("gate_source") == "logit_column":
                b = Batch(logits_TE=logits_TX[:t], token_T=token_T[:t])
            else:
                b = batch if t == num_tokens else Batch(logits_TE=logits_TE[:t], token_T=token_T[:t])
            x_TE = logits_TE[:t]

            def base_step(x_TE=x_TE):
                return torch.topk(torch.softmax(x_TE, -1), top_k, -1)

            def step(router=router, b=b):
                plan = router.route(b)
                rank_R = None if plan.capacity is None else positions(plan.expert_R, plan.num_experts)[0]
                return batch_metrics(plan, rank_R)

            base, sec = _paired_medians(base_step, step, repeats)
            label = spec.strip() + (f" (T={t})" if t != num_tokens else "")
            click.echo(f"{label:<52} {sec:11.3f} s {base:7.3f} s  {sec / base:.2f}x")


if __name__ == "__main__":
    main()
