"""The processes of a run: torchrun's world, the device, the process group, determinism,
and stopping cleanly on SIGINT or SIGTERM."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from gradflow.errors import GradflowError


class StopSignals:
    """SIGINT and SIGTERM ask training to stop at the next step boundary.

    The first signal is only noted in :attr:`received`; the handlers in place before are
    restored then, so a second one acts at once (a second Ctrl-C raises KeyboardInterrupt).
    Handlers can only be set in the main thread; elsewhere signals keep their handlers, and
    so do ignored signals.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                if signal.getsignal(sig) is not signal.SIG_IGN:  # e.g. SIGINT under nohup
                    self._previous[sig] = signal.signal(sig, self._note)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def _note(self, signum: int, frame: Any) -> None:
        self.received = signum
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()


# -- the machine --------------------------------------------------------------------------------
@dataclass(frozen=True)
class World:
    """This process's place in a torchrun launch (a single process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> World:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return cls()
        return cls(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def main(self) -> bool:
        return self.rank == 0


def pick_device(name: str, world: World) -> torch.device:
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise GradflowError(f"--device {name}: CUDA is not available on this machine")
    return torch.device("cuda", world.local_rank) if world.size > 1 else torch.device(name)


@contextmanager
def process_group(world: World, device: torch.device) -> Iterator[Any]:
    """Join torchrun's process group; yields the group for flags and barriers (None alone)."""
    if world.size == 1:
        yield None
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        # Flags and barriers go over the CPU, so they never wait for queued GPU work.
        yield dist.new_group(backend="gloo") if device.type == "cuda" else dist.group.WORLD
    finally:
        dist.destroy_process_group()


@contextmanager
def determinism(device: torch.device) -> Iterator[None]:
    """Deterministic algorithms on the CPU; cuDNN autotuning (fixed crop sizes) on CUDA."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    else:
        torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.backends.cudnn.benchmark = previous[1]


# -- progress and summary -----------------------------------------------------------------------
