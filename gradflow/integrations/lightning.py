"""``GradflowCallback`` for ``lightning.pytorch``::

from gradflow.integrations.lightning import GradflowCallback
trainer = lightning.Trainer(callbacks=[GradflowCallback("run.h5")])
"""

from __future__ import annotations

from gradflow.errors import GradflowError

try:
    from lightning.pytorch import Callback
except ImportError as exc:
    raise GradflowError(
        "gradflow.integrations.lightning needs Lightning: pip install lightning"
    ) from exc

from gradflow.integrations._lightning import LightningRecording


class GradflowCallback(LightningRecording, Callback):
    __doc__ = LightningRecording.__doc__


__all__ = ["GradflowCallback"]
