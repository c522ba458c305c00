"""Routing metrics of DESIGN.md, as pure vectorised functions of one batch's plan.

Each metric is computed per batch from the plan and the shared ``positions`` result; a run reports
the mean over batches and its standard error (:func:`aggregate`). Definitions, with requested load
R_e (assignments asked of expert e before capacity) and kept load L_e:

- drop_rate           1 - kept / requested assignments (token-choice; NaN for expert choice)
- tokens_dropped_frac share of tokens left with no expert
- imbalance           max_e R_e / mean_e R_e;  imbalance_kept: the same on L;  maxvio = imbalance - 1
- load_cv             std / mean of R (population std)
- load_entropy        -sum q log q / log E with q = R / sum R (1.0 = perfectly even)
- experts_unused      number of experts with R_e = 0
- gate_mass_kept      sum of kept gate weights / sum of requested gate weights
- top_k_effective     requested assignments per token (the mean K; it varies per token for topp)
- aux_loss, z_loss    as the router defines them (NaN where it defines none)
- aux_loss_seq        DeepSeek-V3's sequence-wise balance loss (NaN without sequence ids)
- router_iters        iterations an iterative router used (sinkhorn; NaN for the others)

Direction for ``compare``: :data:`HIGHER_IS_BETTER` and :data:`LOWER_IS_BETTER`; a metric in
neither (top_k_effective, router_iters) is reported as changed, never as a regression.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from moe_routing_bench.kernels.dispatch import Dispatch
from moe_routing_bench.kernels.positions import kept_mask, positions
from moe_routing_bench.routers.contract import Plan

METRICS: dict[str, str] = {
    "drop_rate": "1 - kept / requested assignments (NaN for routers that choose tokens per expert)",
    "tokens_dropped_frac": "share of tokens left with no expert after capacity",
    "imbalance": "max_e R_e / mean_e R_e on the requested load",
    "imbalance_kept": "max_e L_e / mean_e L_e on the kept load",
    "maxvio": "imbalance - 1",
    "load_cv": "std / mean of the requested load (population std)",
    "load_entropy": "-sum q log q / log E with q = R / sum R (1 = even)",
    "experts_unused": "experts with no requested assignment",
    "gate_mass_kept": "kept gate weight / requested gate weight",
    "top_k_effective": "requested assignments per token R / T: the mean K (varies per token for topp)",
    "aux_loss": "E / (K T) sum_e R_e P_e (1.0 at perfect balance)",
    "aux_loss_seq": "DeepSeek-V3's sequence-wise balance loss: mean over sequences s of E / (K_s T_s) "
    "sum_e R_e^s P_e^s (1.0 when every sequence routes evenly; NaN without sequence ids or aux loss)",
    "z_loss": "mean(logsumexp(logits)^2)",
    "router_iters": "iterations an iterative router used per batch (sinkhorn's balancing; NaN for the others)",
}
HIGHER_IS_BETTER = frozenset({"gate_mass_kept", "load_entropy"})
LOWER_IS_BETTER = frozenset(
    {
        "drop_rate",
        "tokens_dropped_frac",
        "imbalance",
        "imbalance_kept",
        "maxvio",
        "load_cv",
        "experts_unused",
        "aux_loss",
        "aux_loss_seq",
        "z_loss",
    }
)


@dataclass
class BatchLoads:
    """Per-expert loads of one batch, for the long-format loads table."""

    requested_E: torch.Tensor
    kept_E: torch.Tensor


def batch_metrics(
    plan: Plan, rank_R: torch.Tensor | None = None, dispatch: Dispatch | None = None
) -> tuple[dict[str, float], BatchLoads]:
    """All routing metrics of one batch.

    dispatch: the plan's ``Dispatch`` when the layer already built it (one ``positions`` per
    batch: its kept mask and loads are read, nothing is ranked again). rank_R: the ``positions``
    result, when only that exists. Without either, ranks are computed here; a dropless plan needs
    none (everything is kept).
    """
    e, t = plan.num_experts, plan.num_tokens
    expert_R = plan.expert_R
    if dispatch is not None:
        requested_E, kept_E = dispatch.requested_E, dispatch.counts_E
        kept_R = None if plan.capacity is None else dispatch.kept_R
    elif plan.capacity is None:
        requested_E = torch.bincount(expert_R, minlength=e)
        kept_R = None
        kept_E = requested_E
    else:
        requested_E = torch.bincount(expert_R, minlength=e)
        if rank_R is None:
            rank_R, _ = positions(expert_R, e)
        kept_R = kept_mask(rank_R, plan.capacity)
        kept_E = torch.bincount(expert_R[kept_R], minlength=e)
    n_req = int(plan.num_requests)
    n_kept = int(kept_E.sum())

    # A router that chose the tokens itself was refused nothing: its drop rate is undefined.
    drop_rate = math.nan if plan.experts_choose else (1.0 - n_kept / n_req if n_req else 0.0)

    kept_tokens = plan.token_R if kept_R is None else plan.token_R[kept_R]
    served_T = torch.zeros(t, dtype=torch.bool, device=plan.token_R.device)
    served_T[kept_tokens] = True
    tokens_dropped_frac = 1.0 - float(served_T.sum()) / t

    w = plan.weight_R.detach().double()
    total_w = float(w.sum())
    kept_w = total_w if kept_R is None else float(w[kept_R].sum())
    gate_mass_kept = kept_w / total_w if total_w > 0 else math.nan

    out = {
        "drop_rate": drop_rate,
        "tokens_dropped_frac": tokens_dropped_frac,
        **load_stats(requested_E),
        "imbalance_kept": _imbalance(kept_E),
        "gate_mass_kept": gate_mass_kept,
        "top_k_effective": n_req / t,
        "aux_loss": _scalar(plan.aux_loss),
        "aux_loss_seq": _scalar(plan.aux_loss_seq),
        "z_loss": _scalar(plan.z_loss),
        "router_iters": _scalar(plan.extras.get("iterations")),
    }
    return {k: out[k] for k in METRICS}, BatchLoads(requested_E=requested_E, kept_E=kept_E)


def load_stats(load_E: torch.Tensor) -> dict[str, float]:
    """Balance statistics of one per-expert load vector [E]."""
    load = load_E.double()
    e = load.numel()
    total = float(load.sum())
    imbalance = _imbalance(load_E)
    if total <= 0:
        return {
            "imbalance": math.nan,
            "maxvio": math.nan,
            "load_cv": math.nan,
            "load_entropy": math.nan,
            "experts_unused": float(e),
        }
    mean = total / e
    q = load / total
    entropy = float(-(q[q > 0] * q[q > 0].log()).sum()) / math.log(e) if e > 1 else 1.0
    return {
        "imbalance": imbalance,
        "maxvio": imbalance - 1.0,
        "load_cv": float(load.std(correction=0)) / mean,
        "load_entropy": entropy,
        "experts_unused": float((load_E == 0).sum()),
    }


def _imbalance(load_E: torch.Tensor) -> float:
    total = float(load_E.sum())
    if total <= 0:
        return math.nan
    return float(load_E.max()) / (total / load_E.numel())


def _scalar(x: torch.Tensor | None) -> float:
    return math.nan if x is None else float(x.detach())


def aggregate(per_batch: Iterable[Mapping[str, float]]) -> dict[str, tuple[float, float]]:
    """Mean and standard error (sample std / sqrt(n)) of each metric over batches.

    NaN values (a metric the router does not define) give NaN; one batch gives SE NaN.
    """
    rows = list(per_batch)
    if not rows:
        raise ValueError("aggregate needs at least one batch of metrics")
    out: dict[str, tuple[float, float]] = {}
    for key in rows[0]:
        vals = torch.tensor([float(r[key]) for r in rows], dtype=torch.float64)
        mean = float(vals.mean())
        se = float(vals.std(correction=1) / math.sqrt(len(rows))) if len(rows) > 1 else math.nan
        out[key] = (mean, se)
    return out
