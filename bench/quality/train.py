"""Routing quality: train the same tiny MoE LM with each router, then measure what it learned.

Every router trains the *same* model (bench/lm.py: same initial weights, same data order, same
step count, same seed) on a real token stream (the ``text`` workload's Debian Reference prose, or
``code``), with the router's auxiliary loss times ``aux_coef`` where it defines one. Recorded:

- per step and MoE layer: the language-model loss, the aux loss, and every routing metric of
  bench/metrics.py on that step's plan (imbalance, drop rate, ...);
- at the end: held-out loss on a later slice of the same language and on another language (the
  Debian Reference translations are parallel, so the same slice holds the same content), training
  and evaluation tokens/s, and the routing metrics over the held-out batches (all layers).

The data: the stream's last ``heldout_frac`` is held out; the rest is training data, cut into
windows of ``seq_len + 1`` tokens (stride seq_len, so every token is a target once) and visited in
one seeded order. The vocabulary is remapped to the ``vocab - 1`` ids most frequent in the training
slice plus one OOV id (``vocab - 1``), so the output layer does not dominate a tiny model; every
loss is over that remapped vocabulary (log(vocab) is the loss of a uniform guess). Routers that
fit (the balanced hash) are fitted on the training slice's (remapped) ids, never the held-out one.
Routers see the remapped ids, the ids the model is fed: what a hash layer of this model would hash.

Recording, the table and traces: bench/quality_cmd.py. The model: bench/lm.py.

Shape letters: B sequences per step, S positions, T = B * S tokens, E experts, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from moe_routing_bench.bench.metrics import batch_metrics
from moe_routing_bench.bench.quality.lm import GateShape, LMConfig, TinyMoELM, aux_loss_mean, probe_router
from moe_routing_bench.bench.routing import wants_fit
from moe_routing_bench.bench.spec import DEFAULT, CapacityFactor, Notes, Spec, parse_specs, router_options
from moe_routing_bench.bench.timing import stopwatch
from moe_routing_bench.kernels.experts import ffn_width
from moe_routing_bench.routers.contract import Batch, Router, RoutingError
from moe_routing_bench.routers.registry import build_router, get_router_class, router_names

# ``all`` runs every registered router; these also run the named variants (when registered),
# labelled as in the default sweep. nllb reads its level-1 gate from an extra logit column so that
# gate is trained with the model, as NLLB's is. topk[bias] is DeepSeek-V3's auxiliary-loss-free
# balancing (rate 0.001 per step, theirs); it still reports an aux loss, so compare it at
# --aux-coef 0 with topk at the default coefficient (README, "Routing quality").
ALL_VARIANTS: dict[str, tuple[tuple[str, dict[str, str]], ...]] = {
    "hash": (("hash", {}), ("hash[balanced]", {"variant": "balanced"})),
    "topk": (("topk", {}), ("topk[bias]", {"bias_update_rate": "0.001"})),
    "hierarchical": (
        ("hierarchical[groups]", {"form": "groups"}),
        ("hierarchical[nllb]", {"form": "nllb", "gate_source": "logit_column"}),
    ),
}
NOT_CAUSAL = "not causal: a decoder cannot use it at inference"


def parse_router_specs(text: str) -> list[Spec]:
    """``all`` (every registered router, with the named variants of ALL_VARIANTS) or a comma list
    of ``name`` / ``name[key=value,...]``. Unknown names raise, listing the valid ones."""
    if text.strip() == "all":
        return [
            Spec(name, tuple(opts.items()), label)
            for name in router_names()
            for label, opts in ALL_VARIANTS.get(name, ((name, {}),))
        ]
    specs = parse_specs(text, "--routers")
    for s in specs:
        get_router_class(s.name)
    return specs


@dataclass(frozen=True)
class QualityConfig:
    """One quality run. capacity_factor / top_k: ``"default"`` keeps each router's own; a value is
    given to every router that accepts it (routers with a fixed K keep theirs)."""

    steps: int = 300
    experts: int = 8
    top_k: int | str = DEFAULT
    capacity_factor: CapacityFactor = DEFAULT
    layers: int = 2
    width: int = 64
    heads: int = 4
    vocab: int = 2048
    seq_len: int = 64
    batch_seqs: int = 8
    lr: float = 3e-3
    aux_coef: float = 0.01
    lang: str = "en"
    eval_lang: str = "de"
    eval_batches: int = 8
    heldout_frac: float = 0.1
    seed: int = 0
    backend: str = "torch"
    ffn_kind: str = "swiglu"

    def __post_init__(self) -> None:
        for name in ("steps", "experts", "batch_seqs", "eval_batches"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1 (got {v!r})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be > 0 (got {self.lr})")
        if not (self.aux_coef >= 0 and math.isfinite(self.aux_coef)):
            raise ValueError(f"aux_coef must be >= 0 (got {self.aux_coef})")
        if not 0 < self.heldout_frac < 1:
            raise ValueError(f"heldout_frac must be in (0, 1) (got {self.heldout_frac})")
        self.lm_config()  # validates the model sizes

    def lm_config(self) -> LMConfig:
        return LMConfig(
            self.vocab,
            self.width,
            self.layers,
            self.heads,
            self.seq_len,
            self.experts,
            seed=self.seed,
            ffn_kind=self.ffn_kind,
        )


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclass
class QualityData:
    """Token windows [N, S + 1] (int64, remapped ids) and what they came from."""

    train: torch.Tensor
    heldout: torch.Tensor
    heldout_source: torch.Tensor  # the same windows in the tokenizer's ids (for traces)
    other: torch.Tensor
    fit_ids: torch.Tensor  # the training slice's remapped ids: what routers that fit learn from
    info: dict[str, Any]


def stream_ids(lang: str, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    """[N] token ids of a real stream from the workload registry: ``code``, or ``text`` in lang."""
    from moe_routing_bench.workloads.registry import build_workload

    wl = build_workload("code", {}, seed) if lang == "code" else build_workload("text", {"lang": lang}, seed)
    return np.asarray(wl.tokens(), dtype=np.int64), wl.describe()


def windows(ids: np.ndarray, seq_len: int) -> torch.Tensor:
    """[N, S + 1] windows at stride S: inputs are [:, :S], targets [:, 1:]."""
    n = (ids.shape[0] - 1) // seq_len
    if n < 1:
        raise ValueError(f"a stream of {ids.shape[0]} tokens holds no window of seq_len + 1 = {seq_len + 1}")
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return torch.from_numpy(ids[idx])


def build_data(cfg: QualityConfig) -> QualityData:
    """Training windows, held-out windows (same language, later slice; other language, the same
    relative slice) and the vocabulary map, from the training slice's frequencies only."""
    ids, wl_train = stream_ids(cfg.lang, cfg.seed)
    other_ids, wl_other = stream_ids(cfg.eval_lang, cfg.seed)
    cut = int(ids.shape[0] * (1 - cfg.heldout_frac))
    train_ids, held_ids = ids[:cut], ids[cut:]
    other_held = other_ids[int(other_ids.shape[0] * (1 - cfg.heldout_frac)) :]
    # The vocab - 1 most frequent training ids (ties: lower id first) keep an id; the rest are OOV.
    counts = np.bincount(train_ids)
    order = np.lexsort((np.arange(counts.shape[0]), -counts))
    kept = order[: cfg.vocab - 1][counts[order[: cfg.vocab - 1]] > 0]
    oov = cfg.vocab - 1
    lut = np.full(int(max(ids.max(), other_ids.max())) + 1, oov, dtype=np.int64)
    lut[kept] = np.arange(kept.shape[0])
    need = cfg.eval_batches * cfg.batch_seqs * cfg.seq_len + 1
    for lang, arr in ((cfg.lang, held_ids), (cfg.eval_lang, other_held)):
        if arr.shape[0] < need:
            raise ValueError(
                f"the held-out slice of {lang} has {arr.shape[0]} tokens; eval_batches * batch_seqs * "
                f"seq_len + 1 = {need} are needed (lower --eval-batches)"
            )
    held_w = windows(held_ids[:need], cfg.seq_len)
    info = {
        "lang": cfg.lang,
        "eval_lang": cfg.eval_lang,
        "workload": wl_train,
        "eval_workload": wl_other,
        "train_tokens": int(train_ids.shape[0]),
        "heldout_tokens": int(held_ids.shape[0]),
        "vocab_kept_ids": int(kept.shape[0]),
        "oov_id": oov,
        "train_oov_frac": float((lut[train_ids] == oov).mean()),
    }
    return QualityData(
        train=windows(lut[train_ids], cfg.seq_len),
        heldout=torch.from_numpy(lut[held_w.numpy()]),
        heldout_source=held_w,
        other=windows(lut[other_held[:need]], cfg.seq_len),
        fit_ids=torch.from_numpy(lut[train_ids]),
        info=info,
    )


def data_order(num_windows: int, steps: int, batch_seqs: int, seed: int) -> torch.Tensor:
    """[steps, B] training window indices: seeded permutations, epoch after epoch (the same for
    every router)."""
    gen = torch.Generator().manual_seed(seed)
    need = steps * batch_seqs
    perms = [torch.randperm(num_windows, generator=gen) for _ in range(-(-need // num_windows))]
    return torch.cat(perms)[:need].view(steps, batch_seqs)


# --------------------------------------------------------------------------------------------
# Routers, training and evaluation
# --------------------------------------------------------------------------------------------


def build_layer_routers(spec: Spec, cfg: QualityConfig) -> tuple[Callable[[int], Router], list[str]]:
    """A factory ``layer -> router`` (seed + layer, so layers draw independently) and notes.

    The shared top_k / capacity_factor mean what they mean in every command (``bench.spec``): a
    router with a fixed K keeps its own, a router without capacity ignores the factor (noted)."""
    notes = Notes()
    opts = router_options(
        spec, experts=cfg.experts, seed=cfg.seed, top_k=cfg.top_k, capacity_factor=cfg.capacity_factor, notes=notes
    )
    build_router(spec.name, **opts)  # a bad option is refused now, with its reason
    own = {k: v for k, v in opts.items() if k != "seed"}
    return (lambda layer: build_router(spec.name, **own, seed=cfg.seed + layer)), notes.said


def check_routers(specs: list[Spec], cfg: QualityConfig) -> None:
    """Refuse a K or capacity factor that no router of ``specs`` can take (one that only some cannot
    take makes their error rows); unknown names and options are refused as they are built."""
    errors = []
    for spec in specs:
        try:
            build_layer_routers(spec, cfg)
        except RoutingError as exc:
            errors.append(f"{spec.label}: {exc}")
    if errors and len(errors) == len(specs):
        raise RoutingError(f"no router of --routers can run with these options ({'; '.join(errors)})")


def model_bytes(cfg: QualityConfig) -> int:
    """The least the model needs in float32: its parameters (the embedding, tied to the output, the
    attention and the experts), each with a gradient and AdamW's two moments, and one step's output
    logits with their gradient."""
    d, f, e = cfg.width, ffn_width(cfg.width, cfg.lm_config().ffn_ratio), cfg.experts
    params = cfg.vocab * d + cfg.seq_len * d + cfg.layers * (4 * d * d + d * (e + 1) + 3 * e * d * f)
    return 16 * params + 8 * cfg.batch_seqs * cfg.seq_len * cfg.vocab


def build_model(
    spec: Spec, cfg: QualityConfig, data: QualityData, device: torch.device
) -> tuple[TinyMoELM, GateShape, list[str]]:
    """(model on device, gate shape, notes): one router per layer, fitted where it learns from
    data (on the training slice's ids; the logits of that fit batch are zeros: the gate is not
    trained yet, and the built-in fit reads token ids only)."""
    make, notes = build_layer_routers(spec, cfg)
    shape = probe_router(lambda: make(0), cfg.experts, cfg.width)
    routers = [make(layer) for layer in range(cfg.layers)]
    for r in routers:
        if wants_fit(r):
            n = data.fit_ids.shape[0]
            r.fit(Batch(torch.zeros(n, cfg.experts), data.fit_ids.clone()))
    model = TinyMoELM(cfg.lm_config(), routers, shape, cfg.backend).to(device)
    return model, shape, notes


def lr_at(step: int, cfg: QualityConfig) -> float:
    """Linear warm-up over the first 10% of steps (at most 50), then cosine down to 10% of lr."""
    warm = max(1, min(50, cfg.steps // 10))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    frac = (step - warm) / max(1, cfg.steps - warm)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


@dataclass
class TrainResult:
    model: TinyMoELM
    shape: GateShape
    steps: list[dict[str, Any]]  # one per (step, layer)
    seconds: float  # forward + backward + optimiser + router update, device-synchronised
    tokens: int
    gate_grad: bool  # whether any gate weight received a non-zero gradient
    notes: list[str]
    top_k: float  # of the last plan (the mean choices per token the capacity formula used)
    capacity: int | None  # of the last plan; None when dropless
    looks_at_whole_batch: bool


def train(
    spec: Spec,
    cfg: QualityConfig,
    data: QualityData,
    device: torch.device,
    progress: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train the tiny LM with ``spec``'s router for ``cfg.steps`` steps (AdamW, clipped at 1.0).
    Loss: next-token cross-entropy + aux_coef * the layers' mean aux loss (where defined)."""
    model, shape, notes = build_model(spec, cfg, data, device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.01)
    order = data_order(data.train.shape[0], cfg.steps, cfg.batch_seqs, cfg.seed)
    train_w = data.train.to(device)
    rows: list[dict[str, Any]] = []
    seconds, gate_grad = 0.0, False
    plans = []
    for step in range(cfg.steps):
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        win = train_w[order[step].to(device)]
        step_s: list[float] = []
        with stopwatch(device, step_s):
            logits_BSV, plans, _ = model(win[:, :-1])
            loss = F.cross_entropy(logits_BSV.reshape(-1, cfg.vocab), win[:, 1:].reshape(-1))
            aux = aux_loss_mean(plans)
            total = loss if aux is None or cfg.aux_coef == 0 else loss + cfg.aux_coef * aux
            opt.zero_grad(set_to_none=True)
            total.backward()
            if not gate_grad:
                gate_grad = any(g.weight.grad is not None and bool(g.weight.grad.any()) for g in model.gates())
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            with torch.no_grad():
                for router, plan in zip(model.routers, plans, strict=True):
                    router.update(plan)
        dt = step_s[0]
        seconds += dt
        loss_v = float(loss.detach())
        if not math.isfinite(loss_v):
            raise FloatingPointError(f"training loss is {loss_v} at step {step}")
        for layer, plan in enumerate(plans):
            metrics, _ = batch_metrics(plan)
            rows.append({"step": step, "layer": layer, "loss": loss_v, "lr": lr, "step_seconds": dt, **metrics})
        if progress and (step + 1) % max(1, cfg.steps // 4) == 0:
            progress(f"{spec.label}: step {step + 1}/{cfg.steps} loss {loss_v:.3f} ({seconds:.1f} s)")
    last = plans[-1]
    return TrainResult(
        model=model,
        shape=shape,
        steps=rows,
        seconds=seconds,
        tokens=cfg.steps * cfg.batch_seqs * cfg.seq_len,
        gate_grad=gate_grad,
        notes=notes,
        top_k=float(last.top_k),
        capacity=last.capacity,
        looks_at_whole_batch=bool(last.looks_at_whole_batch),
    )


@dataclass
class EvalResult:
    loss: float  # mean next-token loss over every target (nats per token)
    loss_in_vocab: float  # the same over targets that are not the OOV id
    oov_frac: float  # share of targets that are the OOV id
    tokens: int
    seconds: float
    per_batch: list[dict[str, float]]  # one per (batch, layer)
    logits_by_layer: list[torch.Tensor] | None  # [N, columns] per layer, when asked for


@torch.no_grad()
def evaluate(
    model: TinyMoELM, win: torch.Tensor, batch_seqs: int, device: torch.device, keep_logits: bool = False
) -> EvalResult:
    """Next-token loss over windows [N, S + 1], in batches of ``batch_seqs`` (the training batch
    size, so capacities match training). Routers are not updated. The OOV id is ``vocab - 1``."""
    oov = model.cfg.vocab - 1
    total, total_iv, count, count_iv, seconds = 0.0, 0.0, 0, 0, 0.0
    per_batch: list[dict[str, float]] = []
    kept: list[list[torch.Tensor]] = [[] for _ in model.blocks]
    for start in range(0, win.shape[0] - batch_seqs + 1, batch_seqs):
        w = win[start : start + batch_seqs].to(device)
        batch_s: list[float] = []
        with stopwatch(device, batch_s):
            logits_BSV, plans, router_logits = model(w[:, :-1])
            target_T = w[:, 1:].reshape(-1)
            loss_T = F.cross_entropy(logits_BSV.reshape(-1, logits_BSV.shape[-1]), target_T, reduction="none")
        seconds += batch_s[0]
        in_vocab_T = target_T != oov
        total += float(loss_T.sum())
        total_iv += float(loss_T[in_vocab_T].sum())
        count += target_T.numel()
        count_iv += int(in_vocab_T.sum())
        per_batch.extend(batch_metrics(p)[0] for p in plans)
        if keep_logits:
            for layer, lg in enumerate(router_logits):
                kept[layer].append(lg.float().cpu())
    if count == 0:
        raise ValueError(f"evaluation needs at least batch_seqs = {batch_seqs} windows (got {win.shape[0]})")
    return EvalResult(
        loss=total / count,
        loss_in_vocab=total_iv / count_iv if count_iv else math.nan,
        oov_frac=1 - count_iv / count,
        tokens=count,
        seconds=seconds,
        per_batch=per_batch,
        logits_by_layer=[torch.cat(k) for k in kept] if keep_logits else None,
    )
