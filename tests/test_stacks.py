"""The recorder on training stacks other than ``backward(); step()``, each against its own
reference.

The reference never uses gradflow code: weights are copied by hand (float64) before and
after each step, gradients are copied where the step reads them (inside the test's own
closure for closure steps), layer outputs are captured by the test's own hooks with
``retain_grad()``, and statistics are computed in float64. Recorded statistics match it to
1e-5 relative (1e-4 for the activation std, computed from sums of squares).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
import torch.utils.checkpoint
from torch import nn
from torch.nn.utils import parametrizations, parametrize

from gradflow import GradflowError, Recorder, open_run

RTOL = 1e-5
NO_UPDATE = tuple(f"param/update_{s}" for s in ("norm", "ratio", "abs_mean", "abs_max"))
Row = dict[tuple[str, str], np.ndarray]


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3)
    )


def batches(n: int, n_in: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(5, n_in, generator=g), torch.randn(5, 3, generator=g)) for _ in range(n)]


class Reference:
    """Hand-made float64 statistics of named layers, one row per optimizer step."""

    def __init__(self, model: nn.Module, layers: list[str]) -> None:
        self.layers = layers
        self.outputs: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
        self.capturing = True
        self.rows: list[Row] = []
        self._before: list[list[torch.Tensor]] = []
        self._grads: list[list[torch.Tensor | None]] = []
        self._handles: list[Any] = []
        self.bind(model)

    def bind(self, model: nn.Module) -> None:
        """Watch the named layers of ``model`` (again, after a submodule was replaced)."""
        for handle in self._handles:
            handle.remove()
        modules = dict(model.named_modules())
        self.modules = [modules[name] for name in self.layers]
        self._handles = [
            module.register_forward_hook(self._capture(name))
            for name, module in zip(self.layers, self.modules, strict=True)
        ]

    def _capture(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else output
            if self.capturing and module.training and torch.is_grad_enabled():
                if out.requires_grad:
                    out.retain_grad()
                self.outputs[name].append(out)

        return hook

    def params(self, i: int) -> list[nn.Parameter]:
        module = self.modules[i]
        owned = list(module.parameters(recurse=False))
        if parametrize.is_parametrized(module):  # weight_norm's original0/1 make its weight
            owned += list(module.parametrizations.parameters())
        return [p for p in owned if p.requires_grad]

    def weights_and_grads(self) -> None:
        """Copy weights and gradients now (where the optimizer step reads them)."""
        self._before = [
            [p.detach().double().clone() for p in self.params(i)] for i in range(len(self.layers))
        ]
        # None: the parameter has no gradient (a layer none of whose parameters has one
        # has no gradient statistics; otherwise they are those of the ones that have one).
        self._grads = [
            [
                None
                if p.grad is None
                else (p.grad.to_dense() if p.grad.is_sparse else p.grad).double().clone()
                for p in self.params(i)
            ]
            for i in range(len(self.layers))
        ]

    def row(self, stepped: list[bool] | None = None, regraded: bool = False) -> None:
        """Close a row: the update is the change since :meth:`weights_and_grads`;
        ``stepped[i]`` False: layer i's optimizer did not step (NaN expected); ``regraded``:
        the step evaluated the gradient again (no gradient-update cosine expected)."""
        stats: dict[str, list[float]] = {}
        for i, name in enumerate(self.layers):
            w = torch.cat([t.reshape(-1) for t in self._before[i]])
            present = [t.reshape(-1) for t in self._grads[i] if t is not None]
            g = torch.cat(present) if present else torch.full((1,), np.nan, dtype=torch.float64)
            d = torch.cat([p.detach().double().reshape(-1) for p in self.params(i)]) - w
            # g . d over the parameters that have a gradient
            dot = sum(
                float((t.reshape(-1) * (p.detach().double() - b).reshape(-1)).sum())
                for t, p, b in zip(self._grads[i], self.params(i), self._before[i], strict=True)
                if t is not None
            )
            nan = stepped is not None and not stepped[i]
            outs = self.outputs[name]
            act = torch.cat([o.detach().double().reshape(-1) for o in outs]) if outs else None
            gouts = [o.grad for o in outs if o.grad is not None]
            gout = torch.cat([t.double().reshape(-1) for t in gouts]) if gouts else None
            values = {
                ("param", "weight_norm"): w.norm(),
                ("param", "grad_norm"): g.norm(),
                ("param", "grad_nonfinite"): (~torch.isfinite(g)).sum() if present else None,
                ("param", "grad_update_cos"): dot / (g.norm() * d.norm())
                if present and not regraded
                else None,
                ("param", "update_norm"): d.norm(),
                ("param", "update_ratio"): d.norm() / w.norm(),
                ("param", "update_abs_mean"): d.abs().mean(),
                ("param", "update_abs_max"): d.abs().max(),
                ("activation", "mean"): act.mean() if act is not None else None,
                ("activation", "std"): act.std(unbiased=False) if act is not None else None,
                ("activation", "zero_fraction"): (act == 0).double().mean()
                if act is not None
                else None,
                ("activation", "nonfinite"): (~torch.isfinite(act)).sum()
                if act is not None
                else None,
                ("grad_output", "norm"): gout.norm() if gout is not None else None,
                ("grad_output", "rms"): gout.square().mean().sqrt() if gout is not None else None,
            }
            for (probe, stat), v in values.items():
                missing = v is None or (nan and probe == "param")
                stats.setdefault(f"{probe}/{stat}", []).append(np.nan if missing else float(v))
        self.rows.append({tuple(k.split("/")): np.array(v) for k, v in stats.items()})  # type: ignore[misc]
        self.outputs = {name: [] for name in self.layers}

    def check(self, path: Any, skip: tuple[str, ...] = (), atol: float = 1e-7) -> None:
        """The run file's statistics equal the reference rows (NaN where NaN)."""
        for handle in self._handles:
            handle.remove()
        run = open_run(path)
        assert run.n_steps == len(self.rows)
        cols = [run.layer_names.index(name) for name in self.layers]
        for probe, stat in self.rows[0]:
            if probe in skip or f"{probe}/{stat}" in skip:
                continue
            got = run.stat(probe, stat)[:, cols].astype(np.float64)
            want = np.stack([r[(probe, stat)] for r in self.rows])
            rtol = 1e-4 if stat == "std" else RTOL
            np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=f"{probe}/{stat}")
        run.close()


def closure_steps(
    make_opt: Callable[[nn.Module], torch.optim.Optimizer], path: Any, steps: int = 3
) -> int:
    model = mlp()
    opt = make_opt(model)
    ref = Reference(model, ["0", "2", "4"])
    calls = 0
    with Recorder(model, opt, path) as rec:
        for x, y in batches(steps):
            first = True
            before = calls

            def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> float:
                nonlocal first, calls
                calls += 1
                opt.zero_grad()
                ref.capturing = first
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward()
                if first:  # the gradient of the step: at the weights before it
                    ref.weights_and_grads()
                first = False
                return loss  # type: ignore[return-value]  # optimizers return it as given

            loss = opt.step(closure)
            rec.log(loss=loss)
            ref.row(regraded=calls - before > 1)
    ref.check(path)
    return calls


def test_lbfgs_closure_gradient_of_the_first_evaluation(tmp_path) -> None:
    calls = closure_steps(
        lambda m: torch.optim.LBFGS(m.parameters(), lr=0.5, max_iter=4), tmp_path / "r.h5"
    )
    assert calls > 3  # several evaluations per step


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
        lambda m: torch.optim.Adam(m.parameters(), lr=1e-2),
    ],
    ids=["sgd", "adam"],
)
def test_closure_steps(make_opt, tmp_path) -> None:
    assert closure_steps(make_opt, tmp_path / "r.h5") == 3


class Wrapper:
    """Holds the real optimizer as ``.optimizer`` (as accelerate and Lightning do)."""

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer

    def step(self, closure: Any = None) -> Any:
        return self.optimizer.step(closure)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()


def plain_steps(
    model: nn.Module,
    opts: list[Any],
    path: Any,
    ref: Reference,
    steps: int = 3,
    stepping: Callable[[int, int], bool] = lambda step, k: True,
    owner: list[int] | None = None,
    **kwargs: Any,
) -> None:
    """``backward()`` then each optimizer's ``step()`` (optimizer k only where
    ``stepping(step, k)``); ``owner[i]``: the optimizer of layer i."""
    with Recorder(model, opts if len(opts) > 1 else opts[0], path, **kwargs):
        for step, (x, y) in enumerate(batches(steps, x_in(model))):
            for opt in opts:
                opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            ref.weights_and_grads()
            stepped = [stepping(step, k) for k in range(len(opts))]
            for k, opt in enumerate(opts):
                if stepped[k]:
                    opt.step()
            ref.row([stepped[k] for k in owner] if owner else None)


def x_in(model: nn.Module) -> int:
    first = next(m for m in model.modules() if isinstance(m, nn.Linear))
    return first.in_features


def test_wrapped_optimizers_are_unwrapped(tmp_path) -> None:
    model = mlp()
    opt = Wrapper(Wrapper(torch.optim.SGD(model.parameters(), lr=0.1)))
    ref = Reference(model, ["0", "2", "4"])
    plain_steps(model, [opt], tmp_path / "r.h5", ref)
    ref.check(tmp_path / "r.h5")
    with pytest.raises(GradflowError, match=r"torch\.optim\.Optimizer"):
        Recorder(model, Wrapper(object()), tmp_path / "bad.h5")


def test_accelerate_optimizer_is_unwrapped(tmp_path) -> None:
    accelerate = pytest.importorskip("accelerate")
    model = mlp()
    accelerator = accelerate.Accelerator(cpu=True)
    opt = accelerator.prepare_optimizer(torch.optim.Adam(model.parameters(), lr=1e-2))
    assert type(opt).__name__ == "AcceleratedOptimizer"
    ref = Reference(model, ["0", "2", "4"])
    plain_steps(model, [opt], tmp_path / "r.h5", ref)
    ref.check(tmp_path / "r.h5")


def test_list_of_optimizers_one_row_per_step(tmp_path) -> None:
    model = mlp()
    opt_a = torch.optim.SGD(list(model[0].parameters()) + list(model[4].parameters()), lr=0.1)
    opt_b = torch.optim.Adam(model[2].parameters(), lr=1e-2)
    ref = Reference(model, ["0", "2", "4"])
    # opt_b steps every other step: its layer is NaN in the rows it did not step in.
    plain_steps(
        model,
        [opt_a, opt_b],
        tmp_path / "r.h5",
        ref,
        steps=4,
        stepping=lambda step, k: k == 0 or step % 2 == 0,
        owner=[0, 1, 0],
    )
    ref.check(tmp_path / "r.h5")
    run = open_run(tmp_path / "r.h5")
    assert np.isnan(run.stat("param", "grad_norm")[1, run.layer_names.index("2")])
    assert run.attrs["optimizer"] == "SGD,Adam"


class Bag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, 6, sparse=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(x)).mean(1))


def test_sparse_gradients_with_two_optimizers(tmp_path) -> None:
    model = Bag()
    sparse = torch.optim.SparseAdam(model.embed.parameters(), lr=1e-2)
    dense = torch.optim.Adam(model.head.parameters(), lr=1e-2)
    ref = Reference(model, ["embed", "head"])
    g = torch.Generator().manual_seed(2)
    path = tmp_path / "r.h5"
    with Recorder(model, [sparse, dense], path):
        for _ in range(3):
            # Repeated indices: the coalesced gradient sums their rows.
            x, y = torch.randint(0, 20, (4, 5), generator=g), torch.randn(4, 3, generator=g)
            x[:, 0] = x[:, 1]
            sparse.zero_grad()
            dense.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            assert model.embed.weight.grad is not None and model.embed.weight.grad.is_sparse
            ref.weights_and_grads()
            sparse.step()
            dense.step()
            ref.row()
    ref.check(path)


class Blocks(nn.Module):
    def __init__(self, checkpoint: bool | None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.checkpoint = checkpoint  # None: no checkpointing; else use_reentrant
        self.inp = nn.Linear(6, 8)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)) for _ in range(2)
        )
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            if self.checkpoint is None:
                h = h + block(h)
            else:
                h = h + torch.utils.checkpoint.checkpoint(block, h, use_reentrant=self.checkpoint)
        return self.out(h)


BLOCK_LAYERS = ["inp", "blocks.0.0", "blocks.0.2", "blocks.1.0", "blocks.1.2", "out"]


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_activation_checkpointing_counts_each_forward_once(reentrant: bool, tmp_path) -> None:
    plain = Blocks(None)
    ref = Reference(plain, BLOCK_LAYERS)
    plain_steps(plain, [torch.optim.SGD(plain.parameters(), lr=0.1)], tmp_path / "plain.h5", ref)
    ref.check(tmp_path / "plain.h5")
    # The checkpointed model is the same model: its run equals the plain run's reference.
    model = Blocks(reentrant)
    ref.bind(model)
    ref.rows, rows = [], ref.rows
    ref.capturing = False
    plain_steps(
        model,
        [torch.optim.SGD(model.parameters(), lr=0.1)],
        tmp_path / "ckpt.h5",
        Reference(model, []),
    )
    ref.rows = rows
    ref.check(tmp_path / "ckpt.h5")


@contextmanager
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    try:
        yield
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize(
    ("when", "backend"),
    [
        pytest.param("before", "inductor", marks=pytest.mark.slow),  # ~20 s compiling
        ("after", "aot_eager"),
    ],
    ids=["compiled-before-attach-inductor", "compiled-after-attach-aot-eager"],
)
def test_compiled_model_records_the_eager_statistics(when: str, backend: str, tmp_path) -> None:
    eager = mlp()
    ref = Reference(eager, ["0", "2", "4"])
    plain_steps(
        eager,
        [torch.optim.SGD(eager.parameters(), lr=0.1)],
        tmp_path / "eager.h5",
        ref,
        every=2,
        steps=4,
    )
    ref.rows = ref.rows[::2]  # the recorded steps 0 and 2
    ref.check(tmp_path / "eager.h5")
    with fresh_dynamo():
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        compile = partial(torch.compile, backend=backend)
        compiled = cast(nn.Module, compile(model)) if when == "before" else model
        with Recorder(compiled, opt, tmp_path / "c.h5", every=2):
            if when == "after":
                compiled = cast(nn.Module, compile(model))
            for x, y in batches(4):
                opt.zero_grad()
                nn.functional.mse_loss(compiled(x), y).backward()
                opt.step()
    eager_run, compiled_run = open_run(tmp_path / "eager.h5"), open_run(tmp_path / "c.h5")
    assert compiled_run.layer_names == eager_run.layer_names and compiled_run.n_steps == 2
    for probe, names in eager_run.probes().items():
        for stat in names:
            np.testing.assert_allclose(
                compiled_run.stat(probe, stat),
                eager_run.stat(probe, stat),
                rtol=RTOL,
                atol=1e-7,
                err_msg=stat,
            )


class Custom(nn.Module):
    """Not an nn.Sequential: its compiled code still calls the model's own hooks."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(6, 12)
        self.fc2 = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


@pytest.mark.parametrize("make", [mlp, Custom], ids=["sequential", "custom"])
def test_compiled_model_that_ran_before_attaching_is_refused_at_the_first_step(
    make: Callable[[], nn.Module], tmp_path
) -> None:
    with fresh_dynamo():
        model = make()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        compiled = torch.compile(model, backend="eager")
        data = batches(3)
        for x, y in data[:2]:  # warmed up: two compiled training steps
            opt.zero_grad()
            nn.functional.mse_loss(compiled(x), y).backward()
            opt.step()
        steps = 0
        with (
            pytest.raises(GradflowError, match=r"torch._dynamo.reset\(\)"),
            Recorder(cast(nn.Module, compiled), opt, tmp_path / "r.h5"),
        ):
            for x, y in data:
                opt.zero_grad()
                nn.functional.mse_loss(compiled(x), y).backward()
                opt.step()
                steps += 1
    assert steps == 0  # raised by the first step, before a row of NaN was written
    with open_run(tmp_path / "r.h5") as run:
        assert run.n_steps == 0


def test_recorder_attached_between_backward_and_step_of_a_compiled_model(tmp_path) -> None:
    # Not refused: the gradients of the first row come from before the Recorder existed.
    with fresh_dynamo():
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        compiled = cast(nn.Module, torch.compile(model, backend="eager"))
        (x, y), *rest = batches(3)
        nn.functional.mse_loss(compiled(x), y).backward()
        with Recorder(model, opt, tmp_path / "r.h5"):
            torch._dynamo.reset()  # later forwards call the hooks
            opt.step()
            for x, y in rest:
                opt.zero_grad()
                nn.functional.mse_loss(compiled(x), y).backward()
                opt.step()
    with open_run(tmp_path / "r.h5") as run:
        assert run.n_steps == 3
        act = run.stat("activation", "mean")
        assert np.isnan(act[0]).all() and np.isfinite(act[1:]).all()


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.ln = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(torch.tanh(self.fc(x)))


class WithBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(6, 8)
        self.blk = Block()
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.blk(self.inp(x)))


def test_compiled_submodule_keeps_the_eager_layer_names(tmp_path) -> None:
    names = ["inp", "blk.fc", "blk.ln", "out"]
    with fresh_dynamo():
        model, twin = WithBlock(), WithBlock()
        model.blk = cast(Block, torch.compile(model.blk, backend="aot_eager"))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1)
        ref = Reference(twin, names)
        with Recorder(model, opt, tmp_path / "r.h5") as rec:
            for x, y in batches(3):
                for m, o in ((model, opt), (twin, twin_opt)):
                    o.zero_grad()
                    nn.functional.mse_loss(m(x), y).backward()
                ref.weights_and_grads()
                opt.step()
                twin_opt.step()
                ref.row()
            assert rec.layer_names == names
    with open_run(tmp_path / "r.h5") as run:
        assert run.layer_names == names
    ref.check(tmp_path / "r.h5")


def test_grad_scaler_output_gradients_are_those_of_the_unscaled_loss(tmp_path) -> None:
    # float32 without autocast: a power-of-two loss scale scales every gradient exactly,
    # so the run with a scaler has the twin's statistics. The scale doubles every step.
    model, twin = mlp(), mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    ref = Reference(twin, ["0", "2", "4"])
    with Recorder(model, opt, tmp_path / "r.h5", scaler=scaler):
        for x, y in batches(3):
            opt.zero_grad()
            twin_opt.zero_grad()
            scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
            nn.functional.mse_loss(twin(x), y).backward()
            ref.weights_and_grads()
            scaler.step(opt)
            scaler.update()
            twin_opt.step()
            ref.row()
    with open_run(tmp_path / "r.h5") as run:
        np.testing.assert_array_equal(run.scale, [2.0**10, 2.0**11, 2.0**12])
    ref.check(tmp_path / "r.h5")


def test_process_killed_before_the_first_flush_leaves_a_readable_file(tmp_path) -> None:
    path = tmp_path / "r.h5"
    script = f"""
import os, torch
from torch import nn
from gradflow import Recorder
model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
rec = Recorder(model, opt, {str(path)!r}, flush_every=1000, flush_seconds=1000)
for _ in range(3):
    opt.zero_grad(); model(torch.randn(2, 3)).sum().backward(); opt.step()
os._exit(0)
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    with open_run(path) as run:
        assert run.layer_names == ["0", "1"] and run.n_steps == 0


def test_resized_parameter_is_measured_at_its_new_size(tmp_path) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref = Reference(model, ["0", "2", "4"])
    path = tmp_path / "r.h5"
    with Recorder(model, opt, path):
        for step, (x, y) in enumerate(batches(4)):
            if step == 2:  # layer 2 shrinks to 12 -> 7 -> 12 units: new weights, new sizes
                with torch.no_grad():
                    model[2].weight.data = torch.randn(7, 12)
                    model[2].bias.data = torch.randn(7)
                    model[4].weight.data = torch.randn(3, 7)
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            ref.weights_and_grads()
            opt.step()
            ref.row()
    ref.check(path)


def test_new_param_group_and_replaced_submodule_are_recorded(tmp_path) -> None:
    model = mlp()
    model[4].requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref = Reference(model, ["0", "2"])
    path = tmp_path / "r.h5"
    with Recorder(model, opt, path) as rec:
        for step, (x, y) in enumerate(batches(4)):
            if step == 1:  # a replaced submodule in a new parameter group
                model[2] = nn.Linear(12, 12)
                opt.add_param_group({"params": model[2].parameters(), "lr": 0.05})
                ref.bind(model)
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            ref.weights_and_grads()
            opt.step()
            ref.row()
        assert rec.layer_names == ["0", "2", "4"]  # "4", frozen, is not measured
    ref.check(path)
    with open_run(path) as run:
        assert np.isnan(run.stat("param", "weight_norm")[:, 2]).all()


def test_changed_layer_set_is_refused(tmp_path) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ((x, y),) = batches(1)
    with pytest.raises(GradflowError, match="new: 5"), Recorder(model, opt, tmp_path / "r.h5"):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        model.append(nn.Linear(3, 3))
        opt.add_param_group({"params": model[5].parameters()})
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def test_layer_names_probe_string_and_bad_arguments(tmp_path) -> None:
    model = nn.Linear(3, 2)
    with Recorder(model, None, tmp_path / "r.h5", probes="param") as rec:
        assert rec.layer_names == ["(root)"] and rec.probes == ("param",)
        model(torch.randn(2, 3)).sum().backward()
    run = open_run(tmp_path / "r.h5")
    assert run.layer_names == ["(root)"] and list(run.probes()) == ["param"]
    bad: list[tuple[dict[str, Any], str]] = [
        ({"every": 0}, "every must be >= 1"),
        ({"every": "x"}, "every must be"),
        ({"flush_seconds": float("nan")}, "flush_seconds"),
        ({"flush_seconds": float("inf")}, "flush_seconds"),
        ({"flush_every": 0}, "flush_every"),
        ({"probes": 3}, "probes must be"),
        ({"probes": "params"}, "unknown probe 'params'"),
        ({"layers": 3}, "layers must be"),
        ({"write_rank": -1}, "write_rank"),
        ({"config": [1]}, "config must be a dict"),
        ({"scaler": object()}, "scaler must be"),
        ({"overwrite": "yes"}, "overwrite must be True or False"),
    ]
    for kwargs, message in bad:
        with pytest.raises(GradflowError, match=message):
            Recorder(model, None, tmp_path / "bad.h5", **kwargs)
    with pytest.raises(GradflowError, match="same optimizer"):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        Recorder(model, [opt, opt], tmp_path / "bad.h5")


class WithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(6, 3)
        self.unused = nn.Linear(6, 3)  # never called: its outputs are never measured

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


def test_info_health_lists_statistics_never_measured(tmp_path) -> None:
    from gradflow.plots.health import health

    ((x, y),) = batches(1)
    for name, layers in (("some.h5", None), ("all.h5", ["unused"])):
        model = WithUnused()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with Recorder(model, opt, tmp_path / name, layers=layers):
            for _ in range(2):
                opt.zero_grad()
                nn.functional.mse_loss(model(x), y).backward()
                opt.step()
    with open_run(tmp_path / "some.h5") as run:
        found = [(f.check, f.layer, f.value) for f in health(run)]
    assert sorted(found) == [
        ("never measured", "unused", "activation/*"),
        ("never measured", "unused", "grad_output/*"),
        ("never measured", "unused", "param/grad_*"),
    ]
    with open_run(tmp_path / "all.h5") as run:
        found = [(f.check, f.layer, f.value) for f in health(run)]
    assert ("never measured", "(all layers)", "activation/*") in found
    assert ("never measured", "(all layers)", "param/grad_*") in found
    assert all(f[2] != "param/update_*" for f in found)  # updates (zero) were measured


def test_resize_between_recorded_steps_gives_that_epoch_no_update(tmp_path) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "r.h5"
    data = batches(3)

    def step(i: int) -> None:
        opt.zero_grad()
        nn.functional.mse_loss(model(data[i][0]), data[i][1]).backward()
        opt.step()

    with Recorder(model, opt, path, every=100) as rec:
        step(0)
        model[2].weight.data = torch.randn(7, 12)  # layer 2 shrinks to 7 units
        model[2].bias.data = torch.randn(7)
        model[4].weight.data = torch.randn(3, 7)
        step(1)  # not recorded
        rec.epoch_end()
        before = [p.detach().double().clone() for p in model.parameters()]
        step(2)
        rec.epoch_end()
    after = [p.detach().double() for p in model.parameters()]
    want = [
        torch.cat(
            [(a - b).reshape(-1) for a, b in zip(after[i : i + 2], before[i : i + 2], strict=True)]
        ).norm()
        for i in (0, 2, 4)
    ]
    with open_run(path) as run:
        got = run.stat("epoch", "update_norm").astype(np.float64)
        assert np.isnan(got[0]).all()  # sizes changed within epoch 0: no update measured
        np.testing.assert_allclose(got[1], np.array(want), rtol=RTOL)


class Reversed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(torch.tanh(self.b(x)))  # b runs first


def test_closure_first_step_keeps_forward_order(tmp_path) -> None:
    model = Reversed()
    opt = torch.optim.LBFGS(model.parameters(), max_iter=2)
    ((x, y),) = batches(1)

    def closure() -> float:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss  # type: ignore[return-value]  # optimizers return it as given

    with Recorder(model, opt, tmp_path / "r.h5") as rec:
        opt.step(closure)
        assert rec.layer_names == ["b", "a"]
    with open_run(tmp_path / "r.h5") as run:
        assert run.layer_names == ["b", "a"] and np.isfinite(run.stat("param", "grad_norm")).all()


def test_info_health_sums_up_many_layers_never_measured(tmp_path) -> None:
    from gradflow.plots.health import health

    model = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=8, batch_first=True),
        num_layers=4,
        enable_nested_tensor=False,
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with Recorder(model, opt, tmp_path / "r.h5", probes="activation"):
        model(torch.randn(2, 3, 8)).square().mean().backward()
        opt.step()
    with open_run(tmp_path / "r.h5") as run:
        found = [f for f in health(run) if f.check == "never measured"]
    # nn.MultiheadAttention calls its out_proj functionally: no layer output to measure.
    assert [(f.layer, f.value) for f in found] == [("4 layers", "activation/*")]
    assert found[0].detail.startswith(
        "activation/nonfinite is NaN in every row: layers.0.self_attn.out_proj"
    )


def loop(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    path: Any,
    ref: Reference,
    data: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    micro: int = 1,
    set_to_none: bool = True,
    before: Callable[[int], None] = lambda step: None,
) -> None:
    """``micro`` backward passes (gradient accumulation) per ``step()``."""
    with Recorder(model, opt, path):
        for step, (x, y) in enumerate(data):
            before(step)
            opt.zero_grad(set_to_none=set_to_none)
            for xm, ym in zip(x.chunk(micro), y.chunk(micro), strict=True):
                (nn.functional.mse_loss(model(xm).float(), ym) / micro).backward()
            ref.weights_and_grads()
            opt.step()
            ref.row()
    ref.check(path)


def test_lazy_modules_attached_before_the_first_forward(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.LazyLinear(12), nn.Tanh(), nn.LazyLinear(3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ref = Reference(model, ["0", "2"])
    loop(model, opt, tmp_path / "r.h5", ref, batches(3))
    with open_run(tmp_path / "r.h5") as run:
        assert [lay.shape for lay in run.layers] == ["12x6+12", "3x12+3"]


def test_weight_norm_and_spectral_norm_parameters_belong_to_their_layer(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        parametrizations.weight_norm(nn.Linear(6, 12)),
        nn.Tanh(),
        parametrizations.spectral_norm(nn.Linear(12, 3)),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref = Reference(model, ["0", "2"])
    loop(model, opt, tmp_path / "r.h5", ref, batches(3))
    with open_run(tmp_path / "r.h5") as run:
        # No layer for the parametrization modules (their "output" is the weight).
        assert run.layer_names == ["0", "2"]
        assert [lay.n_params for lay in run.layers] == [12 + 72 + 12, 36 + 3]


def test_accumulation_and_zero_grad_to_zeros(tmp_path) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    g = torch.Generator().manual_seed(4)
    data = [(torch.randn(6, 6, generator=g), torch.randn(6, 3, generator=g)) for _ in range(3)]
    ref = Reference(model, ["0", "2", "4"])
    loop(model, opt, tmp_path / "r.h5", ref, data, micro=3, set_to_none=False)


def test_without_optimizer_each_backward_is_a_row_of_the_gradients_so_far(tmp_path) -> None:
    model = mlp()
    ref = Reference(model, ["0", "2", "4"])
    path = tmp_path / "r.h5"
    with Recorder(model, None, path):
        for x, y in batches(2):
            model.zero_grad()
            for xm, ym in ((x[:2], y[:2]), (x[2:], y[2:])):
                nn.functional.mse_loss(model(xm), ym).backward()
                ref.weights_and_grads()  # accumulated over this step's backward passes so far
                ref.row()
    ref.check(path, skip=NO_UPDATE)
    with open_run(path) as run:
        assert np.isnan(run.stat("param", "update_norm")).all()  # no step: never measured


class Branches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(6, 12)
        self.left = nn.Linear(12, 3)
        self.right = nn.Linear(12, 3)
        self.use_right = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.right if self.use_right else self.left)(torch.tanh(self.inp(x)))


def test_unused_branch_has_no_gradient(tmp_path) -> None:
    model = Branches()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref = Reference(model, ["inp", "left", "right"])

    def before(step: int) -> None:
        model.use_right = step == 1  # "left" gets no gradient in step 1, "right" in 0 and 2
        if step == 2:
            opt.add_param_group({"params": [nn.Parameter(torch.zeros(1))]})  # re-derives

    loop(model, opt, tmp_path / "r.h5", ref, batches(3), before=before)
    with open_run(tmp_path / "r.h5") as run:
        # Forward order; "right", not called before the layout was taken, goes last.
        assert run.layer_names == ["inp", "left", "right"]
        left, right = 1, 2
        for stat in ("grad_norm", "grad_nonfinite"):  # not measured: NaN, not 0
            grad = run.stat("param", stat)
            assert np.isnan([grad[0, right], grad[1, left], grad[2, right]]).all()
            assert np.isfinite([grad[0, left], grad[1, right], grad[2, left]]).all()
        # torch optimizers skip a parameter without a gradient (a measured update of 0);
        # an uncalled layer's activations are NaN (not measured), not 0.
        assert run.stat("param", "update_norm")[1, left] == 0
        assert np.isnan(run.stat("activation", "mean")[1, left])


class Gained(nn.Module):
    """A layer one of whose parameters (``gain``) is used only in some steps."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(6, 3)
        self.weight = nn.Parameter(torch.randn(3, 3))
        self.gain = nn.Parameter(torch.ones(3))
        self.use_gain = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc(x)) @ self.weight
        return h * self.gain if self.use_gain else h


def test_layer_with_some_parameters_without_gradient(tmp_path) -> None:
    # The gradient statistics of layer "0" (weight, gain) are those of the parameters
    # that have a gradient: the weight's alone in steps 0 and 2.
    layer = Gained()
    model = nn.Sequential(layer)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ref = Reference(model, ["0", "0.fc"])

    def before(step: int) -> None:
        layer.use_gain = step == 1

    loop(model, opt, tmp_path / "r.h5", ref, batches(3), before=before)
    with open_run(tmp_path / "r.h5") as run:
        assert np.isfinite(run.stat("param", "grad_norm")).all()


class SharedBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(6, 8)
        self.block = nn.Linear(8, 8)  # called twice per forward
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.block(torch.tanh(self.inp(x))))
        return self.out(torch.tanh(self.block(h)))


def test_module_called_twice_per_forward(tmp_path) -> None:
    model = SharedBlock()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ref = Reference(model, ["inp", "block", "out"])
    loop(model, opt, tmp_path / "r.h5", ref, batches(3))


@pytest.mark.parametrize("case", ["bf16", "channels-last", "autocast"])
def test_bf16_parameters_channels_last_and_autocast(case: str, tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.Tanh(), nn.Conv2d(4, 3, 3), nn.Flatten(), nn.Linear(12, 3)
    )
    g = torch.Generator().manual_seed(3)
    data = [
        (torch.randn(4, 2, 6, 6, generator=g), torch.randn(4, 3, generator=g)) for _ in range(3)
    ]
    if case == "bf16":
        model = model.to(torch.bfloat16)
        data = [(x.bfloat16(), y) for x, y in data]
    elif case == "channels-last":
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        assert not model[0].weight.is_contiguous()
        data = [(x.to(memory_format=torch.channels_last), y) for x, y in data]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref = Reference(model, ["0", "2", "4"])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        loop(model, opt, tmp_path / "r.h5", ref, data)


def test_channels_last_parameters_are_read_in_place_by_the_kernels(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # model.to(memory_format=torch.channels_last) makes conv weights (and their gradients)
    # dense but not contiguous; their statistics come from the C kernels reading them in
    # memory order, not from torch's copies into the snapshot (3x the step time on a
    # channels-last ResNet-18 before).
    from gradflow.kernels import cpu
    from gradflow.probes.snapshot import Snapshot

    if cpu.kernel() is None:
        pytest.skip("no C compiler here: the native kernels are unavailable")

    def refused(*args: Any) -> None:
        raise AssertionError("the parameters went through torch's copies")

    monkeypatch.setattr(Snapshot, "load", refused)
    monkeypatch.setattr(Snapshot, "_delta_stats", refused)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.Tanh(), nn.Conv2d(4, 3, (3, 2)), nn.Flatten(), nn.Linear(18, 3)
    ).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    assert not model[0].weight.is_contiguous() and not model[2].weight.is_contiguous()
    g = torch.Generator().manual_seed(3)
    data = [
        (torch.randn(4, 2, 6, 6, generator=g).to(memory_format=torch.channels_last),
         torch.randn(4, 3, generator=g))
        for _ in range(3)
    ]  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loop(model, opt, tmp_path / "r.h5", Reference(model, ["0", "2", "4"]), data)


def test_gradients_in_another_layout_than_their_channels_last_weights(tmp_path) -> None:
    # Read in the weights' memory order, such gradients cannot go through the kernels in
    # place: torch's copies take them, paired with the weights entry by entry all the same.
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.Tanh(), nn.Conv2d(4, 3, (3, 2)), nn.Flatten(), nn.Linear(18, 3)
    ).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    g = torch.Generator().manual_seed(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref = Reference(model, ["0", "2", "4"])
    path = tmp_path / "r.h5"
    with Recorder(model, opt, path):
        for _ in range(3):
            x, y = torch.randn(4, 2, 6, 6, generator=g), torch.randn(4, 3, generator=g)
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            for p in model.parameters():
                p.grad = p.grad.contiguous()  # type: ignore[union-attr]
            assert model[0].weight.grad.stride() != model[0].weight.stride()  # type: ignore[union-attr]
            ref.weights_and_grads()
            opt.step()
            ref.row()
    ref.check(path)


def test_parameters_changed_between_two_optimizers_steps_split_the_row(tmp_path) -> None:
    model = mlp()
    opt_a = torch.optim.SGD(list(model[0].parameters()) + list(model[4].parameters()), lr=0.1)
    opt_b = torch.optim.Adam(model[2].parameters(), lr=1e-2)
    ref = Reference(model, ["0", "2", "4"])
    path = tmp_path / "r.h5"
    with Recorder(model, [opt_a, opt_b], path) as rec:
        for step, (x, y) in enumerate(batches(3)):
            opt_a.zero_grad()
            opt_b.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            ref.weights_and_grads()
            opt_a.step()
            if step == 1:  # layer 2 shrinks to 7 units after opt_a stepped, before opt_b
                ref.row([True, False, True])
                with torch.no_grad():
                    model[2].weight.data = torch.randn(7, 12)
                    model[2].bias.data = torch.randn(7)
                    model[4].weight.data = torch.randn(3, 7)
                for p in (model[2].weight, model[2].bias, model[4].weight):
                    p.grad = None
                opt_b.state.clear()
                ref.weights_and_grads()
                opt_b.step()
                ref.row([False, True, False])
            else:
                opt_b.step()
                ref.row()
        assert rec.step == 4  # the changed step took two rows
    ref.check(path)


@pytest.mark.parametrize(
    "reentrant",
    [pytest.param(True, marks=pytest.mark.slow), False],  # reentrant: ~20 s compiling
    ids=["reentrant", "non-reentrant"],
)
def test_checkpointing_under_torch_compile(reentrant: bool, tmp_path) -> None:
    plain = Blocks(None)
    ref = Reference(plain, BLOCK_LAYERS)
    plain_steps(plain, [torch.optim.SGD(plain.parameters(), lr=0.1)], tmp_path / "plain.h5", ref)
    with fresh_dynamo():
        model = Blocks(reentrant)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with Recorder(model, opt, tmp_path / "c.h5"):
            compiled = cast(nn.Module, torch.compile(model, backend="aot_eager"))
            for x, y in batches(3):
                opt.zero_grad()
                nn.functional.mse_loss(compiled(x), y).backward()
                opt.step()
    ref.bind(model)
    ref.capturing = False
    ref.check(tmp_path / "c.h5")


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 6)
        self.head = nn.Linear(6, 10)
        self.head.weight = self.embed.weight  # tied: recorded with its first owner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(x)))


def test_tied_weight_is_recorded_once_with_its_first_owner(tmp_path) -> None:
    model = Tied()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randint(0, 10, (4, 3), generator=torch.Generator().manual_seed(5))
    with Recorder(model, opt, tmp_path / "r.h5", probes="param"):
        opt.zero_grad()
        model(x).square().mean().backward()
        # Both uses' gradients, summed by autograd into the one tensor.
        grads = [model.embed.weight.grad, model.head.bias.grad]
        want = [g.double().norm() for g in grads if g is not None]
        opt.step()
    with open_run(tmp_path / "r.h5") as run:
        assert run.layer_names == ["embed", "head"]
        assert [lay.n_params for lay in run.layers] == [60, 10]
        np.testing.assert_allclose(run.stat("param", "grad_norm")[0], want, rtol=RTOL)


@dataclass
class Output:
    mask: torch.Tensor
    hidden: torch.Tensor


class ReturnsDataclass(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> Output:
        return Output(mask=x > 0, hidden=self.proj(x))


def test_layer_output_in_a_dataclass_is_measured(tmp_path) -> None:
    torch.manual_seed(0)
    model = ReturnsDataclass()
    ((x, _),) = batches(1)
    with Recorder(model, None, tmp_path / "r.h5", probes="activation"):
        out = model(x)
        out.hidden.sum().backward()
    hidden = out.hidden.detach().double()
    with open_run(tmp_path / "r.h5") as run:  # the first floating-point field
        np.testing.assert_allclose(run.stat("activation", "mean")[0, 0], hidden.mean(), rtol=RTOL)


def test_float64_parameters_small_updates(tmp_path) -> None:
    model = mlp().double()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(10)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)  # updates ~1e-5 of the weights
    data = [(x.double(), y.double()) for x, y in batches(3)]
    ref = Reference(model, ["0", "2", "4"])
    path = tmp_path / "r.h5"
    with Recorder(model, opt, path):
        for x, y in data:
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            ref.weights_and_grads()
            opt.step()
            ref.row()
    ref.check(path, atol=0)  # a float32 copy of the weights is 3e-5 off here


class TwoOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(6, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.inp(x))
        return h.square().mean(), self.head(h)  # (an auxiliary loss, the prediction)


def test_without_optimizer_a_loss_on_any_output_makes_one_row(tmp_path) -> None:
    model = TwoOutputs()
    ref = Reference(model, ["inp", "head"])
    path = tmp_path / "r.h5"
    with Recorder(model, None, path):
        for step, (x, y) in enumerate(batches(3)):
            model.zero_grad()
            aux, pred = model(x)
            loss = nn.functional.mse_loss(pred, y)  # not through the first output
            (loss + aux if step == 1 else loss).backward()  # through both: still one row
            ref.weights_and_grads()
            ref.row()
    ref.check(path, skip=NO_UPDATE)


@pytest.mark.slow  # two torchrun processes and one more run: ~30 s
def test_ddp_with_closure_steps_equals_one_process(tmp_path) -> None:
    script = Path(__file__).parent / "scripts" / "ddp_closure.py"
    single, ddp = tmp_path / "single.h5", tmp_path / "ddp.h5"
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    for cmd in (
        [sys.executable, str(script), "single", str(single)],
        [*run, str(script), "ddp", str(ddp)],
    ):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]
    with open_run(single) as ref, open_run(ddp) as got:
        assert got.n_steps == ref.n_steps == 3 and got.attrs["world_size"] == 2
        for probe, names in ref.probes().items():
            # Each rank's loss is the mean over its half of the batch: twice the output
            # gradients of one process's mean over all of it (the all-reduce averages).
            scale = 2.0 if probe == "grad_output" else 1.0
            for stat in names:
                np.testing.assert_allclose(
                    got.stat(probe, stat),
                    scale * ref.stat(probe, stat),
                    rtol=1e-4 if stat == "std" else RTOL,
                    atol=1e-7,
                    err_msg=f"{probe}/{stat}",
                )


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(6, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x).view(x.shape[0], 1, 8).expand(-1, 2, -1)
        a, _ = self.attn(h, h, h)  # (output, attention weights)
        return self.out(a.mean(1))


def test_multihead_attention_with_its_functional_out_proj(tmp_path) -> None:
    model = Attention()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    # attn.out_proj is applied functionally: its parameters are measured, its output
    # never (NaN, as in the reference, whose hook on it never fires either).
    ref = Reference(model, ["inp", "attn", "attn.out_proj", "out"])
    loop(model, opt, tmp_path / "r.h5", ref, batches(3))
    with open_run(tmp_path / "r.h5") as run:
        assert run.layer_names == ["inp", "attn", "attn.out_proj", "out"]
        assert np.isnan(run.stat("activation", "mean")[:, 2]).all()


@pytest.mark.parametrize("kernels", ["native", "torch"])
def test_activation_std_of_a_layer_far_from_zero(
    tmp_path, monkeypatch: pytest.MonkeyPatch, kernels: str
) -> None:
    # A large bias over small weights: the outputs' mean is ~1e4 times their std. The std
    # must not cancel sum_sq / n - mean^2 in float32 (that left it 16 % off at ~1700).
    if kernels == "torch":
        monkeypatch.setattr("gradflow.kernels.cpu.kernel", lambda **options: None)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.Linear(256, 1))
    with torch.no_grad():
        model[0].weight.mul_(1e-3)
        model[0].bias.fill_(-10.0)
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)
    outputs: list[np.ndarray] = []
    model[0].register_forward_hook(lambda m, i, o: outputs.append(o.detach().double().numpy()))
    gen = torch.Generator().manual_seed(1)
    with Recorder(model, opt, tmp_path / "r.h5", every=1):
        for _ in range(2):
            opt.zero_grad()
            model(torch.randn(64, 64, generator=gen)).mean().backward()
            opt.step()
    want = np.array([o.std() for o in outputs])
    ratio = np.abs(np.array([o.mean() for o in outputs])) / want
    assert (ratio > 5e3).all()
    with open_run(tmp_path / "r.h5") as run:
        got = run.stat("activation", "std")[:, 0]
    # float64 columns round the variance by ~1e-16 (mean/std)^2: ~1e-8 here
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
