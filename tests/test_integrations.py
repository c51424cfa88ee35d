"""The Lightning and transformers callbacks against references computed without gradflow.

Each training runs once, with the gradflow callback and a reference beside it: the
reference copies the weights (float64) before each real optimizer step, the gradients the
step used (after clipping) and the weights after it, with plain torch optimizer hooks or the
Trainer's own callback events, and computes every statistic in float64 numpy. Statistics
are float32 reductions, so they must match to rtol 1e-5 (atol 1e-7 for values near zero);
activation std (from sums of squares) to rtol 1e-4.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from gradflow import Recorder, open_run

RTOL = 1e-5
ATOL = 1e-7


# -- the reference ----------------------------------------------------------------------------
def _owned(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Trainable parameters by the module that directly owns them (a tied one: its first)."""
    seen: set[int] = set()
    groups: dict[str, list[nn.Parameter]] = {}
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in own)
        if own:
            groups[name or "(root)"] = own
    return groups


def _copy(params: list[nn.Parameter]) -> list[np.ndarray]:
    return [p.detach().double().cpu().numpy().copy() for p in params]


@dataclass
class Reference:
    """Per optimizer step: float64 weights before, gradients used, weights after."""

    model: nn.Module
    before: list[list[np.ndarray]] = field(default_factory=list)
    grads: list[list[np.ndarray]] = field(default_factory=list)
    after: list[list[np.ndarray]] = field(default_factory=list)
    outputs: list[dict[str, list[np.ndarray]]] = field(default_factory=lambda: [{}])
    losses: list[list[float]] = field(default_factory=lambda: [[]])

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for group in _owned(self.model).values() for p in group]

    def pre_step(self) -> None:
        params = self.params
        self.before.append(_copy(params))
        self.grads.append([p.grad.double().cpu().numpy().copy() for p in params])

    def post_step(self) -> None:
        self.after.append(_copy(self.params))
        self.outputs.append({})
        self.losses.append([])

    def hook_outputs(self) -> None:
        for name, module in self.model.named_modules():
            if (name or "(root)") in _owned(self.model):
                module.register_forward_hook(self._keep(name or "(root)"))

    def _keep(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if module.training:
                out = output if isinstance(output, torch.Tensor) else output[0]
                self.outputs[-1].setdefault(name, []).append(out.detach().double().numpy())

        return hook

    def indices(self, layer: str) -> list[int]:
        """Positions of the layer's parameters in the copies."""
        index = {id(p): i for i, p in enumerate(self.params)}
        return [index[id(p)] for p in _owned(self.model)[layer]]

    def param_stats(self, layers: list[str]) -> dict[str, np.ndarray]:
        """[T, L] per statistic, for the layers in the run file's order."""
        stats: dict[str, list[list[float]]] = {}
        for before, grad, after in zip(self.before, self.grads, self.after, strict=True):
            row: dict[str, list[float]] = {}
            for layer in layers:
                ids = self.indices(layer)
                w = np.concatenate([before[i].ravel() for i in ids])
                g = np.concatenate([grad[i].ravel() for i in ids])
                d = np.concatenate([(after[i] - before[i]).ravel() for i in ids])
                for key, value in {
                    "weight_norm": np.linalg.norm(w),
                    "grad_norm": np.linalg.norm(g),
                    "update_norm": np.linalg.norm(d),
                    "update_abs_mean": np.abs(d).mean(),
                    "update_abs_max": np.abs(d).max(),
                    "grad_update_cos": g @ d / (np.linalg.norm(g) * np.linalg.norm(d)),
                }.items():
                    row.setdefault(key, []).append(float(value))
            for key, values in row.items():
                stats.setdefault(key, []).append(values)
        return {key: np.array(values) for key, values in stats.items()}


def assert_param_stats(path: Path, ref: Reference, every: int = 1) -> None:
    run = open_run(path)
    expected = ref.param_stats(run.layer_names)
    np.testing.assert_array_equal(run.steps, np.arange(0, len(ref.after), every))
    for key, values in expected.items():
        np.testing.assert_allclose(
            run.stat("param", key), values[run.steps], rtol=RTOL, atol=ATOL, err_msg=key
        )


# -- Lightning ----------------------------------------------------------------------------------
# The package each flavour of the callback is for.
FLAVOURS = {"lightning": "lightning.pytorch", "pytorch_lightning": "pytorch_lightning"}


def _lightning(flavour: str = "lightning") -> Any:
    return pytest.importorskip(FLAVOURS[flavour])


def _callback(flavour: str) -> Any:
    return importlib.import_module(f"gradflow.integrations.{flavour}").GradflowCallback


def _lightning_module(manual: bool, flavour: str = "lightning") -> Any:
    pl = _lightning(flavour)
    torch.manual_seed(0)

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = not manual
            self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
            self.losses: list[float] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = nn.functional.mse_loss(self(x), y)
            self.losses.append(float(loss.detach()))
            self.log("train_loss", loss, on_step=True, on_epoch=True)
            if manual:
                opt = self.optimizers()
                opt.zero_grad()
                self.manual_backward(loss)
                self.clip_gradients(opt, gradient_clip_val=CLIP)
                opt.step()
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)

    return Tiny()


class _ReferenceHooks:
    """Reference by plain optimizer hooks: a closure step has run its closure (forward,
    backward, clipping) by the time the post-hook sees the gradients."""

    def __init__(self, ref: Reference) -> None:
        self.ref = ref
        self._pending: list[list[np.ndarray]] = []

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.register_step_pre_hook(lambda *a: self._pending.append(_copy(self.ref.params)))
        optimizer.register_step_post_hook(lambda *a: self._post())

    def _post(self) -> None:
        self.ref.before.append(self._pending.pop())
        self.ref.grads.append([p.grad.double().numpy().copy() for p in self.ref.params])
        self.ref.post_step()


CLIP = 0.05


def _fit_lightning(
    tmp_path: Path,
    module: Any,
    *,
    every: int = 1,
    fail_at: int | None = None,
    flavour: str = "lightning",
    samples: int = 24,
) -> tuple[Reference, Any]:
    pl = _lightning(flavour)
    gradflow_callback = _callback(flavour)(tmp_path / "run.h5", every=every)

    ref = Reference(module)
    hooks = _ReferenceHooks(ref)

    class Attach(pl.Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            hooks.attach(trainer.optimizers[0])

        def on_train_batch_start(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            if fail_at is not None and trainer.global_step == fail_at:
                raise RuntimeError("stop here")

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(samples, 6, generator=g), torch.randn(samples, 3, generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[Attach(), gradflow_callback],
        **(
            {}
            if not module.automatic_optimization
            else {"gradient_clip_val": CLIP, "accumulate_grad_batches": 2}
        ),
    )
    trainer.fit(module, loader)
    return ref, trainer


def _clipped(ref: Reference, clip: float) -> None:
    norms = [np.sqrt(sum((g**2).sum() for g in grads)) for grads in ref.grads]
    # Every step's gradient was clipped: its total norm is at the bound.
    np.testing.assert_allclose(norms, clip, rtol=1e-4)


def test_lightning_automatic_optimization(tmp_path: Path) -> None:
    module = _lightning_module(manual=False)
    ref, trainer = _fit_lightning(tmp_path, module)
    # 6 batches per epoch, two per optimizer step (accumulation), 2 epochs.
    assert len(ref.after) == trainer.global_step == 6
    _clipped(ref, CLIP)
    assert_param_stats(tmp_path / "run.h5", ref)
    run = open_run(tmp_path / "run.h5")
    # Each row's loss: the mean of its two micro-batches' losses.
    np.testing.assert_allclose(run.loss, np.reshape(module.losses, (-1, 2)).mean(1), rtol=RTOL)
    np.testing.assert_array_equal(run.epochs, [0, 1])
    np.testing.assert_array_equal(run.epoch_end_step, [3, 6])
    epoch_losses = np.reshape(module.losses, (2, -1)).mean(1)
    np.testing.assert_allclose(run.metrics["train_loss_epoch"], epoch_losses, rtol=RTOL)
    assert not any(name.endswith("_step") for name in run.metrics)
    # The epoch's update |W_end - W_start| per layer.
    ends = [(0, 2), (3, 5)]
    for e, (first, last) in enumerate(ends):
        for j, layer in enumerate(run.layer_names):
            ids = ref.indices(layer)
            d = np.concatenate([(ref.after[last][i] - ref.before[first][i]).ravel() for i in ids])
            got = run.stat("epoch", "update_norm")[e, j]
            np.testing.assert_allclose(got, np.linalg.norm(d), rtol=RTOL, atol=ATOL)


def test_lightning_loss_of_a_short_accumulation_step(tmp_path: Path) -> None:
    """5 batches an epoch with accumulation 2: the epoch's last step has one micro-batch,
    and its loss is that batch's loss (Lightning divides it by 2 all the same)."""
    module = _lightning_module(manual=False)
    ref, trainer = _fit_lightning(tmp_path, module, samples=20)
    assert len(ref.after) == trainer.global_step == 6
    assert_param_stats(tmp_path / "run.h5", ref)
    losses = np.array(module.losses)
    groups = [(0, 2), (2, 4), (4, 5), (5, 7), (7, 9), (9, 10)]
    want = [losses[a:b].mean() for a, b in groups]
    np.testing.assert_allclose(open_run(tmp_path / "run.h5").loss, want, rtol=RTOL)


@pytest.mark.parametrize(
    ("flavour", "every"), [("lightning", 1), ("lightning", 5), ("pytorch_lightning", 1)]
)
def test_lightning_manual_optimization(flavour: str, every: int, tmp_path: Path) -> None:
    module = _lightning_module(manual=True, flavour=flavour)
    ref, trainer = _fit_lightning(tmp_path, module, every=every, flavour=flavour)
    assert len(ref.after) == trainer.global_step == 12
    _clipped(ref, CLIP)
    assert_param_stats(tmp_path / "run.h5", ref, every)
    run = open_run(tmp_path / "run.h5")
    # Each loss on its own step's row, also where the steps between are not recorded.
    np.testing.assert_allclose(run.loss, np.array(module.losses)[run.steps], rtol=RTOL)


def test_lightning_closes_the_file_when_training_raises(tmp_path: Path) -> None:
    module = _lightning_module(manual=True)
    with pytest.raises(RuntimeError, match="stop here"):
        _fit_lightning(tmp_path, module, fail_at=3)
    np.testing.assert_array_equal(open_run(tmp_path / "run.h5").steps, [0, 1, 2])
    # The hooks are gone: the same model takes a new Recorder.
    Recorder(module, None, tmp_path / "again.h5").close()


@pytest.mark.slow
def test_lightning_ddp_rank0_writes(tmp_path: Path) -> None:
    _lightning()
    script = Path(__file__).parent / "scripts" / "lightning_ddp.py"
    (tmp_path / "run").mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    cmd += ["2", str(script), str(tmp_path / "run" / "run.h5"), str(tmp_path / "ref.npz")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["run.h5"]  # rank 0's only
    ref = np.load(tmp_path / "ref.npz")
    # Rank 0's optimizer saw the all-reduced gradients of the global batch, clipped.
    np.testing.assert_allclose(np.linalg.norm(ref["grads"], axis=1), CLIP, rtol=1e-4)
    run = open_run(tmp_path / "run" / "run.h5")
    assert run.attrs["world_size"] == 2
    np.testing.assert_array_equal(run.steps, np.arange(len(ref["grads"])))
    bounds = np.cumsum([0, *ref["sizes"]])
    columns = [run.layer_names.index(str(name).rsplit(".", 1)[0]) for name in ref["names"]]
    for key, values in (
        ("grad_norm", ref["grads"]),
        ("weight_norm", ref["before"]),
        ("update_norm", ref["after"] - ref["before"]),
    ):
        squares = np.zeros((len(values), run.n_layers))
        for i, j in enumerate(columns):
            squares[:, j] += (values[:, bounds[i] : bounds[i + 1]] ** 2).sum(1)
        got = run.stat("param", key)
        np.testing.assert_allclose(got, np.sqrt(squares), rtol=RTOL, atol=ATOL, err_msg=key)


# -- transformers -------------------------------------------------------------------------------
def test_transformers_trainer_accumulation_and_clipping(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    from gradflow.integrations.transformers import GradflowCallback

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=64,
        n_positions=16,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = transformers.GPT2LMHeadModel(config)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 64, (8, 12), generator=g)
    data = [{"input_ids": t, "labels": t} for t in tokens]
    max_grad_norm = 0.05
    ref = Reference(model)
    ref.hook_outputs()

    class ReferenceCallback(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            ref.pre_step()  # after the Trainer's clipping

        def on_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            ref.post_step()

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_grad_norm=max_grad_norm,
        num_train_epochs=2,
        learning_rate=1e-2,
        lr_scheduler_type="linear",
        logging_steps=1,
        eval_strategy="epoch",
        per_device_eval_batch_size=4,
        save_strategy="no",
        report_to="none",
        seed=0,
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=data,
        eval_dataset=data[:4],
        callbacks=[ReferenceCallback(), GradflowCallback(tmp_path / "run.h5")],
    )
    trainer.train()

    # 4 micro-batches per epoch, 2 per optimizer step, 2 epochs.
    assert len(ref.after) == trainer.state.global_step == 4
    _clipped(ref, max_grad_norm)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(entry["grad_norm"] > max_grad_norm for entry in logged)  # before clipping
    assert_param_stats(tmp_path / "run.h5", ref)

    run = open_run(tmp_path / "run.h5")
    assert "lm_head" not in run.layer_names  # tied to transformer.wte: counted once
    np.testing.assert_allclose(run.loss, [e["loss"] for e in logged], rtol=RTOL)
    np.testing.assert_allclose(run.scalars["lr"], [e["learning_rate"] for e in logged])
    # Activations of both micro-batches of each step (training-mode forwards only: the
    # evaluation's are not counted).
    mean, std = run.stat("activation", "mean"), run.stat("activation", "std")
    for t in range(len(ref.after)):
        for j, layer in enumerate(run.layer_names):
            out = np.concatenate([o.ravel() for o in ref.outputs[t][layer]])
            np.testing.assert_allclose(mean[t, j], out.mean(), rtol=RTOL, atol=ATOL)
            np.testing.assert_allclose(std[t, j], out.std(), rtol=1e-4)
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    np.testing.assert_array_equal(run.epoch_end_step, [2, 4])
    np.testing.assert_allclose(run.metrics["eval_loss"], [e["eval_loss"] for e in evals])


# -- imports ------------------------------------------------------------------------------------
def test_import_gradflow_imports_no_training_framework() -> None:
    code = (
        "import sys, gradflow, gradflow.integrations; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'lightning', 'pytorch_lightning', 'transformers', 'accelerate'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.stdout.strip() == "[]"
