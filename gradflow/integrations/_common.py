"""What both integrations need from the Recorder."""

from __future__ import annotations

from typing import Any

from gradflow.recorder import Recorder


def log_last_step(recorder: Recorder, **scalars: Any) -> None:
    """Attach scalars to the optimizer step that just ran, if it was recorded (otherwise
    :meth:`Recorder.log` would keep them for the next recorded step)."""
    if recorder.schedule(recorder.step - 1):
        recorder.log(**scalars)
