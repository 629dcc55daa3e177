"""The resilience mechanisms under real load generators and RPC clients: wrk against the local
rate limiter and a circuit breaker (its report is compared with moorline's stats), and grpcio
calls that keep succeeding while one of two gRPC servers is killed (retries move them, outlier
detection ejects the dead host). Counts, never durations."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from moorline.testing.procs import cluster, config_http, free_port, require_binary, wait_until
from moorline.testing.upstream import TestUpstream

sys.path.insert(0, str(Path(__file__).parent / "grpc_svc"))
from grpc_test_service import SERVICE, TestGrpcServer, channel, method

pytestmark = pytest.mark.e2e

ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
}
ALL = {"default_value": {"numerator": 100}, "runtime_key": "rl"}


def wrk(port: int, path: str, connections: int, seconds: int = 2) -> dict[str, int]:
    """Run wrk; requests completed and non-2xx/3xx answers from its report (socket errors must
    be none: every answer is an HTTP answer)."""
    out = subprocess.run(
        [require_binary("wrk"), "-t1", f"-c{connections}", f"-d{seconds}s", f"http://127.0.0.1:{port}{path}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "Socket errors" not in text, text
    m = re.search(r"(\d+) requests in", text)
    assert m, text
    n = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return {"requests": int(m.group(1)), "non_2xx": int(n.group(1)) if n else 0}


def test_wrk_against_the_local_rate_limiter(moorline: Any, upstream: TestUpstream) -> None:
    port = free_port()
    rl = {
        "name": "envoy.filters.http.local_ratelimit",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
            "stat_prefix": "edge",
            "token_bucket": {"max_tokens": 20, "tokens_per_fill": 20, "fill_interval": "3600s"},
            "filter_enabled": ALL,
            "filter_enforced": ALL,
        },
    }
    proc = moorline(config_http(port, {"svc": [upstream.port]}, hcm_extra={"http_filters": [rl, ROUTER]}))
    r = wrk(port, "/", connections=4)
    # The bucket never refills during the run: exactly its 20 tokens were served, everything
    # else wrk sent was answered 429 by moorline and never reached the upstream.
    assert r["requests"] - r["non_2xx"] == 20
    assert r["non_2xx"] > 0
    assert len(upstream.requests) == 20
    assert proc.stat("edge.http_local_rate_limit.ok") == 20
    limited = proc.stat("edge.http_local_rate_limit.rate_limited")
    # wrk stops with up to one request per connection in flight, answered but not counted.
    assert r["non_2xx"] <= limited <= r["non_2xx"] + 4


def test_wrk_against_a_circuit_breaker(moorline: Any, upstream: TestUpstream) -> None:
    port = free_port()
    cb = {"thresholds": [{"max_requests": 2, "max_pending_requests": 1, "max_connections": 2}]}
    proc = moorline(config_http(port, [cluster("svc", [upstream.port], circuit_breakers=cb)]))
    r = wrk(port, "/delay/20", connections=16)
    assert r["non_2xx"] > 0 and r["requests"] > r["non_2xx"]
    # The upstream only answers 200: every non-2xx wrk saw is moorline's overflow 503.
    overflow = proc.stat("cluster.svc.upstream_rq_pending_overflow")
    assert r["non_2xx"] <= overflow <= r["non_2xx"] + 16
    assert proc.stat("cluster.svc.upstream_cx_total") <= 2  # max_connections held
    assert all(x.path == "/delay/20" for x in upstream.requests)
    wait_until(lambda: proc.stat("cluster.svc.upstream_rq_active") == 0, "the last requests to end")
    assert proc.stat("cluster.svc.circuit_breakers.default.rq_open") == 0


def _grpc_cluster(ports: list[int], **od: Any) -> dict[str, Any]:
    return cluster(
        "grpc",
        ports,
        typed_extension_protocol_options={
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        outlier_detection={
            "consecutive_5xx": 1000,
            "enforcing_consecutive_gateway_failure": 100,
            "base_ejection_time": "60s",
            "max_ejection_percent": 50,
            **od,
        },
    )


def _grpc_routes(retry_on: str) -> list[dict[str, Any]]:
    return [
        {
            "match": {"prefix": f"/{SERVICE}/"},
            "route": {
                "cluster": "grpc",
                "timeout": "10s",
                "retry_policy": {
                    "retry_on": retry_on,
                    "num_retries": 3,
                    "retry_host_predicate": [
                        {
                            "name": "envoy.retry_host_predicates.previous_hosts",
                            "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
                            },
                        }
                    ],
                    "host_selection_retry_max_attempts": 3,
                },
            },
        }
    ]


class UnavailableServer(TestGrpcServer):
    """Answers every unary call UNAVAILABLE (a trailers-only answer: HTTP 200, grpc-status 14)."""

    def unary(self, req: bytes, ctx: Any) -> bytes:
        with self.lock:
            self.calls["all"] = self.calls.get("all", 0) + 1
        ctx.abort(grpc.StatusCode.UNAVAILABLE, "down for maintenance")
        return b""


def test_grpc_unavailable_answers_eject_the_host(moorline: Any) -> None:
    # HTTP 200 with grpc-status 14: outlier detection counts it as the 503 it stands for
    # (Envoy's grpcToHttpStatus), so the host is ejected as a gateway failure.
    good, bad = TestGrpcServer().start(), UnavailableServer().start()
    port = free_port()
    proc = moorline(
        config_http(
            port,
            [_grpc_cluster([good.port, bad.port], consecutive_gateway_failure=3)],
            routes=_grpc_routes("unavailable"),
        )
    )
    ch = channel(port)
    try:
        unary = method(ch, "Unary", "uu")
        got = [unary(b"c%d" % i, timeout=10) for i in range(30)]
        assert got == [b"c%d" % i for i in range(30)]  # retried on the good server
        od = "cluster.grpc.outlier_detection."
        wait_until(lambda: proc.stat(od + "ejections_active") == 1, "the UNAVAILABLE server's ejection")
        assert proc.stat(od + "ejections_enforced_consecutive_gateway_failure") == 1
        assert proc.stat(od + "ejections_enforced_consecutive_5xx") == 0
        assert bad.calls["all"] == 3  # no call reached it after the third failure
        assert f"grpc::127.0.0.1:{bad.port}::health_flags::/failed_outlier_check" in (
            proc.admin_get("/clusters").body.decode()
        )
    finally:
        ch.close()
        good.stop()
        bad.stop()


@pytest.fixture
def two_grpc_servers() -> Iterator[tuple[TestGrpcServer, TestGrpcServer]]:
    a, b = TestGrpcServer().start(), TestGrpcServer().start()
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


def test_grpc_calls_survive_a_killed_server(
    moorline: Any, two_grpc_servers: tuple[TestGrpcServer, TestGrpcServer]
) -> None:
    a, b = two_grpc_servers
    port = free_port()
    c = _grpc_cluster([a.port, b.port], consecutive_gateway_failure=2)
    routes = _grpc_routes("connect-failure,reset,unavailable")
    proc = moorline(config_http(port, [c], routes=routes))
    ch = channel(port)
    try:
        unary = method(ch, "Unary", "uu")
        assert [unary(b"warm%d" % i, timeout=10) for i in range(4)] == [b"warm%d" % i for i in range(4)]
        assert proc.stat("cluster.grpc.upstream_cx_total") == 2  # both servers took calls
        b.stop()
        got = [unary(b"call%d" % i, timeout=10) for i in range(40)]
        assert got == [b"call%d" % i for i in range(40)]  # not one call failed
        od = "cluster.grpc.outlier_detection."
        wait_until(lambda: proc.stat(od + "ejections_active") == 1, "the dead server's ejection")
        assert proc.stat(od + "ejections_enforced_consecutive_gateway_failure") == 1
        flags = proc.admin_get("/clusters").body.decode()
        assert f"grpc::127.0.0.1:{b.port}::health_flags::/failed_outlier_check" in flags
        assert f"grpc::127.0.0.1:{a.port}::health_flags::healthy" in flags
        assert proc.stat("cluster.grpc.upstream_rq_retry") >= 1
    finally:
        ch.close()
