"""The ``native`` dispatch backend: permute and combine as C kernels for the CPU, with autograd.

Same signatures and results as ``torch_backend`` (``permute(x_TD, d, layout)``, ``combine(y, d,
layout)``, layouts 'compact' and 'padded'); only the forward data movement differs:

- permute walks the kept assignments in request order and copies each token row to its buffer
  row (``moe_scatter_rows``): token rows are read nearly in sequence, and above
  ``STREAM_MIN_BYTES`` the buffer is written with non-temporal stores, which skip reading each
  destination line before writing it. Any dtype (rows are copied as bytes).
- positions (the dispatch build) is one counting pass in priority order (``moe_positions``).
- combine builds token-major lists with a counting sort (``moe_csr_by_token``, O(N), no
  comparison sort) and writes each token's gated sum once (``moe_gather_sum_f32``), float32,
  products and sums in priority order. float32 only: other dtypes go to ``torch_backend.combine``.

Backward runs torch ops (an ``index_add_`` for permute; a row gather and a row-wise dot for
combine): gradients agree with the torch backend's to float tolerance.

The C source (``native_kernels.c``, shipped with the package) is compiled on first use with the
system C compiler (``$CC``, else cc, gcc or clang) into a shared library cached under
``$MOE_BENCH_CACHE_DIR`` (default ``~/.cache/moe-routing-bench``), keyed by the source, the
compiler and this CPU, and loaded with ctypes: no torch headers, no build step at install. Where no
compiler works the backend is unavailable and says why (``runtime_error``).

Shape letters: T tokens, D hidden, E experts, C capacity, N kept assignments, M buffer rows.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from . import torch_backend
from .backend import Backend
from .dispatch import LAYOUTS, Dispatch, analytic_buffer_bytes, check_layout
from .positions import check_expert_ids
from .torch_backend import _check_x, _check_y, zero_unused_slots
from .workspace import Workspace

SOURCE = Path(__file__).with_name("native_kernels.c")
# Buffers at least this large are written with non-temporal stores: they would not stay in cache
# anyway (the development machine's L3 is 32 MiB), while a smaller buffer is better left cached
# for the expert matmul that reads it next.
STREAM_MIN_BYTES = 16 << 20
# Below this many bytes per thread, one thread (starting a thread costs about 20 us).
_BYTES_PER_THREAD = 1 << 20
_FLAG_SETS = (
    ["-O3", "-march=native", "-std=c11", "-fPIC", "-shared", "-pthread", "-ffp-contract=off"],
    ["-O3", "-std=c11", "-fPIC", "-shared", "-pthread", "-ffp-contract=off"],
)


def cache_dir() -> Path:
    """Where compiled libraries are kept: ``$MOE_BENCH_CACHE_DIR``, else ``~/.cache/moe-routing-bench``."""
    root = os.environ.get("MOE_BENCH_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moe-routing-bench"


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc) or cc
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _cpu_identity() -> str:
    """This CPU's model and feature flags (a library built with -march=native runs only on those)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features", "CPU part"))]
    return "\n".join(sorted(set(keep)))


def _compile(cc: str, flags: list[str], out: Path) -> str | None:
    """Compile SOURCE into ``out`` (atomically); None on success, else the compiler's complaint."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
    except OSError as exc:
        return f"cannot write {out.parent}: {exc}"
    try:
        proc = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            return (proc.stderr or proc.stdout).strip()[-500:] or f"exit status {proc.returncode}"
        os.replace(tmp, out)
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str | None]:
    """(the loaded library, None), or (None, why it cannot be built or loaded here)."""
    cc = _compiler()
    if cc is None:
        return None, "native backend needs a C compiler (cc, gcc or clang on PATH, or $CC); none was found"
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"native backend: the C compiler {cc} does not run ({type(exc).__name__}: {exc})"
    errors = []
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home: keep the library beside other temporary files
        folder = Path(tempfile.gettempdir()) / f"moe-routing-bench-{os.getuid() if hasattr(os, 'getuid') else 0}"
    for flags in _FLAG_SETS:
        key = hashlib.sha256(
            "\0".join([SOURCE.read_text(), cc, version, " ".join(flags), platform.machine(), _cpu_identity()]).encode()
        ).hexdigest()[:20]
        path = folder / f"native-{key}.so"
        if not path.exists():
            err = _compile(cc, flags, path)
            if err is not None:
                errors.append(f"{' '.join(flags)}: {err}")
                continue
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as exc:
            errors.append(f"{path}: {exc}")
            continue
        _declare(lib)
        return lib, None
    return None, f"native backend: {cc} could not build {SOURCE.name}: " + " | ".join(errors)


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.moe_scatter_rows.argtypes = [p, p, p, p, i64, i64, c_int, c_int]
    lib.moe_scatter_rows.restype = None
    lib.moe_csr_by_token.argtypes = [p, p, p, i64, i64, p, p, p]
    lib.moe_csr_by_token.restype = None
    lib.moe_gather_sum_f32.argtypes = [p, p, p, p, p, i64, i64, c_int, c_int]
    lib.moe_gather_sum_f32.restype = None
    lib.moe_positions.argtypes = [p, i64, i64, p, p]
    lib.moe_positions.restype = None


def runtime_error(device: torch.device | str) -> str | None:
    """Why the native backend cannot run on ``device`` here, or None when it can."""
    if torch.device(device).type != "cpu":
        return "native backend runs on CPU tensors only (on a GPU use 'triton' or 'torch')"
    return _library()[1]


def _lib(device: torch.device) -> ctypes.CDLL:
    reason = runtime_error(device)
    if reason is not None:
        raise ValueError(reason)
    lib = _library()[0]
    assert lib is not None
    return lib


def _threads(nbytes: int) -> int:
    return max(1, min(torch.get_num_threads(), nbytes // _BYTES_PER_THREAD))


def _buffer_rows(d: Dispatch, layout: str) -> tuple[torch.Tensor, int]:
    """Each kept assignment's buffer row, and the buffer's row count M."""
    if layout == "compact":
        return d.row_N, d.num_kept
    return d.slot_N, d.num_experts * d.padded_capacity


# ---------------------------------------------------------------------------------------------
# Forward kernels on plain tensors (no autograd)


def positions(expert_R: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``kernels.positions.positions``'s contract as one counting pass (``moe_positions``): the
    same ranks and loads, bit for bit; the dispatch of this backend is built with it."""
    check_expert_ids(expert_R, num_experts)
    lib = _lib(expert_R.device)
    r = expert_R.shape[0]
    ids = expert_R.contiguous()
    rank_R = torch.empty(r, dtype=torch.int64)
    counts_E = torch.empty(num_experts, dtype=torch.int64)
    lib.moe_positions(ids.data_ptr(), r, num_experts, rank_R.data_ptr(), counts_E.data_ptr())
    return rank_R, counts_E


def _scatter(buf_MD: torch.Tensor, x_TD: torch.Tensor, d: Dispatch, layout: str) -> torch.Tensor:
    """Fill buf_MD [M, D] (contiguous) with the kept token rows; unused padded slots zero."""
    rows_N, _ = _buffer_rows(d, layout)
    lib = _lib(x_TD.device)
    n, row_bytes = d.num_kept, buf_MD.shape[1] * buf_MD.element_size()
    if layout == "padded":
        zero_unused_slots(buf_MD, d)
    if n and row_bytes:
        x, token_N, rows_N = x_TD.contiguous(), d.token_N.contiguous(), rows_N.contiguous()
        nbytes = n * row_bytes
        lib.moe_scatter_rows(
            buf_MD.data_ptr(),
            x.data_ptr(),
            token_N.data_ptr(),
            rows_N.data_ptr(),
            n,
            row_bytes,
            _threads(nbytes),
            int(nbytes >= STREAM_MIN_BYTES),
        )
    return buf_MD


def _csr(d: Dispatch, layout: str, weight_N: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """ptr_T1 [T + 1], rows_N (buffer rows) and w_N (float32 gates), token-major."""
    lib = _lib(d.device)
    rows_in, _ = _buffer_rows(d, layout)
    n, t = d.num_kept, d.num_tokens
    w_in = weight_N.detach().to(torch.float32).contiguous()
    ptr = torch.empty(t + 1, dtype=torch.int64)
    rows = torch.empty(n, dtype=torch.int64)
    w = torch.empty(n, dtype=torch.float32)
    token = d.token_N.contiguous()
    rows_in = rows_in.contiguous()
    lib.moe_csr_by_token(
        token.data_ptr(), rows_in.data_ptr(), w_in.data_ptr(), n, t, ptr.data_ptr(), rows.data_ptr(), w.data_ptr(),
    )  # fmt: skip
    return ptr, rows, w


def _gather_sum(out_TD: torch.Tensor, y_MD: torch.Tensor, d: Dispatch, layout: str, weight_N: torch.Tensor) -> None:
    """out_TD [T, D] float32 (contiguous) = each token's gated sum of its kept rows of y_MD."""
    lib = _lib(y_MD.device)
    ptr, rows, w = _csr(d, layout, weight_N)
    t, dim = out_TD.shape
    if t == 0 or dim == 0:
        return
    y = y_MD.contiguous()
    nbytes = out_TD.numel() * 4
    lib.moe_gather_sum_f32(
        out_TD.data_ptr(), y.data_ptr(), ptr.data_ptr(), rows.data_ptr(), w.data_ptr(), t, dim,
        _threads(nbytes + d.num_kept * dim * 4), int(nbytes >= STREAM_MIN_BYTES),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Autograd


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, d: Dispatch, layout: str) -> torch.Tensor:
        _, m = _buffer_rows(d, layout)
        buf = _scatter(torch.empty((m, x_TD.shape[1]), dtype=x_TD.dtype, device=x_TD.device), x_TD, d, layout)
        ctx.d, ctx.layout = d, layout
        return buf

    @staticmethod
    def backward(ctx, grad_MD: torch.Tensor):
        d = ctx.d
        rows_N, _ = _buffer_rows(d, ctx.layout)
        grad_x = grad_MD.new_zeros((d.num_tokens, grad_MD.shape[1]))
        grad_x.index_add_(0, d.token_N, grad_MD.index_select(0, rows_N))
        return grad_x, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_MD: torch.Tensor, weight_N: torch.Tensor, d: Dispatch, layout: str) -> torch.Tensor:
        out = torch.empty((d.num_tokens, y_MD.shape[1]), dtype=torch.float32, device=y_MD.device)
        _gather_sum(out, y_MD, d, layout, weight_N)
        ctx.save_for_backward(y_MD, weight_N)
        ctx.d, ctx.layout = d, layout
        return out

    @staticmethod
    def backward(ctx, grad_TD: torch.Tensor):
        y_MD, weight_N = ctx.saved_tensors
        d = ctx.d
        rows_N, m = _buffer_rows(d, ctx.layout)
        grad_rows = grad_TD.index_select(0, d.token_N)  # [N, D]: each kept row's token gradient
        grad_y = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_y = grad_TD.new_zeros((m, y_MD.shape[1])) if d.num_kept < m else grad_TD.new_empty((m, y_MD.shape[1]))
            grad_y.index_copy_(0, rows_N, grad_rows * weight_N.to(grad_rows.dtype)[:, None])
        if ctx.needs_input_grad[1]:
            grad_w = (grad_rows * y_MD.index_select(0, rows_N)).sum(1).to(weight_N.dtype)
        return grad_y, grad_w, None, None


# ---------------------------------------------------------------------------------------------
# The backend interface


def permute(x_TD: torch.Tensor, d: Dispatch, layout: str = "compact") -> torch.Tensor:
    """Copy kept token rows into an expert-major buffer, as ``torch_backend.permute``: compact
    x_ND [N, D] or padded x_ECD [E, C, D] (unused slots zero), same dtype; exact copies."""
    check_layout(layout, LAYOUTS)
    _check_x(x_TD, d)
    _lib(x_TD.device)
    buf = _Permute.apply(x_TD, d, layout)
    return buf if layout == "compact" else buf.view(d.num_experts, d.padded_capacity, x_TD.shape[1])


def combine(y: torch.Tensor, d: Dispatch, layout: str = "compact") -> torch.Tensor:
    """Gate-weighted sum of expert outputs back to tokens, as ``torch_backend.combine``: out_TD
    [T, D] in y's dtype. float32 runs the C kernel; other dtypes run ``torch_backend.combine``."""
    check_layout(layout, LAYOUTS)
    _check_y(y, d, layout)
    _lib(y.device)
    if y.dtype != torch.float32:
        return torch_backend.combine(y, d, layout)
    return _Combine.apply(y.reshape(-1, y.shape[-1]), d.weight_N, d, layout)


def permute_into(x_TD: torch.Tensor, d: Dispatch, layout: str, ws: Workspace) -> torch.Tensor:
    """``permute`` writing into a reused buffer (forward only, no autograd): the same rows."""
    check_layout(layout, LAYOUTS)
    _check_x(x_TD, d)
    _, m = _buffer_rows(d, layout)
    buf = _scatter(ws.take("permute", (m, x_TD.shape[1]), x_TD.dtype, x_TD.device), x_TD, d, layout)
    return buf if layout == "compact" else buf.view(d.num_experts, d.padded_capacity, x_TD.shape[1])


def combine_into(y: torch.Tensor, d: Dispatch, layout: str, ws: Workspace) -> torch.Tensor:
    """``combine`` writing into a reused [T, D] buffer (forward only, no autograd)."""
    check_layout(layout, LAYOUTS)
    _check_y(y, d, layout)
    if y.dtype != torch.float32:
        return torch_backend.combine_into(y, d, layout, ws)
    out = ws.take("combine", (d.num_tokens, y.shape[-1]), torch.float32, y.device)
    _gather_sum(out, y.reshape(-1, y.shape[-1]), d, layout, d.weight_N)
    return out


BACKEND = Backend(
    name="native",
    description="C kernels for the CPU (streaming row scatter, counting-sort CSR gather-sum), compiled on first use",
    layouts=LAYOUTS,
    permute=permute,
    combine=combine,
    buffer_bytes=analytic_buffer_bytes,
    unavailable=runtime_error,
    positions=positions,
    permute_into=permute_into,
    combine_into=combine_into,
)
