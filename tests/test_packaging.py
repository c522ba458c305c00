"""One import name of our own: the root folders install as ``moe_routing_bench.*`` and never shadow,
nor are shadowed by, another distribution's ``kernels``, ``routers``, ``bench`` or ``workloads``."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("bench", "routers", "kernels", "workloads")
BARE = set(ROOTS)


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_root_folders_are_not_regular_packages():
    # An __init__.py here would make `import kernels` in the repo root find our folder first.
    for root in ROOTS:
        assert not (REPO / root / "__init__.py").exists(), f"{root}/__init__.py must not exist"


def test_import_kernels_in_the_repo_root_is_not_our_folder():
    proc = _python("import kernels, sys; print(getattr(kernels, '__file__', None) or list(kernels.__path__))", REPO)
    if proc.returncode != 0:
        # No other `kernels` installed: then only a namespace portion could exist, never ours as a package.
        assert "No module named 'kernels'" in proc.stderr, proc.stderr
        return
    assert str(REPO / "kernels") not in proc.stdout, proc.stdout


def test_transformers_hub_kernels_imports_from_the_repo_root():
    # transformers >= 5 depends on Hugging Face's `kernels` and imports it at module level.
    pytest.importorskip("transformers")
    from importlib import metadata

    major = int(metadata.version("transformers").split(".")[0])
    if major < 5:
        pytest.skip("transformers < 5 does not import Hugging Face's kernels")
    for argv in (
        ["-c", "import transformers.integrations.hub_kernels"],
        ["-m", "transformers.integrations.hub_kernels"],
    ):
        proc = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    proc = _python("import kernels; print(kernels.__file__)", REPO)
    assert proc.returncode == 0 and "site-packages" in proc.stdout, proc.stdout + proc.stderr


def test_our_package_imports_from_any_directory(tmp_path):
    code = (
        "from moe_routing_bench.kernels.dispatch import make_dispatch\n"
        "from moe_routing_bench.routers.registry import router_names\n"
        "from moe_routing_bench.workloads.registry import workload_names\n"
        "import moe_routing_bench.bench.cli\n"
        "import moe_routing_bench.kernels.dispatch as d\n"
        "print(d.__file__); print(','.join(router_names()))\n"
    )
    for cwd in (tmp_path, REPO):
        proc = _python(code, cwd)
        assert proc.returncode == 0, proc.stderr
        assert str(REPO / "kernels" / "dispatch.py") in proc.stdout
        assert "switch" in proc.stdout


def _packages_on_disk() -> set[str]:
    found = set()
    for root in ROOTS:
        for folder in [REPO / root, *(p for p in (REPO / root).rglob("*") if p.is_dir())]:
            if "__pycache__" in folder.parts or not any(folder.glob("*.py")):
                continue
            rel = folder.relative_to(REPO).parts
            found.add(".".join(("moe_routing_bench", *rel)))
    return found


def test_every_package_folder_is_installed():
    # pyproject lists packages explicitly (package-dir cannot be combined with find): a new folder
    # of modules that is not listed would be missing from wheels.
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == {f"moe_routing_bench.{r}": r for r in ROOTS}
    assert set(config["packages"]) == _packages_on_disk()


def test_no_code_imports_a_bare_root_name():
    offenders = []
    for path in REPO.rglob("*.py"):
        if {".venv", "build", "results"} & set(path.relative_to(REPO).parts):
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(REPO)}:{node.lineno} {n}" for n in names if n.split(".")[0] in BARE]
    assert not offenders, offenders


def test_every_data_file_the_code_reads_is_installed():
    # Files beside the modules that are not Python (sweep configs, the native backend's C source)
    # reach a wheel only through package-data globs.
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    missing = []
    for root in ROOTS:
        for path in (REPO / root).rglob("*"):
            if not path.is_file() or path.suffix in (".py", ".pyc") or "__pycache__" in path.parts:
                continue
            rel = path.relative_to(REPO / root)
            package = ".".join(("moe_routing_bench", root, *rel.parts[:-1]))
            pkg_globs = [(package, g) for g in data.get(package, [])]
            # A glob of a parent package may reach into a sub-folder (configs/*.toml).
            for depth in range(1, len(rel.parts)):
                parent = ".".join(("moe_routing_bench", root, *rel.parts[: depth - 1]))
                pkg_globs += [(parent, g) for g in data.get(parent, [])]
            if not any(path.match(str(REPO / root / Path(*p.split(".")[2:]) / g)) for p, g in pkg_globs):
                missing.append(str(path.relative_to(REPO)))
    assert not missing, f"not in [tool.setuptools.package-data]: {missing}"
