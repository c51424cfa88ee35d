"""Every reader on each run file named: ``readers.py LIMIT_BYTES FILE...``.

Runs under an address-space limit of LIMIT_BYTES (``setrlimit(RLIMIT_AS)``); per file it
prints one JSON line: what each reader gave (``ok``, ``error: <GradflowError>`` or
``<OtherType>: <message>``), the seconds all of them took, and the peak resident memory
so far of this process and of the children it waited for (the checks ``open_run`` forks).
"""

from __future__ import annotations

import io
import json
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402 (under the limit)
from rich.console import Console  # noqa: E402

from gradflow.errors import GradflowError  # noqa: E402
from gradflow.plots.default import default_view  # noqa: E402
from gradflow.plots.info import info_panel  # noqa: E402
from gradflow.plots.output import render  # noqa: E402
from gradflow.report.data import payload, to_json  # noqa: E402
from gradflow.report.server import LiveRuns  # noqa: E402
from gradflow.runfile import Run, open_run  # noqa: E402


def read(run: Run) -> None:
    """Every series and table, and every statistic block by block, as the readers do."""
    for series in (run.steps, run.epoch, run.time, run.loss, run.scale, run.skipped):
        assert len(series) == run.n_steps
    assert all(len(v) == run.n_steps for v in run.scalars.values())
    assert all(len(v) == run.n_epochs for v in run.metrics.values())
    assert len(run.epochs) == len(run.epoch_end_step) == run.n_epochs
    assert len(run.events) == run.n_events
    run.overhead  # noqa: B018 (read for its errors)
    stats = [(p, s) for p, names in run.probes().items() for s in names]
    for probe, name in [*stats, *(("epoch", s) for s in run.epoch_stats())]:
        for _ in run.stat_blocks(probe, name):
            pass


def info(run: Run) -> None:
    Console(file=io.StringIO(), width=120, color_system=None).print(info_panel(run))


def plot(run: Run) -> None:
    """The figure ``gradflow plot RUN.h5`` draws, drawn once: colour scales, ticks and
    labels computed from the data (without the layout pass and the PNG: fast)."""
    view = default_view([run])
    fig = render(view.figure, [run], stat=view.stat, log=view.log)
    fig.set_layout_engine("none")
    fig.set_dpi(30)
    FigureCanvasAgg(fig).draw()


def report(run: Run) -> None:
    to_json(payload([run]))


def serve(run: Run) -> None:
    """What ``gradflow serve`` reads at start: the file opened again, the page's data."""
    LiveRuns([run.path]).close()


READERS: dict[str, Callable[[Run], None]] = {
    "read": read,
    "info": info,
    "plot": plot,
    "report": report,
    "serve": serve,
}


def peak_bytes() -> int:
    """The peak resident memory of this process and of the children it waited for.

    This process's own is ``VmHWM`` where Linux gives it: ``ru_maxrss`` keeps the peak of
    the process that started this one (a test process of many hundred MB) across exec.
    """
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    status = Path("/proc/self/status")
    if status.exists():
        lines = status.read_text().splitlines()
        own = next(int(line.split()[1]) for line in lines if line.startswith("VmHWM:"))
    return 1024 * max(own, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)


def answer(call: Callable[[], object]) -> str:
    try:
        call()
    except GradflowError as err:
        return f"error: {err}"
    except Exception as err:  # what the test looks for: any other type is a failure
        return f"{type(err).__name__}: {err}"
    return "ok"


def readers(name: str) -> dict[str, str]:
    """What ``open_run`` and, on an opened file, each reader gave."""
    opened: list[Run] = []
    answers = {"open_run": answer(lambda: opened.append(open_run(name)))}
    for run in opened:
        with run:
            for reader, fn in READERS.items():
                answers[reader] = answer(lambda fn=fn, run=run: fn(run))  # type: ignore[misc]
    return answers


for name in sys.argv[2:]:
    start = time.perf_counter()
    answers = readers(name)
    line = {
        "file": Path(name).name,
        "answers": answers,
        "seconds": time.perf_counter() - start,
        "peak": peak_bytes(),
    }
    print(json.dumps(line), flush=True)
