"""Trace capture: record the router logits of a Hugging Face MoE model as a ``trace`` workload file."""
