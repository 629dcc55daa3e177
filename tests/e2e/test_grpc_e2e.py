"""gRPC through moorline (HTTP/2 both ways) with grpcio clients and a grpcio server: the four
call kinds, 4 MiB messages, status passthrough, local replies as trailers-only answers,
grpc-timeout, retries on gRPC status, and cancellation reaching the server."""

from __future__ import annotations

import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from moorline.testing import procs
from moorline.testing.upstream import TestUpstream

sys.path.insert(0, str(Path(__file__).parent / "grpc_svc"))
import h2_raw
from grpc_test_service import SERVICE, TestGrpcServer, channel, method

pytestmark = pytest.mark.e2e


def h2_cluster(name: str, port: int) -> dict:
    return procs.cluster(
        name,
        [port],
        typed_extension_protocol_options={
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
    )


@dataclass
class Env:
    port: int
    srv: TestGrpcServer
    proc: procs.MoorlineProc
    ch: grpc.Channel


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    srv = TestGrpcServer().start()
    h1 = TestUpstream(upstream_id="h1").start()
    port = procs.free_port()
    routes = [
        {
            # An HTTP/1.1 upstream that ignores grpc-timeout: only moorline can time it out.
            "match": {"prefix": "/delay/"},
            "route": {
                "cluster": "h1",
                "timeout": "10s",
                "max_stream_duration": {"grpc_timeout_header_max": "0s"},
            },
        },
        {
            "match": {"prefix": f"/{SERVICE}/"},
            "route": {
                "cluster": "grpc",
                "timeout": "10s",
                "max_stream_duration": {"grpc_timeout_header_max": "0s"},
                "retry_policy": {"retry_on": "unavailable", "num_retries": 3},
            },
        },
    ]
    cfg = procs.config_http(
        port, [h2_cluster("grpc", srv.port), procs.cluster("h1", [h1.port])], routes=routes
    )
    proc = procs.start_moorline(cfg, tmp_path_factory.mktemp("grpc") / "moorline")
    ch = channel(port)
    try:
        yield Env(port, srv, proc, ch)
    finally:
        ch.close()
        proc.stop()
        srv.stop()
        h1.stop()


def test_unary(env: Env) -> None:
    assert method(env.ch, "Unary", "uu")(b"hello", timeout=10) == b"hello"


def test_client_streaming(env: Env) -> None:
    msgs = [bytes([i]) * (i * 100) for i in range(1, 60)]
    got = method(env.ch, "ClientStream", "su")(iter(msgs), timeout=10)
    assert got == b"%d:%d" % (len(msgs), sum(len(m) for m in msgs))


def test_server_streaming(env: Env) -> None:
    got = list(method(env.ch, "ServerStream", "us")(b"40:65536", timeout=10))
    assert len(got) == 40
    assert all(m == bytes([i]) * 65536 for i, m in enumerate(got))


def test_bidi_streaming(env: Env) -> None:
    msgs = [b"m%d" % i * (i + 1) for i in range(30)]
    assert list(method(env.ch, "Bidi", "ss")(iter(msgs), timeout=10)) == msgs


def test_four_mib_messages_both_ways(env: Env) -> None:
    big = bytes(range(256)) * (4 * 1024 * 1024 // 256 - 64)
    assert method(env.ch, "Unary", "uu")(big, timeout=20) == big


def test_status_from_server_passes_through(env: Env) -> None:
    with pytest.raises(grpc.RpcError) as ei:
        method(env.ch, "Unary", "uu")(b"status:7", timeout=10)
    assert ei.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_no_route_is_unimplemented_trailers_only(env: Env) -> None:
    with pytest.raises(grpc.RpcError) as ei:
        env.ch.unary_unary("/other.Svc/Nope")(b"x", timeout=10)
    assert ei.value.code() == grpc.StatusCode.UNIMPLEMENTED
    r = h2_raw.request(
        env.port,
        b"/other.Svc/Nope",
        b"POST",
        [(b"content-type", b"application/grpc"), (b"te", b"trailers")],
        b"\x00\x00\x00\x00\x01x",
    )
    assert r.status == 200
    assert r.header(b"grpc-status") == b"12"
    assert r.data == b"" and r.trailers == []  # trailers-only: everything in one HEADERS frame


def test_grpc_timeout_is_the_route_timeout_and_answers_deadline_exceeded(env: Env) -> None:
    # Envoy answers router timeouts of gRPC requests DEADLINE_EXCEEDED since envoyproxy/envoy#44479
    # (before: 504 -> UNAVAILABLE). The upstream is HTTP/1.1 and ignores grpc-timeout, and the
    # route timeout is 10 s: only the 200 ms grpc-timeout can end this call.
    before = env.proc.stat("cluster.h1.upstream_rq_timeout")
    r = h2_raw.request(
        env.port,
        b"/delay/5000",
        b"POST",
        [(b"content-type", b"application/grpc"), (b"te", b"trailers"), (b"grpc-timeout", b"200m")],
        b"\x00" + struct.pack(">I", 1) + b"x",
    )
    assert r.status == 200
    assert r.header(b"grpc-status") == b"4"
    assert r.header(b"grpc-message") == b"upstream request timeout"
    assert env.proc.stat("cluster.h1.upstream_rq_timeout") == before + 1


def test_trailers_only_unavailable_is_retried(env: Env) -> None:
    before = env.proc.stat("cluster.grpc.upstream_rq_retry")
    assert method(env.ch, "Unary", "uu")(b"flaky:retry1:2", timeout=10) == b"flaky:retry1:2"
    assert env.proc.stat("cluster.grpc.upstream_rq_retry") == before + 2


def test_cancellation_reaches_the_server(env: Env) -> None:
    env.srv.cancelled.clear()
    env.srv.hang_started.clear()
    before = env.proc.stat("cluster.grpc.http2.tx_reset")
    fut = method(env.ch, "Hang", "uu").future(b"x", timeout=15)
    assert env.srv.hang_started.wait(10)
    fut.cancel()
    assert env.srv.cancelled.wait(10), "the upstream server never saw the cancellation"
    assert env.proc.stat("cluster.grpc.http2.tx_reset") >= before + 1
    assert env.proc.stat("http2.rx_reset") >= 1


def test_stats(env: Env) -> None:
    assert method(env.ch, "Unary", "uu")(b"s", timeout=10) == b"s"
    assert env.proc.stat("http.listener_http.downstream_cx_http2_total") >= 1
    assert env.proc.stat("http.listener_http.downstream_rq_http2_total") >= 1
    assert env.proc.stat("cluster.grpc.upstream_cx_http2_total") >= 1
