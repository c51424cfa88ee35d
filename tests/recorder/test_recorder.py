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


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """cos(a, b) in float64; NaN where either is 0."""
    norms = a.norm() * b.norm()
    return (a @ b / norms).item() if norms > 0 else np.nan


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
                    "grad_update_cos": _cosine(gr, d),
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
    # Layers frozen throughout (in the layer set, never measured) are NaN.
    assert set(case.layers) <= set(run.layer_names)
    frozen = [i for i, n in enumerate(run.layer_names) if n not in case.layers]
    if frozen and "param" in run.probes():
        assert np.isnan(run.stat("param", "weight_norm")[:, frozen]).all()
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


@pytest.mark.parametrize(
    ("make_opt", "momentum"),
    [
        (lambda m: torch.optim.SGD(m.parameters(), lr=0.05), False),
        (lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9), True),
        (lambda m: torch.optim.Adam(m.parameters(), lr=1e-2), True),
    ],
    ids=["sgd", "sgd-momentum", "adam"],
)
def test_grad_update_cos_by_optimizer(make_opt, momentum: bool, tmp_path) -> None:
    # Plain SGD steps against the gradient: -1. Momentum and Adam step along their history
    # (and Adam per entry), so after the first step the cosine is above -1.
    path = tmp_path / "r.h5"
    ref = train_with_reference(CASES["cnn_bn"], path, optimizer=make_opt, steps=4)
    assert_matches(path, CASES["cnn_bn"], ref)
    with open_run(path) as run:
        cos = run.stat("param", "grad_update_cos").astype(np.float64)
    assert np.isfinite(cos).all()
    if momentum:
        assert (cos[1:] > -1 + 1e-3).all()
    else:
        np.testing.assert_allclose(cos, -1.0, rtol=0, atol=1e-6)


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
    # Refused at the file's creation, the first step (load_state_dict may come before it).
    exists = pytest.raises(GradflowError, match="file exists; pass overwrite=True")
    with exists, Recorder(model, None, tmp_path / "exists.h5"):
        model(torch.randn(2, 6)).sum().backward()
    assert (tmp_path / "exists.h5").read_bytes() == b"x"
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
