"""``record --resume`` on a crafted checkpoint: refused in one line before anything is
trained or written, the run file byte for byte as it was.

A tiny run of one epoch is recorded once; each case replaces its checkpoint with an
edited copy (or a zip bomb) and resumes it to two epochs.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import pickle
import resource
import shutil
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from gradflow.em.checkpoint import checkpoint_path
from gradflow.em.train import TrainConfig, train
from gradflow.errors import GradflowError

TINY = TrainConfig(
    model="tiny",
    synthetic_slices=7,
    synthetic_size=64,
    epochs=1,
    steps_per_epoch=2,
    crop=32,
    batch_size=2,
    val_slices=1,
)
RESUMED = dataclasses.replace(TINY, epochs=2)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("recorded") / "run.h5"
    train(TINY, path, progress="off")
    return path


def _payload(recorded: Path) -> dict[str, Any]:
    payload = torch.load(checkpoint_path(recorded), weights_only=True)
    assert isinstance(payload, dict)
    return payload


def _copy(recorded: Path, folder: Path) -> Path:
    run = folder / "run.h5"
    shutil.copyfile(recorded, run)
    return run


def _resume_refused(run: Path, words: str) -> str:
    """Resume ``run``: it must be refused with ``words`` and leave the run file as it was."""
    before = run.read_bytes()
    with pytest.raises(GradflowError) as refused:
        train(RESUMED, run, resume=True, progress="off")
    message = str(refused.value)
    assert "\n" not in message and words in message, message
    assert run.read_bytes() == before
    return message


def _groups(change: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def edit(payload: dict[str, Any]) -> None:
        for group in payload["optimizer"]["param_groups"]:
            change(group)

    return edit


def _first_state(
    key: str, value: Callable[[torch.Tensor], Any]
) -> Callable[[dict[str, Any]], None]:
    def edit(payload: dict[str, Any]) -> None:
        state = payload["optimizer"]["state"][0]
        state[key] = value(state["square_avg"])

    return edit


# name -> (edit of the checkpoint's payload, words the one-line refusal must contain)
EDITS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "lr as text": (_groups(lambda g: g.update(lr="0.001")), "lr is '0.001', not a number"),
    "lr not finite": (_groups(lambda g: g.update(lr=math.nan)), "lr is nan"),
    "lr negative": (_groups(lambda g: g.update(lr=-0.001)), "lr is -0.001"),
    "lr a million": (
        _groups(lambda g: g.update(lr=1e6)),
        "its optimizer's lr is 1000000.0, the run's settings say 0.001",
    ),
    "alpha changed": (
        _groups(lambda g: g.update(alpha=0.5)), "alpha is 0.5, the run's settings say 0.9"
    ),
    "momentum turned on": (_groups(lambda g: g.update(momentum=0.9)), "momentum is 0.9"),
    "unknown setting": (_groups(lambda g: g.update(hook="x")), "unknown optimizer setting 'hook'"),
    "0-dim state": (
        _first_state("square_avg", lambda t: torch.tensor(0.5)), "square_avg is a 0-dim tensor"
    ),
    "list state": (
        _first_state("square_avg", lambda t: t.tolist()), "square_avg is a list, not a tensor"
    ),
    "state of another dtype": (_first_state("square_avg", lambda t: t.double()), "torch.float64"),
    "state of another shape": (_first_state("square_avg", lambda t: t.reshape(-1)), "(72,)"),
    "unknown state": (_first_state("momentum_buffer", lambda t: t), "momentum_buffer"),
    "step as a float": (_first_state("step", lambda t: 1.5), "step is 1.5"),
    "step beyond the run": (
        _first_state("step", lambda t: torch.tensor(1e9)), "step is 1000000000"
    ),
    "negative average": (_first_state("square_avg", lambda t: -t - 1), "square_avg has negative"),
    "state of a missing parameter": (
        lambda p: p["optimizer"]["state"].update({999: {}}), "parameter 999",
    ),
    "recorder state of a later step": (
        lambda p: p["recorder"].update(step=4),
        "its Recorder state is at step 4 of epoch 1, the checkpoint at step 2 of epoch 1",
    ),
    "recorder state of another version": (
        lambda p: p["recorder"].update(version=99), "Recorder state version 99",
    ),
    "recorder state with a budget": (
        lambda p: p["recorder"].update(budget={"budget": 0.5}), "saved with a budget",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(EDITS))
def test_crafted_optimizer_state_is_refused_before_the_run_file_is_touched(
    case: str, recorded: Path, tmp_path: Path
) -> None:
    edit, words = EDITS[case]
    run = _copy(recorded, tmp_path)
    payload = _payload(recorded)
    edit(payload)
    torch.save(payload, checkpoint_path(run))
    start = time.perf_counter()
    message = _resume_refused(run, words)
    assert message.startswith(f"cannot resume {run} from {checkpoint_path(run)}")
    assert time.perf_counter() - start < 20


def test_what_torch_refuses_is_named_in_one_printable_line(recorded: Path, tmp_path: Path) -> None:
    # A pickle naming a global that holds a terminal escape; torch's message quotes it.
    run = _copy(recorded, tmp_path)
    pickled = b"\x80\x02cos\n\x1b[2Jsystem\nq\x00."
    entries = [("archive/data.pkl", pickled), ("archive/version", b"3\n")]
    _zip(checkpoint_path(run), [(n, d, len(d), zlib.crc32(d), False) for n, d in entries])
    message = _resume_refused(run, "unsupported GLOBAL os.\ufffd[2Jsystem")
    assert not any(ch < " " for ch in message), repr(message)


def test_a_recorder_state_not_a_dict_is_refused(recorded: Path, tmp_path: Path) -> None:
    run = _copy(recorded, tmp_path)
    payload = _payload(recorded)
    payload["recorder"] = [0, 2, 1]
    torch.save(payload, checkpoint_path(run))
    _resume_refused(run, "damaged checkpoint (recorder is not a Recorder state)")


def test_the_untouched_checkpoint_resumes(recorded: Path, tmp_path: Path) -> None:
    run = _copy(recorded, tmp_path)
    shutil.copyfile(checkpoint_path(recorded), checkpoint_path(run))
    summary = train(RESUMED, run, resume=True, progress="off")
    assert summary is not None and summary.epochs == 2


# -- a checkpoint that inflates -------------------------------------------------------------
class _Storage:
    def __init__(self, numel: int) -> None:
        self.numel = numel


class _Tensor:
    """Pickles as torch pickles a float32 tensor of ``numel`` entries in storage "0"."""

    def __init__(self, numel: int) -> None:
        self.storage = _Storage(numel)

    def __reduce__(self) -> tuple[Any, ...]:
        size = (self.storage.numel,)
        return torch._utils._rebuild_tensor_v2, (
            self.storage, 0, size, (1,), False, collections.OrderedDict(),
        )  # fmt: skip


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _Storage):
            return ("storage", torch.FloatStorage, "0", "cpu", obj.numel)
        return None


def _zeros_deflated(size: int) -> tuple[bytes, int]:
    """A raw deflate stream of ``size`` zero bytes and their CRC-32, made in well under a
    second: after a full flush the compressor starts afresh, so every 16 MiB block of
    zeros compresses to the same bytes, which are repeated."""
    chunk = bytes(1 << 24)
    assert size % len(chunk) == 0
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = deflate.compress(chunk) + deflate.flush(zlib.Z_FULL_FLUSH)
    again = deflate.compress(chunk) + deflate.flush(zlib.Z_FULL_FLUSH)
    assert block == again
    crc = 0
    for _ in range(size // len(chunk)):
        crc = zlib.crc32(chunk, crc)
    return block * (size // len(chunk)) + deflate.flush(), crc


def _zip(path: Path, entries: list[tuple[str, bytes, int, int, bool]]) -> None:
    """A zip file of (name, stored bytes, uncompressed size, crc, deflated) entries."""
    body, central = bytearray(), bytearray()
    for name, data, size, crc, deflated in entries:
        raw = name.encode()
        method = 8 if deflated else 0
        central += struct.pack(
            "<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, method, 0, 0x21, crc, len(data), size,
            len(raw), 0, 0, 0, 0, 0, len(body),
        ) + raw  # fmt: skip
        body += struct.pack(
            "<4s5H3L2H", b"PK\x03\x04", 20, 0, method, 0, 0x21, crc, len(data), size, len(raw), 0
        ) + raw + data  # fmt: skip
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(entries), len(entries),
                      len(central), len(body), 0)  # fmt: skip
    path.write_bytes(bytes(body + central + end))


def _bomb(path: Path, recorded: Path, inflated: int) -> None:
    """A checkpoint whose one weight inflates from about a thousandth of ``inflated``
    (everything else as recorded, less the optimizer's tensors: torch would read it)."""
    payload = _payload(recorded)
    payload["model"] = {"down1.conv.weight": _Tensor(inflated // 4)}
    payload["optimizer"]["state"] = {}
    pickled = bytearray()

    class Sink:
        def write(self, data: bytes) -> None:
            pickled.extend(data)

    _Pickler(Sink(), protocol=2).dump(payload)
    data, crc = _zeros_deflated(inflated)
    small = [("archive/data.pkl", bytes(pickled)), ("archive/byteorder", b"little"),
             ("archive/version", b"3\n")]  # fmt: skip
    entries = [(name, d, len(d), zlib.crc32(d), False) for name, d in small]
    _zip(path, [*entries, ("archive/data/0", data, inflated, crc, True)])


def test_a_checkpoint_that_inflates_to_gigabytes_is_refused_unread(
    recorded: Path, tmp_path: Path
) -> None:
    run = _copy(recorded, tmp_path)
    _bomb(checkpoint_path(run), recorded, inflated=96 << 24)  # 1.5 GiB of zeros
    assert checkpoint_path(run).stat().st_size < 2e6  # about 1.5 MB on disk
    # The peak memory of this process so far; loading the weight would raise it by 1.5 GiB
    # (unless an earlier test peaked that much higher than this one starts).
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    message = _resume_refused(run, "holds 1.5 GiB unpacked")
    seconds = time.perf_counter() - start
    grew_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024
    assert message.startswith(f"{checkpoint_path(run)}: ")
    assert grew_mb < 100 and seconds < 10, (grew_mb, seconds)
