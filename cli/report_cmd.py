"""``gradflow report`` and ``gradflow serve``: run files in a browser (:mod:`gradflow.report`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from gradflow.cli.app import app
from gradflow.errors import GradflowError

Runs = Annotated[list[Path], typer.Argument(metavar="RUN.h5...", help="Run files, side by side.")]


@app.command("report")
def report_command(
    runs: Runs,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="The HTML file to write.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite --out if it exists.")] = False,
) -> None:
    """Write one self-contained interactive HTML report of the runs (opens offline)."""
    from gradflow.report import build_report

    if out is None:
        raise GradflowError("missing --out FILE.html")
    written = build_report(runs, out, force=force)
    typer.echo(f"wrote {written} ({written.stat().st_size / 1e6:.1f} MB)")


@app.command()
def serve(
    runs: Runs,
    port: Annotated[int, typer.Option(help="TCP port (0: any free one).", min=0, max=65535)] = 8050,
    host: Annotated[
        str, typer.Option(help="Address to listen on; other than loopback only when asked.")
    ] = "127.0.0.1",
) -> None:
    """Serve a live report of the runs; it redraws as they grow (Ctrl-C stops)."""
    from gradflow.report.server import is_loopback, serve

    if not is_loopback(host):
        print(
            f"gradflow: warning: listening on {host}: anyone who can reach this machine "
            "can read these runs",
            file=sys.stderr,
        )

    def ready(url: str) -> None:
        print(f"serving {', '.join(map(str, runs))} at {url} (Ctrl-C stops)", flush=True)

    try:
        serve(runs, host=host, port=port, on_ready=ready)
    except KeyboardInterrupt:
        print("gradflow: stopped serving", file=sys.stderr)
