"""The ``skip`` probe against a hand-written float64 autograd computation.

The reference runs the same float64 model (a copy taken before recording) by hand, with
every skip connection fed by its own clone of the tensor it carries and the path beside it
by another, and takes ``torch.autograd.grad`` of the loss with respect to each clone: the
gradient through that path alone. The recorded norms must match to rtol 1e-6 (the run
file stores float32).
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradflow import GradflowError, Recorder, open_run
from gradflow.em.models import FCN, FCNBlock, FCNConfig, Stage

RTOL = 1e-6
Taps = list[tuple[str, str, Tensor, Tensor]]  # (short | long, column, skip path, other path)


def block_by_hand(block: FCNBlock, x: Tensor, name: str, taps: Taps) -> Tensor:
    """``block(x)`` written out, the branch and the shortcut each on its own clone."""
    if block.pool is not None:
        x = block.pool(x)
    branch_in, skip_in = x.clone(), x.clone()
    out = branch_in
    for i in range(1, block.n_convs + 1):
        if block.has_norm:
            out = getattr(block, f"norm{i}")(out)
        out = getattr(block, f"act{i}")(out)
        if block.upsample is not None and i == block.n_convs:
            out = F.interpolate(out, scale_factor=2.0, mode="nearest")
        out = getattr(block, f"conv{i}")(out)
    if not block.short_skip:
        return out
    skip = skip_in
    if block.shortcut is not None:
        skip = block.shortcut(skip)
    elif block.stride == 2:
        skip = skip[:, :, ::2, ::2]
    if block.upsample is not None:
        skip = F.interpolate(skip, scale_factor=2.0, mode="nearest")
    taps.append(("short", f"{name}.conv1", skip_in, branch_in))
    return out + skip


def stage_by_hand(model: FCN, name: str, x: Tensor, taps: Taps) -> Tensor:
    stage = getattr(model, name)
    if name in ("down1", "final"):
        return stage(x)
    for j, block in enumerate(stage):
        x = block_by_hand(block, x, f"{name}.{j}", taps)
    return x


def fcn_by_hand(model: FCN, x: Tensor) -> tuple[Tensor, Taps]:
    """``model(x)`` written out, each long skip and the stage below it on their own clones."""
    config, taps = model.config, []
    down = ["down1", *(f"down{k}" for k in range(2, len(config.down) + 2))]
    up = [*(f"up{k}" for k in range(1, len(config.up) + 1)), "final"]
    skips = []
    for name in down:
        s = stage_by_hand(model, name, x, taps)
        x, skip = s.clone(), s.clone()
        last = [n for n, m in getattr(model, name).named_modules() if isinstance(m, nn.Conv2d)]
        taps.append(("long", f"{name}.{last[-1]}", skip, x))
        skips.append(skip)
    x = stage_by_hand(model, "across", x, taps)
    for name in up:
        skip = skips.pop()
        if config.long_skip == "concat":
            x = torch.cat([x, skip], dim=1)
        elif config.long_skip == "sum":
            x = (model.long_skips[name](x) if name in model.long_skips else x) + skip
        x = stage_by_hand(model, name, x, taps)
    if config.long_skip == "none":
        taps[:] = [tap for tap in taps if tap[0] == "short"]
    return model.classifier(x), taps


def expected(model: FCN, batches: list[tuple[Tensor, Tensor]]) -> dict[tuple[str, str], tuple]:
    """(kind, column) -> (norm through the skip, norm through the other path), summed in
    squares over ``batches`` (micro-batches of one step)."""
    squares: dict[tuple[str, str], np.ndarray] = {}
    for x, target in batches:
        out, taps = fcn_by_hand(model, x)
        loss = (out - target).square().mean()
        tensors = [t for tap in taps for t in tap[2:]]
        grads = torch.autograd.grad(loss, tensors)
        for k, (kind, column, _, _) in enumerate(taps):
            sq = np.array([g.square().sum().item() for g in grads[2 * k : 2 * k + 2]])
            squares[kind, column] = squares.get((kind, column), 0) + sq
    return {key: tuple(np.sqrt(sq)) for key, sq in squares.items()}


STATS = {
    "short": ("shortcut_norm", "branch_norm", "shortcut_share"),
    "long": ("long_norm", "below_norm", "long_share"),
}


def simple(repeats: int, width: int = 6) -> Stage:
    return Stage("simple", repeats, width)


CONFIGS = {
    # all skips (sum), simple blocks: identity shortcuts after a max-pool or before upsampling
    "long-short": FCNConfig(
        stem_width=6, down=(simple(2),) * 2, across=simple(2), up=(simple(2),) * 2
    ),
    # bottlenecks: stride-2 decimated and projected (1x1 conv) shortcuts; concat long skips
    "bottleneck-concat": FCNConfig(
        stem_width=4,
        down=(Stage("bottleneck", 2, 8),),
        across=Stage("bottleneck", 2, 8),
        up=(Stage("bottleneck", 2, 4),),
        long_skip="concat",
    ),
    # panel (d): long skips only, no batch norm (the branch starts at the ReLU)
    "long-nobn": FCNConfig(
        stem_width=6,
        down=(simple(2),) * 2,
        across=simple(2),
        up=(simple(2),) * 2,
        short_skip=False,
        batch_norm=False,
    ),
    # short skips only, projected where the width changes
    "short-widths": FCNConfig(
        stem_width=4,
        down=(simple(1, 6),),
        across=simple(2, 8),
        up=(simple(1, 4),),
        long_skip="none",
    ),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_skip_norms_match_float64_autograd(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = CONFIGS[name]
    model = FCN(dataclasses.replace(config, dropout=0.0, residual_init="he")).double()
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    steps = [
        [
            (
                torch.randn(2, 1, 16, 16, generator=g, dtype=torch.float64),
                torch.rand(2, 1, 16, 16, generator=g, dtype=torch.float64),
            )
            for _ in range(micro)
        ]
        for micro in (1, 2)  # the second step accumulates two micro-batches
    ]
    want = []
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.05)
    path = tmp_path / "skip.h5"
    with Recorder(model, optimizer, path, probes=("skip",)) as recorder:
        for batches in steps:
            want.append(expected(reference, batches))
            optimizer.zero_grad()
            for x, target in batches:
                (model(x) - target).square().mean().backward()
            optimizer.step()
            recorder.log()
            # The reference takes the same step (its own plain backward).
            reference_optimizer.zero_grad()
            for x, target in batches:
                (reference(x) - target).square().mean().backward()
            reference_optimizer.step()
    with open_run(path) as run:
        names = run.layer_names
        for row, norms in enumerate(want):
            for kind, stats in STATS.items():
                columns = {names.index(c): v for (k, c), v in norms.items() if k == kind}
                skip, other, share = (run.stat("skip", s)[row] for s in stats)
                assert np.isnan(skip[[i for i in range(len(names)) if i not in columns]]).all()
                assert np.isnan(share[[i for i in range(len(names)) if i not in columns]]).all()
                for i, (want_skip, want_other) in columns.items():
                    assert skip[i] == pytest.approx(want_skip, rel=RTOL)
                    assert other[i] == pytest.approx(want_other, rel=RTOL)
                    assert share[i] == pytest.approx(want_skip / (want_skip + want_other), rel=RTOL)
        measured = {kind for norms in want for kind, _ in norms}
        assert (
            measured
            == {
                "long-short": {"short", "long"},
                "bottleneck-concat": {"short", "long"},
                "long-nobn": {"long"},
                "short-widths": {"short"},
            }[name]
        )


def test_a_block_outside_an_fcn_is_measured(tmp_path: Path) -> None:
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), FCNBlock("basic", 4, 8, downsample=True, dropout=0.0)
    ).double()
    reference = copy.deepcopy(model)
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    taps: Taps = []
    out = block_by_hand(reference[1], reference[0](x), "1", taps)
    grads = torch.autograd.grad(out.sin().sum(), [taps[0][2], taps[0][3]])
    want = [g.norm().item() for g in grads]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Recorder(model, optimizer, tmp_path / "block.h5", probes=("skip",)) as recorder:
        model(x).sin().sum().backward()
        optimizer.step()
        recorder.log()
    with open_run(tmp_path / "block.h5") as run:
        column = run.layer_names.index("1.conv1")
        got = [run.stat("skip", s)[0, column] for s in ("shortcut_norm", "branch_norm")]
        assert got == pytest.approx(want, rel=RTOL)
        assert np.isnan(run.stat("skip", "long_norm")).all()


@pytest.mark.parametrize(
    "model",
    [
        nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 1, 3)),
        FCN(
            FCNConfig(
                stem_width=4,
                down=(Stage("simple", 1, 4),),
                across=Stage("simple", 1, 4),
                up=(Stage("simple", 1, 4),),
                long_skip="none",
                short_skip=False,
            )
        ),
    ],
    ids=["plain", "fcn-without-skips"],
)
def test_a_model_without_skips_is_refused_in_one_line(model: nn.Module, tmp_path: Path) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(GradflowError, match=r"^the skip probe measures skip connections, and this"):
        Recorder(model, optimizer, tmp_path / "none.h5", probes=("param", "skip"))
    assert not (tmp_path / "none.h5").exists()


def record(path: Path, config: FCNConfig, seed: int, steps: int = 3) -> Path:
    """A few SGD steps of a small FCN with the skip probe, labelled by the model's name."""
    torch.manual_seed(seed)
    model = FCN(dataclasses.replace(config, residual_init="he"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    name = "long-short" if config.short_skip else "long-only"
    with Recorder(
        model, optimizer, path, probes=("skip",), config={"model": name, "seed": seed}
    ) as recorder:
        for _ in range(steps):
            x = torch.randn(2, 1, 16, 16)
            optimizer.zero_grad()
            (model(x) - (x > 0).float()).square().mean().backward()
            optimizer.step()
            recorder.log()
    return path


def test_shortcut_share_figure_draws_the_mean_over_seeds(tmp_path: Path) -> None:
    from gradflow.plots import shortcut_share

    both, long_only = CONFIGS["long-short"], CONFIGS["long-nobn"]
    paths = [record(tmp_path / f"a{seed}.h5", both, seed) for seed in (0, 1)]
    paths.append(record(tmp_path / "b.h5", long_only, 0))
    runs = [open_run(path) for path in paths]
    try:
        fig = shortcut_share(runs)
        for ax, stat in zip(fig.axes, ("shortcut_share", "long_share"), strict=True):
            lines = {line.get_label(): line for line in ax.lines}
            convs = [lay.index for lay in runs[0].layers if lay.kind == "conv"]
            with warnings.catch_warnings():  # layers without a skip: all NaN, mean NaN
                warnings.simplefilter("ignore", RuntimeWarning)
                per_run = np.stack(
                    [np.nanmean(r.stat("skip", stat)[:, convs], axis=0) for r in runs[:2]]
                )
            measured = np.isfinite(per_run[0])
            assert measured.sum() == {"shortcut_share": 10, "long_share": 3}[stat]
            mean = lines["long-short (mean, min–max of 2 runs)"]
            np.testing.assert_allclose(mean.get_ydata(), per_run.mean(axis=0)[measured], rtol=1e-6)
            np.testing.assert_allclose(mean.get_xdata(), np.flatnonzero(measured) + 0.5)
            assert ax.get_ylim() == (0.0, 1.0)
            # Without short skips, the long-only model has no line in the top panel.
            assert ("long-only" in lines) == (stat == "long_share")
        assert [t.get_text() for t in fig.legends[0].get_texts()] == [
            "long-short (mean, min–max of 2 runs)",
            "long-only",
        ]
    finally:
        for run in runs:
            run.close()
