"""Hostile calls, as a new user would make them: a measurement script, not a test module.

Runs every call below as a fresh ``moe-bench`` process of the python that runs this script (so
``/tmp/base/.venv/bin/python tests/hostile_calls.py`` measures another checkout), and classifies
each outcome:

- ``traceback``: a Python traceback on stderr or stdout, or a process killed by a signal;
- ``silent-wrong``: the call looked fine (or said nothing about it) but the result is wrong: exit 0
  where it should refuse or fail, a meta.json status that is not true, rows lost or duplicated,
  output that misreports what ran;
- ``unclear``: refused or failed, but not in one line naming the parameter, or with another exit
  status than promised (2: bad input; 1: a run that failed);
- ``ok``.

    .venv/bin/python tests/hostile_calls.py [--only CATEGORY,...] [--json results.json] [-v]

Prints the table (category, calls, tracebacks, silent-wrong, unclear). Pytest does not collect it
(the name does not start with ``test_``); tests/bench/cli/test_hostile_calls.py holds the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

PY = sys.executable
SMALL = ["--tokens", "64", "--hidden", "8", "--experts", "4", "--repeats", "1"]
HUGE = "99999999999999999999"  # past int64
CALL_TIMEOUT = 240  # seconds: a call still running then has accepted what it cannot honour
TIMED_OUT = -996

PLUGIN = '''
import os, signal, time
from dataclasses import dataclass
import torch
from moe_routing_bench.routers.registry import register_router
from moe_routing_bench.routers.switch import SwitchConfig, SwitchRouter

@dataclass(frozen=True)
class BadConfig(SwitchConfig):
    bad: str = "ok"

@register_router("bad")
class Bad(SwitchRouter):
    """Switch whose plans break the contract on demand (hostile calls)."""
    config_cls = BadConfig

    def route(self, batch):
        plan = super().route(batch)
        how = os.environ.get("BAD_PLAN", self.config.bad)
        if how == "capacity": plan.capacity = -3
        elif how == "capacity0": plan.capacity = 0
        elif how == "capacity_float": plan.capacity = 2.5
        elif how == "nan": plan.weight_R = plan.weight_R * float("nan")
        elif how == "inf": plan.weight_R = plan.weight_R + float("inf")
        elif how == "negative": plan.weight_R = plan.weight_R - 2.0
        elif how == "token_high": plan.token_R = plan.token_R + plan.num_tokens
        elif how == "token_neg": plan.token_R = plan.token_R - plan.num_tokens
        elif how == "expert_high": plan.expert_R = plan.expert_R + plan.num_experts
        elif how == "expert_neg": plan.expert_R = plan.expert_R - plan.num_experts
        elif how == "num_tokens": plan.num_tokens = plan.num_tokens + 5
        elif how == "num_experts": plan.num_experts = plan.num_experts + 3
        elif how == "top_k": plan.top_k = float("nan")
        elif how == "aux_nan": plan.aux_loss = torch.tensor(float("nan"))
        elif how == "no_plan": return None
        elif how == "raise": raise RuntimeError("planted failure")
        elif how == "segv": os.kill(os.getpid(), signal.SIGSEGV)
        elif how == "sleep": time.sleep(0.3)
        return plan
'''


@dataclass
class Result:
    rc: int
    out: str
    err: str


@dataclass
class Call:
    category: str
    name: str
    args: list[str] | Callable[[Path], list[str]]
    exit: int | tuple[int, ...] = 2
    names: tuple[str, ...] = ()  # what the one error line must name (exit != 0)
    check: Callable[[Path, Result], str | None] | None = None  # None: right; else why it is wrong
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None  # relative to the work root
    fsize: int | Callable[[Path], int] | None = None  # RLIMIT_FSIZE bytes (a full disk)
    driver: Callable[[Path, Call], Result] | None = None  # signals, several steps
    one_line: bool = True


# ---------------------------------------------------------------------------------------------
# Running and reading back
# ---------------------------------------------------------------------------------------------


def moe(root: Path, args: list[str], env=None, cwd=None, fsize=None, timeout=CALL_TIMEOUT) -> Result:
    """One ``moe-bench`` process in its own session; on time-out the whole session is killed (its
    workers too) and the call is reported as not finishing."""

    def limit():
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a shell's background job inherits it ignored
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    full_env = {**os.environ, "MOE_BENCH_CACHE": str(root / "cache"), **(env or {})}
    proc = subprocess.Popen(
        [PY, "-m", "moe_routing_bench.bench.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
        cwd=cwd or (root / "cwd"),
        preexec_fn=limit,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return Result(TIMED_OUT, out, err + f"\n(did not finish in {timeout} s)")
    return Result(proc.returncode, out, err)


def runs_in(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.is_dir()) if out.is_dir() else []


def meta_of(run: Path) -> dict:
    try:
        return json.loads((run / "meta.json").read_text())
    except (OSError, ValueError):
        return {}


def rows_of(run: Path, table: str = "rows") -> list[dict]:
    """The readable row parts of the run's own configurations (meta's config_ids where it has them)."""
    ids = meta_of(run).get("config_ids")
    out = []
    for p in sorted((run / table).glob("*.parquet")):
        if ids is not None and p.stem not in ids:
            continue
        try:
            out.extend(pq.read_table(p).to_pylist())
        except Exception:
            out.append({"status": "unreadable", "config_id": p.stem})
    return out


def one_run(out: Path) -> Path | None:
    r = runs_in(out)
    return r[0] if len(r) == 1 else None


def status_is(out: Path, status: str, rows: int | None = None, row_status: str | None = None):
    def check(root: Path, res: Result) -> str | None:
        run = one_run(root / out)
        if run is None:
            return f"expected one run directory in {out}, found {len(runs_in(root / out))}"
        meta = meta_of(run)
        if meta.get("status") != status:
            return f"meta status {meta.get('status')!r}, expected {status!r}"
        got = rows_of(run)
        if rows is not None and len(got) != rows:
            return f"{len(got)} rows, expected {rows}"
        if rows is not None and len({r.get("config_id") for r in got}) != len(got):
            return "duplicate rows"
        if row_status is not None and any(r.get("status") != row_status for r in got):
            return f"row statuses {[r.get('status') for r in got]}, expected {row_status}"
        return None

    return check


def no_run_left(out: str):
    def check(root: Path, res: Result) -> str | None:
        left = runs_in(root / out)
        if left and any(meta_of(r).get("status") == "running" for r in left):
            return "left a run directory whose meta says running"
        return None

    return check


def all_of(*checks):
    def check(root: Path, res: Result) -> str | None:
        for c in checks:
            why = c(root, res)
            if why:
                return why
        return None

    return check


def stderr_has(*needles: str):
    def check(root: Path, res: Result) -> str | None:
        missing = [n for n in needles if n not in res.err]
        return f"stderr lacks {missing}" if missing else None

    return check


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


def write_trace_file(path: Path, metadata: bytes | None = None, experts: int = 8, seqs: int = 4) -> None:
    """A small trace in the documented format; ``metadata`` replaces its moe_bench.trace JSON."""
    rng = np.random.default_rng(0)
    n = seqs * 64
    meta = {
        "format": "moe-bench-trace",
        "version": 1,
        "model": "hostile",
        "model_type": "hostile",
        "layers": [{"index": 0, "module": "m.gate", "num_experts": experts}],
        "tokens": n,
        "seq_len": 64,
    }
    raw = metadata if metadata is not None else json.dumps(meta).encode()
    logits = rng.standard_normal((n, experts)).astype(np.float32)
    table = pa.table(
        {
            "layer": pa.array(np.zeros(n, dtype=np.int32)),
            "seq": pa.array(np.repeat(np.arange(seqs), 64).astype(np.int64)),
            "pos": pa.array(np.tile(np.arange(64), seqs).astype(np.int32)),
            "token": pa.array(rng.integers(0, 1000, n).astype(np.int64)),
            "source_token": pa.array(np.full(n, -1, dtype=np.int64)),
            "logits": pa.ListArray.from_arrays(
                pa.array(np.arange(0, n * experts + 1, experts, dtype=np.int32)), pa.array(logits.reshape(-1))
            ),
        }
    )
    pq.write_table(table.replace_schema_metadata({b"moe_bench.trace": raw}), path)


def prepare(root: Path) -> None:
    fx = root / "fx"
    for d in ("cwd", "cwdA", "cwdB", "fx", "o", "ro"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (fx / "bad.py").write_text(PLUGIN)
    write_trace_file(fx / "trace.parquet")
    write_trace_file(root / "cwdA" / "t.parquet")
    for name, raw in {
        "meta_not_json": b"{not json",
        "meta_list": b"[1, 2]",
        "meta_no_layers": json.dumps({"format": "moe-bench-trace", "version": 1}).encode(),
        "meta_empty_layers": json.dumps({"format": "moe-bench-trace", "version": 1, "layers": []}).encode(),
        "meta_bad_experts": json.dumps(
            {"format": "moe-bench-trace", "version": 1, "layers": [{"index": 0, "num_experts": "abc"}]}
        ).encode(),
        "meta_layers_str": json.dumps({"format": "moe-bench-trace", "version": 1, "layers": "x"}).encode(),
    }.items():
        write_trace_file(fx / f"{name}.parquet", raw)
    (fx / "not_parquet.parquet").write_text("hello")
    (fx / "afile").write_text("x")
    tomls = {
        "empty": "",
        "comments": "# nothing here\n",
        "sweep5": "sweep = 5\n",
        "defaults5": "defaults = 5\n",
        "sweep_empty": "sweep = []\n",
        "sweep_strs": 'sweep = ["a"]\n',
        "tokens_abc": '[defaults]\ntokens = "abc"\n',
        "ffn_x": '[defaults]\nffn_ratio = "x"\n',
        "warmup_neg": "[defaults]\nwarmup = -1\n",
        "seed_neg": "[defaults]\nseed = -1\n",
        "device_tpu": '[defaults]\ndevice = "tpu"\n',
        "tokens_huge": f"[defaults]\ntokens = [{HUGE}]\n",
        "bad_syntax": "[defaults\n",
        "unknown_key": "[defaults]\nroutrs = ['switch']\n",
    }
    for name, text in tomls.items():
        (fx / f"{name}.toml").write_text(text)
    (fx / "sleepy.toml").write_text(
        '[defaults]\nrouters = [{ name = "bad", opts = { bad = "sleep" } }]\nworkloads = ["uniform"]\n'
        "capacity_factor = [0.5, 1.0, 1.5, 2.0, 3.0, 4.0]\n"
    )
    # A finished two-configuration sweep, copied by the resume calls; and another sweep's part.
    base = moe(root, ["run", "--routers", "switch,topk", "--capacity-factor", "1.0", *SMALL, "--out", str(fx / "base")])
    assert base.rc == 0, base.err
    other = moe(root, ["run", "--routers", "gshard", *SMALL, "--out", str(fx / "other")])
    assert other.rc == 0, other.err
    # A sweep with an error row (the plugin raises while BAD_PLAN=raise), for --retry-errors.
    errs = moe(
        root,
        ["run", "--routers", "bad,switch", "--plugin", str(fx / "bad.py"), *SMALL, "--out", str(fx / "errs")],
        env={"BAD_PLAN": "raise"},
    )
    assert errs.rc == 0, errs.err
    # The same command as the full-disk calls, to size meta.json.
    sized = moe(root, ["run", "--routers", "switch", *SMALL, "--out", str(root / "o" / "sz")])
    assert sized.rc == 0, sized.err
    run = one_run(root / "o" / "sz")
    (fx / "meta_size").write_text(str((run / "meta.json").stat().st_size))
    sim = moe(root, ["simulate", "-G", "8", "-E", "8", "-T", "64", "-D", "64", "--out", str(fx / "sim")])
    assert sim.rc == 0, sim.err
    # A sweep whose plugin file is gone afterwards.
    shutil.copy(fx / "bad.py", fx / "gone.py")
    gone = moe(root, ["run", "--routers", "bad", "--plugin", str(fx / "gone.py"), *SMALL, "--out", str(fx / "gone")])
    assert gone.rc == 0, gone.err
    (fx / "gone.py").unlink()


def copy_run(root: Path, src: str, dst: str) -> Path:
    run = one_run(root / "fx" / src)
    target = root / "o" / dst / run.name
    shutil.copytree(run, target)
    return target


def resume_of(src: str, dst: str, prep: Callable[[Path], None] | None = None, extra: list[str] | None = None):
    def args(root: Path) -> list[str]:
        run = copy_run(root, src, dst)
        if prep:
            prep(run)
        return ["run", "--resume", str(run), *(extra or [])]

    return args


def truncate_part(run: Path) -> None:
    part = sorted((run / "rows").glob("*.parquet"))[0]
    data = part.read_bytes()
    part.write_bytes(data[: len(data) // 2])


def stray_part(run: Path) -> None:
    other = one_run(run.parents[2] / "fx" / "other")
    src = sorted((other / "rows").glob("*.parquet"))[0]
    shutil.copy(src, run / "rows" / src.name)


def drop_one_part(run: Path) -> None:
    sorted((run / "rows").glob("*.parquet"))[0].unlink()


def damage_meta(text: str):
    def prep(run: Path) -> None:
        (run / "meta.json").write_text(text)

    return prep


def blocks_meta(value):
    def prep(run: Path) -> None:
        meta = meta_of(run)
        meta["blocks"] = value
        (run / "meta.json").write_text(json.dumps(meta))

    return prep


# ---------------------------------------------------------------------------------------------
# Drivers: signals and multi-step calls
# ---------------------------------------------------------------------------------------------


def _popen(root: Path, args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [PY, "-m", "moe_routing_bench.bench.cli", *args],
        cwd=root / "cwd",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "MOE_BENCH_CACHE": str(root / "cache")},
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _wait_parts(out: Path, n: int, timeout: float = 120) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        run = one_run(out)
        if run is not None and len(list((run / "rows").glob("*.parquet"))) >= n:
            return True
        time.sleep(0.05)
    return False


def signal_driver(sig: int, parts: int = 1):
    def drive(root: Path, call: Call) -> Result:
        out = root / "o" / call.name
        args = ["run", "--config", str(root / "fx" / "sleepy.toml"), "--plugin", str(root / "fx" / "bad.py")]
        proc = _popen(root, [*args, *SMALL, "--out", str(out)])
        reached = _wait_parts(out, parts)
        if sig == signal.SIGKILL:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        o, e = proc.communicate(timeout=120)
        if not reached:
            return Result(-999, o, e + "\n(never reached the point to signal)")
        if sig != signal.SIGKILL:
            return Result(proc.returncode, o, e)
        res = moe(root, ["run", "--resume", str(one_run(out))])
        return res

    return drive


def report_truncated(root: Path) -> list[str]:
    run = copy_run(root, "base", "r5")
    truncate_part(run)
    return ["report", str(run), "--out", str(root / "o" / "r5-report")]


def relative_trace_resume(root: Path, call: Call) -> Result:
    """A sweep over a trace named by a relative path, resumed from another directory."""
    args = ["run", "--routers", "switch", "--workloads", "trace[path=t.parquet]", "--capacity-factor", "1.0,2.0"]
    args += ["--tokens", "64", "--hidden", "8", "--experts", "8", "--repeats", "1", "--out", "../o/r7"]
    first = moe(root, args, cwd=root / "cwdA")
    if first.rc != 0:
        return Result(-998, first.out, first.err)
    run = one_run(root / "o" / "r7")
    drop_one_part(run)
    return moe(root, ["run", "--resume", str(run)], cwd=root / "cwdB")


def merge_shards(root: Path, call: Call) -> Result:
    """Merge one of a sweep's two shards: incomplete, listing the missing configuration."""
    shards = root / "o" / "m1shards"
    for i in (0, 1):
        r = moe(
            root,
            [
                "run",
                "--routers",
                "switch,topk",
                "--capacity-factor",
                "1.0",
                *SMALL,
                "--shard",
                f"{i}/2",
                "--out",
                str(shards),
            ],
        )
        if r.rc != 0:
            return Result(-998, r.out, r.err)
    return moe(root, ["merge", str(runs_in(shards)[0]), "--out", str(root / "o" / "m1")])


# ---------------------------------------------------------------------------------------------
# The calls
# ---------------------------------------------------------------------------------------------


def o(name: str) -> str:
    return f"../o/{name}"


def plugin() -> list[str]:
    return ["--plugin", "../fx/bad.py"]


def calls() -> list[Call]:
    out: list[Call] = []
    add = out.append

    # -- status: meta.json says what happened ---------------------------------------------------
    small_switch = ["run", "--routers", "switch", *SMALL]
    add(
        Call(
            "status",
            "disk-full-on-a-part",
            [*small_switch, "--out", o("fs1")],
            exit=1,
            names=("rows",),
            fsize=16_000,
            check=status_is(Path("o/fs1"), "failed"),
        )
    )
    add(
        Call(
            "status",
            "disk-full-meta-grows",
            [*small_switch, "--out", o("fs2")],
            exit=1,
            names=("cannot write",),
            fsize=lambda root: int((root / "fx" / "meta_size").read_text()) - 25,
            check=status_is(Path("o/fs2"), "failed"),
        )
    )
    add(Call("status", "sigterm", [], exit=(130, 143), driver=signal_driver(signal.SIGTERM), one_line=False))
    add(Call("status", "sigint", [], exit=130, driver=signal_driver(signal.SIGINT), one_line=False))
    add(
        Call(
            "status",
            "kill-9-then-resume",
            [],
            exit=0,
            driver=signal_driver(signal.SIGKILL, parts=2),
            check=lambda root, res: status_is(Path("o/kill-9-then-resume"), "complete", rows=6)(root, res),
        )
    )
    sim = ["simulate", "-G", "8", "-E", "8", "-T", "64", "-D", "64"]
    add(
        Call(
            "status",
            "simulate-disk-full",
            [*sim, "--out", o("simfs")],
            exit=1,
            names=("sim.parquet",),
            fsize=2000,
            check=all_of(no_run_left("o/simfs")),
        )
    )
    q = ["quality", "--steps", "2", "--experts", "4", "--width", "16", "--heads", "2", "--vocab", "256"]
    q += ["--seq-len", "16", "--batch-seqs", "4", "--eval-batches", "2", "--device", "cpu"]
    add(
        Call(
            "status",
            "quality-disk-full",
            [*q, "--routers", "switch", "--out", o("qfs")],
            exit=1,
            names=("failed", "File too large"),
            fsize=6000,
            check=status_is(Path("o/qfs"), "failed"),
        )
    )

    # -- plan check: a broken plugin is one line naming router, field and value ---------------
    route_bad = ["route", *plugin(), "-T", "64", "-E", "8", "-B", "2", "--router"]
    for how, needles in {
        "capacity": ("capacity", "-3"),
        "capacity0": ("capacity", "0"),
        "capacity_float": ("capacity", "2.5"),
        "nan": ("weight_R", "nan"),
        "inf": ("weight_R", "inf"),
        "negative": ("weight_R", "-"),
        "token_high": ("token_R", "64"),
        "token_neg": ("token_R", "-"),
        "expert_high": ("expert_R", "8"),
        "expert_neg": ("expert_R", "-"),
        "num_tokens": ("num_tokens", "69"),
        "num_experts": ("num_experts", "11"),
        "top_k": ("top_k", "nan"),
        "aux_nan": ("aux_loss", "nan"),
        "no_plan": ("NoneType",),
    }.items():
        add(Call("plan", f"route-{how}", [*route_bad, f"bad[bad={how}]"], names=("bad", *needles)))
    for how, needles in {"capacity": ("capacity", "-3"), "nan": ("weight_R", "nan")}.items():
        add(
            Call(
                "plan",
                f"run-{how}",
                ["run", *plugin(), "--routers", f"bad[bad={how}],switch", *SMALL, "--out", o(f"plan-run-{how}")],
                exit=0,
                check=all_of(
                    status_is(Path(f"o/plan-run-{how}"), "complete", rows=2),
                    lambda root, res, how=how, needles=needles: _error_row(root / "o" / f"plan-run-{how}", needles),
                ),
            )
        )
        add(Call("plan", f"simulate-{how}", [*sim, *plugin(), "--router", f"bad[bad={how}]"], names=("bad", *needles)))
    add(
        Call(
            "plan",
            "run-segv",
            ["run", *plugin(), "--routers", "bad[bad=segv],switch", *SMALL, "--out", o("plan-run-segv")],
            exit=0,
            check=all_of(
                status_is(Path("o/plan-run-segv"), "complete", rows=2),
                lambda root, res: _error_row(root / "o" / "plan-run-segv", ("signal 11",)),
            ),
        )
    )
    ep = ["ep", "--nproc", "2", "-T", "32", "-E", "4", "-D", "8", "--repeats", "1"]
    add(
        Call(
            "plan",
            "ep-capacity",
            [*ep, *plugin(), "--router", "bad[bad=capacity],switch", "--out", o("plan-ep")],
            exit=1,
            one_line=False,
            check=lambda root, res: _error_row(root / "o" / "plan-ep", ("capacity", "-3"), other_ok=True),
        )
    )
    for how, needles in {"nan": ("weight_R", "nan"), "segv": ("signal 11",)}.items():
        add(
            Call(
                "plan",
                f"quality-{how}",
                [*q, *plugin(), "--routers", f"bad[bad={how}],switch", "--out", o(f"plan-q-{how}")],
                exit=1,
                one_line=False,
                check=lambda root, res, how=how, needles=needles: _quality_error_row(
                    root / "o" / f"plan-q-{how}", needles
                ),
            )
        )

    # -- provenance: the harness's own commit, whatever the working directory ------------------
    for where in ("cwdA", "cwd"):
        add(
            Call(
                "provenance",
                f"simulate-from-{where}",
                [*sim, "--out", f"../o/prov-{where}"],
                exit=0,
                cwd=where,
                check=lambda root, res, where=where: _provenance(root / "o" / f"prov-{where}"),
            )
        )

    # -- resume and merge ---------------------------------------------------------------------
    add(
        Call(
            "resume",
            "sweep-flags",
            resume_of("base", "r1", extra=["--routers", "gshard", "--experts", "16"]),
            names=("--routers", "--experts"),
        )
    )
    for flag, value in (("--shard", "0/2"), ("--config", "default"), ("--seed", "3"), ("--out", "x")):
        add(Call("resume", f"flag{flag}", resume_of("base", f"r{flag}", extra=[flag, value]), names=(flag,)))
    add(
        Call(
            "resume",
            "timeout-allowed",
            resume_of("base", "r2", extra=["--timeout", "30"]),
            exit=0,
            check=status_is(Path("o/r2"), "complete", rows=2),
        )
    )
    add(
        Call(
            "resume",
            "stray-parquet",
            resume_of("base", "r3", prep=stray_part),
            exit=0,
            check=all_of(
                status_is(Path("o/r3"), "complete", rows=2), lambda root, res: _consolidated(root / "o/r3", 2)
            ),
        )
    )
    add(
        Call(
            "resume",
            "truncated-part",
            resume_of("base", "r4", prep=truncate_part),
            exit=0,
            one_line=False,
            check=all_of(status_is(Path("o/r4"), "complete", rows=2), stderr_has("unreadable")),
        )
    )
    add(Call("resume", "report-truncated-part", report_truncated, names=("rows",)))
    add(
        Call(
            "resume",
            "retry-errors",
            lambda root: ["run", "--resume", str(copy_run(root, "errs", "r6")), "--retry-errors"],
            exit=0,
            check=status_is(Path("o/r6"), "complete", rows=2, row_status="ok"),
        )
    )
    add(Call("resume", "retry-without-resume", ["run", "--retry-errors", *SMALL], names=("--retry-errors",)))
    add(
        Call(
            "resume",
            "relative-trace-from-elsewhere",
            [],
            exit=0,
            driver=relative_trace_resume,
            check=status_is(Path("o/r7"), "complete", rows=2, row_status="ok"),
        )
    )
    for name, prep, needles in (
        ("meta-truncated", damage_meta('{"run_id": '), ("meta.json",)),
        ("meta-list", damage_meta("[]"), ("meta.json",)),
        ("meta-blocks-5", blocks_meta([5]), ("meta.json",)),
        ("meta-blocks-str", blocks_meta("x"), ("meta.json",)),
        ("meta-missing", lambda run: (run / "meta.json").unlink(), ("--resume",)),
    ):
        add(Call("resume", name, resume_of("base", f"r-{name}", prep=prep), names=needles))
    add(Call("resume", "resume-a-file", ["run", "--resume", "../fx/afile"], names=("--resume",)))
    add(
        Call(
            "resume",
            "resume-simulate-run",
            lambda root: ["run", "--resume", str(one_run(root / "fx" / "sim"))],
            names=("--resume",),
        )
    )
    add(Call("resume", "resume-missing-plugin", resume_of("gone", "r8"), names=("plugin",)))
    add(Call("resume", "merge-missing-shard", [], exit=0, one_line=False, driver=merge_shards, check=merge_check))
    add(Call("resume", "merge-not-a-run", ["merge", "../fx", "--out", o("m2")], names=("merge",)))
    add(
        Call(
            "resume",
            "merge-corrupt-meta",
            lambda root: ["merge", str(_damaged(root)), "--out", str(root / "o/m3")],
            names=("meta.json",),
        )
    )

    # -- no silent substitution -----------------------------------------------------------------
    add(
        Call(
            "substitution",
            "run-topk-K-100",
            ["run", "--routers", "topk", "--top-k", "100", "--experts", "8", "--out", o("u1")],
            names=("top_k", "100"),
            check=no_run_left("o/u1"),
        )
    )
    add(
        Call(
            "substitution",
            "route-topk-K-100",
            ["route", "--router", "topk", "-K", "100", "-E", "8"],
            names=("top_k", "100"),
        )
    )
    add(
        Call(
            "substitution",
            "route-switch-K-2",
            ["route", "--router", "switch", "-K", "2", "-T", "64", "-B", "2"],
            exit=0,
            one_line=False,
            check=lambda root, res: _said_once(res, "ignores top_k"),
        )
    )
    add(
        Call(
            "substitution",
            "route-dense-cf",
            ["route", "--router", "dense", "--capacity-factor", "1.0", "-T", "64", "-B", "2"],
            exit=0,
            one_line=False,
            check=lambda root, res: _said_once(res, "ignores capacity_factor"),
        )
    )
    for cf in ("none", "1.0"):
        add(
            Call(
                "substitution",
                f"target-drop-with-cf-{cf}",
                ["route", "--router", "topk", "--target-drop", "0.01", "--capacity-factor", cf, "-T", "64", "-B", "2"],
                names=("--target-drop", "--capacity-factor"),
            )
        )
    for name in ("empty", "comments", "sweep_empty", "sweep_strs"):
        add(
            Call(
                "substitution",
                f"config-{name}",
                ["run", "--config", f"../fx/{name}.toml", "--out", o(f"u-{name}")],
                names=(f"{name}.toml",),
                check=no_run_left(f"o/u-{name}"),
            )
        )
    for value in ("0", "-1", "nan", "inf"):
        add(
            Call(
                "substitution",
                f"run-timeout-{value}",
                ["run", "--routers", "switch", *SMALL, f"--timeout={value}", "--out", o(f"t{value}")],
                names=("--timeout",),
                check=no_run_left(f"o/t{value}"),
            )
        )
        add(
            Call(
                "substitution",
                f"ep-timeout-{value}",
                [*ep, f"--timeout={value}", "--out", o(f"et{value}")],
                names=("--timeout",),
                check=no_run_left(f"o/et{value}"),
            )
        )
    add(Call("substitution", "simulate-no-save-with-out", [*sim, "--no-save", "--out", o("u3")], names=("--no-save",)))
    add(
        Call(
            "substitution",
            "run-ray-address-local",
            ["run", "--routers", "switch", *SMALL, "--ray-address", "x", "--out", o("u4")],
            names=("--ray-address",),
        )
    )
    add(
        Call(
            "substitution",
            "quality-K-100",
            [*q, "--routers", "topk", "--top-k", "100", "--out", o("u5")],
            names=("top_k", "100"),
            check=no_run_left("o/u5"),
        )
    )
    add(
        Call(
            "substitution",
            "run-repeats-0",
            ["run", "--routers", "switch", "--repeats", "0", "--out", o("u6")],
            names=("--repeats",),
            check=no_run_left("o/u6"),
        )
    )
    add(
        Call(
            "substitution",
            "run-shard-1/0",
            ["run", "--routers", "switch", "--shard", "1/0", "--out", o("u7")],
            names=("--shard",),
            check=no_run_left("o/u7"),
        )
    )

    # -- bad input: one line, exit 2, naming the flag or file ----------------------------------
    add(
        Call(
            "input",
            "run-out-existing-file",
            ["run", "--routers", "switch", *SMALL, "--out", "../fx/afile"],
            names=("--out",),
        )
    )
    add(
        Call(
            "input",
            "run-out-under-a-file",
            ["run", "--routers", "switch", *SMALL, "--out", "../fx/afile/sub"],
            names=("--out",),
        )
    )
    add(
        Call(
            "input",
            "run-out-unwritable",
            ["run", "--routers", "switch", *SMALL, "--out", "/sys/kernel/moe-bench"],
            names=("--out",),
        )
    )
    add(Call("input", "simulate-out-existing-file", [*sim, "--out", "../fx/afile"], names=("--out",)))
    add(
        Call(
            "input", "quality-out-existing-file", [*q, "--routers", "switch", "--out", "../fx/afile"], names=("--out",)
        )
    )
    add(Call("input", "ep-out-existing-file", [*ep, "--out", "../fx/afile"], names=("--out",)))
    for cmd, flag in (
        (["route", "--router", "topk", "-T", HUGE], "--tokens"),
        (["route", "--router", "topk", "-E", HUGE], "--experts"),
        (["route", "--router", "topk", "-B", HUGE], "--batches"),
        (["route", "--router", "topk", "--seed", HUGE], "--seed"),
        (["route", "--router", "topk", "-K", HUGE], "--top-k"),
        (["run", "--tokens", HUGE, "--out", o("h1")], "--tokens"),
        (["run", "--experts", HUGE, "--out", o("h2")], "--experts"),
        (["run", "--repeats", HUGE, "--out", o("h3")], "--repeats"),
        (["run", "--config", "../fx/tokens_huge.toml", "--out", o("h4")], "tokens"),
        (["simulate", "-G", HUGE, "--no-save"], "--devices"),
        (["simulate", "-G", "8", "-T", HUGE, "--no-save"], "--tokens"),
        (["ep", "--tokens", HUGE, "--out", o("h5")], "--tokens"),
        (["ep", "--nproc", HUGE, "--out", o("h6")], "--nproc"),
        ([*q, "--steps", HUGE, "--out", o("h7")], "--steps"),
        ([*q, "--vocab", HUGE, "--out", o("h8")], "--vocab"),
    ):
        add(Call("input", f"huge-{cmd[0]}-{flag}", cmd, names=(flag,)))
    add(
        Call(
            "input",
            "route-T-2^40",
            ["route", "--router", "topk", "-T", "1099511627776", "-B", "1"],
            names=("--tokens", "bytes"),
        )
    )
    add(
        Call(
            "input",
            "route-E-huge-memory",
            ["route", "--router", "switch", "-T", "100000", "-E", "100000000"],
            names=("bytes",),
        )
    )
    add(Call("input", "simulate-T-2^40", [*sim[:3], "-T", "1099511627776", "--no-save"], names=("--tokens", "bytes")))
    add(
        Call(
            "input", "simulate-G-10M-E-256", ["simulate", "-G", "10485760", "-E", "256", "--no-save"], names=("bytes",)
        )
    )
    add(
        Call(
            "input",
            "quality-vocab-memory",
            [*q, "--vocab", "99999999999", "--out", o("h9")],
            names=("--vocab", "bytes"),
            check=no_run_left("o/h9"),
        )
    )
    add(
        Call(
            "input",
            "run-T-2^40-skipped",
            [
                "run",
                "--routers",
                "switch",
                "--tokens",
                "1099511627776",
                "--experts",
                "4",
                "--hidden",
                "8",
                "--out",
                o("h10"),
            ],
            exit=0,
            one_line=False,
            check=all_of(
                status_is(Path("o/h10"), "complete", rows=1, row_status="skipped"),
                lambda root, res: _skip_names_bytes(root / "o" / "h10"),
            ),
        )
    )
    for name, needles in (
        ("meta_not_json", ("meta_not_json.parquet",)),
        ("meta_list", ("meta_list.parquet",)),
        ("meta_no_layers", ("meta_no_layers.parquet", "layers")),
        ("meta_empty_layers", ("meta_empty_layers.parquet", "layers")),
        ("meta_bad_experts", ("meta_bad_experts.parquet", "num_experts")),
        ("meta_layers_str", ("meta_layers_str.parquet", "layers")),
        ("not_parquet", ("not_parquet.parquet",)),
    ):
        add(
            Call(
                "input",
                f"trace-{name}",
                ["route", "--router", "switch", "--workload", f"trace[path=../fx/{name}.parquet]"],
                names=needles,
            )
        )
        if name in ("meta_no_layers", "meta_bad_experts"):
            add(
                Call(
                    "input",
                    f"run-trace-{name}",
                    [
                        "run",
                        "--routers",
                        "switch",
                        "--workloads",
                        f"trace[path=../fx/{name}.parquet]",
                        "--out",
                        o(f"tr-{name}"),
                    ],
                    names=needles,
                    check=no_run_left(f"o/tr-{name}"),
                )
            )
    add(
        Call(
            "input",
            "trace-path-is-dir",
            ["route", "--router", "switch", "--workload", "trace[path=../fx]"],
            names=("../fx",),
        )
    )
    for name, needles in (
        ("sweep5", ("sweep5.toml", "sweep")),
        ("defaults5", ("defaults5.toml", "defaults")),
        ("tokens_abc", ("tokens",)),
        ("ffn_x", ("ffn_ratio",)),
        ("warmup_neg", ("warmup",)),
        ("seed_neg", ("seed",)),
        ("device_tpu", ("device",)),
        ("bad_syntax", ("bad_syntax.toml",)),
        ("unknown_key", ("routrs",)),
    ):
        add(
            Call(
                "input",
                f"config-{name}",
                ["run", "--config", f"../fx/{name}.toml", "--out", o(f"c-{name}")],
                names=needles,
                check=no_run_left(f"o/c-{name}"),
            )
        )
    add(
        Call(
            "input",
            "capture-out-missing-dir",
            ["capture", "--model", "../fx/nomodel", "--out", "../fx/missing/t.parquet"],
            names=("--out",),
        )
    )
    add(
        Call("input", "capture-out-is-dir", ["capture", "--model", "../fx/nomodel", "--out", "../fx"], names=("--out",))
    )
    add(
        Call(
            "input",
            "capture-no-model",
            ["capture", "--model", "../fx/nomodel", "--out", "../o/t.parquet"],
            names=("--model",),
        )
    )
    add(Call("input", "no-such-command", ["rnu"], names=("rnu",)))
    add(Call("input", "route-device-tpu", ["route", "--router", "switch", "--device", "tpu"], names=("--device",)))
    add(Call("input", "route-missing-router", ["route"], names=("--router",)))
    add(Call("input", "route-T-abc", ["route", "--router", "switch", "-T", "abc"], names=("--tokens",)))
    add(
        Call(
            "input",
            "route-target-drop-nan",
            ["route", "--router", "switch", "--target-drop", "nan"],
            names=("--target-drop",),
        )
    )
    add(Call("input", "route-batches-0", ["route", "--router", "switch", "-B", "0"], names=("--batches",)))
    add(Call("input", "route-experts-0", ["route", "--router", "switch", "-E", "0"], names=("--experts",)))
    add(Call("input", "route-seed-neg", ["route", "--router", "switch", "--seed", "-1"], names=("--seed",)))
    add(Call("input", "simulate-ffn-nan", [*sim, "--ffn-ratio", "nan", "--no-save"], names=("--ffn-ratio",)))
    add(Call("input", "simulate-devices-0", ["simulate", "-G", "0", "--no-save"], names=("--devices",)))
    add(Call("input", "quality-threads-0", [*q, "--threads", "0", "--out", o("i1")], names=("--threads",)))
    add(Call("input", "quality-lr-nan", [*q, "--lr", "nan", "--out", o("i2")], names=("lr",)))
    add(
        Call(
            "input",
            "run-mode-xyz",
            ["run", "--routers", "switch", "--mode", "fwd,xyz", "--out", o("i3")],
            names=("--mode",),
        )
    )
    add(
        Call(
            "input",
            "run-budget-env",
            ["run", "--routers", "switch", *SMALL, "--out", o("i4")],
            env={"MOE_BENCH_MEMORY_BUDGET": "abc"},
            names=("MOE_BENCH_MEMORY_BUDGET",),
            check=no_run_left("o/i4"),
        )
    )
    add(Call("input", "report-missing", ["report", "../o/nothing"], names=("nothing",)))
    add(Call("input", "compare-a-file", ["compare", "../fx/afile", "../fx/afile"], names=("afile",)))
    add(Call("input", "ep-nproc-0", ["ep", "--nproc", "0", "--out", o("i5")], names=("--nproc",)))

    # -- smaller ------------------------------------------------------------------------------
    add(
        Call(
            "smaller",
            "hash-on-trace-without-fit-slice",
            [
                "route",
                "--router",
                "hash",
                "-T",
                "64",
                "-B",
                "2",
                "--workload",
                "trace[path=../fx/trace.parquet,fit_every=0]",
            ],
            exit=0,
            one_line=False,
        )
    )
    add(
        Call(
            "smaller",
            "balanced-hash-on-trace-without-fit-slice",
            [
                "route",
                "--router",
                "hash[variant=balanced]",
                "-T",
                "64",
                "-B",
                "2",
                "--workload",
                "trace[path=../fx/trace.parquet,fit_every=0]",
            ],
            names=("fit",),
        )
    )
    add(
        Call(
            "smaller",
            "simulate-10M-devices-columns",
            ["simulate", "-G", "10000000", "-E", "1", "-T", "16", "-D", "16", "--plans", "1", "--no-save"],
            exit=0,
            one_line=False,
            check=lambda root, res: _columns(res),
        )
    )
    return out


# ---------------------------------------------------------------------------------------------
# Checks that read what a call left
# ---------------------------------------------------------------------------------------------


def _error_row(out: Path, needles, other_ok: bool = False) -> str | None:
    run = one_run(out)
    if run is None:
        return "no run directory"
    rows = rows_of(run)
    bad = [r for r in rows if str(r.get("router", "")).startswith("bad")]
    if not bad or bad[0].get("status") != "error":
        return f"the broken plugin's row is {[r.get('status') for r in bad]}, not error"
    if not all(n in str(bad[0].get("error")) for n in needles):
        return f"its error does not name {needles}: {str(bad[0].get('error'))[:120]}"
    if other_ok and not any(r.get("status") == "ok" for r in rows if r not in bad):
        return "the other router did not run"
    return None


def _quality_error_row(out: Path, needles) -> str | None:
    run = one_run(out)
    if run is None:
        return "no run directory"
    try:
        rows = pq.read_table(run / "quality.parquet").to_pylist()
    except Exception as exc:
        return f"quality.parquet unreadable: {exc}"
    by = {r["router"]: r for r in rows}
    bad = next((r for k, r in by.items() if k.startswith("bad")), None)
    if bad is None or bad["status"] != "error" or not all(n in str(bad["error"]) for n in needles):
        return f"broken plugin row: {bad and (bad['status'], str(bad['error'])[:100])}"
    if by.get("switch", {}).get("status") != "ok":
        return "switch did not run after the broken plugin"
    if meta_of(run).get("status") != "complete":
        return f"meta status {meta_of(run).get('status')!r}"
    return None


def _provenance(out: Path) -> str | None:
    run = one_run(out)
    if run is None:
        return "no run directory"
    import moe_routing_bench.bench.record as record

    root = Path(record.__file__).resolve().parents[1]
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True)
    got = str(meta_of(run).get("git_commit"))
    return None if got.startswith(head.stdout.strip()) else f"git_commit {got!r}, harness is {head.stdout.strip()}"


def _consolidated(run_root: Path, n: int) -> str | None:
    run = one_run(run_root)
    table = pq.read_table(run / "rows.parquet")
    return None if table.num_rows == n else f"rows.parquet holds {table.num_rows} rows, expected {n}"


def merge_check(root: Path, res: Result) -> str | None:
    merged = one_run(root / "o" / "m1")
    meta = meta_of(merged) if merged else {}
    if meta.get("status") != "incomplete" or len(meta.get("missing", [])) != 1:
        return f"merge of 1 of 2 shards says {meta.get('status')!r}, missing {meta.get('missing')}"
    if "--resume" in res.err or "missing" not in res.err:
        return f"merge's message does not list what is missing: {res.err.strip()[-200:]}"
    return None


def _damaged(root: Path) -> Path:
    run = copy_run(root, "base", "m3src")
    (run / "meta.json").write_text("{oops")
    return run


def _said_once(res: Result, needle: str) -> str | None:
    n = res.err.count(needle)
    return None if n == 1 else f"{needle!r} said {n} times"


def _skip_names_bytes(out: Path) -> str | None:
    rows = rows_of(one_run(out))
    return None if rows and "bytes" in str(rows[0].get("error")) else "the skipped row does not give the bytes needed"


def _columns(res: Result) -> str | None:
    rows = [ln.split() for ln in res.out.splitlines()[1:] if ln.strip()]
    if not rows:
        return "no table"
    if len(rows[0]) != 12 or rows[0][3] != "10000000":
        return f"the row splits into {len(rows[0])} fields, G reads {rows[0][3]!r}: {res.out.splitlines()[1]!r}"
    return None


# ---------------------------------------------------------------------------------------------
# Classification and the table
# ---------------------------------------------------------------------------------------------


def judge(root: Path, call: Call, res: Result) -> tuple[str, str]:
    text = res.err + res.out
    killed = res.rc < 0 and res.rc not in (TIMED_OUT, -997, -998, -999)
    if "Traceback (most recent call last)" in text or killed or res.rc == 139 or "frame #" in text:
        return "traceback", res.err.strip().splitlines()[-1] if res.err.strip() else f"rc {res.rc}"
    if res.rc == TIMED_OUT:
        return "silent-wrong", f"did not finish in {CALL_TIMEOUT} s: it accepted what it cannot do"
    if res.rc == -998:
        return "unclear", "setup step failed: " + res.err[-200:]
    expected = call.exit if isinstance(call.exit, tuple) else (call.exit,)
    if call.check is not None:
        why = call.check(root, res)
        if why:
            return "silent-wrong", why
    if res.rc == 0 and 0 not in expected:
        return "silent-wrong", "exit 0: the call was not refused"
    if res.rc not in expected:
        return "unclear", f"exit {res.rc}, expected {expected}: {res.err.strip()[-200:]}"
    if res.rc != 0 and call.one_line:
        # Refused (exit 2): that one line is all. Failed (exit 1): a run may have said where it
        # writes and drawn its progress bar first; the error is still one line.
        lines = [ln for ln in res.err.splitlines() if ln.strip() and not ln.startswith("moe-bench: note:")]
        errors = res.err.split("moe-bench: error:")[1:]
        if len(errors) != 1 or (res.rc == 2 and len(lines) != 1) or "\n" in errors[0].strip():
            return "unclear", f"{len(lines)} lines on stderr: {res.err.strip()[:200]!r}"
        missing = [n for n in call.names if n not in errors[0]]
        if missing:
            return "unclear", f"does not name {missing}: {errors[0].strip()}"
    return "ok", ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated categories or call names")
    ap.add_argument("--json", default=None)
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    only = {s for s in args.only.split(",") if s}
    chosen = [c for c in calls() if not only or c.category in only or c.name in only]
    root = Path(tempfile.mkdtemp(prefix="hostile-"))
    t0 = time.time()
    prepare(root)
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    log = []
    for call in chosen:
        t = time.time()
        try:
            if call.driver is not None:
                res = call.driver(root, call)
            else:
                argv = call.args(root) if callable(call.args) else call.args
                fsize = call.fsize(root) if callable(call.fsize) else call.fsize
                res = moe(root, argv, env=call.env, cwd=root / call.cwd if call.cwd else None, fsize=fsize)
            verdict, why = judge(root, call, res)
        except Exception as exc:  # the script's own trouble is reported, not counted as ok
            res, verdict, why = Result(-997, "", repr(exc)), "unclear", f"script error: {exc!r}"
        counts[call.category]["calls"] += 1
        counts[call.category][verdict] += 1
        first = next((ln for ln in res.err.splitlines() if ln.strip()), "")
        log.append(
            {
                "category": call.category,
                "name": call.name,
                "rc": res.rc,
                "verdict": verdict,
                "why": why,
                "stderr_first": first,
                "stderr_tail": res.err[-600:],
                "seconds": round(time.time() - t, 1),
            }
        )
        if args.verbose or verdict != "ok":
            print(f"[{verdict:>12}] {call.category}/{call.name} (rc {res.rc}): {why or first}", flush=True)
    cats = list(dict.fromkeys(c.category for c in chosen))
    print(f"\n{'category':<14}{'calls':>7}{'tracebacks':>12}{'silent-wrong':>14}{'unclear':>9}")
    total = defaultdict(int)
    for cat in cats:
        c = counts[cat]
        print(f"{cat:<14}{c['calls']:>7}{c['traceback']:>12}{c['silent-wrong']:>14}{c['unclear']:>9}")
        for k in ("calls", "traceback", "silent-wrong", "unclear"):
            total[k] += c[k]
    print(f"{'all':<14}{total['calls']:>7}{total['traceback']:>12}{total['silent-wrong']:>14}{total['unclear']:>9}")
    print(f"({time.time() - t0:.0f} s; work files in {root})")
    if args.json:
        Path(args.json).write_text(json.dumps(log, indent=2))
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
