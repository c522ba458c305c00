"""Traces of real MoE routers: the Parquet format, and the ``trace`` workload that replays one.

A trace is written by ``moe-bench capture`` (bench/capture.py) and is Parquet, never a pickle.
Long format over layers, one row per (MoE layer, token), one row group per layer, rows in
(layer, seq, pos) order:

    layer         int32          MoE layer index, 0 = the first MoE layer in module order
    seq           int64          sequence id (the model saw each sequence as one input row)
    pos           int32          position of the token in its sequence
    token         int64          the id the model was fed
    source_token  int64          the workload's id before any remapping (-1 when the model's own
                                 tokenizer produced ``token``)
    logits        list<float32>  the router's logits over that layer's E experts, as the gate
                                 module returned them (before softmax or top-k)

The schema metadata key ``moe_bench.trace`` holds a JSON object: ``format``
("moe-bench-trace"), ``version``, ``model``, ``model_type``, ``layers`` (a list of
``{"index", "module", "num_experts"}``), ``tokens``, ``seq_len``, ``tokenizer``, ``workload``,
versions and the capture time.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from .base import MissingSourceError, Parts, Workload, WorkloadConfig, WorkloadError, check_int
from .real import split_blocks, warn_wrap
from .registry import register_workload

TRACE_FORMAT = "moe-bench-trace"
TRACE_VERSION = 1
META_KEY = b"moe_bench.trace"
TRACE_COLUMNS = ("layer", "seq", "pos", "token", "source_token", "logits")


def write_trace(
    path: str | Path,
    token_N: np.ndarray,
    seq_N: np.ndarray,
    pos_N: np.ndarray,
    source_token_N: np.ndarray,
    logits_by_layer: list[np.ndarray],
    meta: dict[str, Any],
) -> None:
    """Write a trace: ``logits_by_layer[l]`` is [N, E_l] float32 for the N tokens, in token order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = int(token_N.shape[0])
    info = {"format": TRACE_FORMAT, "version": TRACE_VERSION, **meta}
    schema = pa.schema(
        [
            ("layer", pa.int32()),
            ("seq", pa.int64()),
            ("pos", pa.int32()),
            ("token", pa.int64()),
            ("source_token", pa.int64()),
            ("logits", pa.list_(pa.float32())),
        ],
        metadata={META_KEY: json.dumps(info).encode()},
    )
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with pq.ParquetWriter(tmp, schema) as writer:
        for layer, logits_NE in enumerate(logits_by_layer):
            logits_NE = np.ascontiguousarray(logits_NE, dtype=np.float32)
            if logits_NE.ndim != 2 or logits_NE.shape[0] != n:
                raise WorkloadError(f"trace layer {layer}: logits must be [N = {n}, E] (got {logits_NE.shape})")
            e = logits_NE.shape[1]
            offsets = pa.array(np.arange(0, n * e + 1, e, dtype=np.int32))
            logits = pa.ListArray.from_arrays(offsets, pa.array(logits_NE.reshape(-1)))
            cols = [
                pa.array(np.full(n, layer, dtype=np.int32)),
                pa.array(seq_N.astype(np.int64)),
                pa.array(pos_N.astype(np.int32)),
                pa.array(token_N.astype(np.int64)),
                pa.array(source_token_N.astype(np.int64)),
                logits,
            ]
            writer.write_table(pa.Table.from_arrays(cols, schema=schema))
    tmp.replace(path)


def read_trace_meta(path: str | Path) -> dict[str, Any]:
    """The trace's metadata (see the module docstring); refuses files that are not traces."""
    import pyarrow.parquet as pq

    p = Path(path)
    if not p.is_file():
        raise MissingSourceError(f"trace: path {str(path)!r} is not a file (write one with moe-bench capture)")
    try:
        schema = pq.read_schema(p)
    except Exception as exc:
        raise WorkloadError(f"trace: {str(path)!r} is not a Parquet file ({exc})") from None
    raw = (schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise WorkloadError(f"trace: {str(path)!r} is not a moe-bench trace (no {META_KEY.decode()} metadata)")
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise WorkloadError(f"trace: {str(path)!r} has damaged {META_KEY.decode()} metadata ({exc})") from None
    if not isinstance(meta, dict):
        raise WorkloadError(f"trace: {str(path)!r} metadata must be a JSON object (got {type(meta).__name__})")
    if meta.get("format") != TRACE_FORMAT or meta.get("version") != TRACE_VERSION:
        raise WorkloadError(
            f"trace: {str(path)!r} has format {meta.get('format')!r} version {meta.get('version')!r}; "
            f"this harness reads {TRACE_FORMAT!r} version {TRACE_VERSION}"
        )
    missing = [c for c in TRACE_COLUMNS if c not in schema.names]
    if missing:
        raise WorkloadError(f"trace: {str(path)!r} lacks the columns {missing} of the trace format")
    layers = meta.get("layers")
    if not isinstance(layers, list) or not layers:
        raise WorkloadError(f"trace: {str(path)!r} metadata must list its MoE layers (got layers = {layers!r})")
    for i, layer in enumerate(layers):
        e = layer.get("num_experts") if isinstance(layer, dict) else None
        if isinstance(e, bool) or not isinstance(e, int) or e < 1:
            raise WorkloadError(
                f"trace: {str(path)!r} metadata layers[{i}].num_experts must be an integer >= 1 (got {e!r})"
            )
    return meta


def read_trace_layer(path: str | Path, layer: int) -> dict[str, np.ndarray]:
    """One layer's rows: ``token``, ``seq``, ``pos``, ``source_token`` [N] and ``logits`` [N, E]."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    meta = read_trace_meta(path)
    layers = meta["layers"]
    if not 0 <= layer < len(layers):
        raise WorkloadError(f"trace: layer must be between 0 and {len(layers) - 1} (got {layer})")
    table = pq.read_table(path, filters=[("layer", "=", layer)])
    e = int(layers[layer]["num_experts"])
    logits = table.column("logits").combine_chunks()
    lengths = pc.list_value_length(logits).to_numpy(zero_copy_only=False)
    if lengths.size and not (lengths == e).all():
        raise WorkloadError(f"trace: layer {layer} rows must hold {e} logits each")
    out = {k: table.column(k).to_numpy() for k in ("token", "seq", "pos", "source_token")}
    out["logits"] = logits.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, e)
    return out


@dataclass(frozen=True, kw_only=True)
class TraceConfig(WorkloadConfig):
    """path: a trace written by `moe-bench capture`. layer: which MoE layer to replay (0 = first).
    fit_every: every n-th captured sequence is the fit slice (0: none). offset: first measured
    token of batch 0. seq_len is unused: sequences are the captured ones."""

    workload: ClassVar[str] = "trace"
    path_fields: ClassVar[tuple[str, ...]] = ("path",)
    path: str = ""
    layer: int = 0
    fit_every: int = 10
    offset: int = 0

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.path, str) or not self.path:
            raise WorkloadError("trace: path is required (--workload-opt path=trace.parquet)")
        check_int(self, "layer", low=0)
        if self.fit_every != 0:
            check_int(self, "fit_every", low=2)
        check_int(self, "offset", low=0)


@register_workload("trace")
class TraceWorkload(Workload):
    """Replay a captured MoE router's logits (with the token ids it saw), one layer of a trace."""

    config_cls = TraceConfig
    config: TraceConfig

    def __init__(self, config: TraceConfig | None = None, **options: Any) -> None:
        super().__init__(config, **options)
        self.meta = read_trace_meta(self.config.path)  # refuses a bad path or layer up front
        n_layers = len(self.meta["layers"])
        if self.config.layer >= n_layers:
            raise WorkloadError(f"trace: layer must be between 0 and {n_layers - 1} (got {self.config.layer})")
        self._rows: dict[str, np.ndarray] | None = None

    @property
    def num_experts_fixed(self) -> int:
        return int(self.meta["layers"][self.config.layer]["num_experts"])

    def rows(self) -> dict[str, np.ndarray]:
        if self._rows is None:
            self._rows = read_trace_layer(self.config.path, self.config.layer)
        return self._rows

    def generate(self, num_tokens, num_experts, num_batches, fit, hidden_dim) -> Iterator[Parts]:
        rows = self.rows()
        # Blocks are the captured sequences, numbered in order of appearance.
        _, block_N = np.unique(rows["seq"], return_inverse=True)
        run_idx, fit_idx = split_blocks(block_N, self.config.fit_every)
        idx_all = fit_idx if fit else run_idx
        if idx_all.shape[0] == 0:
            n_seq = int(block_N.max()) + 1 if block_N.size else 0
            raise WorkloadError(
                f"trace: no {'fit slice' if fit else 'measured stream'}: the trace holds {n_seq} sequences "
                f"and fit_every = {self.config.fit_every}; capture more sequences, or set fit_every "
                "(0 replays every sequence, and routers that fit cannot run)"
            )
        start0 = 0 if fit else self.config.offset
        warn_wrap(idx_all.shape[0], start0 + num_tokens * num_batches, "the trace's stream")
        for b in range(num_batches):
            idx = idx_all[(start0 + b * num_tokens + np.arange(num_tokens)) % idx_all.shape[0]]
            yield Parts(
                torch.from_numpy(rows["logits"][idx]),
                torch.from_numpy(rows["token"][idx].astype(np.int64)),
                torch.from_numpy(rows["seq"][idx].astype(np.int64)),
            )
