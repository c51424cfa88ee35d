"""``gradflow models``: the preset models as a table."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from gradflow.cli.app import app
from gradflow.models import list_models, model_info


@app.command("models")
def models() -> None:
    """List the preset models: conv layers (main path / with projections), parameters."""
    table = Table(title="gradflow models")
    table.add_column("name", style="bold")
    table.add_column("conv layers", justify="right")
    table.add_column("parameters", justify="right")
    table.add_column("input sides", justify="right")
    table.add_column("description")
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
