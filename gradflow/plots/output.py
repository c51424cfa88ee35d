"""Draw a registered figure and write it: images (.png/.pdf/.svg) or tables (.md/.csv)."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from gradflow.errors import GradflowError
from gradflow.plots.catalog import FIGURES, TABLES
from gradflow.plots.style import DPI
from gradflow.runfile import Run, check_writable
from gradflow.safefile import atomic_write

IMAGE_SUFFIXES = (".png", ".pdf", ".svg")
TEXT_SUFFIXES = (".md", ".csv")


def _check_options(name: str, fn: Callable[..., Any], options: dict[str, Any]) -> None:
    params = [p for p in inspect.signature(fn).parameters if p != "runs"]
    for key in options:
        if key not in params:
            takes = ", ".join(p.replace("_", "-") for p in params) or "no options"
            raise GradflowError(
                f"{name} takes no {key.replace('_', '-')} option (it takes: {takes})"
            )


def render(name: str, runs: Sequence[Run], **options: Any) -> Figure:
    """Figure ``name`` of ``runs``; an option the figure does not take is an error."""
    fn = FIGURES.get(name)
    _check_options(name, fn, options)
    return fn(runs, **options)


def save(
    name: str,
    runs: Sequence[Run],
    out: str | os.PathLike[str],
    *,
    force: bool = False,
    **options: Any,
) -> Path:
    """Write figure ``name`` of ``runs`` to ``out``; the suffix picks the format."""
    FIGURES.get(name)
    path = Path(out)
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES + TEXT_SUFFIXES:
        raise GradflowError(
            f"{path}: unknown output type {suffix or '(no suffix)'!r}; use "
            f"{', '.join(IMAGE_SUFFIXES)} (or {', '.join(TEXT_SUFFIXES)} for tables)"
        )
    if suffix in TEXT_SUFFIXES and name not in TABLES:
        raise GradflowError(
            f"{name} is an image; write {', '.join(IMAGE_SUFFIXES)} "
            f"(tables: {', '.join(TABLES.names())})"
        )
    check_writable(path, overwrite=force)
    if suffix in TEXT_SUFFIXES:
        table_fn = TABLES.get(name)
        _check_options(name, table_fn, options)
        table = table_fn(runs)
        text = table.to_markdown() if suffix == ".md" else table.to_csv()
        with atomic_write(path) as file:
            file.write(text.encode("utf-8"))
    else:
        fig = render(name, runs, **options)
        with atomic_write(path) as file:
            fig.savefig(file, format=suffix[1:], dpi=DPI)
    return path
