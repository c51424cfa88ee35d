"""The README's "Extending gradflow" examples, run as written, and what each one claims.

Each example runs in a namespace of its own, after the section's helper block, with every
registry restored afterwards; the run files it writes are checked against numpy and plain
torch computations of the same quantities from the raw tensors.
"""

from __future__ import annotations

import re
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
from gradflow.em.models import _MODELS, create_model, list_models
from gradflow.plots.catalog import FIGURES, TABLES
from gradflow.probes import PROBES
from gradflow.registry import Registry
from gradflow.statistics import STATISTICS

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Extending gradflow"
EXAMPLES = ("A new statistic", "A new probe", "A new figure", "A new model preset")
LAUNCHER = "Your registrations on the command line"
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


def python_blocks(text: str) -> list[str]:
    """The ```python code blocks of ``text``, in order (of this level only: nested
    ``###`` subsections included)."""
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.DOTALL | re.MULTILINE)


def extending() -> str:
    return section(README.read_text(encoding="utf-8"), SECTION)


def helper_blocks() -> list[str]:
    """The python blocks before the section's first subsection: run before each example."""
    return python_blocks(extending().split("\n### ", 1)[0])


def example_blocks(name: str) -> list[str]:
    return python_blocks(section(extending(), f"### {name}"))


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Registries that forget what a test registers, and ``tmp_path`` as the working folder."""
    for registry in REGISTRIES:
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
    assert with_code == [*EXAMPLES, LAUNCHER]
    assert len(helper_blocks()) == 1
    assert len(python_blocks(text)) == 1 + sum(len(example_blocks(name)) for name in with_code)


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


def test_launcher_lists_the_new_preset(
    isolated: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (isolated / "my_extensions.py").write_text(
        "\n".join(example_blocks("A new model preset")), encoding="utf-8"
    )
    monkeypatch.syspath_prepend(str(isolated))
    monkeypatch.setattr(sys, "argv", ["mygradflow.py", "models"])
    (launcher,) = example_blocks(LAUNCHER)
    try:
        with pytest.raises(SystemExit) as exited:
            exec(compile(launcher, "mygradflow.py", "exec"), {"__name__": "__main__"})
    finally:
        sys.modules.pop("my_extensions", None)
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "tiny-plain-4" in out and "12,513" in out


def test_a_resumed_run_file_keeps_its_statistics(run_example: Example, tmp_path: Path) -> None:
    # Registered after the file was made: resuming adds rows of the file's own statistics;
    # a file holding a statistic this process has not registered is refused in one line.
    from gradflow.errors import GradflowError

    path = tmp_path / "resumed.h5"
    record(path, ("param",), steps=2)
    run_example("A new statistic")
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)

    def resume() -> None:
        with gradflow.Recorder(model, optimizer, path, probes=("param",), resume=(2, 0)) as rec:
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
    # `gradflow record --probes` started from a launcher that imports the probe first.
    from gradflow.em.config import TrainConfig
    from gradflow.errors import GradflowError

    with pytest.raises(GradflowError, match="unknown probe 'abs_output'"):
        TrainConfig(probes=("param", "abs_output")).validate()
    run_example("A new probe")
    TrainConfig(probes=("param", "abs_output")).validate()
