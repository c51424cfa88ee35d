"""Text from a run file carried into other formats stays text: no mathtext in figures, no
markup in the report's plots, no bidi or control characters in the page, no formulas in
CSV, no markup in Markdown, and no numpy warnings (with source lines) on extreme values.
"""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import chromium
import h5py
import matplotlib as mpl
import numpy as np
import pytest
from runfiles import STEP_STATS, SyntheticRun, fcn_layers, write_run

from gradflow.plots import FIGURES, render, save
from gradflow.report import build_report
from gradflow.report.data import payload
from gradflow.runfile import open_run

# -- mathtext ---------------------------------------------------------------------------------
# "a$\foo$b" is invalid mathtext (matplotlib raises while drawing); "$x^2$" is valid and
# would be drawn as x squared.
MATH_STAGES = ("$x^2$", r"a$\foo$b", "down", "up", "$y$")
MATH_MODEL = r"$\alpha$ net"
FIGURE_STATS = {**STEP_STATS, "skip": ["shortcut_share", "long_share"]}  # every figure draws


@pytest.fixture(scope="module")
def math_runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("math")
    paths = []
    for name in ("a", "b"):
        with SyntheticRun(folder / f"{name}.h5", fcn_layers(stages=MATH_STAGES),
                          model=MATH_MODEL, step_stats=FIGURE_STATS) as run:  # fmt: skip
            for _ in range(3):
                run.steps(10).epoch(metrics={"train_loss": 0.5, "val_loss": 0.4, "$v$": 0.3})
        paths.append(folder / f"{name}.h5")
    return paths


def _literal_strings(figure: str) -> list[str]:
    if figure in ("learning-curves", "best-losses", "centre-edge"):
        return [MATH_MODEL]
    return [MATH_STAGES[0], MATH_STAGES[1]]


@pytest.mark.parametrize("figure", FIGURES.names())
def test_dollar_signs_in_names_are_drawn_literally(
    figure: str, math_runs: list[Path], tmp_path: Path
) -> None:
    runs = [open_run(p) for p in math_runs[: 2 if figure == "diff-heatmap" else 1]]
    out = tmp_path / "figure.svg"
    # SVG with text as text: each string drawn literally appears whole in the file.
    with mpl.rc_context({"svg.fonttype": "none"}):
        save(figure, runs, out)
    # Comments hold every string as given; only the drawn text counts.
    svg = re.sub(r"<!--.*?-->", "", out.read_text(), flags=re.DOTALL)
    for text in _literal_strings(figure):
        assert text in svg, f"{text!r} not drawn literally in {figure}"
    for run in runs:
        run.close()


# -- markup in the report's plots (plotly reads a subset of HTML in every label) ---------------
MARKUP_STAGES = ('<a href="javascript:alert(1)">link</a>', "<b>bold</b>",
                 '<span style="font-size:80px">big</span>', "down", "up")  # fmt: skip
MARKUP_MODEL = "<i>model</i> &amp; co"


@pytest.fixture
def markup_report(tmp_path: Path) -> Path:
    with SyntheticRun(tmp_path / "m.h5", fcn_layers(stages=MARKUP_STAGES),
                      model=MARKUP_MODEL) as run:  # fmt: skip
        for _ in range(2):
            run.steps(10).epoch(metrics={"train_loss": 0.5, "val_loss": 0.4, "<u>m</u>": 0.3})
    return build_report([tmp_path / "m.h5"], tmp_path / "report.html")


PLOT_TEXT = """() => {
  const svgs = [...document.querySelectorAll(".plot svg")];
  const all = (sel) => svgs.flatMap((s) => [...s.querySelectorAll(sel)]);
  return {
    plots: svgs.length,
    links: all("a").length,
    styled: all("tspan[style]").filter((t) => /80px/.test(t.getAttribute("style"))).length,
    texts: all("text").map((t) => t.textContent),
  };
}"""


@pytest.mark.slow
def test_markup_in_names_shows_as_text_in_the_report(markup_report: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    executable = chromium.executable()
    if executable is None:
        pytest.skip(chromium.MISSING)
    with sync_api.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=executable, args=chromium.ARGS)
        try:
            tab = browser.new_page(viewport={"width": 1400, "height": 900})
            errors: list[str] = []
            tab.on("pageerror", lambda exc: errors.append(str(exc)))
            tab.goto(markup_report.as_uri())
            tab.wait_for_function("window.gradflowReady === true", timeout=60_000)
            tab.evaluate("window.dispatchEvent(new Event('beforeprint'))")  # draw every plot
            tab.wait_for_function(
                "[...document.querySelectorAll('.plot')].every((d) => d.dataset.drawn)",
                timeout=60_000,
            )
            found = tab.evaluate(PLOT_TEXT)
        finally:
            browser.close()
    assert errors == [] and found["plots"] >= 5
    assert found["links"] == 0 and found["styled"] == 0
    shown = "\n".join(found["texts"])
    for text in (*MARKUP_STAGES[:3], MARKUP_MODEL, "<u>m</u>"):
        assert text in shown, f"{text!r} not shown as text"


# -- bidi and control characters in the page ---------------------------------------------------
BIDI = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
HIDDEN = re.compile(f"[{BIDI}\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def test_bidi_and_control_characters_show_as_escapes_in_the_page(tmp_path: Path) -> None:
    name = "evil\u202elmth.h5"  # shows as "evilh5.html"
    run = write_run(tmp_path / name, epochs=1)
    with h5py.File(run, "r+") as f:
        config = json.loads(f.attrs["config"])
        config.update(note="\x1b[31mred\x1b[0m \u2067hidden\u2069 \x07")
        f.attrs["config"] = json.dumps(config)
    out = build_report([run], tmp_path / "report.html")
    text = out.read_text(encoding="utf-8")
    # The page's own markup (plotly.js has control characters in its strings).
    assert not HIDDEN.search(re.sub(r"<(script|style)\b.*?</\1>", "", text, flags=re.DOTALL))
    data = json.loads(re.search(r'id="gradflow-data" type="application/json">(.*?)</script>',
                                text, re.DOTALL).group(1))  # fmt: skip
    hidden = [s for s in _strings(data) if HIDDEN.search(s)]
    assert hidden == []
    shown = data["runs"][0]
    assert shown["file"] == "evil\\u202elmth.h5"
    assert dict(shown["config"])["note"] == "\\x1b[31mred\\x1b[0m \\u2067hidden\\u2069 \\x07"
    title = re.search(r"<title>(.*)</title>", text).group(1)
    assert title == "gradflow: evil\\u202elmth.h5"
    with open_run(run) as opened:
        assert not any(HIDDEN.search(s) for s in _strings(payload([opened])))


# -- CSV and Markdown ----------------------------------------------------------------------------
FORMULAS = ['=HYPERLINK("http://x","y")', "+1+1", "-2+3", "@SUM(A1)", "plain"]


@pytest.fixture(scope="module")
def formula_runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("formulas")
    paths = []
    for i, model in enumerate([*FORMULAS[:-1], "a|b <img src=x onerror=alert(1)> &"]):
        with SyntheticRun(folder / f"r{i}.h5", fcn_layers(), model=model) as run:
            run.steps(10).epoch()
        paths.append(folder / f"r{i}.h5")
    return paths


def test_csv_cells_never_start_a_formula(formula_runs: list[Path], tmp_path: Path) -> None:
    runs = [open_run(p) for p in formula_runs]
    out = save("best-losses", runs, tmp_path / "t.csv")
    rows = list(csv.reader(io.StringIO(out.read_text())))
    models = [row[0] for row in rows[1:]]
    assert models[:4] == ["'" + f for f in FORMULAS[:4]]
    # Numbers stay numbers (a negative value is not text).
    assert all(float(row[2]) == float(row[2]) for row in rows[1:])


def test_markdown_cells_are_escaped(formula_runs: list[Path], tmp_path: Path) -> None:
    runs = [open_run(p) for p in formula_runs]
    out = save("best-losses", runs, tmp_path / "t.md")
    lines = out.read_text().splitlines()
    for line in lines:
        assert len(re.findall(r"(?<!\\)\|", line)) == 6, line  # 5 columns
    assert "<img" not in out.read_text()
    assert r"a\|b &lt;img src=x onerror=alert(1)&gt; &amp;" in lines[-1]


# -- extreme values: no numpy warnings, no traceback ---------------------------------------
EXTREME = textwrap.dedent(
    """
    import contextlib, io, json, sys, warnings
    warnings.simplefilter("always")  # every warning shows, not the first per line only
    from gradflow.cli.main import main
    results = {}
    for args in json.loads(sys.argv[1]):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                main(args)
            except SystemExit as stop:
                status = stop.code
            except Exception as error:  # what the command line would show as a traceback
                status = f"Traceback: {error!r}"
        results[" ".join(args[:3])] = [status, err.getvalue()]
    print(json.dumps(results))
    """
)


def _extreme_run(path: Path, sign: float) -> Path:
    """Every float of the run at the largest magnitude its type holds (alternating sign)."""
    write_run(path, epochs=3)
    with h5py.File(path, "r+") as f:

        def fill(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset) and obj.dtype.kind == "f" and name != "time":
                values = obj[()]
                big = np.finfo(obj.dtype).max
                values[np.isfinite(values)] = sign * big
                if values.ndim and len(values) > 1:
                    values[::2] = -sign * big
                obj[...] = values

        f.visititems(fill)
    return path


@pytest.mark.slow
def test_extreme_values_give_no_warnings_or_tracebacks(tmp_path: Path) -> None:
    commands = []
    for sign, name in ((1.0, "plus"), (-1.0, "minus")):
        run = str(_extreme_run(tmp_path / f"{name}.h5", sign))
        commands += [
            ["info", run],
            ["plot", "learning-curves", run, "--out", str(tmp_path / f"{name}-l.png")],
            ["plot", "centre-edge", run, "--out", str(tmp_path / f"{name}.csv")],
        ]
    commands.append(["report", run, "--out", str(tmp_path / "report.html")])
    done = subprocess.run(
        [sys.executable, "-c", EXTREME, json.dumps(commands)],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    results = json.loads(done.stdout.splitlines()[-1])
    for command, (status, err) in results.items():
        assert status in (0, None), (command, err)
        assert "Warning" not in err and "Traceback" not in err and "overflow" not in err, (
            command, err,
        )  # fmt: skip
        assert all(line.startswith("gradflow: warning: ") for line in err.splitlines()), err
    # The centre/edge ratio of means in float64, which holds them: +-max float32 in every
    # layer, alternating over epochs -> (-1 + 1 - 1) / 3 of it in each, a ratio of 1.
    for name in ("plus", "minus"):
        table = list(csv.reader(io.StringIO((tmp_path / f"{name}.csv").read_text())))
        with open_run(tmp_path / f"{name}.h5") as opened:
            per_layer = opened.stat("epoch", "update_abs_mean").astype(np.float64).mean(axis=0)
        assert np.all(per_layer == per_layer[0]) and np.isfinite(per_layer[0])
        assert float(table[1][2]) == 1.0


@pytest.mark.parametrize("figure", ["updates-heatmap", "depth-profile"])
def test_log_ticks_are_unicode_not_raw_mathtext(
    figure: str, math_runs: list[Path], tmp_path: Path
) -> None:
    """Mathtext is off for text from files, so log ticks must not show "$\\mathdefault..."."""
    with open_run(math_runs[0]) as run:
        fig = render(figure, [run], log=True)
        fig.canvas.draw()
        labels = [t.get_text() for ax in fig.axes
                  for t in ax.get_xticklabels() + ax.get_yticklabels()]  # fmt: skip
    assert not [label for label in labels if "mathdefault" in label], labels
    assert any("10" in label and any(c in label for c in "⁰¹²³⁴⁵⁶⁷⁸⁹") for label in labels)
