"""How fast heat maps render from large run files (layers x recorded steps).

Writes synthetic runs of 100 x 1 000, 1 000 x 10 000 and 1 000 x 100 000 into a temporary
directory and times ``updates-heatmap`` (step mode) and ``gradient-heatmap`` from
``open_run`` to the written PNG, best of ``--repeat``. Run: ``python benchmarks/plot_speed.py``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from harness.env import environment, print_header, script_parser
from runfiles import SyntheticRun, conv_stack

from gradflow.plots import TimeWindow, save
from gradflow.runfile import open_run

SIZES = ((100, 1_000), (1_000, 10_000), (1_000, 100_000))
FIGURES = {
    "updates-heatmap": {"window": TimeWindow("step")},
    "gradient-heatmap": {},
}
LIMIT_S = 5.0


def write(path: Path, n_layers: int, n_steps: int) -> float:
    """Write a run of ``n_steps`` rows in large blocks; returns seconds taken."""
    start = time.perf_counter()
    with SyntheticRun(
        path,
        conv_stack(n_layers),
        step_stats={"param": ["update_abs_mean"], "grad_output": ["norm"]},
        steps_per_epoch=1_000,
    ) as run:
        run.steps(n_steps, block=16_384)
    return time.perf_counter() - start


def render_seconds(figure: str, path: Path, out: Path, repeat: int, **options: object) -> float:
    """Best wall time of open_run + figure + PNG over ``repeat`` tries."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        with open_run(path) as run:
            save(figure, [run], out, force=True, **options)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = script_parser(__doc__, json_help=None)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    print_header("gradflow plots: heat-map rendering time from large run files", environment())
    worst: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="gradflow-plot-speed-") as tmp:
        for n_layers, n_steps in SIZES:
            path = Path(tmp) / f"run_{n_layers}x{n_steps}.h5"
            written = write(path, n_layers, n_steps)
            size_mb = path.stat().st_size / 1e6
            shape = f"{n_layers:>5} layers x {n_steps:>7} steps"
            print(f"{shape}: {size_mb:.0f} MB, written in {written:.1f} s")
            for figure, options in FIGURES.items():
                seconds = render_seconds(
                    figure, path, Path(tmp) / f"{figure}.png", args.repeat, **options
                )
                worst[figure] = seconds
                print(f"    {figure:<17} {seconds:6.2f} s")
            path.unlink()
    largest = f"{SIZES[-1][0]} layers x {SIZES[-1][1]} steps"
    verdict = "PASS" if max(worst.values()) < LIMIT_S else "FAIL"
    timings = ", ".join(f"{name} {s:.2f} s" for name, s in worst.items())
    print(
        f"headline: {largest}: {timings} (limit {LIMIT_S:.0f} s, best of {args.repeat}): {verdict}"
    )


if __name__ == "__main__":
    main()
