"""``gradflow report`` and ``gradflow serve`` in a real browser: headless Chromium (the
system's, never a downloaded one) driven by playwright.

Expected values are read from the run file with h5py, not from the page's data. With
``GRADFLOW_SCREENSHOTS=DIR`` the tests also save the overview, hover and live views there.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import chromium
import h5py
import numpy as np
import pytest
import test_frozen

from gradflow.errors import GradflowError
from gradflow.report import build_report
from gradflow.runfile import open_run

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed: pip install -e '.[dev]'"
)

SCREENSHOTS = os.environ.get("GRADFLOW_SCREENSHOTS")
# The middle of a plotly heat-map cell in page coordinates (plotly's axis objects).
CELL_CENTRE = """([id, row, col]) => {
  const div = document.getElementById(id);
  const xa = div._fullLayout.xaxis, ya = div._fullLayout.yaxis;
  const edges = div.data[0].x, box = div.getBoundingClientRect();
  return {x: box.left + xa._offset + xa.l2p((edges[col] + edges[col + 1]) / 2),
          y: box.top + ya._offset + ya.l2p(row)};
}"""


def _tiny_run_script() -> Any:
    spec = importlib.util.spec_from_file_location(
        "tiny_run", Path(__file__).parent / "scripts" / "tiny_run.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tiny_run = _tiny_run_script()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    path = chromium.executable()
    if path is None:
        if os.environ.get("GRADFLOW_REQUIRE_BROWSER"):
            pytest.fail(f"GRADFLOW_REQUIRE_BROWSER is set but there is {chromium.MISSING}")
        pytest.skip(chromium.MISSING)
    with sync_api.sync_playwright() as driver:
        launched = driver.chromium.launch(executable_path=path, args=chromium.ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Any) -> Iterator[tuple[Any, list[str]]]:
    """A fresh page and the console errors and uncaught exceptions it reports."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    tab = context.new_page()
    errors: list[str] = []
    tab.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    yield tab, errors
    context.close()


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> tuple[Path, Path]:
    """Two runs of the tiny model, the second with a smaller learning rate."""
    root = tmp_path_factory.mktemp("browser")
    tiny_run.record(root / "a.h5", steps=20)
    tiny_run.record(root / "b.h5", steps=20, lr=0.01)
    return root / "a.h5", root / "b.h5"


def shoot(tab: Any, name: str, full_page: bool = False) -> None:
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        tab.screenshot(path=str(Path(SCREENSHOTS) / name), full_page=full_page)


def wait_until(tab: Any, expression: str, timeout: float = 60.0) -> None:
    """Poll ``expression`` in the page until it is true. Not playwright's wait_for_function:
    its polling evaluates strings, which the page's Content-Security-Policy forbids."""
    deadline = time.monotonic() + timeout
    while not tab.evaluate(expression):
        if time.monotonic() > deadline:
            raise AssertionError(f"still false after {timeout} s: {expression}")
        time.sleep(0.1)


def drawn_layers(path: Path) -> list[tuple[str, str, int, int]]:
    """(name, kind, depth, file column) of every layer, input first, read with h5py."""
    with h5py.File(path, "r") as f:
        table = f["layers"][()]
    rows = [
        (r["name"].decode(), r["kind"].decode(), int(r["depth"]), i) for i, r in enumerate(table)
    ]
    return sorted(rows, key=lambda r: (r[2], r[3]))


def test_report_opens_offline_and_shows_the_stored_values(
    tmp_path: Path, recorded: tuple[Path, Path], page: tuple[Any, list[str]]
) -> None:
    tab, errors = page
    layers = drawn_layers(recorded[0])
    # Infinite values recorded as such (the update ratio of a weight whose norm is 0 is
    # +inf), crafted into a copy of run A: rows 1 and 2 of the heat map, steps 4 and 9.
    runs = [tmp_path / "a.h5", recorded[1]]
    shutil.copy(recorded[0], runs[0])
    infinite = {(1, 4): np.inf, (2, 9): -np.inf}
    with h5py.File(runs[0], "r+") as f:
        for (row, step), value in infinite.items():
            f["stats/param/update_ratio"][step, layers[row][3]] = value
    out = build_report(runs, tmp_path / "report.html")
    requested: list[str] = []

    def only_the_file(route: Any) -> None:
        requested.append(route.request.url)
        if route.request.url.startswith("file://"):
            route.continue_()
        else:
            route.abort()

    tab.route("**/*", only_the_file)
    tab.goto(out.as_uri())
    wait_until(tab, "window.gradflowReady === true")
    assert errors == []
    assert requested == [out.as_uri()]
    if SCREENSHOTS:  # plots below the screen are drawn when scrolled to, or for printing
        tab.evaluate("window.dispatchEvent(new Event('beforeprint'))")
        wait_until(tab, "[...document.querySelectorAll('.plot')].every(d => d.dataset.drawn)")
        shoot(tab, "report_overview.png", full_page=True)

    ratios = []
    for path in runs:
        with h5py.File(path, "r") as f:
            assert np.array_equal(f["steps"][()], np.arange(20))  # a heat-map column per step
            ratios.append(np.asarray(f["stats/param/update_ratio"][()], np.float64))
    ratio = ratios[0]
    plot = "heat-param-update_ratio-run0"
    row, step = 3, 7
    name, kind, depth, column = layers[row]
    tab.locator(f"#{plot}").scroll_into_view_if_needed()
    wait_until(tab, f"document.getElementById('{plot}').dataset.drawn === '1'")
    point = tab.evaluate(CELL_CENTRE, [plot, row, step])
    tab.mouse.move(point["x"], point["y"])
    tab.wait_for_selector("#tooltip:not([hidden])", timeout=10_000)
    assert tab.inner_text("#tooltip .val-layer") == name
    assert tab.inner_text("#tooltip .val-kind") == f"{kind}, depth {depth}"
    assert tab.inner_text("#tooltip .val-at") == f"step {step}"
    shown = float(tab.inner_text("#tooltip .val-value"))
    assert shown == pytest.approx(ratio[step, column], rel=5e-4)  # 4 significant digits
    shoot(tab, "report_hover.png")

    # One colour scale for both runs. Log colour: its top is log10 of the largest finite
    # value of either run; linear: that value itself.
    largest = max(r[np.isfinite(r)].max() for r in ratios)
    top = tab.evaluate(f"document.getElementById('{plot}').data[0].zmax")
    assert top == pytest.approx(np.log10(largest), rel=1e-5)
    # +-inf: "inf" / "-inf" on hover, coloured at the top / bottom of the colour scale
    # (plotly would leave them blank, like a cell without a value).
    scale = tab.evaluate(f"[document.getElementById('{plot}').data[0].zmin, {top}]")
    for (row, step), value in infinite.items():
        assert ratio[step, layers[row][3]] == value  # as stored
        point = tab.evaluate(CELL_CENTRE, [plot, row, step])
        tab.mouse.move(point["x"], point["y"])
        wait_until(tab, f"document.querySelector('#tooltip .val-at').textContent === 'step {step}'")
        assert tab.inner_text("#tooltip .val-layer") == layers[row][0]
        assert tab.inner_text("#tooltip .val-value") == ("inf" if value > 0 else "-inf")
        cell = tab.evaluate(f"document.getElementById('{plot}').data[0].z[{row}][{step}]")
        assert cell == pytest.approx(scale[value > 0], rel=1e-6)
    note = tab.inner_text("#heat-param-update_ratio .note")
    assert "infinite values at the ends of the colour scale" in note
    tab.uncheck("#log-colour")
    wait_until(tab, f"document.getElementById('{plot}').data[0].zmax !== {top}")
    top = tab.evaluate(f"document.getElementById('{plot}').data[0].zmax")
    assert top == pytest.approx(largest, rel=1e-5)

    # Zoom: dragging over steps 2..8 narrows the time axis to them.
    start, end = (tab.evaluate(CELL_CENTRE, [plot, 1, col]) for col in (2, 8))
    tab.mouse.move(start["x"], start["y"])
    tab.mouse.down()
    tab.mouse.move(end["x"], end["y"] + 40, steps=8)
    tab.mouse.up()
    wait_until(tab, f"document.getElementById('{plot}').layout.xaxis.autorange === false")
    low, high = tab.evaluate(f"document.getElementById('{plot}').layout.xaxis.range")
    assert low == pytest.approx(2, abs=0.05) and high == pytest.approx(8, abs=0.05)

    assert tab.get_attribute(f"#{plot}", "data-rows") == str(len(layers))
    tab.fill("#layer-filter", "down")
    matching = [lay for lay in layers if "down" in lay[0]]
    assert 0 < len(matching) < len(layers)
    wait_until(tab, f"document.getElementById('{plot}').dataset.rows === '{len(matching)}'")
    assert tab.inner_text("#layer-count").count(f"{len(matching)} of {len(layers)} layers") == 2
    # The difference heat map of the two runs filters the same way.
    assert tab.get_attribute(f"#{plot[: -len('run0')]}diff", "data-rows") == str(len(matching))
    assert errors == []


def _wait_for_steps(path: Path, at_least: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open_run(path) as run:
                if run.n_steps >= at_least:
                    return
        except GradflowError:
            pass  # not created yet
        time.sleep(0.1)
    raise AssertionError(f"{path} did not reach {at_least} steps in {timeout} s")


@pytest.mark.slow
def test_serve_shows_a_run_while_it_is_written(tmp_path: Path, page: tuple[Any, list[str]]) -> None:
    tab, errors = page
    path = tmp_path / "live.h5"
    script = Path(__file__).parent / "scripts" / "tiny_run.py"
    # Ctrl-C reaches the children even where the test runner ignores SIGINT.
    default_sigint = {"preexec_fn": lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    writer = subprocess.Popen(
        [sys.executable, str(script), str(path), "100000", "0.1"], env=env, **default_sigint
    )
    server = None
    try:
        _wait_for_steps(path, 1)
        server = subprocess.Popen(
            [sys.executable, "-m", "gradflow.cli.main", "serve", str(path), "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            **default_sigint,
        )
        assert server.stdout is not None
        line = server.stdout.readline()
        assert " at http://127.0.0.1:" in line, line
        tab.goto(line.split(" at ")[1].split()[0])
        wait_until(tab, "window.gradflowReady === true")
        first = int(tab.get_attribute("#run-0-steps", "data-steps") or 0)
        assert first >= 1
        wait_until(tab, f"Number(document.getElementById('run-0-steps').dataset.steps) > {first}")
        assert writer.poll() is None, "the run finished before the page saw it grow"
        shoot(tab, "report_live.png")
        # A deleted file: the page says so and keeps showing the last data read.
        path.unlink()
        wait_until(tab, "document.getElementById('live-status').textContent.includes('no such')")
        status = tab.inner_text("#live-status")
        assert f"{path}: no such run file" in status and "last data" in status
        assert int(tab.get_attribute("#run-0-steps", "data-steps") or 0) > first
        assert errors == []
        server.send_signal(signal.SIGINT)
        _, err = server.communicate(timeout=30)
        assert server.returncode == 0 and err == "gradflow: stopped serving\n"
    finally:
        for child in (server, writer):
            if child is not None and child.poll() is None:
                child.kill()
                child.communicate()


# -- the sweep page ---------------------------------------------------------------------------
# The middle of cell (row, column) of the first small multiple (category y axis: row index).
SWEEP_CELL = """([id, row, x]) => {
  const div = document.getElementById(id);
  const xa = div._fullLayout.xaxis, ya = div._fullLayout.yaxis, box = div.getBoundingClientRect();
  return {x: box.left + xa._offset + xa.l2p(x), y: box.top + ya._offset + ya.l2p(row)};
}"""


def _only_the_file(tab: Any, out: Path) -> list[str]:
    requested: list[str] = []

    def route(handler: Any) -> None:
        requested.append(handler.request.url)
        if handler.request.url.startswith("file://"):
            handler.continue_()
        else:
            handler.abort()

    tab.route("**/*", route)
    return requested


def _final_loss(path: Path) -> float:
    """Mean logged loss over the last epoch's steps, read with h5py."""
    with h5py.File(path, "r") as f:
        n = int(f["counts"][0])
        epoch, loss = f["epoch"][:n], f["loss"][:n].astype(np.float64)
    return float(loss[epoch == epoch[-1]].mean())


@pytest.mark.slow
def test_sweep_page_of_40_runs(ablation: Path, tmp_path: Path, page: tuple[Any, list[str]]) -> None:
    from sweeps import MODELS, OPTIMIZERS, SEEDS, ablation_config, run_name

    import gradflow

    tab, errors = page
    out = gradflow.sweep(ablation).write_html(tmp_path / "sweep.html")
    requested = _only_the_file(tab, out)
    tab.goto(out.as_uri(), timeout=120_000)  # 5 MB of inlined script on a loaded machine
    wait_until(tab, "window.gradflowReady === true")
    assert errors == [] and requested == [out.as_uri()]
    assert tab.inner_text("#structure") == (
        "model.name (2) x optimizer.name (2) x seed (10): 40 runs, every combination"
    )
    assert tab.locator("#notes li").all_inner_texts() == [
        "model.name sets model.blocks, model.conv_layers",
        "optimizer.name sets optimizer.momentum",
    ]
    header = tab.locator("#runs th").all_inner_texts()
    assert header == [
        "run",
        "model.name",
        "optimizer.name",
        "seed",
        "optimizer.lr",
        "final_loss",
        "centre_edge",
        "best_val_loss",
    ]
    rows = [
        tab.locator(f"#runs tbody tr:nth-child({i + 1}) td").all_inner_texts() for i in range(40)
    ]
    expected = [(m, o, s) for m in MODELS for o in OPTIMIZERS for s in SEEDS]
    for cells, (model, optimizer, seed) in zip(rows, expected, strict=True):
        config = ablation_config(model, optimizer, seed)
        assert cells[:5] == [
            run_name(model, optimizer, seed),
            model,
            optimizer,
            str(seed),
            str(config["optimizer"]["lr"]),
        ]
        assert float(cells[5]) == pytest.approx(_final_loss(ablation / cells[0]), rel=5e-4)
    # The scalar plot, against the first setting by default: per optimizer a line through
    # the mean final loss over the seeds.
    lines = tab.evaluate(
        "document.getElementById('scalar-plot').data"
        ".filter(t => t.mode === 'lines+markers').map(t => [t.name, t.x, t.y])"
    )
    assert [line[0] for line in lines] == list(OPTIMIZERS)
    for name, xs, ys in lines:
        assert xs == list(MODELS)
        means = [
            np.mean([_final_loss(ablation / run_name(m, name, s)) for s in SEEDS]) for m in MODELS
        ]
        assert ys == pytest.approx(means, rel=1e-6)
    tab.select_option("#x", "optimizer.lr")
    wait_until(
        tab, "document.getElementById('scalar-plot').dataset.key === 'final_loss|optimizer.lr'"
    )
    assert tab.evaluate("document.getElementById('scalar-plot')._fullLayout.xaxis.type") == "log"
    # Small multiples: one plot per statistic, one heat map per model and optimizer.
    plots = tab.evaluate("[...document.querySelectorAll('#heatmaps .plot')].map(d => d.id)")
    assert plots == ["heat-epoch-update_abs_mean", "heat-param-grad_norm", "heat-grad_output-norm"]
    for plot in plots:
        count = f"document.getElementById('{plot}').data.filter(t => t.type === 'heatmap').length"
        assert tab.evaluate(count) == 4
    # Hover on the first panel (tiny-a, rmsprop): layer, epoch and the seeds' mean value.
    plot, row, epoch = "heat-epoch-update_abs_mean", 3, 1
    with h5py.File(ablation / run_name("tiny-a", "rmsprop", 0), "r") as f:
        table = f["layers"][()]
    convs = sorted(
        (i for i, r in enumerate(table) if r["kind"] == b"conv"),
        key=lambda i: (int(table[i]["depth"]), i),
    )
    values = []
    for seed in SEEDS:
        with h5py.File(ablation / run_name("tiny-a", "rmsprop", seed), "r") as f:
            values.append(float(f["epochs/update_abs_mean"][epoch, convs[row]]))
    tab.locator(f"#{plot}").scroll_into_view_if_needed()
    point = tab.evaluate(SWEEP_CELL, [plot, row, epoch])
    tab.mouse.move(point["x"], point["y"])
    wait_until(tab, "document.querySelector('.hoverlayer .hovertext') !== null")
    label = tab.evaluate("document.querySelector('.hoverlayer .hovertext').textContent")
    assert f"layer {table[convs[row]]['name'].decode()}" in label and f"epoch {epoch}" in label
    shown = float(re.search(r"over the epoch ([-\d.e+]+)", label).group(1))
    assert shown == pytest.approx(np.mean(values), rel=5e-4)
    # Sorting by a column: the lowest final loss first.
    tab.click("#runs th:nth-child(6)")
    first = float(tab.inner_text("#runs tbody tr:first-child td:nth-child(6)"))
    assert first == pytest.approx(min(_final_loss(p) for p in ablation.glob("*.h5")), rel=5e-4)
    assert errors == []
    shoot(tab, "sweep_synthetic.png", full_page=True)


def test_sweep_page_shows_text_from_run_files_as_text(
    tmp_path: Path, page: tuple[Any, list[str]]
) -> None:
    from runfiles import write_run

    import gradflow

    names = ['<img src=x onerror="window.pwned=1">', "<script>window.pwned=2</script>"]
    for i, name in enumerate(names):
        write_run(tmp_path / f"r{i}.h5", epochs=2, compact=False, config={"model": {"name": name}})
    tab, errors = page
    dialogs: list[str] = []
    tab.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    out = gradflow.sweep(tmp_path, cache=False).write_html(tmp_path / "sweep.html")
    requested = _only_the_file(tab, out)
    tab.goto(out.as_uri(), timeout=120_000)  # 5 MB of inlined script on a loaded machine
    wait_until(tab, "window.gradflowReady === true")
    assert tab.locator("#runs tbody td:nth-child(2)").all_inner_texts() == sorted(names)
    assert tab.evaluate("window.pwned") is None and dialogs == [] and errors == []
    assert tab.evaluate("document.querySelectorAll('img, main script').length") == 0
    legend = tab.evaluate("document.getElementById('scalar-plot').data.map(t => t.name)")
    assert not any("<img" in (n or "") or "<script" in (n or "") for n in legend)  # escaped
    assert requested == [out.as_uri()]


def test_report_says_how_many_layers_were_never_measured(
    tmp_path: Path, page: tuple[Any, list[str]]
) -> None:
    tab, errors = page
    run = tmp_path / "frozen.h5"
    test_frozen.record(run)  # layer "0" frozen throughout
    out = build_report([run], tmp_path / "report.html")
    tab.goto(out.as_uri())
    wait_until(tab, "window.gradflowReady === true")
    plot = "heat-param-grad_norm-run0"
    tab.locator(f"#{plot}").scroll_into_view_if_needed()
    wait_until(tab, f"document.getElementById('{plot}').dataset.drawn === '1'")
    assert tab.get_attribute(f"#{plot}", "data-rows") == "3"
    note = tab.inner_text("#heat-param-grad_norm .note")
    assert "1 layer never measured in this range is not drawn" in note
    assert tab.inner_text("#layer-count") == "frozen: 3 of 3 layers (1 never measured: not shown)"
    assert errors == []
