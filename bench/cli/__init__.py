"""The ``moe-bench`` command line: click commands only, one module per command family.

Each command parses its flags (shared ones from ``options``), calls one library function of its
job package, and prints. Nothing outside this package imports it.
"""

from __future__ import annotations

import click

from moe_routing_bench.bench.cli import capture, ep, microbench, quality, report, route, run, sim
from moe_routing_bench.bench.cli.options import MoeBenchGroup


@click.group(cls=MoeBenchGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Benchmark and simulate Mixture-of-Experts routing strategies."""


for command in (
    route.list_cmd,
    route.route_cmd,
    run.run_cmd,
    run.merge_cmd,
    report.report_cmd,
    report.compare_cmd,
    ep.ep_cmd,
    sim.simulate_cmd,
    capture.capture_cmd,
    quality.quality_cmd,
    microbench.route_cost_cmd,
):
    main.add_command(command)
