"""report.html: the run report as one self-contained page that a browser shows offline.

The same tables as report.md, each stage's settings that differ from the shipped config, its
timings and training curves, and the overlay grid with the full id of every row in its caption.
Every picture is embedded as a `data:` URI; the page names no other file or address, and runs no
script.
"""

from __future__ import annotations

import base64
import datetime
from html import escape
from pathlib import Path

from data.layout import write_text_atomic
from stages.common.tables import html_table

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; } h3 { margin-top: 1.2em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
code { background: #f5f5f5; padding: 0 0.2em; }
figure { margin: 1em 0; } img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #444; } figcaption ol { margin: 0.3em 0; padding-left: 2em; }
.note { color: #666; font-size: 0.9em; }
"""


def data_uri(path: Path) -> str | None:
    """The PNG at `path` as a data: URI, or None when it cannot be read."""
    try:
        return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
    except OSError:
        return None


def figure(path: Path, alt: str, caption: str) -> str:
    uri = data_uri(path)
    if uri is None:
        return f'<p class="note">{escape(alt)}: {escape(path.name)} could not be read.</p>'
    return f'<figure><img src="{uri}" alt="{escape(alt)}"><figcaption>{caption}</figcaption></figure>'


def table(spec) -> str:
    rows, columns, digits = spec
    return html_table(rows, columns, digits)


def write_html(
    path: Path,
    config_source: str,
    tables: dict,
    settings: dict[str, tuple[str, list[dict]]],
    curves: dict[str, Path],
    grids: dict[str, tuple[Path, list[str]]],
    failures: list[tuple[str, str]],
) -> Path:
    """Write the page. `tables`: name -> (rows, columns, digits) for stages, metrics, per_class
    (or None) and timings; `settings`: stage -> (reference name, difference rows); `grids`:
    stage -> (PNG, one caption line per row)."""
    made = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>wss run report: {escape(config_source)}</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>wss run report</h1>",
        f"<p>Config: <code>{escape(config_source)}</code>. Written {made}.</p>",
        "<h2>Stages</h2>",
        table(tables["stages"]),
        "<h2>Metrics</h2>",
        '<p class="note">Ground truth is used for scoring only.</p>',
        table(tables["metrics"]),
    ]
    if tables.get("per_class"):
        parts += ["<h3>Per-class IoU</h3>", table(tables["per_class"])]
    parts += ["<h2>Timings</h2>", table(tables["timings"])]
    stages = list(dict.fromkeys([*settings, *curves]))
    if stages:
        parts.append("<h2>Stages in detail</h2>")
    for stage in stages:
        parts.append(f'<section id="stage-{escape(stage)}"><h3>{escape(stage)}</h3>')
        if stage in settings:
            reference, rows = settings[stage]
            if rows:
                parts.append(f"<p>Settings that differ from <code>{escape(reference)}</code>:</p>")
                parts.append(html_table(rows, ["setting", "this run", "reference"], css_class="settings"))
            else:
                parts.append(f"<p>The settings of <code>{escape(reference)}</code>.</p>")
        if stage in curves:
            parts.append(figure(curves[stage], f"{stage} training curves", "Loss terms and images/s per epoch."))
        parts.append("</section>")
    if grids:
        parts.append("<h2>Overlay grids</h2>")
    for stage, (grid, captions) in grids.items():
        rows = "".join(f"<li><code>{escape(line)}</code></li>" for line in captions)
        caption = f"{escape(stage)}: one row per image, top to bottom" + (f":<ol>{rows}</ol>" if rows else ".")
        parts.append(figure(grid, f"{stage} overlay grid", caption))
    if failures:
        parts += ["<h2>Failures</h2>", "<ul>"]
        parts += [f"<li>{escape(stage)}: {escape(text)}</li>" for stage, text in failures]
        parts.append("</ul>")
    parts.append("</body></html>")
    write_text_atomic(path, "\n".join(parts) + "\n")
    return path
