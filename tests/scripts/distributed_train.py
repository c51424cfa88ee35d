"""Trains a small MLP with the Recorder: single process, DDP or FSDP2 (launched by torchrun).

Every mode sees the same global batch per step (ranks take equal shards of it) and uses
a mean loss, so the gradients after the all-reduce equal the single-process ones.
"""

import sys

import torch
import torch.distributed as dist
from torch import nn

import gradflow

mode, path = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 2))
rank, world = 0, 1
if mode != "single":
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if mode == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
g = torch.Generator().manual_seed(1)
with gradflow.Recorder(model, opt, path, reduce_activations=True) as rec:
    for _epoch in range(2):
        for _ in range(3):
            x, y = torch.randn(8, 6, generator=g), torch.randn(8, 2, generator=g)
            shard = slice(rank * 8 // world, (rank + 1) * 8 // world)
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x[shard]), y[shard])
            loss.backward()
            opt.step()
            rec.log(loss=loss)
        rec.epoch_end()
if mode != "single":
    dist.barrier()  # rank 0 may still be closing its file; leave the group together
    dist.destroy_process_group()
