"""Microbenchmarks: dispatch-kernel cases, the cost of routing, and the one prepared GPU check."""
