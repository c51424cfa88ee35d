"""Many runs at once: their structure, one row of settings and scalars each, and figures."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradflow.errors import GradflowError, unknown_name
from gradflow.sweeps.scalars import SCALARS
from gradflow.sweeps.structure import Structure, find_structure
from gradflow.sweeps.summary import SUMMARY_BINS, RunSummary, SummaryCache, summarise

if TYPE_CHECKING:
    from plotly.graph_objects import Figure

PathLike = str | os.PathLike[str]
DEFAULT_STATS = ("epoch/update_abs_mean", "param/grad_norm", "grad_output/norm")


def run_paths(paths: PathLike | Iterable[PathLike]) -> list[Path]:
    """Run files named by ``paths``: files as given, folders as every ``*.h5`` below them
    (sorted); a path that does not exist is an error."""
    given = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    found: list[Path] = []
    for item in map(Path, given):
        if item.is_dir():
            inside = sorted(p for p in item.rglob("*.h5") if p.is_file())
            if not inside:
                raise GradflowError(f"{item}: no run files (*.h5) in this folder")
            found += inside
        elif item.exists():
            found.append(item)
        else:
            raise GradflowError(f"{item}: no such run file or folder")
    if not found:
        raise GradflowError("no run files given")
    return list(dict.fromkeys(found))


class Sweep:
    """Run files compared as one experiment, read lazily: nothing is opened until a summary
    is needed, each run is summarised once (and cached, see :mod:`gradflow.sweeps.summary`).

    Args:
        paths: run files and folders of run files.
        stats: statistics to summarise as heat maps (default: those of
            :data:`DEFAULT_STATS` that some run holds).
        bins: the most time columns per summary heat map.
        cache: keep summaries in the user cache.
    """

    def __init__(
        self,
        paths: PathLike | Iterable[PathLike],
        *,
        stats: Sequence[str] | None = None,
        bins: int = SUMMARY_BINS,
        cache: bool = True,
    ) -> None:
        self.paths = run_paths(paths)
        for stat in stats or ():
            if stat.count("/") != 1:
                raise GradflowError(
                    f"statistic {stat!r}: expected PROBE/NAME, e.g. param/grad_norm"
                )
        self.requested = list(stats) if stats else None
        self.bins = bins
        self._cache = SummaryCache() if cache else None
        self._summaries: list[RunSummary] | None = None
        self._structure: Structure | None = None
        self.skipped: list[tuple[Path, str]] = []

    @property
    def summaries(self) -> list[RunSummary]:
        """One summary per readable run, in path order; unreadable files go to
        :attr:`skipped` with the reason, which names the file (an error where no file is
        readable)."""
        if self._summaries is None:
            wanted = list(dict.fromkeys([*(self.requested or ()), *DEFAULT_STATS]))
            done = []
            for path in self.paths:
                try:
                    done.append(summarise(path, wanted, self.bins, self._cache))
                except GradflowError as err:
                    reason = str(err)
                    self.skipped.append(
                        (path, reason if str(path) in reason else f"{path}: {reason}")
                    )
            if not done:
                reasons = "; ".join(reason for _, reason in self.skipped[:3])
                raise GradflowError(f"no readable run among {len(self.paths)} files ({reasons})")
            self._summaries = done
        return self._summaries

    @property
    def structure(self) -> Structure:
        """The factors, seed and dependent settings found in the configs."""
        if self._structure is None:
            self._structure = find_structure([s.config for s in self.summaries])
        return self._structure

    @property
    def stats(self) -> list[str]:
        """The statistics drawn: those asked for, else the defaults some run holds."""
        held = [
            stat
            for stat in self.requested or DEFAULT_STATS
            if any(s.heat.get(stat) is not None for s in self.summaries)
        ]
        missing = [s for s in self.requested or () if s not in held]
        if missing:
            raise GradflowError(f"no run holds {', '.join(missing)}")
        return held

    def default_x(self) -> str | None:
        """The setting a scalar is drawn against by default: the factor with numeric values
        that has the most of them, else the first factor, else the seed."""
        structure = self.structure
        numeric = [
            f
            for f in structure.factors
            if all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in structure.levels[f]
            )
        ]
        if not structure.factors:
            return structure.seed
        if numeric:  # the longest curve
            return max(numeric, key=lambda f: len(structure.levels[f]))
        return structure.factors[0]

    def check_x(self, x: str | None) -> str | None:
        """The setting named by ``x`` (None: :meth:`default_x`): any setting that differs,
        by its full dotted key or, where that is unambiguous, its last parts (``lr`` for
        ``optimizer.lr``)."""
        if x is None:
            return self.default_x()
        structure = self.structure
        choices = [
            *structure.columns,
            *(k for k in structure.follows if k not in structure.columns),
        ]
        if x in choices:
            return x
        ends = [key for key in choices if key.endswith(f".{x}")]
        if len(ends) == 1:
            return ends[0]
        if not choices:
            raise GradflowError(f"--x {x!r}: no setting differs between these runs")
        raise unknown_name("setting (of those these runs vary)", x, ends or choices)

    def to_dataframe(self) -> Any:
        """One row per run: its file, the settings that differ (factors, seed, then those
        that follow from them) and every scalar of :data:`~gradflow.sweeps.scalars.SCALARS`.

        Returns:
            A ``pandas.DataFrame``.
        """
        import pandas as pd

        from gradflow.sweeps.figures import setting, text

        structure = self.structure
        keys = [*structure.columns, *(k for k in structure.follows if k not in structure.columns)]
        rows = []
        for s in self.summaries:
            row: dict[str, Any] = {"path": str(s.path)}
            for key in keys:
                value = setting(s, key)
                row[key] = (
                    value if isinstance(value, (int, float, str)) or value is None else text(value)
                )
            row.update({name: s.scalars.get(name, float("nan")) for name in SCALARS})
            rows.append(row)
        return pd.DataFrame(rows, columns=["path", *keys, *SCALARS])

    def heatmap_figure(self, stat: str) -> Figure:
        """Small multiples of ``stat`` by factor combination (mean over seeds).

        Args:
            stat: a statistic ``probe/name`` some run holds.

        Returns:
            A plotly figure.
        """
        from plotly.graph_objects import Figure

        from gradflow.sweeps.figures import heatmap_figure

        spec = heatmap_figure(self.summaries, self.structure, stat)
        if spec is None:
            raise GradflowError(f"no run holds {stat} (summarised: {', '.join(self.stats)})")
        return Figure(spec)

    def scalar_figure(self, scalar: str = "final_loss", x: str | None = None) -> Figure:
        """``scalar`` per run against setting ``x`` (default :meth:`default_x`), the seeds
        as a band.

        Args:
            scalar: a name in :data:`~gradflow.sweeps.scalars.SCALARS`.
            x: a factor or the seed key.

        Returns:
            A plotly figure.
        """
        from plotly.graph_objects import Figure

        from gradflow.sweeps.figures import scalar_figure

        SCALARS.get(scalar)
        return Figure(scalar_figure(self.summaries, self.structure, scalar, self.check_x(x)))

    def write_html(self, out: PathLike, *, force: bool = False, x: str | None = None) -> Path:
        """Write the self-contained sweep page (see :mod:`gradflow.sweeps.page`) to ``out``."""
        from gradflow.sweeps.page import write_page

        return write_page(self, Path(out), force=force, x=x)

    def __repr__(self) -> str:
        if self._summaries is None:
            return f"Sweep({len(self.paths)} run files, not read yet)"
        return f"Sweep({self.structure.describe()})"


def sweep(paths: PathLike | Iterable[PathLike], **options: Any) -> Sweep:
    """The runs ``paths`` (files and folders) as one :class:`Sweep` (options as there)."""
    return Sweep(paths, **options)
