"""The README's "Extending gradflow" examples, run as written, and what each one claims.

Each example runs in a namespace of its own, after the section's helper block, with every
registry restored afterwards; the run files it writes are checked against numpy and plain
torch computations of the same quantities from the raw tensors. The plug-in section's
``pyproject.toml`` is installed with pip as a real package and used from the command line.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import gradflow
from gradflow import statistics
from gradflow.em.models import _MODELS, create_model, list_models
from gradflow.plots.catalog import FIGURES, TABLES
from gradflow.probes import PROBES
from gradflow.registry import Registry
from gradflow.statistics import STATISTICS

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Extending gradflow"
EXAMPLES = (
    "A new statistic",
    "A new probe",
    "A new step probe",
    "A new figure",
    "A new model preset",
)
PLUGINS = "Plug-ins"
REGISTRIES: tuple[Registry[Any], ...] = (STATISTICS, PROBES, FIGURES, TABLES, _MODELS)

Example = Callable[..., dict[str, Any]]


def section(markdown: str, heading: str) -> str:
    """The text under ``heading`` up to the next heading of its level or above (headings
    inside code fences, such as ``# comments``, are not headings)."""
    level = len(heading) - len(heading.lstrip("#"))
    lines, body, inside, fenced = markdown.splitlines(), [], False, False
    for line in lines:
        if line.startswith("```"):
            fenced = not fenced
        hashes = len(line) - len(line.lstrip("#"))
        is_heading = not fenced and 0 < hashes <= level and line[hashes : hashes + 1] == " "
        if inside and is_heading:
            break
        if inside:
            body.append(line)
        inside = inside or line == heading
    if not inside:
        raise AssertionError(f"README.md has no heading {heading!r}")
    return "\n".join(body) + "\n"


def code_blocks(text: str, language: str = "python") -> list[str]:
    """The ```python (or other ``language``) blocks of ``text``, in order (of this
    level only: nested ``###`` subsections included)."""
    return re.findall(rf"^```{language}\n(.*?)^```$", text, flags=re.DOTALL | re.MULTILINE)


def extending() -> str:
    return section(README.read_text(encoding="utf-8"), SECTION)


def helper_blocks() -> list[str]:
    """The python blocks before the section's first subsection: run before each example."""
    return code_blocks(extending().split("\n### ", 1)[0])


def example_blocks(name: str) -> list[str]:
    return code_blocks(section(extending(), f"### {name}"))


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Registries that forget what a test registers, and ``tmp_path`` as the working folder."""
    for registry in REGISTRIES:
        len(registry)  # read once: its package's modules register into it, not into the copy
        monkeypatch.setattr(registry, "_items", dict(registry._items))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def run_example(isolated: Path) -> Iterator[Example]:
    """Runs a README example (the helper blocks, then its own) in a fresh namespace."""
    namespaces: list[dict[str, Any]] = []

    def run(name: str) -> dict[str, Any]:
        namespace: dict[str, Any] = {"__name__": "readme_example"}
        for i, code in enumerate([*helper_blocks(), *example_blocks(name)]):
            exec(compile(code, f"README.md ({name}, block {i})", "exec"), namespace)
        namespaces.append(namespace)
        return namespace

    yield run
    for namespace in namespaces:
        for value in namespace.values():
            if isinstance(value, gradflow.Run):
                value.close()


def test_every_python_block_of_the_section_is_run_here() -> None:
    text = extending()
    with_code = [
        name for name in re.findall(r"^### (.+)$", text, re.MULTILINE) if example_blocks(name)
    ]
    assert with_code == list(EXAMPLES)
    assert len(helper_blocks()) == 1
    assert len(code_blocks(text)) == 1 + sum(len(example_blocks(name)) for name in with_code)


def grad64(param: nn.Parameter) -> torch.Tensor:
    """The gradient of ``param`` in float64 (a copy)."""
    assert param.grad is not None
    return param.grad.to(torch.float64, copy=True)


def record(path: Path, probes: tuple[str, ...], steps: int = 3) -> dict[str, list[Any]]:
    """Record a small MLP with ``probes`` and keep the raw tensors of every step: each
    linear layer's weights and gradients before the step (float64) and its output."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
    linears = [model[0], model[2]]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    raw: dict[str, list[Any]] = {"weights": [], "grads": [], "outputs": []}
    outputs: list[torch.Tensor] = []
    for layer in linears:
        layer.register_forward_hook(lambda m, a, out: outputs.append(out.detach().double()))
    with gradflow.Recorder(model, optimizer, path, probes=probes) as rec:
        for _ in range(steps):
            outputs.clear()
            x = torch.randn(10, 6)
            loss = model(x).square().mean()
            optimizer.zero_grad()
            loss.backward()
            raw["outputs"].append(list(outputs))
            raw["weights"].append([[p.detach().double() for p in m.parameters()] for m in linears])
            raw["grads"].append([[grad64(p) for p in m.parameters()] for m in linears])
            optimizer.step()
            rec.log(loss=loss)
    return raw


def test_new_statistic_is_stored_and_equals_numpy(run_example: Example, tmp_path: Path) -> None:
    namespace = run_example("A new statistic")
    assert "param/grad_to_weight" in STATISTICS
    written = namespace["run"]
    assert "grad_to_weight" in written.probes()["param"]
    values = written.stat("param", "grad_to_weight")
    assert values.shape == (5, 2) and np.isfinite(values).all()

    raw = record(tmp_path / "check.h5", ("param",))
    expected = np.array(
        [
            [
                np.sqrt(
                    sum(np.square(g.numpy()).sum() for g in grads)
                    / sum(np.square(w.numpy()).sum() for w in weights)
                )
                for grads, weights in zip(step_grads, step_weights, strict=True)
            ]
            for step_grads, step_weights in zip(raw["grads"], raw["weights"], strict=True)
        ]
    )
    with gradflow.open_run(tmp_path / "check.h5") as run:
        np.testing.assert_allclose(run.stat("param", "grad_to_weight"), expected, rtol=1e-5)


def test_new_probe_is_recorded_and_equals_torch(run_example: Example, tmp_path: Path) -> None:
    namespace = run_example("A new probe")
    assert PROBES.get("abs_output") is namespace["AbsOutputProbe"]
    written = namespace["run"]
    assert written.probes()["abs_output"] == ["mean"]
    values = written.stat("abs_output", "mean")
    assert values.shape == (5, 2) and (values > 0).all()

    raw = record(tmp_path / "check.h5", ("abs_output",))
    expected = [[float(out.abs().mean()) for out in step] for step in raw["outputs"]]
    with gradflow.open_run(tmp_path / "check.h5") as run:
        assert list(run.probes()) == ["abs_output"]
        np.testing.assert_allclose(run.stat("abs_output", "mean"), expected, rtol=1e-5)


def mean_abs(tensors: list[torch.Tensor]) -> float:
    return float(torch.cat([t.flatten() for t in tensors]).abs().mean())


def test_new_step_probe_is_recorded_and_equals_torch(run_example: Example, tmp_path: Path) -> None:
    namespace = run_example("A new step probe")  # its check_probe passes
    assert PROBES.get("grad_abs") is namespace["GradAbsProbe"]
    written = namespace["run"]
    assert written.probes()["grad_abs"] == ["mean"]
    assert written.stat("grad_abs", "mean").shape == (5, 2)

    raw = record(tmp_path / "check.h5", ("grad_abs",))
    expected = [[mean_abs(grads) for grads in step] for step in raw["grads"]]
    with gradflow.open_run(tmp_path / "check.h5") as run:
        np.testing.assert_allclose(run.stat("grad_abs", "mean"), expected, rtol=1e-5)


def test_the_step_probe_leaves_a_frozen_layer_unmeasured(
    run_example: Example, tmp_path: Path
) -> None:
    # The first layer has no tensors in the packed vector: its start is the second's.
    run_example("A new step probe")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 4), nn.Linear(4, 3))
    model[0].requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    expected = []
    with gradflow.Recorder(model, optimizer, tmp_path / "frozen.h5", probes=("grad_abs",)):
        for _ in range(2):
            optimizer.zero_grad()
            model(torch.randn(10, 6)).square().mean().backward()
            expected.append([mean_abs([grad64(p) for p in model[i].parameters()]) for i in (2, 3)])
            optimizer.step()
    with gradflow.open_run(tmp_path / "frozen.h5") as run:
        assert run.layer_names == ["0", "2", "3"]
        values = run.stat("grad_abs", "mean")
    assert np.isnan(values[:, 0]).all()
    np.testing.assert_allclose(values[:, 1:], expected, rtol=1e-5)


def test_new_figure_renders_a_png(run_example: Example, isolated: Path) -> None:
    run_example("A new figure")
    assert FIGURES.summary("last-grad-norm") == (
        "Each layer's gradient norm at the last recorded step, one line per run."
    )
    with Image.open(isolated / "last-grad-norm.png") as image:
        assert image.format == "PNG" and image.width > 100 and image.height > 100


def test_new_model_preset_is_listed_and_builds(run_example: Example) -> None:
    run_example("A new model preset")
    assert list_models()[-1] == "tiny-plain-4"
    model = create_model("tiny-plain-4")
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 23
    with torch.no_grad():
        assert model(torch.randn(2, 1, 16, 16)).shape == (2, 1, 16, 16)


def test_a_resumed_run_file_keeps_its_statistics(run_example: Example, tmp_path: Path) -> None:
    # Registered after the file was made: resuming adds rows of the file's own statistics;
    # a file holding a statistic this process has not registered is refused in one line.
    from gradflow.errors import GradflowError
    from gradflow.recorder.state import recorder_state

    path = tmp_path / "resumed.h5"
    record(path, ("param",), steps=2)
    run_example("A new statistic")
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)

    def resume() -> None:
        with gradflow.Recorder(model, optimizer, path, probes=("param",)) as rec:
            rec.load_state_dict(recorder_state(path, 2, 0, None))  # after the file's 2 steps
            optimizer.zero_grad()
            model(torch.randn(10, 6)).square().mean().backward()
            optimizer.step()
            rec.log(loss=0.0)

    resume()
    with gradflow.open_run(path) as run:
        assert run.steps.tolist() == [0, 1, 2]
        assert "grad_to_weight" not in run.probes()["param"]
        assert np.isfinite(run.stat("param", "grad_norm")).all()
    path.unlink()
    record(path, ("param",), steps=2)  # now with param/grad_to_weight
    STATISTICS._items.pop("param/grad_to_weight")
    with pytest.raises(GradflowError, match=r"statistic param/grad_to_weight is not registered"):
        resume()


def test_a_registered_probe_is_accepted_by_the_training_configuration(
    run_example: Example,
) -> None:
    # `gradflow record --probes` with the probe of a plug-in, which the registry loads.
    from gradflow.em.config import TrainConfig
    from gradflow.errors import GradflowError

    with pytest.raises(GradflowError, match="unknown probe 'abs_output'"):
        TrainConfig(probes=("param", "abs_output")).validate()
    run_example("A new probe")
    TrainConfig(probes=("param", "abs_output")).validate()


# -- a plug-in installed with pip, used from the command line ---------------------------------
PLUGIN_MODULE = '''
"""A gradflow plug-in: a statistic, a step probe and a figure."""

import numpy as np
import torch
from matplotlib.figure import Figure

from gradflow.plots import FIGURES
from gradflow.probes import Block, Probe, register
from gradflow.statistics import statistic


@statistic("param", "grad_to_weight", "||grad|| / ||W|| at the optimizer step")
def grad_to_weight(r):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.sqrt(r["g_sq"] / r["w_sq"])


@register
class WeightAbsProbe(Probe):
    """Sum of |W| of each layer's trainable parameters after the optimizer step."""

    name = "weight_abs"
    scope = "step"
    columns = ("w_abs",)

    def attach(self, attachment):
        self.params = [p for layer in attachment.layers for p in layer.params]
        self.row = None

    def after_step(self, group, stepped, has_update):
        with torch.no_grad():
            self.row = torch.stack([p.abs().sum(dtype=torch.float64) for p in self.params])

    def pack(self):
        row, self.row = self.row, None
        return None if row is None else (row, Block(row.numel()))

    @classmethod
    def unpack(cls, packed, blocks, layers):
        ends = np.append(layers.layer_starts[1:], packed.shape[1])
        w_abs = np.full((len(packed), layers.n_layers), np.nan)
        for i, (start, end) in enumerate(zip(layers.layer_starts, ends)):
            if end > start:
                w_abs[:, i] = packed[:, start:end].sum(axis=1)
        return {"w_abs": w_abs, "n": np.broadcast_to(layers.layer_numel, w_abs.shape)}


@statistic("weight_abs", "mean", "mean |W| after the optimizer step")
def mean_abs_weight(r):
    return r["w_abs"] / r["n"]


@FIGURES.register("weight-abs")
def weight_abs(runs, *, title=None):
    """Each layer's mean |W| at the last recorded step."""
    fig = Figure(figsize=(5, 3), layout="constrained")
    ax = fig.subplots()
    for run in runs:
        ax.plot(run.stat("weight_abs", "mean")[-1], marker="o", label=run.name)
    ax.set(xlabel="layer", ylabel="mean |W|", title=title)
    return fig
'''
TINY = [
    "--model", "tiny", "--epochs", "1", "--steps-per-epoch", "2", "--crop", "32",
    "--batch-size", "2", "--val-slices", "1", "--log-every", "1",
]  # fmt: skip


def install(package: Path, site: Path) -> None:
    """``pip install`` the package folder into ``site``, offline, as a user would."""
    pytest.importorskip("setuptools")  # the build backend, without build isolation
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
         "--no-index", "--quiet", "--target", str(site), str(package)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_an_installed_plug_in_works_on_the_command_line(em: Path, tmp_path: Path) -> None:
    from importlib.metadata import distributions

    from gradflow.em.checkpoint import checkpoint_path, load_checkpoint

    package, site = tmp_path / "package", tmp_path / "site"
    package.mkdir()
    (pyproject,) = code_blocks(section(extending(), f"### {PLUGINS}"), "toml")
    # One more entry point, to a module that does not exist: a warning, not a failure.
    broken = '\nbroken = "gradflow_weight_abs_missing"\n'
    assert pyproject.rstrip().endswith('weight_abs = "gradflow_weight_abs"')
    (package / "pyproject.toml").write_text(pyproject + broken, encoding="utf-8")
    (package / "gradflow_weight_abs.py").write_text(PLUGIN_MODULE, encoding="utf-8")
    install(package, site)
    (dist,) = distributions(path=[str(site)])
    assert {(e.group, e.name, e.value) for e in dist.entry_points} == {
        ("gradflow.plugins", "weight_abs", "gradflow_weight_abs"),
        ("gradflow.plugins", "broken", "gradflow_weight_abs_missing"),
    }

    plain = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "COLUMNS": "200"}
    path = os.pathsep.join([str(site), str(README.parent), os.environ.get("PYTHONPATH", "")])
    with_plug_in = {**plain, "PYTHONPATH": path}

    def gradflow_command(*args: object, env: dict[str, str] = with_plug_in) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "gradflow.cli.main", *map(str, args)],
            capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr
        warnings = [line for line in done.stderr.splitlines() if "plug-in" in line]
        assert warnings == (
            [
                "gradflow: warning: plug-in 'broken' (gradflow_weight_abs_missing) not loaded: "
                "ModuleNotFoundError: No module named 'gradflow_weight_abs_missing'"
            ]
            if env is with_plug_in
            else []
        )
        return done.stdout

    run_path, png = tmp_path / "run.h5", tmp_path / "w.png"
    gradflow_command("record", *TINY, "--data", em, "--probes", "param,weight_abs",
                     "--out", run_path)  # fmt: skip
    gradflow_command("plot", "weight-abs", run_path, "--out", png)
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width > 100
    assert "weight-abs" in gradflow_command("plot", "--list")

    # Read where the plug-in is neither installed nor imported.
    assert "weight_abs: mean" in gradflow_command("info", run_path, env=plain)
    heatmap = tmp_path / "heatmap.png"
    gradflow_command("plot", "gradient-heatmap", run_path, "--stat", "weight_abs/mean",
                     "--out", heatmap, env=plain)  # fmt: skip
    assert heatmap.stat().st_size > 0
    assert "gradflow_weight_abs" not in sys.modules
    with gradflow.open_run(run_path) as run:
        stored = run.probes()
        assert sorted(stored["param"]) == sorted([*statistics.names("param"), "grad_to_weight"])
        assert stored["weight_abs"] == ["mean"]
        layers, steps = run.layer_names, run.steps.tolist()
        grad_to_weight = run.stat("param", "grad_to_weight")
        with np.errstate(divide="ignore"):  # zero-initialised residual branches: inf
            ratio = run.stat("param", "grad_norm") / run.stat("param", "weight_norm")
        mean_abs_weight = run.stat("weight_abs", "mean").astype(np.float64)
    assert steps == [0, 1] and len(layers) > 3
    np.testing.assert_allclose(grad_to_weight, ratio, rtol=1e-5)
    # The last row's weights, after the last step, are the checkpoint's.
    state = load_checkpoint(checkpoint_path(run_path)).model
    trainable = {name for name, p in create_model("tiny").named_parameters()}
    expected = [
        np.concatenate(
            [np.abs(state[k].double().numpy()).ravel()
             for k in state if k in trainable and k.rpartition(".")[0] == layer]
        ).mean()
        for layer in layers
    ]  # fmt: skip
    np.testing.assert_allclose(mean_abs_weight[-1], expected, rtol=1e-5)
