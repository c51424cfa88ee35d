"""Summaries, tables, headlines and JSON: how every script reports what it measured."""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Summary:
    """Median, quartiles and range of a sample."""

    n: int
    median: float
    q1: float
    q3: float
    lo: float
    hi: float

    def spread(self, fmt: str = ".3f") -> str:
        return f"{self.lo:{fmt}}-{self.hi:{fmt}}"

    def iqr(self, fmt: str = ".3f") -> str:
        return f"{self.q1:{fmt}}-{self.q3:{fmt}}"

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Summary:
        return cls(**{k: data[k] for k in ("n", "median", "q1", "q3", "lo", "hi")})


def summarize(values: Iterable[float]) -> Summary:
    data = sorted(float(v) for v in values)
    if not data:
        nan = float("nan")
        return Summary(0, nan, nan, nan, nan, nan)
    if len(data) == 1:
        v = data[0]
        return Summary(1, v, v, v, v, v)
    q1, _, q3 = statistics.quantiles(data, n=4, method="inclusive")
    return Summary(len(data), statistics.median(data), q1, q3, data[0], data[-1])


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A fixed-width text table; the first column is left-aligned, the others right."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells if i < len(r)) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        parts = [
            cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def ratio_headline(
    ratio: Mapping[str, Any] | None, label: str, why: str = "not run", measure: str = "step-time"
) -> str:
    """The headline every overhead script ends with (one per variant).

    Args:
        ratio: the variant's per-pair ratios as :meth:`Summary.as_dict` gives them, or None
            where it was not measured.
        label: what the variant is, on which workload.
        why: the reason given where ``ratio`` is None.
        measure: what the ratio compares (``step-time``, ``CPU-time``).

    Returns:
        ``recorder/plain step-time ratio: R (median of N pairs, spread a-b) [label]``.
    """
    if ratio is None:
        return f"recorder/plain {measure} ratio: n/a ({why}) [{label}]"
    summary = Summary.from_dict(dict(ratio))
    return (
        f"recorder/plain {measure} ratio: {summary.median:.3f} "
        f"(median of {summary.n} pairs, spread {summary.spread()}) [{label}]"
    )


def ratio_rows(
    names: Sequence[str], results: Mapping[str, Mapping[str, Any]], *, ms: bool, digits: int
) -> dict[str, list[str]]:
    """The first columns of a ratio table: variant, time per step, ratio, its IQR and range.

    Args:
        names: the variants, ``plain`` first; those without results are left out.
        results: per variant, ``seconds_per_step`` and (not plain) ``ratio`` summaries.
        ms: the time per step in ms (else in seconds, 4 decimals).
        digits: decimals of the ratios.

    Returns:
        The cells per variant; callers add their own columns.
    """
    fmt = f".{digits}f"
    rows: dict[str, list[str]] = {}
    for name in names:
        if name not in results:
            continue
        t = results[name]["seconds_per_step"]["median"]
        time_cell = f"{1e3 * t:.2f}" if ms else f"{t:.4f}"
        ratio = results[name].get("ratio")
        if ratio is None:
            rows[name] = [name, time_cell, "1", "-", "-"]
            continue
        q = Summary.from_dict(ratio)
        rows[name] = [name, time_cell, f"{q.median:{fmt}}", q.iqr(fmt), q.spread(fmt)]
    return rows


def own_clock_line(name: str, own: Mapping[str, float], kernels: str | None = None) -> str:
    """The recorder's own timing per recorded step (ms, from its run file), one line."""
    parts = ", ".join(f"{k} {v:.2f}" for k, v in own.items())
    where = f" [{kernels} kernels]" if kernels else ""
    return f"{name}: the recorder's own timing per recorded step (ms): {parts}{where}"


def write_json(path: str | os.PathLike[str] | None, data: Any) -> None:
    if not path:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    print(f"results written to {target}")


def _json_default(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and value != value:
        return None
    return str(value)
