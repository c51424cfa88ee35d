"""``gradflow serve``: the report page over HTTP, redrawn as the run files grow.

The page polls ``/status.json`` (the committed row counts, a data version that changes
when a file is replaced, and the last read error) every second and fetches ``/data.json``
when they change. The run files are read through their live (SWMR) reader,
which never blocks the writer, and re-read at most once a second whatever the number of
open pages. Only the files named on the command line are served; no path is taken from
the URL.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import socket
import threading
import time
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from gradflow.errors import GradflowError, reason
from gradflow.report.data import SCREEN_BINS, payload, to_json
from gradflow.report.page import page
from gradflow.runfile import Run, open_run

MIN_REREAD_S = 1.0
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


def is_loopback(host: str) -> bool:
    """Whether ``host`` is only reachable from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _file_id(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise GradflowError(f"{path}: no such run file") from None
    return st.st_dev, st.st_ino


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
            for path in self.paths:
                self._ids.append(_file_id(path))
                self._runs.append(open_run(path))
        except (GradflowError, OSError):
            self.close()
            raise
        self._read()

    def _read(self) -> None:
        runs = []
        for i, path in enumerate(self.paths):
            run = self._runs[i]
            # Files are only ever replaced by renames (a run that closes cleanly is rewritten
            # compressed and renamed into place), so a missing path is a deleted file.
            file_id = _file_id(path)
            if run is not None and file_id == self._ids[i]:
                try:
                    run.refresh()
                    runs.append(run)
                    continue
                except GradflowError:
                    pass  # HDF5 could not follow the file's growth: read it afresh
            if run is not None:
                # Closed first: a second handle in this process would share its stale state.
                run.close()
                self._runs[i] = None
            self._runs[i] = run = open_run(path)
            self._ids[i] = file_id
            self._stale = True
            runs.append(run)
        counts = [[run.n_steps, run.n_epochs, run.n_events] for run in runs]
        # Another run renamed over a file may have the same row counts.
        if self._stale or counts != self._counts:
            self._data = to_json(payload(runs, self.max_bins)).encode()
            self._counts = counts
            self._version += 1
            self._stale = False

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
                self._error = reason(err)  # the last good data stays on the page

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


def _handler(live: LiveRuns, html: bytes, check_host: bool) -> type[BaseHTTPRequestHandler]:
    routes: dict[str, tuple[str, Callable[[], bytes]]] = {
        "/": ("text/html; charset=utf-8", lambda: html),
        "/data.json": ("application/json", live.data),
        "/status.json": ("application/json", live.status),
    }

    class Handler(BaseHTTPRequestHandler):
        server_version = "gradflow"
        sys_version = ""

        def do_GET(self) -> None:
            host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]")
            if check_host and host not in LOOPBACK_NAMES:
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
    """The live report of run files over HTTP; closing the server closes the files."""

    daemon_threads = True

    def __init__(
        self, paths: Sequence[str | Path], *, host: str = "127.0.0.1", port: int = 8050
    ) -> None:
        self.live = LiveRuns([Path(p) for p in paths])
        title = "gradflow (live): " + ", ".join(Path(p).name for p in paths)
        handler = _handler(self.live, page("null", title).encode(), check_host=is_loopback(host))
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

    @property
    def url(self) -> str:
        """The page's address."""
        host, port = str(self.server_address[0]), self.server_address[1]
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/"

    def server_close(self) -> None:
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
