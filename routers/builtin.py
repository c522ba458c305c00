"""Importing this module registers every built-in router."""

from . import switch, topk  # noqa: F401
