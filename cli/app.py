"""The Typer application object every command module adds its commands to."""

import typer

app = typer.Typer(
    name="gradflow",
    help="Record and plot how gradients and weight updates flow through every layer of a network.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """gradflow: layer x time views of gradient and weight-update flow."""
