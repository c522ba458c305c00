"""``moe-bench report`` and ``moe-bench compare``: the command-line side of the reports.

Bad input (a path that is not a run directory, a negative threshold) raises ``ValueError``, which
the ``moe-bench`` group turns into one line on stderr and exit status 2. ``compare`` exits 1 when
any metric regressed beyond the threshold and not within the repeats' noise, 0 otherwise.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from moe_routing_bench.bench.report.compare import DEFAULT_THRESHOLD_PCT, compare_runs, format_table

REGRESSION_EXIT = 1


@click.command("report")
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--out",
    "out",
    type=click.Path(path_type=Path),
    default=None,
    help="Output folder (default: RUN/report for one run, a new report-<time> folder beside the runs).",
)
def report_cmd(runs: tuple[Path, ...], out: Path | None) -> None:
    """Render figures (PNG), report.html and report.md from one or more run directories."""
    from moe_routing_bench.bench.report.build import make_report  # matplotlib loads only for a report

    rep = make_report(list(runs), out)
    for title, png in rep.figures:
        click.echo(f"figure {png}: {title}")
    for note in rep.notes:
        click.echo(note)
    click.echo(f"report: {rep.html}")
    click.echo(f"markdown: {rep.md}")


@click.command("compare")
@click.argument("run_a", type=click.Path(path_type=Path))
@click.argument("run_b", type=click.Path(path_type=Path))
@click.option(
    "--threshold",
    type=float,
    default=DEFAULT_THRESHOLD_PCT,
    show_default=True,
    help="Percent change that counts as a regression (when larger than the repeats' spread).",
)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--all", "show_all", is_flag=True, help="List every metric comparison, not only changes.")
def compare_cmd(run_a: Path, run_b: Path, threshold: float, fmt: str, show_all: bool) -> None:
    """Per-metric changes from run A to run B; exit status 1 on a regression (for CI)."""
    result = compare_runs(run_a, run_b, threshold)
    if fmt == "json":
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        click.echo(format_table(result, show_all))
    if result.failed:
        sys.exit(REGRESSION_EXIT)
