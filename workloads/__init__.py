"""workloads/: produce batches (router logits [T, E], token ids [T], sequence ids [T], hidden
states [T, D] on request), deterministic for a seed, plus a separate fit slice per workload.

Shape letters: T tokens, D hidden size, E experts, V vocabulary.

Built-ins: synthetic families (uniform, zipf, hot, drift, correlated, adversarial), real tokens
(code: the Python standard library; text: the Debian Reference in 11 languages) with a seeded probe
gate, and trace (replays router logits captured from a Hugging Face MoE model).
"""

from .base import (
    MissingSourceError,
    Parts,
    Workload,
    WorkloadConfig,
    WorkloadError,
    config_from_options,
)
from .registry import (
    ENTRY_POINT_GROUP,
    build_workload,
    get_workload_class,
    list_workloads,
    load_plugin,
    loaded_plugins,
    register_workload,
    workload_names,
    workload_options,
)
from .synthetic import UniformConfig, UniformWorkload

__all__ = [
    "ENTRY_POINT_GROUP",
    "MissingSourceError",
    "Parts",
    "UniformConfig",
    "UniformWorkload",
    "Workload",
    "WorkloadConfig",
    "WorkloadError",
    "build_workload",
    "config_from_options",
    "get_workload_class",
    "list_workloads",
    "load_plugin",
    "loaded_plugins",
    "register_workload",
    "workload_names",
    "workload_options",
]
