"""The max_retries circuit breaker's slots live on the cluster and always come back.

A retry waiting out its backoff holds one of the cluster's ``max_retries`` slots (3 by default).
A client that goes away during the backoff ends the stream; the slot must be given back then, or
after three such clients every later retry on the cluster is refused as
``upstream_rq_retry_overflow`` for the life of the process.
"""

from __future__ import annotations

import time

from moorline.testing.inproc import ServerThread
from moorline.testing.procs import RawConn, bootstrap, cluster, free_port, hcm_listener, http_request
from moorline.testing.upstream import TestUpstream

H = "127.0.0.1"


def _retry(backoff: str) -> dict[str, object]:
    return {
        "retry_on": "5xx",
        "num_retries": 1,
        "retry_back_off": {"base_interval": backoff, "max_interval": backoff},
    }


def test_clients_leaving_during_backoff_give_their_retry_slot_back(upstream: TestUpstream) -> None:
    port = free_port()
    routes = [
        {
            "match": {"prefix": "/slow/"},
            "route": {"cluster": "svc", "prefix_rewrite": "/", "retry_policy": _retry("30s")},
        },
        {"match": {"prefix": "/"}, "route": {"cluster": "svc", "retry_policy": _retry("0.01s")}},
    ]
    cfg = bootstrap([hcm_listener("web", port, routes)], [cluster("svc", [upstream.port])])
    with ServerThread(cfg) as srv:
        svc = srv.call(srv.server.cluster_manager.get, "svc")
        assert svc.max_retries == 3
        # More clients than slots: each gets a 503, its retry waits 30 s, and it disconnects.
        for i in range(4):
            c = RawConn(H, port)
            c.send(b"GET /slow/status/503 HTTP/1.1\r\nHost: x\r\n\r\n")
            upstream.wait_for_requests(i + 1)
            deadline = time.monotonic() + 10
            while srv.call(lambda: svc.active_retries) != 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert srv.call(lambda: svc.active_retries) == 1  # in backoff, holding a slot
            c.close()
            deadline = time.monotonic() + 10
            while srv.call(lambda: svc.active_retries) != 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert srv.call(lambda: svc.active_retries) == 0  # given back on the reset
        # A request whose first try fails must still be retried (and succeed).
        r = http_request(H, port, "GET", "/fail-n/k/1")
        assert r.status == 200
        st = srv.server.stats
        assert st.counter("cluster.svc.upstream_rq_retry_overflow").value == 0
        assert st.counter("cluster.svc.upstream_rq_retry_success").value == 1
        assert st.counter("cluster.svc.upstream_rq_retry").value == 5
