"""WebSocket and CONNECT over HTTP/2 (RFC 8441 extended CONNECT, ``allow_connect``), through a
real moorline, with real peers: the ``websockets`` client and server from PyPI, an ``h2``
(python-hyper) client, and a TCP echo server.

One moorline process holds four listeners:
- ``front`` (HTTP/1.1 and HTTP/2, AUTO): WebSocket upgrades go to the cluster ``hop``, an HTTP/2
  cluster with ``allow_connect`` pointing at ``ws``: the HTTP/1.1 upgrade leaves as an extended
  CONNECT and its 200 comes back as 101;
- ``ws`` (``allow_connect``): an extended CONNECT becomes an HTTP/1.1 ``GET`` with
  ``upgrade: websocket`` to the websockets server, whose 101 goes back as 200;
- ``plain``: the same routes without ``allow_connect``: an extended CONNECT is reset;
- ``tunnel``: CONNECT terminated (``connect_matcher``, ``upgrade_configs: CONNECT`` with
  ``connect_config``) to a TCP echo server, over HTTP/2 and HTTP/1.1.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
import websockets.asyncio.server
import websockets.sync.client

from moorline.testing import procs

pytestmark = pytest.mark.e2e

WS_ROUTE = {
    "match": {"prefix": "/"},
    "route": {"cluster": "wsup", "upgrade_configs": [{"upgrade_type": "websocket"}]},
}


class _Thread:
    """An asyncio loop in a thread serving ``start()``'s servers; stopped with the loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.t = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.t.start()

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.t.join(5)


async def _ws_echo(ws: Any) -> None:
    async for msg in ws:
        await ws.send(msg)


async def _tcp_echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    while True:
        data = await r.read(65536)
        if not data:
            break
        w.write(data)
        await w.drain()
    w.close()  # the client half-closed: so do we, after the echo


@dataclass
class Env:
    front: int
    ws: int
    plain: int
    tunnel: int
    proc: procs.MoorlineProc


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("h2connect")
    th = _Thread()
    ws_port, echo_port = procs.free_port(), procs.free_port()

    async def _serve_ws() -> Any:
        return await websockets.asyncio.server.serve(_ws_echo, "127.0.0.1", ws_port)

    ws_srv = th.run(_serve_ws())
    echo_srv = th.run(asyncio.start_server(_tcp_echo, "127.0.0.1", echo_port))
    front, ws, plain, tunnel = (procs.free_port() for _ in range(4))
    allow = {"http2_protocol_options": {"allow_connect": True}}
    hop = procs.cluster(
        "hop",
        [ws],
        typed_extension_protocol_options={
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": allow,
            }
        },
    )
    connect_routes = [
        {
            "match": {"connect_matcher": {}},
            "route": {
                "cluster": "echo",
                "upgrade_configs": [{"upgrade_type": "CONNECT", "connect_config": {}}],
            },
        }
    ]
    listeners = [
        procs.hcm_listener(
            "front",
            front,
            [
                {
                    "match": {"prefix": "/"},
                    "route": {"cluster": "hop", "upgrade_configs": [{"upgrade_type": "websocket"}]},
                }
            ],
        ),
        procs.hcm_listener("ws", ws, [WS_ROUTE], hcm_extra=allow),
        procs.hcm_listener("plain", plain, [WS_ROUTE]),
        procs.hcm_listener("tunnel", tunnel, connect_routes, hcm_extra=allow),
    ]
    clusters = [hop, procs.cluster("wsup", [ws_port]), procs.cluster("echo", [echo_port])]
    proc = procs.start_moorline(procs.bootstrap(listeners, clusters), tmp / "moorline")
    try:
        yield Env(front, ws, plain, tunnel, proc)
    finally:
        proc.stop()
        th.loop.call_soon_threadsafe(ws_srv.close)
        th.loop.call_soon_threadsafe(echo_srv.close)
        th.stop()


# -- a blocking h2 client ------------------------------------------------------------------------


class H2Client:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.h2.initiate_connection()
        self.flush()
        self.events: list[Any] = []
        self.settings_seen = False

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.sock.sendall(data)

    def read(self) -> list[Any]:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("closed")
        evs = self.h2.receive_data(data)
        for ev in evs:
            if isinstance(ev, h2.events.RemoteSettingsChanged):
                self.settings_seen = True
            if isinstance(ev, h2.events.DataReceived):
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        self.flush()
        self.events.extend(evs)
        return evs

    def until(self, pred: Any) -> Any:
        for _ in range(1000):
            for i, ev in enumerate(self.events):
                if pred(ev):
                    del self.events[: i + 1]
                    return ev
            self.read()
        raise AssertionError("no such event")

    def wait_settings(self) -> None:
        while not self.settings_seen:
            self.read()

    def data_until(self, sid: int, n: int) -> tuple[bytes, bool]:
        """Read DATA of ``sid`` until ``n`` bytes or END_STREAM."""
        buf = b""
        ended = False
        while len(buf) < n and not ended:
            ev = self.until(
                lambda e: (
                    isinstance(e, (h2.events.DataReceived, h2.events.StreamEnded, h2.events.StreamReset))
                    and e.stream_id == sid
                )
            )
            if isinstance(ev, h2.events.DataReceived):
                buf += ev.data
                ended = ev.stream_ended is not None
            elif isinstance(ev, h2.events.StreamEnded):
                ended = True
            else:
                raise AssertionError(f"stream reset: {ev.error_code}")
        return buf, ended

    def close(self) -> None:
        self.sock.close()


def _ws_frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame (RFC 6455 5.2), payload under 64 KiB."""
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([0x80 | opcode]) + (
        bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack("!H", n)
    )
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def _ws_parse(buf: bytes) -> tuple[int, bytes, int] | None:
    """An unmasked server frame: (opcode, payload, frame length), or None if incomplete."""
    if len(buf) < 2:
        return None
    n = buf[1] & 0x7F
    off = 2
    if n == 126:
        if len(buf) < 4:
            return None
        n = struct.unpack("!H", buf[2:4])[0]
        off = 4
    if len(buf) < off + n:
        return None
    return buf[0] & 0x0F, buf[off : off + n], off + n


def _ext_connect(c: H2Client, port: int, protocol: bytes = b"websocket") -> int:
    sid = c.h2.get_next_available_stream_id()
    c.h2.send_headers(
        sid,
        [
            (b":method", b"CONNECT"),
            (b":protocol", protocol),
            (b":scheme", b"http"),
            (b":authority", f"127.0.0.1:{port}".encode()),
            (b":path", b"/chat"),
            (b"sec-websocket-version", b"13"),
            # Not used over HTTP/2 (RFC 8441 5); the HTTP/1.1 server behind needs one.
            (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ=="),
        ],
    )
    c.flush()
    return sid


def _status(ev: Any) -> bytes:
    return dict(ev.headers)[b":status"]


# -- tests -----------------------------------------------------------------------------------------


def test_websockets_client_over_http11_reaches_server_through_an_http2_hop(env: Env) -> None:
    """websockets (HTTP/1.1) -> front -> extended CONNECT on an HTTP/2 connection -> ws ->
    GET Upgrade -> websockets server, and the 101 / 200 / 101 back; messages echo both ways and
    the close handshake completes."""
    before = env.proc.stat("http.ws.downstream_rq_http2_total")
    with websockets.sync.client.connect(f"ws://127.0.0.1:{env.front}/chat", open_timeout=10) as ws:
        ws.send("hello over h2")
        assert ws.recv(timeout=10) == "hello over h2"
        blob = os.urandom(100_000)
        ws.send(blob)
        assert ws.recv(timeout=10) == blob
    assert ws.close_code == 1000
    assert env.proc.stat("http.ws.downstream_rq_http2_total") == before + 1
    assert env.proc.stat("http.front.downstream_cx_upgrades_total") >= 1
    assert env.proc.stat("http.ws.downstream_cx_upgrades_total") >= 1


def test_h2_extended_connect_client_to_websockets_server(env: Env) -> None:
    """An h2 client's extended CONNECT gets 200 (the server's 101 translated), then WebSocket
    frames flow as DATA both ways and a close handshake ends the stream cleanly."""
    c = H2Client(env.ws)
    try:
        c.wait_settings()
        assert c.h2.remote_settings[h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL] == 1
        sid = _ext_connect(c, env.ws)
        resp = c.until(lambda e: isinstance(e, h2.events.ResponseReceived))
        assert _status(resp) == b"200"
        assert b"sec-websocket-accept" in dict(resp.headers)
        assert b"upgrade" not in dict(resp.headers) and b"connection" not in dict(resp.headers)
        c.h2.send_data(sid, _ws_frame(1, b"ping from h2"))
        c.flush()
        data, ended = c.data_until(sid, 2 + len(b"ping from h2"))
        assert _ws_parse(data) == (1, b"ping from h2", len(data)) and not ended
        c.h2.send_data(sid, _ws_frame(8, struct.pack("!H", 1000)))
        c.flush()
        data, _ = c.data_until(sid, 4)
        f = _ws_parse(data)
        assert f is not None and f[0] == 8 and f[1][:2] == struct.pack("!H", 1000)
        c.h2.end_stream(sid)
        c.flush()
        rest, ended = c.data_until(sid, 1 << 30)  # the server closes TCP: END_STREAM follows
        assert ended and rest == b""
    finally:
        c.close()


def test_extended_connect_without_allow_connect_ends_the_connection(env: Env) -> None:
    c = H2Client(env.plain)
    try:
        c.wait_settings()
        assert c.h2.remote_settings.get(h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL, 0) == 0
        sid = _ext_connect(c, env.plain)
        # An unannounced :protocol is an invalid message: as Envoy does by default
        # (stream_error_on_invalid_http_messaging false), the connection ends.
        ev = c.until(lambda e: isinstance(e, (h2.events.ConnectionTerminated, h2.events.ResponseReceived)))
        assert isinstance(ev, h2.events.ConnectionTerminated) and ev.error_code == 1
        assert sid == 1
    finally:
        c.close()


def test_h2_connect_terminated_to_tcp_echo(env: Env) -> None:
    """Plain CONNECT over HTTP/2, terminated: 200, then DATA <-> raw TCP, 1 MiB through the
    windows both ways, END_STREAM -> FIN -> the echo's FIN -> END_STREAM."""
    c = H2Client(env.tunnel)
    try:
        sid = c.h2.get_next_available_stream_id()
        c.h2.send_headers(sid, [(b":method", b"CONNECT"), (b":authority", b"echo.internal:7")])
        c.flush()
        resp = c.until(lambda e: isinstance(e, h2.events.ResponseReceived))
        assert _status(resp) == b"200"
        c.h2.send_data(sid, b"hello tunnel")
        c.flush()
        data, ended = c.data_until(sid, 12)
        assert data == b"hello tunnel" and not ended
        blob = os.urandom(1 << 20)
        got = b""
        off = 0
        while off < len(blob):
            # Send what the window allows, read what comes back: the windows bound both sides.
            w = min(c.h2.local_flow_control_window(sid), c.h2.max_outbound_frame_size, len(blob) - off)
            if w > 0:
                c.h2.send_data(sid, blob[off : off + w])
                off += w
                c.flush()
            else:
                part, _ = c.data_until(sid, 1)
                got += part
        c.h2.end_stream(sid)
        c.flush()
        part, ended = c.data_until(sid, len(blob) - len(got) + 1)
        got += part
        assert ended and got == blob
    finally:
        c.close()
    assert env.proc.stat("cluster.echo.upstream_cx_total") >= 1


def test_a_get_does_not_match_connect_matcher(env: Env) -> None:
    c = H2Client(env.tunnel)
    try:
        sid = c.h2.get_next_available_stream_id()
        c.h2.send_headers(
            sid, [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"x"), (b":path", b"/")], True
        )
        c.flush()
        resp = c.until(lambda e: isinstance(e, h2.events.ResponseReceived))
        assert _status(resp) == b"404"  # only CONNECT matches connect_matcher
    finally:
        c.close()


def test_http11_connect_terminated_to_tcp_echo(env: Env) -> None:
    s = socket.create_connection(("127.0.0.1", env.tunnel), timeout=10)
    try:
        s.sendall(b"CONNECT echo.internal:7 HTTP/1.1\r\nhost: echo.internal:7\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(4096)
        assert head.startswith(b"HTTP/1.1 200"), head
        rest = head.split(b"\r\n\r\n", 1)[1]
        s.sendall(b"over http/1.1")
        while len(rest) < 13:
            rest += s.recv(4096)
        assert rest == b"over http/1.1"
        s.shutdown(socket.SHUT_WR)
        assert s.recv(4096) == b""  # the echo's FIN comes back
    finally:
        s.close()
