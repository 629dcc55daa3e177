"""Retries through a real moorline: the rate-limited back-off waits as long as the upstream's
``Retry-After`` says before the next try."""

from __future__ import annotations

from typing import Any

import pytest

from moorline.testing.procs import config_http, free_port, http_request
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
