"""The model zoo: every preset is checked from the registry, plus the FCN's options."""

from __future__ import annotations

import functools
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from scipy.stats import truncnorm
from torch import nn

import gradflow.cli.commands  # noqa: F401  (registers the commands on the app)
from gradflow.cli.app import app
from gradflow.em.checkpoint import checkpoint_path
from gradflow.em.config import RESUME_KEYS, TrainConfig
from gradflow.em.loop import build_optimizer
from gradflow.em.models import (
    FCN,
    FCNBlock,
    FCNConfig,
    Projection,
    Stage,
    count_convs,
    create_model,
    he_normal_,
    list_models,
    model_info,
)
from gradflow.em.train import build_model, train
from gradflow.errors import GradflowError
from gradflow.runfile import open_run

MODELS = list_models()
SMALL = [name for name in MODELS if name != "paper-resunet"]
# Every block kind, widths that change between stages (so projections exist), 3 levels.
MIXED = FCNConfig(
    stem_width=8,
    down=(Stage("basic", 1, 8), Stage("bottleneck", 2, 16)),
    across=Stage("bottleneck", 2, 32),
    up=(Stage("bottleneck", 2, 16), Stage("basic", 1, 8)),
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@functools.cache
def built(name: str) -> FCN:
    return create_model(name)


def assert_trains_one_step(model: nn.Module, size: int, batch: int = 2) -> None:
    model.train()
    model.zero_grad(set_to_none=True)
    x = torch.randn(batch, 1, size, size)
    out = model(x)
    assert out.shape == (batch, 1, size, size)
    assert torch.isfinite(out).all()
    target = (torch.rand_like(out) < 0.22).float()
    nn.functional.binary_cross_entropy_with_logits(out, target).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name} has a non-finite gradient"


@pytest.mark.parametrize("name", MODELS)
def test_every_parameter_gets_a_finite_gradient(name: str) -> None:
    model = built(name)
    assert_trains_one_step(model, size=max(64, model.config.downsampling))


@pytest.mark.parametrize("size", [96, 128, 512])
@pytest.mark.parametrize("name", SMALL)
def test_output_has_the_input_size(name: str, size: int) -> None:
    model = built(name).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 1, size, size))
    assert out.shape == (1, 1, size, size)
    assert torch.isfinite(out).all()


@pytest.mark.slow
def test_paper_resunet_takes_512() -> None:
    model = built("paper-resunet").eval()
    with torch.no_grad():
        out = model(torch.randn(1, 1, 512, 512))
    assert out.shape == (1, 1, 512, 512)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", MODELS)
def test_a_size_the_model_cannot_take_is_a_clear_error(name: str) -> None:
    model = built(name)
    factor = model.config.downsampling
    bad = factor + factor // 2
    with pytest.raises(GradflowError, match=f"input {bad}x{bad} is not a multiple of {factor}"):
        model(torch.randn(1, 1, bad, bad))


def test_the_size_error_suggests_valid_sizes() -> None:
    model = built("fig3b-long-9")
    with pytest.raises(GradflowError) as err:
        model.check_input_size(100, 100)
    assert str(err.value) == (
        "input 100x100 is not a multiple of 32, the model's total downsampling; use e.g. 96 or 128"
    )
    with pytest.raises(GradflowError, match=r"use e\.g\. 96x32 or 128x32"):
        model.check_input_size(100, 32)
    with pytest.raises(GradflowError, match=r"expected input \(N, 1, H, W\)"):
        model(torch.randn(1, 3, 32, 32))


def test_paper_resunet_matches_the_paper_counts() -> None:
    info = model_info("paper-resunet")
    assert abs(info["conv_layers"] - 142) <= 0.05 * 142
    assert abs(info["n_params"] - 11e6) <= 0.05 * 11e6
    assert info["conv_layers_total"] > info["conv_layers"]
    assert info["downsampling"] == 64


def test_fig3b_matches_the_benchmark_description() -> None:
    info = model_info("fig3b-long-9")
    assert 75 <= info["conv_layers"] <= 90
    assert abs(info["n_params"] - 148e3) <= 0.05 * 148e3
    assert abs(len(list(built("fig3b-long-9").parameters())) - 256) <= 16


@pytest.mark.parametrize("name", MODELS)
def test_model_info_describes_every_preset(name: str) -> None:
    info = model_info(name)
    main, total = count_convs(built(name))
    assert (info["conv_layers"], info["conv_layers_total"]) == (main, total)
    assert info["n_params"] == sum(p.numel() for p in built(name).parameters())
    assert info["description"]


@pytest.mark.parametrize("name", MODELS)
def test_batch_norm_flag_decides_whether_there_is_any(name: str) -> None:
    model = built(name)
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert has_bn == model.config.batch_norm
    assert has_bn != name.endswith("nobn")


@pytest.mark.parametrize("mode", ["none", "sum", "concat"])
def test_long_skip_modes(mode: str) -> None:
    model = FCN(replace(MIXED, long_skip=mode))
    assert_trains_one_step(model, size=16)
    projections = dict(model.long_skips.named_children())
    if mode == "sum":
        assert set(projections) == {"up1", "up2"}  # 32 -> 16 and 16 -> 8 channels
    else:
        assert not projections
    first_up_width = model.get_submodule("up1.0.conv1").in_channels
    assert first_up_width == {"none": 32, "sum": 16, "concat": 48}[mode]


@pytest.mark.parametrize("short_skip", [True, False])
def test_short_skips_add_identity_paths_and_projections(short_skip: bool) -> None:
    model = FCN(replace(MIXED, short_skip=short_skip))
    assert_trains_one_step(model, size=16)
    blocks = [m for m in model.modules() if isinstance(m, FCNBlock)]
    assert all(block.short_skip == short_skip for block in blocks)
    shortcuts = {n for n, m in model.named_modules() if n.endswith("shortcut")}
    if short_skip:
        # Where a block's channel count changes; up stages get the skip's width (sum).
        assert shortcuts == {"down3.0.shortcut", "across.0.shortcut"}
        assert all(isinstance(model.get_submodule(n), Projection) for n in shortcuts)
    else:
        assert not shortcuts


def test_short_skips_change_structure_not_parameters_at_constant_width() -> None:
    with_short, without = built("fig3a-long-short-9"), built("fig3b-long-9")
    assert [n for n, _ in with_short.named_parameters()] == [
        n for n, _ in without.named_parameters()
    ]
    assert all(b.short_skip for b in with_short.modules() if isinstance(b, FCNBlock))
    assert not any(b.short_skip for b in without.modules() if isinstance(b, FCNBlock))


@pytest.mark.parametrize("residual_init", ["zero", "he"])
def test_residual_blocks_start_as_identity_with_zero_init(residual_init: str) -> None:
    model = create_model("tiny", residual_init=residual_init)
    last_convs = [b.last_conv.weight for b in model.modules() if isinstance(b, FCNBlock)]
    assert all((w == 0).all() == (residual_init == "zero") for w in last_convs)
    bias = model.classifier.bias
    assert bias is not None
    assert torch.allclose(bias, torch.tensor(math.log(0.22 / 0.78)))
    # Blocks without a short skip are never zeroed (that would cut the network).
    plain = create_model("tiny", short_skip=False)
    assert not any(
        (b.last_conv.weight == 0).all() for b in plain.modules() if isinstance(b, FCNBlock)
    )


def test_layer_names_are_readable() -> None:
    fig3 = dict(built("fig3a-long-short-9").named_modules())
    for name in ["down1.conv", "down4.2.conv1", "across.0", "up1.3", "final.conv", "classifier"]:
        assert name in fig3
    paper = dict(built("paper-resunet").named_modules())
    for name in ["down5.2.conv2", "down4.0.shortcut", "across.2.upsample", "long_skips.up1"]:
        assert name in paper


def test_bad_names_overrides_and_values_are_clear_errors() -> None:
    with pytest.raises(GradflowError, match=r"unknown model 'fig3b-long9'.*did you mean"):
        create_model("fig3b-long9")
    with pytest.raises(GradflowError, match=r"unknown FCNConfig field 'longskip'.*'long_skip'"):
        create_model("tiny", longskip="sum")
    with pytest.raises(GradflowError, match="long_skip must be one of"):
        create_model("tiny", long_skip="diagonal")
    with pytest.raises(GradflowError, match="multiple of 4"):
        replace(MIXED, across=Stage("bottleneck", 1, 30))


def test_models_command_lists_every_preset(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # get_group: `models` is a subcommand even while it is the app's only command.
    monkeypatch.setenv("COLUMNS", "200")
    typer.main.get_group(app).main(["models"], prog_name="gradflow", standalone_mode=False)
    output = capsys.readouterr().out
    for name in MODELS:
        assert name in output
    assert "142" in output


def test_models_command_never_cuts_a_name_at_80_columns(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    typer.main.get_group(app).main(["models"], prog_name="gradflow", standalone_mode=False)
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) <= 80
    for name in MODELS:
        assert any(name in line.split() for line in lines), f"{name} is cut or wrapped"


# --- gradflow record --init and --optimizer -------------------------------------------------------

TRUNCATED = truncnorm(-2.0, 2.0)  # the independent reference for Keras' he_normal


def he_scaled(model: nn.Module) -> list[torch.Tensor]:
    """Every convolution's weights over sqrt(2 / fan_in), in float64."""
    return [
        (m.weight.detach().double() / math.sqrt(2.0 / m.weight[0].numel())).flatten()
        for m in model.modules()
        if isinstance(m, nn.Conv2d)
    ]


def test_he_normal_is_keras_truncated_normal() -> None:
    weight = torch.empty(256, 64, 3, 3)  # fan_in 576, 147 456 draws
    he_normal_(weight)
    z_all = (weight.double() / math.sqrt(2.0 / 576)).numpy().ravel()
    scale = 1.0 / TRUNCATED.std()  # draws are N(0, scale^2) cut at 2 scale: std 1 after the cut
    assert z_all.std() == pytest.approx(1.0, abs=0.01)
    assert abs(z_all.mean()) < 0.01
    assert np.abs(z_all).max() <= 2.0 * scale + 1e-6
    assert np.abs(z_all).max() > 0.99 * 2.0 * scale  # cut where Keras cuts, not earlier
    # The 4th moment tells a truncated normal (2.65) from a plain one (3).
    kurtosis = TRUNCATED.moment(4) / TRUNCATED.var() ** 2
    assert np.mean(z_all**4) == pytest.approx(kurtosis, abs=0.05)
    assert kurtosis < 2.8


@pytest.mark.parametrize("name", ["fig3a-long-short-9", "fig3d-long-7-nobn"])
def test_paper_init_is_plain_he_normal(name: str) -> None:
    model = build_model(TrainConfig(model=name, init="paper"))
    scaled = he_scaled(model)
    z = torch.cat(scaled).numpy()
    assert z.std() == pytest.approx(1.0, abs=0.02) and abs(z.mean()) < 0.02
    assert np.abs(z).max() <= 2.0 / TRUNCATED.std() + 1e-6
    for layer in scaled:  # no zeroed residual branch: every layer has the std
        tolerance = 6 * 0.6 / math.sqrt(layer.numel())  # 6 standard errors of a sample std
        assert layer.std().item() == pytest.approx(1.0, abs=max(tolerance, 0.02))
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.bias is not None:
            assert (m.bias == 0).all()  # the classifier's too: no prior bias
        if isinstance(m, nn.BatchNorm2d):
            assert (m.weight == 1).all() and (m.bias == 0).all()
    assert model.classifier.bias is not None and (model.classifier.bias == 0).all()


def test_default_init_is_unchanged() -> None:
    model = build_model(TrainConfig(model="tiny", seed=3))
    torch.manual_seed(3)
    reference = create_model("tiny")
    for (name, a), b in zip(
        model.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    assert any((b.last_conv.weight == 0).all() for b in model.modules() if isinstance(b, FCNBlock))
    paper = build_model(TrainConfig(model="tiny", seed=3, init="paper"))
    assert not torch.equal(paper.classifier.weight, model.classifier.weight)


@pytest.mark.parametrize(
    ("options", "kind", "expected"),
    [
        ({}, torch.optim.RMSprop, {"lr": 1e-3, "alpha": 0.9, "eps": 1e-8, "momentum": 0.0}),
        ({"eps": 1e-4}, torch.optim.RMSprop, {"eps": 1e-4, "momentum": 0.0}),
        ({"optimizer": "sgd"}, torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),
        (
            {"optimizer": "sgd", "momentum": 0.5, "nesterov": False, "lr": 0.01},
            torch.optim.SGD,
            {"momentum": 0.5, "nesterov": False, "lr": 0.01},
        ),
        ({"optimizer": "sgd", "momentum": 0.0}, torch.optim.SGD, {"nesterov": False}),
        (
            {"optimizer": "adam", "eps": 1e-6, "momentum": 0.8},
            torch.optim.Adam,
            {"eps": 1e-6, "betas": (0.8, 0.999)},
        ),
    ],
)
def test_optimizer_switches(
    options: dict[str, object], kind: type[torch.optim.Optimizer], expected: dict[str, object]
) -> None:
    config = TrainConfig(model="tiny", **options)  # type: ignore[arg-type]
    config.validate()
    model = build_model(config)
    optimizer = build_optimizer(model, config)
    assert type(optimizer) is kind
    for key, value in expected.items():
        assert all(group[key] == value for group in optimizer.param_groups), key
    convs = {id(m.weight) for m in model.modules() if isinstance(m, nn.Conv2d)}
    for group in optimizer.param_groups:  # L2 on convolution weights only, as before
        on_convs = all(id(p) in convs for p in group["params"])
        assert group["weight_decay"] == (1e-4 if on_convs else 0.0)


def test_sgd_nesterov_steps_as_the_formula() -> None:
    config = TrainConfig(model="tiny", optimizer="sgd", lr=0.1, momentum=0.9)
    model = build_model(config)
    optimizer = build_optimizer(model, config)
    weight = model.classifier.weight
    w = weight.detach().double().clone()
    buffer = torch.zeros_like(w)
    for step in range(3):
        grad = torch.full_like(weight, 0.5 + step)
        weight.grad = grad
        optimizer.step()
        g = grad.double() + 1e-4 * w  # L2 on a convolution weight
        buffer = g if step == 0 else 0.9 * buffer + g
        w = w - 0.1 * (g + 0.9 * buffer)  # Nesterov's look-ahead
        torch.testing.assert_close(weight.detach().double(), w, rtol=1e-6, atol=1e-7)


def test_bad_switches_are_clear_errors() -> None:
    with pytest.raises(GradflowError, match=r"unknown optimizer 'sdg'; did you mean 'sgd'"):
        TrainConfig(optimizer="sdg").validate()  # type: ignore[arg-type]
    with pytest.raises(GradflowError, match=r"unknown init 'he'"):
        TrainConfig(init="he").validate()  # type: ignore[arg-type]
    with pytest.raises(GradflowError, match=r"momentum must be in \[0, 1\)"):
        TrainConfig(momentum=1.5).validate()


# One optimizer step of the tiny model on a small synthetic volume, no validation.
TINY_RUN = TrainConfig(
    model="tiny",
    synthetic_slices=6,
    synthetic_size=64,
    epochs=1,
    steps_per_epoch=1,
    crop=32,
    batch_size=2,
    val_every=0,
)


def test_switches_are_stored_and_fixed_for_resume(tmp_path: Path) -> None:
    assert {"optimizer", "momentum", "nesterov", "init", "eps"} <= set(RESUME_KEYS)
    config = replace(TINY_RUN, optimizer="sgd", init="paper")
    out = tmp_path / "r.h5"
    train(config, out, progress="off")
    with open_run(out) as run:
        assert run.config["init"] == "paper"
        stored = run.config["optimizer"]
    assert stored["name"] == "SGD" and stored["momentum"] == 0.9 and stored["nesterov"] is True
    with pytest.raises(GradflowError, match=r"optimizer 'sgd' -> 'rmsprop'"):
        train(replace(config, epochs=2, optimizer="rmsprop"), out, resume=True, progress="off")


def test_a_checkpoint_older_than_the_switches_resumes(tmp_path: Path) -> None:
    config = TINY_RUN
    out = tmp_path / "old.h5"
    train(config, out, progress="off")
    path = checkpoint_path(out)
    payload = torch.load(path, weights_only=True)
    for key in ("optimizer", "momentum", "nesterov", "init"):
        del payload["config"][key]  # as written before these settings existed
    torch.save(payload, path)
    summary = train(replace(config, epochs=2), out, resume=True, progress="off")
    assert summary is not None and summary.epochs == 2
    with pytest.raises(GradflowError, match=r"init 'default' -> 'paper'"):
        train(replace(config, epochs=3, init="paper"), out, resume=True, progress="off")


def test_record_passes_the_switches(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[TrainConfig] = []
    monkeypatch.setattr("gradflow.em.train.train", lambda config, *a, **k: seen.append(config))
    argv = ["record", "--out", "x.h5", "--optimizer", "sgd", "--momentum", "0.5"]
    argv += ["--no-nesterov", "--eps", "1e-4", "--init", "paper", "--lr", "0.01"]
    typer.main.get_group(app).main(argv, prog_name="gradflow", standalone_mode=False)
    (config,) = seen
    assert (config.optimizer, config.momentum, config.nesterov) == ("sgd", 0.5, False)
    assert (config.eps, config.init, config.lr) == (1e-4, "paper", 0.01)
    default = TrainConfig()
    assert (default.optimizer, default.momentum, default.init) == ("rmsprop", None, "default")
