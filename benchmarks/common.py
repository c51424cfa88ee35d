"""Helpers shared by the benchmark scripts.

- the header every result starts with (date, machine, torch, git commit);
- robust summaries (median, quartiles, min-max) and a plain-text table;
- a training workload (a zoo model, RMSprop, one fixed random batch) and the tools that
  watch it (:class:`Tool`; :class:`GradflowTool` is the recorder), so every script times
  the same training step;
- interleaved, paired timing (:func:`paired_trials`);
- process measurements: resident memory, hooks attached to a model and its optimizer.

The scripts import this file as ``common`` (Python puts a script's own folder first on
``sys.path``); run them from the repository root, e.g. ``python benchmarks/overhead.py``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]


class Unavailable(Exception):
    """A variant that cannot run here (tool not installed, or it fails on this model)."""


# -- where and what ran ---------------------------------------------------------------------------
def git_commit() -> str:
    """The checked-out commit, ``+dirty`` when tracked files differ (read-only git calls)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        # Plumbing only: diff-index neither refreshes nor writes the index.
        dirty = subprocess.run(
            ["git", "diff-index", "--quiet", "HEAD", "--"], cwd=REPO, timeout=10
        ).returncode
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str = "cpu") -> dict[str, Any]:
    """Date, machine, versions and commit, for the header and the JSON results."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    env: dict[str, Any] = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "git_commit": git_commit(),
        "argv": sys.argv,
    }
    try:
        load = os.getloadavg()
        env["loadavg_1m"] = round(load[0], 2)
    except OSError:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        env["gpu"] = props.name
        env["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
        env["cuda"] = torch.version.cuda
    return env


def print_header(title: str, env: dict[str, Any]) -> None:
    print(title)
    print(f"date    {env['date']}   host {env['host']}")
    cores = f"{env['cores']} cores ({env['usable_cores']} usable, torch threads"
    print(f"machine {env['cpu']}, {cores} {env['torch_threads']}), load {env.get('loadavg_1m')}")
    if "gpu" in env:
        print(f"gpu     {env['gpu']} ({env['gpu_memory_gb']} GB), CUDA {env['cuda']}")
    print(f"torch   {env['torch']}   python {env['python']}   git {env['git_commit']}")
    print()


# -- statistics -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Summary:
    """Median, quartiles and range of a sample."""

    n: int
    median: float
    q1: float
    q3: float
    lo: float
    hi: float

    def spread(self, fmt: str = ".3f") -> str:
        return f"{self.lo:{fmt}}-{self.hi:{fmt}}"

    def iqr(self, fmt: str = ".3f") -> str:
        return f"{self.q1:{fmt}}-{self.q3:{fmt}}"

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Summary:
        return cls(**{k: data[k] for k in ("n", "median", "q1", "q3", "lo", "hi")})


def summarize(values: Iterable[float]) -> Summary:
    data = sorted(float(v) for v in values)
    if not data:
        nan = float("nan")
        return Summary(0, nan, nan, nan, nan, nan)
    if len(data) == 1:
        v = data[0]
        return Summary(1, v, v, v, v, v)
    q1, _, q3 = statistics.quantiles(data, n=4, method="inclusive")
    return Summary(len(data), statistics.median(data), q1, q3, data[0], data[-1])


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A fixed-width text table; the first column is left-aligned, the others right."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells if i < len(r)) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        parts = [
            cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def ratio_headline(summary: Summary, label: str) -> str:
    """The headline every overhead script ends with (one per measured variant)."""
    return (
        f"recorder/plain step-time ratio: {summary.median:.3f} "
        f"(median of {summary.n} pairs, spread {summary.spread()}) [{label}]"
    )


def write_json(path: str | os.PathLike[str] | None, data: Any) -> None:
    if not path:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    print(f"results written to {target}")


def _json_default(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and value != value:
        return None
    return str(value)


# -- the process ----------------------------------------------------------------------------------
def peak_rss_mb() -> float:
    """Peak resident memory of this process so far.

    Reads VmHWM from /proc: ``getrusage``'s ru_maxrss survives ``exec``, so in a fresh
    subprocess it would still report the parent's size at ``fork`` time.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20


def current_rss_mb() -> float:
    """Resident memory now (reads /proc; falls back to psutil, then to the peak)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        return peak_rss_mb()


def dataset_bytes(path: Path) -> dict[str, int]:
    """Bytes each dataset of an HDF5 file occupies (its stored, compressed chunks)."""
    import h5py

    sizes: dict[str, int] = {}

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            sizes[name] = obj.id.get_storage_size()

    with h5py.File(path, "r", swmr=True) as f:
        f.visititems(visit)
    return sizes


def children_rss_mb() -> float | None:
    """Resident memory of this process's child processes (e.g. wandb's service), or None."""
    try:
        import psutil
    except ImportError:
        return None
    total = 0
    for child in psutil.Process().children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            continue
    return total / 2**20


_MODULE_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
_OPTIMIZER_HOOK_DICTS = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)


def count_hooks(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Hooks on every module, parameter and the optimizer, plus torch's global module hooks."""
    n = 0
    for module in model.modules():
        n += sum(len(getattr(module, name, None) or {}) for name in _MODULE_HOOK_DICTS)
    for p in model.parameters():
        n += len(getattr(p, "_backward_hooks", None) or {})
        n += len(getattr(p, "_post_accumulate_grad_hooks", None) or {})
    if optimizer is not None:
        n += sum(len(getattr(optimizer, name, None) or {}) for name in _OPTIMIZER_HOOK_DICTS)
    glob = torch.nn.modules.module
    for name in dir(glob):
        if name.startswith("_global_") and name.endswith("hooks"):
            n += len(getattr(glob, name))
    return n


# -- the training workload ------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    """A model trained with RMSprop on one fixed random batch: a zoo FCN (BCE on a
    ``crop`` x ``crop`` image) or a third-party model of :data:`THIRD_PARTY`."""

    model: str = "fig3b-long-9"
    crop: int = 96
    batch: int = 4
    device: str = "cpu"
    lr: float = 1e-4
    seed: int = 0

    def describe(self) -> str:
        if self.model in THIRD_PARTY:
            return f"{self.model}, {THIRD_PARTY[self.model].describe(self)}, RMSprop, {self.device}"
        return (
            f"{self.model}, batch {self.batch} x {self.crop}x{self.crop}, RMSprop, "
            f"BCE-with-logits, random inputs, {self.device}"
        )


LossFn = Callable[[Any, torch.Tensor], torch.Tensor]
Task = tuple[nn.Module, torch.Tensor, torch.Tensor, LossFn]  # model, inputs, targets, loss


class _BasicBlock(nn.Module):
    """ResNet's two 3x3 convolutions with batch norm and an identity (or 1x1) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


def resnet18_like(num_classes: int = 10) -> nn.Module:
    """ResNet-18's layout in pure torch (torchvision's module names: ``conv1``,
    ``layer1.0.conv1``, ..., ``fc``): 7x7 stem, four stages of two basic blocks."""
    layers: list[tuple[str, nn.Module]] = [
        ("conv1", nn.Conv2d(3, 64, 7, 2, 3, bias=False)),
        ("bn1", nn.BatchNorm2d(64)),
        ("relu", nn.ReLU()),
        ("maxpool", nn.MaxPool2d(3, 2, 1)),
    ]
    c_in = 64
    for i, width in enumerate((64, 128, 256, 512)):
        stride = 1 if i == 0 else 2
        stage = nn.Sequential(_BasicBlock(c_in, width, stride), _BasicBlock(width, width, 1))
        layers.append((f"layer{i + 1}", stage))
        c_in = width
    layers += [
        ("avgpool", nn.AdaptiveAvgPool2d(1)),
        ("flatten", nn.Flatten()),
        ("fc", nn.Linear(512, num_classes)),
    ]
    return nn.Sequential(OrderedDict(layers))


@dataclass(frozen=True)
class ThirdParty:
    """A model built from pure torch or a transformers config, with its batch and loss:
    ``build(workload, generator) -> (model, x, y, loss_fn)``."""

    describe: Callable[[Workload], str]
    build: Callable[[Workload, torch.Generator], Task]


def _resnet18(workload: Workload, gen: torch.Generator) -> Task:
    x = torch.randn((workload.batch, 3, workload.crop, workload.crop), generator=gen)
    y = torch.randint(0, 10, (workload.batch,), generator=gen)
    return resnet18_like(10), x, y, nn.CrossEntropyLoss()


GPT2_MINI: dict[str, Any] = {"n_layer": 6, "n_embd": 256, "n_head": 4, "vocab_size": 4096}


def _gpt2_mini(workload: Workload, gen: torch.Generator) -> Task:
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError as err:
        raise Unavailable(f"needs transformers ({err}); pip install transformers") from err
    config = GPT2Config(
        n_positions=max(workload.crop, 16),
        use_cache=False,
        bos_token_id=0,
        eos_token_id=0,
        **GPT2_MINI,
    )
    tokens = torch.randint(0, config.vocab_size, (workload.batch, workload.crop + 1), generator=gen)

    def next_token_loss(out: Any, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out.logits.flatten(0, 1), y.flatten())

    return GPT2LMHeadModel(config), tokens[:, :-1], tokens[:, 1:], next_token_loss


THIRD_PARTY = {
    "resnet18": ThirdParty(
        lambda w: (
            f"ResNet-18-like CNN (pure torch), batch {w.batch} x 3x{w.crop}x{w.crop}, "
            "10-class cross-entropy"
        ),
        _resnet18,
    ),
    "gpt2-mini": ThirdParty(
        lambda w: (
            "GPT-2 from a transformers config ("
            + ", ".join(f"{k}={v}" for k, v in GPT2_MINI.items())
            + f"), batch {w.batch} x {w.crop} tokens, next-token cross-entropy"
        ),
        _gpt2_mini,
    ),
}


class Stepper(Protocol):
    """What a tool watches: a model, its optimizer, and one training step at a time."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    step_index: int

    def step(self, tool: Tool) -> torch.Tensor: ...


class Trainer:
    """One training step at a time; every Trainer of a workload starts from the same weights."""

    def __init__(self, workload: Workload) -> None:
        from gradflow.em.models import create_model

        self.workload = workload
        device = torch.device(workload.device)
        torch.manual_seed(workload.seed)
        gen = torch.Generator().manual_seed(workload.seed + 1)
        self.loss_fn: LossFn
        if workload.model in THIRD_PARTY:
            model, x, y, self.loss_fn = THIRD_PARTY[workload.model].build(workload, gen)
        else:
            model = create_model(workload.model)
            self.loss_fn = nn.BCEWithLogitsLoss()
            shape = (workload.batch, 1, workload.crop, workload.crop)
            x = torch.randn(shape, generator=gen)
            y = (torch.rand(shape, generator=gen) < 0.3).float()
        self.model: nn.Module = model.to(device)
        self.model.train()
        self.optimizer: torch.optim.Optimizer = torch.optim.RMSprop(
            self.model.parameters(), lr=workload.lr
        )
        self.x, self.y = x.to(device), y.to(device)
        self.step_index = 0

    def step(self, tool: Tool) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        out = self.model(self.x)
        loss = self.loss_fn(out, self.y)
        tool.backward(out, loss)
        self.optimizer.step()
        tool.after_step(loss)
        self.step_index += 1
        return loss


class MLPTrainer:
    """``n_layers`` Linear(width, width) layers in a row (+ ReLU if ``relu``), SGD, MSE, one
    fixed random batch. Near-identity initial weights keep even 1000 layers finite."""

    def __init__(
        self, n_layers: int, *, width: int = 16, batch: int = 8, relu: bool = False, seed: int = 0
    ) -> None:
        torch.manual_seed(seed)
        blocks: list[nn.Module] = []
        for _ in range(n_layers):
            linear = nn.Linear(width, width)
            with torch.no_grad():
                linear.weight.copy_(torch.eye(width) + 0.01 * torch.randn(width, width))
                linear.bias.zero_()
            blocks += [linear, nn.ReLU()] if relu else [linear]
        self.model: nn.Module = nn.Sequential(*blocks)
        self.optimizer: torch.optim.Optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3)
        self.x = torch.randn(batch, width)
        self.y = torch.randn(batch, width)
        self.step_index = 0

    def step(self, tool: Tool) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        out = self.model(self.x)
        loss = nn.functional.mse_loss(out, self.y)
        tool.backward(out, loss)
        self.optimizer.step()
        tool.after_step(loss)
        self.step_index += 1
        return loss


class Tool:
    """Something watching a training step; the base class watches nothing (plain training)."""

    def __init__(self, trainer: Stepper) -> None:
        self.trainer = trainer

    def backward(self, out: torch.Tensor, loss: torch.Tensor) -> None:
        loss.backward()

    def after_step(self, loss: torch.Tensor) -> None:
        """Per-step logging, after ``optimizer.step()``."""

    def settle(self) -> None:
        """Wait for work the tool queued in the background (called inside the timed trial)."""

    def close(self) -> None:
        """Detach from the model and release files."""


class GradflowTool(Tool):
    """The gradflow Recorder, used as documented: ``rec.log(loss=loss)`` after each step.
    ``native=False``: its CPU statistics by torch operations, as with ``GRADFLOW_NATIVE=0``."""

    def __init__(
        self,
        trainer: Stepper,
        path: Path,
        *,
        every: int | None = 1,
        probes: Sequence[str] = ("param",),
        native: bool = True,
        **options: Any,
    ) -> None:
        super().__init__(trainer)
        from gradflow import Recorder

        self.path = path
        with contextlib.nullcontext() if native else torch_kernels():
            self.recorder = Recorder(
                trainer.model,
                trainer.optimizer,
                path,
                every=every,
                probes=tuple(probes),
                overwrite=True,
                **options,
            )
            if not native:
                trainer.step(self)  # the statistics pick their kernels at the first step

    def after_step(self, loss: torch.Tensor) -> None:
        self.recorder.log(loss=loss)

    def settle(self) -> None:
        # No public "wait for the writer" API: wait until the writer thread has taken every
        # queued row, so its work is charged to this trial and not to the next one.
        queue = getattr(getattr(self.recorder, "_writer", None), "queue", None)
        deadline = time.monotonic() + 30.0
        while queue is not None and not queue.empty() and time.monotonic() < deadline:
            time.sleep(0.0005)

    def close(self) -> None:
        self.recorder.close()

    def self_reported(self) -> dict[str, float] | None:
        """The recorder's own per-recorded-step timing from the closed run file (ms)."""
        from gradflow.runfile import open_run

        try:
            with open_run(self.path) as run:
                n = max(run.n_steps, 1)
                out = {k: 1e3 * v / n for k, v in run.overhead.items() if k != "wall"}
                out["rows"] = float(run.n_steps)
                if "budget_reached" in run.attrs:
                    out["budget_reached"] = float(run.attrs["budget_reached"])
                return out
        except Exception:
            return None

    def kernel_backend(self) -> str | None:
        """The kernels the recorder used, as stored in the closed run file."""
        from gradflow.runfile import open_run

        try:
            with open_run(self.path) as run:
                backend = run.attrs.get("kernel_backend")
                return None if backend is None else str(backend)
        except Exception:
            return None


@dataclass(frozen=True)
class Variant:
    """A named way of watching training: ``build(trainer, folder)`` attaches the tool
    (writing any files into ``folder``) or raises :class:`Unavailable`."""

    name: str
    label: str
    build: Callable[[Stepper, Path], Tool]


def recorder_variant(
    name: str,
    label: str,
    every: int | None,
    probes: Sequence[str],
    native: bool = True,
    budget: float | None = None,
) -> Variant:
    """A variant recording with gradflow into ``<folder>/<name>.h5`` (every ``every``-th
    step, or under an overhead ``budget``)."""
    options = {} if budget is None else {"budget": budget}
    return Variant(
        name,
        label,
        lambda t, folder: GradflowTool(
            t, folder / f"{name}.h5", every=every, probes=probes, native=native, **options
        ),
    )


@contextlib.contextmanager
def torch_kernels() -> Iterator[None]:
    """Recorders that pick their CPU kernels inside this block use torch operations, as the
    whole process does with ``GRADFLOW_NATIVE=0``. gradflow decides that once per process:
    the decision is stood in for inside the block, and the process's own stays as it was."""
    from unittest import mock

    from gradflow.kernels import cpu as native

    with mock.patch.object(native, "_library", lambda: native._Loaded(None, "torch")):
        yield


# -- interleaved, paired timing -------------------------------------------------------------------
@dataclass
class Session:
    """A trainer and the tool watching it."""

    name: str
    trainer: Stepper
    tool: Tool

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.trainer.step(self.tool)


Timer = Callable[[Session, int], float]


def cpu_timer(session: Session, steps: int) -> float:
    """Wall seconds per step over ``steps`` steps, background work included."""
    start = time.perf_counter()
    session.run(steps)
    session.tool.settle()
    return (time.perf_counter() - start) / steps


@dataclass
class Pairs:
    """Per-pair seconds per step of the baseline and of one variant, measured back to back
    (``wall_*``: the wall clock of the same trials, when the timer has a ``last_wall``)."""

    baseline: list[float] = field(default_factory=list)
    variant: list[float] = field(default_factory=list)
    wall_baseline: list[float] = field(default_factory=list)
    wall_variant: list[float] = field(default_factory=list)

    @property
    def ratios(self) -> list[float]:
        return [v / b for b, v in zip(self.baseline, self.variant, strict=True)]

    @property
    def wall_ratios(self) -> list[float]:
        return [v / b for b, v in zip(self.wall_baseline, self.wall_variant, strict=True)]


def paired_trials(
    baseline: Session,
    variants: Sequence[Session],
    *,
    pairs: int,
    steps: int,
    timer: Timer = cpu_timer,
    deadline: float | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Pairs]:
    """Round ``i`` times, for every variant, ``steps`` baseline steps and ``steps`` variant
    steps back to back: baseline first in even rounds, variant first in odd ones. The
    variants' order rotates from round to round, so no variant always follows the same one.
    Stops early (with fewer pairs) once ``deadline`` (``time.monotonic()``) has passed."""
    results = {s.name: Pairs() for s in variants}
    n = len(variants)
    for i in range(pairs):
        if deadline is not None and time.monotonic() > deadline and i >= 2:
            if progress:
                progress(f"time budget reached: stopping after {i} pairs")
            break
        order = [variants[(i + j) % n] for j in range(n)]
        for session in order:
            pair = results[session.name]
            for role in ("baseline", "variant") if i % 2 == 0 else ("variant", "baseline"):
                seconds = timer(baseline if role == "baseline" else session, steps)
                getattr(pair, role).append(seconds)
                wall = getattr(timer, "last_wall", None)
                if wall is not None:
                    getattr(pair, f"wall_{role}").append(wall)
        if progress:
            ratios = "  ".join(f"{s.name} {results[s.name].ratios[-1]:.3f}" for s in variants)
            progress(f"pair {i + 1}/{pairs}: {ratios}")
    return results


def stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
