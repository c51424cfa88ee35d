"""Run files from anyone: no code runs, nothing hangs, one line for every bad file.

A small real run is recorded inside the tests, then damaged (truncated, byte-flipped, its
metadata blocks hit on purpose) and forged (attributes, shapes, links, external storage) in
many ways. Each file must either read completely or give one ``GradflowError`` line, fast.
``--fuzz-seed N`` draws another set of damaged files.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
from rich.console import Console

from gradflow import GradflowError, open_run
from gradflow.cli.main import main
from gradflow.plots.info import info_panel
from gradflow.runfile import Run, printable

LIMIT_S = 10.0  # the promise: any file gives an answer within this
# Signatures that start HDF5 metadata blocks (object headers, B-trees, heaps, chunk indexes).
METADATA = [b"OHDR", b"OCHK", b"BTHD", b"BTIN", b"BTLF", b"FRHP", b"FHDB", b"FHIB", b"FSHD",
            b"FSSE", b"GCOL", b"EAHD", b"EAIB", b"EASB", b"EADB", b"FAHD", b"FADB", b"TREE",
            b"SNOD", b"HEAP"]  # fmt: skip
LAYER_DTYPE = np.dtype([("name", "S256"), ("kind", "S32"), ("type", "S64"), ("depth", "<i4"),
                        ("n_params", "<i8"), ("shape", "S256")])  # fmt: skip


def _record(path: Path, steps: int = 3, epochs: int = 2) -> None:
    import torch
    from torch import nn

    import gradflow

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probes = ("param", "activation", "grad_output")
    with gradflow.Recorder(model, opt, path, probes=probes) as rec:
        for _ in range(epochs):
            for _ in range(steps):
                opt.zero_grad()
                loss = model(torch.randn(5, 3)).pow(2).mean()
                loss.backward()
                opt.step()
                rec.log(loss=loss, lr=0.1)
            rec.epoch_end(val_loss=0.5)


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("good") / "good.h5"
    _record(path)
    return path


def read_all(run: Run) -> str:
    """Use every part of a run, as ``info``, ``plot`` and the API do; the info text."""
    steps = run.steps
    for probe, names in run.probes().items():
        for name in names:
            assert run.stat(probe, name).shape == (len(steps), run.n_layers)
    for name in run.epoch_stats():
        assert run.stat("epoch", name).shape == (run.n_epochs, run.n_layers)
    for series in (run.epoch, run.time, run.loss, run.scale, run.skipped):
        assert len(series) == len(steps)
    assert all(len(v) == len(steps) for v in run.scalars.values())
    assert all(len(v) == run.n_epochs for v in run.metrics.values())
    assert len(run.epochs) == len(run.epoch_end_step) == run.n_epochs
    assert len(run.events) == run.n_events
    run.to_dataframe()
    out = io.StringIO()
    Console(file=out, width=120, color_system=None).print(info_panel(run))
    return out.getvalue()


def outcome(path: Path) -> tuple[str, float]:
    """``"ok"`` or the one-line error for ``path``, and the seconds it took."""
    start = time.perf_counter()
    try:
        with open_run(path) as run:
            read_all(run)
        answer = "ok"
    except GradflowError as err:
        answer = str(err)
        assert "\n" not in answer and answer.startswith(str(path)), answer
    return answer, time.perf_counter() - start


# ---------------------------------------------------------------------------------------
# Damaged files
# ---------------------------------------------------------------------------------------
def _metadata_offsets(data: bytes) -> list[int]:
    found = []
    for signature in METADATA:
        start = data.find(signature)
        while start >= 0:
            found.append(start)
            start = data.find(signature, start + 1)
    return sorted(found)


def damaged(data: bytes, seed: int) -> Iterator[tuple[str, bytes]]:
    """Truncations, single and multiple byte flips, a third of them in metadata blocks."""
    rng = random.Random(seed)
    size = len(data)
    blocks = _metadata_offsets(data)
    assert len(blocks) > 20, "the run file should have many metadata blocks"
    cuts = {8, 11, 12, 47, 48, 100, 200, 511, 1024, size // 2, size - 1}
    cuts |= {rng.randrange(1, size) for _ in range(30)}
    for cut in sorted(cuts):
        yield f"truncated at {cut}", data[:cut]
    for i in range(100):
        if i % 3 == 0:
            offset = rng.choice(blocks) + rng.randrange(64)
        elif i % 3 == 1:
            offset = rng.randrange(min(size, 4096))  # superblock and root group
        else:
            offset = rng.randrange(size)
        mutated = bytearray(data)
        mutated[offset % size] ^= 1 << rng.randrange(8) if i % 2 else 0xFF
        yield f"byte {offset % size} flipped", bytes(mutated)
    for _ in range(36):
        mutated = bytearray(data)
        offsets = [rng.randrange(size) for _ in range(rng.randrange(2, 9))]
        for offset in offsets:
            mutated[offset] = rng.randrange(256)
        yield f"bytes {offsets} changed", bytes(mutated)


# ---------------------------------------------------------------------------------------
# Forged files: (name, edit of a copy opened r+, words the error must contain or "ok")
# ---------------------------------------------------------------------------------------
Forge = Callable[[h5py.File, Path], None]


def _attr(name: str, value: object) -> Forge:
    def edit(f: h5py.File, _: Path) -> None:
        f.attrs[name] = value

    return edit


def _replace(name: str, data: np.ndarray) -> Forge:
    def edit(f: h5py.File, _: Path) -> None:
        del f[name]
        f.create_dataset(name, data=data)

    return edit


def _resize(rows: int, counts: bool) -> Forge:
    def edit(f: h5py.File, _: Path) -> None:
        for name in ("steps", "stats/param/grad_norm", "scalars/values"):
            f[name].resize(rows, axis=0)
        if counts:
            f["counts"][0] = rows

    return edit


def _external_storage(f: h5py.File, path: Path) -> None:
    secret = path.parent / "secret.txt"
    secret.write_bytes(b"root:x:0:0:secret-password".ljust(256 * 2, b"\0"))
    del f["layers"]
    f.create_dataset("layers", shape=(2,), dtype=LAYER_DTYPE, external=[(secret, 0, 2 * 648)])


def _soft_link(f: h5py.File, _: Path) -> None:
    del f["loss"]
    f["loss"] = h5py.SoftLink("/time")


def _external_link(f: h5py.File, path: Path) -> None:
    other = path.parent / "other.h5"
    with h5py.File(other, "w") as g:
        g.create_dataset("loss", data=np.zeros(6, np.float32))
    del f["loss"]
    f["loss"] = h5py.ExternalLink(str(other), "/loss")


def _virtual(f: h5py.File, path: Path) -> None:
    layout = h5py.VirtualLayout(shape=(6,), dtype=np.float32)
    layout[:] = h5py.VirtualSource(str(path), "time", shape=(6,))
    del f["loss"]
    f.create_virtual_dataset("loss", layout, fillvalue=0)


def _drop(name: str) -> Forge:
    def edit(f: h5py.File, _: Path) -> None:
        del f[name]

    return edit


def _metric_name(raw: bytes) -> Forge:
    def edit(f: h5py.File, _: Path) -> None:
        f["epochs/metrics/names"][0] = raw

    return edit


def _layer_name(raw: bytes) -> Forge:
    def edit(f: h5py.File, _: Path) -> None:
        table = f["layers"][()]
        table["name"][0] = raw
        f["layers"][...] = table

    return edit


def _wrong_columns(f: h5py.File, _: Path) -> None:
    del f["stats/param/grad_norm"]
    f.create_dataset("stats/param/grad_norm", data=np.zeros((6, 3), np.float32))


def _lzf(f: h5py.File, _: Path) -> None:
    del f["loss"]
    f.create_dataset("loss", data=np.zeros(6, np.float32), compression="lzf")


def _huge_chunks(f: h5py.File, _: Path) -> None:
    del f["stats/param/grad_norm"]
    f.create_dataset(
        "stats/param/grad_norm", shape=(6, 2), maxshape=(None, 2), chunks=(2**25, 2),
        dtype=np.float32, compression="gzip",
    )  # fmt: skip


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


FORGED: list[tuple[str, Forge, str]] = [
    ("config null", _attr("config", "null"), "JSON NoneType"),
    ("config list", _attr("config", "[1, 2]"), "JSON list"),
    ("config string", _attr("config", '"text"'), "JSON str"),
    ("config int", _attr("config", "7"), "JSON int"),
    ("config deep", _attr("config", _deep(100_000)), "nested too deeply"),
    ("config not JSON", _attr("config", "{model"), "config is not JSON"),
    ("config not text", _attr("config", 5), "config is not JSON text"),
    ("config markup", _attr("config", json.dumps({"model": "[/bold]", "x[/red]": "[b]"})), "ok"),
    ("config escapes", _attr("config", json.dumps({"model": "\x1b]0;owned\x07\x1b[2J"})), "ok"),
    ("schema 0", _attr("schema_version", 0), "schema_version 0 "),
    ("schema -5", _attr("schema_version", -5), "schema_version -5 "),
    ("schema 1.9", _attr("schema_version", 1.9), "schema_version 1.9 "),
    ("schema 1.0", _attr("schema_version", 1.0), "schema_version 1.0 "),
    ("schema text", _attr("schema_version", "1"), "schema_version '1' "),
    ("schema 2", _attr("schema_version", 2), "schema v2"),
    ("device number", _attr("device", 3), "'device' is not text"),
    ("attribute compound", _attr("extra", np.zeros(2, [("a", "i4")])), "unsupported type"),
    ("budget a list", _attr("budget", np.arange(3)), "'budget' is not a number"),
    ("budget text", _attr("budget_reached", "0.1"), "'budget_reached' is not a number"),
    ("counts negative", _replace("counts", np.array([-1, 2, 0])), "negative"),
    ("counts forged", _replace("counts", np.array([1000, 2, 0])), "says 1000 steps"),
    ("counts epochs", _replace("counts", np.array([6, 50, 0])), "says 50 epochs"),
    ("counts shape", _replace("counts", np.array([6, 2])), "3 integers"),
    ("counts float", _replace("counts", np.array([6.0, 2.0, 0.0])), "3 integers"),
    ("layers plain", _replace("layers", np.arange(2)), "compound"),
    ("layers empty", _replace("layers", np.zeros(0, LAYER_DTYPE)), "no layers"),
    ("layer name not UTF-8", _layer_name(b"\xff\xfe"), "not UTF-8"),
    ("layer name markup", _layer_name(b"[/bold]\x1b[31m"), "ok"),
    ("metric name not UTF-8", _metric_name(b"\xc3\x28"), "not UTF-8"),
    ("metric name markup", _metric_name(b"[/red]"), "ok"),
    ("no epochs", _drop("epochs"), "no /epochs"),
    ("no steps", _drop("steps"), "no /steps"),
    ("stats group a dataset", _replace("stats/param", np.zeros(3)), "not a group"),
    ("wrong columns", _wrong_columns, "3 columns, not 2"),
    ("steps 2-D", _replace("steps", np.zeros((6, 2), np.int64)), "not 1-D"),
    ("steps text", _replace("steps", np.array([b"a"] * 6)), "not the schema's type"),
    ("external storage", _external_storage, "external file"),
    ("soft link", _soft_link, "soft link"),
    ("external link", _external_link, "external link"),
    ("virtual dataset", _virtual, "virtual dataset"),
    ("lzf filter", _lzf, "filter 32000"),
    ("memory bomb, rows", _resize(200_000_000, counts=False), "ok"),
    ("memory bomb, rows and counts", _resize(200_000_000, counts=True), "holds"),
    ("huge chunks", _huge_chunks, "chunks of"),
]


def forged(good: Path, folder: Path) -> Iterator[tuple[str, Path, str]]:
    for i, (name, edit, expect) in enumerate(FORGED):
        path = folder / f"forged-{i}.h5"
        shutil.copyfile(good, path)
        with h5py.File(path, "r+") as f:
            edit(f, path)
        yield name, path, expect


def _listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def test_fuzz(
    good: Path, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """>= 200 damaged and forged files: each reads completely or gives one line, fast."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    seed = request.config.getoption("--fuzz-seed")
    data = good.read_bytes()
    cases: list[tuple[str, Path, str | None]] = []
    for i, (name, mutated) in enumerate(damaged(data, seed)):
        path = tmp_path / f"damaged-{i}.h5"
        path.write_bytes(mutated)
        cases.append((name, path, None))
    cases += list(forged(good, tmp_path))
    assert len(cases) >= 200
    before = _listing(tmp_path)
    worst, answers = 0.0, {"ok": 0, "error": 0}
    for name, path, expect in cases:
        answer, seconds = outcome(path)
        worst = max(worst, seconds)
        assert seconds < LIMIT_S, f"{name}: {seconds:.1f} s"
        answers["ok" if answer == "ok" else "error"] += 1
        if expect is not None:
            assert (answer == "ok") if expect == "ok" else (expect in answer), (name, answer)
    assert _listing(tmp_path) == before  # nothing written, here or in the working directory
    print(f"\n{len(cases)} files (seed {seed}): {answers}, slowest {worst:.2f} s")
    assert answers["ok"] > 0 and answers["error"] > len(FORGED) // 2


def test_memory_bomb_is_read_cheaply(good: Path, tmp_path: Path) -> None:
    """Datasets resized to 2e8 rows in a small file: only the counted rows are read, and a
    /counts that claims them all is refused before anything is allocated."""
    import tracemalloc

    bombs = [(name, path) for name, path, _ in forged(good, tmp_path) if "bomb" in name]
    assert len(bombs) == 2 and all(path.stat().st_size < 100_000 for _, path in bombs)
    for name, path in bombs:
        tracemalloc.start()
        try:
            answer, _ = outcome(path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 20 * 2**20, (name, answer, peak)


def test_good_file_reads(good: Path) -> None:
    with open_run(good) as run:
        text = read_all(run)
        assert run.n_steps == 6 and run.n_epochs == 2 and run.n_layers == 2
        assert list(run.metrics) == ["val_loss"] and list(run.scalars) == ["lr"]
        assert np.array_equal(run.steps, np.arange(6))
        assert run.attrs["schema_version"] == 1
    assert "6 recorded" in text


def test_shown_text_is_text(good: Path, tmp_path: Path) -> None:
    """Rich markup and terminal escapes from a file are shown as text, not obeyed."""
    path = tmp_path / "markup.h5"
    shutil.copyfile(good, path)
    config = {"model": "[/bold]\x1b[2J", "[red]key": "\x1b]0;title\x07[/]"}
    with h5py.File(path, "r+") as f:
        f.attrs["config"] = json.dumps(config)
        f.attrs["device"] = "cpu\x1b[31m"
        _layer_name("[/b]layer\x9b2J".encode())(f, path)
    with open_run(path) as run:
        text = read_all(run)
        assert run.config == config  # stored as is; shown cleaned
        assert run.layers[0].name == "[/b]layer\ufffd2J" and run.name == "[/bold]\ufffd[2J"
    assert "\x1b" not in text and "\x9b" not in text and "\x07" not in text
    assert "[/bold]" in text and "[red]key" in text


@pytest.mark.parametrize("text", ["plain", "\x1b[2Jx", "a\u202eb", "tab\there", "\ud800"])
def test_printable(text: str) -> None:
    shown = printable(text)
    assert shown.isprintable() and len(shown) == len(text)
    assert shown == text or "\ufffd" in shown


# ---------------------------------------------------------------------------------------
# The command line on crafted files
# ---------------------------------------------------------------------------------------
def test_cli_info_on_crafted_files(
    good: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``gradflow info``: exit 2 and one line on stderr, never a traceback."""
    small = tmp_path / "eight.h5"
    small.write_bytes(good.read_bytes()[:8])
    paths = [small] + [path for _, path, expect in forged(good, tmp_path) if expect != "ok"]
    for path in paths:
        with pytest.raises(SystemExit) as exit_info:
            main(["info", str(path)])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, (path, err)
        assert err.count("\n") == 1 and err.startswith("gradflow: error: "), err
    with pytest.raises(SystemExit) as exit_info:
        main(["info", str(good)])
    assert exit_info.value.code == 0 and "6 recorded" in capsys.readouterr().out


def _gradflow(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The installed ``gradflow`` command (its own directory first on sys.path, as installed)."""
    script = Path(sys.executable).with_name("gradflow")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "gradflow.cli.main"]
    env = {**os.environ, "MPLBACKEND": "Agg"}
    return subprocess.run(
        [*command, *args], cwd=cwd, capture_output=True, text=True, timeout=60, env=env
    )


PLANT = "import pathlib; pathlib.Path({marker!r}).write_text('ran'); raise SystemExit(3)\n"


def test_planted_h5py_beside_a_truncated_file_does_not_run(good: Path, tmp_path: Path) -> None:
    """A ``h5py.py`` next to the file must not be imported by anything gradflow starts."""
    folder = tmp_path / "mail"
    folder.mkdir()
    marker = tmp_path / "marker"
    (folder / "h5py.py").write_text(PLANT.format(marker=str(marker)))
    data = good.read_bytes()
    (folder / "run.h5").write_bytes(data[: len(data) * 3 // 4])
    done = _gradflow("info", "run.h5", cwd=folder)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    done = _gradflow("plot", "updates-heatmap", "run.h5", "--out", "x.png", cwd=folder)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert not marker.exists()


def test_spawned_check_is_isolated(
    good: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without fork() the first check runs in a fresh interpreter: an isolated one, which
    does not import from the current directory or the file's folder."""
    from gradflow.runfile import opening

    monkeypatch.setattr(opening, "_FORK", False)
    marker = tmp_path / "marker"
    (tmp_path / "h5py.py").write_text(PLANT.format(marker=str(marker)))
    (tmp_path / "gradflow.py").write_text(PLANT.format(marker=str(marker)))
    monkeypatch.chdir(tmp_path)
    data = good.read_bytes()
    Path("run.h5").write_bytes(data[: len(data) * 3 // 4])
    with pytest.raises(GradflowError, match="damaged or truncated"):
        open_run("run.h5")
    shutil.copyfile(good, "good.h5")
    with open_run("good.h5") as run:
        assert run.n_steps == 6
    assert not marker.exists()


def _heap_free_space(data: bytes) -> int:
    """Offset of the size of the free space in the file's first global heap collection
    (where the attributes' text is stored)."""
    start = data.index(b"GCOL")
    end, pos = start + int.from_bytes(data[start + 8 : start + 16], "little"), start + 16
    while pos + 16 <= end:
        length = int.from_bytes(data[pos + 8 : pos + 16], "little")
        if int.from_bytes(data[pos : pos + 2], "little") == 0:
            return pos + 8
        pos += 16 + (length + 7) // 8 * 8
    raise AssertionError("no free space object in the global heap")


def _looping(good: Path) -> bytes:
    """``good``'s bytes with its global heap's free space declared 32 bytes smaller: HDF5
    then walks zeroed bytes as objects of no size, forever (any shrink of 16 bytes or
    more does, whatever the heap holds)."""
    data = bytearray(good.read_bytes())
    at = _heap_free_space(bytes(data))
    size = int.from_bytes(data[at : at + 8], "little")
    data[at : at + 8] = (size - 32).to_bytes(8, "little")
    return bytes(data)


def test_file_on_which_hdf5_loops_forever(good: Path, tmp_path: Path) -> None:
    """A wrong size in the global heap makes HDF5 loop forever reading the attributes
    (plain mode, uninterruptible): the time-limited child answers instead."""
    path = tmp_path / "loops.h5"
    path.write_bytes(_looping(good))
    answer, seconds = outcome(path)
    assert "no answer within" in answer and seconds < LIMIT_S, (answer, seconds)


def test_ctrl_c_stops_info_on_a_looping_file(good: Path, tmp_path: Path) -> None:
    psutil = pytest.importorskip("psutil")
    (tmp_path / "loops.h5").write_bytes(_looping(good))
    script = Path(sys.executable).with_name("gradflow")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "gradflow.cli.main"]
    proc = subprocess.Popen(
        [*command, "info", "loops.h5"], cwd=tmp_path, stderr=subprocess.PIPE, text=True
    )
    try:
        parent, deadline = psutil.Process(proc.pid), time.monotonic() + 30
        while not parent.children() and time.monotonic() < deadline:
            time.sleep(0.05)
        children = parent.children()
        assert children, "the check should run in a child process"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=3) == 130
        assert proc.stderr is not None and "Traceback" not in proc.stderr.read()
        assert not any(child.is_running() for child in children)
    finally:
        proc.kill()


def test_crash_in_the_child_is_one_line(good: Path) -> None:
    from gradflow.runfile import opening

    def crash(_: Path) -> None:
        os.kill(os.getpid(), signal.SIGSEGV)

    with pytest.raises(GradflowError, match="crashed HDF5: signal 11"):
        opening.in_child(good, crash, "unused:unused")


KILLED_WRITER = (
    "import h5py, os, sys\n"
    "f = h5py.File(sys.argv[1], 'r+', libver='latest')\n"
    "f.swmr_mode = True\n"
    "f.flush()\n"
    "os._exit(0)\n"
)


def test_killed_writers_files_damaged_or_not(good: Path, tmp_path: Path) -> None:
    """A file a writer left open is read in SWMR mode: it reads, and damaged it fails fast
    (HDF5's default SWMR retries of a bad checksum took 15 minutes and more)."""
    live = tmp_path / "live.h5"
    shutil.copyfile(good, live)
    with open_run(live):  # a reader holds no HDF5 file lock that would keep a writer out
        subprocess.run([sys.executable, "-I", "-c", KILLED_WRITER, str(live)], check=True)
    data = live.read_bytes()
    assert data[11] & 0b100, "the superblock should say: open for SWMR writing"
    with open_run(live) as run:
        assert run._f.swmr_mode
        read_all(run)
        run.refresh()
        assert run.n_steps == 6
    rng = random.Random(0)
    offsets = [o + rng.randrange(48) for o in rng.sample(_metadata_offsets(data), 12)]
    worst = 0.0
    for offset in [*offsets, 711]:
        mutated = bytearray(data)
        mutated[offset] ^= 0xFF
        path = tmp_path / f"live-{offset}.h5"
        path.write_bytes(bytes(mutated))
        worst = max(worst, outcome(path)[1])
    assert worst < 2.0, worst


# ---------------------------------------------------------------------------------------
# The live-reader race
# ---------------------------------------------------------------------------------------
STEPPER = """
import sys, torch
from torch import nn
import gradflow
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
x = torch.randn(8, 3)
with gradflow.Recorder(model, opt, sys.argv[1], flush_every=1) as rec:
    for line in sys.stdin:  # "step": one step, committed; "free": steps until killed
        while True:
            opt.zero_grad()
            loss = model(x).pow(2).mean()
            loss.backward()
            opt.step()
            rec.log(loss=loss, lr=0.01)
            if line.strip() != "free":
                break
        rec.flush()
        print("ok", flush=True)
"""


class Stepper:
    """A recorder in another process that commits one step per :meth:`step`, or runs
    free after :meth:`run_free`, committing every step, until :meth:`stop`."""

    def __init__(self, tmp_path: Path) -> None:
        script = tmp_path / "stepper.py"
        script.write_text(STEPPER)
        self.path = tmp_path / "live.h5"
        self.proc = subprocess.Popen(
            [sys.executable, str(script), str(self.path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        for _ in range(3):
            self.step()

    def _send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def step(self) -> None:
        self._send("step")
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ok", "the writer process failed"

    def run_free(self) -> None:
        self._send("free")

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)


def consistent(run: Run) -> int:
    """Every series of ``run`` has the same number of rows; that number."""
    n = len(run.steps)
    assert np.array_equal(run.steps, np.arange(n))
    assert len(run.loss) == len(run.time) == n and len(run.scalars["lr"]) == n
    for probe, names in run.probes().items():
        for name in names:
            assert run.stat(probe, name).shape[0] == n, (probe, name, n)
    assert len(run.to_dataframe()) == n * run.n_layers * sum(map(len, run.probes().values()))
    return n


@pytest.mark.slow  # about 10 s: a recorder process started, 60 steps committed one by one
def test_live_reader_sees_equal_lengths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer commits a step at every point where the reader refreshes a dataset (the
    worst interleaving), then runs free with a commit every step: every read of the live
    file has steps and statistics of equal length."""
    writer = Stepper(tmp_path)
    try:
        with open_run(writer.path) as run:
            assert run._f.swmr_mode and consistent(run) > 0
            refresh = h5py.Dataset.refresh

            def refresh_then_write(ds: h5py.Dataset) -> None:
                refresh(ds)
                writer.step()

            monkeypatch.setattr(h5py.Dataset, "refresh", refresh_then_write)
            seen = [consistent(run)]
            for _ in range(2):
                run.refresh()
                seen.append(consistent(run))
            monkeypatch.undo()
            assert seen == sorted(seen) and seen[-1] > seen[0], seen
            writer.run_free()
            reads, end = 0, time.monotonic() + 2.0
            while time.monotonic() < end:
                run.refresh()
                seen.append(consistent(run))
                reads += 1
        assert reads > 10 and seen[-1] > seen[2] + 10, seen
    finally:
        writer.stop()
