"""What a figure draws: which statistic, which layers (in depth order), which time window."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from gradflow.errors import GradflowError, unknown_name
from gradflow.runfile import Layer, Run

Unit = Literal["epoch", "step"]
BOTTLENECK_STAGES = ("across", "bottleneck", "bridge", "center", "centre", "middle")
MAX_GROUPS = 20  # y labels that stay readable along a 5 inch axis at 8 pt
MIN_GROUPS = 4  # fewer groups than this locate nothing (e.g. one "transformer" group)


@dataclass(frozen=True)
class TimeWindow:
    """Epochs or optimizer steps ``start <= t < stop`` (``None``: open end)."""

    unit: Unit
    start: int | None = None
    stop: int | None = None

    @classmethod
    def parse(cls, text: str, unit: Unit) -> TimeWindow:
        """``"a:b"``, ``"a:"``, ``":b"``, ``":"`` (everything) or ``"a"`` (just ``a``)."""
        try:
            if ":" not in text:
                return cls(unit, int(text), int(text) + 1)
            a, b = text.split(":")
            return cls(unit, int(a) if a.strip() else None, int(b) if b.strip() else None)
        except ValueError:
            raise GradflowError(
                f"--{unit}s expects START:STOP (e.g. 0:10, 5:, ':' for all), got {text!r}"
            ) from None

    def describe(self) -> str:
        a = "" if self.start is None else self.start
        b = "" if self.stop is None else self.stop
        return f"{self.unit}s {a}:{b}"


def parse_stat(run: Run, spec: str) -> tuple[str, str]:
    """Split ``probe/name`` and check that ``run`` stores it (``epoch/...``: per epoch)."""
    known = [f"epoch/{s}" for s in run.epoch_stats()] + [
        f"{probe}/{s}" for probe, names in run.probes().items() for s in names
    ]
    if spec not in known:
        raise unknown_name(f"statistic in {run.path.name}", spec, known)
    probe, name = spec.split("/", 1)
    return probe, name


NORM_KINDS = frozenset({"bn", "gn", "ln", "in"})


def is_zoo_fcn(run: Run) -> bool:
    """Whether ``run`` records a zoo FCN: its config describes the model as ``gradflow
    record`` does, with a name and a count of conv layers."""
    model = run.config.get("model")
    return isinstance(model, dict) and "name" in model and "conv_layers" in model


def is_weight_layer(layer: Layer) -> bool:
    """A layer with a weight matrix or kernel: not a normalisation layer, and (where the
    stored shape says) at least one parameter with two or more dimensions, which leaves
    out norms of any class (``RMSNorm``, ...), scales and bias-only layers."""
    if layer.kind in NORM_KINDS:
        return False
    dims = [len(re.findall(r"\d+", part)) for part in layer.shape.split("+")]
    return max(dims) != 1


def default_layers(run: Run, layers: list[Layer]) -> tuple[list[Layer], str]:
    """The layers a figure draws without ``--all-layers``, and what they are called: conv
    layers of a zoo FCN, weight layers (:func:`is_weight_layer`) of any other model, every
    layer where that choice is empty."""
    if is_zoo_fcn(run):
        convs = [lay for lay in layers if lay.kind == "conv"]
        if convs:
            return convs, "conv layer"
    weights = [lay for lay in layers if is_weight_layer(lay)]
    return (weights, "weight layer") if weights else (layers, "layer")


def select_layers(run: Run, pattern: str | None = None, all_layers: bool = False) -> list[Layer]:
    """Layers to draw, input first: :func:`default_layers` (every layer when
    ``all_layers``), restricted to names matching ``pattern`` in full as an fnmatch glob or
    as a regular expression."""
    layers = sorted(run.layers, key=lambda lay: (lay.depth, lay.index))
    kind = "layer"
    if not all_layers:
        layers, kind = default_layers(run, layers)
    if pattern is None:
        return layers
    try:
        regex: re.Pattern[str] | None = re.compile(pattern)
    except re.error:
        regex = None
    chosen = [
        lay
        for lay in layers
        if fnmatch.fnmatchcase(lay.name, pattern) or (regex and regex.fullmatch(lay.name))
    ]
    if not chosen:
        examples = ", ".join(lay.name for lay in layers[:3])
        hint = "" if kind == "layer" else "; pass --all-layers to search every kind"
        raise GradflowError(
            f"layer pattern {pattern!r} matches no {kind} of {run.path.name} "
            f"(names look like {examples}){hint}"
        )
    return chosen


def measured_columns(values: np.ndarray) -> np.ndarray:
    """The layers worth drawing: indices of the columns of ``values[time, layer]`` with a
    value in at least one bin (a layer NaN throughout, e.g. frozen over the whole range, was
    never measured there); every column where none has one (a blank map says so itself).

    Args:
        values: a statistic per time bin and layer, NaN where not measured.

    Returns:
        Column indices, in order.
    """
    seen = ~np.isnan(values).all(axis=0)
    return np.flatnonzero(seen) if seen.any() else np.arange(values.shape[1])


def left_out_note(n: int) -> str | None:
    """The line saying that ``n`` layers never measured in the drawn range are not drawn
    (None for none)."""
    if not n:
        return None
    layers, are = ("layer", "is") if n == 1 else ("layers", "are")
    return f"{n} {layers} never measured in this range {are} not drawn"


@dataclass(frozen=True)
class Matched:
    """Layers of run A also in run B (matched by name, in A's order), their partners in B,
    and the names found in only one of the two."""

    a: list[Layer]
    b: list[Layer]
    only_a: list[str]
    only_b: list[str]


def match_layers(chosen_a: list[Layer], chosen_b: list[Layer]) -> Matched:
    """Align two runs' layers by name, for run-to-run differences."""
    by_name_b = {lay.name: lay for lay in chosen_b}
    names_a = {lay.name for lay in chosen_a}
    common = [lay for lay in chosen_a if lay.name in by_name_b]
    return Matched(
        common,
        [by_name_b[lay.name] for lay in common],
        [lay.name for lay in chosen_a if lay.name not in by_name_b],
        [lay.name for lay in chosen_b if lay.name not in names_a],
    )


@dataclass(frozen=True)
class LayerGroup:
    """Consecutive drawn layers whose names share the prefix ``name`` (``blocks.3``), or a
    range of such groups (``layers.0–49``); ``first_of_parent``: the group opens a new
    group one level up (``layer2.0`` after ``layer1.1``)."""

    name: str
    start: int
    stop: int
    first_of_parent: bool = True

    @property
    def bottleneck(self) -> bool:
        return self.name.split(".", 1)[0].lower() in BOTTLENECK_STAGES


def _groups(parts: list[list[str]], level: int) -> list[LayerGroup]:
    out: list[LayerGroup] = []
    keys = [".".join(p[:level]) for p in parts]
    for i, key in enumerate(keys):
        if out and out[-1].name == key:
            out[-1] = replace(out[-1], stop=i + 1)
        else:
            parent = parts[i][: level - 1] != parts[i - 1][: level - 1] if i else True
            out.append(LayerGroup(key, i, i + 1, parent))
    return out


def _range_name(first: str, last: str) -> str:
    a, b = first.split("."), last.split(".")
    common = 0
    while common < min(len(a), len(b)) - 1 and a[common] == b[common]:
        common += 1
    return first if first == last else f"{first}–{'.'.join(b[common:])}"


def _chunks(groups: list[LayerGroup], k: int) -> list[list[LayerGroup]]:
    # Ranges never cross a boundary one level up (``head`` stays apart from ``layers.*``).
    out: list[list[LayerGroup]] = []
    for g in groups:
        if g.first_of_parent or len(out[-1]) == k:
            out.append([])
        out[-1].append(g)
    return out


def _coarsen(groups: list[LayerGroup], max_groups: int) -> list[LayerGroup]:
    # Too many groups at every informative level: ranges of k consecutive groups, k a round
    # number (1, 2, 5, 10, 20, 50, ...) so that ranges read as layers.0–99, layers.100–199.
    k = 1
    while len(chunks := _chunks(groups, k)) > max_groups and k < len(groups):
        k = k * 5 // 2 if str(k)[0] == "2" else k * 2
    return [
        LayerGroup(_range_name(c[0].name, c[-1].name), c[0].start, c[-1].stop, c[0].first_of_parent)
        for c in chunks
    ]


def layer_groups(layers: list[Layer], max_groups: int = MAX_GROUPS) -> list[LayerGroup]:
    """Groups of ``layers`` (in drawn order) for the axis labels, at most ``max_groups``.

    A group is a run of consecutive layers sharing the first ``k`` components of their
    dotted name, for the deepest ``k`` that gives between :data:`MIN_GROUPS` and
    ``max_groups`` groups, preferring levels that group (fewer groups than layers): block
    indices where they fit (``blocks.0`` ... ``blocks.11``, ``layer1.0``), the stages of a
    deep FCN (``down1`` ... ``up4``), every layer of a small model. Where no level has at
    least :data:`MIN_GROUPS` groups and at most ``max_groups`` (``layers.0`` ...
    ``layers.999``), the groups of the first level with more are merged into ranges
    (``layers.0–99``).
    """
    parts = [lay.name.split(".") for lay in layers]
    depth = max((len(p) for p in parts), default=1)
    levels = [_groups(parts, k) for k in range(1, depth + 1)]
    fitting = [k for k, g in enumerate(levels) if len(g) <= max_groups]
    readable = [k for k in fitting if len(levels[k]) >= MIN_GROUPS]
    grouping = [k for k in readable if len(levels[k]) < len(layers)]
    if not (grouping or readable) and len(fitting) < len(levels):
        return _coarsen(levels[len(fitting)], max_groups)
    chosen = (grouping or readable or fitting)[-1]
    if chosen == 0:  # the top level has no level above it: each group opens a new one
        return [replace(g, first_of_parent=True) for g in levels[0]]
    return levels[chosen]
