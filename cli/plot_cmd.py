"""``gradflow plot`` and ``gradflow info``: argument parsing over :mod:`gradflow.plots`."""

from __future__ import annotations

import sys
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from gradflow.cli.app import app
from gradflow.errors import GradflowError


@app.command()
def plot(
    figure: Annotated[
        str | None,
        typer.Argument(metavar="FIGURE", help="Figure name (see --list).", show_default=False),
    ] = None,
    runs: Annotated[
        list[Path] | None,
        typer.Argument(metavar="RUN.h5...", help="Run files, one panel or line each."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Output file: .png, .pdf, .svg (.md, .csv for tables); without FIGURE, "
            "RUN-FIGURE.png by default.",
        ),
    ] = None,
    stat: Annotated[
        str | None,
        typer.Option(help="Statistic PROBE/NAME (e.g. grad_output/rms); a metric for curves."),
    ] = None,
    log: Annotated[
        bool, typer.Option("--log", help="Log colour / y scale (diff: log10 A/B).")
    ] = False,
    epochs: Annotated[
        str | None, typer.Option(help="Epochs START:STOP (half-open; ':' = all).")
    ] = None,
    steps: Annotated[
        str | None, typer.Option(help="Steps START:STOP, drawn against steps (':' = all).")
    ] = None,
    layers: Annotated[
        str | None, typer.Option(help="Layer names to draw: fnmatch glob or regular expression.")
    ] = None,
    all_layers: Annotated[
        bool,
        typer.Option(
            "--all-layers",
            help="Draw every layer (default: conv layers of zoo FCNs, weight layers otherwise).",
        ),
    ] = False,
    shared_scale: Annotated[
        bool | None,
        typer.Option(
            "--shared-scale/--per-panel-scale",
            help="One colour scale for all panels (default) or one per panel.",
            show_default=False,
        ),
    ] = None,
    title: Annotated[str | None, typer.Option(help="Figure title.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite --out if it exists.")] = False,
    list_figures: Annotated[
        bool, typer.Option("--list", help="List the figures and exit.")
    ] = False,
) -> None:
    """Draw FIGURE from one or more run files into --out.

    Without FIGURE (`gradflow plot RUN.h5`) it draws the most useful figure for what the
    runs hold, says which, and writes RUN-FIGURE.png unless --out names a file.
    """
    # Imported here: matplotlib and h5py load for this command only, not for --help.
    from gradflow.plots import FIGURES, PlotWarning, TimeWindow, save
    from gradflow.runfile import open_run

    if list_figures:
        width = max(map(len, FIGURES.names()))
        for name in FIGURES.names():
            typer.echo(f"{name:<{width}}  {FIGURES.summary(name)}")
        return
    if figure is None:
        raise GradflowError("missing FIGURE; `gradflow plot --list` shows them")
    if figure not in FIGURES and _names_a_run(figure):
        runs, figure = [Path(figure), *(runs or [])], None
    else:
        FIGURES.get(figure)
        if not runs:
            raise GradflowError(f"missing RUN.h5: which run files should {figure} draw?")
        if out is None:
            raise GradflowError("missing --out FILE (.png, .pdf, .svg; .md or .csv for tables)")
    if epochs is not None and steps is not None:
        raise GradflowError("--epochs and --steps exclude each other")
    window = (
        TimeWindow.parse(epochs, "epoch")
        if epochs is not None
        else TimeWindow.parse(steps, "step")
        if steps is not None
        else None
    )
    given: dict[str, Any] = {
        "stat": stat,
        "log": log or None,
        "window": window,
        "layers": layers,
        "all_layers": all_layers or None,
        "shared_scale": shared_scale,
        "title": title,
    }
    options = {key: value for key, value in given.items() if value is not None}
    with ExitStack() as stack, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PlotWarning)
        opened = [stack.enter_context(open_run(path)) for path in runs]
        if figure is None:
            from gradflow.plots.default import default_view

            view = default_view(opened, stat)
            figure = view.figure
            options.update(stat=view.stat, log=log or view.log)
            out = out or Path("-".join([*(path.stem for path in runs), figure]) + ".png")
            typer.echo(f"no figure named: {view.describe()}")
        assert out is not None
        written = save(figure, opened, out, force=force, **options)
    for warning in caught:
        print(f"gradflow: warning: {warning.message}", file=sys.stderr)
    typer.echo(f"wrote {written}")


def _names_a_run(name: str) -> bool:
    """Whether the FIGURE argument is a run file (``gradflow plot RUN.h5``)."""
    return name.lower().endswith((".h5", ".hdf5")) or Path(name).is_file()


@app.command()
def info(run: Annotated[Path, typer.Argument(metavar="RUN.h5", help="Run file.")]) -> None:
    """Summarise a run file: model, data, size, overhead and a layer health table."""
    from gradflow.plots.info import info_panel
    from gradflow.runfile import open_run

    with open_run(run) as opened:
        Console().print(info_panel(opened))
