"""``gradflow sweep``: many runs on one page (:mod:`gradflow.sweeps`)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer

from gradflow.cli.app import app
from gradflow.errors import GradflowError


@app.command()
def sweep(
    runs: Annotated[
        list[Path], typer.Argument(metavar="RUN.h5|DIR...", help="Run files and folders of them.")
    ],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="The HTML file to write.")] = None,
    stat: Annotated[
        list[str] | None,
        typer.Option(help="Statistic PROBE/NAME to draw per combination (repeat for several)."),
    ] = None,
    x: Annotated[
        str | None, typer.Option("--x", help="Setting the scalars are drawn against first.")
    ] = None,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Summarise every run again (no user cache).")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite --out if it exists.")] = False,
) -> None:
    """Compare many runs on one self-contained HTML page: the settings that differ, small
    multiples per combination of them, and scalars per run against a setting."""
    from gradflow.sweeps import Sweep
    from gradflow.sweeps.page import check_out

    if out is None:
        raise GradflowError("missing --out FILE.html")
    check_out(out, force=force)
    found = Sweep(runs, stats=stat, cache=not no_cache)
    print(f"summarising {len(found.paths)} run files...", file=sys.stderr, flush=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        written = found.write_html(out, force=force, x=x)
    for warning in caught:
        print(f"gradflow: warning: {warning.message}", file=sys.stderr)
    for _, reason in found.skipped:
        print(f"gradflow: warning: skipped {reason}", file=sys.stderr)
    typer.echo(found.structure.describe())
    typer.echo(f"wrote {written} ({written.stat().st_size / 1e6:.1f} MB)")
