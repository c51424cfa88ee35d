"""Every recorded statistic against an independent reference (plain autograd + numpy).

The reference never uses gradflow code: weights and gradients are copied by hand around
``optimizer.step()``, layer outputs are captured by the test's own hooks with
``retain_grad()``, and the statistics are computed in float64 numpy.

Tolerances: statistics are float32 reductions of float32 tensors, so they must match the
float64 reference to rtol 1e-5 (norms, means of |ΔW|) and rtol 1e-4 for the activation
std, which is computed from sums of squares (atol 1e-6 for values near zero).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from torch import nn

import gradflow
from gradflow import GradflowError, Recorder, open_run
from gradflow.statistics import STATISTICS

RTOL = 1e-5
ATOL = 1e-7
# The accelerator code paths (device-side reductions, no host branches) run where CUDA is.
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    ),
]


# -- models --------------------------------------------------------------------------------------
def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    )


def cnn_bn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


def frozen() -> nn.Module:
    model = mlp()
    for p in model[0].parameters():
        p.requires_grad_(False)
    model[2].bias.requires_grad_(False)  # a partly frozen layer: only its weight counts
    return model


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.hidden = nn.Linear(6, 6)
        self.decode = nn.Linear(6, 10)
        self.decode.weight = self.embed.weight  # tied: counted once, for `embed`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(torch.tanh(self.hidden(self.embed(x))))


def transformer() -> nn.Module:
    return nn.TransformerEncoderLayer(
        d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True
    )


@dataclass
class Case:
    make: Callable[[], nn.Module]
    data: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    layers: list[str]  # expected layers, hand-written (independent of gradflow's discovery)


def _vec(g: torch.Generator, n_in: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(5, n_in, generator=g), torch.randn(5, 3, generator=g)


CASES = {
    "mlp": Case(mlp, _vec, nn.functional.mse_loss, ["0", "2", "4"]),
    "cnn_bn": Case(
        cnn_bn,
        lambda g: (torch.randn(4, 2, 6, 6, generator=g), torch.randn(4, 3, generator=g)),
        nn.functional.mse_loss,
        ["0", "1", "3", "4", "8"],
    ),
    "frozen": Case(frozen, _vec, nn.functional.mse_loss, ["2", "4"]),
    "tied": Case(
        Tied,
        lambda g: (
            torch.randint(0, 10, (4, 5), generator=g),
            torch.randint(0, 10, (4, 5), generator=g),
        ),
        lambda out, y: nn.functional.cross_entropy(out.reshape(-1, 10), y.reshape(-1)),
        ["embed", "hidden", "decode"],
    ),
    "transformer": Case(
        transformer,
        lambda g: (torch.randn(3, 4, 8, generator=g), torch.randn(3, 4, 8, generator=g)),
        nn.functional.mse_loss,
        ["self_attn", "self_attn.out_proj", "norm1", "linear1", "linear2", "norm2"],
    ),
}


# -- the independent reference --------------------------------------------------------
@dataclass
class Reference:
    """float64 per-step statistics for each expected layer, by (probe, stat)."""

    rows: list[dict[tuple[str, str], np.ndarray]] = field(default_factory=list)


def _trainable(module: nn.Module, name: str, model: nn.Module) -> list[nn.Parameter]:
    if isinstance(model, Tied) and name == "decode":
        return [module.bias]
    return [p for p in module.parameters(recurse=False) if p.requires_grad]


def _first(output: object) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple):
        return next((o for o in output if isinstance(o, torch.Tensor)), None)
    return None


def train_with_reference(
    case: Case,
    path,
    optimizer: Callable[[nn.Module], torch.optim.Optimizer] = lambda m: torch.optim.SGD(
        m.parameters(), lr=0.05
    ),
    steps: int = 3,
    accumulate: int = 1,
    device: str = "cpu",
    **recorder_kwargs,
) -> Reference:
    torch.manual_seed(0)
    model = case.make().to(device)
    opt = optimizer(model)
    modules = dict(model.named_modules())
    captured: dict[str, list[torch.Tensor]] = {}

    def capture(name: str):
        def hook(module, args, output):
            out = _first(output)
            if out is not None and module.training:
                out.retain_grad()
                captured.setdefault(name, []).append(out)

        return hook

    handles = [modules[n].register_forward_hook(capture(n)) for n in case.layers]
    ref = Reference()
    g = torch.Generator().manual_seed(1)
    with Recorder(model, opt, path, **recorder_kwargs) as rec:
        for _ in range(steps):
            opt.zero_grad()
            captured.clear()
            for _ in range(accumulate):
                x, y = (t.to(device) for t in case.data(g))
                loss = case.loss(model(x), y)
                loss.backward()
            params = {n: _trainable(modules[n], n, model) for n in case.layers}
            before = {n: [p.detach().double().clone() for p in ps] for n, ps in params.items()}
            grads = {
                n: [
                    p.grad.double().clone()
                    if p.grad is not None
                    else torch.zeros_like(p, dtype=torch.float64)
                    for p in ps
                ]
                for n, ps in params.items()
            }
            opt.step()
            rec.log(loss=loss)
            row: dict[tuple[str, str], np.ndarray] = {}
            stats: dict[str, list[float]] = {}
            for n in case.layers:
                w = torch.cat([t.reshape(-1) for t in before[n]])
                gr = torch.cat([t.reshape(-1) for t in grads[n]])
                d = torch.cat([p.detach().double().reshape(-1) for p in params[n]]) - w
                outs = captured.get(n, [])
                acts = torch.cat([o.detach().double().reshape(-1) for o in outs]) if outs else None
                gouts = [o.grad for o in outs if o.grad is not None]
                gout = torch.cat([t.double().reshape(-1) for t in gouts]) if gouts else None
                values = {
                    "weight_norm": w.norm().item(),
                    "grad_norm": gr.norm().item(),
                    "update_norm": d.norm().item(),
                    "update_ratio": (d.norm() / w.norm()).item(),
                    "update_abs_mean": d.abs().mean().item(),
                    "update_abs_max": d.abs().max().item(),
                    "grad_nonfinite": float((~torch.isfinite(gr)).sum()),
                    "act_mean": acts.mean().item() if acts is not None else np.nan,
                    "act_std": acts.std(unbiased=False).item() if acts is not None else np.nan,
                    "act_zero_fraction": (acts == 0).double().mean().item()
                    if acts is not None
                    else np.nan,
                    "act_nonfinite": float((~torch.isfinite(acts)).sum())
                    if acts is not None
                    else np.nan,
                    "gout_norm": gout.norm().item() if gout is not None else np.nan,
                    "gout_rms": gout.pow(2).mean().sqrt().item() if gout is not None else np.nan,
                }
                for k, v in values.items():
                    stats.setdefault(k, []).append(v)
            for k, v in stats.items():
                probe, stat = (
                    ("activation", k[4:])
                    if k.startswith("act_")
                    else ("grad_output", k[5:])
                    if k.startswith("gout_")
                    else ("param", k)
                )
                row[(probe, stat)] = np.array(v)
            ref.rows.append(row)
    for h in handles:
        h.remove()
    return ref


def assert_matches(path, case: Case, ref: Reference) -> None:
    run = open_run(path)
    # Every registered statistic of the recorded probes has a reference: a new statistic
    # without one fails here.
    registered = {
        (stat.probe, stat.name)
        for stat in map(STATISTICS.get, STATISTICS)
        if stat.probe in run.probes()
    }
    assert registered - set(ref.rows[0]) == set(), "statistics without a reference"
    assert sorted(run.layer_names) == sorted(case.layers)
    cols = [run.layer_names.index(n) for n in case.layers]
    assert run.n_steps == len(ref.rows)
    for (probe, stat), _ in ref.rows[0].items():
        got = run.stat(probe, stat)[:, cols].astype(np.float64)
        want = np.stack([r[(probe, stat)] for r in ref.rows])
        rtol = 1e-4 if stat == "std" else RTOL
        atol = 1e-6 if probe == "activation" else ATOL
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=f"{probe}/{stat}")
    run.close()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CASES))
def test_statistics_match_reference(name: str, device: str, tmp_path) -> None:
    case = CASES[name]
    ref = train_with_reference(case, tmp_path / "run.h5", device=device)
    assert_matches(tmp_path / "run.h5", case, ref)


def test_a_statistic_without_reference_fails_the_reference_check(tmp_path, monkeypatch) -> None:
    from gradflow.statistics import Statistic

    extra = Statistic(
        "param", "grad_sum_sq", "a statistic the reference lacks", lambda r: r["g_sq"]
    )
    monkeypatch.setitem(STATISTICS._items, extra.key, extra)
    ref = train_with_reference(CASES["mlp"], tmp_path / "r.h5", steps=1)
    with pytest.raises(AssertionError, match="without a reference"):
        assert_matches(tmp_path / "r.h5", CASES["mlp"], ref)


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda m: torch.optim.Adam(m.parameters(), lr=1e-2),
        lambda m: torch.optim.RMSprop(
            m.parameters(), lr=1e-3, alpha=0.9, eps=1e-8, weight_decay=1e-4
        ),
        lambda m: torch.optim.SGD(
            [
                {"params": m[0].parameters(), "lr": 0.1},
                {
                    "params": list(m[2].parameters()) + list(m[4].parameters()),
                    "lr": 0.01,
                    "momentum": 0.9,
                },
            ]
        ),
    ],
    ids=["adam", "rmsprop", "sgd-param-groups"],
)
def test_any_optimizer_and_param_groups(make_opt, tmp_path) -> None:
    ref = train_with_reference(CASES["mlp"], tmp_path / "r.h5", optimizer=make_opt)
    assert_matches(tmp_path / "r.h5", CASES["mlp"], ref)


class SignSGD(torch.optim.Optimizer):
    """A custom optimizer: p -= lr * sign(grad)."""

    def __init__(self, params, lr: float = 1e-2) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["lr"])


def test_custom_optimizer(tmp_path) -> None:
    ref = train_with_reference(
        CASES["cnn_bn"], tmp_path / "r.h5", optimizer=lambda m: SignSGD(m.parameters())
    )
    assert_matches(tmp_path / "r.h5", CASES["cnn_bn"], ref)
    run = open_run(tmp_path / "r.h5")
    # sign updates: every |ΔW| entry of a weight with non-zero gradient is exactly lr
    np.testing.assert_allclose(run.stat("param", "update_abs_max"), 1e-2, rtol=1e-5)


def test_gradient_accumulation_is_one_row_per_step(tmp_path) -> None:
    ref = train_with_reference(CASES["cnn_bn"], tmp_path / "r.h5", steps=2, accumulate=3)
    assert_matches(tmp_path / "r.h5", CASES["cnn_bn"], ref)
    assert list(open_run(tmp_path / "r.h5").steps) == [0, 1]


def test_schedule_records_only_chosen_steps(tmp_path) -> None:
    ref = train_with_reference(CASES["mlp"], tmp_path / "r.h5", steps=7, every=3)
    run = open_run(tmp_path / "r.h5")
    assert list(run.steps) == [0, 3, 6]
    want = np.stack([ref.rows[i][("param", "grad_norm")] for i in (0, 3, 6)])
    np.testing.assert_allclose(run.stat("param", "grad_norm"), want, rtol=RTOL)
    run2 = tmp_path / "r2.h5"
    train_with_reference(CASES["mlp"], run2, steps=6, every=lambda s: s in (1, 4))
    assert list(open_run(run2).steps) == [1, 4]


def test_losses_and_epochs(tmp_path) -> None:
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 6), torch.randn(8, 3)
    losses, start = [], [p.detach().clone() for p in model.parameters()]
    epoch_updates = []
    with Recorder(model, opt, tmp_path / "r.h5") as rec:
        for epoch in range(2):
            for _ in range(3):
                opt.zero_grad()
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward()
                opt.step()
                rec.log(loss=loss, lr=0.1)
                losses.append(loss.item())
            rec.epoch_end(val_loss=torch.tensor(0.25 + epoch), note=float(epoch))
            end = [p.detach().clone() for p in model.parameters()]
            epoch_updates.append([(e - s).double() for e, s in zip(end, start, strict=True)])
            start = end
    run = open_run(tmp_path / "r.h5")
    np.testing.assert_allclose(run.loss, losses, rtol=1e-6)
    np.testing.assert_allclose(run.scalars["lr"], 0.1)
    assert list(run.epochs) == [0, 1]
    assert list(run.epoch_end_step) == [3, 6]
    assert list(run.epoch) == [0, 0, 0, 1, 1, 1]
    np.testing.assert_allclose(run.metrics["val_loss"], [0.25, 1.25])
    np.testing.assert_allclose(run.metrics["note"], [0.0, 1.0])
    mean_abs = np.array(
        [
            [torch.cat([d[2 * i].reshape(-1), d[2 * i + 1]]).abs().mean().item() for i in range(3)]
            for d in epoch_updates
        ]
    )
    np.testing.assert_allclose(run.stat("epoch", "update_abs_mean"), mean_abs, rtol=RTOL)
    df = run.to_dataframe()
    assert set(df.columns) == {"step", "layer", "probe", "stat", "value"}
    sel = df[(df.probe == "param") & (df.stat == "grad_norm") & (df.step == 4) & (df.layer == "2")]
    assert sel.value.item() == pytest.approx(run.stat("param", "grad_norm")[4, 1])


@pytest.mark.parametrize("device", DEVICES)
def test_amp_grad_scaler_unscaled_and_skipped_steps(device: str, tmp_path) -> None:
    torch.manual_seed(0)
    model = mlp().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler(device, init_scale=1024.0)
    x, y = torch.randn(8, 6, device=device), torch.randn(8, 3, device=device)
    half = torch.float16 if device == "cuda" else torch.bfloat16
    ref_grad_norms, scales, skipped = [], [], []
    with Recorder(model, opt, tmp_path / "r.h5", scaler=scaler) as rec:
        for step in range(4):
            opt.zero_grad()
            with torch.autocast(device, dtype=half):  # layer outputs in half precision
                out = model(x)
            loss = nn.functional.mse_loss(out.float(), y)
            scaler.scale(loss).backward()
            if step == 2:  # an overflow: the scaler must skip this step
                model[2].weight.grad[0, 0] = float("inf")
            scale = scaler.get_scale()
            before = [p.detach().clone() for p in model.parameters()]
            ref_grad_norms.append(
                [
                    torch.cat([p.grad.reshape(-1) for p in m.parameters()]).double().norm().item()
                    / scale
                    for m in (model[0], model[2], model[4])
                ]
            )
            scaler.step(opt)
            scaler.update()
            moved = any(
                (p.detach() != b).any() for p, b in zip(model.parameters(), before, strict=True)
            )
            skipped.append(not moved)
            scales.append(scale)
            rec.log(loss=loss)
    assert skipped == [False, False, True, False]
    run = open_run(tmp_path / "r.h5")
    assert list(run.steps) == [0, 1, 2, 3]
    assert list(run.skipped) == skipped
    np.testing.assert_allclose(run.scale, scales)
    finite = [0, 1, 3]
    np.testing.assert_allclose(
        run.stat("param", "grad_norm")[finite], np.array(ref_grad_norms)[finite], rtol=RTOL
    )
    assert run.stat("param", "grad_nonfinite")[2, 1] == 1
    assert np.all(run.stat("param", "update_norm")[2] == 0)
    event = run.first_nonfinite
    assert event is not None and (event.step, event.layer, event.probe) == (2, "2", "param")


@pytest.mark.parametrize("device", DEVICES)
def test_nonfinite_values_recorded_and_located(device: str, tmp_path) -> None:
    torch.manual_seed(0)
    model = mlp().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 6, device=device), torch.randn(8, 3, device=device)
    with Recorder(model, opt, tmp_path / "r.h5") as rec:
        for step in range(4):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            if step == 1:
                model[2].weight.grad[3, 1] = float("nan")
            opt.step()
            rec.log(loss=loss)
    run = open_run(tmp_path / "r.h5")
    assert run.stat("param", "grad_nonfinite")[1].tolist() == [0, 1, 0]
    assert np.isnan(run.stat("param", "grad_norm")[1, 1])
    assert np.isnan(run.stat("param", "weight_norm")[2, 1])  # the NaN reached the weights
    assert run.stat("activation", "nonfinite")[2, 1] > 0
    event = run.first_nonfinite
    assert event is not None
    assert (event.step, event.layer, event.probe) == (1, "2", "param")


def test_optimizer_none_records_each_backward(tmp_path) -> None:
    torch.manual_seed(0)
    model = mlp()
    x, y = torch.randn(8, 6), torch.randn(8, 3)
    norms = []
    with Recorder(model, None, tmp_path / "r.h5") as rec:
        for _ in range(3):
            model.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            rec.log(loss=loss)
            norms.append(
                [
                    torch.cat([p.grad.reshape(-1) for p in model[i].parameters()]).norm().item()
                    for i in (0, 2, 4)
                ]
            )
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
    run = open_run(tmp_path / "r.h5")
    assert list(run.steps) == [0, 1, 2]
    np.testing.assert_allclose(run.stat("param", "grad_norm"), norms, rtol=RTOL)
    assert np.isnan(run.stat("param", "update_norm")).all()
    assert np.isfinite(run.loss).all()


class Branchy(nn.Module):
    """``head`` runs on even steps only, ``body`` twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(4, 4), nn.Linear(4, 4)
        self.use_head = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(torch.tanh(self.body(x)))
        return self.head(x) if self.use_head else x


def test_steps_with_different_calls_and_batch_sizes_in_one_commit(tmp_path) -> None:
    # Rows are turned into statistics together at commit time; here every commit mixes
    # steps where a layer is or is not called, and batch sizes vary from step to step.
    torch.manual_seed(0)
    model = Branchy()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    outputs: dict[str, list[torch.Tensor]] = {"body": [], "head": []}

    def keep(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: object, out: torch.Tensor) -> None:
            out.retain_grad()
            outputs[name].append(out)

        return hook

    model.body.register_forward_hook(keep("body"))
    model.head.register_forward_hook(keep("head"))
    expected = {("activation", "mean"): [], ("grad_output", "rms"): []}
    with Recorder(model, opt, tmp_path / "r.h5", flush_every=1000):
        for step in range(6):
            model.use_head = step % 2 == 0
            outputs = {"body": [], "head": []}
            opt.zero_grad()
            model(torch.randn(2 + step, 4)).square().mean().backward()
            opt.step()
            row_mean, row_rms = [], []
            for name in ("body", "head"):
                outs = outputs[name]
                if not outs:
                    row_mean.append(np.nan), row_rms.append(np.nan)
                    continue
                vals = np.concatenate([o.detach().double().numpy().ravel() for o in outs])
                grads = np.concatenate([o.grad.double().numpy().ravel() for o in outs])
                row_mean.append(vals.mean())
                row_rms.append(np.sqrt((grads**2).mean()))
            expected[("activation", "mean")].append(row_mean)
            expected[("grad_output", "rms")].append(row_rms)
    run = open_run(tmp_path / "r.h5")
    assert [lay.name for lay in run.layers] == ["body", "head"]
    for (probe, stat), values in expected.items():
        np.testing.assert_allclose(run.stat(probe, stat), values, rtol=1e-5, atol=1e-7)
    assert np.isnan(run.stat("activation", "mean")[1::2, 1]).all()


def test_layer_depth_is_forward_order(tmp_path) -> None:
    ref_case = CASES["transformer"]
    train_with_reference(ref_case, tmp_path / "r.h5", steps=1)
    run = open_run(tmp_path / "r.h5")
    assert run.layer_names == ref_case.layers  # forward order, not registration order
    assert [lay.depth for lay in run.layers] == list(range(len(ref_case.layers)))
    kinds = {lay.name: lay.kind for lay in run.layers}
    assert (
        kinds["self_attn"] == "attention"
        and kinds["norm1"] == "ln"
        and kinds["linear1"] == "linear"
    )
    # out_proj is used functionally by MultiheadAttention: no activation, NaN not zero
    assert np.isnan(run.stat("activation", "mean")[0, 1])


def _hook_count(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    n = len(opt._optimizer_step_pre_hooks) + len(opt._optimizer_step_post_hooks)
    for m in model.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
    return n


def test_hooks_removed_also_when_the_body_raises(tmp_path) -> None:
    model = cnn_bn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert _hook_count(model, opt) == 0
    with pytest.raises(RuntimeError, match="boom"), Recorder(model, opt, tmp_path / "r.h5") as rec:
        assert _hook_count(model, opt) > 0
        opt.zero_grad()
        model(torch.randn(2, 2, 6, 6)).sum().backward()
        opt.step()
        rec.log(loss=1.0)
        raise RuntimeError("boom")
    assert _hook_count(model, opt) == 0
    assert open_run(tmp_path / "r.h5").n_steps == 1  # what was recorded is kept


def test_second_recorder_refused_and_mode_untouched(tmp_path) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.eval()
    rec = Recorder(model, opt, tmp_path / "a.h5")
    with pytest.raises(GradflowError, match="already has an open Recorder"):
        Recorder(model, opt, tmp_path / "b.h5")
    assert not model.training
    rec.close()
    assert not model.training
    with Recorder(model, opt, tmp_path / "b.h5"):  # allowed once the first is closed
        pass


def test_eval_forwards_not_recorded(tmp_path) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 6), torch.randn(8, 3)
    with Recorder(model, opt, tmp_path / "r.h5"):
        opt.zero_grad()
        out = model(x)
        nn.functional.mse_loss(out, y).backward()
        model.eval()
        with torch.no_grad():
            model(100 * x)  # must not change the activation statistics
        model.train()
        opt.step()
    run = open_run(tmp_path / "r.h5")
    want = out.detach().double()
    assert run.stat("activation", "mean")[0, 2] == pytest.approx(want.mean().item(), abs=1e-6)


def test_bad_recorder_arguments(tmp_path) -> None:
    model = mlp()
    (tmp_path / "exists.h5").write_bytes(b"x")
    with pytest.raises(GradflowError, match="file exists"):
        Recorder(model, None, tmp_path / "exists.h5")
    with pytest.raises(GradflowError, match="does not exist"):
        Recorder(model, None, tmp_path / "nodir" / "r.h5")
    with pytest.raises(GradflowError, match="unknown probe 'activations'"):
        Recorder(model, None, tmp_path / "r.h5", probes=["activations"])
    with pytest.raises(GradflowError, match="matches no layer"):
        Recorder(model, None, tmp_path / "r.h5", layers=["encoder"])
    frozen_model = mlp().requires_grad_(False)
    with pytest.raises(GradflowError, match="no module owning trainable"):
        Recorder(frozen_model, None, tmp_path / "r.h5")
    assert _hook_count(model, torch.optim.SGD(model.parameters(), lr=1)) == 0


def test_layer_selection_by_prefix_and_predicate(tmp_path) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Recorder(model, opt, tmp_path / "a.h5", layers=["2", "4"]):
        pass
    assert open_run(tmp_path / "a.h5").layer_names == ["2", "4"]
    with Recorder(model, opt, tmp_path / "b.h5", layers=lambda name, m: m.out_features == 16):
        pass
    assert open_run(tmp_path / "b.h5").layer_names == ["0", "2"]


def test_public_api_exports() -> None:
    assert callable(gradflow.open_run) and gradflow.Recorder is Recorder


def test_flush_commits_rows_for_a_concurrent_reader(tmp_path) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Recorder(model, opt, tmp_path / "r.h5", flush_every=1000, flush_seconds=3600) as rec:
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(4, 6)).sum().backward()
            opt.step()
        rec.epoch_end()
        rec.flush()
        with open_run(tmp_path / "r.h5") as run:  # a reader sees the rows before close()
            assert run.n_steps == 3 and run.n_epochs == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_replays_equal_eager_reductions() -> None:
    # Each phase runs eagerly once, then replays a captured graph; a parameter whose
    # storage moves (p.data = ...) makes a new capture.
    from gradflow.probes import Snapshot

    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(s, device="cuda")) for s in (300, 7, 0, 1000)]
    graphed = Snapshot(params, torch.device("cuda"), graphs=True)
    eager = Snapshot(params, torch.device("cuda"), graphs=False)
    for step in range(4):
        grads = [torch.randn_like(p) if i != 1 or step % 2 else None for i, p in enumerate(params)]
        grads[0][3] = float("nan") if step == 2 else grads[0][3]
        results = []
        for snap in (graphed, eager):
            g_sq, bad = snap.grad_reductions(grads)
            w_sq = snap.take()
            results.append([t.clone() for t in (g_sq, bad, w_sq)])
        with torch.no_grad():
            for p in params:
                p.mul_(0.9).add_(0.01)
        if step == 1:
            params[3].data = params[3].data.clone()
        for snap, res in zip((graphed, eager), results, strict=True):
            res += [t.clone() for t in snap.delta()]
        for a, b in zip(*results, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=0, equal_nan=True)
    assert all(phase.graph is not None for phase in graphed._phases.values())


def test_device_path_nonfinite_counts_match_numpy(monkeypatch) -> None:
    # The counting path used on accelerators (no host branch), checked here on the CPU.
    from gradflow.probes import Snapshot

    monkeypatch.setattr("gradflow.probes.param_kernels", lambda sizes: None)
    params = [
        nn.Parameter(torch.randn(3, 4)),
        nn.Parameter(torch.randn(5)),
        nn.Parameter(torch.randn(2, 2)),
        nn.Parameter(torch.randn(600)),
    ]
    grads = [torch.randn(3, 4), None, torch.randn(2, 2), torch.randn(600)]
    grads[0][0, 1] = float("nan")
    grads[0][2, 3] = float("inf")
    grads[2][1, 1] = -float("inf")
    snap = Snapshot(params, torch.device("cpu"))
    g_sq, counts = (t.numpy() for t in snap.grad_reductions(grads))
    want = [0 if g is None else int((~np.isfinite(g.numpy())).sum()) for g in grads]
    assert counts.tolist() == want == [2, 0, 1, 0]
    assert np.isnan(g_sq[0]) and g_sq[1] == 0 and np.isinf(g_sq[2])
    np.testing.assert_allclose(g_sq[3], float((grads[3].double() ** 2).sum()), rtol=1e-6)
    w_sq = snap.take()  # the buffer holds the weights again
    np.testing.assert_allclose(
        w_sq.numpy(), [float((p.detach() ** 2).sum()) for p in params], rtol=1e-6
    )


@pytest.mark.parametrize(
    ("native", "threads"), [(True, 1), (True, 3), (False, 1)], ids=["native", "native-3", "torch"]
)
def test_snapshot_reductions_of_large_and_empty_tensors_match_float64(
    native: bool, threads: int, monkeypatch
) -> None:
    # Tensors of millions of entries (where a single float32 pass drifts by ~1e-3), sizes
    # that are not multiples of the row length, and an empty tensor; through the C kernels
    # (on one thread, and split over three) and through torch operations (the path of
    # other devices and dtypes).
    from gradflow.native import param_kernels
    from gradflow.probes import Snapshot

    if native and param_kernels([1]) is None:
        pytest.skip("no C compiler here: the native kernels are unavailable")
    if not native:
        monkeypatch.setattr("gradflow.probes.param_kernels", lambda sizes: None)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)

    gen = torch.Generator().manual_seed(3)
    shapes = [(3_000_001,), (0,), (257,), (1_500_000,), (64, 3, 3, 3), (1,), (700_000,)]
    params = [nn.Parameter(torch.randn(s, generator=gen) + 0.5) for s in shapes]
    snap = Snapshot(params, torch.device("cpu"))
    w64 = [p.detach().double().numpy().ravel() for p in params]
    np.testing.assert_allclose(snap.take().numpy(), [float((w**2).sum()) for w in w64], rtol=1e-6)
    with torch.no_grad():
        for p in params:
            p.mul_(0.9).add_(0.01)
    d64 = [
        np.abs(w - p.detach().double().numpy().ravel()) for w, p in zip(w64, params, strict=True)
    ]
    d_sq, d_abs, d_max = (t.numpy() for t in snap.delta())
    # The snapshot is float32, so |d| carries float32 rounding of W: compare at 1e-5.
    np.testing.assert_allclose(d_sq, [float((d**2).sum()) for d in d64], rtol=1e-5)
    np.testing.assert_allclose(d_abs, [float(d.sum()) for d in d64], rtol=1e-5)
    np.testing.assert_allclose(d_max, [float(d.max(initial=0)) for d in d64], rtol=1e-5)
    assert d_sq[1] == d_abs[1] == d_max[1] == 0.0


def test_param_kernels_copy_into_any_alignment_and_take_infinite_maxima() -> None:
    # The copy streams into 32-byte-aligned targets and copies the rest plainly: targets at
    # every offset modulo 8 floats get exact copies. The maximum of |d| is taken on the
    # bits of |d|: an infinite update is the maximum, a NaN makes it NaN, -0 counts as 0.
    from gradflow.native import param_kernels

    sizes = [4099, 8, 1, 13, 5000, 3, 31, 64]
    kernels = param_kernels(sizes)
    if kernels is None:
        pytest.skip("no C compiler here: the native kernels are unavailable")
    gen = torch.Generator().manual_seed(5)
    sources = [torch.randn(n, generator=gen) for n in sizes]
    sources[2][0] = -0.0  # with after = +0.0: d = -0.0, whose bits would be the largest
    flat = torch.zeros(sum(sizes) + 64)
    targets, offset = [], 0
    for k, n in enumerate(sizes):
        offset += k  # shifts the start by 0..7 floats against the allocation
        targets.append(flat[offset : offset + n])
        offset += n
    w_sq = kernels.copy_squares(sources, targets).numpy()
    for s, t in zip(sources, targets, strict=True):
        assert torch.equal(s, t)
    np.testing.assert_allclose(w_sq, [float((s.double() ** 2).sum()) for s in sources], rtol=1e-6)

    after = [s.clone() for s in sources]
    after[0][17] = float("inf")
    after[1][3] = float("nan")
    after[2][0] = 0.0
    after[3] = -after[3]
    d_sq, d_abs, d_max = (t.numpy() for t in kernels.delta(targets, after))
    d64 = [(t.double() - a.double()).abs().numpy() for t, a in zip(targets, after, strict=True)]
    assert d_max[0] == np.inf and np.isnan(d_max[1]) and d_max[2] == 0.0
    np.testing.assert_allclose(d_max[3:], [float(d.max()) for d in d64[3:]], rtol=1e-7)
    np.testing.assert_allclose(d_abs[2:], [float(d.sum()) for d in d64[2:]], rtol=1e-6)
    np.testing.assert_allclose(d_sq[2:], [float((d**2).sum()) for d in d64[2:]], rtol=1e-6)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize(
    "make",
    [
        lambda g: torch.relu(torch.randn(2, 8, 512, 512, generator=g)),  # 4M entries, half 0
        lambda g: (torch.randn(4, 64, 32, generator=g) * 30).half(),  # sum of squares > 65504
        lambda g: torch.randn(16, 12, 10, generator=g).transpose(0, 2),  # not contiguous
        lambda g: torch.randn(3, 70_000, generator=g) + 3.0,  # rows longer than 2**16
        lambda g: torch.tensor([1.0, float("nan"), 0.0, float("inf"), -float("inf")]),
    ],
    ids=["large-relu", "fp16", "transposed", "long-rows", "nonfinite"],
)
@pytest.mark.parametrize(
    "path",
    [
        "native",
        "torch",
        "device",
        pytest.param("cuda", marks=needs_cuda),
        pytest.param("cuda-torch", marks=needs_cuda),
    ],
)
def test_activation_reductions_match_float64(make, path: str, monkeypatch) -> None:
    # "native": the one-pass C kernel; "torch": the CPU fallback of torch operations;
    # "device": the torch path used on accelerators (float64 reductions written in place,
    # no host branch), run on the CPU; "cuda": the accelerator path where it belongs (the fused
    # kernel where GRADFLOW_TRITON=1), "cuda-torch" its torch operations. Every backend,
    # Triton's kernel in its interpreter included: tests/test_kernels.py.
    from gradflow.native import kernel
    from gradflow.probes import ActivationProbe, CallLog, HostReducer

    if path == "native" and kernel() is None:
        pytest.skip("no C compiler here: the native kernel is unavailable")
    if path == "cuda-torch":
        monkeypatch.setattr("gradflow.probes.reducer", lambda device: None)
    x = make(torch.Generator().manual_seed(5))
    probe = ActivationProbe(HostReducer(native=path == "native"))
    log = CallLog()
    if path == "device":
        probe.device(x, log)
    else:
        probe(x.to("cuda") if path.startswith("cuda") else x, log, 0)
    total, sum_sq, nonzero, nonfinite = log.tensors()[0].tolist()
    a = x.double().numpy().ravel()
    finite = np.isfinite(a)
    assert nonzero == np.count_nonzero(a != 0)
    assert nonfinite == np.count_nonzero(~finite)
    if finite.all():
        np.testing.assert_allclose(total, a.sum(), rtol=1e-5, atol=1e-6 * np.abs(a).sum())
        np.testing.assert_allclose(sum_sq, (a * a).sum(), rtol=1e-6)
    else:
        assert not np.isfinite(total) and not np.isfinite(sum_sq)


def test_fused_kernel_is_used_only_where_it_agrees_with_torch(monkeypatch) -> None:
    # The first-use check that decides between the fused kernel and torch operations, fed
    # with stand-in kernels: one exact, one off by a little in the sum, one that counts
    # NaN but not Inf. Never on the CPU, nor with GRADFLOW_TRITON=0.
    from gradflow import fused

    def sums(x: torch.Tensor, nan_only: bool = False) -> torch.Tensor:
        a = x.double()
        bad = a.isnan() if nan_only else ~a.isfinite()
        return torch.stack([a.sum(), (a * a).sum(), (a != 0).sum(), bad.sum()]).double()

    def kernel_like(compute: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., None]:
        def run(x: torch.Tensor, rows: torch.Tensor, index: int) -> None:
            rows[index] += compute(x)

        return run

    cpu = torch.device("cpu")
    off = torch.tensor([1.001, 1.0, 1.0, 1.0], dtype=torch.float64)
    assert fused._agrees(kernel_like(sums), cpu)
    assert not fused._agrees(kernel_like(lambda x: sums(x) * off), cpu)
    assert not fused._agrees(kernel_like(lambda x: sums(x, nan_only=True)), cpu)
    assert fused.reducer(cpu) is None
    monkeypatch.setenv("GRADFLOW_TRITON", "0")
    fused.reducer.cache_clear()
    assert fused.reducer(torch.device("cuda", 0)) is None
    fused.reducer.cache_clear()


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
def test_host_rows_grow_past_their_capacity_and_keep_every_call(native: bool) -> None:
    # 150 calls per step (rows start at 64 and are reallocated twice); output gradients
    # take the sum-of-squares-only path, activations the full one.
    from gradflow.native import kernel
    from gradflow.probes import ActivationProbe, CallLog, HostReducer, grad_output_hook

    if native and kernel() is None:
        pytest.skip("no C compiler here: the native kernel is unavailable")
    host = HostReducer(native=native)
    probe, log = ActivationProbe(host), CallLog()
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(1 + 37 * i, generator=gen) for i in range(150)]
    hooks = [grad_output_hook(lambda: log, i, host) for i in range(150)]
    for i, x in enumerate(xs):
        probe(x, log, i)
        hooks[i](2 * x)
    act, gout = (t.numpy() for t in log.tensors())
    act = act.reshape(-1, 4)
    a = [x.double().numpy() for x in xs]
    np.testing.assert_allclose(act[:, 0], [v.sum() for v in a], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(act[:, 1], [(v * v).sum() for v in a], rtol=1e-6)
    np.testing.assert_array_equal(act[:, 2], [np.count_nonzero(v) for v in a])
    np.testing.assert_array_equal(act[:, 3], 0)  # all entries finite
    np.testing.assert_allclose(gout, [(4 * v * v).sum() for v in a], rtol=1e-6)
    assert log.act_ids == log.gout_ids == list(range(150))
    assert log.gout_n == [x.numel() for x in xs]


def test_recorded_statistics_agree_with_and_without_the_native_kernel(
    tmp_path, monkeypatch
) -> None:
    from gradflow.native import kernel

    if kernel() is None:
        pytest.skip("no C compiler here: the native kernel is unavailable")
    runs = []
    for native in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 1, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        path = tmp_path / f"native{native}.h5"
        if not native:
            monkeypatch.setattr("gradflow.probes.kernel", lambda squares_only=False: None)
            monkeypatch.setattr("gradflow.probes.param_kernels", lambda sizes: None)
        with Recorder(model, opt, path) as rec:
            for _ in range(2):
                opt.zero_grad()
                model(torch.randn(2, 1, 12, 12)).square().mean().backward()
                opt.step()
            rec.epoch_end()
        runs.append(open_run(path))
    stats = [("activation", s) for s in ("mean", "std", "zero_fraction")]
    stats += [("grad_output", "norm"), ("epoch", "update_abs_mean")]
    stats += [("param", s) for s in ("grad_norm", "weight_norm", "update_norm", "update_abs_max")]
    for probe, stat in stats:
        np.testing.assert_allclose(
            runs[0].stat(probe, stat), runs[1].stat(probe, stat), rtol=1e-5, atol=1e-6, err_msg=stat
        )
