"""Callbacks for third-party training loops, imported on demand (``import gradflow`` does
not import Lightning or transformers):

- :mod:`gradflow.integrations.lightning`: ``GradflowCallback`` for ``lightning.pytorch``
  (:mod:`gradflow.integrations.pytorch_lightning` for the ``pytorch_lightning`` package);
- :mod:`gradflow.integrations.transformers`: ``GradflowCallback`` for ``transformers.Trainer``.
"""
