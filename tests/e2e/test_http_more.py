"""More Envoy behaviours of the HTTP path, each pinned end to end with real sockets: idle timeouts
on both sides, circuit breakers, retry policies, routing actions, local_reply_config, flow
control against a slow reader, and peers that vanish mid-message."""

from __future__ import annotations

import socket
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from moorline.testing.procs import (
    RawConn,
    bootstrap,
    cluster,
    config_http,
    free_port,
    hcm_listener,
    http_request,
    wait_for_log,
)
from moorline.testing.upstream import TestUpstream

pytestmark = pytest.mark.e2e


def _poll(pred: Any, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_downstream_idle_timeout_closes_connection(moorline: Any, upstream: TestUpstream) -> None:
    """common_http_protocol_options.idle_timeout closes a keep-alive connection with no stream."""
    port = free_port()
    cfg = config_http(
        port,
        {"svc": [upstream.port]},
        hcm_extra={"common_http_protocol_options": {"idle_timeout": "0.3s"}},
    )
    proc = moorline(cfg)
    with RawConn("127.0.0.1", port) as c:
        c.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert c.read_response().status == 200
        assert c.is_closed_by_peer(timeout=5.0)
    assert proc.stat("http.listener_http.downstream_cx_idle_timeout") == 1


def test_upstream_pool_idle_timeout_and_max_requests(moorline: Any, upstream: TestUpstream) -> None:
    """Cluster HttpProtocolOptions: idle upstream connections close after idle_timeout;
    max_requests_per_connection caps reuse."""
    port = free_port()
    opts = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "common_http_protocol_options": {"idle_timeout": "0.3s", "max_requests_per_connection": 3},
            "explicit_http_config": {"http_protocol_options": {}},
        }
    }
    cfg = config_http(port, [cluster("svc", [upstream.port], typed_extension_protocol_options=opts)])
    proc = moorline(cfg)
    conn = __import__("http.client").client.HTTPConnection("127.0.0.1", port, timeout=10)
    for _ in range(6):
        conn.request("GET", "/")
        assert conn.getresponse().read() is not None
    conn.close()
    # 6 requests with at most 3 per upstream connection: 2 upstream connections.
    assert proc.stat("cluster.svc.upstream_cx_total") == 2
    assert proc.stat("cluster.svc.upstream_cx_max_requests") == 2
    assert len(set(upstream.connection_ids())) == 2
    http_request("127.0.0.1", port, "GET", "/")
    assert _poll(lambda: proc.stat("cluster.svc.upstream_cx_idle_timeout") >= 1)
    assert _poll(lambda: proc.stat("cluster.svc.upstream_cx_active") == 0)


def test_pending_overflow_is_503_uo(moorline: Any, upstream: TestUpstream, tmp_path: Path) -> None:
    """circuit_breakers max_connections 1 / max_pending_requests 1: a third concurrent request
    overflows with 503 and flag UO, while the first two succeed."""
    port = free_port()
    log = tmp_path / "access.log"
    cb = {"thresholds": [{"max_connections": 1, "max_pending_requests": 1, "max_requests": 10}]}
    cfg = config_http(port, [cluster("svc", [upstream.port], circuit_breakers=cb)], access_log_path=log)
    proc = moorline(cfg)
    conns = []
    for i in range(3):
        c = RawConn("127.0.0.1", port)
        c.send(f"GET /delay/{1500 if i == 0 else 10} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
        conns.append(c)
        time.sleep(0.2)  # ordering of arrival, not a timing assertion
    statuses = sorted(c.read_response().status for c in conns)
    for c in conns:
        c.close()
    assert statuses == [200, 200, 503]
    assert proc.stat("cluster.svc.upstream_rq_pending_overflow") == 1
    assert "flags=UO" in wait_for_log(log, "code=503 flags=UO")


def test_retriable_status_codes(moorline: Any, upstreams: Any) -> None:
    """retry_on retriable-status-codes retries a 409 (not a 5xx) and nothing else."""
    a = upstreams(upstream_id="a")
    b = upstreams(upstream_id="b")
    port = free_port()
    routes = [
        {
            "match": {"prefix": "/status/"},
            "route": {
                "cluster": "svc",
                "retry_policy": {
                    "retry_on": "retriable-status-codes",
                    "retriable_status_codes": [409],
                    "num_retries": 2,
                },
            },
        },
        {
            "match": {"prefix": "/"},
            "route": {
                "cluster": "svc",
                "retry_policy": {"retry_on": "5xx", "num_retries": 3, "per_try_timeout": "0.3s"},
            },
        },
    ]
    proc = moorline(config_http(port, {"svc": [a.port, b.port]}, routes=routes))
    # 409 is retried (it stays 409 on every host: the client sees the last answer).
    r = http_request("127.0.0.1", port, "GET", "/status/409")
    assert r.status == 409
    assert proc.stat("cluster.svc.upstream_rq_retry") == 2
    assert len(a.requests) + len(b.requests) == 3
    # A 404 is not in the list: no retry.
    r = http_request("127.0.0.1", port, "GET", "/status/404")
    assert r.status == 404
    assert proc.stat("cluster.svc.upstream_rq_retry") == 2


def test_per_try_timeout_moves_to_healthy_host(moorline: Any, upstreams: Any) -> None:
    """One host answers only after 3 s; per_try_timeout 0.3 s with retries moves every request to
    the fast host, and each still succeeds."""
    slow = upstreams(upstream_id="slow")
    fast = upstreams(upstream_id="fast")
    port = free_port()
    routes = [
        {
            "match": {"prefix": "/"},
            "route": {
                "cluster": "svc",
                "retry_policy": {"retry_on": "5xx", "num_retries": 2, "per_try_timeout": "0.3s"},
            },
            "request_headers_to_add": [{"header": {"key": "x-test-delay-ms", "value": "3000"}}],
        }
    ]
    # Only the slow host honours the delay header: the fast one runs with it ignored.
    fast.ignore_delay_header = True
    proc = moorline(config_http(port, {"svc": [slow.port, fast.port]}, routes=routes))
    ids = Counter()
    for _ in range(4):
        r = http_request("127.0.0.1", port, "GET", "/")
        assert r.status == 200
        ids[r.header("x-upstream-id")] += 1
    assert ids == {"fast": 4}
    assert proc.stat("cluster.svc.upstream_rq_per_try_timeout") >= 1


def test_weighted_and_header_clusters_and_regex(moorline: Any, upstreams: Any) -> None:
    """weighted_clusters split by weight, cluster_header picks by header, safe_regex matches."""
    a = upstreams(upstream_id="a")
    b = upstreams(upstream_id="b")
    port = free_port()
    routes = [
        {"match": {"safe_regex": {"regex": "^/item/[0-9]+$"}}, "route": {"cluster": "b"}},
        {"match": {"prefix": "/pick"}, "route": {"cluster_header": "x-cluster"}},
        {
            "match": {"prefix": "/"},
            "route": {
                "weighted_clusters": {"clusters": [{"name": "a", "weight": 90}, {"name": "b", "weight": 10}]}
            },
        },
    ]
    moorline(config_http(port, {"a": [a.port], "b": [b.port]}, routes=routes))
    assert http_request("127.0.0.1", port, "GET", "/item/42").header("x-upstream-id") == "b"
    assert http_request("127.0.0.1", port, "GET", "/item/x").header("x-upstream-id") in ("a", "b")
    assert (
        http_request("127.0.0.1", port, "GET", "/pick", headers={"x-cluster": "a"}).header("x-upstream-id")
        == "a"
    )
    assert (
        http_request("127.0.0.1", port, "GET", "/pick", headers={"x-cluster": "b"}).header("x-upstream-id")
        == "b"
    )
    r = http_request("127.0.0.1", port, "GET", "/pick", headers={"x-cluster": "nope"})
    assert r.status == 503  # cluster_not_found_response_code default
    counts = Counter(http_request("127.0.0.1", port, "GET", "/w").header("x-upstream-id") for _ in range(60))
    assert counts["a"] > counts["b"]  # 90/10 over 60 draws: b >= 30 has odds far below 1e-9


def test_local_reply_config_overrides_status_and_body(moorline: Any) -> None:
    """local_reply_config: a mapper turns the no-route 404 into a 418 with a JSON body."""
    port = free_port()
    hcm_extra = {
        "local_reply_config": {
            "mappers": [
                {
                    "filter": {
                        "status_code_filter": {
                            "comparison": {"op": "EQ", "value": {"default_value": 404, "runtime_key": "k"}}
                        }
                    },
                    "status_code": 418,
                    "body_format_override": {
                        "json_format": {"code": "%RESPONSE_CODE%", "flags": "%RESPONSE_FLAGS%"}
                    },
                }
            ]
        }
    }
    moorline(config_http(port, {}, routes=[], hcm_extra=hcm_extra))
    r = http_request("127.0.0.1", port, "GET", "/x")
    assert r.status == 418
    assert r.header("content-type") == "application/json"
    import json

    assert json.loads(r.body) == {"code": 418, "flags": "NR"}


def test_logical_dns_and_least_request(moorline: Any, upstreams: Any) -> None:
    """A LOGICAL_DNS cluster on "localhost" and a LEAST_REQUEST cluster both serve."""
    a = upstreams(upstream_id="a")
    b = upstreams(upstream_id="b")
    port = free_port()
    logical = {
        "name": "dns",
        "type": "LOGICAL_DNS",
        "dns_lookup_family": "V4_ONLY",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": "dns",
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {"socket_address": {"address": "localhost", "port_value": a.port}}
                            }
                        }
                    ]
                }
            ],
        },
    }
    lr = cluster("lr", [a.port, b.port], lb_policy="LEAST_REQUEST")
    routes = [
        {"match": {"prefix": "/dns"}, "route": {"cluster": "dns"}},
        {"match": {"prefix": "/"}, "route": {"cluster": "lr"}},
    ]
    moorline(config_http(port, [logical, lr], routes=routes))
    r = http_request("127.0.0.1", port, "GET", "/dns")
    assert r.status == 200 and r.header("x-upstream-id") == "a"
    seen = {http_request("127.0.0.1", port, "GET", "/").header("x-upstream-id") for _ in range(20)}
    assert seen == {"a", "b"}


def test_slow_reader_backpressure_bounds_memory(moorline: Any, upstream: TestUpstream) -> None:
    """A client that reads a 64 MB response slowly: the proxy pauses the upstream instead of
    buffering (its RSS grows by far less than the response), and every byte arrives."""
    port = free_port()
    proc = moorline(config_http(port, {"svc": [upstream.port]}))
    size = 64 << 20
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
    s.sendall(f"GET /bytes/{size} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
    base = proc.rss_kb()
    got = 0
    peak = base
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(4096)
    got = len(head.split(b"\r\n\r\n", 1)[1])
    while got < size:
        chunk = s.recv(256 << 10)
        assert chunk
        got += len(chunk)
        if got % (8 << 20) < (256 << 10):
            time.sleep(0.05)  # a slow reader, now and then
            peak = max(peak, proc.rss_kb())
    s.close()
    assert got == size
    assert peak - base < 24 * 1024  # KiB: well under the 64 MB that a buffering proxy would hold


def test_client_vanishes_mid_upload(moorline: Any, upstream: TestUpstream) -> None:
    """A client that sends half a body and disconnects: the upstream request is reset (its
    connection closed, not returned to the pool) and the proxy keeps serving."""
    port = free_port()
    proc = moorline(config_http(port, {"svc": [upstream.port]}))
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n" + b"x" * 5000)
    time.sleep(0.3)  # let the request reach the upstream before vanishing (not asserted)
    s.close()
    assert _poll(lambda: proc.stat("http.listener_http.downstream_rq_rx_reset") == 1)
    assert _poll(lambda: proc.stat("cluster.svc.upstream_rq_active") == 0)
    assert http_request("127.0.0.1", port, "GET", "/").status == 200


def test_upstream_vanishes_mid_response(moorline: Any, upstream: TestUpstream, tmp_path: Path) -> None:
    """An upstream that dies after sending part of a body: the client's connection is closed
    (the response cannot be completed), the flag is UC/UR-like, the proxy keeps serving."""
    port = free_port()
    log = tmp_path / "a.log"
    proc = moorline(config_http(port, {"svc": [upstream.port]}, access_log_path=log))
    with RawConn("127.0.0.1", port) as c:
        c.send(b"GET /truncate/100000 HTTP/1.1\r\nHost: a\r\n\r\n")
        head = c.read_until(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert b"content-length: 100000" in head.lower()
        body = c.read_to_eof()  # returns once the proxy closes the connection
        assert len(body) < 100000
    assert proc.stat("http.listener_http.downstream_rq_tx_reset") >= 1
    assert http_request("127.0.0.1", port, "GET", "/").status == 200


def test_two_listeners_one_cluster(moorline: Any, upstream: TestUpstream) -> None:
    """Two HCM listeners with their own stat prefixes share one cluster's pool."""
    p1, p2 = free_port(), free_port()
    cfg = bootstrap(
        [
            hcm_listener("one", p1, [{"match": {"prefix": "/"}, "route": {"cluster": "svc"}}]),
            hcm_listener("two", p2, [{"match": {"prefix": "/"}, "route": {"cluster": "svc"}}]),
        ],
        [cluster("svc", [upstream.port])],
    )
    proc = moorline(cfg)
    assert http_request("127.0.0.1", p1, "GET", "/").status == 200
    assert http_request("127.0.0.1", p2, "GET", "/").status == 200
    assert proc.stat("http.one.downstream_rq_2xx") == 1
    assert proc.stat("http.two.downstream_rq_2xx") == 1
    assert proc.stat("cluster.svc.upstream_rq_total") == 2


def test_route_max_stream_duration_overrides_the_hcm(
    moorline: Any, upstream: TestUpstream, tmp_path: Path
) -> None:
    """Route max_stream_duration.max_stream_duration replaces the HCM's for that route: the
    stream ends with 408 and flag DT; other routes keep the HCM's (here none)."""
    port = free_port()
    log = tmp_path / "a.log"
    routes = [
        {
            "match": {"prefix": "/short"},
            "route": {
                "cluster": "svc",
                "timeout": "0s",
                "max_stream_duration": {"max_stream_duration": "0.4s"},
            },
        },
        {"match": {"prefix": "/"}, "route": {"cluster": "svc"}},
    ]
    moorline(config_http(port, {"svc": [upstream.port]}, routes=routes, access_log_path=log))
    r = http_request("127.0.0.1", port, "GET", "/short", headers={"x-test-delay-ms": "3000"})
    assert r.status == 408
    assert "flags=DT" in wait_for_log(log, "flags=DT")
    r = http_request("127.0.0.1", port, "GET", "/other", headers={"x-test-delay-ms": "800"})
    assert r.status == 200


@pytest.mark.parametrize(("mode", "forwarded"), [(None, False), ("FORWARD_ONLY", True)])
def test_x_forwarded_client_cert_is_sanitized_by_default(
    moorline: Any, upstream: TestUpstream, mode: str | None, forwarded: bool
) -> None:
    """forward_client_cert_details SANITIZE (Envoy's default) strips a client's
    x-forwarded-client-cert, so a plain-text client cannot claim a certificate upstream."""
    port = free_port()
    extra = {"forward_client_cert_details": mode} if mode else {}
    moorline(config_http(port, {"svc": [upstream.port]}, hcm_extra=extra))
    with RawConn("127.0.0.1", port) as c:
        c.send(b"GET /xfcc HTTP/1.1\r\nHost: a\r\nx-forwarded-client-cert: By=spiffe://evil\r\n\r\n")
        assert c.read_response().status == 200
    rec = [r for r in upstream.requests if r.path == "/xfcc"][-1]
    assert (rec.header("x-forwarded-client-cert") is not None) is forwarded


def test_disabled_upgrade_type_is_refused(moorline: Any, upstream: TestUpstream) -> None:
    """upgrade_configs[].enabled: false turns the upgrade type off (403), as in Envoy."""
    port = free_port()
    extra = {"upgrade_configs": [{"upgrade_type": "websocket", "enabled": False}]}
    moorline(config_http(port, {"svc": [upstream.port]}, hcm_extra=extra))
    with RawConn("127.0.0.1", port) as c:
        c.send(
            b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        assert c.read_response().status == 403
