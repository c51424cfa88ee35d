"""The memory-traffic floor of the parameter statistics on paper-resunet, and how close the
recorder comes to it.

One recorded step's parameter statistics read the gradients (sums of squares), read the
weights and write them into the snapshot before the optimizer step (``take``), and read the
snapshot, the weights and the gradients after it (``delta``, whose sum of grad * update
gives ``param/grad_update_cos``): five reads and one write of N float32. This script
measures, on this machine:

1. bandwidth: a read, a write and a copy of a float32 tensor as large as all of
   paper-resunet's parameters, by torch (``torch.sum``, ``fill_``, ``copy_``), best of
   ``--repeats``;
2. the floor: those bytes at the measured read and write speeds;
3. the recorder's own clock: ``Recorder(model, opt, path, probes="param")`` on real training
   steps (crop 64, batch 2), the median ``stats`` seconds per recorded step of the run file's
   ``overhead`` columns, and gradflow's parameter kernels (``squares``, ``copy_squares``,
   ``delta`` of :func:`gradflow.kernels.cpu.param_kernels`, what the recorder calls) timed
   one by one.

    python benchmarks/floor.py                         # < 1 min on a quiet 2-core machine
    python benchmarks/floor.py --repeats 5 --steps 6   # quick
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from harness.env import environment, print_header, script_parser
from harness.report import format_table, summarize, write_json
from harness.timing import interleaved_best
from harness.tools import GradflowTool
from harness.workloads import Trainer, Workload

from gradflow.kernels.cpu import param_kernels

MB = 1e6
# Written before every timed call, so that data comes from memory (interleaved_best).
EVICT_MB = 128


def best_ms(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """:func:`interleaved_best` in ms, each call after writing ``EVICT_MB`` elsewhere."""
    return {k: 1e3 * v for k, v in interleaved_best(fns, repeats, evict_mb=EVICT_MB).items()}


# -- 1 and 2: bandwidth and the floor -------------------------------------------------------------
PASSES = {
    "read": "torch.sum(src)",
    "write": "dst.fill_(1.0)",
    "copy": "dst.copy_(src), read + write",
}


def bandwidth(n: int, repeats: int) -> dict[str, float]:
    """ms and GB/s of a read, a write and a copy of ``n`` float32 by torch operations
    (copy: bytes read + written), best of ``repeats``: ``read_ms``, ``read_gbs``, ..."""
    src = torch.randn(n)
    dst = torch.empty(n)
    dst.copy_(src)
    ms = best_ms(
        {
            "read": lambda: torch.sum(src),
            "write": lambda: dst.fill_(1.0),
            "copy": lambda: dst.copy_(src),
        },
        repeats,
    )
    out: dict[str, float] = {}
    for kind, t in ms.items():
        out[f"{kind}_ms"] = t
        out[f"{kind}_gbs"] = (2 if kind == "copy" else 1) * 4 * n / t / MB
    return out


def floor(n: int, bw: dict[str, float], reads: int, writes: int) -> dict[str, float]:
    """ms to read ``reads`` and write ``writes`` times ``n`` float32 at the measured speeds."""
    read_b, write_b = 4 * n * reads, 4 * n * writes
    return {
        "read_mb": read_b / MB,
        "write_mb": write_b / MB,
        "ms": read_b / bw["read_gbs"] / MB + write_b / bw["write_gbs"] / MB,
    }


# -- 3: the recorder's clock and the kernels ------------------------------------------------------
def recorder_clock(workload: Workload, steps: int, warmup: int) -> dict[str, Any]:
    """Record ``warmup + steps`` training steps with parameter statistics; the run file's
    overhead columns (ms per recorded step) of the last ``steps`` steps."""
    trainer = Trainer(workload)
    with tempfile.TemporaryDirectory(prefix="gradflow-floor-") as tmp:
        path = Path(tmp) / "run.h5"
        tool = GradflowTool(trainer, path, every=None, probes=("param",))
        step_s = []
        for _ in range(warmup + steps):
            start = time.perf_counter()
            trainer.step(tool)
            step_s.append(time.perf_counter() - start)
        tool.close()
        with h5py.File(path, "r") as f:
            columns = [str(c) for c in f["overhead"].attrs["columns"]]
            rows = np.asarray(f["overhead"][warmup:], dtype=np.float64)
            backend = f.attrs.get("kernel_backend")
    out: dict[str, Any] = {
        f"{c}_ms": 1e3 * summarize(rows[:, i]).median for i, c in enumerate(columns)
    }
    out["stats_ms_all"] = [round(1e3 * v, 3) for v in rows[:, columns.index("stats")]]
    out["step_ms"] = 1e3 * summarize(step_s[warmup:]).median
    out["kernel_backend"] = None if backend is None else str(backend)
    out["steps"] = len(rows)
    return out


# Streams of N float32 each of gradflow's parameter passes reads and writes.
STREAMS = {"grad squares": (1, 0), "take (copy_squares)": (1, 1), "delta": (3, 0)}


def gradflow_passes(params: Sequence[torch.Tensor]) -> dict[str, Callable[[], Any]] | None:
    """gradflow's three parameter passes, as the recorder calls them, over tensors shaped like
    ``params`` (own copies), or None where this process has no C kernels."""
    kernels = param_kernels([p.numel() for p in params])
    if kernels is None:
        return None
    weights = [p.detach().clone().contiguous() for p in params]
    grads = [torch.randn_like(w) for w in weights]
    flat = torch.empty(sum(w.numel() for w in weights))
    views = list(flat.split([w.numel() for w in weights]))
    return {
        "grad squares": lambda: kernels.squares(grads),
        "take (copy_squares)": lambda: kernels.copy_squares(weights, views),
        "delta": lambda: kernels.delta(views, weights, grads),
    }


# -- the report -----------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = script_parser(__doc__)
    p.add_argument("--model", default="paper-resunet")
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=30, help="repeats per microbenchmark")
    p.add_argument("--steps", type=int, default=20, help="recorded steps that are measured")
    p.add_argument("--warmup", type=int, default=3, help="recorded steps not measured first")
    return p.parse_args(argv)


def print_kernels(kernels: dict[str, float], n: int, bw: dict[str, float], today: float) -> None:
    """gradflow's parameter kernels, each against the floor of the streams it moves."""
    rows = []
    for name, ms in kernels.items():
        r, w = STREAMS[name]
        pass_floor = floor(n, bw, r, w)["ms"]
        moved = 4 * n * (r + w) / MB
        rows.append(
            [
                name,
                f"{ms:.2f}",
                f"{moved:.0f}",
                f"{moved / ms:.1f}",
                f"{pass_floor:.2f}",
                f"{ms / pass_floor:.2f}x",
            ]
        )
    total = sum(kernels.values())
    rows.append(
        ["sum of the three", f"{total:.2f}", "", "", f"{today:.2f}", f"{total / today:.2f}x"]
    )
    headers = ["kernel", "ms", "MB moved", "GB/s", "floor ms", "/ floor"]
    print("   " + format_table(headers, rows).replace("\n", "\n   "))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    workload = Workload(model=args.model, crop=args.crop, batch=args.batch)
    env = environment()
    print_header("gradflow parameter statistics: the memory-traffic floor", env)
    import gradflow

    print(f"command {' '.join(sys.argv)}")
    print(f"gradflow {gradflow.__file__}")
    params = [p for p in Trainer(workload).model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    print(
        f"model   {workload.model}: {n / 1e6:.2f} M parameters in {len(params)} tensors, "
        f"{4 * n / MB:.1f} MB of float32"
    )
    print()

    bw = bandwidth(n, args.repeats)
    today = floor(n, bw, reads=5, writes=1)
    print(
        f"1. bandwidth, {4 * n / MB:.1f} MB float32, best of {args.repeats}, interleaved, "
        f"{torch.get_num_threads()} threads, each call after writing {EVICT_MB} MB elsewhere"
    )
    rows = [
        [f"{kind}: {what}", f"{bw[kind + '_ms']:.2f}", f"{bw[kind + '_gbs']:.1f}"]
        for kind, what in PASSES.items()
    ]
    print(format_table(["pass", "ms", "GB/s"], rows))
    print()
    print(
        "2. the floor of one recorded step's parameter statistics: read the gradients, "
        "read W + write the snapshot (take), read the snapshot, W and the gradients (delta)"
    )
    print(
        f"   {today['read_mb']:.0f} MB read + {today['write_mb']:.0f} MB written "
        f"= {today['ms']:.2f} ms at the measured read and write speeds"
    )
    today["take_as_copy_ms"] = floor(n, bw, reads=4, writes=0)["ms"] + 8 * n / bw["copy_gbs"] / MB
    print(f"   (with take at the copy speed instead: {today['take_as_copy_ms']:.2f} ms)")
    print()

    clock = recorder_clock(workload, args.steps, args.warmup)
    passes = gradflow_passes(params)
    kernels = best_ms(passes, args.repeats) if passes else None
    print(
        f"3. the recorder's own clock, {workload.describe()}, probes='param', "
        f"{clock['steps']} recorded steps after {args.warmup}, "
        f"{clock['kernel_backend']} kernels"
    )
    print(
        f"   per recorded step (median ms): stats {clock['stats_ms']:.2f}, hooks "
        f"{clock['hooks_ms']:.2f}, copy {clock['copy_ms']:.2f}, writer "
        f"{clock['writer_ms']:.2f}; training step with recording {clock['step_ms']:.0f}"
    )
    print(
        f"   stats / floor = {clock['stats_ms']:.2f} / {today['ms']:.2f} = "
        f"{clock['stats_ms'] / today['ms']:.2f}x"
    )
    if kernels is None:
        print("   gradflow's parameter kernels: unavailable (no C kernels in this process)")
    else:
        print(
            "   gradflow's parameter kernels alone, through gradflow.kernels.cpu.param_kernels "
            f"(best of {args.repeats}, interleaved):"
        )
        print_kernels(kernels, n, bw, today["ms"])
    print()
    write_json(
        args.json,
        {
            "environment": env,
            "workload": workload,
            "parameters": n,
            "bandwidth": bw,
            "floor": today,
            "recorder": clock,
            "kernels_ms": kernels,
        },
    )


if __name__ == "__main__":
    main()
