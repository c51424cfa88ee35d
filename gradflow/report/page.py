"""The report page: one HTML document with plotly.js, the page's script and the data inlined."""

from __future__ import annotations

import html
from collections.abc import Sequence
from contextlib import ExitStack
from importlib import resources
from pathlib import Path

from gradflow.errors import GradflowError
from gradflow.escape import visible
from gradflow.report.data import SCREEN_BINS, payload, to_json
from gradflow.runfile import check_writable, open_run
from gradflow.safefile import atomic_write

_DOCUMENT = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; script-src 'unsafe-inline';
  style-src 'unsafe-inline'; img-src data: blob:; connect-src 'self'">
<title>{title}</title>
<style>{css}</style>
<script>{plotly}</script>
</head>
<body>
{body}
<script id="gradflow-data" type="application/json">{data}</script>
<script>{script}</script>
</body>
</html>
"""
_REPORT_BODY = """<header>
  <h1>{title}</h1>
  <div id="controls">
    <label>layers <input id="layer-filter" type="search" placeholder="name, substring or regex"
      autocomplete="off" spellcheck="false"></label>
    <span id="layer-count"></span>
    <label><input id="log-colour" type="checkbox" checked> log colour</label>
    <span id="live-status"></span>
  </div>
</header>
<main>
  <section id="runs"></section>
  <section id="heatmaps"></section>
  <section id="curves"></section>
</main>
<div id="tooltip" role="tooltip" hidden></div>"""


def _asset(name: str) -> str:
    return (resources.files("gradflow.report") / name).read_text(encoding="utf-8")


def plotly_js() -> str:
    """plotly.js, minified, as the plotly package ships it (about 4.8 MB)."""
    try:
        return (resources.files("plotly") / "package_data" / "plotly.min.js").read_text("utf-8")
    except (ModuleNotFoundError, FileNotFoundError) as err:
        raise GradflowError("the HTML report needs plotly: pip install plotly") from err


def document(title: str, body: str, data: str, script: str, css: str) -> str:
    """A self-contained page: plotly.js, ``css``, ``body``, ``data`` (JSON from
    :func:`~gradflow.report.data.to_json`, safe inside a script element) and ``script``
    inlined, under a Content-Security-Policy that allows no request but to its own origin.
    ``title`` is escaped here (:func:`~gradflow.escape.visible`, then HTML); ``body`` must
    be markup of gradflow's own, with no text from a run file."""
    return _DOCUMENT.format(
        title=html.escape(visible(title)),
        css=css,
        plotly=plotly_js(),
        body=body,
        data=data,
        script=script,
    )


def page(data: str, title: str) -> str:
    """The page around ``data`` (JSON from :func:`~gradflow.report.data.to_json`; ``null``
    makes the page poll ``/data.json`` of the server that sent it)."""
    body = _REPORT_BODY.format(title=html.escape(visible(title)))
    return document(title, body, data, _asset("report.js"), _asset("report.css"))


def build_report(
    paths: Sequence[str | Path],
    out: str | Path,
    *,
    force: bool = False,
    max_bins: int = SCREEN_BINS,
) -> Path:
    """Write the self-contained HTML report of the run files ``paths`` to ``out``."""
    target = Path(out)
    if target.suffix.lower() not in (".html", ".htm"):
        raise GradflowError(f"{target}: the report is an HTML file; name it .html")
    check_writable(target, overwrite=force)
    with ExitStack() as stack:
        runs = [stack.enter_context(open_run(path)) for path in paths]
        data = to_json(payload(runs, max_bins))
        title = "gradflow: " + ", ".join(run.path.name for run in runs)
    text = page(data, title)
    with atomic_write(target) as file:
        file.write(text.encode("utf-8"))
    return target
