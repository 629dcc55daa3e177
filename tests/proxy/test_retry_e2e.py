"""Retries through a real moorline: the rate-limited back-off waits as long as the upstream's
``Retry-After`` says before the next try."""

from __future__ import annotations

from typing import Any

import pytest

from moorline.testing.procs import cluster, config_http, free_port, http_request
from moorline.testing.upstream import TestUpstream

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("status", [429, 503])
def test_retry_waits_for_retry_after(moorline: Any, upstream: TestUpstream, status: int) -> None:
    port = free_port()
    retry = {
        "retry_on": "5xx,retriable-status-codes",
        "retriable_status_codes": [429],
        "num_retries": 1,
        # the ordinary back-off would retry within 10 ms
        "retry_back_off": {"base_interval": "0.005s", "max_interval": "0.01s"},
        "rate_limited_retry_back_off": {"reset_headers": [{"name": "Retry-After"}]},
    }
    routes = [
        {"match": {"prefix": "/"}, "route": {"cluster": "svc", "retry_policy": retry, "timeout": "20s"}}
    ]
    proc = moorline(config_http(port, {"svc": [upstream.port]}, routes=routes))
    path = f"/fail-n/k{status}/1?status={status}&retry-after=1"
    r = http_request("127.0.0.1", port, "GET", path)
    assert r.status == 200
    first, second = upstream.requests
    assert first.path == second.path == path
    assert second.at - first.at >= 0.9  # the header's 1 s, not the 10 ms back-off
    assert proc.stat("cluster.svc.upstream_rq_retry") == 1
    assert proc.stat("cluster.svc.upstream_rq_retry_backoff_ratelimited") == 1
    assert proc.stat("cluster.svc.upstream_rq_retry_success") == 1


PREVIOUS_PRIORITIES = {
    "name": "envoy.retry_priorities.previous_priorities",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig",
        "update_frequency": 1,
    },
}


@pytest.mark.parametrize("with_priority", [True, False], ids=["previous_priorities", "plain"])
def test_retry_priority_moves_the_retry_to_the_next_priority(
    moorline: Any, upstreams: Any, with_priority: bool
) -> None:
    """Priority 0 (healthy, so it takes all the load) answers 503, priority 1 answers 200. With
    previous_priorities (update_frequency 1) the retry skips the level tried and lands on
    priority 1; without it the retry goes to priority 0 again."""
    p0 = upstreams(upstream_id="p0", always_status=503)
    p1 = upstreams(upstream_id="p1")
    port = free_port()

    def level(priority: int, up: TestUpstream) -> dict[str, Any]:
        ep = {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": up.port}}}}
        return {"priority": priority, "lb_endpoints": [ep]}

    svc = cluster("svc", [])
    svc["load_assignment"]["endpoints"] = [level(0, p0), level(1, p1)]
    retry: dict[str, Any] = {
        "retry_on": "5xx",
        "num_retries": 1,
        "retry_back_off": {"base_interval": "0.005s", "max_interval": "0.01s"},
    }
    if with_priority:
        retry["retry_priority"] = PREVIOUS_PRIORITIES
    routes = [{"match": {"prefix": "/"}, "route": {"cluster": "svc", "retry_policy": retry}}]
    proc = moorline(config_http(port, [svc], routes=routes))
    for i in range(3):  # every request: the same two tries
        r = http_request("127.0.0.1", port, "GET", f"/r{i}")
        if with_priority:
            assert r.status == 200 and r.header("x-upstream-id") == "p1"
        else:
            assert r.status == 503 and r.header("x-upstream-id") == "p0"
    assert [rec.path for rec in p0.requests] == (
        ["/r0", "/r1", "/r2"] if with_priority else ["/r0", "/r0", "/r1", "/r1", "/r2", "/r2"]
    )
    assert [rec.path for rec in p1.requests] == (["/r0", "/r1", "/r2"] if with_priority else [])
    assert proc.stat("cluster.svc.upstream_rq_retry") == 3
    # a retry answered 503 again is no success
    assert proc.stat("cluster.svc.upstream_rq_retry_success") == (3 if with_priority else 0)
