"""Breaking real backends behind one moorline cluster: a backend SIGKILLed in the middle of a
response it is streaming (nginx with ``limit_rate``), and a backend that turns slow. The client
caught mid-stream gets a cut response, not a hang; every later request lands on the healthy
backends (retries, then outlier ejection); the access log and stats say what happened. The
other two ways of breaking a backend, 5xx answers and a blackhole port, are in
tests/upstream/test_outlier_e2e.py, tests/e2e/test_health_check_e2e.py and
tests/e2e/test_resilience_clients.py. Assertions are on outcomes and counts, not durations."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from moorline.testing import procs
from moorline.testing.procs import cluster, config_http, free_port, http_request, wait_for_log, wait_until
from moorline.testing.upstream import TestUpstream

pytestmark = pytest.mark.e2e

BIG = 4 * 1024 * 1024
OD = "cluster.svc.outlier_detection."


def _retry_routes(**route: Any) -> list[dict[str, Any]]:
    return [
        {
            "match": {"prefix": "/"},
            "route": {
                "cluster": "svc",
                "timeout": "20s",
                "retry_policy": {
                    "retry_on": "connect-failure,reset,5xx",
                    "num_retries": 3,
                    "retry_host_predicate": [
                        {
                            "name": "envoy.retry_host_predicates.previous_hosts",
                            "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
                            },
                        }
                    ],
                    "host_selection_retry_max_attempts": 5,
                    **route,
                },
            },
        }
    ]


def _od(**kw: Any) -> dict[str, Any]:
    return {
        "consecutive_5xx": 1000,
        "consecutive_gateway_failure": 2,
        "enforcing_consecutive_gateway_failure": 100,
        "base_ejection_time": "60s",
        "max_ejection_percent": 34,
        **kw,
    }


def _nginx_backend(tmp_path: Path, name: str, big: Path) -> tuple[procs.NginxProc, int]:
    port = free_port()
    conf = f"""
    server {{
        listen 127.0.0.1:{port};
        add_header x-backend {name} always;
        location = /big {{ alias {big}; limit_rate 256k; default_type application/octet-stream; }}
        location / {{ return 200 "{name}\\n"; }}
    }}
    """
    return procs.start_nginx(tmp_path, conf, port), port


def _open_big_on(port: int, backend: str, tries: int = 12) -> tuple[socket.socket, bytes]:
    """GET /big until the answer comes from ``backend`` (round robin spreads them); returns the
    socket with the head and the first body bytes read."""
    for _ in range(tries):
        s = socket.create_connection(("127.0.0.1", port), timeout=20)
        s.sendall(b"GET /big HTTP/1.1\r\nHost: svc\r\n\r\n")
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            assert chunk, buf
            buf += chunk
        if f"x-backend: {backend}".encode() in buf.lower():
            return s, buf
        s.close()
    raise AssertionError(f"no /big answer came from {backend}")


@pytest.fixture
def nginx_backends(tmp_path: Path) -> Iterator[dict[str, tuple[procs.NginxProc, int]]]:
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(256)) * (BIG // 256))
    backends: dict[str, tuple[procs.NginxProc, int]] = {}
    try:
        for name in ("b1", "b2", "b3"):
            backends[name] = _nginx_backend(tmp_path, name, big)
        yield backends
    finally:
        for proc, _ in backends.values():
            proc.stop()


def test_backend_killed_mid_stream(
    moorline: Any, tmp_path: Path, nginx_backends: dict[str, tuple[procs.NginxProc, int]]
) -> None:
    backends = nginx_backends
    port = free_port()
    log = tmp_path / "access.log"
    ports = [p for _, p in backends.values()]
    cb = {"thresholds": [{"max_retries": 1024}]}
    ml = moorline(
        config_http(
            port,
            [cluster("svc", ports, outlier_detection=_od(), circuit_breakers=cb)],
            routes=_retry_routes(),
            access_log_path=log,
        )
    )
    s, head = _open_big_on(port, "b3")
    assert b"200 OK" in head.split(b"\r\n", 1)[0] and f"content-length: {BIG}".encode() in head.lower()
    received = len(head.split(b"\r\n\r\n", 1)[1])
    proc3, _ = backends["b3"]
    proc3.stop(sig=9)  # SIGKILL, master and worker: the upstream connection just dies
    # The client sees its response cut (the connection ends before Content-Length), not a hang.
    while True:
        chunk = s.recv(1 << 16)
        if not chunk:
            break
        received += len(chunk)
    s.close()
    assert received < BIG
    assert "code=200 flags=UR" in wait_for_log(log, "flags=UR")
    # Every later request is served, by b1 and b2: retries first, then b3's ejection.
    got = [http_request("127.0.0.1", port, "GET", "/") for _ in range(30)]
    assert all(r.status == 200 for r in got), [r.status for r in got]
    assert {r.body for r in got} == {b"b1\n", b"b2\n"}
    wait_until(lambda: ml.stat(OD + "ejections_active") == 1, "b3's ejection")
    assert ml.stat(OD + "ejections_enforced_consecutive_gateway_failure") == 1
    flags = ml.admin_get("/clusters").body.decode()
    assert f"svc::127.0.0.1:{backends['b3'][1]}::health_flags::/failed_outlier_check" in flags
    assert ml.stat("cluster.svc.upstream_cx_destroy_remote_with_active_rq") == 1


def test_a_backend_that_turns_slow_is_timed_out_retried_and_ejected(
    moorline: Any, upstreams: Callable[..., TestUpstream]
) -> None:
    # Only the slow one honours x-test-delay-ms: every request asks for a 5 s delay, so only
    # it is slow. per_try_timeout retries elsewhere; each timeout is a gateway failure.
    fast1, fast2 = upstreams(upstream_id="f1"), upstreams(upstream_id="f2")
    fast1.ignore_delay_header = fast2.ignore_delay_header = True
    slow = upstreams(upstream_id="slow")
    port = free_port()
    ml = moorline(
        config_http(
            port,
            [cluster("svc", [fast1.port, slow.port, fast2.port], outlier_detection=_od())],
            routes=_retry_routes(per_try_timeout="0.5s"),
        )
    )
    got = [
        http_request("127.0.0.1", port, "GET", "/", headers={"x-test-delay-ms": "5000"}) for _ in range(12)
    ]
    assert all(r.status == 200 for r in got), [r.status for r in got]
    assert {r.header("x-upstream-id") for r in got} == {"f1", "f2"}
    wait_until(lambda: ml.stat(OD + "ejections_active") == 1, "the slow backend's ejection")
    assert ml.stat(OD + "ejections_enforced_consecutive_gateway_failure") == 1
    assert ml.stat("cluster.svc.upstream_rq_per_try_timeout") == 2  # then it was ejected
    flags = ml.admin_get("/clusters").body.decode()
    assert f"svc::127.0.0.1:{slow.port}::health_flags::/failed_outlier_check" in flags
