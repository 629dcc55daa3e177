"""rpc_inspector end to end: one moorline port serving HTTP/1.1 and h2c (curl, through the HTTP
connection manager to a TestUpstream) and the example x-protocol (raw frames, through a
tcp_proxy chain to a TCP echo server standing in for rpc_proxy), chosen per connection by
``filter_chain_match.application_protocols``; a connection that is neither is closed (no chain)."""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Callable
from typing import Any

import pytest

from moorline.protocol.xprotocol.api import FrameKind, FrameReader
from moorline.protocol.xprotocol.example import CODEC, encode_frame
from moorline.testing import procs
from moorline.testing.procs import MoorlineProc
from moorline.testing.upstream import TcpEchoServer, TestUpstream

pytestmark = pytest.mark.e2e

TS = "type.googleapis.com/xds.type.v3.TypedStruct"


def config(port: int, web: int, rpc: int) -> str:
    http = procs.hcm_listener("mixed", port, [{"match": {"prefix": "/"}, "route": {"cluster": "web"}}])
    hcm_chain = http["filter_chains"][0]
    hcm_chain["filter_chain_match"] = {"application_protocols": ["http/1.1", "h2c"]}
    tcp_chain = procs.tcp_listener("rpc", port, "rpc")["filter_chains"][0]
    tcp_chain["filter_chain_match"] = {"application_protocols": ["example"]}
    http["filter_chains"] = [hcm_chain, tcp_chain]
    http["listener_filters"] = [
        {
            "name": "moorline.filters.listener.rpc_inspector",
            "typed_config": {
                "@type": TS,
                "type_url": "type.googleapis.com/moorline.filters.listener.rpc_inspector.v1.RpcInspector",
                "value": {},
            },
        }
    ]
    http["listener_filters_timeout"] = "5s"
    return procs.bootstrap([http], [procs.cluster("web", [web]), procs.cluster("rpc", [rpc])])


def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["curl", "-sS", "--max-time", "10", *args], capture_output=True, timeout=30)


def exchange(port: int, frames: list[bytes], want: int) -> list[bytes]:
    """Send ``frames`` (split unevenly) on one connection; read ``want`` frames back."""
    reader = FrameReader(CODEC)
    out: list[bytes] = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        data = b"".join(frames)
        s.sendall(data[:5])  # the head may arrive in two reads: the inspector then waits for it
        s.sendall(data[5:])
        while len(out) < want:
            chunk = s.recv(65536)
            assert chunk, f"closed after {len(out)} frames"
            out += reader.feed(chunk)
    return out


def test_http1_h2c_and_example_share_a_port(
    moorline: Callable[..., MoorlineProc],
    upstream: TestUpstream,
    echo_server: TcpEchoServer,
) -> None:
    procs.require_binary("curl")
    port = procs.free_port()
    proc = moorline(config(port, upstream.port, echo_server.port))
    base = f"http://127.0.0.1:{port}"

    r = curl("--http1.1", "-D", "-", f"{base}/one")
    assert r.returncode == 0, r.stderr
    head, _, body = r.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert json.loads(body)["path"] == "/one"

    r = curl("--http2-prior-knowledge", "-D", "-", f"{base}/two")
    assert r.returncode == 0, r.stderr
    head, _, body = r.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/2 200")
    assert json.loads(body)["path"] == "/two"

    req = encode_frame(FrameKind.REQUEST, 7, "HelloService", "sayHello", b"hello" * 1000)
    ping = CODEC.heartbeat_request(8)
    got = exchange(port, [req, ping], 2)
    assert got == [req, ping]  # echoed through the example chain, byte for byte
    assert CODEC.decode(got[0]).service == "HelloService"

    assert [rec.path for rec in upstream.requests] == ["/one", "/two"]
    stats: dict[str, Any] = proc.stats()
    assert stats["rpc_inspector.http1_found"] == 1
    assert stats["rpc_inspector.http2_found"] == 1
    assert stats["rpc_inspector.example_found"] == 1
    assert stats["tcp.rpc.downstream_cx_total"] == 1
    assert echo_server.connections_total == 1


def test_neither_protocol_is_closed(
    moorline: Callable[..., MoorlineProc],
    upstream: TestUpstream,
    echo_server: TcpEchoServer,
) -> None:
    port = procs.free_port()
    proc = moorline(config(port, upstream.port, echo_server.port))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"\x00\x01 not http, not example\r\n")
        # No filter chain matches: closed with our bytes unread (so a FIN or an RST), nothing
        # relayed.
        try:
            got = s.recv(100)
        except ConnectionResetError:
            got = b""
        assert got == b""
    procs.wait_until(lambda: proc.stat("rpc_inspector.not_found") == 1, "not_found counted", timeout=5)
    assert echo_server.connections_total == 0
    assert upstream.requests == []
