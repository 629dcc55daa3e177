"""The HTTP filter chain with real filters (envoy.filters.http.buffer, .health_check) in front
of the router: STOP_ITERATION holding headers and data, continuing with the buffered body, local
replies from a filter, per-route filter config, and a filter reading server state."""

from __future__ import annotations

import hashlib
import socket
from typing import Any

import pytest

from moorline.testing.procs import config_http, free_port, http_request
from moorline.testing.upstream import TestUpstream

pytestmark = pytest.mark.e2e

ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
}


def _buffer(max_bytes: int) -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.buffer",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
            "max_request_bytes": max_bytes,
        },
    }


def _health(pass_through: bool) -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.health_check",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.health_check.v3.HealthCheck",
            "pass_through_mode": pass_through,
            "headers": [{"name": ":path", "string_match": {"exact": "/healthz"}}],
        },
    }


def _chunked_post(port: int, path: str, chunks: list[bytes]) -> bytes:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n".encode() + body)
    out = b""
    while b"\r\n\r\n" not in out:
        out += s.recv(65536)
    s.close()
    return out


def test_buffer_filter_forwards_whole_body_with_length(moorline: Any, upstream: TestUpstream) -> None:
    port = free_port()
    routes = [
        {
            "match": {"prefix": "/stream"},
            "route": {"cluster": "svc"},
            "typed_per_filter_config": {
                "envoy.filters.http.buffer": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.BufferPerRoute",
                    "disabled": True,
                }
            },
        },
        {"match": {"prefix": "/"}, "route": {"cluster": "svc"}},
    ]
    cfg = config_http(
        port, {"svc": [upstream.port]}, routes=routes, hcm_extra={"http_filters": [_buffer(100_000), ROUTER]}
    )
    moorline(cfg)
    chunks = [bytes([65 + i]) * 1000 for i in range(20)]
    head = _chunked_post(port, "/upload", chunks)
    assert head.startswith(b"HTTP/1.1 200")
    rec = upstream.requests[-1]
    # The filter held the stream until the body was complete, then forwarded it with a length.
    assert rec.header("content-length") == "20000"
    assert rec.header("transfer-encoding") is None
    assert rec.sha256 == hashlib.sha256(b"".join(chunks)).hexdigest()
    # Over the limit: 413 from the filter, nothing reaches the upstream.
    n = len(upstream.requests)
    head = _chunked_post(port, "/upload", [b"x" * 60_000, b"y" * 60_000])
    assert head.startswith(b"HTTP/1.1 413")
    assert len(upstream.requests) == n
    # Disabled per route: streamed through chunked, untouched.
    head = _chunked_post(port, "/stream", chunks)
    assert head.startswith(b"HTTP/1.1 200")
    assert upstream.requests[-1].header("transfer-encoding") == "chunked"


def test_health_check_filter_follows_server_health(moorline: Any, upstream: TestUpstream) -> None:
    port = free_port()
    cfg = config_http(port, {"svc": [upstream.port]}, hcm_extra={"http_filters": [_health(False), ROUTER]})
    proc = moorline(cfg)
    r = http_request("127.0.0.1", port, "GET", "/healthz")
    assert r.status == 200
    assert r.header("x-envoy-upstream-healthchecked-cluster") is not None
    assert not any(rec.path == "/healthz" for rec in upstream.requests)  # answered locally
    assert http_request("127.0.0.1", port, "GET", "/other").status == 200  # not a health check
    assert proc.admin_post("/healthcheck/fail").status == 200
    assert http_request("127.0.0.1", port, "GET", "/healthz").status == 503
    assert proc.admin_post("/healthcheck/ok").status == 200
    assert http_request("127.0.0.1", port, "GET", "/healthz").status == 200


def test_health_check_pass_through(moorline: Any, upstream: TestUpstream) -> None:
    port = free_port()
    cfg = config_http(port, {"svc": [upstream.port]}, hcm_extra={"http_filters": [_health(True), ROUTER]})
    proc = moorline(cfg)
    assert http_request("127.0.0.1", port, "GET", "/healthz").status == 200
    assert upstream.requests[-1].path == "/healthz"  # passed through to the upstream
    proc.admin_post("/healthcheck/fail")
    n = len(upstream.requests)
    assert http_request("127.0.0.1", port, "GET", "/healthz").status == 503
    assert len(upstream.requests) == n


def test_unknown_http_filter_is_a_config_error(tmp_path: Any) -> None:
    import subprocess
    import sys

    port = free_port()
    bad = {
        "name": "envoy.filters.http.nonexistent",
        "typed_config": {"@type": "type.googleapis.com/google.protobuf.Empty"},
    }
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(config_http(port, {"svc": [1]}, hcm_extra={"http_filters": [bad, ROUTER]}))
    p = subprocess.run(
        [sys.executable, "-m", "moorline", "validate", str(cfg)], capture_output=True, text=True
    )
    assert p.returncode == 2
    assert "http_filters[0]" in p.stderr and "Traceback" not in p.stderr


def test_buffer_per_route_config_is_compiled_once_at_load() -> None:
    """BufferPerRoute in typed_per_filter_config is compiled with the route table: the request
    path reads a tuple, never a proto; a bad value is a config error at load."""
    from moorline.config.errors import ConfigError
    from moorline.config.loader import load_bootstrap
    from moorline.server import Server

    def cfg(per_route: dict) -> str:
        return f"""
static_resources:
  listeners:
  - name: l
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: p
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                direct_response: {{status: 200}}
                typed_per_filter_config:
                  envoy.filters.http.buffer: {per_route}
          http_filters:
          - name: envoy.filters.http.buffer
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer
              max_request_bytes: 10
          - name: envoy.filters.http.router
"""

    t = "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.BufferPerRoute"
    s = Server(load_bootstrap(yaml_text=cfg({"@type": t, "disabled": True})), "t.yaml")
    route = s.listeners[0].filter_chains[0].terminal.route_table.virtual_hosts[0].routes[0]
    assert route.filter_configs == {"envoy.filters.http.buffer": (True, None)}
    s = Server(load_bootstrap(yaml_text=cfg({"@type": t, "buffer": {"max_request_bytes": 99}})), "t.yaml")
    route = s.listeners[0].filter_chains[0].terminal.route_table.virtual_hosts[0].routes[0]
    assert route.filter_configs == {"envoy.filters.http.buffer": (False, 99)}
    with pytest.raises(ConfigError) as e:
        Server(load_bootstrap(yaml_text=cfg({"@type": t, "buffer": {"max_request_bytes": 0}})), "t.yaml")
    assert "typed_per_filter_config" in str(e.value)
