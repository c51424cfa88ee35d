"""Runs in Jupyter: ``Run._repr_html_``, ``gradflow.show`` (values against the file read with
h5py, colours against the browser report) and ``examples/quickstart.ipynb`` executed on a
real kernel.

With ``GRADFLOW_SCREENSHOTS=DIR`` the notebook test also renders the executed notebook's
cells and outputs as one page in headless Chromium (as Jupyter shows them: HTML, text, plotly
figures) and saves its top 2000 pixels as ``notebook.png`` there.
"""

from __future__ import annotations

import base64
import html
import io
import os
import re
import shutil
from pathlib import Path
from typing import Any

import chromium
import h5py
import numpy as np
import pytest
from PIL import Image
from runfiles import SyntheticRun, fcn_layers

import gradflow
from gradflow.errors import GradflowError
from gradflow.report import payload
from gradflow.runfile import open_run

EXAMPLE = Path(__file__).parents[1] / "examples" / "quickstart.ipynb"
SCREENSHOTS = os.environ.get("GRADFLOW_SCREENSHOTS")


def conv_columns(path: Path) -> list[int]:
    """File columns of the conv layers in depth order, read with h5py."""
    with h5py.File(path, "r") as f:
        table = f["layers"][()]
    convs = [i for i, r in enumerate(table) if r["kind"] == b"conv"]
    return sorted(convs, key=lambda i: (int(table[i]["depth"]), i))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("notebook")
    hostile = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    with SyntheticRun(root / "epochs.h5", fcn_layers(), model=hostile) as run:
        for _ in range(4):
            run.steps(10).epoch()
        run.nonfinite(15, "up1.0.conv")
    with SyntheticRun(root / "steps.h5", fcn_layers()) as run:
        run.steps(1200)
    SyntheticRun(root / "empty.h5", fcn_layers()).close()
    return {p.stem: p for p in root.glob("*.h5")}


def _thumbnail(view: str) -> Image.Image:
    found = re.search(r'src="data:image/png;base64,([^"]+)"', view)
    assert found is not None
    return Image.open(io.BytesIO(base64.b64decode(found.group(1))))


def test_a_run_shows_its_summary_and_a_heat_map(runs: dict[str, Path]) -> None:
    with open_run(runs["epochs"]) as run:
        view = run._repr_html_()
        assert view.startswith('<div class="gradflow-run"')
        # gradflow info's text, escaped: the model name from the file is shown, never run.
        assert "<script>" not in view and "<img src=x" not in view
        assert html.escape(run.name) in view
        assert "4 closed" in view and "40 recorded (steps 0..39)" in view
        assert 'alt="updates-heatmap of epoch/update_abs_mean, log colour' in view
    image = _thumbnail(view)
    assert image.size == (336, 288)  # 4.2 x 3.6 inches at 80 dpi
    assert len(image.convert("RGB").getcolors(1 << 16) or []) > 50  # a heat map, not blank
    with open_run(runs["steps"]) as run:
        assert 'alt="gradient-heatmap of param/grad_norm, log colour' in run._repr_html_()
    with open_run(runs["empty"]) as run:
        view = run._repr_html_()
    assert "<i>no heat map: the runs hold no statistic with rows in common" in view
    assert "0 recorded" in view


def test_show_draws_the_stored_values_in_the_report_colours(runs: dict[str, Path]) -> None:
    path = runs["epochs"]
    fig = gradflow.show(path)  # default: the epoch updates, log colour
    (heat, marker) = fig.data
    columns = conv_columns(path)
    with h5py.File(path, "r") as f:
        stored = f["epochs/update_abs_mean"][()][:, columns].astype(np.float64)
        names = [f["layers"][i]["name"].decode() for i in columns]
    assert list(heat.y) == names
    np.testing.assert_array_equal(np.asarray(heat.customdata, np.float64), stored.T)
    np.testing.assert_allclose(np.asarray(heat.z), np.log10(stored.T), rtol=1e-6)
    assert list(heat.x) == [0, 1, 2, 3]
    assert fig.layout.coloraxis.cmin == pytest.approx(np.log10(stored.min()), rel=1e-6)
    assert fig.layout.coloraxis.cmax == pytest.approx(np.log10(stored.max()), rel=1e-6)
    with open_run(path) as run:
        report = payload([run])
    assert [list(stop) for stop in fig.layout.coloraxis.colorscale] == report["colourscales"][
        "heat"
    ]
    assert fig.layout.plot_bgcolor == report["no_value"]  # grey: not measured
    for field in ("layer %{y}", "epoch %{x}", "%{customdata:.4g}"):
        assert field in heat.hovertemplate
    # Stage marks as in the report: names at the group centres, the bottleneck in bold
    # (annotations: the layer axis keeps the layer names, which hover shows).
    groups = ["down1", "down2", "across", "up1", "up2", "final", "classifier"]
    labels = [a for a in fig.layout.annotations if a.yref == "y"]
    assert [a.text for a in labels] == ["<b>across</b>" if g == "across" else g for g in groups]
    assert [a.y for a in labels] == [0.5, 2.5, 4.5, 6.5, 8.5, 10, 11]
    assert fig.layout.yaxis.type == "category" and fig.layout.yaxis.showticklabels is False
    lines = [s for s in fig.layout.shapes if s.type == "line"]
    strips = [s for s in fig.layout.shapes if s.type == "rect"]
    assert [s.y0 for s in lines] == [1.5, 3.5, 5.5, 7.5, 9.5, 10.5]
    assert [(s.y0, s.y1) for s in strips] == [(3.5, 5.5)]
    # The first non-finite value, marked where the report marks it.
    assert (marker.x, marker.y) == ((1,), ("up1.0.conv",))


def test_long_runs_are_binned_and_infinite_values_sit_at_the_ends(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    path = tmp_path / "inf.h5"
    shutil.copy(runs["steps"], path)
    columns = conv_columns(path)
    with h5py.File(path, "r+") as f:
        f["stats/param/grad_norm"][7, columns[2]] = np.inf
        raw = f["stats/param/grad_norm"][()][:, columns].astype(np.float64)
    fig = gradflow.show([path, runs["steps"]], "param/grad_norm", max_bins=500)
    first, second = fig.data
    assert first.coloraxis == second.coloraxis == "coloraxis"
    # 1200 steps in at most 500 columns: 400 bins of 3 steps, centred, each their mean.
    means = raw.reshape(400, 3, -1).mean(axis=1)
    np.testing.assert_allclose(np.asarray(first.x), np.arange(400) * 3 + 1.0)
    finite = np.isfinite(means.T)
    np.testing.assert_allclose(np.asarray(first.customdata)[finite], means.T[finite], rtol=1e-6)
    assert "steps around %{x:.0f}" in first.hovertemplate
    z = np.asarray(first.z)
    assert np.isinf(np.asarray(first.customdata)[2, 2])
    assert z[2, 2] == pytest.approx(fig.layout.coloraxis.cmax)  # bin 2 holds step 7
    titles = [a.text for a in fig.layout.annotations if a.yref == "paper"]
    assert titles == ["tiny-fcn (inf)", "tiny-fcn (steps)"]


def test_show_refuses_bad_input_in_one_line(runs: dict[str, Path]) -> None:
    with pytest.raises(GradflowError, match="did you mean 'param/grad_norm'"):
        gradflow.show(runs["steps"], "param/grad_nrm")
    with pytest.raises(GradflowError, match="no such run file"):
        gradflow.show(runs["steps"].with_name("nope.h5"))


# -- the example notebook ---------------------------------------------------------------------
def _render(nb: Any) -> str:
    """The executed notebook as one offline page: code, then each output as Jupyter shows
    it (HTML, text, plotly figures), for a screenshot."""
    import plotly.io as pio

    from gradflow.report.page import plotly_js

    parts = []
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            heading, _, text = cell.source.partition("\n")
            if heading.startswith("# "):
                parts.append(f"<h2>{html.escape(heading[2:])}</h2>")
            else:
                text = cell.source
            code = re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text.strip()))
            parts.append(f"<p class=md>{code}</p>")
            continue
        parts.append(f"<pre class=code>{html.escape(cell.source)}</pre>")
        for out in cell.outputs:
            data = out.get("data", {})
            if "application/vnd.plotly.v1+json" in data:
                fig = data["application/vnd.plotly.v1+json"]
                parts.append(pio.to_html(fig, include_plotlyjs=False, full_html=False))
            elif "text/html" in data:
                parts.append(data["text/html"])
            elif "text/plain" in data:
                parts.append(f"<pre>{html.escape(data['text/plain'])}</pre>")
    style = (
        "body{font:13px system-ui;margin:16px;max-width:1100px}"
        "pre.code{background:#f5f5f5;border-left:3px solid #999;padding:6px}"
        "p.md{color:#333}"
    )
    return (
        f"<!DOCTYPE html><html><head><meta charset=utf-8><style>{style}</style>"
        f"<script>{plotly_js()}</script></head><body>{''.join(parts)}</body></html>"
    )


def _screenshot(page: str, out: Path) -> None:
    executable = chromium.executable()
    if executable is None:
        pytest.skip(chromium.MISSING)
    from playwright.sync_api import sync_playwright

    source = out.with_suffix(".html")
    source.write_text(page, encoding="utf-8")
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=executable, args=chromium.ARGS)
        tab = browser.new_page(viewport={"width": 1140, "height": 900})
        tab.goto(source.as_uri())
        tab.wait_for_timeout(2000)  # plotly draws after load
        height = min(2000, tab.evaluate("document.documentElement.scrollHeight"))
        tab.screenshot(
            path=str(out), full_page=True, clip={"x": 0, "y": 0, "width": 1140, "height": height}
        )
        browser.close()
    source.unlink()


@pytest.mark.slow
def test_the_quickstart_notebook_runs_on_a_real_kernel(tmp_path: Path) -> None:
    nbformat = pytest.importorskip("nbformat", reason="pip install -e '.[dev]' (notebook extra)")
    nbclient = pytest.importorskip("nbclient", reason="pip install -e '.[dev]' (notebook extra)")
    nb = nbformat.read(EXAMPLE, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # stored clean
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute(env={**os.environ, "OMP_NUM_THREADS": "1"})
    outputs = [out for c in nb.cells if c.cell_type == "code" for out in c.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    assert (tmp_path / "runs" / "quickstart" / "long-short.h5").is_file()
    views = [
        o["data"]["text/html"]
        for o in outputs
        if "gradflow-run" in o.get("data", {}).get("text/html", "")
    ]
    assert len(views) == 1 and "data:image/png;base64," in views[0]
    figures = [
        o["data"]["application/vnd.plotly.v1+json"]
        for o in outputs
        if "application/vnd.plotly.v1+json" in o.get("data", {})
    ]
    assert [[t["type"] for t in fig["data"]] for fig in figures] == [["heatmap"], ["heatmap"] * 2]
    table = outputs[-1]["data"]["text/plain"]
    assert "model.config.short_skip" in table and "final_loss" in table
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        _screenshot(_render(nb), Path(SCREENSHOTS) / "notebook.png")
