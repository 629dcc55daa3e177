"""End-to-end L4: a listener whose only network filter is ``envoy.filters.network.tcp_proxy``
relaying to a TCP echo server. Bytes must arrive unchanged both ways, with the kernel
``splice`` path and with the userspace copy (``MOORLINE_NO_SPLICE=1``), and a client's
half-close (FIN) must travel through so the echo server's FIN comes back.
"""

from __future__ import annotations

import hashlib
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from moorline.testing import procs
from moorline.testing.procs import free_port
from moorline.testing.upstream import TcpEchoServer, pattern_bytes, pattern_sha256

pytestmark = pytest.mark.e2e

H = "127.0.0.1"


@pytest.fixture(params=["splice", "no_splice"])
def tcp_env(request: pytest.FixtureRequest, tmp_path: Path, echo_server: TcpEchoServer) -> Iterator[int]:
    port = free_port()
    cfg = procs.bootstrap(
        [procs.tcp_listener("tcp_in", port, "echo")], [procs.cluster("echo", [echo_server.port])]
    )
    env = {"MOORLINE_NO_SPLICE": "1"} if request.param == "no_splice" else {}
    p = procs.start_moorline(cfg, tmp_path, env=env)
    try:
        yield port
    finally:
        p.stop(signal.SIGTERM, 5)


def _roundtrip(port: int, n: int) -> tuple[int, str]:
    """Send ``n`` pattern bytes then half-close; read the echo to EOF. (length, sha256)."""
    block = pattern_bytes(1 << 16)
    with socket.create_connection((H, port), timeout=30) as s:
        err: list[BaseException] = []

        def send() -> None:
            try:
                sent = 0
                while sent < n:
                    take = min(len(block), n - sent)
                    s.sendall(block[:take])
                    sent += take
                s.shutdown(socket.SHUT_WR)
            except BaseException as exc:  # surfaced by the assertion below
                err.append(exc)

        t = threading.Thread(target=send)
        t.start()
        h = hashlib.sha256()
        got = 0
        while chunk := s.recv(1 << 16):
            h.update(chunk)
            got += len(chunk)
        t.join(30)
        assert not err, err
        return got, h.hexdigest()


def test_twenty_megabytes_each_way(tcp_env: int) -> None:
    """20 MB up and the same 20 MB echoed back, sha256 equal, EOF propagated both ways."""
    n = 20 * 1024 * 1024
    got, digest = _roundtrip(tcp_env, n)
    assert got == n
    assert digest == pattern_sha256(n)


def test_parallel_connections(tcp_env: int) -> None:
    """Four concurrent relayed connections do not mix their bytes."""
    results: list[tuple[int, str]] = []
    lock = threading.Lock()

    def one() -> None:
        r = _roundtrip(tcp_env, 3 * 1024 * 1024 + 17)
        with lock:
            results.append(r)

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    n = 3 * 1024 * 1024 + 17
    assert results == [(n, pattern_sha256(n))] * 4
