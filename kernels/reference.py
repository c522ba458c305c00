"""A deliberately plain MoE layer: python loops over requests, small sizes only.

This is what the backends are tested against, so it shares none of their code: no ``positions``,
no ``Dispatch``, no permute or combine, no ``ExpertFFN`` forward. It reads the experts' weights
and nothing else, and states each rule of the routing contract as a loop a reader can check by
eye: walk the requests in priority order, count per expert, keep while the count is below C, run
that expert's SwiGLU on that one token row, add ``weight * y`` to the token's output.

Shape letters: T tokens, D hidden, E experts, R requested.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .experts import ExpertFFN


def _as_list(values: torch.Tensor | Sequence[int]) -> list[int]:
    if isinstance(values, torch.Tensor):
        return [int(v) for v in values.tolist()]
    return [int(v) for v in values]


def plain_positions(expert_R: torch.Tensor | Sequence[int], num_experts: int) -> tuple[list[int], list[int]]:
    """Rank of each request among earlier requests to the same expert, by a per-expert counter.

    Returns (rank_R, counts_E) as python lists, mirroring ``kernels.positions``.
    """
    seen_E = [0] * num_experts
    rank_R = []
    for e in _as_list(expert_R):
        if not 0 <= e < num_experts:
            raise ValueError(f"expert_R value {e} outside [0, {num_experts})")
        rank_R.append(seen_E[e])
        seen_E[e] += 1
    return rank_R, seen_E


def _plain_ffn(x_D: torch.Tensor, ffn: ExpertFFN, e: int, acc: torch.dtype) -> torch.Tensor:
    """Expert e's FFN on one row, written out from its weights: SwiGLU with silu(z) = z / (1 +
    exp(-z)); ReLU as max(z, 0); GELU as z * Phi(z) with the error function."""
    x_D = x_D.to(acc)
    up_F = x_D @ ffn.w_up[e].to(acc)
    if ffn.kind == "swiglu":
        z_F = x_D @ ffn.w_gate[e].to(acc)
        h_F = (z_F / (1 + torch.exp(-z_F))) * up_F
    elif ffn.kind == "relu":
        h_F = torch.where(up_F > 0, up_F, torch.zeros_like(up_F))
    else:
        h_F = up_F * 0.5 * (1 + torch.erf(up_F / 2**0.5))
    return h_F @ ffn.w_down[e].to(acc)


def plain_moe_forward(
    x_TD: torch.Tensor,
    token_R: torch.Tensor | Sequence[int],
    expert_R: torch.Tensor | Sequence[int],
    weight_R: torch.Tensor,
    capacity: int | None,
    ffn: ExpertFFN,
    acc_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """out[t] = sum over kept requests r of token t: weight_R[r] * FFN_{expert_R[r]}(x[t]).

    x_TD: [T, D]; token_R, expert_R: [R] ints in priority order; weight_R: [R] floats;
    capacity: C, or None for dropless. All arithmetic runs in ``acc_dtype`` (float64 by default)
    and the result is cast to x's dtype. Differentiable w.r.t. x_TD, weight_R and the experts.
    """
    tokens = _as_list(token_R)
    experts = _as_list(expert_R)
    if not len(tokens) == len(experts) == weight_R.shape[0]:
        raise ValueError("token_R, expert_R and weight_R must have equal lengths")
    num_tokens = x_TD.shape[0]
    count_E = [0] * ffn.num_experts
    contributions: list[list[torch.Tensor]] = [[] for _ in range(num_tokens)]
    for r, (t, e) in enumerate(zip(tokens, experts, strict=True)):
        if capacity is not None and count_E[e] >= capacity:
            continue  # dropped: expert e is full; a later request never displaces an earlier one
        count_E[e] += 1
        y_D = _plain_ffn(x_TD[t], ffn, e, acc_dtype)
        contributions[t].append(weight_R[r].to(acc_dtype) * y_D)
    if num_tokens == 0:
        return x_TD.new_zeros(x_TD.shape)
    zero_D = torch.zeros(x_TD.shape[1], dtype=acc_dtype, device=x_TD.device)
    rows = []
    for t in range(num_tokens):
        row_D = zero_D
        for c_D in contributions[t]:
            row_D = row_D + c_D
        rows.append(row_D)
    return torch.stack(rows).to(x_TD.dtype)


def random_plan(
    num_tokens: int,
    num_experts: int,
    top_k: int,
    *,
    seed: int = 0,
    skew: float = 0.0,
    empty: tuple[int, ...] = (),
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random plan arrays (token_R, expert_R, weight_R) for tests and benchmarks of the kernels.

    Each token takes K distinct experts (top-K of uniform scores), listed choice-major (every first
    choice before any second, as GShard and top-k order their requests); gates are a softmax over
    the K scores. ``skew`` > 0 favours low expert ids, so capacity drops happen; experts in
    ``empty`` are never chosen. Uniform scores give each expert about K * T / E requests.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    scores_TE = torch.rand(num_tokens, num_experts, generator=gen, device=device)
    if skew:
        scores_TE -= skew * torch.arange(num_experts, device=device) / num_experts
    if empty:
        scores_TE[:, list(empty)] = -1e9
    top_TK, expert_TK = scores_TE.topk(top_k, dim=1)
    weight_TK = torch.softmax(top_TK.clamp_min(-1.0), dim=1)
    token_R = torch.arange(num_tokens, device=device).repeat(top_k)
    return token_R, expert_TK.T.reshape(-1).contiguous(), weight_TK.T.reshape(-1).contiguous()
