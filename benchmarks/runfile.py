"""Run-file size and write throughput for a 1000-layer model.

Part 1 streams synthetic statistics of ``--layers`` layers, every step statistic the
recorder writes (param, activation and grad_output probes: their real names from
:mod:`gradflow.statistics`), through :class:`gradflow.runfile.RunWriter` exactly as the
recorder's writer thread does: blocks of rows, each appended and committed. ``--blocks``
picks the rows per commit: 100 is the recorder's ``flush_every``; its ``flush_seconds=5``
commits fewer rows at a time when steps are slow (10 rows: 2 steps/s).
Values look like real ones (per-layer scales, log-normal step-to-step noise, counts that
are zero), generated outside the timed region. Reported: bytes per (layer x step x
statistic) against raw float32 (4 bytes), per statistic too, and values/s and MB/s.

Part 2 records ``--recorder-steps`` steps of a synthetic ``--layers``-deep MLP with a real
:class:`gradflow.Recorder` (all probes), for the end-to-end bytes per value and the
writer thread's own time per row.

    python benchmarks/runfile.py                  # 1000 layers x 2000 steps, ~1 min
    python benchmarks/runfile.py --steps 300 --recorder-steps 30   # a quick smoke test
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from harness.env import environment, print_header, script_parser
from harness.process import dataset_bytes
from harness.report import format_table, own_clock_line, write_json
from harness.timing import Rig, cpu_timer
from harness.tools import GradflowTool, Tool
from harness.workloads import MLPTrainer

from gradflow import statistics
from gradflow.names import DEFAULT_PROBES, EPOCH_STATS
from gradflow.runfile import Layer, RunWriter, StepRows

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
        self.names = [(p, s) for p in DEFAULT_PROBES for s in statistics.names(p)]
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


def stream_runwriter(path: Path, n_layers: int, n_steps: int, block: int) -> dict[str, Any]:
    stream = Stream(n_layers)
    writer = RunWriter.create(
        path,
        layers=layers(n_layers),
        step_stats={p: statistics.names(p) for p in DEFAULT_PROBES},
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
    sizes = dataset_bytes(path)
    stat_bytes = {k: v for k, v in sizes.items() if k.startswith("stats/")}
    file_bytes = path.stat().st_size
    return {
        "layers": n_layers,
        "steps": n_steps,
        "statistics": n_stats,
        "block": block,
        "values": values,
        "file_bytes": file_bytes,
        "dataset_bytes": sum(sizes.values()),
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
    plain = Rig("plain", mlp, Tool(mlp))
    plain.run(3)
    plain_s = cpu_timer(plain, n_steps)
    tool = GradflowTool(mlp, path, probes=DEFAULT_PROBES)
    recorded = Rig("recorded", mlp, tool)
    start = time.perf_counter()
    recorded.run(n_steps)
    tool.close()
    rec_s = (time.perf_counter() - start) / n_steps
    own = tool.self_reported() or {}
    n_stats = sum(len(statistics.names(p)) for p in DEFAULT_PROBES)
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


def print_stream(w: dict[str, Any], per_statistic: bool) -> None:
    print(
        f"RunWriter, {w['block']} rows per commit: file {w['file_bytes'] / 1e6:.1f} MB = "
        f"{w['bytes_per_value']:.2f} bytes/value ({w['bytes_per_value'] / RAW_BYTES:.2f}x raw "
        f"float32); datasets {w['dataset_bytes'] / 1e6:.1f} MB, so "
        f"{100 * (1 - w['dataset_bytes'] / w['file_bytes']):.0f} % of the file is space HDF5 "
        f"did not reuse; {w['values_per_s'] / 1e6:.2f} M values/s "
        f"({w['raw_mb_per_s']:.0f} MB/s of float32) in {w['seconds']:.1f} s"
    )
    if per_statistic:
        rows = [
            [name.removeprefix("stats/"), f"{b:.2f}", f"{b / RAW_BYTES:.2f}"]
            for name, b in w["per_statistic"].items()
        ]
        rows.append(["all statistics", f"{w['stats_bytes_per_value']:.2f}", ""])
        print(format_table(["dataset (stored chunks)", "bytes/value", "x raw float32"], rows))


def print_recorder(m: dict[str, Any]) -> None:
    print(
        f"Recorder, all probes, {m['layers']}-layer MLP (Linear 16x16), {m['steps']} steps: "
        f"file {m['file_bytes'] / 1e6:.2f} MB = {m['bytes_per_value']:.2f} bytes/value "
        f"({m['bytes_per_value'] / RAW_BYTES:.2f}x raw float32; layer table, epoch rows and "
        "scalars included)"
    )
    print(
        f"step {1e3 * m['plain_s_per_step']:.1f} ms plain, "
        f"{1e3 * m['recorded_s_per_step']:.1f} ms recorded (not paired: indicative only)"
    )
    own = m["self_reported_ms_per_row"]
    if own:
        print(own_clock_line("recorder", own))
    if m["writer_values_per_s"]:
        print(
            f"writer thread, host statistics only (HDF5 I/O is part 1): "
            f"{m['writer_values_per_s'] / 1e6:.2f} M values/s"
        )


def main() -> None:
    p = script_parser(__doc__)
    p.add_argument("--layers", type=int, default=1000)
    p.add_argument("--steps", type=int, default=2000, help="rows streamed through RunWriter")
    p.add_argument(
        "--blocks",
        default="100,10",
        help="rows per commit, comma-separated: 100 is the recorder's flush_every; its "
        "flush_seconds=5 commits fewer rows when steps are slow (default 100,10)",
    )
    p.add_argument("--recorder-steps", type=int, default=100, help="0 skips part 2")
    args = p.parse_args()
    env = environment()
    print_header("gradflow run file: size and write throughput", env)
    blocks = [int(b) for b in args.blocks.split(",")]
    n_stats = sum(len(statistics.names(p)) for p in DEFAULT_PROBES)
    print(
        f"part 1: {args.layers} layers x {n_stats} statistics x {args.steps} steps = "
        f"{args.layers * n_stats * args.steps / 1e6:.1f} M values through RunWriter"
    )
    streams = []
    m = None
    with tempfile.TemporaryDirectory(prefix="gradflow-runfile-") as tmp:
        for i, block in enumerate(blocks):
            path = Path(tmp) / f"stream{block}.h5"
            streams.append(stream_runwriter(path, args.layers, args.steps, block))
            path.unlink()
            print_stream(streams[-1], per_statistic=i == 0)
        print()
        if args.recorder_steps > 0:
            print("part 2:")
            m = record_mlp(Path(tmp) / "mlp.h5", args.layers, args.recorder_steps)
            print_recorder(m)
            print()
    w = streams[0]
    ratio = w["bytes_per_value"] / RAW_BYTES
    verdict = "PASS" if ratio <= GOAL else "FAIL"
    others = "; ".join(
        f"{s['bytes_per_value'] / RAW_BYTES:.2f}x with {s['block']}-row commits"
        for s in streams[1:]
    )
    headline = (
        f"run file: {w['layers']} layers x {w['statistics']} statistics x {w['steps']} steps, "
        f"{w['block']}-row commits: {w['bytes_per_value']:.2f} bytes/value = {ratio:.2f}x raw "
        f"float32 (goal <= {GOAL}x; datasets alone {w['stats_bytes_per_value'] / RAW_BYTES:.2f}x"
        f"{'; ' + others if others else ''}), RunWriter {w['values_per_s'] / 1e6:.1f} M values/s "
        f"({w['raw_mb_per_s']:.0f} MB/s float32): {verdict}"
    )
    write_json(
        args.json, {"environment": env, "runwriter": streams, "recorder": m, "headline": headline}
    )
    print(headline)


if __name__ == "__main__":
    main()
