"""workloads/: produce batches (router logits [T, E], token ids [T], optional sequence ids and
hidden states), deterministic for a seed."""

from .synthetic import UniformConfig, UniformWorkload

__all__ = ["UniformConfig", "UniformWorkload"]
