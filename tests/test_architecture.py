"""The layering of the architecture, checked over every import of the project's modules.

    bench/cli/     click commands; nothing imports it
    bench/ jobs    harness/, report/, ep/, sim/, quality/, microbench/, capture/
    bench/ shared  timing, spec, record, schema, provenance, metrics, breakdown, routing, moe_layer, placement
    routers/, kernels/, workloads/   never import bench; kernels imports no other layer;
                                     workloads may import routers, routers nothing of ours

No import circle among modules (imports inside functions count too), and the job packages depend
on each other without a circle. Run as a script to print the package graph:

    .venv/bin/python tests/test_architecture.py
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG = "moe_routing_bench"
ROOTS = ("bench", "routers", "kernels", "workloads")
JOBS = ("cli", "harness", "report", "ep", "sim", "quality", "microbench", "capture")


def modules() -> dict[str, Path]:
    """Every module of the project by its import name."""
    out = {}
    for root in ROOTS:
        for path in (REPO / root).rglob("*.py"):
            rel = path.relative_to(REPO).with_suffix("").parts
            if rel[-1] == "__init__":
                rel = rel[:-1]
            out[".".join((PKG, *rel))] = path
    return out


def imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the project's modules it imports (at any level, inside functions too)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                    base = ".".join([*parts, base] if base else parts)
                # `from pkg import mod` depends on the module; `from mod import name`, on mod.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != name and t.startswith(PKG + "."):
                    graph[name].add(t)
    return graph


def layer(module: str) -> str:
    """'routers', 'kernels', 'workloads', 'bench.cli', 'bench.<job>' or 'bench.shared'."""
    parts = module.split(".")[1:]
    if parts[0] != "bench":
        return parts[0]
    if len(parts) > 1 and parts[1] in JOBS:
        return f"bench.{parts[1]}"
    return "bench.shared"


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(10_000)

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


ALLOWED = {
    "routers": {"routers"},
    "kernels": {"kernels"},
    "workloads": {"workloads", "routers"},
    "bench.shared": {"bench.shared", "routers", "kernels", "workloads"},
}


def violations(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for src, targets in graph.items():
        ls = layer(src)
        for dst in targets:
            ld = layer(dst)
            if ld == "bench.cli" and ls != "bench.cli":
                out.append(f"{src} imports the command line {dst}: nothing outside bench/cli/ may")
            elif ls in ALLOWED and ld not in ALLOWED[ls]:
                out.append(f"{src} ({ls}) imports {dst} ({ld}): {ls} may import only {sorted(ALLOWED[ls])}")
    return out


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    pk: dict[str, set[str]] = defaultdict(set)
    for src, targets in graph.items():
        for dst in targets:
            if layer(src) != layer(dst):
                pk[layer(src)].add(layer(dst))
    return pk


def test_no_import_circle_among_modules():
    assert cycles(imports(modules())) == []


def test_layers_import_only_what_they_may():
    assert violations(imports(modules())) == []


def test_job_packages_depend_on_each_other_without_a_circle():
    assert cycles(package_graph(imports(modules()))) == []


def test_the_checker_sees_a_planted_violation_and_circle():
    graph = imports(modules())
    planted = {**graph, f"{PKG}.kernels.positions": {f"{PKG}.bench.metrics"}}
    assert any("kernels.positions" in v for v in violations(planted))
    a, b = f"{PKG}.bench.timing", f"{PKG}.bench.record"
    assert cycles({**graph, a: {*graph.get(a, ()), b}}) != []  # record imports timing already


def test_no_module_over_450_lines():
    long = {str(p.relative_to(REPO)): n for p in modules().values() if (n := len(p.read_text().splitlines())) > 450}
    assert long == {}


if __name__ == "__main__":
    g = imports(modules())
    for src, dsts in sorted(package_graph(g).items()):
        print(f"{src:<18} -> {', '.join(sorted(dsts))}")
    problems = violations(g) + [" <-> ".join(c) for c in cycles(g)]
    print("\n".join(problems) or "ok: no circle, every layer imports only what it may")
    sys.exit(1 if problems else 0)
