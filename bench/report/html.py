"""``report.html``: one self-contained page (images as data URIs, CSS inline, one tiny inline
sorter script), and the escaping rules every report string goes through.

Everything a run contributes (router and workload labels, plugin names, config values, error
text, metadata) reaches the page only through :func:`esc` / :func:`tag`, which escape with
``html.escape``; only markup built here is wrapped in :class:`Html`. As a second line of defence
the page carries a Content-Security-Policy that allows no network access and runs no script but
the sorter (by its SHA-256), so even a string that slipped through could not execute.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
from collections.abc import Iterable
from typing import Any

import pandas as pd


class Html(str):
    """Markup built by this module: not escaped again."""


def esc(value: Any) -> Html:
    return value if isinstance(value, Html) else Html(html.escape(str(value), quote=True))


def tag(name: str, *children: Any, **attrs: Any) -> Html:
    """``<name attrs>children</name>``; attribute values and non-Html children are escaped.
    A trailing underscore in an attribute name is dropped (``class_``)."""
    attr = "".join(f' {k.rstrip("_").replace("_", "-")}="{esc(v)}"' for k, v in attrs.items() if v is not None)
    return Html(f"<{name}{attr}>" + "".join(esc(c) for c in children) + f"</{name}>")


def join(parts: Iterable[Any]) -> Html:
    return Html("".join(esc(p) for p in parts))


def fmt(value: Any) -> str:
    """Numbers to 4 significant digits, NaN and None as n/a, booleans as yes/no."""
    if value is None or value is pd.NA:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.4g}"
    if hasattr(value, "item"):  # numpy scalars
        return fmt(value.item())
    return str(value)


def _sort_key(value: Any) -> str | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) or isinstance(value, bool) else repr(f)


def table(df: pd.DataFrame, caption: str | None = None, max_rows: int | None = None) -> Html:
    """A sortable table (click a header); numeric cells carry their exact value in data-v."""
    shown = df if max_rows is None else df.head(max_rows)
    head = tag("tr", join(tag("th", c, title="click to sort") for c in df.columns))
    body = []
    for rec in shown.itertuples(index=False):
        cells = [tag("td", fmt(v), data_v=_sort_key(v)) for v in rec]
        body.append(tag("tr", join(cells)))
    note = ""
    if max_rows is not None and len(df) > max_rows:
        note = tag("p", f"First {max_rows} of {len(df)} rows.", class_="note")
    cap = tag("caption", caption) if caption else ""
    return join(
        [
            tag(
                "div",
                tag("table", cap, tag("thead", head), tag("tbody", join(body)), class_="sortable"),
                class_="scroll",
            ),
            note,
        ]
    )


def image(png: bytes, alt: str) -> Html:
    data = base64.b64encode(png).decode("ascii")
    return Html(f'<img src="data:image/png;base64,{data}" alt="{esc(alt)}">')


def pre_json(obj: Any) -> Html:
    return tag("pre", json.dumps(obj, indent=2, sort_keys=True, default=str))


SORTER_JS = """
(function () {
  function key(td) {
    var v = td.getAttribute('data-v');
    return v === null ? null : parseFloat(v);
  }
  document.querySelectorAll('table.sortable').forEach(function (t) {
    var ths = t.tHead.rows[0].cells;
    Array.prototype.forEach.call(ths, function (th, i) {
      th.addEventListener('click', function () {
        var dir = th.getAttribute('data-dir') === 'asc' ? -1 : 1;
        Array.prototype.forEach.call(ths, function (h) { h.removeAttribute('data-dir'); });
        th.setAttribute('data-dir', dir > 0 ? 'asc' : 'desc');
        var body = t.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = key(a.cells[i]), y = key(b.cells[i]);
          if (x !== null && y !== null) { return dir * (x - y); }
          if (x !== null) { return -1; }
          if (y !== null) { return 1; }
          return dir * a.cells[i].textContent.localeCompare(b.cells[i].textContent);
        });
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
  });
  document.body.setAttribute('data-sorter', 'ready');
})();
"""

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto;
       max-width: 1500px; padding: 0 24px 48px; color: #1b1b1b; }
h1 { margin-top: 28px; } h2 { border-bottom: 2px solid #ddd; padding-bottom: 4px; margin-top: 40px; }
figure { margin: 16px 0 8px; } figure img { max-width: 100%; border: 1px solid #e3e3e3; }
figcaption, .note { color: #444; font-size: 14px; max-width: 1100px; }
.scroll { overflow-x: auto; max-height: 480px; overflow-y: auto; border: 1px solid #e3e3e3; }
table { border-collapse: collapse; font-size: 13px; font-variant-numeric: tabular-nums; }
th, td { padding: 3px 10px; border-bottom: 1px solid #eee; text-align: left; white-space: nowrap; }
th { background: #f4f4f4; cursor: pointer; position: sticky; top: 0; }
th[data-dir=asc]::after { content: " \\25B2"; } th[data-dir=desc]::after { content: " \\25BC"; }
td[data-v] { text-align: right; }
table.glossary td, table.glossary th { white-space: normal; vertical-align: top; cursor: auto; }
table.glossary th { position: static; background: none; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; }
dl.meta dt { font-weight: 600; } dl.meta dd { margin: 0; word-break: break-all; }
pre { background: #f7f7f7; padding: 8px; overflow-x: auto; font-size: 12px; max-height: 320px; }
.err { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 12px; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; background: #eee; margin-right: 6px; }
"""


def _csp() -> str:
    digest = base64.b64encode(hashlib.sha256(SORTER_JS.encode()).digest()).decode()
    return (
        "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
        f"script-src 'sha256-{digest}'; base-uri 'none'; form-action 'none'"
    )


def page(title: str, body: Html) -> str:
    """The whole document: CSP first, then style, content, and the sorter at the end."""
    head = join(
        [
            Html('<meta charset="utf-8">'),
            Html(f'<meta http-equiv="Content-Security-Policy" content="{esc(_csp())}">'),
            Html('<meta name="viewport" content="width=device-width, initial-scale=1">'),
            tag("title", title),
            Html(f"<style>{CSS}</style>"),
        ]
    )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>'
        + head
        + "</head>\n<body>\n"
        + body
        + f"\n<script>{SORTER_JS}</script>\n</body>\n</html>\n"
    )


def meta_list(pairs: list[tuple[str, Any]]) -> Html:
    return tag("dl", join(join([tag("dt", k), tag("dd", fmt(v))]) for k, v in pairs), class_="meta")


_MD_ESCAPES = str.maketrans(
    {
        "\\": "\\\\",
        "|": "\\|",
        "`": "\\`",
        "[": "\\[",
        "]": "\\]",
        "&": "&amp;",
        "<": "&lt;",
        ">": "&gt;",
        "\r": " ",
        "\n": " ",
    }
)


def md_escape(value: Any) -> str:
    """Text safe inside GitHub markdown and its tables: no raw HTML (angle brackets and & become
    entities), no code spans, links or cell breaks (backticks, brackets, pipes are backslashed),
    one line."""
    return (value if isinstance(value, str) else fmt(value)).translate(_MD_ESCAPES)


def md_table(df: pd.DataFrame, max_rows: int | None = 40) -> str:
    shown = df if max_rows is None else df.head(max_rows)
    lines = ["| " + " | ".join(md_escape(c) for c in df.columns) + " |"]
    lines.append(
        "|" + "|".join(" ---: " if pd.api.types.is_numeric_dtype(df[c]) else " --- " for c in df.columns) + "|"
    )
    for rec in shown.itertuples(index=False):
        lines.append("| " + " | ".join(md_escape(fmt(v)) for v in rec) + " |")
    if max_rows is not None and len(df) > max_rows:
        lines.append(f"\n_First {max_rows} of {len(df)} rows; all of them are in report.html._")
    return "\n".join(lines)
