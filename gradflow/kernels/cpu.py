"""The CPU's C kernels (``_cpu.c``): where the library comes from, the per-call kernels
(float32 and bfloat16; :mod:`gradflow.kernels.host` calls them) and the parameter passes.

On the CPU, recording activations and output gradients is bound by passes over memory
and by per-operation dispatch: sum, sum of squares and zero count take four torch
operations (five passes) per layer call. The kernels do all of them, plus the count of
non-finite entries, in one vectorised pass and one call. They come from, in this order
(:func:`cpu_backend` says which one this process uses):

- ``c-extension``: the library that ``pip install`` built next to this module (setup.py);
- ``c-cached``: else a build with the system C compiler (``$CC``, else ``cc``), made once
  into a per-user cache directory (``GRADFLOW_CACHE_DIR``, else ``$XDG_CACHE_HOME/gradflow``
  or ``~/.cache/gradflow``) under a name keyed by the source, the compiler and its flags,
  and loaded from there by every later process and DDP rank. The library is loaded as
  code, so only from a folder that no other user can write to (nor any folder above
  it), and only if it is a regular file of this user that only they can write, checked
  on the opened file (:mod:`gradflow.usercache`);
- ``c-private``: where the cache is not safe (or cannot be written), a build into a
  fresh private folder, deleted once loaded (compiled again by every process);
- ``torch``: else torch operations, with one :class:`~gradflow.errors.GradflowWarning`
  (``GRADFLOW_NATIVE=0`` chooses them without a warning).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from gradflow.errors import GradflowWarning
from gradflow.kernels import DELTA_COLUMNS
from gradflow.kernels._cbuild import CFLAGS, SHARED, SOURCE, digest_macro, source_digest
from gradflow.kernels.cached_build import Failed, Refused, build, compiler
from gradflow.usercache import cache_dir, open_library

HERE = Path(__file__).parent
# What the torch fallback costs per recorded step, measured on a 2-core x86-64 machine
# (README, "How it stays cheap").
FALLBACK_COST = (
    "its reductions take 2.5x (fig3b-long-9) to 20x (paper-resunet, 11 M parameters) longer"
)

ReduceInto = Callable[[int, int, int], None]
# The dtypes the per-call kernels read, by their names' suffix, and those kernels.
KERNEL_DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16"}
CALL_KERNELS = [f"gradflow_{k}_{d}" for k in ("reduce", "squares") for d in KERNEL_DTYPES.values()]


class _Loaded(NamedTuple):
    library: ctypes.CDLL | None
    backend: str  # c-extension, c-cached or torch


def extension_path() -> Path | None:
    """The library built at install time, if there is one."""
    stem = Path(SOURCE).stem
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = HERE / f"{stem}{suffix}"
        if path.is_file():
            return path
    return None


def _build(folder: Path, flags: Sequence[str]) -> Path:
    """The library in ``folder``, compiled first if missing (see :func:`build_cached`)."""
    command = compiler("CC", "cc", "C")
    source = HERE / SOURCE
    if not source.is_file():
        raise Failed(f"{source} is missing (reinstall gradflow)")
    macro = "-D{}={}".format(*digest_macro(source))
    return build(folder, [*command, *CFLAGS, *SHARED, macro, *flags], source, "kernels")


def build_cached(folder: Path, flags: Sequence[str] = ()) -> tuple[Path | None, str]:
    """The cached library in ``folder``, compiled first if missing; ``(None, why)`` where
    that fails or ``folder`` is not safe (see :func:`gradflow.kernels.cached_build.build`)."""
    try:
        return _build(folder, flags), ""
    except (Refused, Failed) as err:
        return None, str(err)


def load(path: Path) -> ctypes.CDLL | None:
    """The kernels in the library at ``path``, checked against plain arithmetic, or
    ``None`` where it is not a regular file of this user (or root) that only they can
    write, does not load or disagrees."""
    library = open_library(path)
    if library is None:
        return None
    try:
        for name in CALL_KERNELS:
            function = getattr(library, name)
            function.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p]
            function.restype = None
        library.gradflow_params.argtypes = [ctypes.c_int, ctypes.c_long] + [ctypes.c_void_p] * 4
        library.gradflow_params.restype = None
        library.gradflow_source_digest.argtypes = []
        library.gradflow_source_digest.restype = ctypes.c_char_p
    except AttributeError:
        return None
    probe = torch.tensor([0.0, 1.5, -2.0, 0.0] + [0.5] * 5000 + [float("inf")])
    finite = _reduce(library, probe[:-1])
    if (
        not np.allclose(finite[:2], [2499.5, 1256.25], rtol=1e-6, atol=0.0)
        or finite[2:] != [5002.0, 0.0]
        or _reduce(library, probe)[2:] != [5003.0, 1.0]
    ):
        return None
    return library


def cached_kernels(folder: Path, flags: Sequence[str] = ()) -> tuple[_Loaded, str]:
    """The kernels from the cache ``folder`` where it is safe and its library loads, else
    from a build in a fresh private folder (deleted once loaded); the torch backend and
    why where neither works."""
    try:
        path = _build(folder, flags)
        library = load(path)
        if library is not None:
            return _Loaded(library, "c-cached"), ""
        why = f"{path} is not a library only you can write, does not load or gives wrong numbers"
    except Refused as err:
        why = str(err)
    except Failed as err:
        return _Loaded(None, "torch"), str(err)
    with tempfile.TemporaryDirectory(prefix="gradflow-build-") as private:
        built, failed = build_cached(Path(private), flags)
        library = load(built) if built is not None else None
    if library is not None:
        return _Loaded(library, "c-private"), ""
    return _Loaded(None, "torch"), failed or why


def built_from(library: ctypes.CDLL) -> str:
    """The digest of the source ``library`` was built from (``_cbuild.source_digest``)."""
    digest: bytes = library.gradflow_source_digest()
    return digest.decode()


@functools.cache
def _library() -> _Loaded:
    """The kernels of this process and where they came from (decided once)."""
    if os.environ.get("GRADFLOW_NATIVE", "1") == "0":
        return _Loaded(None, "torch")
    built = extension_path()
    library = load(built) if built is not None else None
    # An extension built from another version of the source (an edited checkout): stale.
    if library is not None and built_from(library) == source_digest(HERE / SOURCE):
        return _Loaded(library, "c-extension")
    chosen, why = cached_kernels(cache_dir())
    if chosen.library is not None:
        return chosen
    warnings.warn(
        f"gradflow: no C kernels ({why}); recording on the CPU uses torch operations, and "
        f"{FALLBACK_COST}. Install a C compiler (for example gcc) or reinstall gradflow "
        "where one works; GRADFLOW_NATIVE=0 chooses torch operations without this warning",
        GradflowWarning,
        stacklevel=2,
    )
    return _Loaded(None, "torch")


def cpu_backend() -> str:
    """Which CPU kernels this process uses: ``c-extension``, ``c-cached`` or ``torch``."""
    return _library().backend


def _reduce(library: ctypes.CDLL, x: torch.Tensor) -> list[float]:
    out = np.empty(4)
    library.gradflow_reduce_f32(x.data_ptr(), x.numel(), out.ctypes.data)
    return out.tolist()


def kernel(
    squares_only: bool = False, hold_gil: bool = False, dtype: torch.dtype = torch.float32
) -> ReduceInto | None:
    """``reduce(address, n, out)``: the ``[sum, sum_sq, nonzero, nonfinite]`` columns of the
    ``n`` entries of ``dtype`` (float32 or bfloat16) at ``address``, written as four doubles
    at ``out`` (only ``sum_sq``, as one double, if ``squares_only``); ``None`` where the
    kernels are unavailable. A raw call: the callers pass addresses they own. ``hold_gil``:
    the call keeps the GIL (for small tensors: handing the GIL to a waiting writer thread and
    taking it back cost ~8 us a call, more than the reduction)."""
    library = _library().library
    if library is None:
        return None
    if hold_gil:
        library = _holding_gil(library)
    kind = "squares" if squares_only else "reduce"
    return getattr(library, f"gradflow_{kind}_{KERNEL_DTYPES[dtype]}")


@functools.cache
def _holding_gil(library: ctypes.CDLL) -> ctypes.PyDLL:
    """The per-call kernels of the loaded ``library`` as functions that keep the GIL."""
    held = ctypes.PyDLL(library._name, handle=library._handle)
    for name in CALL_KERNELS:
        function = getattr(held, name)
        function.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p]
        function.restype = None
    return held


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
        self,
        before: Sequence[torch.Tensor],
        after: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor | None],
    ) -> list[torch.Tensor]:
        """:data:`~gradflow.kernels.DELTA_COLUMNS` of ``d = before - after`` (``g_dot_d``
        with ``grads``; ``None`` counts 0)."""
        return self._run(self.DELTA, [before, after, grads], len(DELTA_COLUMNS))


def param_kernels(sizes: Sequence[int]) -> ParamKernels | None:
    """:class:`ParamKernels` for tensors of these sizes, or ``None`` where unavailable."""
    library = _library().library
    return None if library is None else ParamKernels(library, sizes)
