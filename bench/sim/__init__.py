"""The cluster simulator: one expert-parallel step on thousands of devices, modelled from real plans."""
