"""One prepared GPU check of the Triton dispatch kernels: tests, then a bandwidth benchmark.

    make gpu-check                    # on the GPU host: python3 with torch + triton, no internet
    make gpu-check ARGS=--dry-run     # anywhere: the same steps under triton's interpreter on CPU
    python -m moe_routing_bench.bench.microbench.gpu_check [--dry-run] [--out DIR] [--budget-s 200]

Steps, in one process tree, with nothing installed and nothing fetched:

1. Environment: device, torch, triton, numpy versions, git commit.
2. The ``gpu``-marked tests (tests/gpu/) in their own pytest process, compiled (TRITON_INTERPRET
   unset there); without pytest, the same checks run through ``check`` below.
3. Benchmark: permute and combine, forward and backward (and positions), torch reference vs
   triton, over T in {4096, 32768, 131072}, D in {1024, 4096}, E in {8, 64, 256}, K in {1, 2, 8},
   bf16, compact (dropless) then padded (cf 1.25). Each case is first checked (triton against a
   float32 torch reference on the same values) and then timed with ``triton.testing.do_bench``
   (CUDA events, L2 flushed between repeats; median, p20, p80); GB/s from
   ``bench.kernel_bench.bytes_moved``; ``copy_ratio`` = the time of a device-to-device copy of
   the same bytes, measured in the same run, over the op's time (1.0 = copy speed).
4. Real model layers (``bench.models``: each preset's own router and layer through the harness's
   ``measure_point``, bf16, forward, triton and torch backends) and the dispatch round trip beside
   the peers' (``bench.microbench.peers``: Megatron-core, vLLM where importable), each peer
   checked equal to ours before it is timed (``gpu_presets``).
5. Results under ``--out`` (default ``$OUT``, else results/gpu/<date>): results.parquet,
   presets.parquet, peers.parquet (CSV when pyarrow is missing), table.txt (also printed last),
   gpu_tests.log, env.json.

``--budget-s`` (default 200, counted from the start, tests included) stops starting new kernel
cases once spent: small cases and the compact layout run first, so a cut run still covers every
shape family; the cases left become rows with status=skipped. ``--presets-budget-s`` (default
120) does the same for the presets. A whole run fits in about 7 minutes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GRID = {"tokens": (4096, 32768, 131072), "hidden": (1024, 4096), "experts": (8, 64, 256), "top_k": (1, 2, 8)}
# The dry run rehearses every step at a size the interpreter runs in seconds.
DRY_GRID = {"tokens": (64,), "hidden": (48,), "experts": (7,), "top_k": (2,)}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU under TRITON_INTERPRET=1")
    p.add_argument("--out", default=None, help="output folder (default $OUT, else results/gpu/<date>)")
    p.add_argument("--budget-s", type=float, default=200.0, help="start no kernel case after this many seconds")
    p.add_argument("--presets-budget-s", type=float, default=120.0, help="start no preset after this many seconds more")
    p.add_argument("--layouts", default="compact,padded", help="compact (dropless) and/or padded (cf 1.25)")
    p.add_argument("--skip-tests", action="store_true", help="benchmark only")
    return p.parse_args(argv)


def _out_dir(args: argparse.Namespace) -> Path:
    if args.out:
        return Path(args.out)
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return ROOT / "results" / ("gpu-dry" if args.dry_run else "gpu") / stamp


def _environment(device) -> dict[str, object]:
    import numpy
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = ""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})"
    return {
        "time": dt.datetime.now().isoformat(timespec="seconds"),
        "device": name,
        "torch": torch.__version__,
        "triton": triton_version,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "commit": commit or "unknown",
        "interpreter": os.environ.get("TRITON_INTERPRET", "0"),
    }


def _run_gpu_tests(out: Path, dry: bool) -> str:
    """Run tests/gpu in its own pytest process, compiled; return a one-line summary."""
    try:
        import pytest  # noqa: F401
    except ImportError:
        return "pytest missing: the benchmark's per-case checks stand in for the gpu tests"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/gpu"]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False, timeout=600)
    log = res.stdout + res.stderr
    (out / "gpu_tests.log").write_text(log)
    tail = [line for line in log.strip().splitlines() if line.strip()][-1:] or ["(no output)"]
    if res.returncode == 0:
        status = "passed"
    elif dry and res.returncode == 5:  # no CUDA: the module skips, nothing runs, as rehearsed
        status = "skipped (no CUDA)"
    else:
        status = f"FAILED (exit {res.returncode})"
    return f"gpu tests {status} in {time.perf_counter() - t0:.0f} s: {tail[0]}"


def _timer(device):
    """(median, p20, p80) seconds of fn over repeats after warm-up (``bench.timing``: CUDA events
    on a GPU, a synchronised wall clock on CPU); few repeats in the CPU rehearsal."""
    from moe_routing_bench.bench.timing import quantiles, time_calls

    repeats, warmup = (25, 5) if device.type == "cuda" else (2, 1)
    return lambda fn: quantiles(time_calls(fn, device, repeats, warmup))


def _cases(dry: bool, layouts: list[str]):
    from moe_routing_bench.bench.microbench.kernel_cases import Case

    grid = DRY_GRID if dry else GRID
    # Small first: a run cut by its budget still covers every shape family.
    sizes = sorted(
        itertools.product(grid["tokens"], grid["hidden"], grid["experts"], grid["top_k"]),
        key=lambda p: (p[0] * p[1] * p[3], p),
    )
    for layout in layouts:
        for t, d, e, k in sizes:
            yield Case(t, d, e, k, layout=layout, cf=None if layout == "compact" else 1.25)


def _fits(case, device) -> str | None:
    """Refuse a case whose tensors (with torch's float32 temporaries) would not fit the device."""
    import torch

    if device.type != "cuda":
        return None
    n = case.tokens * case.top_k
    rows = n if case.layout == "compact" else int(n * 1.25) + case.experts
    # x, grad_TD, out (T rows); y, grad_buf, buffers and grads (about 6 M rows); f32 temporaries.
    need = (3 * case.tokens + 6 * rows) * case.hidden * 2 + 3 * n * case.hidden * 4
    free, _ = torch.cuda.mem_get_info(device)
    return None if need < 0.8 * free else f"needs ~{need / 2**30:.0f} GiB of {free / 2**30:.0f} GiB free"


def benchmark(device, dry: bool, layouts: list[str], deadline: float, env: dict) -> list[dict]:
    import torch

    from moe_routing_bench.bench.microbench.kernel_cases import bytes_moved, check, copy_fn, make_fn, setup

    timer = _timer(device)
    rows: list[dict] = []
    seen_positions: set[tuple[int, int, int]] = set()
    for case in _cases(dry, layouts):
        base = {**case.as_row(), **{k: env[k] for k in ("device", "torch", "triton", "commit")}}
        ops = [("permute", "fwd"), ("permute", "bwd"), ("combine", "fwd"), ("combine", "bwd")]
        key = (case.tokens, case.experts, case.top_k)
        if case.layout == "compact" and key not in seen_positions:
            seen_positions.add(key)
            ops.insert(0, ("positions", "fwd"))
        reason = "time budget spent" if time.perf_counter() > deadline else _fits(case, device)
        if reason:
            rows += [{**base, "op": o, "direction": di, "status": "skipped", "error": reason} for o, di in ops]
            continue
        try:
            s = setup(case, device)
            for op, direction in ops:
                nbytes = bytes_moved(op, direction, s)
                verdict = check(op, direction, s)
                copy_t = timer(copy_fn(nbytes, device))
                row = {
                    **base,
                    "op": op,
                    "direction": direction,
                    "bytes": nbytes,
                    "check": verdict,
                    "copy_s": copy_t[0],
                    "copy_GBps": nbytes / copy_t[0] / 1e9,
                    "status": "ok",
                    "error": "",
                }
                for provider in ("torch", "triton"):
                    med, p20, p80 = timer(make_fn(provider, op, direction, s))
                    row[f"{provider}_s"], row[f"{provider}_p20_s"], row[f"{provider}_p80_s"] = med, p20, p80
                    row[f"{provider}_GBps"] = nbytes / med / 1e9
                    row[f"{provider}_copy_ratio"] = copy_t[0] / med
                row["speedup"] = row["torch_s"] / row["triton_s"]
                if verdict != "ok":
                    row["status"] = "mismatch"
                rows.append(row)
            del s
        except Exception as exc:  # one failing case is a row, not the end of the run
            rows.append(
                {
                    **base,
                    "op": "?",
                    "direction": "?",
                    "status": "error",
                    "error": f"{type(exc).__name__}: {exc}",
                }
            )
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _table(rows: list[dict]) -> str:
    head = (
        f"{'layout':<8}{'T':>7}{'D':>6}{'E':>5}{'K':>3}  {'op':<10}{'dir':<4}{'MB':>9} {'torch GB/s':>10}"
        f" {'triton GB/s':>11} {'copy GB/s':>10} {'trit/copy':>9} {'speedup':>8}  check"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["status"] not in ("ok", "mismatch"):
            continue
        lines.append(
            f"{r['layout']:<8}{r['tokens']:>7}{r['hidden']:>6}{r['experts']:>5}{r['top_k']:>3}  "
            f"{r['op']:<10}{r['direction']:<4}{r['bytes'] / 1e6:>9.3g} {r['torch_GBps']:>10.4g}"
            f" {r['triton_GBps']:>11.4g} {r['copy_GBps']:>10.4g} {r['triton_copy_ratio']:>9.3g}"
            f" {r['speedup']:>8.3g}  {r['check']}"
        )
    bad = [r for r in rows if r["status"] in ("error", "mismatch")]
    skipped = sum(r["status"] == "skipped" for r in rows)
    ok = [r for r in rows if r["status"] == "ok"]
    if ok:
        for op in ("permute", "combine", "positions"):
            sel = [r for r in ok if r["op"] == op]
            if sel:
                med = {
                    c: statistics.median(r[c] for r in sel)
                    for c in ("triton_copy_ratio", "torch_copy_ratio", "speedup")
                }
                lines.append(
                    f"{op}: median triton/copy {med['triton_copy_ratio']:.2f}, torch/copy "
                    f"{med['torch_copy_ratio']:.2f}, speedup over torch {med['speedup']:.2f}x "
                    f"({len(sel)} rows)"
                )
    lines.append(f"rows: {len(ok)} ok, {len(bad)} mismatch/error, {skipped} skipped")
    lines += [
        f"  {r['status']}: {r['layout']} T={r['tokens']} D={r['hidden']} E={r['experts']} "
        f"K={r['top_k']} {r['op']} {r['direction']}: {r.get('error') or r.get('check')}"
        for r in bad[:20]
    ]
    return "\n".join(lines)


def _write(rows: list[dict], out: Path, name: str = "results") -> Path:
    import pandas as pd

    frame = pd.DataFrame(rows)
    try:
        path = out / f"{name}.parquet"
        frame.to_parquet(path, index=False)
    except ImportError:  # no pyarrow: CSV keeps the run usable
        path = out / f"{name}.csv"
        frame.to_csv(path, index=False)
    return path


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.dry_run:
        # Before anything imports kernels.triton_*: triton picks interpreter vs compiler per kernel
        # at decoration time.
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    t0 = time.perf_counter()
    out = _out_dir(args)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu" if args.dry_run else "cuda")
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU visible to torch; use --dry-run to rehearse on CPU", file=sys.stderr)
        return 2
    env = _environment(device)
    (out / "env.json").write_text(json.dumps(env, indent=2))
    print("gpu-check:", ", ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    tests = "gpu tests skipped (--skip-tests)" if args.skip_tests else _run_gpu_tests(out, args.dry_run)
    print(tests, flush=True)
    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    rows = benchmark(device, args.dry_run, layouts, t0 + args.budget_s, env)
    path = _write(rows, out)
    table = _table(rows)
    print(table, flush=True)
    # Real model layers and the peers' dispatch, after the kernels (their own budget).
    from moe_routing_bench.bench.microbench.gpu_presets import peer_rows, preset_rows

    extra = {
        "presets": preset_rows(device, args.dry_run, time.perf_counter() + args.presets_budget_s),
        "peers": peer_rows(device, args.dry_run),
    }
    lines = [tests, table]
    for name, part in extra.items():
        stamped = [{**r, **{k: env[k] for k in ("device", "torch", "triton", "commit")}} for r in part]
        _write(stamped, out, name)
        lines.append(_rows_text(name, part))
    (out / "table.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[2:]))
    print(f"gpu-check: {len(rows)} kernel rows -> {path} ({time.perf_counter() - t0:.0f} s)")
    every = rows + extra["presets"] + extra["peers"]
    failed = "FAILED" in tests or any(r["status"] in ("error", "mismatch") for r in every)
    return 1 if failed else 0


def _rows_text(name: str, rows: list[dict]) -> str:
    """One line per row of the presets or peers table."""
    out = [f"{name}:"]
    for r in rows:
        if r["status"] != "ok":
            out.append(f"  {r.get('model') or r.get('provider')} {r.get('backend', '')}: {r['status']}: {r['error']}")
        elif name == "presets":
            out.append(
                f"  {r['model']:<16} {r['backend']:<7} T={r['tokens']} {r['tokens_per_s']:>12,.0f} tok/s, "
                f"experts {r['time_experts_median'] * 1e3:.2f} ms "
                f"({r['expert_tflops']:.1f} TFLOP/s, {r['expert_path']}), "
                f"dispatch {r['time_dispatch_median'] * 1e3:.2f} ms, combine {r['time_combine_median'] * 1e3:.2f} ms"
            )
        else:
            out.append(f"  {r['provider']:<16} {r['seconds'] * 1e3:9.3f} ms {r['GBps']:8.1f} GB/s")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
