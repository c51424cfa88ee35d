"""Lightning DDP (2 CPU processes, gloo) with gradflow's callback, launched by torchrun:

    python -m torch.distributed.run --standalone --nproc_per_node 2 lightning_ddp.py RUN REF

Rank 0's own optimizer hooks save the reference: each step's float64 weights before it,
the gradients it used (all-reduced, clipped) and the weights after it, to ``REF`` (.npz).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn

from gradflow.integrations.lightning import GradflowCallback


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)


class SaveReference(pl.Callback):
    def __init__(self, path: str) -> None:
        self.path = path
        self.arrays: dict[str, list[np.ndarray]] = {"before": [], "grads": [], "after": []}

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.params = list(pl_module.parameters())
        self.names = [name for name, _ in pl_module.named_parameters()]
        optimizer = trainer.optimizers[0]
        optimizer.register_step_pre_hook(lambda *a: self._keep("before", "data"))
        optimizer.register_step_post_hook(lambda *a: self._post())

    def _keep(self, key: str, attr: str) -> None:
        self.arrays[key].append(
            np.concatenate([getattr(p, attr).double().numpy().ravel() for p in self.params])
        )

    def _post(self) -> None:
        self._keep("grads", "grad")
        self._keep("after", "data")

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.global_rank == 0:
            sizes = [p.numel() for p in self.params]
            stacked = {k: np.stack(v) for k, v in self.arrays.items()}
            np.savez(self.path, names=self.names, sizes=sizes, **stacked)


def main(run_path: str, ref_path: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    module = Tiny()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 6, generator=g), torch.randn(32, 3, generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=int(os.environ["WORLD_SIZE"]),
        strategy="ddp",
        gradient_clip_val=0.05,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=os.path.dirname(ref_path),
        callbacks=[SaveReference(ref_path), GradflowCallback(run_path)],
    )
    trainer.fit(module, loader)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
