"""What a figure draws: which statistic, which layers (in depth order), which time window."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Literal

from gradflow.errors import GradflowError, unknown_name
from gradflow.store import Layer, Run

Unit = Literal["epoch", "step"]
BOTTLENECK_STAGES = ("across", "bottleneck", "bridge", "center", "centre", "middle")


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


def select_layers(run: Run, pattern: str | None = None, all_layers: bool = False) -> list[Layer]:
    """Layers to draw, input first: conv layers (all layers when ``all_layers`` or when the
    run has no conv layer), restricted to names matching ``pattern`` in full as an
    fnmatch glob or as a regular expression."""
    layers = sorted(run.layers, key=lambda lay: (lay.depth, lay.index))
    kind = "layer"
    if not all_layers and any(lay.kind == "conv" for lay in layers):
        layers, kind = [lay for lay in layers if lay.kind == "conv"], "conv layer"
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
class Stage:
    """A run of consecutive drawn layers sharing the first component of their name."""

    name: str
    start: int
    stop: int

    @property
    def bottleneck(self) -> bool:
        return self.name.lower() in BOTTLENECK_STAGES


def stages(layers: list[Layer]) -> list[Stage]:
    """Stages of ``layers`` in drawn order (``down2.3.conv`` is in stage ``down2``)."""
    out: list[Stage] = []
    for i, lay in enumerate(layers):
        name = lay.name.split(".", 1)[0]
        if out and out[-1].name == name:
            out[-1] = Stage(name, out[-1].start, i + 1)
        else:
            out.append(Stage(name, i, i + 1))
    return out
