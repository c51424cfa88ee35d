"""The sweep page of a folder of runs, as a PNG taken in headless Chromium.

Usage (from the repository root)::

    python figures/sweep_screenshot.py runs/ablation/64px-192steps figures/sweep.png

writes the page with ``gradflow.sweep(FOLDER).write_html`` next to the PNG's name (``.html``,
removed afterwards unless ``--keep-html``), waits until every plot is drawn and saves the top
``--height`` pixels at ``--width`` (default 1400 x 1650: the runs table, the scalar plot and
the first statistic's small multiples). Needs the system's Chromium (``apt-get install
chromium``; ``$GRADFLOW_CHROMIUM`` names another) and playwright.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

import gradflow

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
import chromium  # tests/chromium.py: the system's browser, never a downloaded one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, help="a folder of run files (or one run file)")
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=1650)
    parser.add_argument("--keep-html", action="store_true")
    args = parser.parse_args()
    executable = chromium.executable()
    if executable is None:
        sys.exit(f"sweep_screenshot: {chromium.MISSING}")
    page = gradflow.sweep(args.runs).write_html(args.out.with_suffix(".html"), force=True)
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=executable, args=chromium.ARGS)
        tab = browser.new_page(viewport={"width": args.width, "height": args.height})
        errors: list[str] = []
        tab.on("pageerror", lambda exc: errors.append(str(exc)))
        tab.goto(page.as_uri(), timeout=180_000)
        deadline = time.monotonic() + 180
        while not tab.evaluate("window.gradflowReady === true"):
            if errors or time.monotonic() > deadline:
                sys.exit(f"sweep_screenshot: the page did not draw ({errors or 'timeout'})")
            time.sleep(0.2)
        tab.screenshot(
            path=str(args.out),
            clip={"x": 0, "y": 0, "width": args.width, "height": args.height},
            full_page=True,
        )
        browser.close()
    if not args.keep_html:
        page.unlink()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
