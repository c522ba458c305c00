"""Importing this module registers every built-in router."""

from . import dense, expert_choice, gshard, hashing, hierarchical, sinkhorn, switch, topk, topp  # noqa: F401
