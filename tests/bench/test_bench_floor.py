"""The calibration floor (``bench/floor.py``) is a real HTTP/1.1 forwarder: requests and responses
go through it intact, over keep-alive connections, with Content-Length and chunked bodies,
against the test upstream and against the bench's own nginx backend. Each floor is started the
way the harness starts it (``bench.proxies.start_proxy(..., "floor", ...)``)."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # ``bench`` is not an installed package
    sys.path.insert(0, str(REPO_ROOT))

from bench import configs  # noqa: E402
from bench.proxies import Lab, Running, StartError, start_backend, start_proxy  # noqa: E402
from moorline.testing.procs import RawConn, free_port  # noqa: E402
from moorline.testing.upstream import TestUpstream, chunked_payload, pattern_bytes, pattern_sha256  # noqa: E402

pytestmark = pytest.mark.e2e
H = "127.0.0.1"


@pytest.fixture
def lab(tmp_path: Path) -> Lab:
    return Lab(tmp_path, None, None)


@pytest.fixture
def floor(lab: Lab) -> Iterator[Callable[..., Running]]:
    """Factory: ``floor(upstream_port, **start_proxy_kwargs)``; every floor is stopped after."""
    started: list[Running] = []

    def make(upstream_port: int, **kw: object) -> Running:
        run = start_proxy(lab, "floor", upstream_port, **kw)  # type: ignore[arg-type]
        started.append(run)
        return run

    try:
        yield make
    finally:
        for run in started:
            run.stop()


def _conn_ids(up: TestUpstream, paths: set[str]) -> set[int]:
    # The harness's readiness probe is a connection with no request: only requests count.
    return {r.conn_id for r in up.requests if r.path in paths}


def test_keep_alive_and_bodies_against_the_test_upstream(upstream: TestUpstream, floor) -> None:
    f = floor(upstream.port)
    paths = {"/bytes/1024", "/bytes/102400", "/chunked/7", "/echo-cl", "/echo-chunked", "/trailers"}
    with RawConn(H, f.port) as c:
        # 1 KiB and 100 KiB Content-Length responses, byte for byte.
        for n in (1024, 102400):
            c.send(f"GET /bytes/{n} HTTP/1.1\r\nHost: floor\r\n\r\n".encode())
            r = c.read_response()
            assert (r.status, r.chunked, r.header("content-length")) == (200, False, str(n))
            assert hashlib.sha256(r.body).hexdigest() == pattern_sha256(n)
            assert r.header("x-upstream-id") == "upstream"
        # A chunked response stays chunked and arrives whole.
        c.send(b"GET /chunked/7 HTTP/1.1\r\nHost: floor\r\n\r\n")
        r = c.read_response()
        assert r.status == 200 and r.chunked
        assert r.body == b"".join(chunked_payload(7))
        # Trailers of a chunked response are forwarded.
        c.send(b"GET /trailers HTTP/1.1\r\nHost: floor\r\n\r\n")
        r = c.read_response()
        assert r.chunked and ("x-trailer-a", "1") in r.trailers and ("x-trailer-b", "2") in r.trailers
        # A 1 KiB Content-Length request body reaches the upstream intact.
        body = pattern_bytes(1024)
        c.send(b"POST /echo-cl HTTP/1.1\r\nHost: floor\r\nContent-Length: 1024\r\n\r\n" + body)
        echo = json.loads(c.read_response().body)
        assert echo["body_len"] == 1024 and echo["body_sha256"] == hashlib.sha256(body).hexdigest()
        assert ["content-length", "1024"] in echo["headers"]
        # A 100 KiB chunked upload, sent in uneven chunks and pieces, with a trailer.
        big = os.urandom(102400)
        pieces = [big[:1], big[1:50000], big[50000:]]
        wire = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\nx-sum: 1\r\n\r\n"
        c.send(b"POST /echo-chunked HTTP/1.1\r\nHost: floor\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i in range(0, len(wire), 7000):
            c.send(wire[i : i + 7000])
        echo = json.loads(c.read_response().body)
        assert echo["body_len"] == len(big) and echo["body_sha256"] == hashlib.sha256(big).hexdigest()
        assert ["transfer-encoding", "chunked"] in echo["headers"]
        assert echo["trailers"] == [["x-sum", "1"]]
    # Keep-alive on both sides: all of the above used one upstream connection.
    assert len(_conn_ids(upstream, paths)) == 1
    # A second client gets its own upstream connection (one per downstream connection).
    with RawConn(H, f.port) as c:
        c.send(b"GET /second HTTP/1.1\r\nHost: floor\r\n\r\n")
        assert c.read_response().status == 200
    (second,) = _conn_ids(upstream, {"/second"})
    assert second not in _conn_ids(upstream, paths)
    assert f.alive()


def test_head_pipelining_and_connection_close(upstream: TestUpstream, floor) -> None:
    f = floor(upstream.port)
    with RawConn(H, f.port) as c:
        # An answer to HEAD carries Content-Length but no body; the next answer follows intact.
        c.send(
            b"HEAD /bytes/5000 HTTP/1.1\r\nHost: floor\r\n\r\n"
            b"GET /bytes/3 HTTP/1.1\r\nHost: floor\r\n\r\n"
            b"GET /status/204 HTTP/1.1\r\nHost: floor\r\n\r\n"
            b"GET /bytes/4 HTTP/1.1\r\nHost: floor\r\n\r\n"
        )
        r = c.read_response(head_request=True)
        assert r.status == 200 and r.header("content-length") == "5000" and r.body == b""
        assert c.read_response().body == pattern_bytes(3)
        assert c.read_response().status == 204
        assert c.read_response().body == pattern_bytes(4)
        # A HEAD pipelined behind other requests (and a chunked upload behind it), in one send:
        # the floor keeps one request in flight, so each answer is framed right.
        upload = b"5\r\nhello\r\n0\r\n\r\n"
        c.send(
            b"GET /chunked/3 HTTP/1.1\r\nHost: floor\r\n\r\n"
            b"HEAD /bytes/7000 HTTP/1.1\r\nHost: floor\r\n\r\n"
            b"POST /up HTTP/1.1\r\nHost: floor\r\nTransfer-Encoding: chunked\r\n\r\n" + upload
        )
        assert c.read_response().body == b"".join(chunked_payload(3))
        r = c.read_response(head_request=True)
        assert r.header("content-length") == "7000" and r.body == b""
        echo = json.loads(c.read_response().body)
        assert echo["path"] == "/up" and echo["body_len"] == 5
        # The floor's framing stayed in step (it did not take the later answers for the body
        # the HEAD answer announced): an upstream that closes on the next request is a 502.
        c.send(b"GET /close HTTP/1.1\r\nHost: floor\r\n\r\n")
        assert c.read_response().status == 502
    with RawConn(H, f.port) as c:
        # Connection: close ends the pair after the answer.
        c.send(b"GET /last HTTP/1.1\r\nHost: floor\r\nConnection: close\r\n\r\n")
        r = c.read_response()
        assert r.status == 200 and json.loads(r.body)["path"] == "/last"
        assert c.is_closed_by_peer(5)
    # After an answer to HEAD the floor knows the next answer starts at once (it does not wait
    # for 5000 body bytes): an upstream closing on the next request is a 502 to the client.
    with RawConn(H, f.port) as c:
        c.send(b"HEAD /bytes/5000 HTTP/1.1\r\nHost: floor\r\n\r\n")
        assert c.read_response(head_request=True).header("content-length") == "5000"
        c.send(b"GET /close HTTP/1.1\r\nHost: floor\r\n\r\n")
        assert c.read_response().status == 502
    # HTTP/1.0 without keep-alive: answered, then closed.
    with RawConn(H, f.port) as c:
        c.send(b"GET /old HTTP/1.0\r\nHost: floor\r\n\r\n")
        r = c.read_response()
        assert r.status == 200 and json.loads(r.body)["http_version"] == "1.0"
        assert c.is_closed_by_peer(5)


class BatchUpstream:
    """An upstream that answers only after a quiet spell, everything it was asked so far in one
    send, and records those batches: it shows how many requests a proxy keeps in flight, and it
    coalesces answers the way a fast upstream can."""

    QUIET_S = 0.3

    def __init__(self) -> None:
        self.sock = socket.create_server((H, 0))
        self.port = self.sock.getsockname()[1]
        self.batches: list[list[str]] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(self.QUIET_S)
        buf = b""
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    heads = [h for h in buf.split(b"\r\n\r\n") if h]
                    buf = b""
                    if heads:
                        lines = [h.split(b"\r\n")[0].decode() for h in heads]
                        self.batches.append([" ".join(line.split()[:2]) for line in lines])
                        conn.sendall(b"".join(map(self._answer, lines)))
                    continue
                except OSError:
                    return
                if not data:
                    return
                buf += data

    @staticmethod
    def _answer(line: str) -> bytes:
        method, path = line.split()[:2]
        if method == "HEAD":
            return b"HTTP/1.1 200 OK\r\nContent-Length: 7000\r\n\r\n"
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(path), path.encode())

    def close(self) -> None:
        self.sock.close()


def test_one_request_in_flight_so_head_answers_stay_framed(floor) -> None:
    """Pipelined requests reach the upstream one at a time: with several in flight, an upstream
    that sends its answers together would put the answers after an answer to HEAD where llhttp
    expects that answer's body."""
    up = BatchUpstream()
    try:
        f = floor(up.port)
        with RawConn(H, f.port) as c:
            c.send(
                b"GET /a HTTP/1.1\r\nHost: floor\r\n\r\n"
                b"HEAD /b HTTP/1.1\r\nHost: floor\r\n\r\n"
                b"GET /c HTTP/1.1\r\nHost: floor\r\n\r\n"
            )
            assert c.read_response().body == b"/a"
            r = c.read_response(head_request=True)
            assert r.header("content-length") == "7000" and r.body == b""
            assert c.read_response().body == b"/c"
        assert up.batches == [["GET /a"], ["HEAD /b"], ["GET /c"]]
    finally:
        up.close()


def test_errors_are_answered_not_hung(upstream: TestUpstream, floor) -> None:
    f = floor(upstream.port)
    with RawConn(H, f.port) as c:
        c.send(b"NOT HTTP AT ALL\r\n\r\n")
        assert c.read_response().status == 400
        assert c.is_closed_by_peer(5)
    with RawConn(H, f.port) as c:
        c.send(b"GET /ws HTTP/1.1\r\nHost: floor\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        assert c.read_response().status == 501  # no tunnels in the floor
        assert c.is_closed_by_peer(5)
    # The upstream closes without answering: 502, and the client's connection closes too.
    with RawConn(H, f.port) as c:
        c.send(b"GET /close HTTP/1.1\r\nHost: floor\r\n\r\n")
        assert c.read_response().status == 502
        assert c.is_closed_by_peer(5)
    assert "/ws" not in {r.path for r in upstream.requests}
    # Nothing listens upstream: 502.
    dead = floor(free_port())
    with RawConn(H, dead.port) as c:
        c.send(b"GET / HTTP/1.1\r\nHost: floor\r\n\r\n")
        assert c.read_response().status == 502
    assert f.alive() and dead.alive()


def test_bench_bodies_through_the_nginx_backend(lab: Lab, floor) -> None:
    """The bench's own backend (nginx) behind the floor, with the harness's check request."""
    backend = start_backend(lab)
    try:
        f = floor(backend.port, check_path="/1k", check_body=configs.BODIES["1k"])
        conn = http.client.HTTPConnection(H, f.port, timeout=10)
        try:
            for _ in range(2):
                for path, name in (("/small", "small"), ("/1k", "1k"), ("/100k", "100k")):
                    conn.request("GET", path)
                    resp = conn.getresponse()
                    assert resp.status == 200 and resp.read() == configs.BODIES[name], path
                    assert resp.getheader("server", "").startswith("nginx")
            # Same client socket throughout: http.client reconnects silently otherwise.
            sock = conn.sock
            conn.request("GET", configs.ROUTE_RULES_PATH)
            assert conn.getresponse().read() == configs.BODIES["small"]
            assert conn.sock is sock
        finally:
            conn.close()
        f.stop()
        assert not f.alive() and f.child.popen.returncode == 0  # SIGTERM: a clean exit
    finally:
        backend.stop()


def test_floor_is_http1_only(lab: Lab, upstream: TestUpstream) -> None:
    for kw in ({"mode": "h2"}, {"l4": True}):
        with pytest.raises(StartError, match=r"HTTP/1\.1 only"):
            start_proxy(lab, "floor", upstream.port, **kw)  # type: ignore[arg-type]
