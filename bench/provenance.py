"""Provenance: which harness and which machine a run came from.

``git_commit`` is the harness's own: the checkout the package is imported from (with ``-dirty``
when tracked files changed), or the installed version when the package is not a checkout (a
wheel), whatever the working directory. ``machine_info`` is the host, Python and library versions.
Every run's meta.json and every row header carry both (``bench.record``).
"""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

# The folder holding bench/, routers/, kernels/ and workloads/: a checkout's root, or the installed
# package's folder (site-packages/moe_routing_bench).
PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    """The harness's own provenance: the commit of the checkout this package was imported from,
    with ``-dirty`` when tracked files differ from it; the installed version when the package is
    not a checkout (a wheel). Never the working directory's repository."""
    root = PACKAGE_ROOT
    try:
        top = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--show-toplevel"], capture_output=True, text=True, timeout=10
        )
        if top.returncode == 0 and Path(top.stdout.strip()).resolve() == root:
            out = subprocess.run(
                ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            dirty = subprocess.run(
                ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            if out.returncode == 0:
                return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return f"moe-routing-bench {metadata.version('moe-routing-bench')} (installed)"
    except metadata.PackageNotFoundError:
        return "unknown"


def machine_info() -> dict[str, Any]:
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # triton is optional off Linux
        triton_version = "absent"
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_version": torch.__version__,
        "triton_version": triton_version,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
