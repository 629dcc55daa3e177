"""Circuit breakers through a real moorline and real clients: a slow upstream holds requests
while one more overflows (503 UO), the open / remaining gauges show it, and max_retries /
retry_budget decide whether a retry is made."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from moorline.testing.procs import RawConn, cluster, config_http, free_port, http_request, wait_for_log
from moorline.testing.upstream import TestUpstream

pytestmark = pytest.mark.e2e

CB = "cluster.svc.circuit_breakers.default."


def _poll(pred: Any, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_max_requests_overflow_is_503_uo_and_gauges_show_it(
    moorline: Any, upstream: TestUpstream, tmp_path: Path
) -> None:
    port = free_port()
    log = tmp_path / "access.log"
    cb = {"thresholds": [{"max_requests": 2, "track_remaining": True}]}
    proc = moorline(
        config_http(port, [cluster("svc", [upstream.port], circuit_breakers=cb)], access_log_path=log)
    )
    assert proc.stat(CB + "remaining_rq") == 2
    slow = []
    for _ in range(2):
        c = RawConn("127.0.0.1", port)
        c.send(b"GET /delay/2000 HTTP/1.1\r\nHost: a\r\n\r\n")
        slow.append(c)
    assert _poll(lambda: proc.stat("cluster.svc.upstream_rq_active") == 2)
    assert proc.stat(CB + "rq_open") == 1
    assert proc.stat(CB + "remaining_rq") == 0
    r = http_request("127.0.0.1", port, "GET", "/fast")
    assert r.status == 503
    assert r.body.endswith(b"reset reason: overflow")
    assert proc.stat("cluster.svc.upstream_rq_pending_overflow") == 1
    assert "code=503 flags=UO" in wait_for_log(log, "flags=UO")
    assert sorted(c.read_response().status for c in slow) == [200, 200]
    for c in slow:
        c.close()
    assert _poll(lambda: proc.stat(CB + "rq_open") == 0)
    assert proc.stat(CB + "remaining_rq") == 2
    assert not any(rec.path == "/fast" for rec in upstream.requests)


def test_max_connections_queues_then_pending_overflows(moorline: Any, upstream: TestUpstream) -> None:
    port = free_port()
    cb = {"thresholds": [{"max_connections": 1, "max_pending_requests": 1, "track_remaining": True}]}
    proc = moorline(config_http(port, [cluster("svc", [upstream.port], circuit_breakers=cb)]))
    first = RawConn("127.0.0.1", port)
    first.send(b"GET /delay/2000 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert _poll(lambda: proc.stat("cluster.svc.upstream_rq_active") == 1)
    second = RawConn("127.0.0.1", port)
    second.send(b"GET /queued HTTP/1.1\r\nHost: a\r\n\r\n")
    assert _poll(lambda: proc.stat("cluster.svc.upstream_rq_pending_active") == 1)
    assert proc.stat(CB + "cx_open") == 1 and proc.stat(CB + "remaining_cx") == 0
    assert proc.stat(CB + "rq_pending_open") == 1 and proc.stat(CB + "remaining_pending") == 0
    assert proc.stat("cluster.svc.upstream_cx_overflow") >= 1
    r = http_request("127.0.0.1", port, "GET", "/third")
    assert r.status == 503 and r.body.endswith(b"overflow")
    assert proc.stat("cluster.svc.upstream_rq_pending_overflow") == 1
    # the queued request is served on the one connection once the slow one ends
    assert first.read_response().status == 200
    assert second.read_response().status == 200
    first.close()
    second.close()
    assert proc.stat("cluster.svc.upstream_cx_total") == 1


def _retry_routes() -> list[dict[str, Any]]:
    return [
        {
            "match": {"prefix": "/"},
            "route": {"cluster": "svc", "retry_policy": {"retry_on": "5xx", "num_retries": 2}},
        }
    ]


def test_max_retries_zero_makes_no_retry(moorline: Any) -> None:
    up = TestUpstream(always_status=503).start()
    try:
        port = free_port()
        cb = {"thresholds": [{"max_retries": 0, "track_remaining": True}]}
        proc = moorline(
            config_http(port, [cluster("svc", [up.port], circuit_breakers=cb)], routes=_retry_routes())
        )
        assert proc.stat(CB + "rq_retry_open") == 1
        r = http_request("127.0.0.1", port, "GET", "/x")
        assert r.status == 503
        assert len(up.requests) == 1
        assert proc.stat("cluster.svc.upstream_rq_retry_overflow") == 1
        assert proc.stat("cluster.svc.upstream_rq_retry") == 0
    finally:
        up.stop()


def test_retry_budget_replaces_max_retries(moorline: Any) -> None:
    up = TestUpstream(always_status=503).start()
    try:
        port = free_port()
        budget = {"budget_percent": {"value": 0.0}, "min_retry_concurrency": 1}
        cb = {"thresholds": [{"max_retries": 0, "retry_budget": budget, "track_remaining": True}]}
        proc = moorline(
            config_http(port, [cluster("svc", [up.port], circuit_breakers=cb)], routes=_retry_routes())
        )
        assert proc.stat(CB + "remaining_retries") == 1
        r = http_request("127.0.0.1", port, "GET", "/x")
        assert r.status == 503
        assert len(up.requests) == 3  # the first try and two retries, one at a time
        assert proc.stat("cluster.svc.upstream_rq_retry") == 2
        assert proc.stat("cluster.svc.upstream_rq_retry_overflow") == 0
    finally:
        up.stop()


def _priority_routes() -> list[dict[str, Any]]:
    """``x-prio: high`` goes to the same cluster on a route with ``priority: HIGH``."""
    return [
        {
            "match": {"prefix": "/", "headers": [{"name": "x-prio", "string_match": {"exact": "high"}}]},
            "route": {"cluster": "svc", "priority": "HIGH"},
        },
        {"match": {"prefix": "/"}, "route": {"cluster": "svc"}},
    ]


def test_high_priority_route_keeps_working_while_default_max_requests_is_exhausted(
    moorline: Any, upstream: TestUpstream
) -> None:
    port = free_port()
    cb = {
        "thresholds": [
            {"max_requests": 1},
            {"priority": "HIGH", "max_requests": 1, "track_remaining": True},
        ]
    }
    proc = moorline(
        config_http(port, [cluster("svc", [upstream.port], circuit_breakers=cb)], routes=_priority_routes())
    )
    high = {"x-prio": "high"}
    slow = RawConn("127.0.0.1", port)
    slow.send(b"GET /delay/3000 HTTP/1.1\r\nHost: a\r\n\r\n")  # holds DEFAULT's one request
    assert _poll(lambda: proc.stat(CB + "rq_open") == 1)
    r = http_request("127.0.0.1", port, "GET", "/default")
    assert r.status == 503 and r.body.endswith(b"overflow")
    r = http_request("127.0.0.1", port, "GET", "/high", headers=high)
    assert r.status == 200
    assert proc.stat("cluster.svc.circuit_breakers.high.remaining_rq") == 1
    # Now HIGH's own one request is held too: the next HIGH request overflows.
    slow_high = RawConn("127.0.0.1", port)
    slow_high.send(b"GET /delay/3000 HTTP/1.1\r\nHost: a\r\nx-prio: high\r\n\r\n")
    assert _poll(lambda: proc.stat("cluster.svc.circuit_breakers.high.rq_open") == 1)
    assert proc.stat("cluster.svc.circuit_breakers.high.remaining_rq") == 0
    r = http_request("127.0.0.1", port, "GET", "/high2", headers=high)
    assert r.status == 503 and r.body.endswith(b"overflow")
    assert proc.stat("cluster.svc.upstream_rq_pending_overflow") == 2
    assert slow.read_response().status == 200
    assert slow_high.read_response().status == 200
    slow.close()
    slow_high.close()
    assert _poll(lambda: proc.stat("cluster.svc.upstream_rq_active") == 0)
    assert proc.stat(CB + "rq_open") == 0
    assert proc.stat("cluster.svc.circuit_breakers.high.rq_open") == 0
    assert http_request("127.0.0.1", port, "GET", "/default").status == 200
    assert http_request("127.0.0.1", port, "GET", "/high", headers=high).status == 200
    paths = [rec.path for rec in upstream.requests]
    assert "/high2" not in paths and paths.count("/default") == 1


def test_high_priority_route_takes_retries_from_the_high_thresholds(moorline: Any) -> None:
    """DEFAULT allows no concurrent retry, HIGH allows them: only the HIGH route retries."""
    up = TestUpstream(always_status=503).start()
    try:
        port = free_port()
        cb = {
            "thresholds": [
                {"max_retries": 0},
                {"priority": "HIGH", "max_retries": 5, "track_remaining": True},
            ]
        }
        retry = {"retry_on": "5xx", "num_retries": 2}
        routes = _priority_routes()
        for r in routes:
            r["route"]["retry_policy"] = retry
        proc = moorline(config_http(port, [cluster("svc", [up.port], circuit_breakers=cb)], routes=routes))
        assert http_request("127.0.0.1", port, "GET", "/d").status == 503
        assert len(up.requests) == 1
        assert proc.stat("cluster.svc.upstream_rq_retry_overflow") == 1
        assert http_request("127.0.0.1", port, "GET", "/h", headers={"x-prio": "high"}).status == 503
        assert [rec.path for rec in up.requests] == ["/d", "/h", "/h", "/h"]
        assert proc.stat("cluster.svc.upstream_rq_retry") == 2
        assert proc.stat("cluster.svc.upstream_rq_retry_overflow") == 1
        assert proc.stat("cluster.svc.circuit_breakers.high.rq_retry_open") == 0
        # every HIGH retry slot and request slot was given back
        assert proc.stat("cluster.svc.circuit_breakers.high.remaining_retries") == 5
        assert proc.stat("cluster.svc.circuit_breakers.high.remaining_rq") == 1024
    finally:
        up.stop()


def test_high_priority_requests_do_not_use_up_default_max_requests(
    moorline: Any, upstream: TestUpstream
) -> None:
    port = free_port()
    cb = {"thresholds": [{"max_requests": 1}]}
    proc = moorline(
        config_http(port, [cluster("svc", [upstream.port], circuit_breakers=cb)], routes=_priority_routes())
    )
    slow_high = RawConn("127.0.0.1", port)
    slow_high.send(b"GET /delay/3000 HTTP/1.1\r\nHost: a\r\nx-prio: high\r\n\r\n")
    assert _poll(lambda: proc.stat("cluster.svc.upstream_rq_active") == 1)
    assert proc.stat(CB + "rq_open") == 0  # the one in flight is HIGH's
    assert http_request("127.0.0.1", port, "GET", "/default").status == 200
    assert slow_high.read_response().status == 200
    slow_high.close()


def test_high_priority_request_opens_its_own_connection_past_default_max_connections(
    moorline: Any, upstream: TestUpstream
) -> None:
    """DEFAULT: one connection (busy with a long request) and one queued request, so the next
    DEFAULT request overflows; a HIGH request takes a pending slot of its own and opens a
    connection counted against HIGH, and is answered while the long one still runs. (One pool
    per host, its queue served in order: the queued DEFAULT request goes first on that
    connection, then the HIGH one.)"""
    port = free_port()
    cb = {
        "thresholds": [
            {"max_connections": 1, "max_pending_requests": 1},
            {"priority": "HIGH", "max_connections": 1, "track_remaining": True},
        ]
    }
    proc = moorline(
        config_http(port, [cluster("svc", [upstream.port], circuit_breakers=cb)], routes=_priority_routes())
    )
    long = RawConn("127.0.0.1", port)
    long.send(b"GET /delay/20000 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert _poll(lambda: proc.stat("cluster.svc.upstream_rq_active") == 1)
    queued = RawConn("127.0.0.1", port)
    queued.send(b"GET /queued HTTP/1.1\r\nHost: a\r\n\r\n")
    assert _poll(lambda: proc.stat("cluster.svc.upstream_rq_pending_active") == 1)
    assert proc.stat(CB + "cx_open") == 1 and proc.stat(CB + "rq_pending_open") == 1
    r = http_request("127.0.0.1", port, "GET", "/default")
    assert r.status == 503 and r.body.endswith(b"overflow")
    r = http_request("127.0.0.1", port, "GET", "/high", headers={"x-prio": "high"})
    assert r.status == 200  # (waiting for the long request would outlast the client's 10 s)
    assert upstream.connections_total == 2
    assert proc.stat("cluster.svc.upstream_rq_active") == 1  # the long one still runs
    assert proc.stat("cluster.svc.upstream_cx_active") == 2
    assert proc.stat("cluster.svc.circuit_breakers.high.remaining_cx") == 0
    assert proc.stat("cluster.svc.circuit_breakers.high.remaining_pending") == 1024
    assert proc.stat(CB + "cx_open") == 1  # DEFAULT's count is still its one connection
    assert queued.read_response().status == 200
    assert [rec.path for rec in upstream.requests] == ["/delay/20000", "/queued", "/high"]
    long.close()
    queued.close()
    assert _poll(lambda: proc.stat("cluster.svc.upstream_rq_active") == 0)
