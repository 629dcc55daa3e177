"""Tests of the test upstream (moorline.testing.upstream) itself, with real clients."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import subprocess
import threading

import pytest

from moorline.testing.procs import RawConn, raw_exchange, require_binary
from moorline.testing.upstream import (
    RecordingUpstream,
    TcpEchoServer,
    TestUpstream,
    chunked_payload,
    pattern_bytes,
    pattern_sha256,
    websocket_accept,
    ws_frame,
    ws_read_frame,
)


def _get(up: TestUpstream, path: str, method: str = "GET", body: bytes | None = None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", up.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r, r.read()
    finally:
        conn.close()


def test_echo_reports_request_and_records_it(upstream: TestUpstream) -> None:
    r, body = _get(upstream, "/hello?x=1", "POST", b"abc", {"X-Foo": "bar"})
    assert r.status == 200
    assert r.getheader("x-upstream-id") == "upstream"
    doc = json.loads(body)
    assert doc["method"] == "POST" and doc["path"] == "/hello?x=1"
    assert ["x-foo", "bar"] in doc["headers"]
    assert doc["body_sha256"] == hashlib.sha256(b"abc").hexdigest() and doc["body_len"] == 3
    rec = upstream.requests[-1]
    assert rec.header("X-Foo") == "bar" and rec.body_len == 3 and rec.method == "POST"


def test_status_head_204_304(upstream: TestUpstream) -> None:
    r, body = _get(upstream, "/status/418")
    assert r.status == 418 and body
    with RawConn("127.0.0.1", upstream.port) as c:
        for code in (204, 304, 200):
            c.send(f"GET /status/{code} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            resp = c.read_response()
            # 204/304 carry no body, so the next response starts right after the head.
            assert resp.status == code and (resp.body == b"") == (code != 200)
    with RawConn("127.0.0.1", upstream.port) as c:
        c.send(b"HEAD /bytes/1000 HTTP/1.1\r\nHost: x\r\n\r\nGET /status/200 HTTP/1.1\r\nHost: x\r\n\r\n")
        head = c.read_response(head_request=True)
        assert head.header("content-length") == "1000" and head.body == b""
        # The next response follows immediately: HEAD really sent no body bytes.
        assert c.read_response().status == 200


def test_keepalive_same_connection_and_pipelining(upstream: TestUpstream) -> None:
    with RawConn("127.0.0.1", upstream.port) as c:
        c.send(b"".join(f"GET /delay/{d} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for d in (100, 0, 50)))
        paths = [json.loads(c.read_response().body)["path"] for _ in range(3)]
    assert paths == ["/delay/100", "/delay/0", "/delay/50"]
    assert len({r.conn_id for r in upstream.requests}) == 1


def test_bytes_and_chunked_and_trailers(upstream: TestUpstream) -> None:
    n = 3 * 65536 + 123
    _r, body = _get(upstream, f"/bytes/{n}")
    assert len(body) == n and hashlib.sha256(body).hexdigest() == pattern_sha256(n)
    assert body[:300] == pattern_bytes(300) and body[70000:70300] == pattern_bytes(300, 70000)
    with RawConn("127.0.0.1", upstream.port) as c:
        c.send(b"GET /chunked/7 HTTP/1.1\r\nHost: x\r\n\r\n")
        resp = c.read_response()
        assert resp.chunked and resp.body == b"".join(chunked_payload(7))
        c.send(b"GET /trailers HTTP/1.1\r\nHost: x\r\nTE: trailers\r\n\r\n")
        resp = c.read_response()
        assert ("x-trailer-a", "1") in resp.trailers and resp.body == b"body-with-trailers\n"


def test_chunked_request_body_hashed(upstream: TestUpstream) -> None:
    data = os.urandom(100_000)
    with RawConn("127.0.0.1", upstream.port) as c:
        c.send(b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i in range(0, len(data), 30000):
            part = data[i : i + 30000]
            c.send(b"%x\r\n%s\r\n" % (len(part), part))
        c.send(b"0\r\nx-t: 1\r\n\r\n")
        doc = json.loads(c.read_response().body)
    assert doc["body_sha256"] == hashlib.sha256(data).hexdigest()
    assert upstream.requests[-1].trailers == [("x-t", "1")]


def test_close_and_reset(upstream: TestUpstream) -> None:
    with RawConn("127.0.0.1", upstream.port) as c:
        c.send(b"GET /close HTTP/1.1\r\nHost: x\r\n\r\n")
        assert c.read_to_eof() == b""
    with RawConn("127.0.0.1", upstream.port) as c:
        c.send(b"GET /reset HTTP/1.1\r\nHost: x\r\n\r\n")
        with pytest.raises(ConnectionResetError):
            c.sock.recv(10)


def test_fail_n_and_always_status(upstream: TestUpstream, upstreams) -> None:
    codes = [_get(upstream, "/fail-n/k/2")[0].status for _ in range(4)]
    assert codes == [503, 503, 200, 200]
    bad = upstreams(always_status=503, upstream_id="bad")
    r, _ = _get(bad, "/anything")
    assert r.status == 503 and r.getheader("x-upstream-id") == "bad"


def test_garbage_response(upstreams) -> None:
    g = upstreams(garbage=True)
    with RawConn("127.0.0.1", g.port) as c:
        c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert c.read_until(b"\r\n").startswith(b"THIS IS NOT HTTP")


def test_expect_100_continue(upstream: TestUpstream) -> None:
    with RawConn("127.0.0.1", upstream.port) as c:
        c.send(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        interim = c.read_response()
        assert interim.status == 100
        c.send(b"hello")
        assert json.loads(c.read_response().body)["body_len"] == 5


def test_http10_closes(upstream: TestUpstream) -> None:
    resp, closed = raw_exchange("127.0.0.1", upstream.port, b"GET /x HTTP/1.0\r\n\r\n")
    assert resp.status == 200 and closed
    with RawConn("127.0.0.1", upstream.port) as c:
        c.send(b"GET /x HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        resp = c.read_response()
        assert resp.header("connection") == "keep-alive"
        assert not c.is_closed_by_peer(0.3)


def test_websocket_echo(upstream: TestUpstream) -> None:
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    assert websocket_accept(key) == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455 example
    with RawConn("127.0.0.1", upstream.port) as c:
        c.send(
            f"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
            + ws_frame(1, b"early")
        )
        resp = c.read_response()
        assert resp.status == 101 and resp.header("sec-websocket-accept") == websocket_accept(key)
        assert ws_read_frame(c.sock, c.buf) == (1, b"early")
        c.send(ws_frame(2, b"x" * 70000))
        assert ws_read_frame(c.sock, c.buf) == (2, b"x" * 70000)


def test_tcp_echo_half_close() -> None:
    data = os.urandom(2_000_000)
    with TcpEchoServer() as srv, socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        t = threading.Thread(target=lambda: (s.sendall(data), s.shutdown(socket.SHUT_WR)))
        t.start()
        got = bytearray()
        while chunk := s.recv(65536):
            got += chunk
        t.join()
    assert bytes(got) == data


def test_curl_chunked_upload(upstream: TestUpstream, tmp_path) -> None:
    curl = require_binary("curl")
    f = tmp_path / "body.bin"
    f.write_bytes(os.urandom(300_000))
    out = subprocess.run(
        [
            curl,
            "-sS",
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            f"@{f}",
            f"http://127.0.0.1:{upstream.port}/up",
        ],
        capture_output=True,
        timeout=20,
        check=True,
    )
    doc = json.loads(out.stdout)
    assert doc["body_sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
    assert ["transfer-encoding", "chunked"] in doc["headers"]


def test_recording_upstream_records_heads_byte_exact() -> None:
    """Heads are recorded as sent (nothing validated or normalised), pipelined requests are
    answered in order with their request line, and Content-Length and chunked bodies are
    framed correctly."""
    with RecordingUpstream() as rec, RawConn("127.0.0.1", rec.port) as c:
        c.send(
            b"GET /a b HTTP/1.1\r\nHost: {}\r\nX-Odd : v\r\n\r\n"
            b"POST /cl HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"
            b"POST /ch HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nxy\r\n1;e=1\r\nz\r\n0\r\nt: 1\r\n\r\n"
        )
        bodies = [c.read_response().body for _ in range(3)]
        assert bodies == [b"GET /a b HTTP/1.1", b"POST /cl HTTP/1.1", b"POST /ch HTTP/1.1"]
        reqs = rec.requests
    assert reqs[0].head == b"GET /a b HTTP/1.1\r\nHost: {}\r\nX-Odd : v"
    assert reqs[0].header(b"host") == b"{}" and reqs[0].header(b"x-odd") == b"v"
    assert [r.body for r in reqs[1:]] == [b"abc", b"xyz"]
    assert len({r.conn_id for r in reqs}) == 1


def test_recording_upstream_tunnels_after_upgrade() -> None:
    """An upgrade head gets 101 at once; every byte after it, also in the same write, is tunnel
    payload: recorded and echoed raw."""
    with RecordingUpstream() as rec, RawConn("127.0.0.1", rec.port) as c:
        c.send(b"GET /u HTTP/1.1\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\nearly")
        assert c.read_response().status == 101
        c.send(b"-late")
        assert c.read_exact(len(b"early-late")) == b"early-late"
        (req,) = rec.requests
        assert rec.wait_for(lambda r: r.tunnel_bytes(req.conn_id) == b"early-late")
        assert rec.raw_bytes(req.conn_id).endswith(b"\r\n\r\nearly-late")
