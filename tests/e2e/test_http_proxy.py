"""End-to-end HTTP/1.1 proxying through an HTTP connection manager listener (Envoy semantics).

One moorline (module scope) runs two listeners:
- ``main``: ``use_remote_address: true``, ``accept_http_10: true``, WebSocket upgrades, a file
  access log, and the route table below;
- ``strict``: Envoy defaults (HTTP/1.0 refused), ``server_name: custom-server``, a single route
  ``/only-here``, so anything else is a 404 with flag NR.

Set ``MOORLINE_E2E_TARGET=nginx`` to run the transport-level tests against nginx as the reverse
proxy instead: that validates the tests' own logic (chunked both ways, large bodies, pipelining,
100-continue, WebSocket) while moorline is not there; moorline-specific tests skip.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from moorline.testing import procs
from moorline.testing.procs import RawConn, free_port, http_request, raw_exchange, wait_for_log
from moorline.testing.upstream import (
    TestUpstream,
    chunked_payload,
    pattern_bytes,
    pattern_sha256,
    websocket_accept,
    ws_frame,
    ws_read_frame,
)

pytestmark = pytest.mark.e2e

TARGET = os.environ.get("MOORLINE_E2E_TARGET", "moorline")
UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
H = "127.0.0.1"


@dataclass
class Env:
    kind: str  # "moorline" or "nginx"
    port: int  # the main listener
    strict_port: int
    a: TestUpstream
    b: TestUpstream
    ka: TestUpstream
    bad: TestUpstream
    ok: TestUpstream
    half: TestUpstream
    log: Path
    proc: procs.MoorlineProc | procs.NginxProc

    @property
    def moorline(self) -> procs.MoorlineProc:
        assert isinstance(self.proc, procs.MoorlineProc)
        return self.proc

    def moorline_only(self) -> None:
        if self.kind != "moorline":
            pytest.skip("checks moorline/Envoy-specific behaviour")


def _route(prefix: str, cluster: str, **extra: object) -> dict:
    return {"match": {"prefix": prefix}, "route": {"cluster": cluster, **extra}}


def _config(env_ports: dict[str, int], port: int, strict_port: int, log: Path) -> str:
    dead = free_port()  # nothing listens there
    routes = [
        {
            "match": {"prefix": "/", "headers": [{"name": "x-route-to", "string_match": {"exact": "b"}}]},
            "route": {"cluster": "b"},
        },
        _route("/b/", "b"),
        _route("/ka/", "ka"),
        {
            "match": {"prefix": "/direct"},
            "direct_response": {"status": 200, "body": {"inline_string": "direct hello\n"}},
        },
        {"match": {"prefix": "/redirect"}, "redirect": {"path_redirect": "/new-place"}},
        _route("/rewrite/", "a", prefix_rewrite="/rewritten/"),
        _route("/timeout/", "a", prefix_rewrite="/delay/", timeout="0.5s"),
        _route("/dead/", "dead"),
        _route("/empty/", "empty"),
        _route(
            "/retry5xx/", "retry5xx", prefix_rewrite="/", retry_policy={"retry_on": "5xx", "num_retries": 2}
        ),
        _route(
            "/retrycf/",
            "retrycf",
            prefix_rewrite="/",
            retry_policy={"retry_on": "connect-failure", "num_retries": 2},
        ),
        _route("/", "a"),
    ]
    main = procs.hcm_listener(
        "main",
        port,
        routes,
        access_log_path=log,
        hcm_extra={
            "use_remote_address": True,
            "http_protocol_options": {"accept_http_10": True},
            "upgrade_configs": [{"upgrade_type": "websocket"}],
        },
    )
    strict = procs.hcm_listener(
        "strict",
        strict_port,
        [_route("/only-here", "a")],
        access_log_path=log,
        hcm_extra={"server_name": "custom-server"},
    )
    clusters = [
        procs.cluster("a", [env_ports["a"]]),
        procs.cluster("b", [env_ports["b"]]),
        procs.cluster("ka", [env_ports["ka"]]),
        procs.cluster("dead", [dead]),
        procs.cluster("empty", []),
        procs.cluster("retry5xx", [env_ports["bad"], env_ports["ok"]]),
        procs.cluster("retrycf", [dead, env_ports["half"]]),
    ]
    return procs.bootstrap([main, strict], clusters)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("http_proxy")
    ups = {
        "a": TestUpstream(upstream_id="a"),
        "b": TestUpstream(upstream_id="b"),
        "ka": TestUpstream(upstream_id="ka"),
        "bad": TestUpstream(upstream_id="bad", always_status=503),
        "ok": TestUpstream(upstream_id="ok"),
        "half": TestUpstream(upstream_id="half"),
    }
    for u in ups.values():
        u.start()
    port, strict_port = free_port(), free_port()
    log = tmp / "access.log"
    proc: procs.MoorlineProc | procs.NginxProc | None = None
    try:
        if TARGET == "nginx":
            proc = procs.start_nginx(tmp, procs.nginx_reverse_proxy(port, ups["a"].port), port)
        else:
            cfg = _config({k: u.port for k, u in ups.items()}, port, strict_port, log)
            proc = procs.start_moorline(cfg, tmp)
        yield Env(TARGET, port, strict_port, log=log, proc=proc, **ups)
    finally:
        if proc is not None:
            proc.stop(signal.SIGTERM, 5)
        for u in ups.values():
            u.stop()


def _echo(body: bytes) -> dict:
    return json.loads(body)


def _tag() -> str:
    return uuid.uuid4().hex[:12]


# --------------------------------------------------------------------------------------------
# Basic proxying and header handling
# --------------------------------------------------------------------------------------------


def test_get_and_post_roundtrip(env: Env) -> None:
    """Status, body and request headers pass through the router unchanged (GET, POST, 4xx)."""
    r = http_request(H, env.port, "GET", "/some/path?q=1", headers={"X-Custom": "v1"})
    assert r.status == 200
    doc = _echo(r.body)
    assert doc["path"] == "/some/path?q=1" and doc["method"] == "GET"
    assert ["x-custom", "v1"] in doc["headers"]
    body = os.urandom(100_000)
    r = http_request(H, env.port, "POST", "/post", body=body, headers={"Content-Type": "application/x-test"})
    doc = _echo(r.body)
    assert r.status == 200 and doc["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert ["content-type", "application/x-test"] in doc["headers"]
    r = http_request(H, env.port, "GET", "/status/418")
    assert r.status == 418 and r.body == b"status 418 from a\n"


def test_forwarded_headers_and_request_id(env: Env) -> None:
    """With ``use_remote_address: true`` Envoy appends the peer address to x-forwarded-for,
    sets ``x-forwarded-proto: http``, generates a uuid4 ``x-request-id`` when absent and keeps
    one the client sent."""
    env.moorline_only()
    doc = _echo(http_request(H, env.port, "GET", "/xff1").body)
    hdrs = dict(doc["headers"])
    assert hdrs["x-forwarded-for"] == "127.0.0.1"
    assert hdrs["x-forwarded-proto"] == "http"
    assert UUID4.match(hdrs["x-request-id"]), hdrs["x-request-id"]
    doc = _echo(
        http_request(
            H, env.port, "GET", "/xff2", headers={"X-Forwarded-For": "203.0.113.7", "X-Request-Id": "my-id-1"}
        ).body
    )
    hdrs = dict(doc["headers"])
    assert [p.strip() for p in hdrs["x-forwarded-for"].split(",")] == ["203.0.113.7", "127.0.0.1"]
    assert hdrs["x-request-id"] == "my-id-1"


def test_server_header_default_and_override(env: Env) -> None:
    """moorline overwrites the upstream's ``server`` with ``moorline`` (Envoy: ``envoy``); the
    HCM's ``server_name`` replaces that value."""
    env.moorline_only()
    r = http_request(H, env.port, "GET", "/srv")
    assert r.header("server") == "moorline"
    assert r.header("x-upstream-id") == "a"
    r = http_request(H, env.strict_port, "GET", "/only-here")
    assert r.status == 200 and r.header("server") == "custom-server"


def test_hop_by_hop_headers_not_forwarded(env: Env) -> None:
    """Connection-specific headers end at the proxy (RFC 9110 7.6.1): Connection and the
    headers it nominates, Keep-Alive, Proxy-Connection, TE other than ``trailers``, and Upgrade
    on a non-upgrade request."""
    env.moorline_only()
    req = (
        b"GET /hop HTTP/1.1\r\nHost: x\r\nConnection: foo\r\nFoo: secret\r\nKeep-Alive: timeout=5\r\n"
        b"Proxy-Connection: keep-alive\r\nTE: gzip\r\nUpgrade: something\r\nX-Kept: yes\r\n\r\n"
    )
    with RawConn(H, env.port) as c:
        c.send(req)
        resp = c.read_response()
    assert resp.status == 200
    names = {k for k, _ in _echo(resp.body)["headers"]}
    assert "x-kept" in names
    for gone in ("foo", "keep-alive", "proxy-connection", "te", "upgrade"):
        assert gone not in names, f"{gone} was forwarded"
    conn_vals = [v for k, v in _echo(resp.body)["headers"] if k == "connection"]
    assert all("foo" not in v.lower() for v in conn_vals)


# --------------------------------------------------------------------------------------------
# Connection management
# --------------------------------------------------------------------------------------------


def test_keepalive_reuse_visible_in_stats(env: Env) -> None:
    """20 sequential requests on one client connection reuse one pooled upstream connection:
    ``cluster.ka.upstream_cx_total == 1`` and ``upstream_rq_total == 20``."""
    up = env.ka if env.kind == "moorline" else env.a
    prefix = "/ka/" if env.kind == "moorline" else "/"
    up.clear()
    with RawConn(H, env.port) as c:
        for i in range(20):
            c.send(f"GET {prefix}n{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert c.read_response().status == 200
    recs = up.requests
    assert len(recs) == 20
    assert len({r.conn_id for r in recs}) == 1
    if env.kind == "moorline":
        stats = env.moorline.stats()
        assert stats["cluster.ka.upstream_cx_total"] == 1
        assert stats["cluster.ka.upstream_rq_total"] == 20
        assert up.connections_total == 1


def test_pipelined_requests_answered_in_order(env: Env) -> None:
    """Three requests in one write get three responses in request order (HTTP/1.1 pipelining)."""
    with RawConn(H, env.port) as c:
        c.send(
            b"".join(
                f"GET /delay/{d}?p={i} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
                for i, d in enumerate((200, 0, 50))
            )
        )
        paths = [_echo(c.read_response().body)["path"] for _ in range(3)]
    assert paths == ["/delay/200?p=0", "/delay/0?p=1", "/delay/50?p=2"]


def test_http10_request(env: Env) -> None:
    """With ``accept_http_10`` an HTTP/1.0 request is answered as HTTP/1.0 (no chunked coding)
    and the connection closes, unless the client asked for keep-alive."""
    resp, closed = raw_exchange(H, env.port, b"GET /chunked/3 HTTP/1.0\r\nHost: x\r\n\r\n")
    assert resp.status == 200 and closed
    assert not resp.chunked and resp.body == b"".join(chunked_payload(3))
    if env.kind == "moorline":
        assert resp.version == "HTTP/1.0"
    with RawConn(H, env.port) as c:
        c.send(b"GET /ten HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
        resp = c.read_response()
        assert resp.status == 200 and resp.header("content-length") is not None
        assert (resp.header("connection") or "").lower() == "keep-alive"
        c.send(b"GET /ten2 HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
        assert _echo(c.read_response().body)["path"] == "/ten2"


def test_http10_refused_by_default(env: Env) -> None:
    """Envoy refuses HTTP/1.0 unless ``accept_http_10`` is set: 426 Upgrade Required."""
    env.moorline_only()
    resp, _ = raw_exchange(H, env.strict_port, b"GET /only-here HTTP/1.0\r\n\r\n")
    assert resp.status == 426


# --------------------------------------------------------------------------------------------
# Bodies
# --------------------------------------------------------------------------------------------


def test_chunked_request_body_with_curl(env: Env, tmp_path: Path) -> None:
    """A chunked upload (curl ``-H 'Transfer-Encoding: chunked' --data-binary @file``) reaches
    the upstream byte-exact."""
    curl = _curl()
    f = tmp_path / "up.bin"
    f.write_bytes(os.urandom(1_500_000))
    out = subprocess.run(
        [
            curl,
            "-sS",
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            f"@{f}",
            f"http://{H}:{env.port}/chunked-up",
        ],
        capture_output=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    doc = _echo(out.stdout)
    assert doc["body_sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
    assert doc["body_len"] == 1_500_000


def test_chunked_response_intact(env: Env) -> None:
    """A chunked response from upstream reaches the client with the same payload, chunked."""
    with RawConn(H, env.port) as c:
        c.send(b"GET /chunked/200 HTTP/1.1\r\nHost: x\r\n\r\n")
        resp = c.read_response()
        assert resp.status == 200 and resp.chunked
        assert resp.body == b"".join(chunked_payload(200))
        # The connection is still usable after the last chunk.
        c.send(b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n")
        assert c.read_response().status == 200


def _send_pattern_body(c: RawConn, path: str, n: int) -> None:
    c.send(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {n}\r\n\r\n".encode())
    block = pattern_bytes(1 << 16)
    sent = 0
    while sent < n:
        take = min(len(block), n - sent)
        c.send(block[:take])
        sent += take


def test_ten_megabytes_each_way(env: Env) -> None:
    """10 MB request and 10 MB response bodies stream through intact."""
    n = 10 * 1024 * 1024
    with RawConn(H, env.port, timeout=30) as c:
        _send_pattern_body(c, "/big-up", n)
        doc = _echo(c.read_response().body)
        assert doc["body_len"] == n and doc["body_sha256"] == pattern_sha256(n)
        c.send(f"GET /bytes/{n} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        resp = c.read_response(max_body=n + 1)
        assert len(resp.body) == n and hashlib.sha256(resp.body).hexdigest() == pattern_sha256(n)


def test_upload_memory_is_bounded(env: Env) -> None:
    """A 50 MB upload is streamed, not buffered: the proxy's RSS (with its children) grows by
    less than 8 MB while it passes through (a bound on buffering, not on speed)."""
    n = 50 * 1024 * 1024
    with RawConn(H, env.port, timeout=30) as c:  # warm-up: first-use allocations
        _send_pattern_body(c, "/warm", 2 * 1024 * 1024)
        c.read_response()
    before = env.proc.rss_kb()
    peak = before
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, env.proc.rss_kb())
            time.sleep(0.02)

    t = threading.Thread(target=sample)
    t.start()
    try:
        with RawConn(H, env.port, timeout=60) as c:
            _send_pattern_body(c, "/fifty", n)
            doc = _echo(c.read_response().body)
    finally:
        stop.set()
        t.join()
    assert doc["body_len"] == n and doc["body_sha256"] == pattern_sha256(n)
    assert peak - before < 8 * 1024, f"RSS grew {peak - before} KiB during a 50 MB upload"


def test_expect_100_continue(env: Env, tmp_path: Path) -> None:
    """``Expect: 100-continue``: the client gets ``100 Continue`` before sending the body
    (Envoy answers it itself by default), then the final response; curl's large POST works
    with curl waiting for the 100 (``--expect100-timeout 60``: no fallback after 1 s)."""
    with RawConn(H, env.port) as c:
        c.send(b"POST /exp HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n")
        interim = c.read_response()
        assert interim.status == 100
        c.send(b"0123456789")
        final = c.read_response()
        assert final.status == 200 and _echo(final.body)["body_len"] == 10
    curl = _curl()
    f = tmp_path / "exp.bin"
    f.write_bytes(os.urandom(2_000_000))
    out = subprocess.run(
        [
            curl,
            "-sS",
            "-H",
            "Expect: 100-continue",
            "--expect100-timeout",
            "60",
            "--data-binary",
            f"@{f}",
            f"http://{H}:{env.port}/exp2",
        ],
        capture_output=True,
        timeout=20,
    )
    assert out.returncode == 0, out.stderr
    assert _echo(out.stdout)["body_sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()


def test_head_204_304_have_no_body(env: Env) -> None:
    """HEAD returns the GET headers (Content-Length) without body; 204 and 304 pass through
    without body; the connection stays usable (a following response parses cleanly)."""
    with RawConn(H, env.port) as c:
        c.send(b"HEAD /bytes/12345 HTTP/1.1\r\nHost: x\r\n\r\n")
        head = c.read_response(head_request=True)
        assert head.status == 200 and head.header("content-length") == "12345"
        for code in (204, 304):
            c.send(f"GET /status/{code} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            resp = c.read_response()
            assert resp.status == code
        c.send(b"GET /status/201 HTTP/1.1\r\nHost: x\r\n\r\n")
        last = c.read_response()
        assert last.status == 201 and last.body == b"status 201 from a\n"


def test_websocket_upgrade_passthrough(env: Env) -> None:
    """An ``Upgrade: websocket`` request (upgrade_configs websocket) gets the upstream's 101 and
    frames then flow both ways untouched."""
    key = "x3JJHMbDL1EzLkh9GBhXDw=="
    with RawConn(H, env.port) as c:
        c.send(
            f"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        resp = c.read_response()
        assert resp.status == 101
        assert resp.header("sec-websocket-accept") == websocket_accept(key)
        c.send(ws_frame(1, b"hello through the proxy"))
        assert ws_read_frame(c.sock, c.buf) == (1, b"hello through the proxy")
        c.send(ws_frame(2, os.urandom(10) + b"x" * 100_000))
        op, payload = ws_read_frame(c.sock, c.buf)
        assert op == 2 and len(payload) == 100_010


# --------------------------------------------------------------------------------------------
# Routing
# --------------------------------------------------------------------------------------------


def test_routing_by_prefix_and_header(env: Env) -> None:
    """Routes are tried in order: a header match sends to cluster b, prefix /b/ to b, the
    catch-all to a."""
    env.moorline_only()
    assert http_request(H, env.port, "GET", "/b/x").header("x-upstream-id") == "b"
    assert http_request(H, env.port, "GET", "/x").header("x-upstream-id") == "a"
    assert http_request(H, env.port, "GET", "/x", headers={"x-route-to": "b"}).header("x-upstream-id") == "b"
    assert http_request(H, env.port, "GET", "/x", headers={"x-route-to": "c"}).header("x-upstream-id") == "a"


def test_direct_response_and_redirect(env: Env) -> None:
    """``direct_response`` answers locally; ``redirect`` with ``path_redirect`` gives 301 with
    the new path in Location (same host)."""
    env.moorline_only()
    before = len(env.a.requests)
    r = http_request(H, env.port, "GET", "/direct")
    assert r.status == 200 and r.body == b"direct hello\n"
    r = http_request(H, env.port, "GET", "/redirect/old", headers={"Host": "example.test"})
    assert r.status == 301
    assert r.header("location") == "http://example.test/new-place"
    assert len(env.a.requests) == before  # neither reached an upstream


def test_prefix_rewrite(env: Env) -> None:
    """``prefix_rewrite`` replaces the matched prefix in the path the upstream sees."""
    env.moorline_only()
    doc = _echo(http_request(H, env.port, "GET", "/rewrite/x/y?z=1").body)
    assert doc["path"] == "/rewritten/x/y?z=1"
    assert dict(doc["headers"]).get("x-envoy-original-path") == "/rewrite/x/y?z=1"


def test_no_route_is_404_with_nr_flag(env: Env) -> None:
    """No matching route: local 404, access log flag NR."""
    env.moorline_only()
    path = f"/nothing-{_tag()}"
    r = http_request(H, env.strict_port, "GET", path)
    assert r.status == 404
    line = wait_for_log(env.log, f"path={path} ")
    assert "code=404" in line and "flags=NR" in line


# --------------------------------------------------------------------------------------------
# Upstream failures
# --------------------------------------------------------------------------------------------


def test_upstream_connect_failure_503_uf(env: Env) -> None:
    """Connection refused by the only host: 503, flag UF, Envoy's body text."""
    env.moorline_only()
    path = f"/dead/{_tag()}"
    r = http_request(H, env.port, "GET", path)
    assert r.status == 503
    assert r.body.startswith(b"upstream connect error or disconnect/reset before headers")
    assert "flags=UF" in wait_for_log(env.log, f"path={path} ")


def test_route_timeout_504_ut(env: Env) -> None:
    """Route ``timeout: 0.5s`` against an upstream that answers after 3 s: 504
    ``upstream request timeout``, flag UT."""
    env.moorline_only()
    path = f"/timeout/3000?t={_tag()}"
    r = http_request(H, env.port, "GET", path)
    assert r.status == 504 and r.body == b"upstream request timeout"
    assert "flags=UT" in wait_for_log(env.log, f"path={path} ")


@pytest.mark.parametrize("how", ["reset", "close"])
def test_upstream_reset_before_headers_503(env: Env, how: str) -> None:
    """Upstream RST (or close) before response headers: 503 with Envoy's ``upstream connect
    error or disconnect/reset before headers`` body; over HTTP/1 Envoy flags this UC (upstream
    connection termination); UR is what HTTP/2 stream resets give."""
    env.moorline_only()
    path = f"/{how}?t={_tag()}"
    r = http_request(H, env.port, "GET", path)
    assert r.status == 503
    assert r.body.startswith(b"upstream connect error or disconnect/reset before headers")
    line = wait_for_log(env.log, f"path={path} ")
    assert "flags=UC" in line or "flags=UR" in line, line


def test_no_endpoints_503_uh(env: Env) -> None:
    """Cluster without endpoints: 503 ``no healthy upstream``, flag UH."""
    env.moorline_only()
    path = f"/empty/{_tag()}"
    r = http_request(H, env.port, "GET", path)
    assert r.status == 503 and r.body == b"no healthy upstream"
    assert "flags=UH" in wait_for_log(env.log, f"path={path} ")


def test_upstream_garbage_502_upe(env: Env) -> None:
    """An upstream answering bytes that are not HTTP: the router maps the codec's protocol
    error reset to 502 Bad Gateway (Envoy ``Filter::onUpstreamReset``), flag UPE; the proxy
    keeps serving."""
    env.moorline_only()
    path = f"/garbage?t={_tag()}"
    r = http_request(H, env.port, "GET", path)
    assert r.status == 502
    assert "flags=UPE" in wait_for_log(env.log, f"path={path} ")
    assert http_request(H, env.port, "GET", "/after-garbage").status == 200


def test_retry_on_5xx(env: Env) -> None:
    """``retry_on: 5xx, num_retries: 2`` over [always-503 host, good host]: every client
    request gets 200 and ``upstream_rq_retry`` counts the retries."""
    env.moorline_only()
    env.bad.clear()
    for i in range(6):
        r = http_request(H, env.port, "GET", f"/retry5xx/r{i}")
        assert r.status == 200 and r.header("x-upstream-id") == "ok"
    assert len(env.bad.requests) > 0
    assert env.moorline.stat("cluster.retry5xx.upstream_rq_retry") > 0


def test_retry_on_connect_failure(env: Env) -> None:
    """``retry_on: connect-failure`` over [closed port, live host]: all requests succeed."""
    env.moorline_only()
    for i in range(6):
        r = http_request(H, env.port, "GET", f"/retrycf/r{i}")
        assert r.status == 200 and r.header("x-upstream-id") == "half"
    assert env.moorline.stat("cluster.retrycf.upstream_rq_retry") > 0


def _curl() -> str:
    import shutil

    path = shutil.which("curl")
    if path is None:
        pytest.skip("curl is not installed")
    return path


def test_proxy_still_healthy(env: Env) -> None:
    """After all of the above the proxy still answers (no crash on any input)."""
    assert env.proc.alive()
    assert http_request(H, env.port, "GET", "/final").status == 200
    if env.kind == "moorline":
        assert env.moorline.admin_get("/ready").status == 200
    with socket.create_connection((H, env.port), timeout=5):
        pass
