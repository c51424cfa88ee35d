"""``gradflow models``: the preset models as a table."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table

from gradflow.cli.app import app


@app.command("models")
def models() -> None:
    """List the preset models: conv layers (main path, + 1x1 projections), parameters, input
    side multiple."""
    from gradflow.em.models import list_models, model_info  # torch loads here, not for --help

    # Names are what users copy: never wrapped or cut; only the description wraps.
    table = Table(title="gradflow models", box=box.SIMPLE_HEAD)
    table.add_column("name", style="bold", no_wrap=True, min_width=len(max(list_models(), key=len)))
    table.add_column("convs", justify="right", no_wrap=True)
    table.add_column("params", justify="right", no_wrap=True)
    table.add_column("sides", justify="right", no_wrap=True)
    table.add_column("description", ratio=1)
    for name in list_models():
        info = model_info(name)
        convs = f"{info['conv_layers']}"
        if info["conv_layers_total"] != info["conv_layers"]:
            convs += f" (+{info['conv_layers_total'] - info['conv_layers']} proj.)"
        table.add_row(
            name,
            convs,
            f"{info['n_params']:,}",
            f"x{info['downsampling']}",
            info["description"],
        )
    Console().print(table)
