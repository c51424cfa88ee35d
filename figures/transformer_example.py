"""Records a 12-block vision transformer with gradflow.Recorder and draws its update figure.

A ViT in plain torch (timm's layer names: ``patch_embed.proj``, ``blocks.<i>.attn.qkv``,
``blocks.<i>.mlp.fc1``, ..., ``head``) learns a synthetic 10-class task: which of ten
bars of a 32 x 32 image is bright. No downloads; about a minute on one CPU core.

Usage (from the repository root)::

    python figures/transformer_example.py  # writes runs/vit-12.h5, figures/transformer_updates.png
    python figures/transformer_example.py --epochs 2 --run /tmp/vit.h5 --out /tmp/vit.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

import gradflow
from gradflow.plots import save

IMAGE, PATCH, CLASSES = 32, 4, 10


class PatchEmbed(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(1, dim, PATCH, stride=PATCH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """A pre-norm vision transformer with a class token and learned position embeddings."""

    def __init__(self, depth: int = 12, dim: int = 64, heads: int = 4) -> None:
        super().__init__()
        tokens = (IMAGE // PATCH) ** 2
        self.patch_embed = PatchEmbed(dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, tokens + 1, dim))
        self.blocks = nn.Sequential(*(Block(dim, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


def batch(generator: torch.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images with one bright horizontal bar; the label is the bar's position."""
    labels = torch.randint(0, CLASSES, (size,), generator=generator)
    images = 0.5 * torch.randn(size, 1, IMAGE, IMAGE, generator=generator)
    rows = (labels * IMAGE) // CLASSES
    for i, row in enumerate(rows.tolist()):
        images[i, 0, row : row + IMAGE // CLASSES] += 1.0
    return images, labels


def record(path: Path, epochs: int, steps: int, seed: int) -> None:
    """Train the ViT for ``epochs`` x ``steps`` AdamW steps, recording every step."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = ViT()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    val_x, val_y = batch(generator, 256)
    config = {"model": "vit-12 (plain torch)", "data": "synthetic bars", "seed": seed}
    with gradflow.Recorder(model, optimizer, path, config=config, overwrite=True) as rec:
        for _ in range(epochs):
            model.train()
            for _ in range(steps):
                x, y = batch(generator, 32)
                optimizer.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                optimizer.step()
                rec.log(loss=loss)
            model.eval()
            with torch.no_grad():
                val_loss = loss_fn(model(val_x), val_y).item()
            rec.epoch_end(val_loss=val_loss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/vit-12.h5"))
    parser.add_argument("--out", type=Path, default=Path("figures/transformer_updates.png"))
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per epoch")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.run.parent.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    record(args.run, args.epochs, args.steps, args.seed)
    with gradflow.open_run(args.run) as run:
        save(
            "updates-heatmap",
            [run],
            args.out,
            force=True,
            stat="param/update_abs_mean",
            window=gradflow.plots.TimeWindow("step"),
            log=True,
            title="12-block ViT, AdamW: mean |ΔW| per step",
        )
    print(f"wrote {args.run} and {args.out}")


if __name__ == "__main__":
    main()
