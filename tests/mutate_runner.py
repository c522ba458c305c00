"""What ``make mutate`` runs for one mutant: only the tests that execute the mutated lines, in a
process forked from one that has already imported torch.

Two costs dominated a mutant's test run: starting Python with torch, pytest and hypothesis (about
3 s), and running every test of a module when a handful execute the changed line. So:

- ``coverage`` (built once per tree by ``tests/mutate.py``): per module line, the pytest node ids
  whose run executed it (coverage.py's per-test contexts). A mutant runs the tests that cover its
  changed lines; a line no test's *run* executed (module level: constants, ``def`` lines and
  their defaults, class bodies) runs every test that executed the module.
- ``serve``: a long-lived process per worker that imports the heavy third-party modules (never
  ours) and forks a child per request; the child runs ``pytest.main`` in the worker's copy, so
  it imports our (mutated) modules fresh. ``run`` is the test command Cosmic Ray calls: it finds
  the changed lines, sends the node ids, and exits with pytest's code (0: the mutant survived).

Standard library only on the ``run`` side, so the per-mutant client starts in milliseconds.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import socket
import sys
import time
from pathlib import Path

# Imported by the server before it forks: the slow third-party imports our tests make. Never our
# package (a child must import the mutated copy) and never triton (it reads TRITON_INTERPRET,
# which a test's conftest sets, when it is imported).
PRELOAD = (
    *("numpy", "torch", "pandas", "pyarrow", "hypothesis", "pytest", "click", "_pytest.python"),
    # pytest's entry-point plugins, which pytest.main would import in every child
    *("pytest_benchmark.plugin", "_hypothesis_pytestplugin", "anyio.pytest_plugin", "pytest_cov.plugin"),
)
# pytest exit codes that are not "a test failed", logged for a look: 4 is also what a conftest
# that cannot import gives (a mutant that breaks its module's import: killed, rightly); 5 means
# the selection named no test, which would be this runner's fault.
RUNNER_ERRORS = {4: "usage error or conftest import error", 5: "no tests collected"}


def changed_lines(pristine: str, mutated: str) -> list[int]:
    """1-based lines of ``pristine`` that differ in ``mutated`` (a deletion marks the line after)."""
    a, b = pristine.splitlines(), mutated.splitlines()
    lines: set[int] = set()
    for tag, i1, i2, _, _ in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if tag != "equal":
            lines.update(range(i1 + 1, max(i2, i1 + 1) + 1))
    return sorted(lines)


def select_tests(
    covmap: dict[str, list[str]], lines: list[int], fallback: list[str], seconds: dict[str, float] | None = None
) -> list[str]:
    """The node ids to run for a mutant of these lines, quickest first (``seconds``: each test's
    time in the coverage run).

    A line some test's run executed: those tests. A line none did (module level: a constant, a
    ``def`` line's defaults, a class body, all run at import) can only change what the module's
    code does when it runs: every test that executed any line of the module. ``fallback`` (the
    module's whole test list) only when coverage holds nothing for the module.
    """
    ids: set[str] = set()
    for line in lines:
        covering = covmap.get(str(line))
        if not covering:
            ids = {i for tests in covmap.values() for i in tests}
            break
        ids.update(covering)
    if not ids:
        return list(fallback)
    seconds = seconds or {}
    return sorted(ids, key=lambda i: (seconds.get(i, 1.0), i))


def _request(sock_path: str, payload: dict, timeout: float) -> int:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(sock_path)
        s.sendall(json.dumps(payload).encode() + b"\n")
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
    return int(reply.decode().strip())


def run(worker: Path, module: str) -> int:
    """Cosmic Ray's test command (cwd: the worker's mutated copy)."""
    specs = json.loads((worker / "runner.json").read_text())
    spec = specs[module]
    path = spec["path"]
    lines = changed_lines((worker / "pristine" / path).read_text(), Path(path).read_text())
    table = json.loads(Path(spec["coverage"]).read_text())
    tests = select_tests(table.get(path, {}), lines, spec["fallback"], table.get("_seconds"))
    args = ["-x", "-q", "-p", "no:cacheprovider", *tests]
    # every module this worker mutates is compiled afresh (its cached bytecode could be a mutant's)
    fresh = [m["path"] for m in specs.values()]
    payload = {"cwd": os.getcwd(), "args": args, "fresh": fresh}
    code = _request(str(worker / "server.sock"), payload, spec["timeout"] + 30)
    if code in RUNNER_ERRORS:
        with open(worker / "runner-errors.log", "a") as log:
            log.write(f"{path} lines {lines}: pytest {RUNNER_ERRORS[code]} for {tests[:5]}...\n")
    return code


def serve(sock_path: str, timeout: float) -> None:
    """Fork a pytest child per request; reply with its exit code (124 when it ran past timeout)."""
    import gc
    import importlib

    for name in PRELOAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    # Objects from here on are shared with every child: keep the child's collections off them.
    gc.collect()
    gc.freeze()
    if os.path.exists(sock_path):
        os.unlink(sock_path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(sock_path)
    server.listen(1)
    while True:
        conn, _ = server.accept()
        with conn:
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
            req = json.loads(data.decode())
            pid = os.fork()
            if pid == 0:  # the child: one pytest run in the mutated copy, then out
                server.close()
                os.chdir(req["cwd"])
                sys.path.insert(0, req["cwd"])
                # Cache bytecode (tests, unmutated modules), never for a module under mutation:
                # a timestamp-checked .pyc of one mutant can pass for the next of the same size.
                sys.dont_write_bytecode = False
                for path in req.get("fresh", []):
                    for pyc in Path(path).parent.glob(f"__pycache__/{Path(path).stem}.*.pyc"):
                        pyc.unlink(missing_ok=True)
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, 1)
                os.dup2(devnull, 2)
                import pytest

                try:
                    code = int(pytest.main(req["args"]))
                except BaseException:  # any crash of the child is a failed run
                    code = 1
                os._exit(code)
            conn.sendall(f"{_wait(pid, timeout)}\n".encode())


def _wait(pid: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 1
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            return 124
        time.sleep(0.005)


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(sys.argv[2], float(sys.argv[3]))
    elif sys.argv[1:2] == ["run"]:
        sys.exit(run(Path(sys.argv[2]), sys.argv[3]))
    else:
        sys.exit("usage: mutate_runner.py serve SOCKET TIMEOUT | run WORKER_DIR MODULE")
