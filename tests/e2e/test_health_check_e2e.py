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

from moorline.testing.procs import cluster, config_http, free_port, http_request, wait_until
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


# -- the first round, several checks, reuse_connection ----------------------------------------


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def test_a_static_cluster_holds_start_up_until_its_first_checks_answered(
    moorline: Any, upstreams: Callable[..., TestUpstream]
) -> None:
    u1 = upstreams()
    u1.hold("/healthz")  # (the first check gets no answer until released)
    port = free_port()
    hc = check({"http_health_check": {"path": "/healthz"}}, timeout="30s")
    proc = moorline(config_http(port, [cluster("svc", [u1.port], health_checks=[hc])]), wait="none")
    wait_until(lambda: any(r.path == "/healthz" for r in u1.requests), "the first check reaches u1")
    # The cluster is not initialized: no listener, no admin (/ready), as Envoy starts them after.
    assert proc.alive()
    assert not _listening(port) and not _listening(proc.admin_port)
    u1.release()
    wait_until(lambda: proc.admin_get("/ready").status == 200, "ready", ignore=(OSError,))
    assert flags(proc)[u1.port] == "healthy"  # (ready after the first check passed, not before)
    assert http_request("127.0.0.1", port, "GET", "/work").status == 200


def test_an_http_and_a_tcp_check_both_run_and_either_takes_a_host_out(
    moorline: Any, upstreams: Callable[..., TestUpstream]
) -> None:
    u1, u2 = upstreams(), upstreams(always_status=503)
    port = free_port()
    raw = b"GET /tcp HTTP/1.1\r\nhost: t\r\n\r\n".hex()
    checks = [
        check({"http_health_check": {"path": "/a"}}, unhealthy_threshold=1),
        check(
            {"tcp_health_check": {"send": {"text": raw}, "receive": [{"text": b"HTTP/1.1 ".hex()}]}},
            unhealthy_threshold=1,
            timeout="0.5s",
        ),
    ]
    proc = moorline(config_http(port, [cluster("svc", [u1.port, u2.port], health_checks=checks)]))
    # u2 answers the TCP check's bytes (any status line passes it) but 503 to /a: it is out.
    wait_until(lambda: flags(proc) == {u1.port: "healthy", u2.port: "/failed_active_hc"}, "u2 out")
    paths = {r.path for r in u2.requests}
    assert {"/a", "/tcp"} <= paths
    assert ids(port, 20) == {"u1"}
    # u1's TCP check gets no answer any more (its /a still passes): it goes out too.
    u1.hold("/tcp")
    wait_until(lambda: flags(proc).get(u1.port) == "/failed_active_hc", "u1 out by its TCP check")
    assert proc.stat("cluster.svc.health_check.network_failure") >= 1
    u1.release()
    wait_until(lambda: flags(proc).get(u1.port) == "healthy", "u1 back")


def test_checks_reuse_one_connection_until_the_upstream_closes_it(
    moorline: Any, upstreams: Callable[..., TestUpstream]
) -> None:
    u1, u2 = upstreams(), upstreams()
    port = free_port()
    reused = check({"http_health_check": {"path": "/healthz"}})
    cl = cluster("svc", [u1.port], health_checks=[reused])
    single = check({"http_health_check": {"path": "/once"}}, reuse_connection=False)
    cl2 = cluster("other", [u2.port], health_checks=[single])
    proc = moorline(config_http(port, [cl, cl2]))

    def hc_conns(u: TestUpstream, path: str) -> list[int]:
        return [r.conn_id for r in u.requests if r.path == path]

    wait_until(lambda: len(hc_conns(u1, "/healthz")) >= 4, "several checks")
    assert len(set(hc_conns(u1, "/healthz"))) == 1 and u1.connections_total == 1
    first = hc_conns(u1, "/healthz")[0]
    u1.close_connections()
    wait_until(lambda: len(set(hc_conns(u1, "/healthz"))) == 2, "a new connection after the close")
    wait_until(lambda: hc_conns(u1, "/healthz").count(hc_conns(u1, "/healthz")[-1]) >= 3, "reuse again")
    assert first not in hc_conns(u1, "/healthz")[-3:]
    assert flags(proc)[u1.port] == "healthy"
    # reuse_connection: false: a connection per check.
    wait_until(lambda: len(hc_conns(u2, "/once")) >= 3, "checks of the other cluster")
    once = hc_conns(u2, "/once")
    assert len(set(once)) == len(once)


def test_a_cds_cluster_warms_until_its_first_checks_and_its_connections_end_with_it(
    moorline: Any, upstreams: Callable[..., TestUpstream], tmp_path: Any
) -> None:
    import importlib.util
    from pathlib import Path

    from envoy.config.cluster.v3.cluster_pb2 import Cluster
    from envoy.config.listener.v3.listener_pb2 import Listener

    from moorline.config.loader import parse_message
    from moorline.testing import procs
    from moorline.testing.xds_server import XdsServer
    from moorline.xds.files import CLUSTER_TYPE, LISTENER_TYPE

    spec = importlib.util.spec_from_file_location(
        "xds_live", Path(__file__).parent.parent / "xds" / "test_xds_live.py"
    )
    assert spec is not None and spec.loader is not None
    live = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(live)

    a, b = upstreams(upstream_id="a"), upstreams(upstream_id="b")
    b.hold("/healthz")
    cp = XdsServer().start()
    try:
        port = free_port()
        route = [{"match": {"prefix": "/"}, "route": {"cluster": "svc"}}]
        cp.push(LISTENER_TYPE, "l1", [parse_message(procs.hcm_listener("edge", port, route), Listener)])
        cp.push(CLUSTER_TYPE, "c1", [parse_message(cluster("svc", [a.port]), Cluster)])
        proc = moorline(live.boot(tmp_path, cp.port, "sotw"))
        wait_until(lambda: ids(port, 1) == {"a"}, "v1 serves", ignore=(OSError, AssertionError))
        hc = check({"http_health_check": {"path": "/healthz"}}, timeout="30s")
        cp.push(CLUSTER_TYPE, "c2", [parse_message(cluster("svc", [b.port], health_checks=[hc]), Cluster)])
        wait_until(lambda: any(r.path == "/healthz" for r in b.requests), "the first check reaches b")
        # Warming on its first round: the old cluster serves meanwhile.
        assert proc.stat("cluster_manager.warming_clusters") == 1
        assert ids(port, 5) == {"a"}
        b.release()
        wait_until(lambda: proc.stat("cluster_manager.warming_clusters") == 0, "v2 warmed")
        # Before any request: the one connection b has is the check's, kept between checks.
        n = len([r for r in b.requests if r.path == "/healthz"])
        wait_until(lambda: len([r for r in b.requests if r.path == "/healthz"]) >= n + 2, "more checks")
        assert b.connections_active == 1 and b.connections_total == 1
        assert ids(port, 5) == {"b"}
        # The cluster goes away: its check connection closes with it (and the pool's).
        cp.push(CLUSTER_TYPE, "c3", [])
        wait_until(lambda: proc.stat("cluster_manager.active_clusters") == 1, "svc removed")
        wait_until(lambda: b.connections_active == 0, "no connection left")
    finally:
        cp.stop()


def test_immediate_health_check_fail_header_takes_a_draining_moorline_out_at_once(
    moorline: Any, upstreams: Callable[..., TestUpstream]
) -> None:
    # Two tiers: the front moorline checks a back moorline (health_check filter) and a plain
    # upstream, with intervals far longer than the test. POST /healthcheck/fail on the back one
    # makes its answers carry x-envoy-immediate-health-check-fail, and the front takes it out
    # on the first such answer, without waiting for a check.
    u1, u2 = upstreams(upstream_id="behind-b"), upstreams(upstream_id="u2")
    hcf = {
        "name": "envoy.filters.http.health_check",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.health_check.v3.HealthCheck",
            "pass_through_mode": False,
            "headers": [{"name": ":path", "string_match": {"exact": "/healthz"}}],
        },
    }
    router = {
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
    }
    bport = free_port()
    back = moorline(config_http(bport, {"svc": [u1.port]}, hcm_extra={"http_filters": [hcf, router]}))
    port = free_port()
    hc = check(
        {"http_health_check": {"path": "/healthz"}},
        interval="300s",
        no_traffic_interval="300s",
        healthy_threshold=1,
    )
    front = moorline(config_http(port, [cluster("svc", [bport, u2.port], health_checks=[hc])]))
    assert flags(front) == {bport: "healthy", u2.port: "healthy"}  # (start-up waited for the round)
    assert ids(port, 8) == {"behind-b", "u2"}
    assert back.admin_request("POST", "/healthcheck/fail").status == 200
    seen = [http_request("127.0.0.1", port, "GET", "/work") for _ in range(8)]
    # At most one answer from the back moorline got through (the one that carried the header).
    assert sum(1 for r in seen if r.header("x-upstream-id") == "behind-b") == 1
    assert flags(front)[bport] == "/failed_active_hc"
    assert front.stat("cluster.svc.health_check.healthy") == 1
    assert ids(port, 10) == {"u2"}
