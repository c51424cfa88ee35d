"""Size and speed of ``gradflow report`` on a large run: 1000 layers x 100 000 steps.

Writes a synthetic run (``param/update_ratio``, ``param/grad_norm``, ``grad_output/norm``,
``activation/zero_fraction`` every step, epoch updates every 1000 steps) into a temporary
directory, times the report from ``open_run`` to the written HTML, then opens the file in
headless system Chromium ``--loads`` times and reads how long after the start of navigation
the page was interactive (the plots on screen drawn, the hover, filter and colour controls
attached: ``window.gradflowReadyMs``) and the CPU time Chromium used until then; then the
same for a page holding nothing but plotly.js, the floor of any plotly page.
Run: ``python benchmarks/report_speed.py``.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import chromium
from harness.env import environment, print_header, script_parser
from runfiles import SyntheticRun, conv_stack

from gradflow.report import build_report
from gradflow.report.page import plotly_js

SIZE_LIMIT_MB = 20.0
READY_LIMIT_S = 3.0
STEP_STATS = {
    "param": ["update_ratio", "grad_norm"],
    "grad_output": ["norm"],
    "activation": ["zero_fraction"],
}


def write(path: Path, n_layers: int, n_steps: int, steps_per_epoch: int) -> float:
    """Write the run in blocks of whole epochs; returns seconds taken."""
    start = time.perf_counter()
    with SyntheticRun(
        path,
        conv_stack(n_layers),
        step_stats=STEP_STATS,
        epoch_stats=["update_abs_mean"],
        steps_per_epoch=steps_per_epoch,
    ) as run:
        block = steps_per_epoch * max(1, 16_384 // steps_per_epoch)
        for first in range(0, n_steps, block):
            done = min(n_steps, first + block)
            run.steps(done - first, block=block)
            for _ in range(first // steps_per_epoch, done // steps_per_epoch):
                run.epoch()
    return time.perf_counter() - start


def chromium_cpu_seconds() -> dict[int, float]:
    """User + system CPU seconds of each Chromium process under this one, by pid."""
    seconds = {}
    for child in psutil.Process().children(recursive=True):
        try:
            if "chrom" in child.name():
                times = child.cpu_times()
                seconds[child.pid] = times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return seconds


def collect(errors: list[str]) -> Callable[[Any], None]:
    """A page-error handler appending each error's text to ``errors``."""
    return lambda exc: errors.append(str(exc))


def ready_seconds(html: Path, loads: int) -> list[tuple[float, float]]:
    """Per fresh page load: seconds from navigation start to an interactive page, and the
    CPU seconds all of Chromium's processes used meanwhile (what the page costs, whatever
    else the machine runs; with threads on several cores it can exceed the wall time)."""
    from playwright.sync_api import sync_playwright

    executable = chromium.executable()
    if executable is None:
        raise SystemExit(chromium.MISSING)
    times = []
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=executable, args=chromium.ARGS)
        for _ in range(loads):
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            errors: list[str] = []
            page.on("pageerror", collect(errors))
            cpu = chromium_cpu_seconds()
            page.goto(html.as_uri(), timeout=120_000)
            deadline = time.monotonic() + 120
            while not page.evaluate("window.gradflowReady === true"):
                if errors or time.monotonic() > deadline:
                    raise SystemExit(f"the page did not become ready: {errors}")
                time.sleep(0.05)
            # Processes that ended meanwhile (the previous page's) are left out.
            after = chromium_cpu_seconds()
            used = sum(seconds - cpu.get(pid, 0.0) for pid, seconds in after.items())
            times.append((page.evaluate("window.gradflowReadyMs") / 1000, used))
            page.close()
        browser.close()
    return times


def main() -> None:
    parser = script_parser(__doc__, json_help=None)
    parser.add_argument("--layers", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--steps-per-epoch", type=int, default=1000)
    parser.add_argument("--loads", type=int, default=3, help="page loads to time")
    args = parser.parse_args()
    print_header("gradflow report: size and page-load time of a large run's report", environment())
    with tempfile.TemporaryDirectory(prefix="gradflow-report-speed-") as tmp:
        run = Path(tmp) / "large.h5"
        written = write(run, args.layers, args.steps, args.steps_per_epoch)
        shape = f"{args.layers} layers x {args.steps} steps"
        print(f"{shape}: run file {run.stat().st_size / 1e6:.0f} MB, written in {written:.0f} s")
        start = time.perf_counter()
        html = build_report([run], Path(tmp) / "report.html")
        built = time.perf_counter() - start
        size_mb = html.stat().st_size / 1e6
        print(f"report: {size_mb:.1f} MB in {built:.1f} s (open_run to written HTML)")
        loads = ready_seconds(html, args.loads)
        for wall, busy in loads:
            print(f"interactive after {wall:.2f} s (Chromium used {busy:.2f} CPU s)")
        # The floor: a page with nothing but plotly.js, ready once it has run.
        bare = Path(tmp) / "plotly_only.html"
        bare.write_text(
            f"<!DOCTYPE html><html><head><script>{plotly_js()}</script></head><body>"
            "<script>window.gradflowReadyMs = performance.now(); window.gradflowReady = true"
            "</script></body></html>",
            encoding="utf-8",
        )
        for wall, busy in ready_seconds(bare, args.loads):
            print(f"plotly.js alone: ready after {wall:.2f} s (Chromium used {busy:.2f} CPU s)")
    median = statistics.median(wall for wall, _ in loads)
    busy = statistics.median(busy for _, busy in loads)
    verdict = "PASS" if size_mb < SIZE_LIMIT_MB and median < READY_LIMIT_S else "FAIL"
    print(
        f"headline: {shape}: {size_mb:.1f} MB (limit {SIZE_LIMIT_MB:.0f}), interactive in "
        f"{median:.2f} s, median of {len(loads)} loads (limit {READY_LIMIT_S:.0f} s; Chromium "
        f"used {busy:.2f} CPU s; load average {os.getloadavg()[0]:.1f}): {verdict}"
    )


if __name__ == "__main__":
    main()
