"""envoy.filters.http.fault through a real moorline, the test upstream and real clients
(http.client, grpcio): aborts (HTTP and gRPC), a delay (ordered against what the upstream saw
and the DI flag in the access log), a per-route override and header-controlled faults."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from moorline.testing import procs
from moorline.testing.upstream import TestUpstream, pattern_bytes

sys.path.insert(0, str(Path(__file__).parents[1] / "e2e" / "grpc_svc"))
from grpc_test_service import SERVICE, TestGrpcServer, channel, method

pytestmark = pytest.mark.e2e

FAULT_TYPE = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
}
P100 = {"numerator": 100}


def per_route(**cfg: Any) -> dict[str, Any]:
    return {"envoy.filters.http.fault": {"@type": FAULT_TYPE, **cfg}}


@dataclass
class Env:
    port: int
    proc: procs.MoorlineProc
    up: TestUpstream
    log: Path
    ch: grpc.Channel


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("fault")
    up = TestUpstream(upstream_id="fault-up").start()
    srv = TestGrpcServer().start()
    port, admin = procs.free_port(), procs.free_port()
    log = tmp / "access.log"
    grpc_cluster = procs.cluster(
        "grpc",
        [srv.port],
        typed_extension_protocol_options={
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
    )
    routes = [
        {
            "match": {"prefix": "/bytes/", "headers": [{"name": "x-throttle", "present_match": True}]},
            "route": {"cluster": "svc"},
            "typed_per_filter_config": per_route(
                response_rate_limit={"fixed_limit": {"limit_kbps": 64}, "percentage": P100}
            ),
        },
        {
            "match": {"prefix": "/abort"},
            "route": {"cluster": "svc"},
            "typed_per_filter_config": per_route(abort={"http_status": 503, "percentage": P100}),
        },
        {
            "match": {"prefix": f"/{SERVICE}/"},
            "route": {"cluster": "grpc", "timeout": "10s"},
            "typed_per_filter_config": per_route(
                abort={"grpc_status": 14, "percentage": P100},
                headers=[{"name": "x-grpc-fault", "present_match": True}],
            ),
        },
        {"match": {"prefix": "/"}, "route": {"cluster": "svc"}},
    ]
    # Filter level: header-controlled delays and aborts (what the other routes get).
    fault = {
        "name": "envoy.filters.http.fault",
        "typed_config": {
            "@type": FAULT_TYPE,
            "delay": {"header_delay": {}, "percentage": P100},
            "abort": {"header_abort": {}, "percentage": P100},
        },
    }
    cfg = procs.config_http(
        port,
        [procs.cluster("svc", [up.port]), grpc_cluster],
        routes=routes,
        hcm_extra={"http_filters": [fault, ROUTER]},
        access_log_path=log,
        admin_port=admin,
    )
    proc = procs.start_moorline(cfg, tmp / "moorline")
    ch = channel(port)
    try:
        yield Env(port, proc, up, log, ch)
    finally:
        ch.close()
        proc.stop()
        srv.stop()
        up.stop()


def test_response_rate_limit_delivers_the_whole_body_in_slices(env: Env) -> None:
    stat = "http.listener_http.fault.response_rl_injected"
    before = env.proc.stat(stat)
    out = subprocess.run(
        [
            procs.require_binary("curl"),
            "-sS",
            "-H",
            "x-throttle: 1",
            f"http://127.0.0.1:{env.port}/bytes/65536",
        ],
        capture_output=True,
        timeout=60,
        check=True,
    ).stdout
    assert out == pattern_bytes(65536)
    assert env.proc.stat(stat) == before + 1
    # A raw client sees the body arrive over several reads (released 4 KiB at a time).
    s = socket.create_connection(("127.0.0.1", env.port), timeout=30)
    try:
        s.sendall(b"GET /bytes/65536 HTTP/1.1\r\nhost: a\r\nx-throttle: 1\r\nconnection: close\r\n\r\n")
        data, reads = b"", 0
        while chunk := s.recv(1 << 20):
            data += chunk
            reads += 1
    finally:
        s.close()
    assert data.endswith(b"\r\n\r\n" + pattern_bytes(65536))
    assert reads >= 2
    assert env.proc.stat(stat) == before + 2
    # Unthrottled (no header): the same route table answers at once, and nothing is counted.
    r = get(env, "/bytes/65536")
    assert r.status == 200 and r.body == pattern_bytes(65536)
    assert env.proc.stat(stat) == before + 2
    procs.wait_until(lambda: env.proc.stat("http.listener_http.fault.active_faults") == 0, "faults freed")


def get(env: Env, path: str, headers: dict[str, str] | None = None) -> procs.HttpResult:
    return procs.http_request("127.0.0.1", env.port, "GET", path, headers=headers)


def test_per_route_abort_503(env: Env) -> None:
    n = len(env.up.requests)
    r = get(env, "/abort/x")
    assert r.status == 503 and r.body == b"fault filter abort"
    assert len(env.up.requests) == n  # nothing reached the upstream
    line = procs.wait_for_log(env.log, "path=/abort/x ")
    assert "code=503" in line and "flags=FI" in line
    # The other routes keep the filter-level (header-controlled) config: no header, no fault.
    r = get(env, "/plain")
    assert r.status == 200
    assert env.up.requests[-1].path == "/plain"


def test_grpc_abort_is_a_grpc_status(env: Env) -> None:
    call = method(env.ch, "Unary", "uu")
    # Without the matching header the route's fault does not apply.
    assert call(b"hello", timeout=10) == b"hello"
    with pytest.raises(grpc.RpcError) as e:
        call(b"hello", timeout=10, metadata=(("x-grpc-fault", "1"),))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert e.value.details() == "fault filter abort"


def test_header_abort(env: Env) -> None:
    n = len(env.up.requests)
    r = get(env, "/h/abort", {"x-envoy-fault-abort-request": "418"})
    assert r.status == 418
    r = get(
        env,
        "/h/abort2",
        {"x-envoy-fault-abort-request": "418", "x-envoy-fault-abort-request-percentage": "0"},
    )
    assert r.status == 200
    assert [q.path for q in env.up.requests[n:]] == ["/h/abort2"]
    assert env.proc.stat("http.listener_http.fault.aborts_injected") >= 2


def test_header_delay_holds_the_request_before_the_upstream(env: Env) -> None:
    prefix = "http.listener_http.fault."
    before = env.proc.stat(prefix + "delays_injected")
    n = len(env.up.requests)
    result: dict[str, Any] = {}

    def client() -> None:
        result["r"] = get(env, "/delayed", {"x-envoy-fault-delay-request": "3000"})

    t = threading.Thread(target=client)
    t.start()
    try:
        # Wait for the delay to begin (the filter counted it and holds one active fault) ...
        deadline = time.monotonic() + 10
        while env.proc.stat(prefix + "delays_injected") == before:
            assert time.monotonic() < deadline, "the delay never started"
            time.sleep(0.02)
        assert env.proc.stat(prefix + "active_faults") == 1
        # ... while it lasts, the upstream has not seen the request.
        assert [q.path for q in env.up.requests[n:]] == []
    finally:
        t.join(20)
    assert result["r"].status == 200
    # After the delay the request went upstream, and the access log says it was delayed.
    assert [q.path for q in env.up.requests[n:]] == ["/delayed"]
    line = procs.wait_for_log(env.log, "path=/delayed ")
    assert "flags=DI" in line and "code=200" in line
    assert env.proc.stat(prefix + "active_faults") == 0


def test_client_gone_during_delay_frees_the_fault(env: Env) -> None:
    import socket

    prefix = "http.listener_http.fault."
    before = env.proc.stat(prefix + "delays_injected")
    n = len(env.up.requests)
    s = socket.create_connection(("127.0.0.1", env.port), timeout=10)
    s.sendall(b"GET /gone HTTP/1.1\r\nhost: a\r\nx-envoy-fault-delay-request: 60000\r\n\r\n")
    deadline = time.monotonic() + 10
    while env.proc.stat(prefix + "delays_injected") == before:
        assert time.monotonic() < deadline, "the delay never started"
        time.sleep(0.02)
    s.close()
    while env.proc.stat(prefix + "active_faults") != 0:
        assert time.monotonic() < deadline, "the fault outlived its client"
        time.sleep(0.02)
    line = procs.wait_for_log(env.log, "path=/gone ")
    assert "DI" in line and "DC" in line
    assert [q.path for q in env.up.requests[n:]] == []
