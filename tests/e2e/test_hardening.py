"""End-to-end hardening: malformed or abusive HTTP/1.1 from clients, byte-exact on raw sockets.

Every test asserts the status line Envoy sends, that the connection is closed afterwards (a
protocol error leaves the connection in an unknown state, so Envoy closes it), and that the
proxy keeps serving a good request on a new connection.

Listeners (one moorline, module scope), all routing ``/`` to one test upstream:
- ``h``: Envoy defaults plus ``headers_with_underscores_action: REJECT_REQUEST``
- ``small``: ``max_request_headers_kb: 8``
- ``hdr_to``: ``request_headers_timeout: 1s``
- ``req_to``: ``request_timeout: 1s``
- ``idle_to``: ``stream_idle_timeout: 1s``

``MOORLINE_E2E_TARGET=nginx`` runs the framing tests (where nginx answers as Envoy does)
against nginx, to check the tests themselves.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from moorline.testing import procs
from moorline.testing.procs import RawConn, free_port, http_request, raw_exchange
from moorline.testing.upstream import TestUpstream

pytestmark = pytest.mark.e2e

TARGET = os.environ.get("MOORLINE_E2E_TARGET", "moorline")
H = "127.0.0.1"


@dataclass
class Env:
    kind: str
    ports: dict[str, int]
    up: TestUpstream
    proc: procs.MoorlineProc | procs.NginxProc

    def moorline_only(self) -> None:
        if self.kind != "moorline":
            pytest.skip("nginx answers this differently from Envoy")

    def assert_still_serving(self, name: str = "h") -> None:
        r = http_request(H, self.ports[name], "GET", "/still-ok")
        assert r.status == 200


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("hardening")
    up = TestUpstream(upstream_id="hard").start()
    extras = {
        "h": {"common_http_protocol_options": {"headers_with_underscores_action": "REJECT_REQUEST"}},
        "small": {"max_request_headers_kb": 8},
        "hdr_to": {"request_headers_timeout": "1s"},
        "req_to": {"request_timeout": "1s"},
        "idle_to": {"stream_idle_timeout": "1s"},
    }
    ports = {name: free_port() for name in extras}
    proc: procs.MoorlineProc | procs.NginxProc | None = None
    try:
        if TARGET == "nginx":
            proc = procs.start_nginx(tmp, procs.nginx_reverse_proxy(ports["h"], up.port), ports["h"])
        else:
            listeners = [
                procs.hcm_listener(
                    name,
                    ports[name],
                    [{"match": {"prefix": "/"}, "route": {"cluster": "up"}}],
                    hcm_extra=extra,
                )
                for name, extra in extras.items()
            ]
            proc = procs.start_moorline(procs.bootstrap(listeners, [procs.cluster("up", [up.port])]), tmp)
        yield Env(TARGET, ports, up, proc)
    finally:
        if proc is not None:
            proc.stop(signal.SIGTERM, 5)
        up.stop()


def _expect(env: Env, data: bytes, status: int, name: str = "h") -> None:
    resp, closed = raw_exchange(H, env.ports[name], data)
    assert resp.status == status, (resp.status, resp.body[:200])
    assert closed, "connection must be closed after a protocol error"
    env.assert_still_serving(name)


def test_content_length_and_transfer_encoding_400(env: Env) -> None:
    """Both Content-Length and Transfer-Encoding (request smuggling vector): 400, closed
    (Envoy rejects unless ``allow_chunked_length``)."""
    _expect(
        env,
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        400,
    )


def test_differing_content_lengths_400(env: Env) -> None:
    """Two different Content-Length values: 400, closed."""
    _expect(env, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", 400)


def test_bad_chunk_size_400(env: Env) -> None:
    """A chunk size that is not hex: 400, closed."""
    _expect(
        env, b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n", 400
    )


def test_malformed_request_line_400(env: Env) -> None:
    """A request line that is not ``method SP target SP version``: 400, closed."""
    _expect(env, b"THIS IS NOT HTTP\r\n\r\n", 400)


def test_obs_fold_400(env: Env) -> None:
    """Obsolete line folding in a header (RFC 9112 5.2): rejected with 400."""
    env.moorline_only()
    _expect(env, b"GET / HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n  continued\r\n\r\n", 400)


def test_header_section_over_60k_431(env: Env) -> None:
    """Headers larger than the default ``max_request_headers_kb`` (60 KiB): 431."""
    env.moorline_only()
    big = "".join(f"X-Big-{i}: {'v' * 6200}\r\n" for i in range(10))  # ~62 KiB in 10 headers
    _expect(env, f"GET / HTTP/1.1\r\nHost: x\r\n{big}\r\n".encode(), 431)


def test_more_than_100_headers_431(env: Env) -> None:
    """More headers than the default ``max_headers_count`` (100): 431."""
    env.moorline_only()
    many = "".join(f"X-H-{i}: v\r\n" for i in range(101))
    _expect(env, f"GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n".encode(), 431)


def test_max_request_headers_kb_config_honoured(env: Env) -> None:
    """``max_request_headers_kb: 8``: a 9 KiB header is refused (431), a 6 KiB one passes."""
    env.moorline_only()
    r = http_request(H, env.ports["small"], "GET", "/ok6k", headers={"X-Pad": "p" * 6000})
    assert r.status == 200
    _expect(env, f"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: {'p' * 9000}\r\n\r\n".encode(), 431, "small")


def test_underscore_header_rejected(env: Env) -> None:
    """``headers_with_underscores_action: REJECT_REQUEST``: a header name with ``_`` gives 400
    and the request never reaches the upstream."""
    env.moorline_only()
    before = len(env.up.requests)
    _expect(env, b"GET /under HTTP/1.1\r\nHost: x\r\nX_Under: 1\r\n\r\n", 400)
    assert not [r for r in env.up.requests[before:] if r.path == "/under"]


def test_request_headers_timeout_408(env: Env) -> None:
    """Half a header section, then silence: after ``request_headers_timeout`` (1 s) Envoy
    answers 408 and closes."""
    env.moorline_only()
    with RawConn(H, env.ports["hdr_to"], timeout=10) as c:
        c.send(b"GET /slow HTTP/1.1\r\nHost: x\r\nX-Partial: y")
        resp = c.read_response()
        assert resp.status == 408
        assert c.is_closed_by_peer(5)
    env.assert_still_serving("hdr_to")


def test_request_timeout_408(env: Env) -> None:
    """Headers plus part of the body, then silence: after ``request_timeout`` (1 s) 408."""
    env.moorline_only()
    with RawConn(H, env.ports["req_to"], timeout=10) as c:
        c.send(b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
        resp = c.read_response()
        assert resp.status == 408
        assert c.is_closed_by_peer(5)
    env.assert_still_serving("req_to")


def test_stream_idle_timeout_408(env: Env) -> None:
    """No bytes in either direction for ``stream_idle_timeout`` (1 s) while the request body is
    incomplete and no response has started: Envoy sends 408 (``stream timeout``)."""
    env.moorline_only()
    with RawConn(H, env.ports["idle_to"], timeout=10) as c:
        c.send(b"POST /idle HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
        resp = c.read_response()
        assert resp.status == 408
        assert c.is_closed_by_peer(5)
    env.assert_still_serving("idle_to")


def test_good_requests_after_all_errors(env: Env) -> None:
    """The process is still up and serving on every listener."""
    assert env.proc.alive()
    for name in env.ports if env.kind == "moorline" else ["h"]:
        env.assert_still_serving(name)
