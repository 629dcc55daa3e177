"""Every file in examples/ is started as users would start it (ports rewritten to free ones) and
exercised with real clients, so the README's examples stay true."""

from __future__ import annotations

import hashlib
import re
import socket
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from moorline.testing.procs import free_port, http_request
from moorline.testing.upstream import TcpEchoServer, TestUpstream

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
pytestmark = pytest.mark.e2e


def _rewrite_ports(text: str, mapping: dict[int, int]) -> str:
    def sub(m: re.Match) -> str:
        port = int(m.group(1))
        return f"port_value: {mapping.get(port, port)}"

    return re.sub(r"port_value: (\d+)", sub, text)


def test_every_example_is_covered() -> None:
    """A new example without a test here fails this test."""
    assert sorted(p.name for p in EXAMPLES.glob("*.yaml")) == ["front-proxy.yaml", "tcp-proxy.yaml"]
    assert sorted(p.name for p in EXAMPLES.glob("*/envoy.yaml")) == ["envoy.yaml"]  # rpc-bolt


def test_rpc_bolt_example(tmp_path: Path, moorline: Any) -> None:
    # Three real SOFARPC servers (sofa-rpc-node): the two "hello" hosts share HelloService's
    # calls, the access log line names the protocol and service.
    from moorline.testing import sofa

    servers = [sofa.start_sofa_server(0, tmp_path / f"s{i}") for i in range(3)]
    try:
        port, admin = free_port(), free_port()
        mapping = {
            12200: port,
            9901: admin,
            12201: servers[0].port,
            12202: servers[1].port,
            12203: servers[2].port,
        }
        cfg = tmp_path / "rpc-bolt.yaml"
        cfg.write_text(_rewrite_ports((EXAMPLES / "rpc-bolt" / "envoy.yaml").read_text(), mapping))
        proc = moorline(cfg)
        results = sofa.run_sofa_client(port, {"steps": [sofa.call("whoami", count=12, concurrency=1)]})
        assert all(r["ok"] for r in results), results
        assert {r["value"] for r in results} == {str(servers[0].port), str(servers[1].port)}
        assert proc.stat("rpc_proxy.bolt.response_success") == 12
        assert "bolt com.alipay.test.HelloService:1.0" in proc.stdout_text()
    finally:
        for s in servers:
            s.stop()


def test_front_proxy_example(tmp_path: Path, moorline: Any) -> None:
    api = TestUpstream(upstream_id="api").start()
    web = TestUpstream(upstream_id="web").start()
    try:
        front, admin = free_port(), free_port()
        text = _rewrite_ports(
            (EXAMPLES / "front-proxy.yaml").read_text(),
            {8000: front, 9901: admin, 8081: api.port, 8082: web.port},
        )
        cfg = tmp_path / "front.yaml"
        cfg.write_text(text)
        proc = moorline(cfg)

        r = http_request("127.0.0.1", front, "GET", "/api/users")
        assert r.status == 200
        assert r.header("x-upstream-id") == "api"
        assert r.header("x-served-by") == "moorline"
        assert api.requests[-1].path == "/users"  # prefix_rewrite "/api/" -> "/"
        assert api.requests[-1].header("x-forwarded-for") == "127.0.0.1"  # use_remote_address

        r = http_request("127.0.0.1", front, "GET", "/web/index")
        assert r.status == 200 and r.header("x-upstream-id") == "web"  # STRICT_DNS "localhost"

        r = http_request("127.0.0.1", front, "GET", "/old")
        assert r.status == 301 and r.header("location") == f"http://127.0.0.1:{front}/web/"

        r = http_request("127.0.0.1", front, "GET", "/healthz")
        assert r.status == 200 and r.body == b"ok\n"

        r = http_request("127.0.0.1", front, "GET", "/nowhere")
        assert r.status == 404

        # Retries: the api upstream fails twice for this key, the route retries twice.
        r = http_request("127.0.0.1", front, "GET", "/api/fail-n/ex1/2")
        assert r.status == 200
        assert proc.stat("cluster.api.upstream_rq_retry") == 2
    finally:
        api.stop()
        web.stop()


def test_tcp_proxy_example(tmp_path: Path, moorline: Any) -> None:
    primary = TcpEchoServer().start()
    canary = TcpEchoServer().start()
    try:
        listen, admin = free_port(), free_port()
        text = _rewrite_ports(
            (EXAMPLES / "tcp-proxy.yaml").read_text(),
            {5432: listen, 9901: admin, 15432: primary.port, 25432: canary.port},
        )
        cfg = tmp_path / "tcp.yaml"
        cfg.write_text(text)
        proc = moorline(cfg)
        payload = bytes(range(256)) * 1024  # 256 KiB
        for _ in range(40):
            with socket.create_connection(("127.0.0.1", listen), timeout=10) as s:
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
                got = bytearray()
                while chunk := s.recv(65536):
                    got += chunk
            assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
        total_p = proc.stat("cluster.primary.upstream_cx_total")
        total_c = proc.stat("cluster.canary.upstream_cx_total")
        assert total_p + total_c == 40
        assert total_p > total_c  # 80/20 weights (40 draws: total_c >= 20 has odds below 1e-5)
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=5) as resp:
            assert resp.status == 200
    finally:
        primary.stop()
        canary.stop()
