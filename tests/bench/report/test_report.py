"""`moe-bench report`: figures from a real run, one self-contained HTML page, markdown, escaping.

One tiny real run (made here with `moe-bench run`) feeds every test; edited copies of it carry
the planted hostile strings, error and skipped rows, a breakdown table, drifting loads and layers.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from moe_routing_bench.bench.cli import main
from moe_routing_bench.bench.metrics import METRICS
from moe_routing_bench.bench.report import figures_cost as F
from moe_routing_bench.bench.report import figures_routing as R
from moe_routing_bench.bench.report import style as S
from moe_routing_bench.bench.report.build import (
    GLOSSARY,
    Report,
    build_report,
    default_out,
    glossary_for,
    render_html,
)
from moe_routing_bench.bench.report.data import load_runs, loads_changing, reference_values
from moe_routing_bench.bench.report.html import md_escape
from moe_routing_bench.bench.schema import _MEASURE_COLUMNS, _METRIC_COLUMNS

# Every `moe-bench run` records the drops breakdown, so its figure is always drawn for a real run.
ALWAYS = {
    "throughput",
    "drops_vs_capacity",
    "balance",
    "expert_loads",
    "memory",
    "pareto",
    "stages",
    "drops_breakdown",
}
CONDITIONAL = {"load_drift", "load_convergence", "layer_loads", "ep_ranks"}
SCRIPT = "<script>document.title='PWNED'</script>"
ALERT = "<script>alert(1)</script>"
IMG = "<img src=x onerror=alert(1)>"
HOSTILE = f"{SCRIPT}{ALERT}{IMG}"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROME_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def run(tiny_run) -> Path:
    return tiny_run


@pytest.fixture(scope="module")
def cli_report(run) -> tuple[Path, str]:
    """The report made the way a user makes it: `moe-bench report RUN` (default out: RUN/report)."""
    res = CliRunner().invoke(main, ["report", str(run)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return run / "report", res.output


@pytest.fixture(scope="module")
def hostile_report(run, tmp_path_factory, clone) -> Path:
    """A copy of the run whose labels, error text, plugin names and metadata carry markup."""
    dst = clone(run, tmp_path_factory.mktemp("hostile") / "run", _plant_rows)
    meta = json.loads((dst / "meta.json").read_text())
    meta["plugins"] = [f"/plugins/{HOSTILE}.py"]
    meta["machine"]["hostname"] = HOSTILE
    meta["command"] = f"moe-bench run --routers {HOSTILE}"
    meta["config"] = HOSTILE
    meta["blocks"][0]["routers"].append(HOSTILE)
    (dst / "meta.json").write_text(json.dumps(meta))
    out = dst.parent / "out"
    build_report([dst], out)
    return out


def _plant_rows(rows: pd.DataFrame) -> pd.DataFrame:
    sw = rows["router"] == "switch"
    rows.loc[sw, "router"] = "switch" + HOSTILE
    rows["plugins"] = f"/plugins/{HOSTILE}.py"
    rows.loc[rows.index[0], "workload"] = "uniform" + HOSTILE
    rows.loc[rows.index[0], "config_json"] = json.dumps({"label": HOSTILE})
    err = rows.iloc[[0]].assign(
        config_id="e" * 16,
        status="error",
        router="ghost" + HOSTILE,
        error=f"RuntimeError: {HOSTILE}\nTraceback: {IMG}",
    )
    skip = rows.iloc[[1]].assign(
        config_id="s" * 16, status="skipped", router="skipper", error=f"einsum mask needs 9 GiB {ALERT}"
    )
    return pd.concat([rows, err, skip], ignore_index=True)


class _Page(HTMLParser):
    """What the fallback checker needs from a page: tags, attributes, script count, title."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.title = ""
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_title = tag == "title"

    def handle_endtag(self, tag):
        self._in_title = False

    def handle_data(self, data):
        if self._in_title:
            self.title += data


def _parse(text: str) -> _Page:
    p = _Page()
    p.feed(text)
    return p


def _assert_real_image(data: bytes | Path) -> Image.Image:
    img = Image.open(data if isinstance(data, Path) else io.BytesIO(data))
    img.load()
    arr = np.asarray(img.convert("L"), dtype=float)
    assert img.size[0] >= 800 and img.size[1] >= 400, img.size
    assert arr.std() > 10, "image is (nearly) one flat colour"
    assert len(np.unique(arr)) > 20
    return img


def _assert_safe_page(page: _Page) -> None:
    scripts = [a for t, a in page.tags if t == "script"]
    assert len(scripts) == 1 and "src" not in scripts[0]  # only the inline sorter
    assert not [t for t, _ in page.tags if t in ("link", "iframe", "object", "embed", "base", "form")]
    for t, attrs in page.tags:
        assert not [k for k in attrs if k.startswith("on")], (t, attrs)  # no event handlers
        if t == "img":
            assert attrs["src"].startswith("data:image/png;base64,")
    csp = [a for t, a in page.tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
    assert csp and "default-src 'none'" in csp[0]["content"]


def test_report_draws_every_figure_with_data(cli_report):
    out, stdout = cli_report
    pngs = {p.stem: p for p in out.glob("*.png")}
    assert set(pngs) == ALWAYS, stdout
    for name in CONDITIONAL:
        assert f"left out {name}:" in stdout
    for p in pngs.values():
        img = _assert_real_image(p)
        if p.stem == "stages":  # as tall as its rows need: 0.26 in per configuration, no overlap
            assert img.size[0] == 1500 and img.size[1] >= 330
        else:
            assert img.size == (1500, 840)  # 10 x 5.6 in at 150 dpi

    text = (out / "report.html").read_text()
    page = _parse(text)
    _assert_safe_page(page)
    imgs = [a for t, a in page.tags if t == "img"]
    assert len(imgs) == len(pngs)
    for p in pngs.values():  # embedded byte for byte, and each decodes
        b64 = base64.b64encode(p.read_bytes()).decode()
        assert f"data:image/png;base64,{b64}" in text
    for a in imgs:
        _assert_real_image(base64.b64decode(a["src"].split(",", 1)[1]))
    assert sum(1 for t, a in page.tags if t == "table" and a.get("class") == "sortable") >= len(pngs) + 1
    assert "http://" not in text and "https://" not in text  # nothing external to load
    for key in METRICS:
        assert key in text  # the glossary defines every metric
    assert "looks at the whole batch" in text and "expert_choice †" in text
    counts = load_runs([out.parent]).runs[0].counts
    for word in (
        "git commit",
        "torch 2",
        "plugins loaded",
        "machine",
        f"{counts.get('ok', 0)} ok",
        f"{counts.get('error', 0)} error",
        f"{counts.get('skipped', 0)} skipped",
    ):
        assert word in text  # run metadata and counts

    md = (out / "report.md").read_text()
    for name in pngs:
        assert re.search(rf"!\[[^\]]+\]\({name}\.png\)", md), name
    assert "| router |" in md and "## Glossary" in md


def test_figure_tables_hold_the_numbers(run):
    data = load_runs([run])
    fo = F.throughput(data)
    assert isinstance(fo, S.FigureOut)
    t = fo.table
    assert set(t["mode"]) == {"fwd+bwd"}
    assert (t["tokens_per_s_at_p80_time"] <= t["tokens_per_s"] + 1e-9).all()
    assert (t["tokens_per_s"] <= t["tokens_per_s_at_p20_time"] + 1e-9).all()
    drops = R.drop_vs_capacity(data)
    ec = drops.table[drops.table["router"].str.startswith("expert_choice")]
    assert ec["drop_rate"].isna().all() and ec["tokens_dropped_frac"].notna().all()
    assert "undefined" in drops.caption and "topk" in drops.caption  # topk is dropless by default
    stages = F.stages(data)
    assert "time_backward_median" in stages.table.columns
    assert "time_shared_median" not in stages.table.columns  # no router here has a shared expert


def test_figures_without_data_are_left_out(run):
    data = load_runs([run])

    def only(mask):
        ok = data.ok[mask(data.ok)].reset_index(drop=True)
        return dataclasses.replace(data, ok=ok, reference=reference_values(ok))

    fwd = dataclasses.replace(data, ok=data.ok.assign(mode="fwd", time_backward_median=0.0))
    fwd.reference = reference_values(fwd.ok)
    fo = F.stages(fwd)
    assert "time_backward_median" not in fo.table.columns  # no backward measured, no bar
    assert isinstance(F.memory(only(lambda d: d["tokens"] == 64)), S.LeftOut)  # one T: no memory-vs-T
    assert isinstance(R.drop_vs_capacity(only(lambda d: d["router"] == "topk")), S.LeftOut)  # dropless
    assert isinstance(R.drops_breakdown(dataclasses.replace(data, breakdown=None)), S.LeftOut)
    assert isinstance(R.layer_loads(data), S.LeftOut)


def test_hostile_strings_are_escaped(hostile_report):
    text = (hostile_report / "report.html").read_text()
    md = (hostile_report / "report.md").read_text()
    assert text.count("<script") == 1 and "<script" not in md  # only the page's own sorter
    for doc in (text, md):
        for raw in (SCRIPT, ALERT, IMG, "<img src=x"):
            assert raw not in doc
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in doc
        assert "&lt;img src=x onerror=alert(1)&gt;" in doc
    assert html.escape(f"RuntimeError: {HOSTILE}") in text  # error text shown, escaped
    assert html.escape(f"/plugins/{HOSTILE}.py") in text  # plugin name shown, escaped
    page = _parse(text)
    _assert_safe_page(page)
    assert page.title == "MoE routing benchmark report"


def test_error_and_skipped_rows_are_listed_not_drawn(hostile_report):
    data = load_runs([hostile_report.parent / "run"])
    assert set(data.excluded["status"]) == {"error", "skipped"}
    assert not data.ok["router"].str.startswith(("ghost", "skipper")).any()
    for fn in (F.throughput, F.pareto, R.balance, R.drop_vs_capacity):
        fo = fn(data)
        assert not fo.table["router"].astype(str).str.startswith(("ghost", "skipper")).any()
    text = (hostile_report / "report.html").read_text()
    section = text.split('id="excluded"', 1)[1].split('id="all"', 1)[0]
    assert "e" * 16 in section and "s" * 16 in section and "skipper" in section
    assert "einsum mask needs 9 GiB" in section
    md = (hostile_report / "report.md").read_text()
    assert "skipper" in md.split("## Excluded", 1)[1]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (CI installs it: apt-get install chromium)")
def test_page_renders_in_headless_chromium(hostile_report, tmp_path):
    url = (hostile_report / "report.html").resolve().as_uri()
    shot = tmp_path / "page.png"
    base = [CHROMIUM, *CHROME_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = _parse(dom.stdout)
    assert page.title == "MoE routing benchmark report"  # the planted script did not run
    assert 'data-sorter="ready"' in dom.stdout  # our own script did (the CSP allows exactly it)
    n_png = len(list(hostile_report.glob("*.png")))
    assert sum(1 for t, _ in page.tags if t == "img") == n_png
    assert sum(1 for t, _ in page.tags if t == "table") >= n_png + 2
    assert not [t for t, a in page.tags if t == "img" and not a.get("src", "").startswith("data:")]
    proc = subprocess.run(
        [*base, f"--screenshot={shot}", "--window-size=1400,4000", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    _assert_real_image(shot)


def test_breakdown_drift_and_layer_figures(run, tmp_path, clone):
    dst = clone(run, tmp_path / "run")
    data = load_runs([dst])
    sl = data.slice()
    cids = sl["config_id"].tolist()
    bd = []
    for cid in cids:
        r = sl[sl["config_id"] == cid].iloc[0]
        for kind, buckets in (
            ("frequency", ["frequent", "middle", "rare"]),
            ("position", ["q1", "q2", "q3", "q4"]),
        ):
            for i, b in enumerate(buckets):
                bd.append(
                    {
                        "run_id": r["run_id"],
                        "config_id": cid,
                        "router": r["router"],
                        "workload": r["workload"],
                        "kind": kind,
                        "bucket": b,
                        "drop_rate": 0.1 * i,
                        "tokens_dropped_frac": 0.05 * i,
                    }
                )
    pd.DataFrame(bd).to_parquet(dst / "breakdown.parquet")
    # Drift: the hot expert moves one step per batch. Layers: a trace's loads for four layers.
    drift_cid, layer_cid = cids[0], cids[1]
    loads = pd.read_parquet(dst / "loads" / f"{drift_cid}.parquet")
    loads["requested"] = np.where(loads["expert"] == loads["batch"] % 8, 100, 10)
    loads.to_parquet(dst / "loads" / f"{drift_cid}.parquet")
    base = pd.read_parquet(dst / "loads" / f"{layer_cid}.parquet")
    layered = pd.concat(
        [base.assign(layer=k, requested=np.where(base["expert"] == 0, 10 + 10 * k, 10)) for k in range(4)],
        ignore_index=True,
    )
    layered.to_parquet(dst / "loads" / f"{layer_cid}.parquet")

    data = load_runs([dst])
    with S.figure_style():
        drift, bdf, layer = R.load_drift(data), R.drops_breakdown(data), R.layer_loads(data)
    for fo in (drift, bdf, layer):
        assert isinstance(fo, S.FigureOut), fo
        png = tmp_path / f"{fo.name}.png"
        fo.fig.savefig(png, dpi=S.DPI)
        _assert_real_image(png)
    assert drift.table["config_id"].tolist() == [drift_cid]
    freq = bdf.table[bdf.table["kind"] == "frequency"]
    assert list(pd.unique(freq["bucket"])) == ["frequent", "middle", "rare"]  # the table's own order
    assert set(bdf.table["kind"]) == {"frequency", "position"}
    assert sorted(layer.table["layer"].unique()) == [0, 1, 2, 3]
    imb = layer.table.sort_values("layer")["imbalance"].to_numpy()
    assert (np.diff(imb) > 0).all()  # expert 0 grows hotter layer by layer


def test_loads_changing_separates_drift_from_sampling_noise():
    rng = np.random.default_rng(0)
    iid = rng.multinomial(4096, [1 / 16] * 16, size=10)
    assert not loads_changing(iid)
    p = np.linspace(1, 3, 16)
    drift = np.stack([rng.multinomial(4096, np.roll(p, b) / p.sum()) for b in range(10)])
    assert loads_changing(drift)
    assert not loads_changing(np.full((1, 8), 5))  # one batch: nothing to compare


def test_several_runs_share_figures_with_a_run_hue(run, tmp_path, clone):
    other = clone(run, tmp_path / "again")
    assert default_out([run]) == run / "report"
    out = default_out([run, other])
    assert out.parent == run.parent.resolve() and out.name.startswith("report-")
    data = load_runs([run, other])
    fo = F.throughput(data)
    assert set(fo.table["run"]) == {run.name, "again"}
    assert set(data.ok["series"]) == {f"uniform · {run.name}", "uniform · again"}
    text = render_html(Report(tmp_path, tmp_path / "r.html", tmp_path / "r.md", [], [], data))
    assert text.count("<h3>") == 2 and "again" in text


def test_report_refuses_a_bad_path_in_one_line(tmp_path):
    res = CliRunner().invoke(main, ["report", str(tmp_path / "nope")])
    assert res.exit_code == 2
    assert res.output.strip().count("\n") == 0 and "no such run directory" in res.output


def test_glossary_defines_every_measured_column():
    for col, _ in [*_MEASURE_COLUMNS, *_METRIC_COLUMNS]:
        assert glossary_for(col), f"report glossary has no entry for {col}"
    for m in METRICS:
        assert GLOSSARY[m] == METRICS[m]


def test_md_escape_neutralises_markdown_and_html():
    assert md_escape("a|b") == "a\\|b"
    assert md_escape("`x`") == "\\`x\\`"
    assert md_escape("[t](javascript:x)") == "\\[t\\](javascript:x)"
    assert md_escape("<b>&") == "&lt;b&gt;&amp;"
    assert md_escape("two\nlines") == "two lines"
    assert md_escape(float("nan")) == "n/a"
