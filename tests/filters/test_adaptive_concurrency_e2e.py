"""envoy.filters.http.adaptive_concurrency in a real moorline process: a flood of concurrent
http.client requests against a slow upstream is partly shed with 503 while the number of
requests the upstream serves at once never exceeds the limit the filter reports."""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from moorline.testing.procs import config_http, free_port

pytestmark = pytest.mark.e2e

ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
}
MAX_LIMIT = 4
GC = "http.listener_http.adaptive_concurrency.gradient_controller."


class CountingUpstream(ThreadingHTTPServer):
    """Answers every request after 200 ms, counting the requests it holds at once."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.active = 0
        self.max_active = 0
        self.served = 0


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: CountingUpstream

    def do_GET(self) -> None:
        srv = self.server
        with srv.lock:
            srv.active += 1
            srv.max_active = max(srv.max_active, srv.active)
        try:
            time.sleep(0.2)
        finally:
            with srv.lock:
                srv.active -= 1
                srv.served += 1
        body = b"slow ok"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def slow_upstream() -> Iterator[CountingUpstream]:
    srv = CountingUpstream()
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


def _filter() -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.adaptive_concurrency",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.adaptive_concurrency.v3.AdaptiveConcurrency",
            "gradient_controller_config": {
                "concurrency_limit_params": {
                    "max_concurrency_limit": MAX_LIMIT,
                    "concurrency_update_interval": "0.1s",
                },
                "min_rtt_calc_params": {"interval": "1s", "request_count": 5, "min_concurrency": 2},
            },
        },
    }


def test_flood_is_shed_and_the_upstream_concurrency_stays_under_the_limit(
    moorline: Any, slow_upstream: CountingUpstream
) -> None:
    port = free_port()
    up_port = slow_upstream.server_address[1]
    proc = moorline(config_http(port, {"svc": [up_port]}, hcm_extra={"http_filters": [_filter(), ROUTER]}))
    results: list[tuple[int, bytes]] = []
    lock = threading.Lock()

    def client() -> None:
        for _ in range(3):
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            try:
                c.request("GET", "/work")
                r = c.getresponse()
                out = (r.status, r.read())
            finally:
                c.close()
            with lock:
                results.append(out)

    threads = [threading.Thread(target=client) for _ in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 72
    ok = [r for r in results if r[0] == 200]
    shed = [r for r in results if r[0] == 503]
    assert len(ok) + len(shed) == 72
    assert ok and shed
    assert all(b == b"slow ok" for _, b in ok)
    assert all(b == b"reached concurrency limit" for _, b in shed)
    stats = proc.stats()
    assert stats[GC + "rq_blocked"] == len(shed)
    limit = stats[GC + "concurrency_limit"]
    assert isinstance(limit, int) and 2 <= limit <= MAX_LIMIT
    # Every admitted request was served; never more at once than the filter's limit allows.
    assert slow_upstream.served == len(ok)
    assert 1 <= slow_upstream.max_active <= MAX_LIMIT
    assert stats[GC + "min_rtt_msecs"] >= 200  # measured on the slow upstream
