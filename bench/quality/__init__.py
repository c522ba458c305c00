"""Routing quality: train the same tiny MoE language model with each router and compare."""
