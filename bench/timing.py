"""Timing helpers, defined once: device synchronisation and the best available device."""

from __future__ import annotations

import torch


def sync(device: str | torch.device) -> None:
    """Wait for queued device work, so a wall-clock interval covers it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA when present, else CPU; `cuda` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA GPU (use auto or cpu)")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be one of auto, cpu, cuda (got {device!r})")
    return torch.device(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
