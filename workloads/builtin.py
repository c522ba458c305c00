"""Importing this module registers every built-in workload."""

from . import real, synthetic, trace  # noqa: F401
