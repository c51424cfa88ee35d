"""The Recorder (:mod:`~gradflow.recorder.facade`) and its parts."""

from gradflow.recorder.facade import Recorder
from gradflow.recorder.options import unwrap_optimizer

__all__ = ["Recorder", "unwrap_optimizer"]
