"""The folder of gradflow's per-user cache (built C kernels, synthetic EM volumes)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$GRADFLOW_CACHE_DIR``, else ``$XDG_CACHE_HOME/gradflow``, else ``~/.cache/gradflow``
    (it may not exist yet)."""
    chosen = os.environ.get("GRADFLOW_CACHE_DIR")
    if chosen:
        return Path(chosen).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gradflow"
