"""Synthetic run files written with :class:`gradflow.runfile.RunWriter`, for tests and benchmarks.

Values are deterministic for a seed and shaped like a long-skip-only FCN: updates shrink
towards the middle of the network and over time. ``vanishing`` layers get updates 10^4
times smaller, ``dead`` layers a zero fraction of 0.95, and ``nonfinite`` plants an
infinite gradient norm at one (step, layer) plus the matching event.
"""

from __future__ import annotations

import subprocess
import sys
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from gradflow.runfile import Event, Layer, RunWriter, StepRows

STEP_STATS: dict[str, list[str]] = {
    "param": [
        "weight_norm",
        "grad_norm",
        "update_norm",
        "update_ratio",
        "update_abs_mean",
        "update_abs_max",
        "grad_nonfinite",
    ],
    "activation": ["mean", "std", "zero_fraction", "nonfinite"],
    "grad_output": ["norm", "rms"],
}
EPOCH_STATS = ["update_abs_mean", "update_ratio", "update_norm", "update_abs_max"]
STAGES = ("down1", "down2", "across", "up1", "up2")


def fcn_layers(blocks: int = 2, stages: Sequence[str] = STAGES, bn: bool = True) -> list[Layer]:
    """Layers named like the zoo's FCN: ``<stage>.<block>.conv`` (+ ``.bn``), then the head."""
    names: list[tuple[str, str]] = []
    for stage in stages:
        for block in range(blocks):
            if bn:
                names.append((f"{stage}.{block}.bn", "bn"))
            names.append((f"{stage}.{block}.conv", "conv"))
    names += [("final.conv", "conv"), ("classifier", "conv")]
    return [
        Layer(
            index=i,
            name=name,
            kind=kind,
            type="Conv2d" if kind == "conv" else "BatchNorm2d",
            depth=i,
            n_params=288 if kind == "conv" else 64,
            shape="(32, 32, 3, 3)" if kind == "conv" else "(32,)",
        )
        for i, (name, kind) in enumerate(names)
    ]


def conv_stack(n_layers: int, stages: Sequence[str] = STAGES) -> list[Layer]:
    """``n_layers`` conv layers spread evenly over ``stages``, the last two the head."""
    body = n_layers - 2
    per_stage = -(-body // len(stages))
    names = [f"{stages[i // per_stage]}.{i % per_stage}.conv" for i in range(body)]
    names += ["final.conv", "classifier"]
    return [
        Layer(index=i, name=name, kind="conv", type="Conv2d", depth=i, n_params=288, shape="")
        for i, name in enumerate(names)
    ]


def _profile(n_layers: int, factors: Mapping[int, float]) -> np.ndarray:
    depth = np.linspace(-1.0, 1.0, n_layers)
    profile = 1e-3 * (0.05 + depth**2)
    for index, factor in factors.items():
        profile[index] *= factor
    return profile


class SyntheticRun:
    """Writes one synthetic run, block by block; a context manager closing the writer."""

    def __init__(
        self,
        path: str | Path,
        layers: Sequence[Layer],
        *,
        model: str = "tiny-fcn",
        steps_per_epoch: int = 10,
        step_stats: Mapping[str, Sequence[str]] = STEP_STATS,
        epoch_stats: Sequence[str] = EPOCH_STATS,
        vanishing: Sequence[str] = (),
        dead: Sequence[str] = (),
        seed: int = 0,
        config: Mapping[str, Any] | None = None,
        loss_offset: float = 0.0,
    ) -> None:
        self.layers = list(layers)
        self.steps_per_epoch = steps_per_epoch
        self.step_stats = {p: list(s) for p, s in step_stats.items()}
        self.epoch_stats = list(epoch_stats)
        index = {lay.name: lay.index for lay in self.layers}
        self.update_scale = _profile(len(self.layers), {index[n]: 1e-4 for n in vanishing})
        self.dead = np.zeros(len(self.layers), bool)
        self.dead[[index[n] for n in dead]] = True
        self.rng = np.random.default_rng(seed)
        self.loss_offset = loss_offset
        self.writer = RunWriter.create(
            path,
            layers=self.layers,
            step_stats=self.step_stats,
            epoch_stats=self.epoch_stats,
            config={
                "model": model,
                "data": "synthetic",
                "seed": seed,
                "lr": 1e-3,
                **(config or {}),
            },
            attrs={"device": "cpu"},
            overwrite=True,
        )
        self.n_steps = 0
        self.n_epochs = 0

    def _stat(self, probe: str, stat: str, steps: np.ndarray) -> np.ndarray:
        n, n_layers = len(steps), len(self.layers)
        decay = (1.0 + steps / 50.0)[:, None] ** -0.3
        noise = self.rng.lognormal(0.0, 0.2, (n, n_layers)).astype(np.float32)
        if probe == "activation" and stat == "zero_fraction":
            return np.where(self.dead, 0.95, 0.4 + 0.1 * noise / 2).astype(np.float32)
        if stat in ("grad_nonfinite", "nonfinite"):
            return np.zeros((n, n_layers), np.float32)
        scale = {"update_ratio": 1.0, "weight_norm": 1e4, "norm": 100.0, "rms": 10.0}
        return (self.update_scale * decay * noise * scale.get(stat, 1.0)).astype(np.float32)

    def steps(self, n: int, block: int = 8192) -> SyntheticRun:
        """Append ``n`` steps (one row each) in blocks of ``block`` rows."""
        for start in range(self.n_steps, self.n_steps + n, block):
            steps = np.arange(start, min(self.n_steps + n, start + block), dtype=np.int64)
            k = len(steps)
            self.writer.append_steps(
                StepRows(
                    steps=steps,
                    epoch=(steps // self.steps_per_epoch).astype(np.int32),
                    time=0.01 * (steps + 1.0),
                    loss=(1.0 / (1.0 + steps / 100.0) + self.loss_offset).astype(np.float32),
                    scale=np.full(k, np.nan, np.float32),
                    skipped=np.zeros(k, np.uint8),
                    overhead=np.full((k, 4), 1e-4, np.float32),
                    stats={
                        (p, s): self._stat(p, s, steps)
                        for p, names in self.step_stats.items()
                        for s in names
                    },
                )
            )
        self.n_steps += n
        return self

    def epoch(self, metrics: Mapping[str, float] | None = None) -> SyntheticRun:
        """Close the next epoch with per-layer update statistics and loss metrics."""
        e = self.n_epochs
        steps = np.array([e * self.steps_per_epoch], np.float64)
        stats = {
            s: self._stat("epoch", s, steps)[0] * self.steps_per_epoch for s in self.epoch_stats
        }
        default = {
            "train_loss": 0.6 / (1 + e) + 0.1,
            "val_loss": 0.5 / (1 + e) + 0.2 + 0.01 * (e > 4) * (e - 4),
            "pixel_error": 0.2 / (1 + e),
            "v_rand": 0.9 - 0.3 / (1 + e),
        }
        self.writer.append_epoch(e, (e + 1) * self.steps_per_epoch, stats, metrics or default)
        self.n_epochs += 1
        return self

    def nonfinite(self, step: int, layer: str, probe: str = "param") -> SyntheticRun:
        """Record a non-finite event (the stored values stay as written)."""
        self.writer.add_event(
            Event(
                step=step,
                epoch=step // self.steps_per_epoch,
                time=0.01 * (step + 1),
                kind="nonfinite",
                probe=probe,
                layer=layer,
                detail="grad_norm=inf",
            )
        )
        return self

    def commit(self) -> SyntheticRun:
        self.writer.commit()
        return self

    def close(self, compact: bool = True) -> None:
        """Close the writer; ``compact=False`` skips the gzip rewrite (faster, larger)."""
        self.writer.close(compact_file=compact)

    def __enter__(self) -> SyntheticRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_run(
    path: str | Path,
    *,
    epochs: int = 4,
    steps_per_epoch: int = 10,
    layers: Sequence[Layer] | None = None,
    compact: bool = True,
    **options: object,
) -> Path:
    """A complete small run: ``epochs`` epochs of ``steps_per_epoch`` steps each
    (``compact=False``: left uncompressed, written faster)."""
    run = SyntheticRun(
        path,
        layers or fcn_layers(),
        steps_per_epoch=steps_per_epoch,
        **options,  # type: ignore[arg-type]
    )
    try:
        for _ in range(epochs):
            run.steps(steps_per_epoch).epoch()
    finally:
        run.close(compact)
    return Path(path)


@contextmanager
def live_writer(path: Path) -> Iterator[Callable[..., None]]:
    """A :class:`SyntheticRun` written by another process (``scripts/synthetic_writer.py``);
    yields ``tell(*commands)``, which sends ``steps N``, ``epoch``, ``commit`` or ``close``
    and waits until each is done."""
    script = Path(__file__).parent / "scripts" / "synthetic_writer.py"
    writer = subprocess.Popen(
        [sys.executable, str(script), str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdin is not None and writer.stdout is not None
    stdin, stdout = writer.stdin, writer.stdout

    def tell(*commands: str) -> None:
        for command in commands:
            stdin.write(command + "\n")
            stdin.flush()
            assert stdout.readline() == "ok\n"

    try:
        yield tell
        stdin.close()
        assert writer.wait(timeout=60) == 0
    finally:
        writer.kill()
        writer.wait()
        stdin.close()
        stdout.close()


def write_slices(folder: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """An ISBI-layout folder: train/images/NN.png and train/labels/NN.png (255 = cell)."""
    for sub, stack in (("images", images), ("labels", labels)):
        (folder / "train" / sub).mkdir(parents=True)
        for i, array in enumerate(stack):
            Image.fromarray(array.astype(np.uint8)).save(folder / "train" / sub / f"{i:02d}.png")
    return folder


def zeros_stream(n_bytes: int, segment: int = 2**20) -> bytes:
    """A zlib stream of ``n_bytes`` zero bytes (a multiple of ``segment``), about 1030
    times smaller, made without inflating it: one fully flushed segment, repeated."""
    packer = zlib.compressobj(9)
    first = packer.compress(b"\0" * segment) + packer.flush(zlib.Z_FULL_FLUSH)
    body = first[2:]  # after the 2-byte zlib header; a full flush keeps no history
    end = packer.flush(zlib.Z_FINISH)[:-4]
    # Adler-32 of n zero bytes: A = 1, B = n (mod 65521).
    checksum = ((n_bytes % 65521) << 16) | 1
    return first[:2] + body * (n_bytes // segment) + end + checksum.to_bytes(4, "big")
