"""Verdicts on the paper's predictions: bootstrap, verdict logic, grouping of run files."""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
from runfiles import SyntheticRun, fcn_layers
from scipy import stats

from gradflow.analysis import centre_edge_ratio
from gradflow.em import intervals
from gradflow.em import verdicts as vd
from gradflow.runfile import open_run


def loop_bootstrap(x: list[float], y: list[float], resamples: int, seed: int) -> tuple[float, ...]:
    """The bootstrap written out: the same draws, then plain loops and a hand-made
    percentile (linear interpolation between order statistics)."""
    rng = np.random.default_rng(seed)
    pick_x = rng.integers(0, len(x), size=(resamples, len(x))).tolist()
    pick_y = rng.integers(0, len(y), size=(resamples, len(y))).tolist()
    q = []
    for row_x, row_y in zip(pick_x, pick_y, strict=True):
        log_gx = sum(math.log(x[i]) for i in row_x) / len(row_x)
        log_gy = sum(math.log(y[i]) for i in row_y) / len(row_y)
        q.append(math.exp(log_gx - log_gy))
    q.sort()

    def percentile(p: float) -> float:
        pos = p / 100 * (len(q) - 1)
        lo = math.floor(pos)
        return q[lo] + (q[min(lo + 1, len(q) - 1)] - q[lo]) * (pos - lo)

    geo = math.prod(x) ** (1 / len(x)) / math.prod(y) ** (1 / len(y))
    return geo, percentile(2.5), percentile(97.5)


def test_bootstrap_matches_a_plain_reimplementation() -> None:
    rng = np.random.default_rng(3)
    x = rng.lognormal(0.3, 0.4, 5).tolist()
    y = rng.lognormal(0.0, 0.2, 7).tolist()  # panels need not have equal seed counts
    got = intervals.bootstrap_ratio(x, y, resamples=2000, seed=11)
    np.testing.assert_allclose(got, loop_bootstrap(x, y, 2000, 11), rtol=1e-12)
    assert got[1] < got[0] < got[2]
    assert intervals.bootstrap_ratio(x, y) == intervals.bootstrap_ratio(x, y)  # fixed RNG seed


def test_bootstrap_interval_is_that_of_any_generator_within_monte_carlo_error() -> None:
    rng = np.random.default_rng(5)
    x, y = rng.lognormal(0.0, 0.5, 5), rng.lognormal(0.0, 0.5, 5)
    _, low, high = intervals.bootstrap_ratio(x, y)
    others = np.array([intervals.bootstrap_ratio(x, y, seed=s)[1:] for s in range(3)])
    np.testing.assert_allclose(others, [[low, high]] * 3, rtol=0.05)


def test_bootstrap_of_identical_seeds_is_a_point() -> None:
    assert intervals.bootstrap_ratio([2.0] * 5, [0.5] * 5) == pytest.approx((4.0, 4.0, 4.0))


def test_replication_interval_by_hand() -> None:
    x, y = [1.0, 2.0, 4.0, 2.0, 1.0], [0.5, 0.25, 0.5]
    lx, ly = [math.log(v) for v in x], [math.log(v) for v in y]
    vx = statistics.variance(lx) * (1 / 5 + 1 / 4)  # 4 new seeds of x's panel
    vy = statistics.variance(ly) * (1 / 3 + 1 / 2)  # 2 new seeds of y's panel
    dof = (vx + vy) ** 2 / (vx**2 / 4 + vy**2 / 2)
    half = stats.t.ppf(0.975, dof) * math.sqrt(vx + vy)
    centre = statistics.fmean(lx) - statistics.fmean(ly)
    got = intervals.replication_interval(x, y, (4, 2))
    np.testing.assert_allclose(got, [math.exp(centre - half), math.exp(centre + half)], rtol=1e-12)
    assert intervals.replication_interval([2.0] * 3, [0.5] * 3, (5, 5)) == (4.0, 4.0)
    assert all(math.isnan(v) for v in intervals.replication_interval([1.0], [1.0, 2.0], (5, 5)))


@pytest.mark.parametrize(("n", "m"), [(5, 5), (5, 2), (8, 3)])
def test_replications_land_in_the_predicted_range_95_percent_of_the_time(n: int, m: int) -> None:
    """Draw an ablation (n seeds a panel) and a replication (m fresh seeds) from known
    log-normal panels, thousands of times: the replication's Q falls inside the range
    predicted from the ablation alone 95 % of the time (binomial standard error 0.4 %),
    where the bootstrap interval of the ablation's own Q holds it far less often."""
    rng = np.random.default_rng(7)
    trials, inside, inside_bootstrap = 3000, 0, 0
    for trial in range(trials):
        x, y = rng.lognormal(0.0, 0.8, n), rng.lognormal(-1.0, 0.3, n)
        again = np.exp(np.log(rng.lognormal(0.0, 0.8, m)).mean())
        again /= np.exp(np.log(rng.lognormal(-1.0, 0.3, m)).mean())
        low, high = intervals.replication_interval(x, y, (m, m))
        inside += low <= again <= high
        if trial < 300:  # the bootstrap is slow; 300 trials show its shortfall
            _, blow, bhigh = intervals.bootstrap_ratio(x, y, resamples=1000)
            inside_bootstrap += blow <= again <= bhigh
    assert inside / trials == pytest.approx(0.95, abs=0.015)
    assert inside_bootstrap / 300 < 0.85


A, B, C, D = vd.PREDICTIONS


@pytest.mark.parametrize(
    ("prediction", "low", "high", "expected"),
    [
        (A, 1.2, 3.0, vd.HOLDS),  # (a) wants r_a / r_b > 1
        (A, 0.2, 0.9, vd.FAILS),
        (A, 0.8, 1.3, vd.UNRESOLVED),
        (B, 0.1, 0.9, vd.HOLDS),  # (b) wants r_b / r_c < 1
        (B, 1.1, 2.0, vd.FAILS),
        (B, 0.5, 1.5, vd.UNRESOLVED),
        (C, 0.6, 1.4, vd.HOLDS),  # (c) wants r_c / r_a > 0.5
        (C, 0.1, 0.45, vd.FAILS),
        (C, 0.3, 0.7, vd.UNRESOLVED),
        (D, 0.05, 0.5, vd.HOLDS),  # (d) wants r_d / r_a < 1
        (D, 1.01, 1.2, vd.FAILS),
    ],
)
def test_verdict_from_the_interval(
    prediction: vd.Prediction, low: float, high: float, expected: str
) -> None:
    assert vd.verdict(prediction, low, high, (5, 5)) == expected
    assert vd.verdict(prediction, low, high, (5, 4)) == vd.TOO_FEW


def ratios_for(per_panel: dict[str, list[float]], gradient: float = 1.0) -> dict:
    """Ratios of one scale and condition: ``per_panel`` updates, gradients all ``gradient``."""
    return {
        vd.RunKey("64px-192steps", "sgd", panel, seed): {"update": r, "gradient": gradient}
        for panel, values in per_panel.items()
        for seed, r in enumerate(values)
    }


def test_verdicts_on_constructed_panels() -> None:
    spread = [0.95, 1.0, 1.05, 0.98, 1.02]
    ratios = ratios_for(
        {
            "a": [1.0 * s for s in spread],  # even
            "b": [0.03 * s for s in spread],  # starved: (a) holds, (b) holds vs (c)
            "c": [0.2 * s for s in spread],  # 0.2 of (a): (c) does not hold
            "d": [1.0, 0.5, 2.0, 0.7, 1.4],  # overlapping 1: (d) not resolved
        }
    )
    got = {(v.prediction.letter, v.quantity): v for v in vd.verdicts(ratios)}
    assert [got[p, "update"].verdict for p in "abcd"] == [
        vd.HOLDS,
        vd.HOLDS,
        vd.FAILS,
        vd.UNRESOLVED,
    ]
    assert got["a", "update"].estimate == pytest.approx(1 / 0.03)
    assert got["a", "update"].seeds == (5, 5)
    # Every panel's gradient ratio equal: each Q is exactly 1.
    assert [got[p, "gradient"].estimate for p in "abcd"] == [pytest.approx(1.0)] * 4
    assert got["a", "gradient"].verdict == vd.UNRESOLVED
    assert got["b", "gradient"].verdict == vd.UNRESOLVED
    assert got["c", "gradient"].verdict == vd.HOLDS


def test_too_few_seeds_and_unusable_ratios() -> None:
    ratios = ratios_for({"a": [1.0] * 5, "b": [0.1] * 4, "c": [0.5] * 5})
    ratios[vd.RunKey("64px-192steps", "sgd", "c", 0)]["update"] = math.nan  # not recorded
    got = {(v.prediction.letter, v.quantity): v for v in vd.verdicts(ratios)}
    assert got["a", "update"].verdict == vd.TOO_FEW and got["a", "update"].seeds == (5, 4)
    assert got["c", "update"].seeds == (4, 5) and got["c", "gradient"].seeds == (5, 5)
    assert got["d", "update"].seeds == (0, 5) and math.isnan(got["d", "update"].estimate)
    assert got["d", "update"].verdict == vd.TOO_FEW


@pytest.mark.parametrize(
    ("relative", "expected"),
    [
        ("64px-192steps/fig3a-long-short-9-rmsprop-s0.h5", ("rmsprop", "a", 0)),
        ("96px-192steps/fig3b-long-9-sgd-nesterov-s12.h5", ("sgd-nesterov", "b", 12)),
        ("64px-576steps/fig3c-long-3-rmsprop-eps-s3.h5", ("rmsprop-eps", "c", 3)),
        ("64px-576steps/fig3d-long-7-nobn-rmsprop-paper-s4.h5", ("rmsprop-paper", "d", 4)),
        ("64px-192steps/short-only-9-rmsprop-s0.h5", None),  # not a Fig. 3 panel
        ("64px-192steps/fig3a-long-short-9-s0.h5", None),  # no condition
        ("64px-192steps/fig3a-long-short-9-rmsprop-sx.h5", None),
        ("64px-192steps/fig3a-long-short-9-rmsprop-s0.log", None),
        ("quick/fig3a-long-short-9-rmsprop-s0.h5", None),  # not a scale folder
    ],
)
def test_parse_run_path(relative: str, expected: tuple | None) -> None:
    key = vd.parse_run_path(Path("runs/ablation") / relative)
    if expected is None:
        assert key is None
    else:
        assert key == vd.RunKey(relative.split("/")[0], *expected)


def test_find_runs_groups_finished_runs_by_name(tmp_path: Path) -> None:
    for name in ("fig3a-long-short-9-rmsprop-s0", "fig3a-long-short-9-rmsprop-s1", "other"):
        (tmp_path / "64px-192steps").mkdir(exist_ok=True)
        (tmp_path / "64px-192steps" / f"{name}.h5").touch()
        (tmp_path / "64px-192steps" / f"{name}.done").touch()
    (tmp_path / "64px-192steps" / "fig3b-long-9-rmsprop-s0.h5").touch()  # still recording
    found = vd.find_runs(tmp_path)
    assert sorted(found) == [vd.RunKey("64px-192steps", "rmsprop", "a", s) for s in (0, 1)]
    assert len(vd.find_runs(tmp_path, finished_only=False)) == 3


def test_tables_from_run_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scale = tmp_path / "runs" / "32px-4steps"
    scale.mkdir(parents=True)
    seeds = {letter: range(2 if letter == "d" else 5) for letter in vd.PANELS}
    for letter, model in vd.PANELS.items():
        for seed in seeds[letter]:
            path = scale / f"{model}-sgd-s{seed}.h5"
            with SyntheticRun(path, fcn_layers(), model=model, seed=seed, steps_per_epoch=2) as r:
                r.steps(2).epoch().steps(2).epoch()
            path.with_suffix(".done").touch()
    assert vd.main([str(tmp_path / "runs"), str(tmp_path / "out")]) == 0
    assert "| 32px-4steps | sgd | (a)" in capsys.readouterr().out
    assert not (tmp_path / "out" / "replication.csv").exists()
    # The runs as their own replication: every Q equal, inside, same verdict.
    runs = str(tmp_path / "runs")
    assert vd.main([runs, str(tmp_path / "again"), runs]) == 0
    assert "replication: 8 of 8 Q inside their predicted range" in capsys.readouterr().out
    with open(tmp_path / "again" / "replication.csv") as f:
        again = list(csv.DictReader(f))
    assert len(again) == 8 and {r["agreement"] for r in again} == {"agrees"}
    assert all(r["Q"] == r["replication Q"] and r["inside"] == "yes" for r in again)
    with open(tmp_path / "out" / "verdicts.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(vd.PREDICTIONS) * len(vd.QUANTITIES)

    reference = {}  # (panel, seed, quantity) -> centre/edge ratio, read independently
    for letter, model in vd.PANELS.items():
        for seed in seeds[letter]:
            with open_run(scale / f"{model}-sgd-s{seed}.h5") as run:
                for quantity, (probe, stat) in vd.QUANTITIES.items():
                    reference[letter, seed, quantity] = centre_edge_ratio(run, stat, probe=probe)
    for row in rows:
        prediction = next(p for p in vd.PREDICTIONS if row["prediction"][1] == p.letter)
        logs = [
            [math.log(reference[panel, s, row["quantity"]]) for s in seeds[panel]]
            for panel in (prediction.numerator, prediction.denominator)
        ]
        q = math.exp(np.mean(logs[0]) - np.mean(logs[1]))
        assert float(row["Q"]) == pytest.approx(q, rel=1e-9)
        assert float(row["95 % low"]) <= q * (1 + 1e-9) <= float(row["95 % high"]) * (1 + 2e-9)
        assert row["seeds"] == f"{len(logs[0])}/{len(logs[1])}"
        if "d" not in (prediction.numerator, prediction.denominator):
            x, y = (np.exp(v) for v in logs)
            expected = intervals.replication_interval(x, y, (len(x), len(y)))
            got = (float(row["replication 95 % low"]), float(row["replication 95 % high"]))
            assert got == pytest.approx(expected, rel=1e-3)  # the table rounds to 4 digits
            assert got[0] <= float(row["95 % low"]) and float(row["95 % high"]) <= got[1]
        assert (row["verdict"] == vd.TOO_FEW) == (
            "d" in (prediction.numerator, prediction.denominator)
        )
    per_run = (tmp_path / "out" / "centre_edge.csv").read_text().splitlines()
    assert len(per_run) == 1 + 3 * 5 + 2


def test_bad_root_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert vd.main([str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == f"gradflow: error: {tmp_path / 'nowhere'}: no such directory of ablation runs\n"
    assert vd.main([str(tmp_path), str(tmp_path / "out")]) == 2


def test_compare_a_replication() -> None:
    original = ratios_for(
        {
            "a": [1.0, 1.1, 0.9, 1.05, 0.95],
            "b": [0.1, 0.12, 0.08, 0.11, 0.09],
            "c": [0.5, 0.55, 0.45, 0.5, 0.52],
            "d": [0.3, 0.35, 0.25, 0.3, 0.32],
        }
    )
    again = {  # other seeds; (b)'s centre now moves twice as much as (c)'s
        vd.RunKey(key.scale, key.condition, key.panel, key.seed + 10): dict(values)
        for key, values in original.items()
    }
    for key in again:
        if key.panel == "b":
            again[key]["update"] = again[key]["update"] * 10
    rows = {
        (r.original.prediction.letter, r.original.quantity): r for r in vd.compare(original, again)
    }
    assert len(rows) == len(vd.PREDICTIONS) * len(vd.QUANTITIES)
    same = rows["d", "update"]
    assert same.replication.estimate == pytest.approx(same.original.estimate)
    assert same.inside and same.agreement == "agrees"
    moved = rows["b", "update"]  # 0.2 -> 2: far outside, from holds to does not hold
    assert moved.replication.estimate == pytest.approx(10 * moved.original.estimate)
    assert not moved.inside and moved.high < moved.replication.estimate
    assert (moved.original.verdict, moved.replication.verdict) == (vd.HOLDS, vd.FAILS)
    assert moved.agreement == "contradicts"
    assert rows["a", "update"].agreement == "differs"  # 10 -> 1: holds -> not resolved
    # Cells the original does not have are left out.
    elsewhere = {
        vd.RunKey("96px-192steps", k.condition, k.panel, k.seed): v for k, v in again.items()
    }
    assert vd.compare(original, elsewhere) == []
