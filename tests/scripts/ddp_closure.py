"""Trains a small MLP with LBFGS closures and the Recorder: one process, or DDP (gloo, launched
by torchrun) with each rank on an equal shard of the same global batch (mean loss, so the
all-reduced gradients equal the single-process ones)."""

import sys

import torch
import torch.distributed as dist
from torch import nn

import gradflow

mode, path = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
model: nn.Module = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))
rank, world = 0, 1
if mode == "ddp":
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = nn.parallel.DistributedDataParallel(model)
opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=3)
g = torch.Generator().manual_seed(1)
with gradflow.Recorder(model, opt, path, reduce_activations=True) as rec:
    for _ in range(3):
        shard = slice(rank * 8 // world, (rank + 1) * 8 // world)
        x = torch.randn(8, 6, generator=g)[shard]
        y = torch.randn(8, 2, generator=g)[shard]

        def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        rec.log(loss=opt.step(closure))
if mode == "ddp":
    dist.barrier()  # rank 0 may still be closing its file; leave the group together
    dist.destroy_process_group()
