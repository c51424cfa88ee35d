"""An ablation of synthetic run files for the sweep tests: 2 models x 2 optimizers x 10 seeds.

Configs are nested like ``gradflow record``'s: the model's name with fields that follow
from it, the optimizer's name with its momentum, a learning rate set per model and
optimizer together (the second model trains at a tenth of the rate), the seed, and a command
line unique to each run. The logged loss is offset per model, optimizer and seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runfiles import fcn_layers, write_run

MODELS = {"tiny-a": 2, "tiny-b": 3}  # name -> blocks per stage
OPTIMIZERS = {"rmsprop": (1e-3, 0.0), "sgd": (1e-2, 0.9)}  # name -> (lr, momentum)
SEEDS = range(10)
STEP_STATS = {"param": ["grad_norm", "update_abs_mean"], "grad_output": ["norm"]}
EPOCHS, STEPS_PER_EPOCH = 3, 4


def ablation_config(model: str, optimizer: str, seed: int) -> dict[str, Any]:
    """The config of one run of the ablation."""
    blocks = MODELS[model]
    lr, momentum = OPTIMIZERS[optimizer]
    return {
        "model": {"name": model, "conv_layers": 5 * blocks + 2, "blocks": blocks},
        "optimizer": {
            "name": optimizer,
            "lr": lr / 10 if model == "tiny-b" else lr,
            "momentum": momentum,
        },
        "seed": seed,
        "epochs": EPOCHS,
        "command": f"gradflow record --model {model} --seed {seed} "
        f"--out {run_name(model, optimizer, seed)}",
    }


def run_name(model: str, optimizer: str, seed: int) -> str:
    return f"{model}-{optimizer}-s{seed}.h5"


def loss_offset(model: str, optimizer: str, seed: int) -> float:
    return 0.1 * list(MODELS).index(model) + 0.05 * list(OPTIMIZERS).index(optimizer) + 0.003 * seed


def write_ablation(folder: Path, seeds: range = SEEDS) -> list[Path]:
    """The ablation's run files in ``folder`` (uncompressed: written fast)."""
    paths = []
    for model, blocks in MODELS.items():
        for optimizer in OPTIMIZERS:
            for seed in seeds:
                paths.append(
                    write_run(
                        folder / run_name(model, optimizer, seed),
                        epochs=EPOCHS,
                        steps_per_epoch=STEPS_PER_EPOCH,
                        layers=fcn_layers(blocks=blocks),
                        compact=False,
                        step_stats=STEP_STATS,
                        seed=seed,
                        config=ablation_config(model, optimizer, seed),
                        loss_offset=loss_offset(model, optimizer, seed),
                    )
                )
    return paths
