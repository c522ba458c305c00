"""Mutation testing of the rules the numbers rest on (``make mutate``; not part of ``make test``).

Cosmic Ray plants one small bug at a time (an operator swapped, a constant changed, a condition
negated) in a module, runs the tests that exercise that module, and records whether they failed
(the mutant is *killed*) or passed (it *survived*: either a gap in the tests, or an equivalent
mutant that changes nothing observable). The score per module is killed / total.

    .venv/bin/python tests/mutate.py                     # every module in SCOPE, 2 workers
    .venv/bin/python tests/mutate.py --modules positions,contract --workers 1
    .venv/bin/python tests/mutate.py --report            # the table and survivors of the last run

Each worker mutates its own copy of the tracked tree under build/mutate/w<i>/ (Cosmic Ray edits
files on disk), imported as ``moe_routing_bench`` through links in its own pkgroot/ (the mapping
pyproject.toml's package-dir makes at install time), so two workers never see each other's bugs.
Sessions (SQLite) stay in build/mutate/ and resume where they stopped when run again, as long
as the module is unchanged (a session records the module's hash; a changed module starts over,
since Cosmic Ray finds its mutation sites by position). ``--retry-survivors`` runs the survivors
of an unchanged module again against the current tests.

Tests per mutant, by coverage: a coverage run of every module's tests (once per tree, cached in
build/mutate/coverage-<tree hash>.json; it is also the baseline, every test passing unmutated)
records which tests execute each line; a mutant runs only the tests that execute its changed
lines, quickest first, with ``-x`` (tests/mutate_runner.py). Each worker keeps one process that
has imported torch and pytest and forks a pytest run per mutant, so a mutant costs about a
second instead of a fresh interpreter's three plus its module's whole test files. Operators left
out: ``|`` replacements
(with ``from __future__ import annotations`` every ``int | None`` is a string: all equivalent),
decorator removal (frozen dataclasses: killed by construction), and ``is``/``is not`` swaps of
``==`` (identity and equality of small ints and None coincide: equivalent here).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "build" / "mutate"
PACKAGES = ("bench", "routers", "kernels", "workloads")

# module -> (path, its whole test list: what a mutant runs when coverage cannot narrow it down)
_ROUTER_TESTS = ["tests/routers"]
SCOPE: dict[str, tuple[str, list[str]]] = {
    "positions": (
        "kernels/positions.py",
        [
            "tests/kernels/test_backends.py",
            "-k",
            "positions or kept or drop or capacity",
            "tests/routers/test_switch_topk.py",
        ],
    ),
    "contract": (
        "routers/contract.py",
        ["tests/routers/test_contract.py", "tests/routers/test_validate.py", "tests/routers/test_every_router.py"],
    ),
    "metrics": ("bench/metrics.py", ["tests/bench/test_metrics.py"]),
    "dispatch": ("kernels/dispatch.py", ["tests/kernels/test_backends.py", "tests/bench/test_moe_layer.py"]),
    # each router, and the selection and balancing rules they share
    **{
        name: (f"routers/{name}.py", _ROUTER_TESTS)
        for name in (
            "switch",
            "topk",
            "gshard",
            "expert_choice",
            "hashing",
            "hierarchical",
            "sinkhorn",
            "topp",
            "dense",
            "selection",
            "balancing",
        )
    },
}
# What the coverage run executes (once per tree): every test file above, whole.
COVERAGE_TESTS = ["tests/kernels/test_backends.py", "tests/bench/test_moe_layer.py", "tests/bench/test_metrics.py",
                  "tests/routers"]  # fmt: skip
EXCLUDED_OPERATORS = [
    "core/ReplaceBinaryOperator_BitOr_.*",
    "core/RemoveDecorator",
    "core/ReplaceComparisonOperator_.*_(Is|IsNot)$",
]


def _tree_files() -> list[str]:
    return subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()


def _copy_tree(dest: Path) -> Path:
    """The tracked files (and untracked, not ignored) into dest/repo, with dest/pkgroot links."""
    repo = dest / "repo"
    if repo.exists():
        shutil.rmtree(repo)
    files = _tree_files()
    for rel in files:
        src = REPO / rel
        if src.is_file() and not rel.startswith("results/"):
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, repo / rel)
    pkg = dest / "pkgroot" / "moe_routing_bench"
    pkg.mkdir(parents=True, exist_ok=True)
    for name in PACKAGES:
        link = pkg / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(repo / name)
    return repo


def _config(name: str, timeout: float, worker: Path) -> str:
    path = SCOPE[name][0]
    cmd = f"{sys.executable} {REPO / 'tests' / 'mutate_runner.py'} run {worker} {name}"
    excluded = ", ".join(f'"{op}"' for op in EXCLUDED_OPERATORS)
    return (
        "[cosmic-ray]\n"
        f'module-path = "{path}"\n'
        f"timeout = {timeout}\n"
        "excluded-modules = []\n"
        f'test-command = "{cmd}"\n\n'
        '[cosmic-ray.distributor]\nname = "local"\n\n'
        f"[cosmic-ray.filters.operators-filter]\nexclude-operators = [{excluded}]\n"
    )


def _module_hash(name: str) -> str:
    import hashlib

    return hashlib.sha256((REPO / SCOPE[name][0]).read_bytes()).hexdigest()


def _drop_if_stale(name: str) -> None:
    """Start a module's session over when the module changed since the session began."""
    session, stamp = WORK / f"{name}.sqlite", WORK / f"{name}.sha256"
    if session.exists() and (not stamp.exists() or stamp.read_text() != _module_hash(name)):
        print(f"{SCOPE[name][0]} changed since its session began: starting it over")
        session.unlink()
    if not session.exists():
        stamp.write_text(_module_hash(name))


def retry_survivors(name: str) -> int:
    """Forget the survivors of an unchanged module's session, so exec runs them again."""
    _drop_if_stale(name)
    session = WORK / f"{name}.sqlite"
    if not session.exists():
        return 0
    con = sqlite3.connect(session)
    n = con.execute("delete from work_results where test_outcome = 'SURVIVED'").rowcount
    con.commit()
    return n


def _worker(index: int, modules: list[str], timeout: float, covmap: Path) -> subprocess.Popen | None:
    """Start one worker: its copy, its test server, then init + filter + exec for each module."""
    if not modules:
        return None
    dest = WORK / f"w{index}"
    repo = _copy_tree(dest)
    spec = {}
    for name in modules:
        path, tests = SCOPE[name]
        (dest / "pristine" / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / path, dest / "pristine" / path)
        spec[name] = {"path": path, "fallback": tests, "coverage": str(covmap), "timeout": timeout}
    (dest / "runner.json").write_text(json.dumps(spec, indent=1))
    steps = []
    for name in modules:
        cfg, session = WORK / f"{name}.toml", WORK / f"{name}.sqlite"
        cfg.write_text(_config(name, timeout, dest))
        _drop_if_stale(name)
        if not session.exists():
            steps.append(f"cosmic-ray init {cfg} {session}")
            steps.append(f"cr-filter-operators {session} {cfg}")
        steps.append(f"cosmic-ray exec {cfg} {session}")
    env = _env(dest)
    log = open(WORK / f"w{index}.log", "w")  # noqa: SIM115 - closed when the process ends
    sock = dest / "server.sock"
    sock.unlink(missing_ok=True)
    server = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "mutate_runner.py"), "serve", str(sock), str(timeout)],
        cwd=repo,
        env=env,
        stdout=log,
        stderr=log,
    )
    for _ in range(600):  # the server imports torch before it listens
        if sock.exists() or server.poll() is not None:
            break
        time.sleep(0.1)
    if server.poll() is not None:
        sys.exit(f"worker {index}: the test server did not start; see {WORK}/w{index}.log")
    # The server stops with the worker's shell.
    script = " && ".join(steps) + f"; code=$?; kill {server.pid}; exit $code"
    return subprocess.Popen(["bash", "-c", script], cwd=repo, env=env, stdout=log, stderr=log)


def _env(dest: Path) -> dict[str, str]:
    bindir = Path(sys.executable).parent
    return {
        **os.environ,
        "PYTHONPATH": str(dest / "pkgroot"),
        "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
        "OMP_NUM_THREADS": "1",
    }


def _tree_hash() -> str:
    """Hash of the tracked (and untracked, not ignored) files' contents, results/ aside."""
    import hashlib

    h = hashlib.sha256()
    for rel in sorted(_tree_files()):
        if (REPO / rel).is_file() and not rel.startswith("results/"):
            h.update(rel.encode() + b"\0" + (REPO / rel).read_bytes())
    return h.hexdigest()[:16]


def coverage_map(timeout: float) -> Path:
    """Per module line, the tests whose run executed it: built once per tree. It is also the
    baseline: every test passes unmutated (else every mutant would look killed)."""
    out = WORK / f"coverage-{_tree_hash()}.json"
    if out.exists():
        return out
    dest = WORK / "baseline"
    repo = _copy_tree(dest)
    data = WORK / "coverage.sqlite"
    data.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--cov=moe_routing_bench",
           "--cov-context=test", "--cov-report=", f"--junitxml={WORK / 'durations.xml'}", *COVERAGE_TESTS]  # fmt: skip
    print(f"coverage run (the baseline), once for this tree: pytest {' '.join(cmd[3:])}", flush=True)
    env = {**_env(dest), "COVERAGE_FILE": str(data)}
    res = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout * 30)
    if res.returncode != 0:
        sys.exit(f"baseline: the tests fail unmutated:\n{res.stdout[-3000:]}")
    import coverage

    cov = coverage.CoverageData(basename=str(data))
    cov.read()
    paths = {path for path, _ in SCOPE.values()}
    table: dict[str, dict[str, list[str]]] = {}
    for measured in cov.measured_files():
        rel = next((p for p in paths if measured.endswith("/" + p)), None)
        if rel is None:
            continue
        by_line = table.setdefault(rel, {})
        for line, contexts in cov.contexts_by_lineno(measured).items():
            ids = sorted({c.split("|")[0] for c in contexts if c})
            if ids:
                by_line[str(line)] = ids
    if paths - set(table):
        sys.exit(f"coverage recorded nothing for {sorted(paths - set(table))}: check COVERAGE_TESTS")
    table["_seconds"] = _durations(WORK / "durations.xml")  # type: ignore[assignment]
    out.write_text(json.dumps(table))
    return out


def _durations(junit: Path) -> dict[str, float]:
    """Each test's seconds in the coverage run, by node id (a mutant runs its cheapest first)."""
    import xml.etree.ElementTree as ET

    seconds = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        parts = case.get("classname", "").split(".")
        # classname: tests.pkg.test_mod[.Class]; the file is the longest prefix that exists
        for cut in range(len(parts), 0, -1):
            if (REPO / ("/".join(parts[:cut]) + ".py")).is_file():
                nodeid = "::".join(["/".join(parts[:cut]) + ".py", *parts[cut:], case.get("name", "")])
                seconds[nodeid] = float(case.get("time", 0) or 0)
                break
    return seconds


def report(modules: list[str], show_survivors: bool = True) -> list[dict]:
    """Per module: total, killed, survived, incompetent/timeouts, still to run; survivors' diffs."""
    rows = []
    for name in modules:
        session = WORK / f"{name}.sqlite"
        if not session.exists():
            continue
        con = sqlite3.connect(session)
        total = con.execute("select count(*) from work_items").fetchone()[0]
        res = dict(
            con.execute(
                "select coalesce(test_outcome, worker_outcome), count(*) from work_results group by 1"
            ).fetchall()
        )
        skipped = res.pop("SKIPPED", 0) + res.pop("skipped", 0)
        killed = res.get("KILLED", 0) + res.get("killed", 0)
        survived = res.get("SURVIVED", 0) + res.get("survived", 0)
        other = sum(res.values()) - killed - survived
        mutants = total - skipped
        done = killed + survived + other
        rows.append(
            {
                "module": SCOPE[name][0],
                "mutants": mutants,
                "killed": killed,
                "survived": survived,
                "other": other,
                "pending": mutants - done,
                "score": killed / (killed + survived) if killed + survived else float("nan"),
            }
        )
        if show_survivors and survived:
            print(f"\n## survivors in {SCOPE[name][0]}")
            for (diff,) in con.execute(
                "select r.diff from work_results r where upper(r.test_outcome) = 'SURVIVED'"
            ).fetchall():
                print(diff)
    print(f"\n{'module':<22}{'mutants':>8}{'killed':>8}{'survived':>9}{'other':>7}{'pending':>8}{'score':>8}")
    for r in rows:
        print(
            f"{r['module']:<22}{r['mutants']:>8}{r['killed']:>8}{r['survived']:>9}{r['other']:>7}"
            f"{r['pending']:>8}{r['score']:>8.1%}"
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modules", default=",".join(SCOPE), help=f"comma-separated, of: {', '.join(SCOPE)}")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--first-worker", type=int, default=0, help="copies w<N>.. (another run in parallel)")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per mutant's test run")
    ap.add_argument("--report", action="store_true", help="only print the last run's table and survivors")
    ap.add_argument("--fresh", action="store_true", help="start the sessions again from nothing")
    ap.add_argument("--retry-survivors", action="store_true", help="run the survivors again (unchanged modules)")
    args = ap.parse_args()
    modules = [m.strip() for m in args.modules.split(",") if m.strip()]
    bad = [m for m in modules if m not in SCOPE]
    if bad:
        sys.exit(f"--modules: unknown {bad}; one of {', '.join(SCOPE)}")
    if args.workers < 1:
        sys.exit("--workers must be >= 1")
    WORK.mkdir(parents=True, exist_ok=True)
    if args.report:
        report(modules)
        return
    if args.fresh:
        for m in modules:
            (WORK / f"{m}.sqlite").unlink(missing_ok=True)
    if args.retry_survivors:
        for m in modules:
            print(f"{SCOPE[m][0]}: {retry_survivors(m)} survivors to run again")
    covmap = coverage_map(args.timeout)
    start = time.time()
    groups = [modules[i :: args.workers] for i in range(args.workers)]
    procs = [
        p for i, g in enumerate(groups) if (p := _worker(args.first_worker + i, g, args.timeout, covmap)) is not None
    ]
    codes = [p.wait() for p in procs]
    print(f"mutation run: {time.time() - start:.0f} s on {len(procs)} workers (logs: {WORK}/w*.log)")
    report(modules)
    if any(codes):
        sys.exit(f"a worker failed (exit {codes}); see its log")


if __name__ == "__main__":
    main()
