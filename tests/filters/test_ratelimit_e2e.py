"""``envoy.filters.http.ratelimit`` end to end: a real moorline, the test rate limit service
(``moorline.testing.rls_server``, in-memory fixed windows) and curl / http.client. Limits are
obeyed per descriptor (per header value), OVER_LIMIT is 429 with flag RL, an unreachable or
slow service follows ``failure_mode_deny``."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from moorline.testing.procs import cluster, config_http, free_port, http_request
from moorline.testing.rls_server import Limit, RlsServer
from moorline.testing.upstream import TestUpstream

pytestmark = pytest.mark.e2e

ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
}
TYPE = "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit"
RATE_LIMITS = [
    {"actions": [{"request_headers": {"header_name": "x-client", "descriptor_key": "client"}}]},
    {"actions": [{"generic_key": {"descriptor_value": "everyone"}}, {"remote_address": {}}]},
]


@pytest.fixture
def rls() -> Iterator[RlsServer]:
    with RlsServer(
        limits=[Limit({"client": None}, 2), Limit({"generic_key": "everyone", "remote_address": None}, 100)]
    ) as s:
        yield s


def _filter(rls_port: int, **extra: Any) -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.ratelimit",
        "typed_config": {
            "@type": TYPE,
            "domain": "edge",
            "timeout": "2s",
            "rate_limit_service": {
                "grpc_service": {"envoy_grpc": {"cluster_name": "rls"}},
                "transport_api_version": "V3",
            },
            **extra,
        },
    }


def _config(port: int, upstream: TestUpstream, rls_port: int, **extra: Any) -> str:
    routes = [{"match": {"prefix": "/"}, "route": {"cluster": "svc", "rate_limits": RATE_LIMITS}}]
    return config_http(
        port,
        [cluster("svc", [upstream.port]), cluster("rls", [rls_port])],
        routes=routes,
        hcm_extra={"http_filters": [_filter(rls_port, **extra), ROUTER]},
    )


def _curl(port: int, client: str | None) -> tuple[int, str]:
    cmd = [
        "curl",
        "-s",
        "-m",
        "5",
        "-o",
        "/dev/null",
        "-D",
        "-",
        "-w",
        "%{http_code}",
        f"http://127.0.0.1:{port}/x",
    ]
    if client is not None:
        cmd += ["-H", f"x-client: {client}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout
    return int(out[-3:]), out[:-3].lower()


def test_limits_obeyed_per_header_value(moorline: Any, upstream: TestUpstream, rls: RlsServer) -> None:
    port = free_port()
    p = moorline(_config(port, upstream, rls.port, enable_x_ratelimit_headers="DRAFT_VERSION_03"))
    n = len(upstream.requests)
    a = [_curl(port, "a") for _ in range(3)]
    b = [_curl(port, "b") for _ in range(2)]
    assert [s for s, _ in a] == [200, 200, 429]
    assert [s for s, _ in b] == [200, 200]  # b's counter is its own
    assert "x-envoy-ratelimited: true" in a[2][1]
    assert "x-ratelimit-remaining: 0" in a[1][1]
    assert "x-ratelimit-limit: 2, 2;w=1" in a[1][1]
    assert len(upstream.requests) == n + 4  # the 429 never went upstream
    # the descriptors sent: the header's, then generic key + remote address
    dom, descs = rls.requests[0]
    assert dom == "edge"
    assert descs == [[("client", "a")], [("generic_key", "everyone"), ("remote_address", "127.0.0.1")]]
    # a request without the header sends only the second descriptor, and is allowed
    assert _curl(port, None)[0] == 200
    assert rls.requests[-1][1] == [[("generic_key", "everyone"), ("remote_address", "127.0.0.1")]]
    assert p.stat("cluster.svc.ratelimit.ok") == 5
    assert p.stat("cluster.svc.ratelimit.over_limit") == 1


def test_over_limit_response_flag_in_access_log(
    moorline: Any, upstream: TestUpstream, rls: RlsServer, tmp_path: Any
) -> None:
    port = free_port()
    logf = tmp_path / "access.log"
    routes = [{"match": {"prefix": "/"}, "route": {"cluster": "svc", "rate_limits": RATE_LIMITS[:1]}}]
    cfg = config_http(
        port,
        [cluster("svc", [upstream.port]), cluster("rls", [rls.port])],
        routes=routes,
        hcm_extra={"http_filters": [_filter(rls.port), ROUTER]},
        access_log_path=logf,
    )
    moorline(cfg)
    codes = [http_request("127.0.0.1", port, "GET", "/y", headers={"x-client": "z"}).status for _ in range(3)]
    assert codes == [200, 200, 429]
    for _ in range(100):
        if logf.exists() and logf.read_text().count("\n") >= 3:
            break
        time.sleep(0.05)
    lines = logf.read_text().splitlines()
    assert "code=429 flags=RL " in lines[-1]


def _dead_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return int(port)


def test_service_down_fail_open_is_counted(moorline: Any, upstream: TestUpstream) -> None:
    port = free_port()
    p = moorline(_config(port, upstream, _dead_port()))
    assert [_curl(port, "a")[0] for _ in range(3)] == [200, 200, 200]
    assert p.stat("cluster.svc.ratelimit.error") == 3
    assert p.stat("cluster.svc.ratelimit.failure_mode_allowed") == 3


def test_service_down_fail_closed_is_500(moorline: Any, upstream: TestUpstream) -> None:
    port = free_port()
    p = moorline(_config(port, upstream, _dead_port(), failure_mode_deny=True))
    n = len(upstream.requests)
    assert _curl(port, "a")[0] == 500
    assert len(upstream.requests) == n
    assert p.stat("cluster.svc.ratelimit.error") == 1
    assert p.stat("cluster.svc.ratelimit.failure_mode_allowed") == 0


def test_service_errors_follow_failure_mode(moorline: Any, upstream: TestUpstream, rls: RlsServer) -> None:
    rls.fail = True
    port = free_port()
    p = moorline(_config(port, upstream, rls.port))
    assert _curl(port, "a")[0] == 200
    assert len(rls.requests) == 1  # the service was asked and answered UNAVAILABLE
    assert p.stat("cluster.svc.ratelimit.failure_mode_allowed") == 1


def test_timeout_lets_through_or_denies(moorline: Any, upstream: TestUpstream, rls: RlsServer) -> None:
    rls.slow = 3.0
    port, port2 = free_port(), free_port()
    p = moorline(_config(port, upstream, rls.port, timeout="0.2s"))
    assert _curl(port, "a")[0] == 200
    assert p.stat("cluster.svc.ratelimit.error") == 1
    q = moorline(_config(port2, upstream, rls.port, timeout="0.2s", failure_mode_deny=True))
    assert _curl(port2, "a")[0] == 500
    assert q.stat("cluster.svc.ratelimit.error") == 1


def test_blackholed_service_times_out(moorline: Any, upstream: TestUpstream) -> None:
    """A listening socket that never accepts: the connection never completes its handshake."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)
    try:
        port = free_port()
        p = moorline(_config(port, upstream, hole.getsockname()[1], timeout="0.3s"))
        assert _curl(port, "a")[0] == 200
        assert p.stat("cluster.svc.ratelimit.failure_mode_allowed") == 1
    finally:
        hole.close()


def test_service_headers_reach_request_and_response(moorline: Any, upstream: TestUpstream) -> None:
    lim = Limit({"client": None}, 1, headers=[("x-rl-policy", "one-per-hour")])
    with RlsServer(limits=[lim]) as rls:
        rls.request_headers = [("x-rl-checked", "yes")]
        port = free_port()
        moorline(_config(port, upstream, rls.port))
        first = http_request("127.0.0.1", port, "GET", "/h", headers={"x-client": "c"})
        assert first.status == 200
        assert upstream.requests[-1].header("x-rl-checked") == "yes"
        assert dict((k.lower(), v) for k, v in first.headers)["x-rl-policy"] == "one-per-hour"
        second = http_request("127.0.0.1", port, "GET", "/h", headers={"x-client": "c"})
        assert second.status == 429
        assert dict((k.lower(), v) for k, v in second.headers)["x-rl-policy"] == "one-per-hour"


def test_per_route_ignores_or_includes_virtual_host_limits(moorline: Any, upstream: TestUpstream) -> None:
    per_route_type = "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimitPerRoute"
    with RlsServer(limits=[Limit({"generic_key": "vh"}, 1)]) as rls:
        port = free_port()
        routes = [
            {
                "match": {"prefix": "/free"},
                "route": {"cluster": "svc"},
                "typed_per_filter_config": {
                    "envoy.filters.http.ratelimit": {"@type": per_route_type, "vh_rate_limits": "IGNORE"}
                },
            },
            {"match": {"prefix": "/"}, "route": {"cluster": "svc"}},
        ]
        cfg = config_http(
            port,
            [cluster("svc", [upstream.port]), cluster("rls", [rls.port])],
            routes=routes,
            hcm_extra={"http_filters": [_filter(rls.port), ROUTER]},
        )
        doc = yaml.safe_load(cfg)
        hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["route_config"]["virtual_hosts"][0]["rate_limits"] = [
            {"actions": [{"generic_key": {"descriptor_value": "vh"}}]}
        ]
        moorline(yaml.safe_dump(doc))
        assert [http_request("127.0.0.1", port, "GET", "/free").status for _ in range(3)] == [200] * 3
        assert rls.requests == []  # IGNORE: no descriptor, no call
        assert [http_request("127.0.0.1", port, "GET", "/x").status for _ in range(2)] == [200, 429]


def test_client_gone_while_waiting_cancels_and_keeps_serving(
    moorline: Any, upstream: TestUpstream, rls: RlsServer
) -> None:
    rls.slow = 1.0
    port = free_port()
    p = moorline(_config(port, upstream, rls.port, timeout="5s"))
    n = len(upstream.requests)
    for _ in range(5):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"GET /gone HTTP/1.1\r\nhost: x\r\nx-client: g\r\n\r\n")
        s.close()
    rls.slow = 0.0
    time.sleep(1.5)  # let the slow answers arrive for streams that are gone (not an assertion)
    assert len(upstream.requests) == n  # none of the abandoned requests went upstream
    assert _curl(port, "other")[0] == 200
    assert p.popen.poll() is None


@pytest.mark.parametrize("value", ["a\r\nx-injected: 1", "\u20ac"])
def test_bad_header_from_the_service_is_its_error(moorline: Any, upstream: TestUpstream, value: str) -> None:
    """A header that would break the response framing (or is not latin-1) is not forwarded:
    the answer counts as the service's error (fail open here)."""
    with RlsServer(limits=[Limit({"client": None}, 5, headers=[("x-rl", value)])]) as rls:
        port = free_port()
        p = moorline(_config(port, upstream, rls.port))
        status, head = _curl(port, "c")
        assert status == 200
        assert "x-injected" not in head and "x-rl" not in head
        assert p.stat("cluster.svc.ratelimit.failure_mode_allowed") == 1
