"""Many runs at once: ``gradflow.sweep(paths)`` and ``gradflow sweep RUN.h5... --out PAGE``.

The structure of the runs (which settings vary independently, which follow, the seed) is
found from their configs (:mod:`~gradflow.sweeps.structure`); each run is summarised once
and cached (:mod:`~gradflow.sweeps.summary`); :class:`Sweep` gives one row per run
(``to_dataframe``), figures, and a self-contained HTML page (:mod:`~gradflow.sweeps.page`).
"""

from gradflow.sweeps.core import DEFAULT_STATS, Sweep, run_paths, sweep
from gradflow.sweeps.scalars import SCALARS, Scalar, register_scalar
from gradflow.sweeps.structure import Structure, find_structure

__all__ = [
    "DEFAULT_STATS",
    "SCALARS",
    "Scalar",
    "Structure",
    "Sweep",
    "find_structure",
    "register_scalar",
    "run_paths",
    "sweep",
]
