"""The look shared by every figure: fonts, colour maps, panel labels, figure sizes."""

from __future__ import annotations

import functools
import re
import string
from collections.abc import Callable, Sequence
from typing import Any, Literal, ParamSpec, TypeVar

import matplotlib as mpl
import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import Colormap, to_hex
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.ticker import Formatter, LogFormatter
from matplotlib.typing import RcKeyType

from gradflow.plots.selection import LayerGroup, layer_groups
from gradflow.runfile import Layer, Run

P = ParamSpec("P")
R = TypeVar("R")

DPI = 120  # keeps gallery PNGs well under 500 KB
HEAT_CMAP = "RdYlBu_r"  # blue = small, red = large, as in the paper
DIFF_CMAP = "RdBu_r"  # diverging, white at 0
BAD_COLOUR = "#c8c8c8"  # NaN: layer not executed / nothing recorded in the bin
MARKER_COLOUR = "#ff00ff"
RC: dict[RcKeyType, Any] = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.titlelocation": "left",
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    # Names from run files are drawn as they are: "$x$" in a layer name is not mathtext
    # (nor is an invalid "$\\foo$" an error). gradflow's own labels use Unicode instead.
    "text.parse_math": False,
}

STAT_LABELS = {
    "epoch/update_abs_mean": "mean |ΔW| over the epoch",
    "epoch/update_ratio": "‖ΔW‖ / ‖W‖ over the epoch",
    "epoch/update_norm": "‖ΔW‖ over the epoch",
    "epoch/update_abs_max": "max |ΔW| over the epoch",
    "param/update_abs_mean": "mean |ΔW| per step",
    "param/update_ratio": "‖ΔW‖ / ‖W‖ per step",
    "param/update_norm": "‖ΔW‖ per step",
    "param/update_abs_max": "max |ΔW| per step",
    "param/grad_norm": "‖∇W‖",
    "param/weight_norm": "‖W‖",
    "param/grad_update_cos": "cos(∇W, ΔW) per step",
    "grad_output/norm": "‖∂L/∂output‖",
    "grad_output/rms": "rms ∂L/∂output",
    "activation/zero_fraction": "fraction of zero activations",
    "activation/mean": "mean activation",
    "activation/std": "std of activations",
    "skip/shortcut_share": "share through the short skip",
    "skip/long_share": "share through the long skip",
    "skip/shortcut_norm": "‖∂L/∂block input‖ via shortcut",
    "skip/branch_norm": "‖∂L/∂block input‖ via branch",
    "skip/long_norm": "‖∂L/∂encoder output‖ via long skip",
    "skip/below_norm": "‖∂L/∂encoder output‖ via path below",
}
MAX_STAGE_LABELS = 30  # about as many 8 pt labels as fit along a 5 inch axis
MAX_LABEL_CHARS = 28  # a layer label's width: about 1.7 inch at 8 pt
EM_WIDTH = 0.62  # a wide-ish character's width in ems (DejaVu Sans digits: 0.64)
# Fractions and cosines: fixed linear scales
FIXED_LIMITS = {"activation/zero_fraction": (0.0, 1.0), "param/grad_update_cos": (-1.0, 1.0)}


def styled(fn: Callable[P, R]) -> Callable[P, R]:
    """Build the figure under gradflow's rc settings without touching the global ones; its
    log-scale ticks are written in Unicode (``10⁻³``), as mathtext is off."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with mpl.rc_context(RC):
            result = fn(*args, **kwargs)
        if isinstance(result, Figure):
            plain_log_ticks(result)
        return result

    return wrapper


_SUPERSCRIPT = str.maketrans("-−0123456789.", "⁻⁻⁰¹²³⁴⁵⁶⁷⁸⁹·")


def _plain(label: str) -> str:
    """A log formatter's mathtext label (``$\\mathdefault{2\\times10^{-3}}$``) as Unicode."""
    if not label.startswith("$"):
        return label
    text = label.strip("$").replace("\\mathdefault", "").replace("\\times", "×")
    text = re.sub(r"\^\{([^}]*)\}", lambda m: m.group(1).translate(_SUPERSCRIPT), text)
    return text.replace("{", "").replace("}", "")


class _PlainLogFormatter(Formatter):
    """A log formatter whose labels are drawn without mathtext (see :func:`_plain`)."""

    def __init__(self, inner: LogFormatter) -> None:
        self.inner = inner

    def set_axis(self, axis: Any) -> None:
        super().set_axis(axis)
        self.inner.set_axis(axis)

    def set_locs(self, locs: Any) -> None:
        self.inner.set_locs(locs)

    def __call__(self, x: float, pos: int | None = None) -> str:
        return _plain(self.inner(x, pos))


def plain_log_ticks(fig: Figure) -> None:
    """Every log-scale axis of ``fig`` (colour bars included) labelled in Unicode.

    Args:
        fig: the figure; changed in place.
    """
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            for get, set_ in ((axis.get_major_formatter, axis.set_major_formatter),
                              (axis.get_minor_formatter, axis.set_minor_formatter)):  # fmt: skip
                formatter = get()
                if isinstance(formatter, LogFormatter):
                    set_(_PlainLogFormatter(formatter))


def colormap(name: str) -> Colormap:
    """A copy of colour map ``name`` with NaN drawn in :data:`BAD_COLOUR`."""
    return mpl.colormaps[name].with_extremes(bad=BAD_COLOUR)


def plotly_colourscale(name: str, n: int = 11) -> list[list[Any]]:
    """Colour map ``name`` as a plotly colour scale (``n`` stops): the browser report and
    the notebook figures draw in the PNG figures' colours."""
    cmap = colormap(name)
    return [[i / (n - 1), to_hex(cmap(i / (n - 1)))] for i in range(n)]


def stat_label(stat: str) -> str:
    """Axis / colour-bar label of a ``probe/name`` statistic."""
    return STAT_LABELS.get(stat, stat)


def run_labels(runs: Sequence[Run]) -> list[str]:
    """Model names; file stems are added where two runs share a model name."""
    names = [run.name for run in runs]
    return [
        f"{name} ({run.path.stem})" if names.count(name) > 1 else name
        for name, run in zip(names, runs, strict=True)
    ]


def run_colours(n: int) -> list[tuple[float, float, float, float]]:
    """One distinct colour per run."""
    cmap = mpl.colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def panel_grid(n: int, panel_size: tuple[float, float]) -> tuple[Figure, list[Axes]]:
    """A constrained-layout figure with ``n`` panels, at most four per row."""
    cols = min(n, 4)
    rows = -(-n // cols)
    fig = Figure(figsize=(panel_size[0] * cols + 1.0, panel_size[1] * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.remove()
    return fig, list(axes[:n])


def panel_title(ax: Axes, index: int, label: str) -> None:
    """Title a panel ``(a) label``, ``(b) label``, ..."""
    letter = string.ascii_lowercase[index % 26]
    ax.set_title(f"({letter}) {label}")


def finite_range(values: Sequence[np.ndarray], positive: bool = False) -> tuple[float, float]:
    """Smallest and largest finite (and, for log scales, positive) value over arrays."""
    lo, hi = np.inf, -np.inf
    for v in values:
        keep = np.isfinite(v) & (v > 0) if positive else np.isfinite(v)
        if keep.any():
            lo, hi = min(lo, float(v[keep].min())), max(hi, float(v[keep].max()))
    return (lo, hi) if lo <= hi else (np.nan, np.nan)


def _middle_ellipsis(name: str, width: int) -> str:
    if len(name) <= width:
        return name
    keep = width - 1
    return f"{name[: keep - keep // 2]}…{name[len(name) - keep // 2 :]}"


def short_labels(names: Sequence[str], max_chars: int = MAX_LABEL_CHARS) -> list[str]:
    """``names`` as labels of at most ``max_chars`` characters: a longer one keeps its
    start and end around an ellipsis (``model.1.submo…unit0.conv``). Where two would read
    the same, every label keeps more of its name, up to the whole name.

    Args:
        names: layer or group names.
        max_chars: the longest label wanted.

    Returns:
        One label per name, distinct where the names are.
    """
    width = max_chars
    longest = max((len(n) for n in names), default=0)
    while True:
        labels = [_middle_ellipsis(n, width) for n in names]
        if len(set(labels)) == len(set(names)) or width >= longest:
            return labels
        width += 4


def wrap_chars(fig: Figure, size: float | str) -> int:
    """How many characters of font size ``size`` (points, or ``"small"`` ...) fit across
    ``fig``, for wrapping notes."""
    points = FontProperties(size=size).get_size_in_points()
    return max(20, int(fig.get_figwidth() * 72 / (EM_WIDTH * points)))


def spaced_labels(found: list[LayerGroup], min_gap: float) -> list[LayerGroup]:
    """The groups to label so that no two labels are closer than ``min_gap`` layers (they
    would overlap); the bottleneck's label always stays."""

    def centre(s: LayerGroup) -> float:
        return (s.start + s.stop) / 2

    kept = [s for s in found if s.bottleneck]
    for s in found:
        if all(abs(centre(s) - centre(k)) >= min_gap for k in kept):
            kept.append(s)
    return sorted(kept, key=lambda s: s.start)


def mark_layer_groups(
    ax: Axes, layers: list[Layer], axis: Literal["x", "y"], scale: float = 1.0
) -> None:
    """Group names (:func:`~gradflow.plots.selection.layer_groups`) at their centres, lines
    between groups (darker where the group one level up changes), the bottleneck stage with
    a shaded label and a dark strip along the axis (positions: drawn-layer index x scale)."""
    found = layer_groups(layers)
    labelled = spaced_labels(found, min_gap=len(layers) / MAX_STAGE_LABELS)
    centres = [(s.start + s.stop) / 2 * scale for s in labelled]
    line = ax.axhline if axis == "y" else ax.axvline
    for s in found[1:]:
        major = s.first_of_parent
        line(s.start * scale, color="k", lw=0.7 if major else 0.4, alpha=0.7 if major else 0.3)
    names = short_labels([s.name for s in labelled])
    if axis == "y":
        ax.set_yticks(centres, names)
        ticklabels = ax.get_yticklabels()
    else:
        ax.set_xticks(centres, names)
        ticklabels = ax.get_xticklabels()
        if sum(map(len, names)) > 60:  # would overlap side by side
            ax.tick_params(axis="x", labelrotation=90)
    ax.tick_params(axis=axis, length=0)
    for s, text in zip(labelled, ticklabels, strict=True):
        if s.bottleneck:
            text.set_bbox({"boxstyle": "round,pad=0.2", "fc": "#b0b0b0", "ec": "none"})
            text.set_fontweight("bold")
            span = (s.start * scale, s.stop * scale)
            if axis == "y":
                ax.axhspan(*span, xmin=0, xmax=0.015, color="0.15", lw=0)
            else:
                ax.axvspan(*span, ymin=0, ymax=0.02, color="0.15", lw=0)
