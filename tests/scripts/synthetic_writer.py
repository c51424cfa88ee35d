"""Writes a synthetic run on command, for tests that read it from another process.

``python synthetic_writer.py RUN.h5`` then lines on stdin: ``steps N``, ``epoch``,
``commit``, ``close``; each answered with ``ok`` on stdout once done.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runfiles import SyntheticRun, fcn_layers

run = SyntheticRun(sys.argv[1], fcn_layers(), steps_per_epoch=10)
for line in sys.stdin:
    command, *args = line.split()
    if command == "steps":
        run.steps(int(args[0]))
    elif command == "epoch":
        run.epoch()
    elif command == "commit":
        run.commit()
    elif command == "close":
        run.close()
    print("ok", flush=True)
    if command == "close":
        break
