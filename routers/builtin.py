"""Importing this module registers every built-in router."""

from . import dense, expert_choice, gshard, hashing, hierarchical, switch, topk  # noqa: F401
