"""How the C kernels are compiled: shared by setup.py (the install-time extension) and
:mod:`gradflow.kernels.cpu` (the per-user cached build), so both builds are the same code.

Standard library only: setup.py reads this file before gradflow's dependencies are
installed.
"""

import hashlib
from pathlib import Path

SOURCE = "_cpu.c"  # next to this file
# Reassociation lets the compiler vectorise the sums; NaN and Inf keep their meaning. No
# -march: the source picks its instruction set at run time.
CFLAGS = ["-O3", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
          "-fno-trapping-math", "-pthread"]  # fmt: skip
# A plain shared library, for the cached build (setuptools adds these for the extension).
SHARED = ["-shared", "-fPIC"]


def source_digest(source: Path) -> str:
    """A digest of the C source, compiled into the library (``gradflow_source_digest()``), so
    that a library built from another version of the source is recognised as stale."""
    return hashlib.sha256(source.read_bytes()).hexdigest()[:16]


def digest_macro(source: Path) -> tuple[str, str]:
    """The ``-D`` definition that compiles :func:`source_digest` into the library."""
    return "GRADFLOW_SOURCE_DIGEST", f'"{source_digest(source)}"'
