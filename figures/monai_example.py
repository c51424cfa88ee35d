"""Records a MONAI UNet trained by MONAI's SupervisedTrainer on ISBI 2012 and draws its updates.

MONAI's engines are PyTorch Ignite engines, so ``gradflow.integrations.ignite.GradflowHandler``
records them: one row per optimizer step, the Dice loss, and at each epoch's end the
validation Dice of a ``SupervisedEvaluator`` run by MONAI's ``ValidationHandler``. The UNet
is 2-D with residual units (layer names like ``model.1.submodule.1.submodule.0.conv.unit0.conv``),
trained with Adam on random 128 px crops of the 25 training slices, validated on the 5 held-out
512 px slices. About a minute on one CPU core.

Usage (from the repository root)::

    python figures/monai_example.py  # writes runs/monai-unet.h5, figures/monai_updates.png
    python figures/monai_example.py --data synthetic --epochs 2 --run /tmp/m.h5 --out /tmp/m.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import MeanDice, ValidationHandler, from_engine
from monai.losses import DiceLoss
from monai.networks.nets import UNet
from monai.transforms import Activationsd, AsDiscreted, Compose

import gradflow
from gradflow.em.data import epoch_batches, load_dataset, split
from gradflow.integrations.ignite import GradflowHandler
from gradflow.plots import save


def record(path: Path, data: str, epochs: int, steps: int, crop: int, seed: int) -> None:
    """Train the UNet for ``epochs`` x ``steps`` Adam steps on batches of 4 crops."""
    torch.manual_seed(seed)
    train, val = split(load_dataset(data, seed=seed))
    crops = [
        {"image": x, "label": y}
        for epoch in range(epochs)
        for x, y in epoch_batches(
            train, crop=crop, batch_size=4, steps=steps, seed=seed, epoch=epoch, augment=False
        )
    ]
    whole_slices = [
        {"image": torch.from_numpy(image)[None, None], "label": torch.from_numpy(label)[None, None]}
        for image, label in zip(val.images, val.labels, strict=True)
    ]
    device = torch.device("cpu")
    net = UNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=1,
        channels=(8, 16, 32, 64),
        strides=(2, 2, 2),
        num_res_units=2,
    )
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    evaluator = SupervisedEvaluator(
        device=device,
        val_data_loader=whole_slices,
        network=net,
        postprocessing=Compose(
            [Activationsd("pred", sigmoid=True), AsDiscreted("pred", threshold=0.5)]
        ),
        key_val_metric={"val_dice": MeanDice(output_transform=from_engine(["pred", "label"]))},
    )
    trainer = SupervisedTrainer(
        device=device,
        max_epochs=epochs,
        epoch_length=steps,  # the crops list holds every epoch's batches, one after another
        train_data_loader=crops,
        network=net,
        optimizer=optimizer,
        loss_function=DiceLoss(sigmoid=True),
        train_handlers=[ValidationHandler(interval=1, validator=evaluator)],
    )
    config = {
        "model": "MONAI UNet (8, 16, 32, 64), 2 residual units",
        "data": train.source,
        "seed": seed,
        "crop": crop,
    }
    handler = GradflowHandler(path, config=config, overwrite=True)
    handler.attach(trainer, net, optimizer, metrics_from=evaluator)
    trainer.run()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/isbi2012", help="or 'synthetic'")
    parser.add_argument("--run", type=Path, default=Path("runs/monai-unet.h5"))
    parser.add_argument("--out", type=Path, default=Path("figures/monai_updates.png"))
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per epoch")
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.run.parent.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    record(args.run, args.data, args.epochs, args.steps, args.crop, args.seed)
    with gradflow.open_run(args.run) as run:
        save(
            "updates-heatmap",
            [run],
            args.out,
            force=True,
            stat="param/update_abs_mean",
            window=gradflow.plots.TimeWindow("step"),
            log=True,
            title="MONAI UNet, SupervisedTrainer, Adam: mean |ΔW| per step",
        )
        print(f"validation Dice per epoch: {run.metrics['val_dice'].round(3).tolist()}")
    print(f"wrote {args.run} and {args.out}")


if __name__ == "__main__":
    main()
