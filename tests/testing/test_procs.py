"""Tests of the process and client helpers (moorline.testing.procs)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import yaml
from google.protobuf import json_format

from moorline.testing import procs
from moorline.testing.procs import RawConn, free_port, parse_stats_text, wait_for_log, wait_port
from moorline.testing.upstream import TestUpstream, chunked_payload, pattern_sha256


def _load_bootstrap(text: str):
    """Parse builder output with the real Envoy v3 protos: proves the YAML is valid Envoy."""
    import envoy.extensions.access_loggers.file.v3.file_pb2
    import envoy.extensions.filters.http.router.v3.router_pb2
    import envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2
    import envoy.extensions.filters.network.tcp_proxy.v3.tcp_proxy_pb2  # noqa: F401
    from envoy.config.bootstrap.v3 import bootstrap_pb2

    msg = bootstrap_pb2.Bootstrap()
    json_format.ParseDict(yaml.safe_load(text), msg)
    return msg


def test_free_port_and_wait_port() -> None:
    p = free_port()
    assert procs.port_is_free(p)
    with pytest.raises(TimeoutError):
        wait_port("127.0.0.1", p, timeout=0.3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", p))
        s.listen()
        assert not procs.port_is_free(p)
        wait_port("127.0.0.1", p, timeout=2)


def test_config_builders_are_valid_envoy(tmp_path) -> None:
    text = procs.config_http(
        12345,
        clusters={"a": [1111, ("127.0.0.2", 2222)], "empty": []},
        routes=[{"match": {"prefix": "/"}, "route": {"cluster": "a", "timeout": "0.5s"}}],
        hcm_extra={"server_name": "x", "use_remote_address": True},
        access_log_path=tmp_path / "a.log",
        admin_port=9999,
    )
    b = _load_bootstrap(text)
    assert b.admin.address.socket_address.port_value == 9999
    assert b.static_resources.listeners[0].address.socket_address.port_value == 12345
    assert [c.name for c in b.static_resources.clusters] == ["a", "empty"]
    assert procs.admin_port_of(text) == ("127.0.0.1", 9999)
    tcp = procs.bootstrap([procs.tcp_listener("t", 1, "a")], [procs.cluster("a", [2])])
    assert _load_bootstrap(tcp).static_resources.listeners[0].name == "t"


def test_parse_stats_text() -> None:
    d = parse_stats_text(
        "cluster.a.upstream_rq_total: 20\ncluster.a.upstream_rq_time: P0(nan,1)\nnot a stat\n"
    )
    assert d == {"cluster.a.upstream_rq_total": 20, "cluster.a.upstream_rq_time": "P0(nan,1)"}


def test_wait_for_log_polls(tmp_path) -> None:
    log = tmp_path / "x.log"
    threading.Timer(0.2, lambda: log.write_text("code=404 flags=NR path=/nope\n")).start()
    assert "flags=NR" in wait_for_log(log, "path=/nope", timeout=5)
    with pytest.raises(TimeoutError):
        wait_for_log(log, "never", timeout=0.2)


def test_rss_kb_counts_children() -> None:
    assert procs.rss_kb(os.getpid()) > 1000
    child = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(30 << 20); time.sleep(30)"])
    try:
        deadline = time.monotonic() + 10
        while procs.rss_kb(child.pid) < 30_000 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert procs.rss_kb(os.getpid()) - procs.rss_kb(os.getpid(), with_children=False) >= 30_000
    finally:
        child.kill()
        child.wait()


def test_start_moorline_failure_shows_stderr(tmp_path) -> None:
    """A process that exits before /ready fails fast with its stderr, and leaves nothing."""
    cfg = procs.config_http(free_port(), clusters={"a": [1]})
    bad = tmp_path / "bad-env"
    with pytest.raises(procs.ProcStartError) as ei:
        # An interpreter flag that makes the child exit at once, whatever moorline's state.
        procs.start_moorline(
            cfg, bad, ["--definitely-not-a-flag"], env={"PYTHONPATH": "/nonexistent"}, ready_timeout=20
        )
    assert "exited" in str(ei.value) or "not ready" in str(ei.value)
    assert not [p for p in procs._live if p.alive()]


def test_nginx_fixed_body_and_reverse_proxy(tmp_path, upstream: TestUpstream) -> None:
    if not os.path.exists(procs.NGINX_BIN):
        pytest.skip("nginx is not installed")
    p1, p2 = free_port(), free_port()
    fixed = procs.start_nginx(tmp_path, procs.nginx_fixed_body(p1, "fixed!\n"), p1)
    rev = procs.start_nginx(tmp_path, procs.nginx_reverse_proxy(p2, upstream.port), p2)
    try:
        assert procs.http_request("127.0.0.1", p1, "GET", "/").body == b"fixed!\n"
        with RawConn("127.0.0.1", p2) as c:
            for _ in range(3):
                c.send(b"GET /chunked/5 HTTP/1.1\r\nHost: x\r\n\r\n")
                assert c.read_response().body == b"".join(chunked_payload(5))
            c.send(b"GET /bytes/300000 HTTP/1.1\r\nHost: x\r\n\r\n")
            assert hashlib.sha256(c.read_response().body).hexdigest() == pattern_sha256(300000)
            c.send(b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
            assert json.loads(c.read_response().body)["body_len"] == 3
        # nginx keeps its upstream connection alive: one connection for all requests.
        assert len(upstream.connection_ids()) == 1
        assert fixed.rss_kb() > 0
    finally:
        assert fixed.stop(signal.SIGQUIT, 5) == 0
        rev.stop(signal.SIGQUIT, 5)
    assert not fixed.alive() and not rev.alive()


def test_fixtures_moorline_nginx_config_http(moorline, nginx, config_http) -> None:
    """The conftest factory fixtures start working processes (moorline in front of nginx)."""
    nport, port = free_port(), free_port()
    nginx(procs.nginx_fixed_body(nport, "via fixture\n"), nport)
    try:
        m = moorline(config_http(port, clusters={"ng": [nport]}))
    except procs.ProcStartError as exc:  # moorline itself not runnable yet
        pytest.skip(f"moorline does not start yet: {str(exc)[:200]}")
    assert procs.http_request("127.0.0.1", port, "GET", "/").body == b"via fixture\n"
    assert m.stat("cluster.ng.upstream_rq_total") == 1
