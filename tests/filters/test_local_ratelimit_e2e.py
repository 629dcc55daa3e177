"""Local rate limiting through a real moorline: a burst over max_tokens from curl gets 429 with
the configured and x-ratelimit-* headers, a route's own bucket replaces the filter's, and the
network filter closes the connection over its limit."""

from __future__ import annotations

import http.client
import shutil
import subprocess
from typing import Any

import pytest

from moorline.testing.procs import bootstrap, cluster, config_http, free_port, hcm_listener, http_request
from moorline.testing.upstream import TestUpstream

pytestmark = pytest.mark.e2e

HTTP_TYPE = "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"
NET_TYPE = "type.googleapis.com/envoy.extensions.filters.network.local_ratelimit.v3.LocalRateLimit"
ALL = {"default_value": {"numerator": 100}, "runtime_key": "rl"}
ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
}


def _bucket(n: int) -> dict[str, Any]:
    return {"max_tokens": n, "tokens_per_fill": n, "fill_interval": "3600s"}  # no refill in a test


def _rl(**d: Any) -> dict[str, Any]:
    return {"name": "envoy.filters.http.local_ratelimit", "typed_config": {"@type": HTTP_TYPE, **d}}


def _curl(port: int, path: str) -> tuple[int, dict[str, str]]:
    curl = shutil.which("curl")
    assert curl, "curl is required"
    out = subprocess.run(
        [curl, "-s", "-D", "-", "-o", "/dev/null", f"http://127.0.0.1:{port}{path}"],
        capture_output=True,
        timeout=20,
        check=True,
    ).stdout.decode()
    lines = out.split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    return status, headers


def test_burst_over_max_tokens_gets_429_with_headers(moorline: Any, upstream: TestUpstream) -> None:
    port = free_port()
    f = _rl(
        stat_prefix="edge",
        token_bucket=_bucket(3),
        filter_enabled=ALL,
        filter_enforced=ALL,
        response_headers_to_add=[{"header": {"key": "x-local-rate-limit", "value": "true"}}],
        enable_x_ratelimit_headers="DRAFT_VERSION_03",
    )
    proc = moorline(config_http(port, {"svc": [upstream.port]}, hcm_extra={"http_filters": [f, ROUTER]}))
    got = [_curl(port, f"/r{i}") for i in range(4)]
    assert [s for s, _ in got] == [200, 200, 200, 429]
    assert [h["x-ratelimit-remaining"] for _, h in got] == ["2", "1", "0", "0"]
    assert all(h["x-ratelimit-limit"] == "3" for _, h in got)
    assert "x-local-rate-limit" not in got[0][1] and got[3][1]["x-local-rate-limit"] == "true"
    assert int(got[3][1]["x-ratelimit-reset"]) > 0
    assert [r.path for r in upstream.requests] == ["/r0", "/r1", "/r2"]  # the 4th never left
    assert proc.stat("edge.http_local_rate_limit.ok") == 3
    assert proc.stat("edge.http_local_rate_limit.rate_limited") == 1
    assert proc.stat("edge.http_local_rate_limit.enforced") == 1


def test_route_bucket_overrides_the_filters(moorline: Any, upstream: TestUpstream) -> None:
    port = free_port()
    tight = {
        "@type": HTTP_TYPE,
        "stat_prefix": "tight",
        "token_bucket": _bucket(1),
        "filter_enabled": ALL,
        "filter_enforced": ALL,
        "status": {"code": 503},
    }
    routes = [
        {
            "match": {"prefix": "/tight"},
            "route": {"cluster": "svc"},
            "typed_per_filter_config": {"envoy.filters.http.local_ratelimit": tight},
        },
        {"match": {"prefix": "/"}, "route": {"cluster": "svc"}},
    ]
    f = _rl(stat_prefix="edge", token_bucket=_bucket(100), filter_enabled=ALL, filter_enforced=ALL)
    proc = moorline(
        config_http(port, {"svc": [upstream.port]}, routes=routes, hcm_extra={"http_filters": [f, ROUTER]})
    )
    statuses = [http_request("127.0.0.1", port, "GET", p).status for p in ("/tight", "/tight", "/a", "/b")]
    assert statuses == [200, 503, 200, 200]
    assert proc.stat("tight.http_local_rate_limit.rate_limited") == 1
    assert proc.stat("edge.http_local_rate_limit.ok") == 2


def test_descriptor_header_selects_a_smaller_bucket(moorline: Any, upstream: TestUpstream) -> None:
    port = free_port()
    routes = [
        {
            "match": {"prefix": "/"},
            "route": {
                "cluster": "svc",
                "rate_limits": [
                    {"actions": [{"request_headers": {"header_name": "x-tier", "descriptor_key": "tier"}}]}
                ],
            },
        }
    ]
    f = _rl(
        stat_prefix="edge",
        token_bucket=_bucket(10),
        filter_enabled=ALL,
        filter_enforced=ALL,
        enable_x_ratelimit_headers="DRAFT_VERSION_03",
        descriptors=[{"entries": [{"key": "tier", "value": "free"}], "token_bucket": _bucket(1)}],
    )
    proc = moorline(
        config_http(port, {"svc": [upstream.port]}, routes=routes, hcm_extra={"http_filters": [f, ROUTER]})
    )
    free = [http_request("127.0.0.1", port, "GET", f"/f{i}", headers={"x-tier": "free"}) for i in range(2)]
    paid = [http_request("127.0.0.1", port, "GET", f"/p{i}", headers={"x-tier": "paid"}) for i in range(2)]
    assert [r.status for r in free + paid] == [200, 429, 200, 200]
    assert [r.header("x-ratelimit-limit") for r in free + paid] == ["1", "1", "10", "10"]
    assert [r.header("x-ratelimit-remaining") for r in paid] == ["9", "8"]
    assert [r.path for r in upstream.requests] == ["/f0", "/p0", "/p1"]
    assert proc.stat("edge.http_local_rate_limit.rate_limited") == 1


def test_network_filter_closes_the_extra_connection(moorline: Any, upstream: TestUpstream) -> None:
    port = free_port()
    lst = hcm_listener("l", port, [{"match": {"prefix": "/"}, "route": {"cluster": "svc"}}])
    net = {
        "name": "envoy.filters.network.local_ratelimit",
        "typed_config": {"@type": NET_TYPE, "stat_prefix": "conns", "token_bucket": _bucket(2)},
    }
    lst["filter_chains"][0]["filters"].insert(0, net)
    proc = moorline(bootstrap([lst], [cluster("svc", [upstream.port])]))

    def get() -> int | None:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            c.request("GET", "/")
            r = c.getresponse()
            r.read()
            # a second request on an admitted connection takes no token
            c.request("GET", "/again")
            r2 = c.getresponse()
            r2.read()
            return r2.status
        except (ConnectionError, http.client.RemoteDisconnected):
            return None
        finally:
            c.close()

    assert [get() for _ in range(3)] == [200, 200, None]
    assert proc.stat("conns.local_rate_limit.rate_limited") == 1
    assert len(upstream.requests) == 4
