"""The grad_output probe's hooks in C++ (``_prehook.cpp``) on the CPU: a pre-hook on the node
that made each layer output reduces the output gradient without the GIL and without a
Python call, into a :class:`SquaresSink` that the probe empties once per recorded step.

The library is compiled against the installed torch (its headers, its libraries, its C++
ABI), so it is never built at install time: the first CPU recording of a process loads it
from gradflow's per-user cache (:func:`gradflow.usercache.cache_dir`, under the checks of
:mod:`gradflow.kernels.cached_build`); where it is not there, a process that has recorded
for :data:`BUILD_AFTER_S` seconds builds it there in a background thread, and records
through Python hooks until it is loaded. Where the cache is not safe, no C++ compiler or
no Python headers are found, or the library disagrees with plain arithmetic, the Python
hooks stay (the same numbers; about 2 % of fig3b-long-9's step more, README "Benchmarks").
``GRADFLOW_NATIVE=0`` chooses them.
"""

from __future__ import annotations

import ctypes
import os
import sys
import sysconfig
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradflow.kernels import cpu
from gradflow.kernels.cached_build import Failed, Refused, build, compiler, library_path
from gradflow.usercache import cache_dir, open_library, unsafe_folder

SOURCE = Path(__file__).parent / "_prehook.cpp"
_Reduce = ctypes.c_void_p


def command() -> tuple[list[str], list[str]]:
    """The compiler command and the libraries to link, for this torch and this Python.

    Returns:
        ``(command, link)`` for :func:`gradflow.kernels.cached_build.build`.

    Raises:
        Failed: no C++ compiler or no Python headers.
    """
    cxx = compiler("CXX", "c++", "C++")
    python = Path(sysconfig.get_paths()["include"])
    if not (python / "Python.h").is_file():
        raise Failed(f"no Python headers in {python} (install the Python development package)")
    root = Path(torch.__file__).parent
    lib = root / "lib"
    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    standard = "c++20" if (major, minor) >= (2, 9) else "c++17"  # as torch's own extensions
    flags = [
        "-O2", f"-std={standard}", "-w", "-fPIC", "-shared",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        # Another torch build of the same version gives another library.
        f"-DGRADFLOW_TORCH=\"{torch.__version__} {torch.version.git_version}\"",
        "-isystem", str(root / "include"),
        "-isystem", str(root / "include" / "torch" / "csrc" / "api" / "include"),
        "-isystem", str(python),
    ]  # fmt: skip
    link = [f"-L{lib}", f"-Wl,-rpath,{lib}", "-ltorch_python", "-ltorch_cpu", "-lc10"]
    return [*cxx, *flags], link


def _functions(library: ctypes.CDLL) -> ctypes.PyDLL:
    """The library's functions, typed; called with the GIL held (they read Python objects)."""
    held = ctypes.PyDLL(library._name, handle=library._handle)
    held.gradflow_sink_new.argtypes = [_Reduce, _Reduce]
    held.gradflow_sink_new.restype = ctypes.c_void_p
    held.gradflow_sink_free.argtypes = [ctypes.c_void_p]
    held.gradflow_sink_free.restype = None
    held.gradflow_sink_size.argtypes = [ctypes.c_void_p]
    held.gradflow_sink_size.restype = ctypes.c_long
    held.gradflow_sink_take.argtypes = [ctypes.c_void_p, ctypes.c_long, *[ctypes.c_void_p] * 4]
    held.gradflow_sink_take.restype = ctypes.c_long
    held.gradflow_watch.argtypes = [ctypes.py_object, ctypes.c_void_p, ctypes.c_int64]
    held.gradflow_watch.restype = ctypes.c_int
    return held


class SquaresSink:
    """Rows ``(layer, entries, sum of squares)`` of the output gradients that the C++ hooks
    reduced, in the order backward reached them."""

    def __init__(self, functions: ctypes.PyDLL) -> None:
        self._f = functions
        self._watch = functions.gradflow_watch
        pointers = [_kernel_address(dtype) for dtype in (torch.float32, torch.bfloat16)]
        self._handle = functions.gradflow_sink_new(*pointers)

    def watch(self, tensor: torch.Tensor, layer_id: int) -> int:
        """Hook the node that made ``tensor``.

        Args:
            tensor: a layer output.
            layer_id: the layer's id in the rows.

        Returns:
            1 where hooked, 0 where ``tensor`` has no node (a leaf), -1 where torch refused.
        """
        result: int = self._watch(tensor, self._handle, layer_id)
        return result

    def take(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """The rows since the last take, emptied from the sink.

        Returns:
            ``(sum_sq, layer_ids, entries, seconds)``: float64, int64, int64 arrays and the
            seconds the hooks spent.
        """
        n = self._f.gradflow_sink_size(self._handle)
        sums, layers, sizes = np.empty(n), np.empty(n, np.int64), np.empty(n, np.int64)
        seconds = ctypes.c_double()
        taken = self._f.gradflow_sink_take(
            self._handle, n, sums.ctypes.data, layers.ctypes.data, sizes.ctypes.data,
            ctypes.addressof(seconds),
        )  # fmt: skip
        return sums[:taken], layers[:taken], sizes[:taken], seconds.value

    def close(self) -> None:
        """Drop this handle (hooks still in a graph keep the rows' memory until they go)."""
        if self._handle:
            self._f.gradflow_sink_free(self._handle)
            self._handle = None

    def __del__(self) -> None:
        self.close()


def _kernel_address(dtype: torch.dtype) -> int | None:
    """The address of the C kernel for sums of squares of ``dtype`` (None: ATen's)."""
    kernel: Any = cpu.kernel(squares_only=True, dtype=dtype)  # a function of the library
    return None if kernel is None else ctypes.cast(kernel, ctypes.c_void_p).value


def load(path: Path) -> ctypes.PyDLL | None:
    """The hooks in the library at ``path``, checked on a small graph against plain
    arithmetic; ``None`` where the file is not one only this user can write (see
    :func:`gradflow.usercache.open_library`), does not load or disagrees."""
    try:
        library = open_library(path)
        functions = None if library is None else _functions(library)
    except (OSError, AttributeError):
        return None
    if functions is None:
        return None
    sink = SquaresSink(functions)
    weights = torch.tensor([1.0, 2.0, 3.0])
    # Loaded from inside a forward hook: its own graph, whatever the training's modes.
    with torch.enable_grad(), torch.autocast("cpu", enabled=False):
        try:
            for dtype in (torch.float32, torch.bfloat16, torch.float64):
                x = torch.tensor([1.0, -2.0, 3.0], dtype=dtype, requires_grad=True)
                y = x * 2
                if sink.watch(y, 7) != 1 or sink.watch(x, 8) != 0:
                    return None
                (y * weights.to(dtype)).sum().backward()
                sums, layers, sizes, _ = sink.take()
                if sums.tolist() != [14.0] or layers.tolist() != [7] or sizes.tolist() != [3]:
                    return None
        except RuntimeError:
            return None
        finally:
            sink.close()
    return functions


# Recording this long without the library starts building it: a short run (a test, a
# smoke run) never spends a core on the compiler, a long one soon has the C++ hooks.
BUILD_AFTER_S = 20.0


class _Build:
    """This process's library: loaded at once where the cache holds it, else built in a
    background thread; ``functions`` is ``None`` until then, or with why not (``why``)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.asked: float | None = None  # when the library was first asked for
        self.started = False
        self.done = threading.Event()
        self.functions: ctypes.PyDLL | None = None
        self.why = ""

    def ask(self, wait: bool = False) -> None:
        """Load the library if built, else build it once asked for :data:`BUILD_AFTER_S`
        seconds (at once with ``wait``, which also waits for it)."""
        if self.done.is_set():
            return
        now = time.monotonic()
        with self.lock:
            if self.asked is None:
                self.asked = now
                try:
                    self._load_cached()
                except Exception as err:  # never an error in the caller's training step
                    self._finish(None, f"{type(err).__name__}: {err}")
            start = not (self.started or self.done.is_set()) and (
                wait or now - self.asked >= BUILD_AFTER_S
            )
            self.started |= start
        if start:
            threading.Thread(target=self._run, name="gradflow-prehook-build", daemon=True).start()
        if wait:
            self.done.wait()

    def _load_cached(self) -> None:
        if os.environ.get("GRADFLOW_NATIVE", "1") == "0":
            self._finish(None, "GRADFLOW_NATIVE=0")
            return
        folder = cache_dir()
        try:
            cmd, link = command()
        except Failed as err:
            self._finish(None, str(err))
            return
        path = library_path(folder, cmd, SOURCE, "prehook", link)
        if os.path.lexists(path) and not unsafe_folder(folder):
            self._finish(*_loaded(path))

    def _run(self) -> None:
        try:
            self._finish(*_build_and_load(cache_dir()))
        except Exception as err:  # anything unforeseen leaves the Python hooks in place
            self._finish(None, f"{type(err).__name__}: {err}")

    def _finish(self, functions: ctypes.PyDLL | None, why: str) -> None:
        self.functions, self.why = functions, why
        self.done.set()


def _build_and_load(folder: Path) -> tuple[ctypes.PyDLL | None, str]:
    """Build and load the library; processes sharing the cache (DDP ranks) build it once:
    the others wait for that build (in their background thread) and load it."""
    try:
        import fcntl
    except ImportError:
        return None, "no POSIX file locks here"
    try:
        cmd, link = command()
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        unsafe = unsafe_folder(folder)
        if unsafe:  # checked before the lock file is opened there
            return None, unsafe
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        lock = os.open(folder / ".prehook.lock", flags, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            path = build(folder, cmd, SOURCE, "prehook", link)
        finally:
            os.close(lock)
    except (Refused, Failed) as err:
        return None, str(err)
    except OSError as err:
        return None, f"cannot use the cache directory {folder}: {err.strerror or err}"
    return _loaded(path)


def _loaded(path: Path) -> tuple[ctypes.PyDLL | None, str]:
    functions = load(path)
    if functions is None:
        return None, f"{path} is not a library only you can write, does not load or disagrees"
    return functions, ""


_BUILD = _Build()


def squares_sink(wait: bool = False) -> SquaresSink | None:
    """A new sink where the hooks' library is loaded, else ``None`` (the first call loads
    it from the cache; where it is not there, a call :data:`BUILD_AFTER_S` seconds later
    starts building it in the background).

    Args:
        wait: wait for the build to end (tests, benchmarks).

    Returns:
        A :class:`SquaresSink`, or ``None`` while building and where the library is
        unavailable (:func:`why_not` says why).
    """
    _BUILD.ask(wait)
    functions = _BUILD.functions
    return None if functions is None else SquaresSink(functions)


def building() -> bool:
    """Whether the library may still come: not asked for yet, or being built."""
    return not _BUILD.done.is_set()


def why_not() -> str:
    """Why no sink is available ("" where one is, or while building)."""
    return _BUILD.why


def compiled_autograd() -> bool:
    """Whether backward may run under compiled autograd, which takes only Python hooks."""
    module = sys.modules.get("torch._dynamo.compiled_autograd")
    config = sys.modules.get("torch._dynamo.config")
    return bool(
        (module is not None and getattr(module, "compiled_autograd_enabled", False))
        or (config is not None and getattr(config, "compiled_autograd", False))
    )
