"""A run reduced to what a sweep draws, computed once and cached per file version.

A summary holds the run's config, its scalars (:data:`~gradflow.sweeps.scalars.SCALARS`)
and, per statistic, a small layer x time matrix (the figures' default layers, binned to at
most ``bins`` time columns). It is kept in the user cache (``$GRADFLOW_CACHE_DIR``, else
``~/.cache/gradflow``, in ``sweep/``) under a key of the file's resolved path, size and
modification time: a file that changes (a run still being written) is summarised again.
Entries are ``.npz`` files read without pickle; an unreadable one is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gradflow.errors import GradflowError, GradflowWarning
from gradflow.plots.binning import LayerTime, load
from gradflow.plots.selection import select_layers
from gradflow.runfile import Layer, Run, open_run
from gradflow.safefile import atomic_write
from gradflow.sweeps.scalars import SCALARS
from gradflow.sweeps.structure import flat_items
from gradflow.usercache import cache_dir

SUMMARY_VERSION = 1
SUMMARY_BINS = 48


@dataclass
class RunSummary:
    """What a sweep needs of one run; ``heat[stat]`` is None where the run lacks ``stat``."""

    path: Path
    name: str
    config: dict[str, Any]
    n_steps: int
    n_epochs: int
    scalars: dict[str, float]
    layers: list[Layer]
    heat: dict[str, LayerTime | None] = field(default_factory=dict)
    settings: dict[str, Any] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.settings = dict(flat_items(self.config))  # dotted key -> value, looked up often


def _holds(run: Run, stat: str) -> bool:
    probe, name = stat.split("/", 1)
    if probe == "epoch":
        return name in run.epoch_stats() and run.n_epochs > 0
    return name in run.probes().get(probe, []) and run.n_steps > 0


def _compute(
    path: Path, stats: list[str], scalars: list[str], bins: int, known: RunSummary | None
) -> RunSummary:
    """Summarise ``path``, filling in what ``known`` (a cached summary) lacks."""
    with open_run(path) as run:
        layers = select_layers(run)
        summary = known or RunSummary(
            path, run.name, run.config, run.n_steps, run.n_epochs, {}, layers
        )
        for name in scalars:
            summary.scalars[name] = float(SCALARS.get(name).compute(run))
        for stat in stats:
            summary.heat[stat] = load(run, stat, layers, None, bins) if _holds(run, stat) else None
    return summary


class SummaryCache:
    """Summaries on disk, one ``.npz`` per file version, in ``folder``."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder or cache_dir() / "sweep"
        self._warned = False

    def entry(self, path: Path, bins: int) -> Path:
        """The cache file of ``path`` as it is now."""
        st = path.stat()
        key = f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{SUMMARY_VERSION}\0{bins}"
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.npz"

    def read(self, entry: Path, path: Path) -> RunSummary | None:
        """The summary stored at ``entry``, or None (absent or unreadable)."""
        try:
            with np.load(entry, allow_pickle=False) as stored:
                meta = json.loads(str(stored["meta"]))
                arrays = {key: stored[key] for key in stored.files if key != "meta"}
            layers = [Layer(**row) for row in meta["layers"]]
            heat: dict[str, LayerTime | None] = {
                stat: None
                if unit is None
                else LayerTime(
                    arrays[f"values{i}"],
                    arrays[f"edges{i}"],
                    arrays[f"spans{i}"],
                    unit,
                    stat,
                    layers,
                )
                for i, (stat, unit) in enumerate(meta["heat"])
            }
            return RunSummary(
                path,
                meta["name"],
                meta["config"],
                meta["n_steps"],
                meta["n_epochs"],
                meta["scalars"],
                layers,
                heat,
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def write(self, entry: Path, summary: RunSummary) -> None:
        """Store ``summary`` at ``entry`` atomically; a cache that cannot be written is
        warned about once and skipped."""
        arrays: dict[str, np.ndarray] = {}
        heat: list[tuple[str, str | None]] = []
        for i, (stat, data) in enumerate(summary.heat.items()):
            heat.append((stat, None if data is None else data.unit))
            if data is not None:
                arrays.update(
                    {f"values{i}": data.values, f"edges{i}": data.edges, f"spans{i}": data.spans}
                )
        meta = {
            "name": summary.name,
            "config": summary.config,
            "n_steps": summary.n_steps,
            "n_epochs": summary.n_epochs,
            "scalars": summary.scalars,
            "layers": [asdict(lay) for lay in summary.layers],
            "heat": heat,
        }
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with atomic_write(entry) as file:
                np.savez(file, meta=np.array(json.dumps(meta, default=str)), **arrays)  # type: ignore[arg-type]
        except OSError as err:
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"cannot write the sweep cache in {self.folder} ({err.strerror or err}); "
                    "runs are summarised again next time",
                    GradflowWarning,
                    stacklevel=3,
                )


def summarise(
    path: Path, stats: list[str], bins: int = SUMMARY_BINS, cache: SummaryCache | None = None
) -> RunSummary:
    """The summary of the run file ``path`` with ``stats`` and every registered scalar:
    from ``cache`` where it holds them, else computed (opening the run) and stored.

    Args:
        path: a run file.
        stats: statistics (``probe/name``) to summarise as layer x time matrices.
        bins: the most time columns of each matrix.
        cache: where summaries are kept; None computes without caching.

    Returns:
        The :class:`RunSummary`.
    """
    if not path.is_file():
        raise GradflowError(f"{path}: no such run file")
    entry = cache.entry(path, bins) if cache else None
    known = cache.read(entry, path) if cache and entry and entry.exists() else None
    need_stats = [s for s in stats if known is None or s not in known.heat]
    need_scalars = [s for s in SCALARS if known is None or s not in known.scalars]
    if known is not None and not need_stats and not need_scalars:
        return known
    summary = _compute(path, need_stats, need_scalars, bins, known)
    if cache and entry:
        cache.write(entry, summary)
    return summary
