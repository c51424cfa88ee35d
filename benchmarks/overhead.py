"""Per-step cost of recording with gradflow, next to wandb.watch, TensorBoard and Cockpit.

Every variant trains its own copy of the same model (same initial weights, same random
batch, RMSprop, BCE-with-logits). Timing is interleaved and paired: in round ``i`` every
variant runs ``--steps-per-trial`` steps right next to as many plain steps (plain first in
even rounds, the variant first in odd ones; the variants' order rotates), after warm-up
steps that are not timed. A variant's ratio is the median over rounds of
``variant s/step / plain s/step`` of its pairs; the spread is the min-max of those ratios.
Peak resident memory is measured per variant in a fresh subprocess running the same steps.
A budgeted variant (``budget-1pc``, ``budget-5pc``) keeps its budget against a clock that
runs only while its own rig trains, so the time the other variants train between its
trials is not counted as its wall time. For the same reason each Recorder's writer commits
after ``flush_seconds`` times the number of trials in a round (as many of its own steps as
when training alone), and the warm-up (32 steps) covers its first, smaller commits. Each
pair also compares CPU time: that of every thread of the process during the trial, with a
recorder's writer thread charged to its own variant (its CPU time over all the variant's
trials, per step).

    python benchmarks/overhead.py --model fig3b-long-9            # CPU, batch 4, 96x96
    python benchmarks/overhead.py --model paper-resunet --pairs 10  # CPU, batch 2, 64x64
    python benchmarks/overhead.py --pairs 3 --variants plain,param  # a quick smoke test
    python benchmarks/overhead.py --model fig3b-long-9,resnet18,gpt2-mini \
        --variants param,all,param-torch,all-torch --no-memory      # side by side

``resnet18`` (a ResNet-18-like CNN in pure torch; ``resnet18-cl`` the same in channels-last
layout, as CPU training often runs convolutions) and ``gpt2-mini`` (GPT-2 from a
transformers config) are third-party workloads next to the zoo's FCNs; the ``-torch``
variants record with the C kernels off (``GRADFLOW_NATIVE=0``), to show what they save.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import os
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path
from typing import Any

import torch
from harness.env import (
    add_threads_option,
    add_trial_options,
    environment,
    print_header,
    script_parser,
    set_threads,
    stderr,
)
from harness.process import peak_of, report_to_parent, run_child
from harness.report import format_table, own_clock_line, ratio_headline, ratio_rows, write_json
from harness.timing import Rig, build_rig, pair_results, paired_trials
from harness.tools import (
    GradflowTool,
    Stepper,
    Tool,
    Unavailable,
    Variant,
    interleaved,
    recorder_variant,
)
from harness.workloads import THIRD_PARTY, Trainer, Workload
from torch import nn

from gradflow.names import DEFAULT_PROBES

# Per model: (crop, batch) that keep a CPU step well under a second.
# For gpt2-mini the "crop" is the sequence length.
# Warm-up steps per variant: past a recorder's first commits of 1, 2, 4, 8 and 16 rows, so that
# the timed steps pay commits at the rate of a run's steady state.
WARMUP = 32
MODEL_DEFAULTS = {
    "fig3b-long-9": (96, 4),
    "paper-resunet": (64, 2),
    "tiny": (32, 4),
    "resnet18": (64, 4),
    "resnet18-cl": (64, 4),
    "gpt2-mini": (64, 4),
}


# -- the comparison tools -------------------------------------------------------------------------
class WandbWatch(Tool):
    """``wandb.watch(model, log="all", log_freq=1)`` in an offline run, ``wandb.log`` per step."""

    def __init__(self, trainer: Stepper, tmp: Path) -> None:
        super().__init__(trainer)
        folder = tmp / "wandb"
        folder.mkdir(exist_ok=True)
        os.environ.update(
            WANDB_MODE="offline",
            WANDB_SILENT="true",
            WANDB_DIR=str(folder),
            WANDB_CONSOLE="off",  # keep our stdout unwrapped
        )
        try:
            import wandb
        except ImportError as err:
            raise Unavailable(f"not installed ({err}); pip install wandb") from err
        self.wandb = wandb
        self.run = wandb.init(project="gradflow-overhead", dir=str(folder), mode="offline")
        wandb.watch(trainer.model, log="all", log_freq=1)

    def after_step(self, loss: torch.Tensor) -> None:
        self.run.log({"loss": loss.item()})

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.wandb.unwatch(self.trainer.model)
        self.run.finish()


class TensorBoardHistograms(Tool):
    """``SummaryWriter.add_histogram`` of every weight and every gradient, every step."""

    def __init__(self, trainer: Stepper, tmp: Path) -> None:
        super().__init__(trainer)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise Unavailable(f"not installed ({err}); pip install tensorboard") from err
        self.writer = SummaryWriter(log_dir=str(tmp / "tensorboard"))

    def after_step(self, loss: torch.Tensor) -> None:
        step = self.trainer.step_index
        for name, p in self.trainer.model.named_parameters():
            self.writer.add_histogram(name, p, step)
            if p.grad is not None:
                self.writer.add_histogram(f"{name}.grad", p.grad, step)
        self.writer.add_scalar("loss", loss.item(), step)

    def settle(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _import_cockpit() -> Any:
    """Import cockpit; cockpit-for-pytorch 1.0.2 imports ``pkg_resources`` only for its own
    version number, and setuptools >= 81 no longer ships it: stand in a minimal one."""
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        shim = types.ModuleType("pkg_resources")

        class DistributionNotFound(Exception):
            pass

        def get_distribution(name: str) -> Any:
            try:
                return types.SimpleNamespace(version=importlib.metadata.version(name))
            except importlib.metadata.PackageNotFoundError as err:
                raise DistributionNotFound(name) from err

        shim.DistributionNotFound = DistributionNotFound  # type: ignore[attr-defined]
        shim.get_distribution = get_distribution  # type: ignore[attr-defined]
        sys.modules["pkg_resources"] = shim
    import cockpit

    return cockpit


class CockpitQuantities(Tool):
    """Cockpit with GradNorm, UpdateSize, Distance and Loss every step, used as documented:
    model and loss extended with BackPACK, ``with cockpit(step, info=...)`` around backward."""

    def __init__(self, trainer: Stepper, tmp: Path) -> None:
        super().__init__(trainer)
        if not isinstance(trainer, Trainer) or trainer.workload.model in THIRD_PARTY:
            raise Unavailable("needs a zoo FCN Trainer (its image batch and BCE loss)")
        self.data = trainer
        try:
            from backpack import extend

            cockpit = _import_cockpit()
            from cockpit import quantities
            from cockpit.utils.schedules import linear
        except ImportError as err:
            raise Unavailable(
                f"not installed ({err}); pip install cockpit-for-pytorch backpack-for-pytorch"
            ) from err
        # BackPACK's full backward hooks warn once per run when inputs need no grad.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        trainer.model = extend(trainer.model)
        trainer.loss_fn = extend(nn.BCEWithLogitsLoss())
        self.individual = nn.BCEWithLogitsLoss(reduction="none")
        every = linear(1)
        self.cockpit = cockpit.Cockpit(
            trainer.model.parameters(),
            quantities=[
                quantities.GradNorm(every),
                quantities.UpdateSize(every),
                quantities.Distance(every),
                quantities.Loss(every),
            ],
        )

    def backward(self, out: torch.Tensor, loss: torch.Tensor) -> None:
        t = self.data
        losses = self.individual(out, t.y).flatten(1).mean(1)
        info = {
            "batch_size": t.x.shape[0],
            "individual_losses": losses,
            "loss": loss,
            "optimizer": t.optimizer,
        }
        with self.cockpit(t.step_index, info=info):
            loss.backward(create_graph=self.cockpit.create_graph(t.step_index))


# -- the variants ---------------------------------------------------------------------------------
VARIANTS = {
    v.name: v
    for v in (
        Variant("plain", "plain training", lambda t, d: Tool(t)),
        recorder_variant("param", "gradflow parameter statistics every step", 1, ("param",)),
        recorder_variant(
            "param-every10", "gradflow parameter statistics every 10th step", 10, ("param",)
        ),
        recorder_variant("all", "gradflow all probes every step", 1, DEFAULT_PROBES),
        recorder_variant(
            "budget-1pc", "gradflow all probes, budget=0.01", None, DEFAULT_PROBES, budget=0.01
        ),
        recorder_variant(
            "budget-5pc", "gradflow all probes, budget=0.05", None, DEFAULT_PROBES, budget=0.05
        ),
        recorder_variant(
            "param-torch", "gradflow parameter statistics, C kernels off", 1, ("param",), False
        ),
        recorder_variant(
            "all-torch", "gradflow all probes, C kernels off", 1, DEFAULT_PROBES, False
        ),
        recorder_variant(
            "all-python-hooks",
            "gradflow all probes, output gradients by Python hooks",
            1,
            DEFAULT_PROBES,
            python_hooks=True,
        ),
        Variant("wandb", 'wandb.watch(log="all", log_freq=1), offline', WandbWatch),
        Variant("tensorboard", "TensorBoard add_histogram, weights + grads", TensorBoardHistograms),
        Variant("cockpit", "Cockpit GradNorm+UpdateSize+Distance+Loss", CockpitQuantities),
    )
}


# -- memory, one fresh process per variant --------------------------------------------------------
def memory_child(args: argparse.Namespace, workload: Workload) -> None:
    """Run in a subprocess: build one variant, run the steps, report its peak RSS."""
    result: dict[str, Any] = {"variant": args.memory_child}
    with tempfile.TemporaryDirectory(prefix="gradflow-mem-") as tmp:
        try:
            rig = build_rig(VARIANTS[args.memory_child], workload, Path(tmp), args.warmup)
            result |= peak_of(rig, args.memory_steps)
        except Unavailable as err:
            result["unavailable"] = str(err)
    report_to_parent(result)


def measure_memory(name: str, args: argparse.Namespace, workload: Workload) -> dict[str, Any]:
    """Peak RSS of variant ``name`` on ``workload``, measured in a fresh process."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", name]
    cmd += ["--model", workload.model, "--crop", str(workload.crop), "--batch", str(workload.batch)]
    cmd += ["--warmup", str(args.warmup), "--memory-steps", str(args.memory_steps)]
    cmd += ["--autocast"] if workload.autocast else []
    return run_child(cmd, args.memory_timeout)


# -- the report -----------------------------------------------------------------------------------
def report(
    names: list[str],
    results: dict[str, Any],
    unavailable: dict[str, str],
    memory: dict[str, dict[str, Any]],
    workload: Workload,
) -> list[str]:
    """Print the table; returns the headline lines."""
    plain_mem = memory.get("plain", {}).get("peak_rss_mb")
    first = ratio_rows(names, results, ms=False, digits=3)
    rows = []
    for name in names:
        label = VARIANTS[name].label
        if name in unavailable:
            rows.append([name, f"unavailable: {unavailable[name]}"])
            continue
        mem = memory.get(name, {})
        peak = mem.get("peak_rss_mb")
        if peak is None:
            peak_s = extra_s = mem.get("error", mem.get("unavailable", "-"))[:40]
        else:
            peak_s = f"{peak:.0f}"
            extra_s = f"{peak - plain_mem:+.0f}" if plain_mem is not None else "-"
            child = mem.get("children_rss_mb")
            if child:
                extra_s += f" (+{child:.0f} in child procs)"
        if name == "plain":
            extra_s = "0"
        cpu = results[name].get("cpu_ratio")
        cpu_s = [f"{cpu['median']:.3f}", f"{cpu['q1']:.3f}-{cpu['q3']:.3f}"] if cpu else ["1", "-"]
        rows.append([*first[name], *cpu_s, peak_s, extra_s, label])
    headers = [
        "variant",
        "s/step",
        "ratio",
        "ratio IQR",
        "ratio min-max",
        "CPU ratio",
        "CPU IQR",
        "peak RSS MB",
        "extra RSS MB",
        "what",
    ]
    print(format_table(headers, rows))
    print(
        "ratio: median over pairs of (variant s/step) / (plain s/step), each pair measured "
        "back to back;\nCPU ratio: the same of the CPU seconds the process spent per step (every "
        "thread; a recorder's writer thread\ncharged to its own variant), which other processes "
        "taking the cores do not change;\ns/step: median over that variant's trials; RSS: a "
        "fresh process per variant, same steps."
    )
    for name in names:
        own = results.get(name, {}).get("self_reported_ms")
        if own:
            print(own_clock_line(name, own, results[name].get("kernel_backend")))
    print()

    def headline(name: str) -> str:
        why = unavailable.get(name, "not run (not in --variants)")
        ratio = results.get(name, {}).get("ratio")
        return ratio_headline(ratio, f"{VARIANTS[name].label}, {workload.model}", why)

    def cpu_headline(name: str) -> str:
        ratio = results.get(name, {}).get("cpu_ratio")
        label = f"{VARIANTS[name].label}, {workload.model}"
        return ratio_headline(ratio, label, unavailable.get(name, "not run"), "CPU-time")

    lines = [headline("param"), headline("all"), cpu_headline("param"), cpu_headline("all")]
    lines += [cpu_headline(n) for n in ("budget-1pc", "budget-5pc") if n in results]
    lines += [headline(name) for name in ("param-torch", "all-torch") if name in results]
    if "wandb" in results and "param" in results:
        wandb_over = results["wandb"]["ratio"]["median"] - 1
        gf_over = results["param"]["ratio"]["median"] - 1
        detail = (
            f"wandb.watch(log=all, log_freq=1) {100 * wandb_over:+.1f} % vs gradflow "
            f"parameter statistics every step {100 * gf_over:+.1f} %; overhead = ratio - 1"
        )
        if gf_over > 0:
            lines.append(
                f"wandb.watch/gradflow overhead ratio: {wandb_over / gf_over:.0f}x ({detail})"
            )
        else:
            lines.append(
                f"wandb.watch/gradflow overhead ratio: unbounded, gradflow's overhead is "
                f"within noise ({detail})"
            )
    else:
        why = unavailable.get("wandb") or unavailable.get("param") or "not in --variants"
        lines.append(f"wandb.watch/gradflow overhead ratio: n/a ({why})")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = script_parser(__doc__)
    p.add_argument(
        "--model",
        default="fig3b-long-9",
        help="a gradflow zoo preset, resnet18, resnet18-cl or gpt2-mini; several, "
        "comma-separated, are measured one after the other and compared side by side",
    )
    add_trial_options(p, pairs=20, steps=10, warmup=WARMUP)
    p.add_argument(
        "--crop",
        type=int,
        help="input side, or gpt2-mini's sequence length (default: 96 fig3b, 64 others)",
    )
    p.add_argument("--batch", type=int, help="batch size (default: 2 paper-resunet, 4 others)")
    p.add_argument(
        "--autocast", action="store_true", help="forward under torch.autocast (CPU: bfloat16)"
    )
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated subset of {','.join(VARIANTS)} (plain is always run)",
    )
    p.add_argument("--memory-steps", type=int, default=20, help="steps per memory subprocess")
    p.add_argument("--memory-timeout", type=int, default=600)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-RSS subprocesses")
    p.add_argument(
        "--max-minutes", type=float, help="stop adding pairs after this long (per model)"
    )
    add_threads_option(p)
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def workload_for(model: str, args: argparse.Namespace) -> Workload:
    crop, batch = MODEL_DEFAULTS.get(model, (64, 2))
    return Workload(
        model=model, crop=args.crop or crop, batch=args.batch or batch, autocast=args.autocast
    )


def n_layers(model: nn.Module) -> int:
    """Modules that directly own trainable parameters: gradflow's layers."""
    return sum(any(p.requires_grad for p in m.parameters(recurse=False)) for m in model.modules())


def measure(
    workload: Workload, names: list[str], args: argparse.Namespace
) -> tuple[dict[str, Any], list[str]]:
    """Time (and measure the memory of) every variant on one workload; print its table.
    Returns the workload's results for the JSON file and its headline lines."""
    print(f"workload: {workload.describe()}")
    started = time.monotonic()
    deadline = started + 60 * args.max_minutes if args.max_minutes else None
    unavailable: dict[str, str] = {}
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gradflow-overhead-") as tmp:
        rigs: dict[str, Rig] = {}
        for name in names:
            try:
                # A round runs a trial of each variant and one of plain training per variant.
                with interleaved(2 * (len(names) - 1)):
                    rigs[name] = build_rig(VARIANTS[name], workload, Path(tmp), args.warmup)
            except Unavailable as err:
                unavailable[name] = str(err)
                stderr(f"{workload.model} {name}: unavailable: {err}")
        if "plain" not in rigs:  # the other workloads still run
            line = f"{workload.model}: not run: plain training fails: {unavailable.get('plain')}"
            print(line + "\n")
            return {"workload": workload, "unavailable": unavailable, "headlines": [line]}, [line]
        model = rigs["plain"].trainer.model
        n_params = sum(p.numel() for p in model.parameters())
        print(f"model:    {n_params / 1e3:.0f} k parameters, {n_layers(model)} layers")
        others = [rigs[n] for n in names if n in rigs and n != "plain"]
        pairs = paired_trials(
            rigs["plain"],
            others,
            pairs=args.pairs,
            steps=args.steps_per_trial,
            deadline=deadline,
            progress=stderr,
        )
        results.update(pair_results(pairs))
        for name, rig in rigs.items():
            rig.tool.close()
            if isinstance(rig.tool, GradflowTool):
                results[name]["self_reported_ms"] = rig.tool.self_reported()
                results[name]["kernel_backend"] = rig.tool.kernel_backend()
        rigs.clear()
    timing_s = time.monotonic() - started

    memory: dict[str, dict[str, Any]] = {}
    if not args.no_memory:
        for name in names:
            if name not in unavailable:
                stderr(f"memory: {workload.model} {name} ...")
                memory[name] = measure_memory(name, args, workload)
    print()
    headlines = report(names, results, unavailable, memory, workload)
    total_s = time.monotonic() - started
    print(f"took {timing_s:.0f} s timing + {total_s - timing_s:.0f} s memory")
    print()
    data = {
        "workload": workload,
        "parameters": n_params,
        "layers": n_layers(model),
        "results": results,
        "unavailable": unavailable,
        "memory": memory,
        "headlines": headlines,
    }
    return data, headlines


def side_by_side(names: list[str], measured: dict[str, dict[str, Any]]) -> None:
    """One row per model: plain s/step and each variant's median ratio (IQR)."""
    variants = [n for n in names if n != "plain"]
    rows = []
    for model, data in measured.items():
        if "results" not in data:
            continue
        row = [model, f"{data['parameters'] / 1e6:.2f} M", str(data["layers"])]
        row.append(f"{data['results']['plain']['seconds_per_step']['median']:.4f}")
        for name in variants:
            for key in ("ratio", "cpu_ratio"):
                q = data["results"].get(name, {}).get(key)
                row.append(f"{q['median']:.3f} ({q['q1']:.3f}-{q['q3']:.3f})" if q else "n/a")
        rows.append(row)
    print("side by side: median ratio to plain (IQR) per model, of wall time and of CPU time")
    columns = [f"{name}{kind}" for name in variants for kind in ("", " CPU")]
    print(format_table(["model", "params", "layers", "plain s/step", *columns], rows))
    print()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    set_threads(args)
    models = [m for m in args.model.split(",") if m]
    if args.memory_child:
        memory_child(args, workload_for(models[0], args))
        return
    names = ["plain", *(n for n in args.variants.split(",") if n and n != "plain")]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    env = environment()
    print_header("gradflow overhead: seconds per training step, paired against plain", env)
    print(
        f"method:   {args.pairs} pairs x {args.steps_per_trial} steps per trial, "
        f"{args.warmup} warm-up steps per variant, order alternating, medians of pair ratios"
    )
    if "param-every10" in names and args.steps_per_trial % 10:
        print("warning:  --steps-per-trial is not a multiple of 10: every=10 trials differ")
    print()
    measured: dict[str, dict[str, Any]] = {}
    headlines: list[str] = []
    for model in models:
        measured[model], lines = measure(workload_for(model, args), names, args)
        headlines += lines
    if len(models) > 1:
        side_by_side(names, measured)
    method = {
        "pairs": args.pairs,
        "steps_per_trial": args.steps_per_trial,
        "warmup": args.warmup,
        "memory_steps": args.memory_steps,
    }
    common = {
        "environment": env,
        "method": method,
        "variants": {n: VARIANTS[n].label for n in names},
    }
    if len(models) == 1:
        write_json(args.json, {**common, **measured[models[0]]})
    else:
        write_json(args.json, {**common, "models": measured, "headlines": headlines})
    for line in headlines:
        print(line)


if __name__ == "__main__":
    main()
