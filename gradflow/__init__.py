"""gradflow: per-layer gradient and weight-update flow, recorded while a network trains."""

__version__ = "0.1.0"

from gradflow.errors import GradflowError
from gradflow.recorder import Recorder
from gradflow.schedule import every, log_spaced
from gradflow.store import Run, open_run

__all__ = ["GradflowError", "Recorder", "Run", "__version__", "every", "log_spaced", "open_run"]
