"""How the C kernels are compiled: shared by setup.py (the install-time extension) and
:mod:`gradflow.native` (the per-user cached build), so both builds are the same code.

Imports nothing: setup.py reads this file before gradflow's dependencies are installed.
"""

SOURCE = "_kernels.c"  # next to this file
# Reassociation lets the compiler vectorise the sums; NaN and Inf keep their meaning. No
# -march: the source picks its instruction set at run time.
CFLAGS = ["-O3", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
          "-fno-trapping-math", "-pthread"]  # fmt: skip
# A plain shared library, for the cached build (setuptools adds these for the extension).
SHARED = ["-shared", "-fPIC"]
