"""The overload manager in a real moorline process: the global downstream connection limit
refuses the connections over it, and stop_accepting_requests, triggered by the downstream
connections monitor at a low limit, answers 503 OL; both recover when the pressure goes."""

from __future__ import annotations

import functools
import http.client
import re
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from moorline.testing.procs import (
    config_http,
    free_port,
    http_request,
    require_binary,
    wait_for_log,
    wait_until,
)
from moorline.testing.upstream import TestUpstream

pytestmark = pytest.mark.e2e

CX = "envoy.resource_monitors.downstream_connections"
STOP = "envoy.overload_actions.stop_accepting_requests"


def _monitor(n: int) -> dict[str, Any]:
    return {
        "name": CX,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3."
            "DownstreamConnectionsConfig",
            "max_active_downstream_connections": n,
        },
    }


def _config(port: int, upstream: TestUpstream, overload: dict[str, Any], log: Path | None = None) -> str:
    doc = yaml.safe_load(config_http(port, {"svc": [upstream.port]}, access_log_path=log))
    doc["overload_manager"] = overload
    return yaml.safe_dump(doc, sort_keys=False)


_wait = functools.partial(wait_until, timeout=10.0, interval=0.02)


def _keepalive_get(c: http.client.HTTPConnection, path: str = "/") -> tuple[int, bytes]:
    c.request("GET", path)
    r = c.getresponse()
    return r.status, r.read()


def test_downstream_connection_limit_refuses_the_extra_connections(
    moorline: Any, upstream: TestUpstream
) -> None:
    port = free_port()
    proc = moorline(
        _config(port, upstream, {"refresh_interval": "0.05s", "resource_monitors": [_monitor(2)]})
    )
    overflow = f"listener.127.0.0.1_{port}.downstream_cx_overflow"
    held = [http.client.HTTPConnection("127.0.0.1", port, timeout=10) for _ in range(2)]
    for c in held:
        assert _keepalive_get(c)[0] == 200  # accepted and counted
    refused = []
    for _ in range(3):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
        try:
            data = s.recv(65536)
        except ConnectionResetError:
            data = b""
        refused.append(data)
        s.close()
    assert refused == [b"", b"", b""]  # closed without an answer
    assert proc.stat(overflow) == 3
    _wait(lambda: proc.stat(f"overload.{CX}.pressure") == 100, "pressure 100")
    # The held connections keep working; one closes and a new one is accepted in its place.
    assert _keepalive_get(held[0])[0] == 200
    held[1].close()
    _wait(lambda: proc.stat(f"listener.127.0.0.1_{port}.downstream_cx_active") == 1, "the close")
    assert http_request("127.0.0.1", port, "GET", "/").status == 200
    assert proc.stat(overflow) == 3
    held[0].close()


def test_stop_accepting_requests_answers_503_ol_under_connection_pressure(
    moorline: Any, upstream: TestUpstream, tmp_path: Path
) -> None:
    port = free_port()
    log = tmp_path / "access.log"
    ov = {
        "refresh_interval": "0.05s",
        "resource_monitors": [_monitor(4)],
        "actions": [{"name": STOP, "triggers": [{"name": CX, "threshold": {"value": 0.5}}]}],
    }
    proc = moorline(_config(port, upstream, ov, log))
    a = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    assert _keepalive_get(a)[0] == 200  # one connection: pressure 0.25
    b = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    b.connect()  # two: pressure 0.5, the action saturates at the next refresh
    _wait(lambda: proc.stat(f"overload.{STOP}.active") == 1, "the action")
    seen = len(upstream.requests)
    status, body = _keepalive_get(a, "/shed")
    assert (status, body) == (503, b"envoy overloaded")
    assert len(upstream.requests) == seen  # never went upstream
    assert "code=503 flags=OL method=GET path=/shed upstream=-" in wait_for_log(log, "path=/shed")
    assert proc.stat("http.listener_http.downstream_rq_overload_close") == 1
    b.close()
    _wait(lambda: proc.stat(f"overload.{STOP}.active") == 0, "the action to clear")
    assert _keepalive_get(a, "/again")[0] == 200
    a.close()


def test_stop_accepting_connections_closes_new_connections(moorline: Any, upstream: TestUpstream) -> None:
    port = free_port()
    ov = {
        "refresh_interval": "0.05s",
        "resource_monitors": [_monitor(10)],
        "actions": [
            {
                "name": "envoy.overload_actions.stop_accepting_connections",
                "triggers": [{"name": CX, "threshold": {"value": 0.2}}],
            }
        ],
    }
    proc = moorline(_config(port, upstream, ov))
    held = [http.client.HTTPConnection("127.0.0.1", port, timeout=10) for _ in range(2)]
    for c in held:
        assert _keepalive_get(c)[0] == 200
    _wait(
        lambda: proc.stat("overload.envoy.overload_actions.stop_accepting_connections.active") == 1,
        "the action",
    )
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
    try:
        data = s.recv(65536)
    except ConnectionResetError:
        data = b""
    s.close()
    assert data == b""
    assert proc.stat(f"listener.127.0.0.1_{port}.downstream_cx_overload_reject") == 1
    assert _keepalive_get(held[0])[0] == 200  # live connections keep being served
    for c in held:
        c.close()
    _wait(
        lambda: proc.stat("overload.envoy.overload_actions.stop_accepting_connections.active") == 0, "clear"
    )
    assert http_request("127.0.0.1", port, "GET", "/").status == 200


def test_disable_http_keepalive_drains_http2_connections_with_goaway(
    moorline: Any, upstream: TestUpstream
) -> None:
    """nghttp (nghttp2's client) sends two requests on one connection while the action is
    active: after a response it gets a GOAWAY naming the last stream, and both streams finish."""
    keepalive = "envoy.overload_actions.disable_http_keepalive"
    port = free_port()
    ov = {
        "refresh_interval": "0.05s",
        "resource_monitors": [_monitor(10)],
        "actions": [{"name": keepalive, "triggers": [{"name": CX, "threshold": {"value": 0.2}}]}],
    }
    proc = moorline(_config(port, upstream, ov))
    held = [http.client.HTTPConnection("127.0.0.1", port, timeout=10) for _ in range(2)]
    for c in held:
        c.connect()
    _wait(lambda: proc.stat(f"overload.{keepalive}.active") == 1, "the action")
    out = subprocess.run(
        [
            require_binary("nghttp"),
            "-nv",
            f"http://127.0.0.1:{port}/delay/300",
            f"http://127.0.0.1:{port}/fast",
        ],
        capture_output=True,
        timeout=30,
        check=True,
        text=True,
    ).stdout
    # nghttp opens idle streams for its priority tree first: the request streams are the two
    # answered ones.
    answered = sorted({int(n) for n in re.findall(r"recv \(stream_id=(\d+)\) :status: 200", out)})
    assert len(answered) == 2, out
    goaway = re.findall(r"recv GOAWAY frame .*\n\s*\(last_stream_id=(\d+), error_code=(\w+)", out)
    assert goaway == [(str(answered[-1]), "NO_ERROR")], out
    # Both streams ended, the one still in flight at the GOAWAY included.
    ended = re.findall(r"recv (?:DATA|HEADERS) frame <[^>]*stream_id=(\d+)>\n\s*; END_STREAM", out)
    assert sorted({int(n) for n in ended}) == answered, out
    assert sorted(r.path for r in upstream.requests[-2:]) == ["/delay/300", "/fast"]
    assert proc.stat("http.listener_http.downstream_cx_overload_disable_keepalive") >= 1
    assert proc.stat("http2.goaway_sent") == 1
    for c in held:
        c.close()
