"""``gradflow serve``: the report page over HTTP, redrawn as the run files grow.

The page polls ``/status.json`` (the committed row counts, a data version that changes
when a file is replaced, and the last read error) every second and fetches ``/data.json``
when they change. The run files are read through their live (SWMR) reader,
which never blocks the writer, and re-read at most once a second whatever the number of
open pages. Only the files named on the command line are served; no path is taken from
the URL.

Against clients and files that misbehave: a request must arrive whole within
``request_timeout`` (10 s), and each read or write of a connection must finish within it;
at most ``max_workers`` connections are served at once (others get 503 at once). At every
refresh each served name is opened once, without following a link or waiting on a FIFO,
and must be a regular file of the user running the server; what was checked is what is
read (through ``/proc/self/fd`` where there is one).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import os
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gradflow.errors import GradflowError, reason
from gradflow.escape import visible
from gradflow.report.data import SCREEN_BINS, payload, to_json
from gradflow.report.page import page
from gradflow.runfile import Run, open_run
from gradflow.safefile import file_kind

MIN_REREAD_S = 1.0
REQUEST_TIMEOUT_S = 10.0
MAX_WORKERS = 16
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
_PROC_FD = Path("/proc/self/fd")
_BUSY = b"HTTP/1.0 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\n\r\n"


def is_loopback(host: str) -> bool:
    """Whether ``host`` is only reachable from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str | None:
    """The name in a ``Host`` header (``name``, ``name:port``, ``[v6]``, ``[v6]:port``),
    lower-cased; None where it is malformed."""
    header = header.strip().lower()
    if header.startswith("["):
        name, bracket, rest = header[1:].partition("]")
        if not bracket or (rest and not (rest[0] == ":" and rest[1:].isdigit())):
            return None
        return name
    name, colon, port = header.partition(":")
    return name if not colon or port.isdigit() else None


def _open_checked(path: Path, shown: Path) -> tuple[int, os.stat_result]:
    """``path`` opened for reading, not following a link nor waiting on a FIFO, and its
    status; refused unless it is a regular file of the user running the server."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise GradflowError(f"{shown}: no such run file") from None
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.EMLINK):  # O_NOFOLLOW on a link
            raise GradflowError(f"{shown}: a symbolic link; not following it") from None
        raise GradflowError(f"{shown}: cannot open it ({reason(err)})") from None
    info = os.fstat(fd)
    problem = ""
    if not stat.S_ISREG(info.st_mode):
        problem = f"{file_kind(info.st_mode)}, not a regular file; not reading it"
    elif hasattr(os, "geteuid") and info.st_uid != os.geteuid():
        problem = f"owned by another user (uid {info.st_uid}); not reading it"
    if problem:
        os.close(fd)
        raise GradflowError(f"{shown}: {problem}")
    return fd, info


def _open_run(path: Path, shown: Path, fd: int, info: os.stat_result) -> Run:
    """The run file that ``fd`` (checked by :func:`_open_checked`) is open on, named
    ``shown``."""
    if _PROC_FD.is_dir():
        # The descriptor's own file, whatever the name points at by now.
        inner = str(_PROC_FD / str(fd))
        try:
            run = open_run(inner)
        except GradflowError as err:
            raise GradflowError(str(err).replace(inner, str(shown))) from None
    else:
        run = open_run(path)
        now = os.lstat(path)
        if (now.st_dev, now.st_ino) != (info.st_dev, info.st_ino):
            run.close()
            raise GradflowError(f"{shown}: replaced while it was opened")
    run.path = shown
    return run


class LiveRuns:
    """The named run files and their JSON, re-read at most every ``min_interval`` seconds."""

    def __init__(
        self,
        paths: Sequence[Path],
        *,
        min_interval: float = MIN_REREAD_S,
        max_bins: int = SCREEN_BINS,
    ) -> None:
        self.paths = list(paths)
        # The user's own links are followed once, now; a link put there later is refused.
        self._real = [p.resolve() for p in self.paths]
        self.min_interval = min_interval
        self.max_bins = max_bins
        self._runs: list[Run | None] = []  # None: closed, to be opened again
        self._ids: list[tuple[int, int]] = []
        self._lock = threading.Lock()
        self._read_at = -float("inf")
        self._counts: list[list[int]] | None = None
        self._version = 0  # counts up when the data is rebuilt
        self._stale = False  # a file was opened afresh since the data was last built
        self._error = ""
        self._data = b"null"
        try:
            for path, real in zip(self.paths, self._real, strict=True):
                fd, info = _open_checked(real, path)
                try:
                    self._runs.append(_open_run(real, path, fd, info))
                finally:
                    os.close(fd)
                self._ids.append((info.st_dev, info.st_ino))
        except (GradflowError, OSError):
            self.close()
            raise
        self._read()

    def _read(self) -> None:
        runs = []
        for i, path in enumerate(self.paths):
            fd, info = _open_checked(self._real[i], path)
            try:
                runs.append(self._current(i, fd, info))
            finally:
                os.close(fd)
        counts = [[run.n_steps, run.n_epochs, run.n_events] for run in runs]
        # Another run renamed over a file may have the same row counts.
        if self._stale or counts != self._counts:
            self._data = to_json(payload(runs, self.max_bins)).encode()
            self._counts = counts
            self._version += 1
            self._stale = False

    def _current(self, i: int, fd: int, info: os.stat_result) -> Run:
        """Run ``i``, refreshed, or opened afresh from ``fd`` where the file was replaced."""
        run = self._runs[i]
        # Files are only ever replaced by renames (a run that closes cleanly is rewritten
        # compressed and renamed into place), so a missing path is a deleted file.
        file_id = (info.st_dev, info.st_ino)
        if run is not None and file_id == self._ids[i]:
            try:
                run.refresh()
                return run
            except GradflowError:
                pass  # HDF5 could not follow the file's growth: read it afresh
        if run is not None:
            # Closed first: a second handle in this process would share its stale state.
            run.close()
            self._runs[i] = None
        self._runs[i] = run = _open_run(self._real[i], self.paths[i], fd, info)
        self._ids[i] = file_id
        self._stale = True
        return run

    def refresh(self) -> None:
        """Re-read the files unless that was done less than ``min_interval`` seconds ago."""
        with self._lock:
            if time.monotonic() - self._read_at < self.min_interval:
                return
            self._read_at = time.monotonic()
            try:
                self._read()
                self._error = ""
            except (GradflowError, OSError) as err:
                self._error = visible(reason(err))  # the last good data stays on the page

    def status(self) -> bytes:
        """The committed row counts of every run, the data's version (it changes with every
        new ``/data.json``) and the last read error ("" if none), as JSON."""
        self.refresh()
        with self._lock:
            status = {"counts": self._counts, "version": self._version, "error": self._error}
            return json.dumps(status).encode()

    def data(self) -> bytes:
        """The report data of every run, as JSON."""
        self.refresh()
        with self._lock:
            return self._data

    def close(self) -> None:
        """Close every run file."""
        for run in self._runs:
            if run is not None:
                run.close()


def _handler(
    server: ReportServer, html: bytes, hosts: frozenset[str] | None
) -> type[BaseHTTPRequestHandler]:
    """Requests to ``server``: its fixed routes; with ``hosts``, only under those names."""
    live = server.live
    routes: dict[str, tuple[str, Callable[[], bytes]]] = {
        "/": ("text/html; charset=utf-8", lambda: html),
        "/data.json": ("application/json", live.data),
        "/status.json": ("application/json", live.status),
    }

    class Handler(BaseHTTPRequestHandler):
        server_version = "gradflow"
        sys_version = ""
        timeout = server.request_timeout  # for every read and write of the connection

        def parse_request(self) -> bool:
            # A request cut short by its deadline (the rest never came) gets no answer.
            if not server.in_time(self.connection):
                self.close_connection = True
                return False
            parsed = super().parse_request()  # reads the headers
            if not server.read_done(self.connection):
                self.close_connection = True
                return False
            return parsed

        def do_GET(self) -> None:
            host = host_name(self.headers.get("Host") or "")
            if hosts is not None and host not in hosts:
                # A page from another site that resolves its name to 127.0.0.1 gets nothing.
                self.send_error(403, "unexpected Host header")
                return
            route = routes.get(urlsplit(self.path).path)
            if route is None:
                self.send_error(404, "not found: this server has /, /data.json, /status.json")
                return
            kind, body = route
            content = body()
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(content)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            self.wfile.write(content)

        def log_message(self, format: str, *args: object) -> None:
            """Requests are not logged: the page polls every second."""

    return Handler


class ReportServer(ThreadingHTTPServer):
    """The live report of run files over HTTP; closing the server closes the files.

    Each connection is served by a thread of its own, at most ``max_workers`` at once;
    one more is answered 503 and closed at once. A request must arrive whole within
    ``request_timeout`` seconds of connecting (a watchdog thread closes the connections
    still reading past it), and every later read or write must finish within as long.
    Names other than loopback ones and ``host`` in the Host header are refused (403)
    while listening on loopback.
    """

    daemon_threads = True
    request_queue_size = 64  # connections waiting to be accepted (socketserver's is 5)

    def __init__(
        self,
        paths: Sequence[str | Path],
        *,
        host: str = "127.0.0.1",
        port: int = 8050,
        request_timeout: float = REQUEST_TIMEOUT_S,
        max_workers: int = MAX_WORKERS,
    ) -> None:
        self.request_timeout = request_timeout
        self._workers = threading.BoundedSemaphore(max_workers)
        self._lock = threading.Lock()
        self._deadlines: dict[Any, float] = {}  # connections still reading their request
        self._expired: set[Any] = set()
        self._closed = threading.Event()
        self.live = LiveRuns([Path(p) for p in paths])
        title = "gradflow (live): " + ", ".join(Path(p).name for p in paths)
        hosts = frozenset(LOOPBACK_NAMES | {host.lower()}) if is_loopback(host) else None
        handler = _handler(self, page("null", title).encode(), hosts)
        if ":" in host:  # an IPv6 address such as ::1
            self.address_family = socket.AF_INET6
        try:
            super().__init__((host, port), handler)
        except OSError as err:
            self.live.close()
            if err.errno == errno.EADDRINUSE:
                raise GradflowError(
                    f"port {port} is in use on {host}; pick another with --port"
                ) from None
            raise GradflowError(f"cannot listen on {host}:{port}: {reason(err)}") from None
        watchdog = threading.Thread(target=self._close_late, name="gradflow-deadlines")
        watchdog.daemon = True
        watchdog.start()

    @property
    def url(self) -> str:
        """The page's address."""
        host, port = str(self.server_address[0]), self.server_address[1]
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/"

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve ``request`` in a thread of its own, or answer 503 when all are busy."""
        if not self._workers.acquire(blocking=False):
            with contextlib.suppress(OSError):
                request.setblocking(False)
                request.send(_BUSY)
            self.shutdown_request(request)
            return
        with self._lock:
            self._deadlines[request] = time.monotonic() + self.request_timeout
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that went away or was too slow is no error of the server's.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)

    def in_time(self, request: Any) -> bool:
        """Whether ``request`` is not past its deadline."""
        with self._lock:
            return request not in self._expired

    def read_done(self, request: Any) -> bool:
        """Note that ``request`` was read whole; False where that came too late."""
        with self._lock:
            self._deadlines.pop(request, None)
            return request not in self._expired

    def _release(self, request: Any) -> None:
        with self._lock:
            self._deadlines.pop(request, None)
            self._expired.discard(request)
        self._workers.release()

    def _close_late(self) -> None:
        while not self._closed.wait(0.1):
            now = time.monotonic()
            with self._lock:
                late = [r for r, deadline in self._deadlines.items() if deadline <= now]
                for request in late:
                    del self._deadlines[request]
                    self._expired.add(request)
            for request in late:  # the blocked read returns, the worker ends
                with contextlib.suppress(OSError):
                    request.shutdown(socket.SHUT_RDWR)

    def server_close(self) -> None:
        self._closed.set()
        super().server_close()
        self.live.close()


def serve(
    paths: Sequence[str | Path],
    *,
    host: str = "127.0.0.1",
    port: int = 8050,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve the live report of ``paths`` at ``http://host:port/`` until interrupted.

    ``on_ready`` gets the page's URL once the server listens (``port=0``: any free port).
    """
    with ReportServer(paths, host=host, port=port) as server:
        if on_ready is not None:
            on_ready(server.url)
        server.serve_forever(poll_interval=0.2)
