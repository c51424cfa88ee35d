"""Schedules: ``step -> bool`` callables that pick the recorded optimizer steps."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from gradflow.errors import GradflowError

Schedule = Callable[[int], bool]


class Described:
    """A schedule of this module, with the description the run file stores for it."""

    def __init__(self, pick: Schedule, description: str) -> None:
        self._pick = pick
        self.description = description

    def __call__(self, step: int) -> bool:
        return self._pick(step)

    def __repr__(self) -> str:
        return self.description


def describe(schedule: Schedule) -> str:
    """What the run file's ``schedule`` attribute says of ``schedule``: its description
    (``every 5``, ``log_spaced(dense_until=10, per_decade=10)``), or ``custom`` and the
    callable's qualified name.

    Args:
        schedule: a ``step -> bool`` callable.

    Returns:
        One line of text.
    """
    if isinstance(schedule, Described):
        return schedule.description
    name = getattr(schedule, "__qualname__", type(schedule).__qualname__)
    return f"custom {getattr(schedule, '__module__', None) or '?'}.{name}"


def every(n: int, start: int = 0) -> Schedule:
    """Record steps ``start, start + n, start + 2n, ...``."""
    if n < 1:
        raise GradflowError(f"every must be >= 1, got {n}")
    return Described(
        lambda step: step >= start and (step - start) % n == 0,
        f"every {n}" + (f" from step {start}" if start else ""),
    )


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
    return Described(
        lambda step: step < dense_until or step in picked,
        f"log_spaced(dense_until={dense_until}, per_decade={per_decade})",
    )


def at(steps: Iterable[int]) -> Schedule:
    """Record exactly the given steps."""
    chosen = frozenset(int(s) for s in steps)
    shown = ", ".join(str(s) for s in sorted(chosen)[:8]) + (", ..." if len(chosen) > 8 else "")
    return Described(lambda step: step in chosen, f"at {len(chosen)} steps ({shown})")


def as_schedule(spec: int | Schedule | None) -> Schedule:
    """``None`` -> every step, an int ``n`` -> ``every(n)``, a callable -> itself."""
    if spec is None:
        return every(1)
    if isinstance(spec, bool) or not (isinstance(spec, int) or callable(spec)):
        raise GradflowError(f"every must be an int >= 1 or a step -> bool callable, got {spec!r}")
    return every(spec) if isinstance(spec, int) else spec


__all__ = ["Described", "Schedule", "as_schedule", "at", "describe", "every", "log_spaced"]
