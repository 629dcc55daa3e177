"""``envoy.filters.http.ratelimit`` against a global limiter as deployed: real moorline processes,
the test rate limit service with its Redis backend (envoyproxy/ratelimit's descriptor trees and
fixed windows, ``moorline.testing.rls_server.RedisLimiter``) and a real redis-server, driven with
curl and http.client. The service's clock is pinned inside one hour window, so no window boundary
lands inside a test and ``x-ratelimit-reset`` is exact."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from moorline.testing.procs import (
    RedisProc,
    cluster,
    config_http,
    free_port,
    http_request,
    start_redis,
    wait_for_log,
)
from moorline.testing.rls_server import RedisLimiter, RlsServer
from moorline.testing.upstream import TestUpstream

pytestmark = pytest.mark.e2e

ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
}
TYPE = "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit"
# Two descriptors per request: (remote_address, client) from the x-client header, and
# remote_address alone.
RATE_LIMITS = [
    {
        "actions": [
            {"remote_address": {}},
            {"request_headers": {"header_name": "x-client", "descriptor_key": "client"}},
        ]
    },
    {"actions": [{"remote_address": {}}]},
]
LIMITS = {
    "domain": "edge",
    "descriptors": [
        {
            "key": "remote_address",
            "rate_limit": {"unit": "hour", "requests_per_unit": 50, "name": "per-address"},
            "descriptors": [
                {"key": "client", "rate_limit": {"unit": "hour", "requests_per_unit": 3}},
                {"key": "client", "value": "vip", "rate_limit": {"unlimited": True}},
            ],
        }
    ],
}
WINDOW = 1_800_000_000 - 1_800_000_000 % 3600  # the pinned hour window's start
NOW = WINDOW + 10


@pytest.fixture
def rds(tmp_path: Path) -> Iterator[RedisProc]:
    p = start_redis(tmp_path)
    yield p
    p.stop(signal.SIGTERM, 5)


def _rls(rds: RedisProc) -> RlsServer:
    return RlsServer(backend=RedisLimiter(LIMITS, rds.port, clock=lambda: NOW, timeout=0.5))


@pytest.fixture
def rls(rds: RedisProc) -> Iterator[RlsServer]:
    with _rls(rds) as s:
        yield s


def _config(
    port: int, upstream: TestUpstream, rls_port: int, access_log: Path | None = None, **extra: Any
) -> str:
    flt = {
        "name": "envoy.filters.http.ratelimit",
        "typed_config": {
            "@type": TYPE,
            "domain": "edge",
            "timeout": "2s",
            "enable_x_ratelimit_headers": "DRAFT_VERSION_03",
            "rate_limit_service": {
                "grpc_service": {"envoy_grpc": {"cluster_name": "rls"}},
                "transport_api_version": "V3",
            },
            **extra,
        },
    }
    routes = [{"match": {"prefix": "/"}, "route": {"cluster": "svc", "rate_limits": RATE_LIMITS}}]
    return config_http(
        port,
        [cluster("svc", [upstream.port]), cluster("rls", [rls_port])],
        routes=routes,
        hcm_extra={"http_filters": [flt, ROUTER]},
        access_log_path=access_log,
    )


def _curl(port: int, client: str) -> tuple[int, dict[str, str]]:
    cmd = ["curl", "-s", "-m", "5", "-o", "/dev/null", "-D", "-", "-w", "%{http_code}"]
    cmd += ["-H", f"x-client: {client}", f"http://127.0.0.1:{port}/x"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout
    headers = {}
    for line in out[:-3].splitlines()[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return int(out[-3:]), headers


def _codes(port: int, client: str, n: int) -> list[int]:
    return [
        http_request("127.0.0.1", port, "GET", "/y", headers={"x-client": client}).status for _ in range(n)
    ]


def test_n_plus_one_is_429_with_ratelimit_headers(
    moorline: Any, upstream: TestUpstream, rds: RedisProc, rls: RlsServer
) -> None:
    port = free_port()
    p = moorline(_config(port, upstream, rls.port))
    n = len(upstream.requests)
    got = [_curl(port, "a") for _ in range(4)]
    assert [s for s, _ in got] == [200, 200, 200, 429]
    first, last = got[0][1], got[3][1]
    assert "x-envoy-ratelimited" not in first
    # the tighter (remote_address, client) limit gives the values; both policies are listed
    assert first["x-ratelimit-limit"] == '3, 3;w=3600, 50;w=3600;name="per-address"'
    assert first["x-ratelimit-remaining"] == "2"
    assert first["x-ratelimit-reset"] == "3590"
    assert last["x-envoy-ratelimited"] == "true"
    assert last["x-ratelimit-remaining"] == "0"
    assert len(upstream.requests) == n + 3  # the 429 never went upstream
    # another client value counts apart; the unlimited one is never limited
    assert _codes(port, "b", 3) == [200] * 3
    assert _codes(port, "vip", 6) == [200] * 6
    # the counters are in Redis under envoyproxy/ratelimit's keys for the window
    c = redis.Redis(port=rds.port)
    try:
        assert int(c.get(f"edge_remote_address_127.0.0.1_client_a_{WINDOW}") or 0) == 4
        assert int(c.get(f"edge_remote_address_127.0.0.1_{WINDOW}") or 0) == 13
    finally:
        c.close()
    assert rls.requests[0] == (
        "edge",
        [[("remote_address", "127.0.0.1"), ("client", "a")], [("remote_address", "127.0.0.1")]],
    )
    assert p.stat("cluster.svc.ratelimit.over_limit") == 1
    assert p.stat("cluster.svc.ratelimit.ok") == 12


def test_proxies_sharing_the_service_share_the_limit(
    moorline: Any, upstream: TestUpstream, rds: RedisProc, rls: RlsServer
) -> None:
    """The point of a global limiter: the limit holds across proxies (and across replicas of
    the service, which share only Redis)."""
    with _rls(rds) as replica:
        ports = [free_port() for _ in range(3)]
        procs = [
            moorline(_config(ports[0], upstream, rls.port)),
            moorline(_config(ports[1], upstream, rls.port)),
            moorline(_config(ports[2], upstream, replica.port)),
        ]
        assert _codes(ports[0], "s", 1) + _codes(ports[1], "s", 1) + _codes(ports[2], "s", 1) == [200] * 3
        assert _codes(ports[1], "s", 1) == [429]
        assert _codes(ports[0], "s", 1) == [429]
        assert _codes(ports[2], "s", 1) == [429]
        assert [p.stat("cluster.svc.ratelimit.over_limit") for p in procs] == [1, 1, 1]
        assert len(replica.requests) == 2


def test_redis_down_fail_open_then_limits_return(
    moorline: Any, upstream: TestUpstream, tmp_path: Path, rds: RedisProc, rls: RlsServer
) -> None:
    port = free_port()
    p = moorline(_config(port, upstream, rls.port))
    assert _codes(port, "f", 3) == [200] * 3
    rds.stop(signal.SIGKILL, 5)
    n = len(upstream.requests)
    assert _codes(port, "f", 3) == [200] * 3  # the service fails UNAVAILABLE: let through
    assert len(upstream.requests) == n + 3
    assert p.stat("cluster.svc.ratelimit.error") == 3
    assert p.stat("cluster.svc.ratelimit.failure_mode_allowed") == 3
    back = start_redis(tmp_path, port=rds.port)  # same address, empty counters
    try:
        assert _codes(port, "f", 4) == [200, 200, 200, 429]
        assert p.stat("cluster.svc.ratelimit.error") == 3
        assert p.stat("cluster.svc.ratelimit.over_limit") == 1
    finally:
        back.stop(signal.SIGTERM, 5)


def test_redis_down_fail_closed_is_500_rlse(
    moorline: Any, upstream: TestUpstream, tmp_path: Path, rds: RedisProc, rls: RlsServer
) -> None:
    port = free_port()
    logf = tmp_path / "access.log"
    p = moorline(_config(port, upstream, rls.port, access_log=logf, failure_mode_deny=True))
    assert _codes(port, "d", 1) == [200]
    rds.stop(signal.SIGKILL, 5)
    n = len(upstream.requests)
    assert _codes(port, "d", 2) == [500, 500]
    assert len(upstream.requests) == n  # denied before the upstream
    assert p.stat("cluster.svc.ratelimit.error") == 2
    assert p.stat("cluster.svc.ratelimit.failure_mode_allowed") == 0
    wait_for_log(logf, "code=500 flags=RLSE ")
    back = start_redis(tmp_path, port=rds.port)
    try:
        assert _codes(port, "d", 4) == [200, 200, 200, 429]
        wait_for_log(logf, "code=429 flags=RL ")
        assert p.stat("cluster.svc.ratelimit.error") == 2
    finally:
        back.stop(signal.SIGTERM, 5)
