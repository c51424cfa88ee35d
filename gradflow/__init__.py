"""gradflow: per-layer gradient and weight-update flow, recorded while a network trains."""

from gradflow.errors import GradflowError

__version__ = "0.1.0"

__all__ = ["GradflowError", "__version__"]
