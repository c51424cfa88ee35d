"""Imports every command module so that its commands register on the app."""

from gradflow.cli import (
    models_cmd,  # noqa: F401
    plot_cmd,  # noqa: F401
    record_cmd,  # noqa: F401
    report_cmd,  # noqa: F401
    sweep_cmd,  # noqa: F401
)
