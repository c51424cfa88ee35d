"""Interactive layer x time heat maps as plotly figures, drawn like the browser report.

The same colour maps (:func:`~gradflow.plots.style.plotly_colourscale`), the same grey for
"not measured", log colour as log10 of the values with zeros at the bottom of the scale,
infinite values at its ends, and the report's stage marks: group names along the layer axis
(the bottleneck in bold, with a dark strip), a line between groups. Hover shows the layer,
the step or epoch and the value.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from plotly import graph_objects as go

from gradflow.plots.binning import LayerTime
from gradflow.plots.selection import layer_groups
from gradflow.plots.style import (
    BAD_COLOUR,
    FIXED_LIMITS,
    HEAT_CMAP,
    MARKER_COLOUR,
    finite_range,
    plotly_colourscale,
    spaced_labels,
    stat_label,
)
from gradflow.runfile import Event

LABEL_PX = 13  # height of a 10 px group label with its spacing
STAGE_LINE = {"color": "black", "width": 0.6}
BOTTLENECK_FILL = "#262626"


@dataclass(frozen=True)
class HeatPanel:
    """One heat map of a grid: its title, its data and the first non-finite event to mark."""

    title: str
    data: LayerTime
    event: Event | None = None


@dataclass(frozen=True)
class ColourScale:
    """How values become colours: log10 or linear, between ``lo`` and ``hi`` (in drawn
    units, so log10 values for a log scale)."""

    log: bool
    lo: float
    hi: float

    @classmethod
    def of(cls, stat: str, values: Sequence[np.ndarray], log: bool) -> ColourScale:
        """The scale shared by ``values``; log falls back to linear where no value is positive."""
        if log and stat not in FIXED_LIMITS:
            lo, hi = finite_range(values, positive=True)
            if not np.isnan(lo):
                return cls(True, float(np.log10(lo)), float(np.log10(hi)))
        lo, hi = FIXED_LIMITS.get(stat, finite_range(values))
        return cls(False, 0.0, 1.0) if np.isnan(lo) else cls(False, float(lo), float(hi))

    def colour_values(self, values: np.ndarray) -> np.ndarray:
        """What plotly colours: log10 (zeros and negatives at the bottom) or the values,
        +-inf at the ends of the scale, NaN kept (drawn as "not measured")."""
        v = np.asarray(values, np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.where(v > 0, np.log10(v), self.lo) if self.log else v.copy()
        z[np.isnan(v)] = np.nan
        z[v == np.inf] = self.hi
        z[v == -np.inf] = self.lo
        return z

    def axis(self, label: str) -> dict[str, object]:
        """The layout's ``coloraxis``: colour map, limits and a colour bar (1eK ticks for log)."""
        colorbar: dict[str, object] = {"title": {"text": html.escape(label), "side": "right"}}
        if self.log:
            colorbar.update(log_ticks(self.lo, self.hi))
        colorbar["thickness"] = 12
        return {
            "colorscale": plotly_colourscale(HEAT_CMAP),
            "cmin": self.lo,
            "cmax": self.hi if self.hi > self.lo else self.lo + 1.0,
            "colorbar": colorbar,
        }


def _sci(value: float) -> str:
    """``6.3e-4`` (two significant digits, the exponent without padding)."""
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def log_ticks(lo: float, hi: float) -> dict[str, list[Any]]:
    """Colour-bar ticks for log10 values from ``lo`` to ``hi``: powers of ten, with 2 and 5
    times them where the range spans less than two decades, and four evenly spaced values
    where even those give fewer than two ticks."""
    decades = range(int(np.floor(lo)), int(np.ceil(hi)) + 1)
    steps = (1, 2, 5) if hi - lo < 2 else (1,)
    ticks = [(k + np.log10(m), f"{m}e{k}") for k in decades for m in steps]
    inside = [(float(v), t) for v, t in ticks if lo - 1e-9 <= v <= hi + 1e-9]
    if len(inside) < 2:
        inside = [(float(v), _sci(10**v)) for v in np.linspace(lo, hi, 4)]
    return {"tickvals": [v for v, _ in inside], "ticktext": [t for _, t in inside]}


def _integer_ticks(edges: np.ndarray) -> dict[str, Any]:
    """Steps and epochs are whole numbers: a tick per unit where few fit (as the report)."""
    if edges[-1] - edges[0] > 12:
        return {}
    return {"tickmode": "linear", "tick0": float(np.ceil(edges[0])), "dtick": 1}


def _time_axis(data: LayerTime) -> tuple[np.ndarray, str]:
    """Cell centres along time and how hover names them (a bin of several steps by its
    centre)."""
    centres = (data.edges[:-1] + data.edges[1:]) / 2
    if np.array_equal(data.spans[:, 0], data.spans[:, 1]):
        return data.spans[:, 0].astype(np.float64), f"{data.unit} %{{x}}"
    return centres, f"{data.unit}s around %{{x:.0f}} (mean of the bin)"


def _stage_marks(
    data: LayerTime, axis: int, panel_px: float
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Group names at the group centres, left of the panel (annotations: the layer axis
    keeps its categories, the layer names, for hover), as many as fit ``panel_px`` pixels
    of height, and the lines between groups and the bottleneck's strip."""
    found = layer_groups(data.layers)
    labelled = spaced_labels(found, min_gap=len(data.layers) * LABEL_PX / max(panel_px, 1.0))
    suffix = "" if axis == 1 else str(axis)
    xref, yref = f"x{suffix} domain", f"y{suffix}"  # "x domain": the panel's own width
    labels = [
        {
            "text": f"<b>{html.escape(s.name)}</b>" if s.bottleneck else html.escape(s.name),
            "xref": xref,
            "yref": yref,
            "x": -0.01,
            # A category axis places numbers by the categories' serial numbers.
            "y": (s.start + s.stop - 1) / 2,
            "xanchor": "right",
            "showarrow": False,
            "font": {"size": 10},
        }
        for s in labelled
    ]
    suffix = "" if axis == 1 else str(axis)
    xref, yref = f"x{suffix} domain", f"y{suffix}"  # "x domain": the panel's own width
    shapes: list[dict[str, Any]] = [
        {
            "type": "line",
            "xref": xref,
            "yref": yref,
            "x0": 0,
            "x1": 1,
            "y0": s.start - 0.5,
            "y1": s.start - 0.5,
            "line": STAGE_LINE,
            "opacity": 0.6,
        }
        for s in found[1:]
    ]
    shapes += [
        {
            "type": "rect",
            "xref": xref,
            "yref": yref,
            "x0": 0,
            "x1": 0.015,
            "y0": s.start - 0.5,
            "y1": s.stop - 0.5,
            "fillcolor": BOTTLENECK_FILL,
            "line": {"width": 0},
        }
        for s in found
        if s.bottleneck
    ]
    return labels, shapes


def grid_domains(
    rows: int, columns: int, gap_x: float, gap_y: float
) -> list[tuple[list[float], list[float]]]:
    """The x and y domains (paper fractions) of the panels of a grid, row by row from the top."""
    width = (1 - gap_x * (columns - 1)) / columns
    height = (1 - gap_y * (rows - 1)) / rows
    out = []
    for i in range(rows * columns):
        row, col = divmod(i, columns)
        x0 = col * (width + gap_x)
        y1 = 1 - row * (height + gap_y)
        out.append(([x0, x0 + width], [y1 - height, y1]))
    return out


def plain(spec: Any) -> Any:
    """A figure spec (dicts, lists, numpy arrays) as JSON-ready data: float and integer
    arrays as plotly's base64 typed arrays (``{"dtype", "bdata", "shape"}``), which keep
    NaN and infinities and take a quarter of the text."""
    if isinstance(spec, dict):
        return {key: plain(value) for key, value in spec.items()}
    if isinstance(spec, (list, tuple)):
        return [plain(value) for value in spec]
    if isinstance(spec, np.ndarray) and spec.dtype.kind in "fiu":
        kind = spec.dtype.kind  # plotly.js has no 64-bit integers: they go as 32-bit
        size = max(spec.dtype.itemsize, 4) if kind == "f" else min(spec.dtype.itemsize, 4)
        array = np.ascontiguousarray(spec, dtype=f"<{kind}{size}")
        return {
            "dtype": array.dtype.str[1:],
            "bdata": base64.b64encode(array.tobytes()).decode(),
            "shape": ", ".join(map(str, array.shape)),
        }
    if isinstance(spec, np.ndarray):
        return spec.tolist()
    if isinstance(spec, np.generic):
        return spec.item()
    return spec


def _heat_trace(panel: HeatPanel, scale: ColourScale, label: str, axis: str) -> dict[str, Any]:
    data = panel.data
    x, when = _time_axis(data)
    return {
        "type": "heatmap",
        "x": x,
        "y": [lay.name for lay in data.layers],
        "z": scale.colour_values(data.values.T).astype(np.float32),
        "customdata": data.values.T.astype(np.float32),
        "coloraxis": "coloraxis",
        "hoverongaps": False,
        "hovertemplate": (
            f"layer %{{y}}<br>{when}<br>{html.escape(label)} %{{customdata:.4g}}"
            f"<extra>{html.escape(panel.title)}</extra>"
        ),
        "xaxis": f"x{axis}",
        "yaxis": f"y{axis}",
    }


def _event_trace(panel: HeatPanel, axis: str) -> dict[str, Any] | None:
    ev, data = panel.event, panel.data
    if ev is None or ev.layer not in {lay.name for lay in data.layers}:
        return None
    return {
        "type": "scatter",
        "x": [ev.epoch if data.unit == "epoch" else ev.step],
        "y": [ev.layer],
        "mode": "markers",
        "marker": {
            "symbol": "x",
            "size": 11,
            "color": MARKER_COLOUR,
            "line": {"color": "black", "width": 1},
        },
        "name": html.escape(f"first non-finite {ev.probe}: {ev.layer}, step {ev.step}"),
        "hoverinfo": "name",
        "showlegend": False,
        "xaxis": f"x{axis}",
        "yaxis": f"y{axis}",
    }


def heatmap_spec(
    panels: Sequence[HeatPanel],
    stat: str,
    *,
    log: bool,
    columns: int,
    title: str | None = None,
    row_height: int | None = None,
) -> dict[str, Any]:
    """Heat maps of ``stat`` in a grid, ``columns`` wide, layers top (input) to bottom, one
    colour scale for all, as a plotly figure spec (``{"data": [...], "layout": {...}}``,
    built without plotly's per-property validation: a sweep draws hundreds of panels).

    Args:
        panels: the heat maps, row by row.
        stat: the statistic drawn (``probe/name``): its label and fixed limits.
        log: log colour where the values have positive ones.
        columns: panels per row.
        title: the figure's title.
        row_height: pixels per row of panels (default: from the number of layers).

    Returns:
        The spec; ``plotly.graph_objects.Figure(spec)`` makes it a figure.
    """
    columns = max(1, min(columns, len(panels)))
    rows = -(-len(panels) // columns)
    scale = ColourScale.of(stat, [p.data.values for p in panels], log)
    label = stat_label(stat)
    most = max(len(p.data.layers) for p in panels)
    height = row_height or min(560, max(320, 120 + 10 * most))
    total = height * rows + (40 if title else 0)
    domains = grid_domains(rows, columns, min(0.12, 0.5 / columns), 70 / total)
    margin = {"l": 90, "r": 10, "t": 60 if title else 40, "b": 40}
    traces: list[dict[str, Any]] = []
    shapes: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    layout: dict[str, Any] = {}
    for i, panel in enumerate(panels):
        axis = "" if i == 0 else str(i + 1)
        traces.append(_heat_trace(panel, scale, label, axis))
        event = _event_trace(panel, axis)
        if event is not None:
            traces.append(event)
        panel_px = (domains[i][1][1] - domains[i][1][0]) * (total - margin["t"] - margin["b"])
        labels, marks = _stage_marks(panel.data, i + 1, panel_px)
        shapes += marks
        annotations += labels
        (x0, x1), (_, y1) = domains[i]
        layout[f"xaxis{axis}"] = {
            "domain": [x0, x1],
            "anchor": f"y{axis}",
            "title": {"text": panel.data.unit} if i // columns == rows - 1 else None,
            "showgrid": False,
            "zeroline": False,
            "range": [float(panel.data.edges[0]), float(panel.data.edges[-1])],
            **_integer_ticks(panel.data.edges),
        }
        layout[f"yaxis{axis}"] = {
            "domain": domains[i][1],
            "anchor": f"x{axis}",
            "type": "category",
            "showgrid": False,
            "zeroline": False,
            "showticklabels": False,
            "ticks": "",
            # Fixed: labels placed in data coordinates would widen an automatic range.
            "range": [len(panel.data.layers) - 0.5, -0.5],
            "autorange": False,
        }
        annotations.append(
            {
                "text": html.escape(panel.title),
                "x": (x0 + x1) / 2,
                "y": y1,
                "xref": "paper",
                "yref": "paper",
                "xanchor": "center",
                "yanchor": "bottom",
                "showarrow": False,
                "font": {"size": 12},
            }
        )
    layout.update(
        template="none",
        title={"text": html.escape(title), "x": 0, "xanchor": "left"} if title else None,
        coloraxis=scale.axis(label),
        plot_bgcolor=BAD_COLOUR,  # a cell without a value: not measured
        shapes=shapes,
        annotations=annotations,
        height=total,
        margin=margin,
    )
    return {"data": traces, "layout": layout}


def heatmap_grid(panels: Sequence[HeatPanel], stat: str, **options: Any) -> go.Figure:
    """:func:`heatmap_spec` as a plotly figure (same arguments)."""
    return go.Figure(heatmap_spec(panels, stat, **options))
