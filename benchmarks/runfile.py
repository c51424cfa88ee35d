"""Run-file size and write throughput for a 1000-layer model.

Part 1 streams synthetic statistics of ``--layers`` layers, every step statistic the
recorder writes (param, activation and grad_output probes: their real names from
:mod:`gradflow.statistics`), through :class:`gradflow.store.RunWriter` exactly as the
recorder's writer thread does: blocks of ``--block`` rows, each appended and committed.
Values look like real ones (per-layer scales, log-normal step-to-step noise, counts that
are zero), generated outside the timed region. Reported: bytes per (layer x step x
statistic) against raw float32 (4 bytes), per statistic too, and values/s and MB/s.

Part 2 records ``--recorder-steps`` steps of a synthetic ``--layers``-deep MLP with a real
:class:`gradflow.Recorder` (all probes), for the end-to-end bytes per value and the
writer thread's own time per row.

    python benchmarks/runfile.py                  # 1000 layers x 2000 steps, ~1 min
    python benchmarks/runfile.py --steps 300 --recorder-steps 50   # a quick smoke test
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from common import (
    GradflowTool,
    MLPTrainer,
    Session,
    Tool,
    environment,
    format_table,
    print_header,
    write_json,
)

from gradflow import statistics
from gradflow.store import Layer, RunWriter, StepRows
from gradflow.writer import EPOCH_STATS, STEP_PROBES

RAW_BYTES = 4  # float32
GOAL = 1.2  # file bytes per value / raw float32 bytes per value
COUNTS = {("param", "grad_nonfinite"), ("activation", "nonfinite")}  # zero in healthy runs
NOISE = {"weight_norm": 0.001, "zero_fraction": 0.02, "mean": 0.1, "std": 0.05}


# -- part 1: RunWriter ----------------------------------------------------------------------------
def layers(n: int) -> list[Layer]:
    return [
        Layer(
            index=i,
            name=f"blocks.{i}.linear",
            kind="linear",
            type="Linear",
            depth=i,
            n_params=272,
            shape="16x16+16",
        )
        for i in range(n)
    ]


class Stream:
    """Deterministic, realistic-looking statistics, one block of rows at a time."""

    def __init__(self, n_layers: int, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.names = [(p, s) for p in STEP_PROBES for s in statistics.names(p)]
        depth = np.linspace(-1.0, 1.0, n_layers)
        self.scale = {
            key: (1e-3 * (0.05 + depth**2) * self.rng.lognormal(0, 1, n_layers))
            for key in self.names
        }

    def block(self, first: int, rows: int) -> StepRows:
        n_layers = len(next(iter(self.scale.values())))
        decay = 1.0 / np.sqrt(1.0 + np.arange(first, first + rows) / 1000.0)
        stats = {}
        for key in self.names:
            if key in COUNTS:
                stats[key] = np.zeros((rows, n_layers), np.float32)
                continue
            sigma = NOISE.get(key[1], 0.3)
            noise = self.rng.lognormal(0.0, sigma, (rows, n_layers))
            stats[key] = (self.scale[key] * decay[:, None] * noise).astype(np.float32)
        steps = np.arange(first, first + rows, dtype=np.int64)
        return StepRows(
            steps=steps,
            epoch=(steps // 1000).astype(np.int32),
            time=steps * 0.05,
            loss=self.rng.lognormal(-1, 0.1, rows).astype(np.float32),
            scale=np.full(rows, np.nan, np.float32),
            skipped=np.zeros(rows, np.uint8),
            overhead=self.rng.lognormal(-7, 0.2, (rows, 4)).astype(np.float32),
            stats=stats,
        )


def storage(path: Path) -> dict[str, int]:
    """Bytes each dataset occupies in the file (compressed chunks)."""
    sizes: dict[str, int] = {}
    with h5py.File(path, "r", swmr=True) as f:
        f.visititems(
            lambda name, obj: (
                sizes.__setitem__(name, obj.id.get_storage_size())
                if isinstance(obj, h5py.Dataset)
                else None
            )
        )
    return sizes


def stream_runwriter(path: Path, n_layers: int, n_steps: int, block: int) -> dict[str, Any]:
    stream = Stream(n_layers)
    writer = RunWriter.create(
        path,
        layers=layers(n_layers),
        step_stats={p: statistics.names(p) for p in STEP_PROBES},
        epoch_stats=list(EPOCH_STATS),
        config={"benchmark": "runfile"},
    )
    spent = 0.0
    for first in range(0, n_steps, block):
        rows = stream.block(first, min(block, n_steps - first))
        start = time.perf_counter()
        writer.append_steps(rows)
        writer.commit()
        spent += time.perf_counter() - start
    start = time.perf_counter()
    writer.close()
    spent += time.perf_counter() - start
    n_stats = len(stream.names)
    values = n_layers * n_steps * n_stats
    sizes = storage(path)
    stat_bytes = {k: v for k, v in sizes.items() if k.startswith("stats/")}
    file_bytes = path.stat().st_size
    return {
        "layers": n_layers,
        "steps": n_steps,
        "statistics": n_stats,
        "values": values,
        "file_bytes": file_bytes,
        "stats_bytes": sum(stat_bytes.values()),
        "bytes_per_value": file_bytes / values,
        "stats_bytes_per_value": sum(stat_bytes.values()) / values,
        "seconds": spent,
        "values_per_s": values / spent,
        "raw_mb_per_s": values * RAW_BYTES / spent / 1e6,
        "per_statistic": {k: v / (n_layers * n_steps) for k, v in sorted(stat_bytes.items())},
    }


# -- part 2: a Recorder on a deep MLP -------------------------------------------------------------
def record_mlp(path: Path, n_layers: int, n_steps: int) -> dict[str, Any]:
    mlp = MLPTrainer(n_layers)
    plain = Session("plain", mlp, Tool(mlp))
    plain.run(3)
    start = time.perf_counter()
    plain.run(n_steps)
    plain_s = (time.perf_counter() - start) / n_steps
    tool = GradflowTool(mlp, path, probes=STEP_PROBES)
    recorded = Session("recorded", mlp, tool)
    start = time.perf_counter()
    recorded.run(n_steps)
    tool.close()
    rec_s = (time.perf_counter() - start) / n_steps
    own = tool.self_reported() or {}
    n_stats = sum(len(statistics.names(p)) for p in STEP_PROBES)
    values = n_layers * n_steps * n_stats
    writer_ms = own.get("writer", float("nan"))
    return {
        "layers": n_layers,
        "steps": n_steps,
        "statistics": n_stats,
        "file_bytes": path.stat().st_size,
        "bytes_per_value": path.stat().st_size / values,
        "plain_s_per_step": plain_s,
        "recorded_s_per_step": rec_s,
        "self_reported_ms_per_row": own,
        "writer_values_per_s": n_layers * n_stats / (writer_ms / 1e3) if writer_ms else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=1000)
    p.add_argument("--steps", type=int, default=2000, help="rows streamed through RunWriter")
    p.add_argument("--block", type=int, default=100, help="rows per commit (recorder default)")
    p.add_argument("--recorder-steps", type=int, default=200, help="0 skips part 2")
    p.add_argument("--json", help="write all results to this JSON file")
    args = p.parse_args()
    env = environment()
    print_header("gradflow run file: size and write throughput", env)
    with tempfile.TemporaryDirectory(prefix="gradflow-runfile-") as tmp:
        w = stream_runwriter(Path(tmp) / "stream.h5", args.layers, args.steps, args.block)
        print(
            f"part 1: RunWriter, {w['layers']} layers x {w['statistics']} statistics x "
            f"{w['steps']} steps = {w['values'] / 1e6:.1f} M values, {args.block} rows per commit"
        )
        rows = [
            [name.removeprefix("stats/"), f"{b:.2f}", f"{b / RAW_BYTES:.2f}"]
            for name, b in w["per_statistic"].items()
        ]
        rows.append(["all statistics", f"{w['stats_bytes_per_value']:.2f}", ""])
        rows.append(["whole file", f"{w['bytes_per_value']:.2f}", ""])
        print(format_table(["dataset", "bytes/value", "x raw float32"], rows))
        print(
            f"file {w['file_bytes'] / 1e6:.1f} MB vs raw float32 "
            f"{w['values'] * RAW_BYTES / 1e6:.1f} MB; written in {w['seconds']:.2f} s: "
            f"{w['values_per_s'] / 1e6:.1f} M values/s, {w['raw_mb_per_s']:.0f} MB/s of float32"
        )
        print()
        m = None
        if args.recorder_steps > 0:
            m = record_mlp(Path(tmp) / "mlp.h5", args.layers, args.recorder_steps)
            own = m["self_reported_ms_per_row"]
            print(
                f"part 2: Recorder, all probes, {m['layers']}-layer MLP (Linear 16x16), "
                f"{m['steps']} steps"
            )
            print(
                f"file {m['file_bytes'] / 1e6:.2f} MB = {m['bytes_per_value']:.2f} bytes/value "
                f"({m['bytes_per_value'] / RAW_BYTES:.2f}x raw float32, epoch stats, "
                "scalars and layer table included)"
            )
            print(
                f"step {1e3 * m['plain_s_per_step']:.1f} ms plain, "
                f"{1e3 * m['recorded_s_per_step']:.1f} ms recorded (not paired: indicative)"
            )
            if own:
                parts = ", ".join(f"{k} {v:.2f}" for k, v in own.items())
                print(f"the recorder's own timing per row (ms): {parts}")
            if m["writer_values_per_s"]:
                print(f"writer thread: {m['writer_values_per_s'] / 1e6:.2f} M values/s")
            print()
    ratio = w["bytes_per_value"] / RAW_BYTES
    verdict = "PASS" if ratio <= GOAL else "FAIL"
    headline = (
        f"run file: {w['layers']} layers x {w['statistics']} statistics x {w['steps']} steps: "
        f"{w['bytes_per_value']:.2f} bytes/value = {ratio:.2f}x raw float32 (goal <= {GOAL}x), "
        f"RunWriter {w['values_per_s'] / 1e6:.1f} M values/s "
        f"({w['raw_mb_per_s']:.0f} MB/s float32): {verdict}"
    )
    write_json(args.json, {"environment": env, "runwriter": w, "recorder": m, "headline": headline})
    print(headline)


if __name__ == "__main__":
    main()
