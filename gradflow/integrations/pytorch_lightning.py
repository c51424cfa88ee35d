"""``GradflowCallback`` for the ``pytorch_lightning`` package::

from gradflow.integrations.pytorch_lightning import GradflowCallback
trainer = pytorch_lightning.Trainer(callbacks=[GradflowCallback("run.h5")])
"""

from __future__ import annotations

from gradflow.errors import GradflowError

try:
    from pytorch_lightning import Callback
except ImportError as exc:
    raise GradflowError(
        "gradflow.integrations.pytorch_lightning needs it: pip install pytorch-lightning"
    ) from exc

from gradflow.integrations._lightning import LightningRecording


class GradflowCallback(LightningRecording, Callback):
    __doc__ = LightningRecording.__doc__


__all__ = ["GradflowCallback"]
