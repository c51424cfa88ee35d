"""gradflow: per-layer gradient and weight-update flow, recorded while a network trains.

The public names load on first use, so that ``import gradflow`` (and the commands that only
read run files) do not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from gradflow.errors import GradflowError

if TYPE_CHECKING:
    from gradflow.notebook import show
    from gradflow.recorder import Recorder
    from gradflow.runfile import Run, open_run
    from gradflow.schedule import every, log_spaced
    from gradflow.sweeps import Sweep, sweep

__version__ = "0.1.0"

# Public name -> the module that defines it.
_LAZY = {
    "Recorder": "gradflow.recorder",
    "every": "gradflow.schedule",
    "log_spaced": "gradflow.schedule",
    "Run": "gradflow.runfile",
    "open_run": "gradflow.runfile",
    "show": "gradflow.notebook",
    "Sweep": "gradflow.sweeps",
    "sweep": "gradflow.sweeps",
}

__all__ = [
    "GradflowError",
    "Recorder",
    "Run",
    "Sweep",
    "__version__",
    "every",
    "log_spaced",
    "open_run",
    "show",
    "sweep",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gradflow' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public API alone (what tab completion offers), not the helpers of this module."""
    return sorted(__all__)
