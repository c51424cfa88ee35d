"""One-pass CPU reductions of float32 tensors in tiny C kernels.

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
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

# Float accumulators per block of 4096 entries (vectorisable, exact for counts), float64
# across blocks: ~1e-8 relative for sums of squares at any size. Non-finite entries are
# counted in a second pass, only when the sums say there are any. The parameter functions
# take k tensors at once (arrays of pointers and sizes): one call per recorded step.
_SOURCE = r"""
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#ifdef __AVX__
#include <immintrin.h>
#endif
#define BLOCK 4096

void gradflow_reduce_f32(const float *x, long n, double *out) {
    double s = 0.0, q = 0.0, z = 0.0;
    for (long i0 = 0; i0 < n; i0 += BLOCK) {
        long i1 = i0 + BLOCK < n ? i0 + BLOCK : n;
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

/* Sum of squares of x (copied to dst on the way when dst is not NULL). */
static double squares(const float *x, float *dst, long n) {
    double q = 0.0;
    for (long i0 = 0; i0 < n; i0 += BLOCK) {
        long i1 = i0 + BLOCK < n ? i0 + BLOCK : n;
        float bq = 0.0f;
        if (dst) {
            long i = i0;
#ifdef __AVX__
            /* Streaming stores: the copy is read back only after the optimizer's pass,
               so it bypasses the caches (no read of dst's lines before writing them). */
            if (((uintptr_t)(dst + i) & 31) == 0) {
                __m256 acc = _mm256_setzero_ps();
                for (; i + 8 <= i1; i += 8) {
                    __m256 v = _mm256_loadu_ps(x + i);
                    _mm256_stream_ps(dst + i, v);
                    acc = _mm256_add_ps(acc, _mm256_mul_ps(v, v));
                }
                float lanes[8];
                _mm256_storeu_ps(lanes, acc);
                for (int k = 0; k < 8; ++k)
                    bq += lanes[k];
            }
#endif
            for (; i < i1; ++i) {
                float v = x[i];
                dst[i] = v;
                bq += v * v;
            }
        } else
            for (long i = i0; i < i1; ++i)
                bq += x[i] * x[i];
        q += bq;
    }
    return q;
}

/* The sum of squares alone (out[1], as in gradflow_reduce_f32): output gradients. */
void gradflow_squares_f32(const float *x, long n, double *out) {
    out[1] = squares(x, 0, n);
}

/* Tensor t of one parameter kernel: 0 sums of squares and non-finite counts of a[0]
   (NULL counts 0), 1 copy a[0] into a[1] with sums of squares, 2 for d = a[0] - a[1]: sum
   d^2, sum |d| and max |d| (NaN where d has a NaN). */
static void param_op(int op, long t, const float *const *const *a, const long *n,
                     double *const *out) {
    const float *x = a[0][t];
    if (op == 0) {
        double q = x ? squares(x, 0, n[t]) : 0.0;
        long c = 0;
        if (!isfinite(q))
            for (long i = 0; i < n[t]; ++i)
                c += !isfinite(x[i]);
        out[0][t] = q;
        out[1][t] = (double)c;
    } else if (op == 1) {
        out[0][t] = squares(x, (float *)a[1][t], n[t]);
    } else {
        const float *y = a[1][t];
        double q = 0.0, s = 0.0;
        /* max |d| on the bits of |d|: ordered like the floats (NaN aside, which q
           reports) and an integer maximum, which the compiler vectorises. */
        unsigned m = 0;
        for (long i0 = 0; i0 < n[t]; i0 += BLOCK) {
            long i1 = i0 + BLOCK < n[t] ? i0 + BLOCK : n[t];
            float bq = 0.0f, bs = 0.0f;
            for (long i = i0; i < i1; ++i) {
                float d = x[i] - y[i], ad = fabsf(d);
                unsigned b;
                memcpy(&b, &ad, sizeof b);
                bq += d * d;
                bs += ad;
                m = b > m ? b : m;
            }
            q += bq;
            s += bs;
        }
        float fm;
        memcpy(&fm, &m, sizeof fm);
        out[0][t] = q;
        out[1][t] = s;
        out[2][t] = isnan(q) ? NAN : (double)fm;
    }
}

struct span {
    int op;
    long t0, t1;
    const float *const *const *a;
    const long *n;
    double *const *out;
};

static void *run_span(void *p) {
    const struct span *s = p;
    for (long t = s->t0; t < s->t1; ++t)
        param_op(s->op, t, s->a, s->n, s->out);
#ifdef __AVX__
    _mm_sfence(); /* the streamed copy is complete before the call returns */
#endif
    return 0;
}

/* Kernel op over all tensors, tensors [bounds[i], bounds[i+1]) on thread i of parts (this
   thread runs part 0; a part whose thread cannot start runs here too). */
void gradflow_params(int op, long parts, const long *bounds, const float *const *const *a,
                     const long *n, double *const *out) {
    struct span spans[64];
    pthread_t threads[64];
    int started[64];
    if (parts > 64)
        parts = 64;
    for (long i = 0; i < parts; ++i) {
        struct span s = {op, bounds[i], bounds[i + 1], a, n, out};
        spans[i] = s;
        started[i] = i > 0 && pthread_create(&threads[i], 0, run_span, &spans[i]) == 0;
    }
    run_span(&spans[0]);
    for (long i = 1; i < parts; ++i) {
        if (started[i])
            pthread_join(threads[i], 0);
        else
            run_span(&spans[i]);
    }
}
"""
# Reassociation lets the compiler vectorise the sums; NaN and Inf keep their meaning.
_FLAGS = ["-O3", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
          "-fno-trapping-math", "-shared", "-fPIC", "-pthread"]  # fmt: skip

ReduceInto = Callable[[int, int, int], None]


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
def _library() -> ctypes.CDLL | None:
    """The compiled kernels, checked against plain arithmetic, or ``None``."""
    if os.environ.get("GRADFLOW_NATIVE", "1") == "0":
        return None
    try:
        with tempfile.TemporaryDirectory(prefix="gradflow-") as tmp:
            library = _compile(Path(tmp))
    except OSError:  # no writable temporary directory: the torch path it is
        return None
    if library is None:
        return None
    library.gradflow_reduce_f32.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p]
    library.gradflow_reduce_f32.restype = None
    library.gradflow_squares_f32.argtypes = library.gradflow_reduce_f32.argtypes
    library.gradflow_squares_f32.restype = None
    library.gradflow_params.argtypes = [ctypes.c_int, ctypes.c_long] + [ctypes.c_void_p] * 4
    library.gradflow_params.restype = None
    # A build that disagrees with plain arithmetic on a known input is not used.
    probe = torch.tensor([0.0, 1.5, -2.0, 0.0] + [0.5] * 5000 + [float("inf")])
    if (
        _reduce(library, probe[:-1]) != [2499.5, 1256.25, 2.0, 0.0]
        or _reduce(library, probe)[3] != 1.0
    ):
        return None
    return library


def _reduce(library: ctypes.CDLL, x: torch.Tensor) -> list[float]:
    out = np.empty(4)
    library.gradflow_reduce_f32(x.data_ptr(), x.numel(), out.ctypes.data)
    return out.tolist()


def kernel(squares_only: bool = False) -> ReduceInto | None:
    """``reduce(address, n, out)``: the ``[sum, sum of squares, zeros, non-finite]`` of the
    ``n`` float32 entries at ``address``, written as four doubles at ``out`` (only
    ``out[1]`` if ``squares_only``); ``None`` where the kernels are unavailable. A raw
    call: the probes pass addresses they own."""
    library = _library()
    if library is None:
        return None
    return library.gradflow_squares_f32 if squares_only else library.gradflow_reduce_f32


def _pointers(tensors: Sequence[torch.Tensor | None]) -> np.ndarray:
    return np.array([0 if t is None else t.data_ptr() for t in tensors], dtype=np.uintp)


class ParamKernels:
    """Per-tensor parameter reductions over lists of contiguous float32 CPU tensors, each in
    one pass and one call for all tensors (float64 [P] results). Between backward and the
    optimizer step torch's threads are idle: the tensors are split into as many parts as
    torch uses threads (beyond a million entries), one thread each."""

    SQUARES, COPY_SQUARES, DELTA = 0, 1, 2

    def __init__(self, library: ctypes.CDLL, sizes: Sequence[int]) -> None:
        self._lib = library
        self._n = np.asarray(sizes, dtype=np.int64)
        self._bounds: dict[int, np.ndarray] = {}

    @staticmethod
    def usable(tensors: Sequence[torch.Tensor]) -> bool:
        """Whether every tensor (all on the CPU) can go through the kernels."""
        dtypes = {t.dtype for t in tensors}
        return dtypes <= {torch.float32} and all(map(torch.Tensor.is_contiguous, tensors))

    def _split(self) -> np.ndarray:
        threads = torch.get_num_threads()
        bounds = self._bounds.get(threads)
        if bounds is None:
            total = int(self._n.sum())
            parts = max(1, min(threads, 64, len(self._n))) if total >= 2**20 else 1
            ends = np.cumsum(self._n)
            cuts = np.searchsorted(ends, total * np.arange(1, parts) / parts)
            bounds = np.unique(np.concatenate([[0], cuts, [len(self._n)]])).astype(np.int64)
            self._bounds[threads] = bounds
        return bounds

    def _run(
        self, op: int, tensors: Sequence[Sequence[torch.Tensor | None]], n_out: int
    ) -> list[torch.Tensor]:
        pointers = [_pointers(group) for group in tensors]
        outs = [np.empty(len(self._n)) for _ in range(n_out)]
        arrays = np.array([p.ctypes.data for p in pointers], dtype=np.uintp)
        results = np.array([o.ctypes.data for o in outs], dtype=np.uintp)
        bounds = self._split()
        self._lib.gradflow_params(
            op, len(bounds) - 1, bounds.ctypes.data, arrays.ctypes.data, self._n.ctypes.data,
            results.ctypes.data,
        )  # fmt: skip
        return [torch.from_numpy(o) for o in outs]

    def squares(self, tensors: Sequence[torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """Sums of squares and non-finite counts (``None`` counts 0)."""
        sq, bad = self._run(self.SQUARES, [tensors], 2)
        return sq, bad

    def copy_squares(
        self, sources: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """Copy ``sources`` into ``targets``; returns the sums of squares."""
        return self._run(self.COPY_SQUARES, [sources, targets], 1)[0]

    def delta(
        self, before: Sequence[torch.Tensor], after: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        """``[sum d^2, sum |d|, max |d|]`` of ``d = before - after``."""
        return self._run(self.DELTA, [before, after], 3)


def param_kernels(sizes: Sequence[int]) -> ParamKernels | None:
    """:class:`ParamKernels` for tensors of these sizes, or ``None`` where unavailable."""
    library = _library()
    return None if library is None else ParamKernels(library, sizes)
