"""Schedules: ``step -> bool`` closures that pick the recorded optimizer steps."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from gradflow.errors import GradflowError

Schedule = Callable[[int], bool]


def every(n: int, start: int = 0) -> Schedule:
    """Record steps ``start, start + n, start + 2n, ...``."""
    if n < 1:
        raise GradflowError(f"every must be >= 1, got {n}")
    return lambda step: step >= start and (step - start) % n == 0


def log_spaced(dense_until: int = 10, per_decade: int = 10) -> Schedule:
    """Every step up to ``dense_until``, then about ``per_decade`` steps per decade."""
    if dense_until < 1:
        raise GradflowError(f"log_spaced needs dense_until >= 1, got {dense_until}")
    if per_decade < 1:
        raise GradflowError(f"log_spaced needs per_decade >= 1, got {per_decade}")
    picked: set[int] = set()
    k = 0
    while True:
        step = round(dense_until * 10 ** (k / per_decade))
        if step > 10**12:
            break
        picked.add(step)
        k += 1
    return lambda step: step < dense_until or step in picked


def at(steps: Iterable[int]) -> Schedule:
    """Record exactly the given steps."""
    chosen = frozenset(int(s) for s in steps)
    return lambda step: step in chosen


def as_schedule(spec: int | Schedule | None) -> Schedule:
    """``None`` -> every step, an int ``n`` -> ``every(n)``, a callable -> itself."""
    if spec is None:
        return every(1)
    if isinstance(spec, bool) or not (isinstance(spec, int) or callable(spec)):
        raise GradflowError(f"every must be an int >= 1 or a step -> bool callable, got {spec!r}")
    return every(spec) if isinstance(spec, int) else spec


__all__ = ["Schedule", "as_schedule", "at", "every", "log_spaced"]
