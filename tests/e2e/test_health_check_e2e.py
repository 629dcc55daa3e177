"""Active health checks against real backends behind a real moorline: HTTP checks against three
TestUpstreams (one answers 503, one is stopped, both come back), TCP checks against an echo
server, a blackhole (a listening socket that never accepts) and a closed port, and gRPC checks
against a grpcio server with the grpc.health.v1 service."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from moorline.testing.procs import cluster, config_http, free_port, http_request
from moorline.testing.upstream import TcpEchoServer, TestUpstream

pytestmark = pytest.mark.e2e


def wait_for(cond: Callable[[], bool], what: str, limit: float = 30.0) -> None:
    end = time.monotonic() + limit
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.05)


def flags(proc: Any) -> dict[int, str]:
    """port -> health_flags from /clusters (cluster svc)."""
    out = {}
    for line in proc.admin_get("/clusters").body.decode().splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[0] == "svc" and parts[2] == "health_flags":
            out[int(parts[1].rsplit(":", 1)[1])] = parts[3]
    return out


def check(kind: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "timeout": "0.5s",
        "interval": "0.1s",
        "no_traffic_interval": "0.1s",
        "unhealthy_threshold": 2,
        "healthy_threshold": 2,
        **kind,
        **extra,
    }


def ids(port: int, n: int) -> set[str]:
    seen = set()
    for _ in range(n):
        r = http_request("127.0.0.1", port, "GET", "/work")
        assert r.status == 200
        seen.add(r.header("x-upstream-id") or "")
    return seen


def test_http_checks_take_a_failing_host_out_and_back(
    moorline: Any, upstreams: Callable[..., TestUpstream]
) -> None:
    u1, u2, u3 = upstreams(), upstreams(), upstreams()
    port = free_port()
    hc = check({"http_health_check": {"path": "/healthz", "host": "svc.check"}})
    cl = cluster("svc", [u1.port, u2.port, u3.port], health_checks=[hc])
    proc = moorline(config_http(port, [cl]))
    wait_for(lambda: set(flags(proc).values()) == {"healthy"}, "all three hosts pass their first check")
    probe = next(r for r in u1.requests if r.path == "/healthz")
    assert probe.header("host") == "svc.check" and probe.header("user-agent") == "Envoy/HC"

    # u3 answers 503 to everything: out of rotation, /clusters and the stats say why.
    u3.always_status = 503
    wait_for(lambda: flags(proc).get(u3.port) == "/failed_active_hc", "u3 is marked failed")
    assert flags(proc)[u1.port] == flags(proc)[u2.port] == "healthy"
    assert ids(port, 30) == {"u1", "u2"}
    st = proc.stats()
    assert st["cluster.svc.health_check.failure"] >= 1
    assert st["cluster.svc.health_check.healthy"] == 2
    assert st["cluster.svc.health_check.attempt"] >= st["cluster.svc.health_check.success"]
    assert st["cluster.svc.membership_healthy"] == 2
    j = proc.admin_get("/clusters?format=json")
    assert b"failed_active_health_check" in j.body

    # It recovers: back in after healthy_threshold passes.
    u3.always_status = None
    wait_for(lambda: flags(proc).get(u3.port) == "healthy", "u3 is healthy again")
    wait_for(lambda: "u3" in ids(port, 6), "requests reach u3 again")

    # u2 goes away (connections refused): network failures take it out too.
    u2.stop()
    wait_for(lambda: flags(proc).get(u2.port) == "/failed_active_hc", "u2 is marked failed")
    assert ids(port, 30) == {"u1", "u3"}
    assert proc.stat("cluster.svc.health_check.network_failure") >= 2


@pytest.fixture
def blackhole() -> Iterator[int]:
    """A listening socket that never accepts; its backlog fills and then SYNs go unanswered."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(0)
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


def test_tcp_checks_echo_blackhole_and_closed_port(moorline: Any, blackhole: int) -> None:
    echo = TcpEchoServer().start()
    try:
        closed = free_port()  # (nothing listens there)
        port = free_port()
        hc = check({"tcp_health_check": {"send": {"text": "50494e47"}, "receive": [{"text": "50494e47"}]}})
        cl = cluster("svc", [echo.port, blackhole, closed], health_checks=[hc])
        proc = moorline(config_http(port, [cl]))
        wait_for(lambda: flags(proc).get(echo.port) == "healthy", "the echo server passes")
        wait_for(lambda: proc.stat("cluster.svc.health_check.network_failure") >= 6, "failures pile up")
        f = flags(proc)
        assert f[blackhole] == "/failed_active_hc" and f[closed] == "/failed_active_hc"
        assert proc.stat("cluster.svc.health_check.healthy") == 1
        assert proc.stat("cluster.svc.membership_healthy") == 1
    finally:
        echo.stop()


class _Health(grpc.GenericRpcHandler):
    """grpc.health.v1.Health/Check on raw bytes (the message has one field: ``service``)."""

    def __init__(self) -> None:
        self.status = 1  # SERVING
        self.services: list[bytes] = []

    def service(self, details: Any) -> Any:
        if details.method != "/grpc.health.v1.Health/Check":
            return None

        def check(req: bytes, ctx: Any) -> bytes:
            self.services.append(req[2:] if req[:1] == b"\x0a" else b"")
            return b"\x08" + bytes([self.status])

        return grpc.unary_unary_rpc_method_handler(check)


def test_grpc_checks_follow_the_serving_status(moorline: Any) -> None:
    health = _Health()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[health])
    gport = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        port = free_port()
        hc = check({"grpc_health_check": {"service_name": "svc.v1"}})
        cl = cluster("svc", [gport], health_checks=[hc])
        proc = moorline(config_http(port, [cl]))
        wait_for(lambda: flags(proc).get(gport) == "healthy", "SERVING passes")
        assert b"svc.v1" in health.services
        health.status = 2  # NOT_SERVING: unhealthy at the first answer
        wait_for(lambda: flags(proc).get(gport) == "/failed_active_hc", "NOT_SERVING fails")
        assert proc.stat("cluster.svc.health_check.failure") >= 1
        assert proc.stat("cluster.svc.health_check.network_failure") == 0
        health.status = 1
        wait_for(lambda: flags(proc).get(gport) == "healthy", "SERVING again")
    finally:
        server.stop(0)
