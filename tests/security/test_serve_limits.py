"""``gradflow serve`` against clients and files that misbehave: slow or idle connections
time out, the workers are bounded, a file swapped at a served name is checked before it
is read, and the server's own address is a valid Host header.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from runfiles import write_run

from gradflow.report.server import LiveRuns, ReportServer


@contextmanager
def serving(paths: list[Path], **options: object) -> Iterator[ReportServer]:
    with ReportServer(paths, port=0, **options) as server:  # type: ignore[arg-type]
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
        thread.start()
        try:
            yield server
        finally:
            server.shutdown()
            thread.join()


def get(url: str, host: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _connect(server: ReportServer) -> socket.socket:
    host, port = server.server_address[:2]
    return socket.create_connection((str(host), port), timeout=30)


def _closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closed ``sock`` (reading whatever it sent), or None."""
    start = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return time.monotonic() - start


def test_a_half_sent_request_is_closed_and_others_are_answered(tmp_path: Path) -> None:
    run = write_run(tmp_path / "a.h5", epochs=1)
    with serving([run], request_timeout=1.0) as server:
        slow = _connect(server)
        slow.sendall(b"GET /status.json HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        # A client that sends a byte now and then never completes its request either.
        trickle = _connect(server)
        trickle.sendall(b"GET / HTTP/1.1\r\n")
        for _ in range(4):
            assert get(server.url + "status.json")[0] == 200
            try:
                trickle.sendall(b"X")
            except OSError:  # closed by the server already
                break
            time.sleep(0.4)
        assert _closed_within(slow, 5) is not None
        assert _closed_within(trickle, 5) is not None
        idle = _connect(server)  # sends nothing at all
        waited = _closed_within(idle, 5)
        assert waited is not None and waited < 3
        assert get(server.url + "status.json")[0] == 200
        for sock in (slow, trickle, idle):
            sock.close()


def test_the_default_time_limit_is_ten_seconds(tmp_path: Path) -> None:
    with serving([write_run(tmp_path / "a.h5", epochs=1)]) as server:
        assert server.request_timeout == 10.0


def test_connections_beyond_the_worker_limit_are_turned_away(tmp_path: Path) -> None:
    run = write_run(tmp_path / "a.h5", epochs=1)
    threads_before = threading.active_count()
    with serving([run], request_timeout=30.0, max_workers=4) as server:
        idle = [_connect(server) for _ in range(40)]
        time.sleep(0.5)
        # The idle connections hold at most the 4 workers (plus the serving thread and
        # the one that closes connections past their time).
        assert threading.active_count() - threads_before <= 4 + 2
        # The other 36 are told "busy" and closed at once.
        closed = [_closed_within(sock, 0.2) for sock in idle]
        assert sum(seconds is not None for seconds in closed) == 36
        assert get(server.url + "status.json")[0] == 503  # while the 4 are held
        for sock in idle:
            sock.close()
        time.sleep(0.3)
        assert get(server.url + "status.json")[0] == 200


def _swap(path: Path, make: Callable[[Path], None]) -> None:
    """Put what ``make`` creates at ``path`` in one rename, as an attacker would."""
    staged = path.with_name(".staged")
    make(staged)
    os.replace(staged, path)


def test_a_fifo_swapped_in_is_refused_without_hanging(tmp_path: Path) -> None:
    run = write_run(tmp_path / "a.h5", epochs=1)
    live = LiveRuns([run], min_interval=0.0)
    try:
        _swap(run, lambda p: os.mkfifo(p))
        start = time.monotonic()
        status = json.loads(live.status())
        assert time.monotonic() - start < 2
        assert status["error"] == f"{run}: a FIFO, not a regular file; not reading it"
    finally:
        live.close()


def test_a_link_swapped_in_is_not_followed(tmp_path: Path) -> None:
    run = write_run(tmp_path / "a.h5", epochs=1)
    elsewhere = write_run(tmp_path / "secret.h5", epochs=3)
    live = LiveRuns([run], min_interval=0.0)
    try:
        _swap(run, lambda p: p.symlink_to(elsewhere))
        status = json.loads(live.status())
        assert status["error"] == f"{run}: a symbolic link; not following it"
        assert status["counts"] == [[10, 1, 0]]  # the last good data, not the link's target
    finally:
        live.close()


def test_a_file_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")
    run = write_run(tmp_path / "a.h5", epochs=1)
    live = LiveRuns([run], min_interval=0.0)
    try:
        other = write_run(tmp_path / "other.h5", epochs=2)
        os.chown(other, 65534, 65534)
        os.replace(other, run)
        status = json.loads(live.status())
        assert status["error"] == f"{run}: owned by another user (uid 65534); not reading it"
        assert status["counts"] == [[10, 1, 0]]
    finally:
        live.close()


def test_a_link_named_on_the_command_line_is_served(tmp_path: Path) -> None:
    # The user's own link is resolved once, when the server starts.
    run = write_run(tmp_path / "a.h5", epochs=1)
    (tmp_path / "latest.h5").symlink_to(run)
    live = LiveRuns([tmp_path / "latest.h5"], min_interval=0.0)
    try:
        status = json.loads(live.status())
        assert status["error"] == "" and status["counts"] == [[10, 1, 0]]
        assert json.loads(live.data())["runs"][0]["file"] == "latest.h5"
    finally:
        live.close()


def test_the_servers_own_address_is_a_valid_host(tmp_path: Path) -> None:
    run = write_run(tmp_path / "a.h5", epochs=1)
    with ReportServer([run], host="127.0.0.2", port=0) as server:
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
        thread.start()
        try:
            port = server.server_address[1]
            assert get(server.url + "status.json")[0] == 200  # Host: 127.0.0.2:PORT
            assert get(server.url, host="127.0.0.2")[0] == 200
            assert get(server.url, host=f"localhost:{port}")[0] == 200
            assert get(server.url, host="127.0.0.3")[0] == 403
            assert get(server.url, host="127.0.0.2.evil.example")[0] == 403
        finally:
            server.shutdown()
            thread.join()


def test_an_ipv6_host_without_a_port_is_valid(tmp_path: Path) -> None:
    try:
        socket.socket(socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 on this machine")
    run = write_run(tmp_path / "a.h5", epochs=1)
    with ReportServer([run], host="::1", port=0) as server:
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
        thread.start()
        try:
            port = server.server_address[1]
            assert get(server.url, host="[::1]")[0] == 200
            assert get(server.url, host=f"[::1]:{port}")[0] == 200
            assert get(server.url, host="[::2]")[0] == 403
            assert get(server.url, host="[::1")[0] == 403
        finally:
            server.shutdown()
            thread.join()
