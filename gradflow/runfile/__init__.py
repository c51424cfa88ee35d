"""The run file (HDF5, schema v1): its layout (:mod:`~gradflow.runfile.schema`), writing
(:mod:`~gradflow.runfile.write`), the write lock (:mod:`~gradflow.runfile.lock`), safe
opening and checking of files from anyone (:mod:`~gradflow.runfile.opening`,
:mod:`~gradflow.runfile.validate`) and reading (:mod:`~gradflow.runfile.read`).

This package does not import torch (a writer imports it only to record its version).
"""

from gradflow.runfile.lock import WriteLock, check_writable, lock_path
from gradflow.runfile.read import Run, open_run
from gradflow.runfile.schema import (
    MAX_NAMED,
    OVERHEAD_COLUMNS,
    SCHEMA_VERSION,
    Event,
    Layer,
    StepRows,
)
from gradflow.runfile.validate import printable
from gradflow.runfile.write import RunWriter, compact

__all__ = [
    "MAX_NAMED",
    "OVERHEAD_COLUMNS",
    "SCHEMA_VERSION",
    "Event",
    "Layer",
    "Run",
    "RunWriter",
    "StepRows",
    "WriteLock",
    "check_writable",
    "compact",
    "lock_path",
    "open_run",
    "printable",
]
