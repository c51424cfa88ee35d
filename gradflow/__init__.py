"""gradflow: per-layer gradient and weight-update flow, recorded while a network trains."""

__version__ = "0.1.0"

from gradflow.errors import GradflowError  # noqa: E402
from gradflow.recorder import Recorder  # noqa: E402
from gradflow.schedule import every, log_spaced  # noqa: E402
from gradflow.store import Run, open_run  # noqa: E402

__all__ = ["GradflowError", "Recorder", "Run", "__version__", "every", "log_spaced", "open_run"]
