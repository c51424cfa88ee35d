"""The run file's schema (HDF5, v1): its layout, the record types a writer appends and a
reader returns.

Schema v1 (all paths absolute inside the file)::

    attrs            schema_version=1, gradflow_version, created (ISO 8601), config (JSON),
                     torch_version, device, flush_every, flush_seconds, schedule (text:
                     ``every 5``, ``budget 0.02``...), recorded_probes (names); files
                     written before the last two were stored lack them
    /layers          compound [L]: name, kind, type, depth, n_params, shape (forward order)
    /steps           int64   [T]  optimizer step index (0-based) of each recorded row
    /epoch           int32   [T]  epoch the step belongs to
    /time            float64 [T]  seconds since the recorder started, at the end of the step
    /loss            float32 [T]  loss logged for the step (NaN when none was logged)
    /scale           float32 [T]  AMP grad-scaler scale used by the step (NaN without a scaler)
    /skipped         uint8   [T]  1 when the grad scaler skipped the optimizer step
    /overhead        float32 [T, 4]  seconds the recorder spent: hooks, stats, copy, writer
    /scalars/names   S64 [32], /scalars/values float64 [T, 32]: other logged scalars
    /stats/<probe>/<statistic>  float32 [T, L]
    /epochs/index    int32 [E], /epochs/end_step int64 [E]
    /epochs/<statistic>         float32 [E, L]  per-epoch update statistics
    /epochs/metrics/names S64 [32], /epochs/metrics/values float64 [E, 32]
    /events          compound [K]: step, epoch, time, kind, probe, layer, detail
    /counts          int64 [3]: committed rows of steps, epochs, events

Crash safety: the file is created complete (all datasets, no rows) under a temporary name
and renamed into place, then written in HDF5 SWMR mode, which keeps the file structure
valid at every moment. Rows count only once ``/counts`` says so; ``/counts`` is written
after the rows and their flush, so a reader never sees a half-written row, also after the
writer was killed. Readers open a file in SWMR mode only while its writer has it open (or
was killed); see :mod:`gradflow.runfile.validate` for the checks every file passes before use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
MAX_NAMED = 32  # capacity of /scalars and /epochs/metrics: SWMR cannot add datasets later
OVERHEAD_COLUMNS = ("hooks", "stats", "copy", "writer")
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
COMPRESSION: dict[str, Any] = {"compression": "gzip", "compression_opts": 1, "shuffle": True}

LAYER_DTYPE = np.dtype(
    [
        ("name", "S256"),
        ("kind", "S32"),
        ("type", "S64"),
        ("depth", "<i4"),
        ("n_params", "<i8"),
        ("shape", "S256"),
        ("aliases", "S256"),  # other modules owning its parameters (absent in older files)
    ]
)
EVENT_DTYPE = np.dtype(
    [
        ("step", "<i8"),
        ("epoch", "<i4"),
        ("time", "<f8"),
        ("kind", "S32"),
        ("probe", "S32"),
        ("layer", "S256"),
        ("detail", "S512"),
    ]
)


@dataclass(frozen=True)
class Layer:
    """One recorded layer: a module that directly owns trainable parameters."""

    index: int
    name: str
    kind: str
    type: str
    depth: int
    n_params: int
    shape: str
    aliases: tuple[str, ...] = ()  # other modules that own (share) its parameters: tied

    @property
    def label(self) -> str:
        """The name, with the modules sharing its parameters: ``wte (also: lm_head)``."""
        return f"{self.name} (also: {', '.join(self.aliases)})" if self.aliases else self.name


@dataclass(frozen=True)
class Event:
    """Something that happened at a step: ``nonfinite``, ``resume``, ``anomaly``..."""

    step: int
    epoch: int
    time: float
    kind: str
    probe: str = ""
    layer: str = ""
    detail: str = ""


@dataclass
class StepRows:
    """A block of recorded steps on the host, ready to append."""

    steps: np.ndarray
    epoch: np.ndarray
    time: np.ndarray
    loss: np.ndarray
    scale: np.ndarray
    skipped: np.ndarray
    overhead: np.ndarray
    stats: dict[tuple[str, str], np.ndarray]
    scalars: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.steps)


def chunk_rows(n_cols: int, live: bool = False) -> int:
    # Live files are uncompressed: small chunks keep the preallocated tail small.
    return int(max(16, min(128 if live else 1024, 2**18 // max(n_cols, 1))))
