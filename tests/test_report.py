"""The HTML report's data and page, and the live server, without a browser.

Heat-map values are checked against the run file read with h5py and binned with numpy in
float64; the page is checked to load nothing from the network.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
from runfiles import SyntheticRun, conv_stack, fcn_layers, live_writer, write_run

from gradflow.cli.main import main
from gradflow.errors import GradflowError
from gradflow.report import build_report, payload
from gradflow.report.data import to_json
from gradflow.report.server import LiveRuns, ReportServer, is_loopback
from gradflow.runfile import Layer, open_run

DATA_SCRIPT = re.compile(
    r'<script id="gradflow-data" type="application/json">(.*?)</script>', re.DOTALL
)


def matrix(b64: str, n_rows: int) -> np.ndarray:
    """A heat map's values as sent to the page: [layer, time bin]."""
    return np.frombuffer(base64.b64decode(b64), "<f4").reshape(n_rows, -1)


def section(data: dict, stat: str) -> dict:
    return next(s for s in data["heatmaps"] if s["stat"] == stat)


def exit_status(argv: list[str]) -> int:
    """The exit status of the command line ``gradflow ARGV``."""
    try:
        main(argv)
    except SystemExit as done:
        return int(done.code or 0)
    return 0


def stored(path: Path, key: str) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return np.asarray(f[key][()], np.float64)


@pytest.fixture(scope="module")
def long_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("report") / "long.h5"
    with SyntheticRun(path, fcn_layers(), steps_per_epoch=100) as run:
        for _ in range(12):
            run.steps(100).epoch()
    return path


def test_heat_maps_are_the_run_files_values_binned_to_the_screen(long_run: Path) -> None:
    with open_run(long_run) as run:
        data = payload([run], max_bins=100)
    n_layers = len(fcn_layers())
    # 1200 steps into 100 bins of 12 steps: NaN-ignoring means, float64 reference.
    raw = stored(long_run, "stats/param/update_ratio")
    reference = np.nanmean(raw.reshape(100, 12, n_layers), axis=1).T
    panel = section(data, "param/update_ratio")["panels"][0]
    np.testing.assert_allclose(matrix(panel["values"], n_layers), reference, rtol=1e-6)
    assert panel["spans"][0] == [0, 11] and panel["spans"][-1] == [1188, 1199]
    assert len(panel["edges"]) == 101 and panel["rows"] == list(range(n_layers))
    # 12 epochs fit: one column per epoch, exactly as stored.
    epochs = section(data, "epoch/update_abs_mean")
    assert epochs["unit"] == "epoch"
    np.testing.assert_array_equal(
        matrix(epochs["panels"][0]["values"], n_layers),
        stored(long_run, "epochs/update_abs_mean").T.astype(np.float32),
    )
    fractions = section(data, "activation/zero_fraction")
    assert fractions["range"] == [0.0, 1.0] and not fractions["log"]
    assert [s["stat"] for s in data["heatmaps"]] == [
        "epoch/update_abs_mean",
        "param/update_ratio",
        "param/grad_norm",
        "grad_output/norm",
        "activation/zero_fraction",
    ]
    summary = data["runs"][0]["summary"]  # what `gradflow info` prints
    assert "1200 recorded (steps 0..1199)" in summary and "12 closed" in summary
    assert "health: no vanishing or exploding updates" in summary
    curves = data["runs"][0]["curves"]
    assert curves["metrics"]["val_loss"]["x"] == list(range(12))
    np.testing.assert_allclose(
        curves["metrics"]["val_loss"]["y"], stored(long_run, "epochs/metrics/values")[:12, 1]
    )
    assert len(curves["loss"]["x"]) == 1200  # under CURVE_POINTS: every step


def test_runs_share_one_colour_scale_and_differ_by_layer_name(tmp_path: Path) -> None:
    layers_a = fcn_layers()
    # B lacks one of A's layers, has one A lacks, and orders its file columns differently.
    names_b = [lay.name for lay in layers_a if lay.name != "up1.0.conv"] + ["extra.conv"]
    order = np.random.default_rng(0).permutation(len(names_b))
    layers_b = [
        Layer(
            index=i, name=names_b[j], kind="conv", type="Conv2d", depth=int(j), n_params=9, shape=""
        )
        for i, j in enumerate(order)
    ]
    a = write_run(tmp_path / "a.h5", layers=layers_a, seed=1)
    b = write_run(tmp_path / "b.h5", layers=layers_b, seed=2)
    with open_run(a) as run_a, open_run(b) as run_b:
        data = payload([run_a, run_b])
    stat = section(data, "epoch/update_abs_mean")
    va, vb = stored(a, "epochs/update_abs_mean"), stored(b, "epochs/update_abs_mean")
    both = np.concatenate([va.ravel(), vb.ravel()])
    np.testing.assert_allclose(stat["range"], [both.min(), both.max()], rtol=1e-6)
    diff = stat["diff"]
    shown = [data["runs"][0]["layers"][row]["name"] for row in diff["rows"]]
    assert shown == [lay.name for lay in layers_a if lay.name != "up1.0.conv"]
    column_b = {lay.name: lay.index for lay in layers_b}
    col_a = [lay.index for lay in layers_a if lay.name in column_b]
    want = va[:, col_a].T - vb[:, [column_b[n] for n in shown]].T
    np.testing.assert_allclose(matrix(diff["diff"], len(shown)), want, rtol=1e-5, atol=1e-12)
    ratio = np.log10(va[:, col_a].T / vb[:, [column_b[n] for n in shown]].T)
    np.testing.assert_allclose(matrix(diff["ratio"], len(shown)), ratio, rtol=1e-5, atol=1e-6)
    assert "only in" in diff["note"] and "up1.0.conv" in diff["note"]
    assert "extra.conv" in diff["note"]
    # Fractions differ as A − B only (the ratio of two zero fractions is 0 / 0).
    fractions = section(data, "activation/zero_fraction")["diff"]
    assert "ratio" not in fractions and len(matrix(fractions["diff"], len(shown))) == len(shown)


def test_the_first_non_finite_value_is_marked(tmp_path: Path) -> None:
    path = tmp_path / "nan.h5"
    with SyntheticRun(path, fcn_layers()) as run:
        run.steps(10).epoch()
        run.nonfinite(7, "up1.0.conv", probe="grad_output")
    with open_run(path) as opened:
        data = payload([opened])
    assert data["runs"][0]["events"] == [
        {"layer": "up1.0.conv", "step": 7, "epoch": 0, "probe": "grad_output"}
    ]


def test_infinite_values_reach_the_page_apart_from_missing_ones(tmp_path: Path) -> None:
    path = write_run(tmp_path / "inf.h5", epochs=1)
    # The update ratio of a weight whose norm is 0 is +inf; -inf is crafted to test its sign.
    with h5py.File(path, "r+") as f:
        ratio = f["stats/param/update_ratio"]
        ratio[2, 0], ratio[5, 1], ratio[7, 0] = np.inf, -np.inf, np.nan
    raw = stored(path, "stats/param/update_ratio")
    n_layers = raw.shape[1]
    with open_run(path) as run, warnings.catch_warnings():
        warnings.simplefilter("error")  # inf - inf in the difference map warns nothing
        exact = payload([run])
        binned = payload([run], max_bins=5)
        twice = payload([run, run])
    stat = section(exact, "param/update_ratio")
    values = matrix(stat["panels"][0]["values"], n_layers)
    # float32 carries NaN and +-inf through base64 unchanged: JSON needs neither.
    np.testing.assert_array_equal(values, raw.T.astype(np.float32))
    assert values[0, 2] == np.inf and values[1, 5] == -np.inf and np.isnan(values[0, 7])
    assert stat["infinite"] and not section(exact, "param/grad_norm")["infinite"]
    finite = raw[np.isfinite(raw)]
    np.testing.assert_allclose(stat["range"], [finite.min(), finite.max()], rtol=1e-6)
    # Bins of two steps: a mean with +-inf in it is +-inf, NaN is left out of the mean.
    means = matrix(section(binned, "param/update_ratio")["panels"][0]["values"], n_layers)
    assert means[0, 1] == np.inf and means[1, 2] == -np.inf
    assert means[0, 3] == np.float32(raw[6, 0])
    diff = matrix(section(twice, "param/update_ratio")["diff"]["diff"], n_layers)
    assert np.isnan(diff[0, 2]) and np.isnan(diff[1, 5])
    assert np.all(diff[np.isfinite(raw.T)] == 0)
    assert json.loads(to_json(exact)) == exact  # valid JSON: no bare Infinity or NaN


def test_report_replaces_only_a_regular_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = write_run(tmp_path / "a.h5", epochs=1)
    fifo = tmp_path / "fifo.html"
    os.mkfifo(fifo)
    assert exit_status(["report", str(run), "--out", str(fifo), "--force"]) == 2
    assert capsys.readouterr().err == (
        f"gradflow: error: {fifo}: a FIFO, not a regular file; not replacing it\n"
    )
    assert fifo.is_fifo()
    (tmp_path / "dir.html").mkdir()
    with pytest.raises(GradflowError, match="is a directory"):
        build_report([run], tmp_path / "dir.html", force=True)


def test_the_report_is_one_file_that_needs_no_network(tmp_path: Path) -> None:
    hostile = "</script><script>alert(1)</script>"
    layers = [*fcn_layers()[:-1], Layer(21, hostile, "conv", "Conv2d", 21, 9, "")]
    run = write_run(tmp_path / "a.h5", layers=layers)
    out = build_report([run], tmp_path / "report.html")
    text = out.read_text(encoding="utf-8")
    assert out.stat().st_size < 6e6  # plotly.js is about 4.8 MB of it
    assert not re.search(r"<script[^>]*\bsrc\s*=", text, re.IGNORECASE)
    assert text.count("<script") == 3  # plotly.js, the data, the page's script
    markup = re.sub(r"<(script|style)\b.*?</\1>", "", text, flags=re.DOTALL)
    assert not re.search(r"<link\b|(src|href)\s*=|https?:", markup, re.IGNORECASE)
    # The page forbids itself any request but to the server that sent it (live view).
    assert "connect-src 'self'" in markup and "default-src 'none'" in markup
    found = DATA_SCRIPT.search(text)
    assert found is not None
    data = json.loads(found.group(1))
    assert data["runs"][0]["layers"][-1]["name"] == hostile


def test_bad_report_requests_give_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = write_run(tmp_path / "a.h5", epochs=1)
    with pytest.raises(GradflowError, match=r"name it \.html"):
        build_report([run], tmp_path / "report.png")
    build_report([run], tmp_path / "r.html")
    with pytest.raises(GradflowError, match="exists; pass --force"):
        build_report([run], tmp_path / "r.html")
    build_report([run], tmp_path / "r.html", force=True)
    (tmp_path / "text.h5").write_text("not a run\n")
    for args, message in [
        ([run], "missing --out"),
        ([tmp_path / "text.h5", "--out", tmp_path / "x.html"], "not an HDF5 file"),
        ([run, "--out", tmp_path / "no" / "x.html"], "does not exist"),
    ]:
        with pytest.raises(SystemExit) as done:
            main(["report", *map(str, args)])
        err = capsys.readouterr().err
        assert done.value.code == 2 and message in err and err.count("\n") == 1
    assert exit_status(["report", str(run), "--out", str(tmp_path / "cli.html")]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {tmp_path / 'cli.html'} (")


def test_live_data_is_reread_at_most_once_per_interval(tmp_path: Path) -> None:
    path = tmp_path / "live.h5"
    with live_writer(path) as tell:
        tell("steps 10", "commit")
        live = LiveRuns([path], min_interval=3600.0)
        try:
            assert json.loads(live.status())["counts"] == [[10, 0, 0]]
            tell("steps 10", "epoch", "commit")
            assert json.loads(live.status())["counts"] == [[10, 0, 0]]  # within the interval
            live.min_interval = 0.0
            assert json.loads(live.status())["counts"] == [[20, 1, 0]]
            assert json.loads(live.data())["runs"][0]["steps"] == 20
            # Closing compacts: a new file is renamed over the one being read.
            tell("steps 5", "close")
            assert json.loads(live.status())["counts"] == [[25, 1, 0]]
        finally:
            live.close()


def test_live_data_survives_a_bad_file_and_reads_the_next_good_one(tmp_path: Path) -> None:
    path = write_run(tmp_path / "run.h5", epochs=1)
    live = LiveRuns([path], min_interval=0.0)
    try:
        (tmp_path / "junk").write_text("not a run\n")
        os.replace(tmp_path / "junk", path)
        status = json.loads(live.status())
        assert status["counts"] == [[10, 1, 0]] and "not an HDF5 file" in status["error"]
        assert json.loads(live.data())["runs"][0]["epochs"] == 1  # the last good data
        os.replace(write_run(tmp_path / "next.h5", epochs=3), path)
        status = json.loads(live.status())
        assert status["counts"] == [[30, 3, 0]] and status["error"] == ""
    finally:
        live.close()


def test_live_data_follows_a_replaced_file_and_reports_a_deleted_one(tmp_path: Path) -> None:
    path = write_run(tmp_path / "run.h5", epochs=2)
    other = write_run(tmp_path / "other.h5", epochs=2, layers=conv_stack(5))
    with pytest.raises(GradflowError, match=r"none\.h5: no such run file"):
        LiveRuns([path, tmp_path / "none.h5"])
    live = LiveRuns([path], min_interval=0.0)
    try:
        before = json.loads(live.status())
        first_layer = json.loads(live.data())["runs"][0]["layers"][0]["name"]
        # Another run with the same row counts renamed over the file.
        os.replace(other, path)
        status = json.loads(live.status())
        assert status["counts"] == before["counts"] and status["error"] == ""
        assert status["version"] != before["version"]  # the page fetches the data again
        layers = json.loads(live.data())["runs"][0]["layers"]
        assert [lay["name"] for lay in layers] == [lay.name for lay in conv_stack(5)]
        assert layers[0]["name"] != first_layer
        path.unlink()
        status = json.loads(live.status())
        assert status["error"] == f"{path}: no such run file"
        assert status["counts"] == before["counts"]
        assert len(json.loads(live.data())["runs"][0]["layers"]) == 5  # the last good data
        os.replace(write_run(tmp_path / "back.h5", epochs=1), path)
        status = json.loads(live.status())
        assert status["counts"] == [[10, 1, 0]] and status["error"] == ""
    finally:
        live.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ReportServer]:
    run = write_run(tmp_path / "a.h5", epochs=2)
    with ReportServer([run], port=0) as srv:
        thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
        thread.start()
        yield srv
        srv.shutdown()
        thread.join()


def get(url: str, host: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_server_serves_only_its_fixed_routes(server: ReportServer) -> None:
    assert server.url.startswith("http://127.0.0.1:")
    status, body = get(server.url)
    assert status == 200 and b'id="gradflow-data" type="application/json">null<' in body
    status, body = get(server.url + "data.json?run=../../etc/passwd")
    assert status == 200 and json.loads(body)["runs"][0]["epochs"] == 2
    status, body = get(server.url + "status.json")
    assert json.loads(body) == {"counts": [[20, 2, 0]], "version": 1, "error": ""}
    for path in ("a.h5", "../a.h5", "%2e%2e/a.h5", "data.json/../a.h5", "index.html"):
        assert get(server.url + path)[0] == 404
    # A page of another site whose name resolves to 127.0.0.1 is refused.
    assert get(server.url, host="attacker.example:8050")[0] == 403
    assert get(server.url, host=f"localhost:{server.server_address[1]}")[0] == 200


def test_serve_listens_on_loopback_unless_asked(tmp_path: Path, server: ReportServer) -> None:
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2")
    with pytest.raises(GradflowError, match="in use"):
        ReportServer([write_run(tmp_path / "b.h5", epochs=1)], port=server.server_address[1])


def test_serve_listens_on_ipv6_loopback(tmp_path: Path) -> None:
    try:
        socket.socket(socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 on this machine")
    with ReportServer([write_run(tmp_path / "a.h5", epochs=1)], host="::1", port=0) as srv:
        thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
        thread.start()
        try:
            assert srv.url.startswith("http://[::1]:")
            status, body = get(srv.url + "status.json")
            assert status == 200 and json.loads(body)["counts"] == [[10, 1, 0]]
        finally:
            srv.shutdown()
            thread.join()


def test_report_and_serve_never_import_torch(tmp_path: Path) -> None:
    run = write_run(tmp_path / "a.h5", epochs=1)
    code = (
        "import sys\n"
        "from gradflow.cli.main import main\n"
        "import gradflow.report.server\n"
        "try:\n"
        f"    main(['report', {str(run)!r}, '--out', {str(tmp_path / 'r.html')!r}])\n"
        "except SystemExit as done:\n"
        "    assert done.code == 0, done.code\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"
    assert (tmp_path / "r.html").stat().st_size > 0


def test_a_run_without_rows_yet_gives_a_page_without_heat_maps(tmp_path: Path) -> None:
    with SyntheticRun(tmp_path / "new.h5", fcn_layers()):
        pass
    with open_run(tmp_path / "new.h5") as fresh:
        data = payload([fresh])
    assert data["heatmaps"] == []
    assert data["runs"][0]["steps"] == 0 and data["runs"][0]["curves"]["loss"]["x"] == []


def test_serve_warns_when_asked_for_a_non_loopback_host(tmp_path: Path) -> None:
    run = write_run(tmp_path / "a.h5", epochs=1)
    command = ["serve", str(run), "--host", "0.0.0.0", "--port", "0"]
    server = subprocess.Popen(
        [sys.executable, "-m", "gradflow.cli.main", *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert server.stdout is not None and server.stderr is not None
        assert server.stderr.readline() == (
            "gradflow: warning: listening on 0.0.0.0: anyone who can reach this machine "
            "can read these runs\n"
        )
        assert " at http://0.0.0.0:" in server.stdout.readline()
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=30) == 0
        assert server.stderr.read() == "gradflow: stopped serving\n"
    finally:
        server.kill()
        server.communicate()
