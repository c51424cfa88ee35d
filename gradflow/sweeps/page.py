"""The sweep page: one self-contained HTML file (plotly.js, script and data inlined).

Like the report (:mod:`gradflow.report.page`), it loads nothing from the network and never
puts text from a run file into markup: the page's script sets every such text as text
(``textContent``), and the figures' labels are escaped for plotly's label markup.
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradflow.errors import GradflowError
from gradflow.escape import visible_all
from gradflow.plots.interactive import plain
from gradflow.report.data import to_json
from gradflow.report.page import document
from gradflow.runfile import check_writable
from gradflow.safefile import atomic_write
from gradflow.sweeps.figures import cells, heatmap_figure, scalar_figure, setting, text
from gradflow.sweeps.scalars import SCALARS

if TYPE_CHECKING:
    from gradflow.sweeps.core import Sweep

_BODY = """<header>
  <h1 id="title"></h1>
  <p id="structure"></p>
  <ul id="notes"></ul>
</header>
<main>
  <section id="overview">
    <div id="table-box"><table id="runs"></table></div>
    <div id="scalar-box">
      <div id="controls">
        <label>scalar <select id="scalar"></select></label>
        <label>against <select id="x"></select></label>
      </div>
      <div id="scalar-plot" class="plot"></div>
    </div>
  </section>
  <section id="heatmaps"></section>
</main>"""


def _asset(name: str) -> str:
    return (resources.files("gradflow.sweeps") / name).read_text(encoding="utf-8")


def _number(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no NaN


def _table(sweep: Sweep) -> dict[str, Any]:
    """The runs, one row each in the factors' order: file, differing settings, scalars."""
    structure = sweep.structure
    summaries = sweep.summaries
    order = [i for cell in cells(summaries, structure.columns) for i in cell.members]
    rows = []
    for i in order:
        s = summaries[i]
        settings = [text(setting(s, key)) for key in structure.columns]
        scalars = [_number(s.scalars.get(name, math.nan)) for name in SCALARS]
        rows.append([s.path.name, *settings, *scalars])
    return {
        "columns": ["run", *structure.columns, *SCALARS],
        "numeric": [False] * (1 + len(structure.columns)) + [True] * len(SCALARS),
        "rows": rows,
    }


def payload(sweep: Sweep, x: str | None) -> dict[str, Any]:
    """Everything the sweep page shows, JSON-serialisable, every string in it
    :func:`~gradflow.escape.visible` (names and config values come from anyone)."""
    structure = sweep.structure
    columns = [*structure.columns, *([x] if x and x not in structure.columns else [])]
    xs: list[str | None] = [*columns] or [None]
    scalars = list(SCALARS)
    summaries = sweep.summaries
    figures = {
        f"{name}|{choice or ''}": plain(scalar_figure(summaries, structure, name, choice))
        for name in scalars
        for choice in xs
    }
    with_values = [
        name
        for name in scalars
        if any(math.isfinite(s.scalars.get(name, math.nan)) for s in sweep.summaries)
    ]
    skipped = [f"skipped {reason}" for _, reason in sweep.skipped]
    data = {
        "title": f"gradflow sweep: {len(sweep.summaries)} runs",
        "structure": structure.describe(),
        "notes": [*structure.follow_notes(), *skipped],
        "table": _table(sweep),
        "scalars": [
            {"name": n, "label": SCALARS.get(n).label, "doc": SCALARS.summary(n)} for n in scalars
        ],
        "xs": [choice or "" for choice in xs],
        "scalar_figures": figures,
        "default": {"scalar": (with_values or scalars)[0], "x": x or ""},
        "heatmaps": [
            {"stat": stat, "figure": plain(heatmap_figure(summaries, structure, stat))}
            for stat in sweep.stats
        ],
    }
    return dict(visible_all(data))


def check_out(out: Path, *, force: bool) -> None:
    """Refuse ``out`` before any run is read: not ``.html``, or existing without ``force``."""
    if out.suffix.lower() not in (".html", ".htm"):
        raise GradflowError(f"{out}: the sweep page is an HTML file; name it .html")
    check_writable(out, overwrite=force)


def write_page(sweep: Sweep, out: Path, *, force: bool, x: str | None) -> Path:
    """Write the sweep page of ``sweep`` to ``out`` (``.html``), atomically.

    Args:
        sweep: the runs.
        out: the HTML file.
        force: replace ``out`` if it exists.
        x: the setting the scalar plot shows first (None: the sweep's default).

    Returns:
        ``out``.
    """
    check_out(out, force=force)
    data = payload(sweep, sweep.check_x(x))
    page = document(data["title"], _BODY, to_json(data), _asset("sweep.js"), _asset("sweep.css"))
    with atomic_write(out) as file:
        file.write(page.encode("utf-8"))
    return out
