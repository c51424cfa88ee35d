"""The public schedules of :mod:`gradflow.schedule` against step lists worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from gradflow.errors import GradflowError
from gradflow.schedule import Schedule, as_schedule, at, every, log_spaced


def picked(schedule: Schedule, stop: int) -> list[int]:
    return [step for step in range(stop) if schedule(step)]


def test_every_counts_from_its_start() -> None:
    assert picked(every(1), 6) == [0, 1, 2, 3, 4, 5]
    assert picked(every(4), 13) == [0, 4, 8, 12]
    assert picked(every(3, start=2), 12) == [2, 5, 8, 11]
    assert picked(every(5, start=7), 20) == [7, 12, 17]  # nothing before start


def test_log_spaced_is_dense_then_per_decade() -> None:
    # Steps below dense_until, then round(dense_until * 10 ** (k / per_decade)), k = 0, 1, ...:
    # 10 * 10 ** 0.1 = 12.59 -> 13, 10 ** 1.5 = 31.62 -> 32, 10 ** 2.9 = 794.3 -> 794.
    assert picked(log_spaced(), 1001) == [
        *range(10),
        *[10, 13, 16, 20, 25, 32, 40, 50, 63, 79],
        *[100, 126, 158, 200, 251, 316, 398, 501, 631, 794],
        1000,
    ]
    # 3 * 10 ** 0.5 = 9.49 -> 9, 30 * 10 ** 0.5 = 94.87 -> 95, 300 * 10 ** 0.5 = 948.7 -> 949.
    sparse = log_spaced(dense_until=3, per_decade=2)
    assert picked(sparse, 1000) == [0, 1, 2, 3, 9, 30, 95, 300, 949]
    # Further out, each decade holds per_decade steps.
    schedule = log_spaced(dense_until=10, per_decade=4)
    assert picked(schedule, 10**5)[-8:] == [1000, 1778, 3162, 5623, 10000, 17783, 31623, 56234]


def test_at_records_exactly_the_given_steps() -> None:
    chosen = at([5, 1, 5, np.int64(9), 0])
    assert picked(chosen, 20) == [0, 1, 5, 9]
    assert picked(at([]), 20) == []
    assert picked(at(range(3, 30, 7)), 40) == [3, 10, 17, 24]


def test_as_schedule_maps_each_spec() -> None:
    assert picked(as_schedule(None), 4) == [0, 1, 2, 3]
    assert picked(as_schedule(3), 10) == [0, 3, 6, 9]
    mine = at([2, 7])
    assert as_schedule(mine) is mine


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "make",
    [
        lambda: every(0),
        lambda: every(-2),
        lambda: log_spaced(per_decade=0),
        lambda: log_spaced(dense_until=0),
        lambda: as_schedule(True),
        lambda: as_schedule("10"),
        lambda: as_schedule(0),
    ],
    ids=["every-0", "every-negative", "per-decade-0", "dense-until-0", "bool", "str", "int-0"],
)
def test_bad_arguments_are_one_line_errors(make) -> None:
    with pytest.raises(GradflowError) as caught:
        make()
    assert "\n" not in str(caught.value)


def test_each_schedule_describes_itself() -> None:
    from gradflow.schedule import describe

    assert describe(every(4)) == "every 4"
    assert describe(every(3, start=2)) == "every 3 from step 2"
    assert describe(log_spaced(dense_until=5, per_decade=3)) == (
        "log_spaced(dense_until=5, per_decade=3)"
    )
    assert describe(at([9, 1, 1])) == "at 2 steps (1, 9)"
    assert describe(at(range(20))) == "at 20 steps (0, 1, 2, 3, 4, 5, 6, 7, ...)"
    assert (
        describe(lambda step: True)
        == "custom test_schedule.test_each_schedule_describes_itself.<locals>.<lambda>"
    )
