"""Upstream HTTP/1.1 connections and the per-host pool (moorline/stream/http1_client.py): request
framing, 1xx, keep-alive and reuse decisions, extraneous bytes, idle sweeps, protocol errors and
flow control. The test plays the upstream server through moorline.testing.pair.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from moorline.testing.pair import Pair, bootstrap_yaml
from moorline.testing.procs import cluster


@pytest.fixture
def make() -> Iterator[Any]:
    pairs: list[Pair] = []

    def make_pair(cluster_extra: dict[str, Any] | None = None, **kw: Any) -> Pair:
        p = Pair(bootstrap_yaml(clusters=[cluster("be", [("10.0.0.1", 80)], **(cluster_extra or {}))], **kw))
        pairs.append(p)
        return p

    yield make_pair
    for p in pairs:
        p.close()


GET = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n"


def one(pair: Pair, c: Any, response: bytes, request: bytes = GET) -> tuple[Any, Any]:
    """``request`` on client ``c``; the upstream connection it went out on answers ``response``."""
    c.send(request)
    up = (
        pair.upstream.accept()
        if pair.upstream.pending
        else next(u for u in pair.upstream.connections if u.has_request())
    )
    up.request()
    up.send(response)
    return up, c.response()


OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


# -- request framing -----------------------------------------------------------------------------


def test_request_with_length_is_sent_as_is(make: Any) -> None:
    pair = make()
    c = pair.connect()
    c.send(b"PUT /x?y=1 HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\n\r\nabc")
    up = pair.upstream.accept()
    req = up.request()
    assert (req.method, req.target, req.version) == (b"PUT", b"/x?y=1", b"HTTP/1.1")
    assert req.header("content-length") == b"3" and req.body == b"abc" and not req.chunked
    assert req.names()[0] == b"host"


def test_request_without_body_has_no_framing(make: Any) -> None:
    pair = make()
    c = pair.connect()
    c.send(GET)
    req = pair.upstream.accept().request()
    assert req.header("content-length") is None and req.header("transfer-encoding") is None


def test_h2_request_body_of_unknown_length_goes_chunked(make: Any) -> None:
    pair = make()
    h = pair.connect_h2()
    sid = h.request("POST", "/up", "a", body=b"part1", end_stream=False)
    up = pair.upstream.accept()
    h.send_data(sid, b"part2", end_stream=True)
    req = up.request()
    assert req.chunked and req.body == b"part1part2"
    up.respond(200)
    assert h.response(sid).status == 200
    pair.assert_settled()


def test_h2_request_trailers_go_in_the_last_chunk(make: Any) -> None:
    pair = make()
    h = pair.connect_h2()
    sid = h.request("POST", "/up", "a", body=b"data", end_stream=False)
    h.send_trailers(sid, [("x-checksum", "abc")])
    req = pair.upstream.accept().request()
    assert req.body == b"data" and req.trailer("x-checksum") == b"abc"


def test_upgrade_request_is_not_chunk_framed(make: Any) -> None:
    pair = make(hcm_extra={"upgrade_configs": [{"upgrade_type": "websocket"}]})
    c = pair.connect()
    c.send(b"GET /ws HTTP/1.1\r\nhost: a\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\nbefore-101")
    up = pair.upstream.accept()
    req = up.request()
    assert req.header("transfer-encoding") is None and req.header("content-length") is None
    up.send(b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n")
    assert up.tunnel_data() == b"before-101"  # raw, not a chunk, after the 101


# -- responses -----------------------------------------------------------------------------------


def test_upstream_1xx_is_not_forwarded(make: Any) -> None:
    pair = make()
    c = pair.connect()
    _, r = one(pair, c, b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n" + OK)
    assert r.status == 200 and r.body == b"ok"
    assert c.next_response() is None
    pair.assert_settled()


def test_head_response_is_read_without_a_body(make: Any) -> None:
    pair = make()
    c = pair.connect()
    c.send(b"HEAD / HTTP/1.1\r\nhost: a\r\n\r\n")
    up = pair.upstream.accept()
    up.request()
    up.send(b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\n\r\n")
    assert c.response(head=True).header("content-length") == b"50"
    _, r = one(pair, c, OK)  # the same upstream connection is in step for the next one
    assert r.body == b"ok"
    assert len(pair.upstream.connections) == 1
    pair.assert_settled()


def test_upstream_protocol_error_is_502(make: Any) -> None:
    pair = make()
    c = pair.connect()
    up, r = one(pair, c, b"HTTP/1.1 2000 What\r\n\r\n")
    assert r.status == 502
    assert up.closed
    assert pair.cluster_stat("be", "upstream_cx_protocol_error") == 1
    assert pair.access_log.entries[0].response_flags == ["UPE"]
    pair.assert_settled()


def test_truncated_response_resets_the_client(make: Any) -> None:
    pair = make()
    c = pair.connect()
    c.send(GET)
    up = pair.upstream.accept()
    up.request()
    up.send(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf")
    up.close()
    assert c.aborted
    pair.assert_settled()


# -- reuse decisions -----------------------------------------------------------------------------


def test_keep_alive_connection_is_reused(make: Any) -> None:
    pair = make()
    c = pair.connect()
    up1, _ = one(pair, c, OK)
    up2, _ = one(pair, c, OK)
    assert up1 is up2 and not up1.closed
    assert pair.cluster_stat("be", "upstream_cx_total") == 1


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
        b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok",
    ],
    ids=["connection-close", "http10"],
)
def test_connection_that_will_close_is_not_reused(make: Any, response: bytes) -> None:
    pair = make()
    c = pair.connect()
    up1, r = one(pair, c, response)
    assert r.body == b"ok"
    assert up1.closed
    up2, _ = one(pair, c, OK)
    assert up2 is not up1
    pair.assert_settled()


def test_http10_keep_alive_response_is_reused(make: Any) -> None:
    pair = make()
    c = pair.connect()
    up1, _ = one(pair, c, b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 2\r\n\r\nok")
    up2, _ = one(pair, c, OK)
    assert up1 is up2


def test_max_requests_per_connection(make: Any) -> None:
    pair = make(cluster_extra={"max_requests_per_connection": 2})
    c = pair.connect()
    ups = [one(pair, c, OK)[0] for _ in range(3)]
    assert ups[0] is ups[1] and ups[2] is not ups[0]
    assert ups[0].closed
    assert pair.cluster_stat("be", "upstream_cx_max_requests") == 1


def test_extraneous_bytes_after_a_response_close_the_connection(make: Any) -> None:
    pair = make()
    c = pair.connect()
    up1, r = one(pair, c, OK + b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nstale")
    assert r.body == b"ok"
    assert up1.closed  # the stale answer must never become the next request's response
    up2, r2 = one(pair, c, b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfresh")
    assert up2 is not up1 and r2.body == b"fresh"
    assert pair.cluster_stat("be", "upstream_cx_protocol_error") == 1
    pair.assert_settled()


def test_bytes_on_an_idle_connection_close_it(make: Any) -> None:
    pair = make()
    c = pair.connect()
    up1, _ = one(pair, c, OK)
    up1.send(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n\r\n")
    assert up1.closed
    up2, r = one(pair, c, OK)
    assert up2 is not up1 and r.status == 200


def test_idle_connection_closed_by_the_upstream_leaves_the_pool(make: Any) -> None:
    pair = make()
    c = pair.connect()
    up1, _ = one(pair, c, OK)
    up1.close()
    assert pair.cluster_stat("be", "upstream_cx_destroy_remote") == 1
    assert pair.cluster_stat("be", "upstream_cx_active") == 0
    up2, r = one(pair, c, OK)
    assert up2 is not up1 and r.status == 200


def test_connection_reset_before_the_connect_callback_fails_the_request(make: Any) -> None:
    # Found by tests/upstream/test_outlier_e2e.py against a server that resets every connection
    # it accepts: the RST can land before the connect's done callback, and the request was then
    # handed the dead connection (a write to a closed transport raised, the client hung).
    pair = make()
    c = pair.connect()
    c.send(GET)
    pair.upstream.attempt().accept_and_reset()
    r = c.response()
    assert r.status == 503
    assert pair.cluster_stat("be", "upstream_cx_active") == 0
    assert pair.cluster_stat("be", "upstream_rq_pending_active") == 0
    # The pool is still usable: the next request gets a fresh connection.
    _, r2 = one(pair, c, OK)
    assert r2.status == 200


def test_idle_timeout_sweeps_idle_connections(make: Any) -> None:
    idle = {
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "common_http_protocol_options": {"idle_timeout": "8s"},
                "explicit_http_config": {"http_protocol_options": {}},
            }
        }
    }
    pair = make(cluster_extra=idle)
    c = pair.connect()
    up, _ = one(pair, c, OK)
    pair.advance(7)
    assert not up.closed
    pair.advance(3)  # swept at most a quarter of the timeout late
    assert up.closed
    assert pair.cluster_stat("be", "upstream_cx_idle_timeout") == 1


def test_early_upstream_response_does_not_reuse_the_connection(make: Any) -> None:
    pair = make()
    c = pair.connect()
    c.send(b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 10\r\n\r\nabc")
    up = pair.upstream.accept()
    up.send(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
    assert c.response().status == 400
    assert up.closed  # half a request body is on it
    pair.assert_settled()


# -- flow control --------------------------------------------------------------------------------


def test_upstream_write_backpressure_pauses_the_client(make: Any) -> None:
    pair = make()
    c = pair.connect()
    c.send(b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 6\r\n\r\nabc")
    up = pair.upstream.accept()
    up.block_writes()
    assert not c.reading
    up.unblock_writes()
    assert c.reading
    c.send(b"def")
    assert up.request().body == b"abcdef"


def test_upstream_transport_limits_are_the_cluster_buffer_limit(make: Any) -> None:
    pair = make(cluster_extra={"per_connection_buffer_limit_bytes": 8192})
    c = pair.connect()
    c.send(GET)
    up = pair.upstream.accept()
    assert up.transport.write_limits == (8192, 2048)


HIGH_ROUTES = [
    {
        "match": {"prefix": "/", "headers": [{"name": "x-prio", "string_match": {"exact": "high"}}]},
        "route": {"cluster": "be", "priority": "HIGH"},
    },
    {"match": {"prefix": "/"}, "route": {"cluster": "be"}},
]
HIGH_GET = b"GET /h HTTP/1.1\r\nhost: a\r\nx-prio: high\r\n\r\n"


@pytest.mark.parametrize("h2", [False, True], ids=["http1", "http2"])
def test_high_priority_pending_slots_and_connections_are_given_back(make: Any, h2: bool) -> None:
    """A HIGH request's pending slot and the connection it opens count in cluster.high (and in
    the cluster's gauges); a refused connect, a cancelled wait and a closed connection give
    each back."""
    extra: dict[str, Any] = {"circuit_breakers": {"thresholds": [{"max_connections": 0}]}}
    if h2:
        extra["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    pair = make(extra, routes=HIGH_ROUTES)
    hi = pair.server.cluster_manager.get("be").high

    def counts() -> tuple[int, int, int, int]:
        return (
            hi.pending_active,
            hi.cx_active,
            pair.cluster_stat("be", "upstream_rq_pending_active"),
            pair.cluster_stat("be", "upstream_cx_active"),
        )

    # DEFAULT may open no connection at all: its request waits (no connect attempt) ...
    d = pair.connect()
    d.send(GET)
    assert not pair.upstream.pending and counts() == (0, 0, 1, 0)
    d.reset()
    assert counts() == (0, 0, 0, 0)
    # ... a HIGH one opens its own.
    c = pair.connect()
    c.send(HIGH_GET)
    assert counts() == (1, 1, 1, 1)
    pair.upstream.refuse()
    assert c.response().status == 503
    assert counts() == (0, 0, 0, 0)
    c2 = pair.connect()
    c2.send(HIGH_GET)
    assert counts() == (1, 1, 1, 1)
    c2.reset()  # the downstream goes while its connection is still being opened
    assert counts()[0] == 0 and counts()[2] == 0
    up = pair.upstream.accept()
    assert counts() == (0, 1, 0, 1)  # the connection HIGH opened stays (idle) in the pool
    up.close()
    assert counts() == (0, 0, 0, 0)
    assert pair.cluster_stat("be", "upstream_cx_overflow") >= 1  # DEFAULT's attempt
