"""gradflow on one CUDA GPU: per-step overhead and host synchronisations, in one unattended run.

For each model (default ``paper-resunet`` and ``fig3b-long-9``, batch 4 x 256x256):

1. host syncs: runs a few steps of plain training, of a recorder that records no step
   (``every=1000``), and of recorders recording every step (param probe; all probes) under
   ``torch.cuda.set_sync_debug_mode("warn")``, counting the synchronising-operation
   warnings per step and the thread they came from (the writer thread may wait for its
   copies; the training thread must not), plus the CUDA runtime calls that block
   (``cudaStreamSynchronize``, ``cudaMemcpy``...) seen by the profiler;
2. overhead: plain vs param statistics every step vs all probes every step, timed with
   CUDA events over ``--steps-per-trial`` steps, interleaved and paired as in
   ``overhead.py`` (median and spread of per-pair ratios), wall-clock ratios too;
3. peak GPU memory per variant.

Everything is printed, and written as JSON to ``$OUT/gpu_bench.json`` (or ``--json``)
after each stage, so a run cut short still leaves its results. A stage that fails prints
why and the run goes on. ``--budget-s`` (default 420) caps the whole run: timing stops
adding pairs when a model's share of it is spent.

    PYTHONPATH=. python benchmarks/gpu.py                      # on the GPU machine, < 8 min
    python benchmarks/gpu.py --device cpu --quick              # a dry run of every code path
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from harness.env import add_trial_options, environment, print_header, script_parser, stderr
from harness.report import format_table, own_clock_line, ratio_headline, ratio_rows, write_json
from harness.timing import CudaTimer, Rig, build_rig, cpu_timer, pair_results, paired_trials
from harness.tools import Tool, Variant, interleaved, recorder_variant
from harness.workloads import Workload

from gradflow.names import DEFAULT_PROBES

DEFAULT_MODELS = "paper-resunet:256:4,fig3b-long-9:256:4"
FULL: dict[str, Any] = {"models": DEFAULT_MODELS, "pairs": 20, "steps_per_trial": 10}
FULL |= {"warmup": 5, "sync_steps": 5}
QUICK: dict[str, Any] = {
    "models": "paper-resunet:64:2,fig3b-long-9:32:2",
    "pairs": 2,
    "steps_per_trial": 2,
}
QUICK |= {"warmup": 1, "sync_steps": 2}
RATIO_GOAL = 1.01
# CUDA runtime calls that block the calling host thread (cudaMemcpy* to pageable memory
# too) or that show a copy; counted from the profiler's trace.
BLOCKING_CALLS = (
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "cudaEventSynchronize",
    "cudaMemcpy",
    "cudaMemcpyAsync",
    "cudaHostAlloc",
)


VARIANTS = {
    v.name: v
    for v in (
        Variant("plain", "plain training", lambda t, d: Tool(t)),
        recorder_variant(
            "unrecorded", "recorder attached, no step recorded (every=1000)", 1000, ("param",)
        ),
        recorder_variant("param", "gradflow parameter statistics every step", 1, ("param",)),
        recorder_variant("all", "gradflow all probes every step", 1, DEFAULT_PROBES),
        recorder_variant(
            "all-torch", "all probes, torch reductions (no fused kernel)", 1, DEFAULT_PROBES
        ),
    )
}
# The variants timed against plain training.
TIMED = ("param", "all", "all-torch")


class TorchReductions(Rig):
    """Steps with the accelerator path's torch reductions of layer outputs instead of the
    fused Triton kernel (:mod:`gradflow.kernels.triton`): the kernel's own effect, side by side."""

    def run(self, steps: int) -> None:
        with mock.patch("gradflow.kernels.device.reducer", lambda device: None):
            super().run(steps)


# -- timing ---------------------------------------------------------------------------------------
def time_variants(
    rigs: dict[str, Rig], args: argparse.Namespace, deadline: float
) -> dict[str, Any]:
    cuda = args.device.startswith("cuda")
    timer: Any = CudaTimer() if cuda else cpu_timer
    others = [rigs[n] for n in TIMED if n in rigs]
    pairs = paired_trials(
        rigs["plain"],
        others,
        pairs=args.pairs,
        steps=args.steps_per_trial,
        timer=timer,
        deadline=deadline,
        progress=stderr,
    )
    return {"timer": "cuda events" if cuda else "wall clock (no CUDA)", **pair_results(pairs)}


def peak_memory(rigs: dict[str, Rig], steps: int) -> dict[str, float]:
    """Peak GPU memory (MB) while each variant runs ``steps`` steps (all rigs resident)."""
    peaks = {}
    for name, rig in rigs.items():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        rig.run(steps)
        rig.tool.settle()
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() / 2**20
    return peaks


# -- host synchronisations ------------------------------------------------------------------------
@contextlib.contextmanager
def sync_warnings() -> Iterator[list[tuple[str, str]]]:
    """Record ``(thread name, first line)`` of every warning while CUDA sync debug mode warns."""
    records: list[tuple[str, str]] = []
    lock = threading.Lock()

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: Any = None,
        line: str | None = None,
    ) -> None:
        with lock:
            text = str(message).strip().splitlines()
            records.append((threading.current_thread().name, text[0] if text else ""))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield records
        finally:
            torch.cuda.set_sync_debug_mode("default")


def count_syncs(rig: Rig, steps: int) -> dict[str, Any]:
    """Synchronising operations per step: sync debug mode warnings (by thread) and the
    profiler's blocking CUDA runtime calls (training thread and others)."""
    out: dict[str, Any] = {"steps": steps}
    main = threading.current_thread().name
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        with sync_warnings() as records:
            rig.run(steps)
            rig.tool.settle()
            time.sleep(0.05)  # let the writer thread finish its last item
        # The text of torch's warn_or_error_on_sync(); the one-time "debug mode is a
        # prototype" notice is not a sync.
        syncs = [(t, m) for t, m in records if "called a synchronizing" in m.lower()]
        out["debug_mode"] = {
            "training_thread_per_step": sum(t == main for t, _ in syncs) / steps,
            "other_threads_per_step": sum(t != main for t, _ in syncs) / steps,
            "messages": sorted({f"[{t}] {m}" for t, m in syncs})[:10],
        }
    else:
        out["debug_mode"] = "skipped: torch.cuda.set_sync_debug_mode needs CUDA"
    try:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
        main_tid = threading.get_native_id()
        with profile(activities=activities) as prof:
            rig.run(steps)
            rig.tool.settle()
        events = [e for e in prof.events() if e.name in BLOCKING_CALLS]
        # Label threads only when the profiler's thread ids are the OS ones we know.
        known = any(getattr(e, "thread", None) == main_tid for e in prof.events())
        counts: collections.Counter[str] = collections.Counter()
        origins: collections.Counter[str] = collections.Counter()
        for event in events:
            origins[f"{event.name} in {_origin(event)}"] += 1
            if not known:
                where = "any"
            elif getattr(event, "thread", None) == main_tid:
                where = "training"
            else:
                where = "other"
            counts[f"{event.name} ({where} thread)"] += 1
        out["profiler_per_step"] = {k: v / steps for k, v in sorted(counts.items())}
        out["profiler_origins_per_step"] = {k: v / steps for k, v in origins.most_common(6)}
    except Exception as err:
        out["profiler_per_step"] = f"failed: {type(err).__name__}: {err}"
    return out


def phase_state(rig: Rig) -> str:
    """How the recorder's parameter-statistics phases run: replayed CUDA graphs or eager."""
    probe = getattr(getattr(rig.tool, "recorder", None), "_param_probe", None)
    phases = getattr(getattr(probe, "snapshot", None), "_phases", {})
    states = []
    for name, phase in phases.items():
        graph, failed = getattr(phase, "graph", None), getattr(phase, "failed", False)
        states.append(
            f"{name} " + ("replayed" if graph else "eager, capture failed" if failed else "eager")
        )
    return ", ".join(states) or "n/a"


def _origin(event: Any) -> str:
    """The operators a profiled runtime call was made from, innermost first."""
    names: list[str] = []
    parent = getattr(event, "cpu_parent", None)
    while parent is not None and len(names) < 3:
        names.append(parent.name)
        parent = getattr(parent, "cpu_parent", None)
    return " < ".join(names) or "no operator"


def non_blocking_copy_pinned(device: str) -> bool | str:
    """The recorder's one copy per recorded step is ``.to("cpu", non_blocking=True)``; into
    pageable memory the host would wait for it. Is its result pinned?"""
    if not torch.cuda.is_available():
        return "n/a (no CUDA)"
    try:
        host = torch.ones(16, device=device).to("cpu", non_blocking=True)
        torch.cuda.synchronize()
        return bool(host.is_pinned())
    except Exception as err:
        return f"failed: {type(err).__name__}: {err}"


def profile_steps(rigs: dict[str, Rig], steps: int) -> dict[str, Any]:
    """Where a step's time goes: the profiler's CPU and GPU totals per step for every
    variant, and for the recorders the top Python functions (cProfile) by own time."""
    import cProfile
    import io
    import pstats

    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    out: dict[str, Any] = {}
    for name, rig in rigs.items():
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        sync()
        t0 = time.perf_counter()
        with profile(activities=activities) as prof:
            rig.run(steps)
            sync()
        wall = (time.perf_counter() - t0) / steps
        averages = prof.key_averages()
        # Kernels (and copies) are their own entries on the device; the host-side ops that
        # launched them carry the same time as "self device time": sum only the former.
        on_device = [e for e in averages if e.device_type == DeviceType.CUDA]
        host_ops = [e for e in averages if e.device_type != DeviceType.CUDA]
        device_ms = sum(_device_us(e) for e in on_device) / 1e3 / steps

        def top(events: list[Any], key: Callable[[Any], float], n: int = 6) -> dict[str, float]:
            ranked = sorted(events, key=key, reverse=True)[:n]
            return {e.key[:60]: key(e) / 1e3 / steps for e in ranked if key(e) > 0}

        out[name] = {
            "wall_ms_per_step_profiled": 1e3 * wall,
            "gpu_kernel_ms_per_step": device_ms,
            "top_self_cpu_ms_per_step": top(host_ops, lambda e: e.self_cpu_time_total),
            "top_ops_by_gpu_ms_per_step": top(host_ops, _device_us),
            "top_kernels_ms_per_step": top(on_device, _device_us),
            "kernel_launches_per_step": sum(e.count for e in on_device) / steps,
        }
        r = out[name]
        print(
            f"profile {name}: {r['wall_ms_per_step_profiled']:.1f} ms/step under the profiler; "
            f"GPU kernels {device_ms:.1f} ms/step in {r['kernel_launches_per_step']:.0f} launches"
        )
        for title, key in (
            ("top self CPU", "top_self_cpu_ms_per_step"),
            ("ops by GPU time", "top_ops_by_gpu_ms_per_step"),
            ("top kernels", "top_kernels_ms_per_step"),
        ):
            if r[key]:
                parts = ", ".join(f"{k} {v:.2f}" for k, v in r[key].items())
                print(f"  {title} (ms/step): {parts}")
        if name in ("param", "all"):
            prof_py = cProfile.Profile()
            prof_py.enable()
            rig.run(steps)
            rig.tool.settle()
            sync()
            prof_py.disable()
            text = io.StringIO()
            pstats.Stats(prof_py, stream=text).sort_stats("tottime").print_stats(14)
            lines = [ln for ln in text.getvalue().splitlines() if ln.strip()]
            out[name]["cprofile_tottime"] = lines
            print(f"cProfile of {steps} {name} steps, by own time:")
            print("\n".join(lines[-16:]))
    return out


def _device_us(event: Any) -> float:
    value = getattr(event, "self_device_time_total", None)
    if value is None:  # older torch
        value = getattr(event, "self_cuda_time_total", 0.0)
    return float(value or 0.0)


# -- one model ------------------------------------------------------------------------------------
def run_model(
    workload: Workload, args: argparse.Namespace, tmp: Path, deadline: float, report: dict
) -> None:
    result: dict[str, Any] = {"workload": workload, "errors": {}}
    report["models"][workload.model] = result
    print(f"== {workload.describe()}")
    rigs: dict[str, Rig] = {}
    table = VARIANTS
    folder = tmp / workload.model
    folder.mkdir(exist_ok=True)
    for name in ("plain", *args.variants, "unrecorded"):
        try:
            kind = TorchReductions if name == "all-torch" else Rig
            # A round runs a trial of each variant and one of plain training per variant.
            with interleaved(2 * (len(args.variants) + 1)):
                rigs[name] = build_rig(table[name], workload, folder, args.warmup, kind)
        except Exception as err:
            result["errors"][name] = f"{type(err).__name__}: {err}"
            print(f"could not build {name}: {type(err).__name__}: {err}")
            if args.verbose:
                traceback.print_exc()
    if "plain" not in rigs:
        return
    result["n_params"] = sum(p.numel() for p in rigs["plain"].trainer.model.parameters())

    syncs: dict[str, Any] = {}
    for name in ("plain", "unrecorded", "param", "all"):
        if name in rigs:
            try:
                syncs[name] = count_syncs(rigs[name], args.sync_steps)
            except Exception as err:
                syncs[name] = f"failed: {type(err).__name__}: {err}"
    result["syncs"] = syncs
    print_syncs(syncs)
    if "param" in rigs:
        result["param_phases"] = phase_state(rigs["param"])
        print(f"parameter statistics phases (CUDA graphs): {result['param_phases']}")
    unrecorded = rigs.pop("unrecorded", None)
    if unrecorded is not None:
        unrecorded.tool.close()
    write_json(args.json, report)

    if args.profile:
        try:
            result["profile"] = profile_steps(rigs, args.sync_steps)
        except Exception as err:
            result["errors"]["profile"] = f"{type(err).__name__}: {err}"
            print(f"profiling failed: {type(err).__name__}: {err}")
        write_json(args.json, report)

    if args.pairs > 0:
        try:
            result["timing"] = time_variants(rigs, args, deadline)
            print_timing(result["timing"], table)
        except Exception as err:
            result["errors"]["timing"] = f"{type(err).__name__}: {err}"
            print(f"timing failed: {type(err).__name__}: {err}")
            traceback.print_exc()
        write_json(args.json, report)

    if torch.cuda.is_available():
        try:
            peaks = peak_memory(rigs, 2)
            result["peak_gpu_mb"] = peaks
            print(
                "peak GPU memory (MB, all variants' models resident): "
                + ", ".join(f"{n} {v:.0f} ({v - peaks['plain']:+.0f})" for n, v in peaks.items())
            )
        except Exception as err:
            result["errors"]["memory"] = f"{type(err).__name__}: {err}"
    for rig in rigs.values():
        try:
            rig.tool.close()
        except Exception as err:
            result["errors"][f"close {rig.name}"] = f"{type(err).__name__}: {err}"
            print(f"closing {rig.name} failed: {err}")
        own = getattr(rig.tool, "self_reported", lambda: None)()
        if own:
            result.setdefault("self_reported_ms", {})[rig.name] = own
            print(own_clock_line(rig.name, own))
    rigs.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    print()


def print_syncs(syncs: dict[str, Any]) -> None:
    rows = []
    for name, s in syncs.items():
        if isinstance(s, str):
            rows.append([name, s])
            continue
        dm = s["debug_mode"]
        prof = s["profiler_per_step"]
        prof_s = (
            ", ".join(f"{k} {v:g}" for k, v in prof.items()) or "none"
            if isinstance(prof, dict)
            else prof
        )
        if isinstance(dm, dict):
            rows.append(
                [
                    name,
                    f"{dm['training_thread_per_step']:g}",
                    f"{dm['other_threads_per_step']:g}",
                    prof_s,
                ]
            )
        else:
            rows.append([name, "-", "-", f"{dm}; profiler: {prof_s}"])
    print("host synchronisations per step (sync debug mode warnings; profiler calls)")
    print(format_table(["variant", "training thread", "other threads", "profiler, per step"], rows))
    for name, s in syncs.items():
        if isinstance(s, dict) and isinstance(s["debug_mode"], dict):
            for message in s["debug_mode"]["messages"]:
                print(f"  {name}: {message}")
    for name, s in syncs.items():
        origins = s.get("profiler_origins_per_step") if isinstance(s, dict) else None
        if origins:
            print(f"  {name}, from: " + "; ".join(f"{k} {v:g}" for k, v in origins.items()))


def print_timing(timing: dict[str, Any], table: dict[str, Variant]) -> None:
    first = ratio_rows(("plain", *TIMED), timing, ms=True, digits=4)
    rows = []
    for name, cells in first.items():
        wall = timing[name].get("wall_ratio")
        rows.append([*cells, f"{wall['median']:.4f}" if wall else "-", table[name].label])
    print(f"step time ({timing['timer']}), ratio = median of per-pair ratios to plain")
    headers = ["variant", "ms/step", "ratio", "ratio IQR", "ratio min-max", "wall ratio", "what"]
    print(format_table(headers, rows))


def headlines(report: dict[str, Any], device: str) -> list[str]:
    lines = []
    labels = {
        "param": "parameter statistics every step",
        "all": "all probes every step",
        "all-torch": "all probes every step, torch reductions",
    }
    for model, result in report["models"].items():
        w = result["workload"]
        where = f"{model}, batch {w.batch} x {w.crop}x{w.crop}, {device}"
        timing = result.get("timing", {})
        for name, label in labels.items():
            ratio = timing.get(name, {}).get("ratio")
            goal = f", goal <= {RATIO_GOAL}" if name == "param" else ""
            why = result["errors"].get(name) or result["errors"].get("timing") or "not run"
            lines.append(ratio_headline(ratio, f"gradflow {label}, {where}{goal}", why))
        syncs = result.get("syncs", {})
        parts = []
        for name in ("plain", "unrecorded", "param", "all"):
            s = syncs.get(name)
            if isinstance(s, dict) and isinstance(s["debug_mode"], dict):
                parts.append(f"{name} {s['debug_mode']['training_thread_per_step']:g}")
            else:
                parts.append(f"{name} n/a")
        lines.append(
            f"host syncs per step on the training thread [{model}]: {', '.join(parts)} "
            "(goal: 0 for an unrecorded step)"
        )
    return lines


def parse_args() -> argparse.Namespace:
    p = script_parser(__doc__, "default: $OUT/gpu_bench.json when OUT is set")
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny settings to test the script")
    p.add_argument(
        "--models", help="comma-separated model:crop:batch (default: " + DEFAULT_MODELS + ")"
    )
    # --pairs 0 skips timing.
    add_trial_options(
        p, pairs=FULL["pairs"], steps=FULL["steps_per_trial"], warmup=FULL["warmup"], fill=False
    )
    p.add_argument("--sync-steps", type=int, help="steps per sync count or profile (default 5)")
    p.add_argument("--budget-s", type=float, default=420.0, help="whole run, seconds")
    p.add_argument(
        "--variants",
        default=",".join(TIMED),
        help=f"comma-separated subset of {','.join(TIMED)} to time against plain (default: all)",
    )
    p.add_argument("--profile", action="store_true", help="also profile a few steps")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args()
    defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.json is None and os.environ.get("OUT"):
        args.json = str(Path(os.environ["OUT"]) / "gpu_bench.json")
    args.variants = tuple(v for v in args.variants.split(",") if v)
    unknown = set(args.variants) - set(TIMED)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {','.join(TIMED)}")
    return args


def main() -> None:
    started = time.monotonic()
    args = parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"CUDA is not available (torch {torch.__version__}); try --device cpu --quick")
        sys.exit(1)
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    env = environment(args.device)
    print_header("gradflow on a GPU: overhead per step and host synchronisations", env)
    print(
        f"method: {args.pairs} pairs x {args.steps_per_trial} steps per trial, {args.warmup} "
        f"warm-up steps, order alternating; syncs over {args.sync_steps} steps; "
        f"budget {args.budget_s:.0f} s\n"
    )
    report: dict[str, Any] = {"environment": env, "args": vars(args), "models": {}}
    report["non_blocking_copy_pinned"] = non_blocking_copy_pinned(args.device)
    print(
        "a non_blocking device-to-host copy lands in pinned memory (a truly asynchronous "
        f"copy): {report['non_blocking_copy_pinned']}\n"
    )
    specs = [spec.split(":") for spec in args.models.split(",") if spec]
    with tempfile.TemporaryDirectory(prefix="gradflow-gpu-") as tmp:
        for i, (model, crop, batch) in enumerate(specs):
            left = args.budget_s - (time.monotonic() - started)
            share = left / (len(specs) - i)
            deadline = time.monotonic() + share - 30  # keep time for memory and close
            workload = Workload(model=model, crop=int(crop), batch=int(batch), device=args.device)
            try:
                run_model(workload, args, Path(tmp), deadline, report)
            except Exception as err:
                print(f"{model} failed: {type(err).__name__}: {err}")
                traceback.print_exc()
                report["models"].setdefault(model, {"workload": workload, "errors": {}})["errors"][
                    "run"
                ] = f"{type(err).__name__}: {err}"
    lines = headlines(report, args.device)
    report["headlines"] = lines
    report["seconds"] = time.monotonic() - started
    write_json(args.json, report)
    print(f"took {report['seconds']:.0f} s\n")
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
