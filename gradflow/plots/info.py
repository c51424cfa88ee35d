"""``gradflow info``: a one-screen summary of a run file and its health table."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from gradflow.plots.health import health
from gradflow.runfile import OVERHEAD_COLUMNS, Run, printable

MAX_CONFIG_KEYS = 12


def _cut(text: str, width: int = 70) -> str:
    """``text`` cut to ``width`` characters: rich wraps long text in time growing faster
    than its length (15 MB of words took minutes), and a run file's text may be that long."""
    return printable(text if len(text) <= width else text[: width - 3] + "...")


def _short(value: Any, width: int = 70) -> Text:
    """A config value on one line, as plain text: no rich markup, no control characters."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return Text(_cut(text, width))


def _size(n_bytes: int) -> str:
    size = float(n_bytes)
    for unit in ("B", "KB", "MB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def overhead_line(run: Run) -> str | None:
    """The recorder's own time by part and as a share of the run's wall time, if stored."""
    # The stored times are float32 and, in a crafted file, may be anything: a sum that
    # overflows is shown as inf, without numpy's warning (and its source line).
    with np.errstate(over="ignore", invalid="ignore"):
        parts = run.overhead
    spent = sum(parts[col] for col in OVERHEAD_COLUMNS)
    if not spent or not parts["wall"]:
        return None
    detail = ", ".join(f"{col} {parts[col]:.2f} s" for col in OVERHEAD_COLUMNS)
    share = 100 * spent / parts["wall"]
    return f"{spent:.2f} s of {parts['wall']:.1f} s wall ({share:.1f} %): {detail}"


def _facts(run: Run) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold cyan", no_wrap=True)
    grid.add_column()
    attrs = run.attrs
    # Text objects throughout: strings from the file are never parsed as rich markup.
    grid.add_row(
        "file",
        Text(
            f"{printable(str(run.path))} ({_size(run.path.stat().st_size)}), "
            f"schema v{attrs.get('schema_version')}, "
            f"gradflow {_cut(str(attrs.get('gradflow_version', '?')))}, "
            f"torch {_cut(str(attrs.get('torch_version', '?')))}, "
            f"{_cut(str(attrs.get('device', '?')))}, "
            f"created {_cut(str(attrs.get('created', '?')))}"
        ),
    )
    config = list(run.config.items())
    for key, value in config[:MAX_CONFIG_KEYS]:
        grid.add_row(Text(f"  {_cut(key)}"), _short(value))
    if len(config) > MAX_CONFIG_KEYS:
        grid.add_row("", f"... {len(config) - MAX_CONFIG_KEYS} more config entries")
    steps = run.steps
    if run.schedule is not None or run.recorded_probes is not None:
        recorded = f"probes {', '.join(run.recorded_probes or []) or 'none'}"
        grid.add_row("schedule", Text(_cut(f"{run.schedule or '?'}; {recorded}", 400)))
    step_range = f" (steps {steps[0]}..{steps[-1]})" if len(steps) else ""
    grid.add_row("steps", f"{run.n_steps} recorded{step_range}")
    grid.add_row("epochs", f"{run.n_epochs} closed")
    kinds = ", ".join(f"{k} {n}" for k, n in Counter(lay.kind for lay in run.layers).items())
    n_params = sum(lay.n_params for lay in run.layers)
    grid.add_row("layers", Text(f"{run.n_layers} ({kinds}), {n_params:,} parameters"))
    tied = [lay.label for lay in run.layers if lay.aliases]
    if tied:
        grid.add_row("tied", Text("\n".join(tied)))
    stats = [f"{p}: {', '.join(names)}" for p, names in run.probes().items()]
    if run.epoch_stats():
        stats.append(f"epoch: {', '.join(run.epoch_stats())}")
    grid.add_row("statistics", Text("\n".join(_cut(line, 400) for line in stats)))
    metrics = run.metrics
    if metrics and run.n_epochs:
        last = ", ".join(f"{k} {v[-1]:.4g}" for k, v in metrics.items())
        grid.add_row("last epoch", Text(last))
        val = metrics.get("val_loss")
        if val is not None and np.isfinite(val).any():
            best = int(np.nanargmin(val))
            grid.add_row("best val_loss", f"{val[best]:.4g} at epoch {run.epochs[best]}")
    grid.add_row("kernels", Text(_cut(str(attrs.get("kernel_backend", "not recorded")))))
    grid.add_row("overhead", overhead_line(run) or "not recorded")
    budget = budget_line(run)
    if budget is not None:
        grid.add_row("budget", budget)
    return grid


def budget_line(run: Run) -> str | None:
    """The overhead budget the steps were chosen under and the share reached, if any."""
    budget = run.attrs.get("budget")
    if budget is None:
        return None
    reached = float(run.attrs.get("budget_reached", float("nan")))
    shown = f"{100 * reached:.2f} %" if np.isfinite(reached) else "not closed"
    steps = f"{run.n_steps} steps recorded"
    return f"{100 * float(budget):.2f} % of wall time, reached {shown} ({steps})"


def info_panel(run: Run) -> RenderableType:
    """The summary of ``run`` followed by its health table."""
    findings = health(run)
    if findings:
        table = Table(title="health", title_justify="left", show_lines=False)
        for column in ("check", "layer", "value", "detail"):
            table.add_column(column)
        for f in findings:
            style = "red" if f.check in ("non-finite", "exploding update") else "yellow"
            table.add_row(Text(f.check, style=style), Text(f.layer), Text(f.value), Text(f.detail))
        verdict: RenderableType = table
    else:
        verdict = Text("health: no vanishing or exploding updates, dead units or non-finite values")
    title = Text(run.name, style="bold")
    return Group(title, _facts(run), Text(""), verdict)
