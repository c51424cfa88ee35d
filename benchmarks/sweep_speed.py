"""Speed of ``gradflow.sweep`` on hundreds of runs: first read, then from the summary cache.

Writes ``--runs`` synthetic run files (4 models x 4 learning rates x 4 weight decays x
5 seeds for 320; 22 layers, 4 epochs of 10 steps, parameter and output-gradient statistics) into a
temporary folder, then times, with an empty cache in that folder: the summaries (each run
opened, checked, reduced and cached), the page (structure, figures, HTML); then the same
sweep again in a new ``Sweep`` (summaries read from the cache). Prints the structure found,
the times and the page's size.
Run: ``python benchmarks/sweep_speed.py [--runs 320]``.
"""

from __future__ import annotations

import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from harness.env import environment, print_header, script_parser
from runfiles import fcn_layers, write_run

STEP_STATS = {"param": ["grad_norm", "update_abs_mean"], "grad_output": ["norm"]}


def write_runs(folder: Path, n: int) -> None:
    """``n`` runs: the 64 settings, each with ``n // 64`` seeds (and the rest of ``n``)."""
    seeds = range(-(-n // 64))
    grid = itertools.product(
        ("a", "b", "c", "d"), (1e-4, 3e-4, 1e-3, 3e-3), (0.0, 1e-5, 1e-4, 1e-3), seeds
    )
    for i, (model, lr, wd, seed) in enumerate(itertools.islice(grid, n)):
        write_run(
            folder / f"run{i:04d}.h5",
            epochs=4,
            steps_per_epoch=10,
            layers=fcn_layers(),
            compact=False,
            step_stats=STEP_STATS,
            seed=seed,
            config={"model": model, "optimizer": {"lr": lr, "weight_decay": wd}},
            loss_offset=lr * 100 + wd * 10 + 0.001 * seed,
        )


def main() -> None:
    parser = script_parser(__doc__, json_help=None)
    parser.add_argument("--runs", type=int, default=320, help="run files (default 320)")
    args = parser.parse_args()
    print_header("gradflow sweep: summaries and page of hundreds of runs", environment())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["GRADFLOW_CACHE_DIR"] = str(root / "cache")
        import gradflow

        t = time.perf_counter()
        (root / "runs").mkdir()
        write_runs(root / "runs", args.runs)
        print(f"wrote {args.runs} run files in {time.perf_counter() - t:.1f} s")
        sweep = gradflow.sweep(root / "runs")
        t = time.perf_counter()
        _ = sweep.summaries
        first = time.perf_counter() - t
        t = time.perf_counter()
        page = sweep.write_html(root / "sweep.html")
        drawn = time.perf_counter() - t
        print(sweep.structure.describe())
        print(f"first read: summaries {first:.1f} s ({first / args.runs * 1000:.0f} ms per run)")
        print(f"page: {drawn:.1f} s, {page.stat().st_size / 1e6:.1f} MB")
        t = time.perf_counter()
        again = gradflow.sweep(root / "runs")
        again.write_html(root / "again.html")
        print(f"again from the cache: summaries and page {time.perf_counter() - t:.1f} s")
        print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
