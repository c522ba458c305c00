"""The columns of every table a run writes: the header all tables start with, the row of one
configuration (its settings, stage times, memory, bandwidth and routing metrics), per-expert loads
and the drop breakdown. ``bench.record`` writes and reads them; reports and compare read the names.
"""

from __future__ import annotations

import pyarrow as pa

from moe_routing_bench.bench.metrics import METRICS

# Timed stages of one step; "other" is total minus the stages before it (the step's time that no
# stage accounts for: Python between stages, the autograd engine's own work, allocation).
STAGES = ("route", "dispatch", "experts", "combine", "shared", "backward", "other", "total")
TIMED_STAGES = STAGES[:6]

# The header every table of every kind of run starts with: which run, which configuration, when,
# which harness (commit), which machine and versions, the seed and the full config as JSON.
HEADER: list[tuple[str, pa.DataType]] = [
    ("run_id", pa.string()),
    ("config_id", pa.string()),
    ("timestamp", pa.string()),
    ("git_commit", pa.string()),
    ("device", pa.string()),
    ("device_name", pa.string()),
    ("torch_version", pa.string()),
    ("triton_version", pa.string()),
    ("seed", pa.int64()),
    ("config_json", pa.string()),
    ("plugins", pa.string()),
]
_STATUS_COLUMNS: list[tuple[str, pa.DataType]] = [("status", pa.string()), ("error", pa.string())]
_CONFIG_COLUMNS: list[tuple[str, pa.DataType]] = [
    ("router", pa.string()),
    ("router_name", pa.string()),
    ("workload", pa.string()),
    ("workload_name", pa.string()),
    ("tokens", pa.int64()),
    ("experts", pa.int64()),
    ("top_k", pa.float64()),
    ("capacity_factor", pa.float64()),
    ("capacity", pa.int64()),
    ("hidden", pa.int64()),
    ("ffn", pa.int64()),
    ("backend", pa.string()),
    ("backend_ran", pa.string()),
    ("layout", pa.string()),
    ("dtype", pa.string()),
    ("mode", pa.string()),
    ("repeats", pa.int64()),
    ("looks_at_whole_batch", pa.bool_()),
    ("model", pa.string()),
    ("ffn_kind", pa.string()),
    ("shared_ffn", pa.int64()),
    ("reuse_buffers", pa.bool_()),
]
_MEASURE_COLUMNS: list[tuple[str, pa.DataType]] = [
    *[(f"time_{s}_{q}", pa.float64()) for s in STAGES for q in ("median", "p20", "p80")],
    ("tokens_per_s", pa.float64()),
    ("peak_mem_bytes", pa.float64()),
    ("mem_kind", pa.string()),
    ("dispatch_buffer_bytes", pa.float64()),
    ("kept_rows", pa.float64()),
    ("permute_bytes", pa.float64()),
    ("combine_bytes", pa.float64()),
    ("permute_gbps", pa.float64()),
    ("combine_gbps", pa.float64()),
    ("copy_gbps", pa.float64()),
    ("permute_copy_ratio", pa.float64()),
    ("combine_copy_ratio", pa.float64()),
    ("expert_tflops", pa.float64()),
    ("expert_path", pa.string()),
    ("workspace_bytes", pa.float64()),
]
_METRIC_COLUMNS: list[tuple[str, pa.DataType]] = [
    col for m in METRICS for col in ((m, pa.float64()), (f"{m}_se", pa.float64()))
]

ROW_SCHEMA = pa.schema(HEADER + _STATUS_COLUMNS + _CONFIG_COLUMNS + _MEASURE_COLUMNS + _METRIC_COLUMNS)
LOADS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("config_id", pa.string()),
        ("router", pa.string()),
        ("workload", pa.string()),
        ("batch", pa.int64()),
        ("expert", pa.int64()),
        ("requested", pa.int64()),
        ("kept", pa.int64()),
    ]
)


BREAKDOWN_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("config_id", pa.string()),
        ("router", pa.string()),
        ("workload", pa.string()),
        ("kind", pa.string()),  # "frequency" or "position"
        ("bucket", pa.string()),  # frequent/middle/rare, or q1..q4 of the position in the sequence
        ("tokens", pa.int64()),
        ("token_share", pa.float64()),
        ("requests", pa.int64()),
        ("drop_rate", pa.float64()),
        ("tokens_dropped_frac", pa.float64()),
    ]
)
TABLES = {"loads": LOADS_SCHEMA, "breakdown": BREAKDOWN_SCHEMA}
