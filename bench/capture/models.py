"""``moe-bench capture``: record the router logits of every MoE layer of a Hugging Face model.

    moe-bench capture --model PATH_OR_ID --workload text --lang en --tokens 8192 --out trace.parquet
    moe-bench route --router all --workload trace --workload-opt path=trace.parquet --workload-opt layer=3

The model is loaded from a local folder (``save_pretrained``) or the local Hugging Face cache,
never downloaded (``local_files_only``), from safetensors weights only (no pickled checkpoints),
without ``trust_remote_code``. ``transformers`` is the optional extra ``capture``.

Finding the gates: a model class declares where its router logits come from
(``_can_record_outputs["router_logits"]``: the router module's class and which output holds the
logits; transformers >= 5). Failing that (older releases, custom models), a module named ``gate``
or ``router`` inside a module whose class name says MoE / Sparse is taken: an ``nn.Linear`` (its
output is the logits), or a router holding a ``classifier`` Linear (Switch, NLLB-MoE). A forward
hook on each copies the logits; MoE layers are numbered in module order, keeping those that fired
(an encoder-decoder model runs its encoder only, so its decoder gates are not recorded).

Tokens: with ``--tokenizer model`` (default when the model folder has a tokenizer and the workload
has text), the workload's documents are tokenised by the model's own tokenizer. Otherwise the
workload's ids are fed remapped as ``id % vocab_size`` (``source_token`` keeps the original), which
is what the tests do with a tiny random model. Sequences of ``--seq-len`` tokens, the last one
shorter, are fed ``--batch-size`` at a time without padding. The file format is in
``workloads/trace.py``.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moe_routing_bench.routers.contract import RoutingError
from moe_routing_bench.workloads.base import Workload
from moe_routing_bench.workloads.real import TokenStreamWorkload
from moe_routing_bench.workloads.trace import write_trace

_MOE_PARENT = re.compile(r"moe|sparse|mixture|expert", re.I)


@dataclass
class Gate:
    """One MoE layer's router: where it sits and how to read its logits from its output."""

    name: str
    module: torch.nn.Module
    index: int | None  # position of the logits in a tuple output; None: the output is the logits


def _transformers():
    try:
        import transformers
    except ImportError:
        raise RoutingError(
            "capture needs the PyPI package transformers: pip install 'moe-routing-bench[capture]'"
        ) from None
    return transformers


def find_gates(model: torch.nn.Module) -> list[Gate]:
    """The router of every MoE layer, in module order (see the module docstring)."""
    targets: list[tuple[type | None, str | None, int, str | None]] = []
    for m in model.modules():
        spec = getattr(type(m), "_can_record_outputs", None)
        rec = spec.get("router_logits") if isinstance(spec, dict) else None
        if rec is None:
            continue
        if isinstance(rec, type):
            targets.append((rec, None, 0, None))
        else:
            targets.append(
                (
                    getattr(rec, "target_class", None),
                    getattr(rec, "class_name", None),
                    int(getattr(rec, "index", 0) or 0),
                    getattr(rec, "layer_name", None),
                )
            )
    gates: list[Gate] = []
    if targets:
        for name, mod in model.named_modules():
            for cls, cls_name, index, layer_name in targets:
                hit = (cls is not None and isinstance(mod, cls)) or (
                    cls_name is not None and type(mod).__name__.endswith(cls_name)
                )
                if hit and (layer_name is None or name.endswith(layer_name)):
                    gates.append(Gate(name, mod, index))
                    break
    if gates:
        return gates
    modules = dict(model.named_modules())
    for name, mod in modules.items():
        parent_name, _, leaf = name.rpartition(".")
        parent = modules.get(parent_name)
        if leaf not in ("gate", "router") or parent is None or not _MOE_PARENT.search(type(parent).__name__):
            continue
        if isinstance(mod, torch.nn.Linear):
            gates.append(Gate(name, mod, None))
        elif isinstance(getattr(mod, "classifier", None), torch.nn.Linear):
            gates.append(Gate(f"{name}.classifier", mod.classifier, None))
    return gates


def _logits_of(output: Any, index: int | None) -> torch.Tensor:
    out = output if index is None or isinstance(output, torch.Tensor) else output[index]
    if not isinstance(out, torch.Tensor):
        raise RoutingError(f"a router returned {type(out).__name__} where logits were expected")
    return out.detach().float().reshape(-1, out.shape[-1]).cpu()


def load_model(model_id: str, dtype: str, device: torch.device):
    """The model (eval mode) and its config, from local files only, safetensors weights only."""
    tf = _transformers()
    tf.utils.logging.set_verbosity_error()
    tf.utils.logging.disable_progress_bar()
    kw: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
    try:
        config = tf.AutoConfig.from_pretrained(model_id, **kw)
    except OSError as exc:
        raise RoutingError(
            f"--model {model_id!r}: no local model found (capture never downloads; pass a folder written by "
            f"save_pretrained, or a hub id already in the local cache): {str(exc).splitlines()[0]}"
        ) from None
    major_minor = tuple(int(x) for x in re.findall(r"\d+", tf.__version__)[:2])
    dtype_key = "dtype" if major_minor >= (4, 56) else "torch_dtype"
    if dtype != "auto":
        kw[dtype_key] = getattr(torch, dtype)
    auto = tf.AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else tf.AutoModelForCausalLM
    try:
        model = auto.from_pretrained(model_id, use_safetensors=True, **kw)
    except (OSError, ValueError) as exc:
        raise RoutingError(
            f"--model {model_id!r}: could not load safetensors weights ({str(exc).splitlines()[0]})"
        ) from None
    return model.to(device).eval(), config


def capture_logits(
    model: torch.nn.Module,
    config: Any,
    token_N: np.ndarray,
    seq_len: int,
    batch_size: int,
    device: torch.device,
) -> tuple[list[Gate], list[np.ndarray], np.ndarray, np.ndarray]:
    """Run the model over ``token_N`` cut into sequences; returns (gates that fired, logits per
    gate [N, E] float32, seq ids [N], positions [N])."""
    gates = find_gates(model)
    if not gates:
        raise RoutingError(
            f"found no MoE router in {type(model).__name__} (looked for the router class in "
            "`_can_record_outputs['router_logits']`, then modules named gate/router inside MoE blocks)"
        )
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(gates))}
    handles = []
    for i, g in enumerate(gates):

        def hook(_mod, _inp, out, i=i, index=g.index):
            seen[i].append(_logits_of(out, index))

        handles.append(g.module.register_forward_hook(hook))
    n = int(token_N.shape[0])
    starts = list(range(0, n, seq_len))
    lengths = [min(seq_len, n - s) for s in starts]
    runner = model.get_encoder() if getattr(config, "is_encoder_decoder", False) else model
    try:
        with torch.inference_mode():
            # Same-length sequences go together, in order; the last, shorter one runs alone.
            i = 0
            while i < len(starts):
                j = i
                while j < len(starts) and j - i < batch_size and lengths[j] == lengths[i]:
                    j += 1
                ids = np.stack([token_N[starts[k] : starts[k] + lengths[k]] for k in range(i, j)])
                input_ids = torch.from_numpy(ids.astype(np.int64)).to(device)
                kwargs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
                if runner is model:
                    kwargs["use_cache"] = False
                runner(**kwargs)
                i = j
    finally:
        for h in handles:
            h.remove()
    fired = [i for i in range(len(gates)) if seen[i]]
    logits = []
    for i in fired:
        rows = torch.cat(seen[i])
        if rows.shape[0] != n:
            raise RoutingError(f"router {gates[i].name} gave {rows.shape[0]} rows of logits for {n} tokens")
        logits.append(rows.numpy())
    if not fired:
        raise RoutingError("no MoE router ran during the forward passes")
    seq_N = np.repeat(np.arange(len(starts)), lengths)
    pos_N = np.concatenate([np.arange(length) for length in lengths])
    return [gates[i] for i in fired], logits, seq_N, pos_N


def _tokens(
    workload: Workload, model_id: str, config: Any, num_tokens: int, mode: str, num_experts: int
) -> tuple[np.ndarray, np.ndarray, str]:
    """(ids fed to the model [N], the workload's ids or -1 [N], how they were made)."""
    tf = _transformers()
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    tokenizer = None
    if mode in ("auto", "model") and isinstance(workload, TokenStreamWorkload):
        try:
            tokenizer = tf.AutoTokenizer.from_pretrained(model_id, local_files_only=True)
        except Exception as exc:
            if mode == "model":
                raise RoutingError(f"--tokenizer model: {model_id!r} has no usable tokenizer ({exc})") from None
    elif mode == "model":
        raise RoutingError(f"--tokenizer model needs a text workload (code or text), not {workload.name!r}")
    if tokenizer is not None:
        ids: list[int] = []
        eos = tokenizer.eos_token_id
        for doc in workload.source().documents():
            ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
            if eos is not None:
                ids.append(int(eos))
            if len(ids) >= num_tokens:
                break
        if len(ids) < num_tokens:
            raise RoutingError(f"the {workload.name} corpus gives only {len(ids)} model tokens (asked {num_tokens})")
        token_N = np.asarray(ids[:num_tokens], dtype=np.int64)
        return (
            token_N,
            np.full(num_tokens, -1, dtype=np.int64),
            f"model tokenizer ({type(tokenizer).__name__})",
        )
    if isinstance(workload, TokenStreamWorkload):
        stream = workload.streams()[0]
        source = stream[np.arange(num_tokens) % stream.shape[0]]
        how = f"{workload.config.encoding} ids from the workload"
    else:
        source = next(workload.batches(num_tokens, num_experts, 1)).token_T.numpy()
        how = f"token ids of the {workload.name} workload"
    if vocab < 1:
        raise RoutingError("the model config has no vocab_size to remap token ids into")
    return source % vocab, source.astype(np.int64), f"{how}, remapped id % vocab_size ({vocab})"


def capture_trace(
    model_id: str,
    workload: Workload,
    out_path: str | Path,
    *,
    num_tokens: int,
    seq_len: int,
    batch_size: int,
    tokenizer_mode: str,
    dtype: str,
    device: torch.device,
) -> tuple[int, int, list[int], str, str]:
    """Run the model over the workload's tokens, write the trace; returns (layers, tokens, the
    layers' E values, the model class, how the tokens were made)."""
    for label, v in (("--tokens", num_tokens), ("--seq-len", seq_len), ("--batch-size", batch_size)):
        if v < 1:
            raise RoutingError(f"{label} must be >= 1 (got {v})")
    out = Path(out_path)
    if not out.parent.is_dir():
        raise RoutingError(f"--out {out}: the directory {str(out.parent)!r} does not exist")
    dev = device
    model, config = load_model(model_id, dtype, dev)
    num_experts = int(getattr(config, "num_local_experts", 0) or getattr(config, "num_experts", 0) or 8)
    token_N, source_N, how = _tokens(workload, model_id, config, num_tokens, tokenizer_mode, num_experts)
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and min(seq_len, num_tokens) > limit:
        raise RoutingError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings = {limit}")
    gates, logits, seq_N, pos_N = capture_logits(model, config, token_N, seq_len, batch_size, dev)
    tf = _transformers()
    meta = {
        "model": model_id,
        "model_class": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "top_k": getattr(config, "num_experts_per_tok", None),
        "layers": [
            {"index": i, "module": g.name, "num_experts": int(x.shape[1])}
            for i, (g, x) in enumerate(zip(gates, logits, strict=True))
        ],
        "tokens": int(token_N.shape[0]),
        "seq_len": int(pos_N.max()) + 1,  # the sequences' length as fed (--seq-len, or fewer tokens)
        "tokenizer": how,
        "vocab_size": getattr(config, "vocab_size", None),
        "workload": workload.describe(),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "device": str(dev),
        "torch_version": torch.__version__,
        "transformers_version": tf.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    write_trace(out, token_N, seq_N, pos_N, source_N, logits, meta)
    es = sorted({int(x.shape[1]) for x in logits})
    return len(gates), int(token_N.shape[0]), es, type(model).__name__, how
