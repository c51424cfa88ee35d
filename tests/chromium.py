"""The system's Chromium for browser tests and benchmarks (never a downloaded browser)."""

from __future__ import annotations

import os
import shutil

ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
MISSING = (
    "no Chromium (looked at $GRADFLOW_CHROMIUM, /usr/bin/chromium, PATH): "
    "apt-get install chromium; .ci/run installs it"
)


def executable() -> str | None:
    """$GRADFLOW_CHROMIUM, /usr/bin/chromium or a chromium on PATH, if any."""
    for candidate in (
        os.environ.get("GRADFLOW_CHROMIUM"),
        "/usr/bin/chromium",
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None
