"""A tiny decoder-only MoE language model whose FFNs are routed by any registered router.

The quality benchmark (``moe-bench quality``, bench/quality.py) trains this same model once per
router. Each block is pre-norm: ``x + attn(norm(x))`` (causal self-attention through
``scaled_dot_product_attention(is_causal=True)``), then ``x + moe(norm(x))`` where the MoE layer is

    logits_TE = gate(h_TD)                    a per-layer linear gate, trained with the model
    plan      = router.route(Batch(logits_TE, token_T, seq_T, hidden_TD=h_TD))
    out_TD    = bench.layer.layer_forward(plan, h_TD, experts, shared_ffn=...)

so capacity, drops and nllb's shared branch behave exactly as in every other benchmark; gradients
reach the gate through the plan's gate weights (``weight_R`` is differentiable w.r.t. the logits)
and through the router's aux loss. Every block is an MoE block. The output layer is tied to the
token embedding; positions are learned.

What the model learns is the router's business only through its gate: routers stay plain objects
(one per layer, so per-layer state such as a balancing bias stays per layer), not modules.

Initialisation is a pure function of ``(seed, parameter name)``, so two models that differ only
in their router (or in the width of their gate: nllb's level-1 logit column) start from the same
weights everywhere else.

Shape letters: B sequences, S positions, T = B * S tokens, D width, H heads, E experts, V vocab.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moe_routing_bench.bench.moe_layer import SHARED_WEIGHT, layer_forward
from moe_routing_bench.kernels.experts import ExpertFFN
from moe_routing_bench.routers.contract import Batch, Plan, Router, RoutingError
from moe_routing_bench.routers.validate import validate_plan


@dataclass(frozen=True)
class LMConfig:
    """Sizes of the tiny MoE LM. ffn_ratio: expert width F = ffn_ratio * width; ffn_kind: SwiGLU,
    or a ReLU/GELU two-matrix FFN (``kernels.experts``)."""

    vocab: int = 2048
    width: int = 64
    layers: int = 2
    heads: int = 4
    seq_len: int = 64
    experts: int = 8
    ffn_ratio: float = 2.0
    seed: int = 0
    ffn_kind: str = "swiglu"

    def __post_init__(self) -> None:
        for name, low in (
            ("vocab", 2),
            ("width", 1),
            ("layers", 1),
            ("heads", 1),
            ("seq_len", 1),
            ("experts", 1),
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an integer >= {low} (got {v!r})")
        if self.width % self.heads:
            raise ValueError(f"width must be divisible by heads = {self.heads} (got {self.width})")
        if not (isinstance(self.ffn_ratio, (int, float)) and self.ffn_ratio > 0):
            raise ValueError(f"ffn_ratio must be > 0 (got {self.ffn_ratio!r})")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0 (got {self.seed!r})")


def derived_seed(seed: int, label: str) -> int:
    """A seed that depends only on (seed, label): device- and order-independent init."""
    return seed * 1_000_003 + zlib.crc32(label.encode())


def seeded_generator(seed: int, label: str) -> torch.Generator:
    return torch.Generator().manual_seed(derived_seed(seed, label))


def _normal_(p: torch.Tensor, std: float, seed: int, label: str) -> None:
    with torch.no_grad():
        p.copy_(torch.randn(p.shape, generator=seeded_generator(seed, label)) * std)


@dataclass(frozen=True)
class GateShape:
    """What a router needs from the layer, found by probing it once (see :func:`probe_router`).

    columns: logits per token the gate must produce (E, or E + 1 when the router reads an extra
    level-1 logit column, as nllb with ``gate_source=logit_column``).
    shared: whether plans ask for a shared dense branch (``plan.extras[SHARED_WEIGHT]``).
    """

    columns: int
    shared: bool


def probe_router(make_router, num_experts: int, width: int, tokens: int = 16) -> GateShape:
    """Route one random batch through a throwaway router to learn the gate width it expects.

    ``make_router()`` builds a fresh router (the probe must not advance the real one's RNG).
    Tries E logit columns, then E + 1; the batch carries hidden states, so routers with their own
    gate on ``hidden_TD`` work too. A router that cannot route before ``fit`` (balanced hash) is
    given a fit on the probe's own token ids first: the probe only learns shapes.
    """
    gen = torch.Generator().manual_seed(0)
    hidden_TD = torch.randn(tokens, width, generator=gen)
    token_T = torch.arange(tokens, dtype=torch.int64)
    errors = []
    for cols in (num_experts, num_experts + 1):
        router = make_router()
        batch = Batch(torch.randn(tokens, cols, generator=gen), token_T, hidden_TD=hidden_TD)
        with contextlib.suppress(RoutingError):
            router.fit(Batch(torch.zeros(tokens, num_experts), token_T, hidden_TD=hidden_TD))
        try:
            plan = router.route(batch)
        except RoutingError as exc:
            errors.append(f"{cols} columns: {exc}")
            continue
        return GateShape(columns=cols, shared=SHARED_WEIGHT in plan.extras)
    raise RoutingError("the router accepts neither E nor E + 1 logit columns: " + "; ".join(errors))


class MoEFFN(nn.Module):
    """One routed FFN layer: a linear gate, E SwiGLU experts, a shared expert where plans ask."""

    def __init__(self, cfg: LMConfig, index: int, router: Router, shape: GateShape, backend: str) -> None:
        super().__init__()
        d, e = cfg.width, cfg.experts
        self.router = router
        self.backend = backend
        self.gate = nn.Linear(d, shape.columns, bias=False)
        # The first E rows are the same for every router; an extra level-1 row has its own stream.
        _normal_(self.gate.weight[:e], d**-0.5, cfg.seed, f"gate.{index}")
        if shape.columns > e:
            _normal_(self.gate.weight[e:], d**-0.5, cfg.seed, f"gate-extra.{index}")
        kind = cfg.ffn_kind
        self.experts = ExpertFFN(e, d, cfg.ffn_ratio, kind=kind, seed=derived_seed(cfg.seed, f"experts.{index}"))
        self.shared = (
            ExpertFFN(1, d, cfg.ffn_ratio, kind=kind, seed=derived_seed(cfg.seed, f"shared.{index}"))
            if shape.shared
            else None
        )

    def forward(
        self, h_TD: torch.Tensor, token_T: torch.Tensor, seq_T: torch.Tensor
    ) -> tuple[torch.Tensor, Plan, torch.Tensor]:
        """h_TD [T, D] -> (out_TD [T, D], the plan, logits_TE [T, columns] float32)."""
        logits_TE = self.gate(h_TD).float()
        batch = Batch(logits_TE, token_T, seq_T, hidden_TD=h_TD)
        plan = validate_plan(self.router, batch, self.router.route(batch))
        out_TD = layer_forward(plan, h_TD, self.experts, backend=self.backend, shared_ffn=self.shared)
        return out_TD, plan, logits_TE


class Block(nn.Module):
    """Pre-norm causal self-attention, then a pre-norm routed FFN."""

    def __init__(self, cfg: LMConfig, index: int, router: Router, shape: GateShape, backend: str) -> None:
        super().__init__()
        d = cfg.width
        self.heads = cfg.heads
        self.attn_norm = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.moe_norm = nn.LayerNorm(d)
        self.moe = MoEFFN(cfg, index, router, shape, backend)
        _normal_(self.qkv.weight, d**-0.5, cfg.seed, f"qkv.{index}")
        # Residual branches scaled down with depth (GPT-2), so the stream starts near the embedding.
        _normal_(self.proj.weight, d**-0.5 / math.sqrt(2 * cfg.layers), cfg.seed, f"proj.{index}")

    def forward(
        self, x_BSD: torch.Tensor, token_T: torch.Tensor, seq_T: torch.Tensor
    ) -> tuple[torch.Tensor, Plan, torch.Tensor]:
        """x_BSD [B, S, D] -> (x_BSD, this layer's plan, its router logits [T, columns])."""
        b, s, d = x_BSD.shape
        q, k, v = self.qkv(self.attn_norm(x_BSD)).view(b, s, 3, self.heads, d // self.heads).unbind(2)
        att_BHSd = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x_BSD = x_BSD + self.proj(att_BHSd.transpose(1, 2).reshape(b, s, d))
        out_TD, plan, logits_TE = self.moe(self.moe_norm(x_BSD).reshape(b * s, d), token_T, seq_T)
        return x_BSD + out_TD.view(b, s, d), plan, logits_TE


class TinyMoELM(nn.Module):
    """Token + position embedding, ``layers`` MoE blocks, final norm, output tied to the embedding.

    routers: one per layer (built by the caller from the registry). shape: from ``probe_router``.
    backend: the dispatch backend (``torch`` works everywhere and has autograd).
    """

    def __init__(self, cfg: LMConfig, routers: list[Router], shape: GateShape, backend: str = "torch") -> None:
        super().__init__()
        if len(routers) != cfg.layers:
            raise ValueError(f"routers must hold one router per layer ({cfg.layers}; got {len(routers)})")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.width)
        self.pos = nn.Parameter(torch.empty(cfg.seq_len, cfg.width))
        _normal_(self.embed.weight, cfg.width**-0.5, cfg.seed, "embed")
        _normal_(self.pos, cfg.width**-0.5, cfg.seed, "pos")
        self.blocks = nn.ModuleList(Block(cfg, i, r, shape, backend) for i, r in enumerate(routers))
        self.norm = nn.LayerNorm(cfg.width)

    @property
    def routers(self) -> list[Router]:
        return [blk.moe.router for blk in self.blocks]

    def gates(self) -> list[nn.Linear]:
        return [blk.moe.gate for blk in self.blocks]

    def forward(self, token_BS: torch.Tensor) -> tuple[torch.Tensor, list[Plan], list[torch.Tensor]]:
        """token_BS [B, S] int64 (remapped ids < vocab) -> (next-token logits [B, S, V], one plan
        per layer, router logits [T, columns] per layer)."""
        b, s = token_BS.shape
        if s > self.cfg.seq_len:
            raise ValueError(f"sequences must be at most seq_len = {self.cfg.seq_len} long (got {s})")
        token_T = token_BS.reshape(-1)
        seq_T = torch.arange(b, device=token_BS.device).repeat_interleave(s)
        x = self.embed(token_BS) + self.pos[:s]
        plans, logits = [], []
        for blk in self.blocks:
            x, plan, logits_TE = blk(x, token_T, seq_T)
            plans.append(plan)
            logits.append(logits_TE)
        return F.linear(self.norm(x), self.embed.weight), plans, logits


def aux_loss_mean(plans: list[Plan]) -> torch.Tensor | None:
    """Mean of the layers' aux losses, or None when the router defines none."""
    terms = [p.aux_loss for p in plans if p.aux_loss is not None]
    return torch.stack(terms).mean() if terms else None


def count_params(model: TinyMoELM) -> tuple[int, int]:
    """(total parameters, expert parameters)."""
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for blk in model.blocks for p in blk.moe.experts.parameters())
    return total, experts
