"""Third-party routers: `--plugin FILE.py` and the `moe_bench.routers` entry-point group."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from moe_routing_bench.routers.contract import Batch
from moe_routing_bench.routers.registry import build_router, list_routers, load_plugin, loaded_plugins

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "routers" / "example_plugin.py"


def test_example_plugin_file_registers_and_routes():
    assert load_plugin(EXAMPLE) in (["sampled"], [])  # [] when another test loaded it already
    assert "sampled" in dict(list_routers())
    router = build_router("sampled", num_experts=8, seed=1)
    logits = torch.randn(1000, 8, generator=torch.Generator().manual_seed(0))
    plan = router.route(Batch(logits_TE=logits, token_T=torch.arange(1000)))
    assert plan.capacity == 125
    # Sampling follows softmax: it differs from argmax but favours the likely experts.
    probs = torch.softmax(logits, -1)
    assert not torch.equal(plan.expert_R, logits.argmax(-1))
    assert probs[plan.token_R, plan.expert_R].mean() > 1.0 / 8
    again = build_router("sampled", num_experts=8, seed=1).route(Batch(logits_TE=logits, token_T=torch.arange(1000)))
    assert torch.equal(plan.expert_R, again.expert_R)
    assert any(str(EXAMPLE.resolve()) in p for p in loaded_plugins())


def test_plugin_through_cli_compares_with_builtins():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "moe_routing_bench.bench.cli",
            "route",
            "--router",
            "sampled,switch",
            "--plugin",
            str(EXAMPLE),
            "-T",
            "256",
            "-E",
            "8",
            "-B",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    header = next(line for line in proc.stdout.splitlines() if line.startswith("metric"))
    assert "sampled" in header and "switch" in header


def test_entry_point_plugin_of_an_installed_package(tmp_path):
    # A tiny package exposing a router through the `moe_bench.routers` entry-point group,
    # installed with pip into a target folder, then seen by a fresh `moe-bench` process.
    src = tmp_path / "src"
    (src / "tiny_router").mkdir(parents=True)
    (src / "tiny_router" / "__init__.py").write_text(
        textwrap.dedent('''
        import torch
        from moe_routing_bench.routers.contract import Plan, Router, RouterConfig

        class FirstExpert(Router):
            """Sends every token to expert 0 (a plugin for tests)."""
            config_cls = RouterConfig

            def route(self, batch):
                t = batch.num_tokens
                return Plan(token_R=torch.arange(t), expert_R=torch.zeros(t, dtype=torch.int64),
                            weight_R=torch.ones(t), num_tokens=t, num_experts=self.config.num_experts,
                            capacity=self.config.capacity_for(t), top_k=1)
    ''')
    )
    (src / "pyproject.toml").write_text(
        textwrap.dedent("""
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "tiny-router"
        version = "0.0.1"
        [project.entry-points."moe_bench.routers"]
        first_expert = "tiny_router:FirstExpert"
        [tool.setuptools]
        packages = ["tiny_router"]
    """)
    )
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(target),
            str(src),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    listed = subprocess.run(
        [sys.executable, "-m", "moe_routing_bench.bench.cli", "list", "routers"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert listed.returncode == 0, listed.stderr
    assert "first_expert" in listed.stdout and "Sends every token to expert 0" in listed.stdout
    assert "entry point first_expert" in listed.stderr  # the harness says which plugins it loaded
    routed = subprocess.run(
        [
            sys.executable,
            "-m",
            "moe_routing_bench.bench.cli",
            "route",
            "--router",
            "first_expert",
            "-T",
            "64",
            "-E",
            "4",
            "-B",
            "1",
            "--capacity-factor",
            "1.0",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert routed.returncode == 0, routed.stderr
    assert '"experts_unused"' in routed.stdout and '"mean": 3.0' in routed.stdout


def test_readme_router_snippet_runs_as_a_plugin(tmp_path):
    # The "Write a router" section must stay true: its code block is loaded as a plugin file.
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Write a router") :]
    code = section[section.index("```python") + len("```python") : section.index("```\n", section.index("```python"))]
    plugin = tmp_path / "my_router.py"
    plugin.write_text(code)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "moe_routing_bench.bench.cli",
            "route",
            "--router",
            "mine,switch",
            "--plugin",
            str(plugin),
            "--router-opt",
            "temperature=0.5",
            "-T",
            "128",
            "-E",
            "8",
            "-B",
            "2",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,  # a user's directory, not the repo root
    )
    # temperature goes to the router that has it; switch runs with its defaults beside it.
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["mine"]["config"]["temperature"] == 0.5 and "temperature" not in out["switch"]["config"]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "moe_routing_bench.bench.cli",
            "route",
            "--router",
            "mine",
            "--plugin",
            str(plugin),
            "--router-opt",
            "temperature=0.5",
            "-T",
            "128",
            "-E",
            "8",
            "-B",
            "2",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert '"temperature": 0.5' in proc.stdout
