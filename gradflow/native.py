"""One-pass CPU reductions of a float32 buffer in a tiny C kernel.

On the CPU, recording activations and output gradients is bound by passes over memory
and by per-operation dispatch: sum, sum of squares and zero count take four torch
operations (five passes) per layer call. This kernel does all of them, plus the count of
non-finite entries, in one vectorised pass and one call. It is compiled on first use
with the system C compiler (about 0.15 s, for this machine's CPU) into a temporary
directory that is removed once loaded; where no compiler works, :func:`kernel` returns
``None`` and the probes use torch operations instead (``GRADFLOW_NATIVE=0`` forces that).
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

# Float accumulators per block of 4096 entries (vectorisable, exact for the zero count),
# float64 across blocks: ~1e-8 relative for sums of squares at any size. Non-finite
# entries are counted in a second pass, only when the sums say there are any.
_SOURCE = r"""
#include <math.h>
void gradflow_reduce_f32(const float *x, long n, double *out) {
    double s = 0.0, q = 0.0, z = 0.0;
    for (long i0 = 0; i0 < n; i0 += 4096) {
        long i1 = i0 + 4096 < n ? i0 + 4096 : n;
        float bs = 0.0f, bq = 0.0f, bz = 0.0f;
        for (long i = i0; i < i1; ++i) {
            float v = x[i];
            bs += v;
            bq += v * v;
            bz += (v == 0.0f) ? 1.0f : 0.0f;
        }
        s += bs;
        q += bq;
        z += bz;
    }
    long bad = 0;
    if (!isfinite(s) || !isfinite(q))
        for (long i = 0; i < n; ++i)
            bad += !isfinite(x[i]);
    out[0] = s;
    out[1] = q;
    out[2] = z;
    out[3] = (double)bad;
}
"""
# Reassociation lets the compiler vectorise the sums; NaN and Inf keep their meaning.
_FLAGS = ["-O3", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
          "-fno-trapping-math", "-shared", "-fPIC"]  # fmt: skip

Reduce = Callable[[torch.Tensor], list[float]]


def _compile(folder: Path) -> ctypes.CDLL | None:
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return None
    source = folder / "reduce.c"
    source.write_text(_SOURCE)
    for arch in (["-march=native"], []):  # not every compiler knows -march=native
        library = folder / f"reduce{len(arch)}.so"
        try:
            subprocess.run(
                [compiler, *arch, *_FLAGS, str(source), "-o", str(library)],
                check=True,
                capture_output=True,
                timeout=60,
            )
            return ctypes.CDLL(str(library))
        except (OSError, subprocess.SubprocessError):
            continue
    return None


@functools.cache
def kernel() -> Reduce | None:
    """``reduce(x) -> [sum, sum of squares, zeros, non-finite]`` for a contiguous float32
    CPU tensor, or ``None`` where the kernel is unavailable."""
    if os.environ.get("GRADFLOW_NATIVE", "1") == "0":
        return None
    with tempfile.TemporaryDirectory(prefix="gradflow-") as tmp:
        library = _compile(Path(tmp))
    if library is None:
        return None
    function = library.gradflow_reduce_f32
    function.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p]
    function.restype = None

    def reduce(x: torch.Tensor) -> list[float]:
        out = np.empty(4)
        function(x.data_ptr(), x.numel(), out.ctypes.data)
        return out.tolist()

    # A build that disagrees with plain arithmetic on a known input is not used.
    probe = torch.tensor([0.0, 1.5, -2.0, 0.0] + [0.5] * 5000 + [float("inf")])
    if reduce(probe[:-1]) != [2499.5, 1256.25, 2.0, 0.0] or reduce(probe)[3] != 1.0:
        return None
    return reduce
