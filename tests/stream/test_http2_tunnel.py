"""WebSocket / CONNECT over HTTP/2 in memory: the header translations both ways (RFC 8441,
Envoy's), and the downstream glue (``Http2ServerConnection`` / ``H2ServerStream``) driven by an
``h2`` client over a fake transport, with a recording stream in place of the connection
manager's: 101 -> 200, DATA <-> tunnel bytes, half-close per direction, flow control."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf.json_format import ParseDict

from moorline.config.context import BuildContext
from moorline.extensions import register_builtin
from moorline.net.conn_info import ConnInfo
from moorline.observability.stats import Store
from moorline.protocol.headers import RequestHeaders, ResponseHeaders
from moorline.proxy.hcm import HcmConfig
from moorline.stream.http2_client import tunnel_request_headers
from moorline.stream.http2_server import Http2ServerConnection, parse_request

EXT = [
    (b":method", b"CONNECT"),
    (b":protocol", b"websocket"),
    (b":scheme", b"https"),
    (b":authority", b"chat.example:443"),
    (b":path", b"/room?x=1"),
    (b"sec-websocket-version", b"13"),
]


# -- translations ---------------------------------------------------------------------------------


def test_extended_connect_becomes_a_get_upgrade() -> None:
    rh, ext = parse_request(EXT, allow_connect=True)
    assert ext and rh is not None
    assert (rh.method, rh.scheme, rh.authority, rh.path) == (
        b"GET",
        b"https",
        b"chat.example:443",
        b"/room?x=1",
    )
    assert rh.get(b"upgrade") == b"websocket" and rh.get(b"connection") == b"upgrade"
    assert rh.get(b"sec-websocket-version") == b"13" and rh.get(b":protocol") is None


def test_extended_connect_without_allow_connect_is_malformed() -> None:
    assert parse_request(EXT, allow_connect=False) == (None, False)


@pytest.mark.parametrize(
    "block",
    [
        [(b":method", b"GET"), (b":protocol", b"websocket"), (b":scheme", b"http"), (b":path", b"/")],
        [(b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":authority", b"a:1")],  # no path
        [
            (b":method", b"CONNECT"),
            (b":protocol", b""),
            (b":scheme", b"http"),
            (b":authority", b"a"),
            (b":path", b"/"),
        ],
        [*EXT[:2], (b":protocol", b"websocket"), *EXT[2:5]],  # repeated
    ],
)
def test_malformed_extended_connect_is_rejected(block: list[tuple[bytes, bytes]]) -> None:
    assert parse_request(block, allow_connect=True)[0] is None


def test_plain_connect_is_not_extended() -> None:
    rh, ext = parse_request([(b":method", b"CONNECT"), (b":authority", b"db:5432")], allow_connect=True)
    assert rh is not None and not ext and rh.method == b"CONNECT"


def _upgrade_request() -> RequestHeaders:
    return RequestHeaders(
        b"GET",
        b"/chat",
        b"svc",
        b"http",
        [
            (b"upgrade", b"WebSocket"),
            (b"connection", b"upgrade"),
            (b"sec-websocket-key", b"k"),
            (b"content-length", b"0"),
        ],
    )


def test_http11_upgrade_to_allow_connect_cluster_is_extended_connect() -> None:
    t = tunnel_request_headers(_upgrade_request(), allow_connect=True)
    assert t is not None
    block, protocol = t
    assert protocol == b"websocket"
    assert block == [
        (b":method", b"CONNECT"),
        (b":protocol", b"websocket"),
        (b":scheme", b"http"),
        (b":authority", b"svc"),
        (b":path", b"/chat"),
        (b"sec-websocket-key", b"k"),
    ]


def test_http11_upgrade_without_allow_connect_is_left_a_plain_request() -> None:
    assert tunnel_request_headers(_upgrade_request(), allow_connect=False) is None


def test_connect_to_http2_upstream_has_only_method_and_authority() -> None:
    t = tunnel_request_headers(RequestHeaders(b"CONNECT", b"", b"db:5432", b"http", [(b"x-a", b"1")]), False)
    assert t == ([(b":method", b"CONNECT"), (b":authority", b"db:5432"), (b"x-a", b"1")], None)


# -- the downstream glue ------------------------------------------------------------------------------


class Transport:
    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.out += data

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> Any:
        return None


class Rec:
    """Stands in for the connection manager's stream: records what the codec glue calls."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.headers: Any = None
        self.tunnel: list[tuple[bytes, bool]] = []
        self.data: list[bytes] = []
        self.resets: list[Any] = []
        self.paused = 0
        self.request_complete = False
        self.done = False
        self.last_activity = 0.0

    def decode_headers(self, headers: Any, end_stream: bool) -> None:
        self.headers = headers

    def decode_data(self, data: bytes, end_stream: bool) -> None:
        self.data.append(data)

    def decode_tunnel(self, data: bytes, end_stream: bool) -> None:
        self.tunnel.append((data, end_stream))

    def decode_trailers(self, trailers: Any) -> None:
        pass

    def on_reset(self, reason: Any) -> None:
        self.resets.append(reason)

    def on_write_paused(self) -> None:
        self.paused += 1

    def on_write_resumed(self) -> None:
        self.paused -= 1

    def check_timeouts(self, now: float) -> bool:
        return False


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = asyncio.new_event_loop()
    asyncio.set_event_loop(lp)
    yield lp
    lp.close()
    asyncio.set_event_loop(None)


def _cfg(allow_connect: bool) -> HcmConfig:
    register_builtin()
    d: dict[str, Any] = {
        "stat_prefix": "t",
        "http_filters": [{"name": "envoy.filters.http.router"}],
        "route_config": {"name": "r", "virtual_hosts": [{"name": "v", "domains": ["*"]}]},
    }
    if allow_connect:
        d["http2_protocol_options"] = {"allow_connect": True}
    return HcmConfig(ParseDict(d, hcm_pb2.HttpConnectionManager()), BuildContext(stats=Store()), "hcm")


class Pair:
    def __init__(self, allow_connect: bool = True) -> None:
        self.cfg = _cfg(allow_connect)
        self.recs: list[Rec] = []

        def new_stream(conn: Any) -> Rec:
            r = Rec(conn)
            self.recs.append(r)
            return r

        self.cfg.new_stream = new_stream  # type: ignore[method-assign]
        self.server = Http2ServerConnection(self.cfg, ConnInfo(("127.0.0.1", 1), ("127.0.0.1", 2), "l"))
        self.t = Transport()
        self.server.connection_made(self.t)
        self.client = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.client.initiate_connection()
        self.events: list[Any] = []
        self.pump()

    def pump(self) -> list[Any]:
        """Move bytes both ways until quiet; returns the client's new events."""
        new: list[Any] = []
        for _ in range(50):
            c2s = self.client.data_to_send()
            if c2s:
                self.server.data_received(c2s)
            self.server.loop.run_until_complete(asyncio.sleep(0))  # scheduled flushes
            s2c = bytes(self.t.out)
            self.t.out.clear()
            if s2c:
                new += self.client.receive_data(s2c)
            if not c2s and not s2c:
                break
        self.events += new
        return new

    def open_ext(self) -> tuple[int, Rec]:
        sid = self.client.get_next_available_stream_id()
        self.client.send_headers(sid, EXT)
        self.pump()
        return sid, self.recs[-1]


def _of(events: list[Any], cls: Any) -> list[Any]:
    return [e for e in events if isinstance(e, cls)]


def test_server_advertises_enable_connect_protocol_only_with_allow_connect(loop: Any) -> None:
    assert Pair(True).client.remote_settings.enable_connect_protocol == 1
    assert Pair(False).client.remote_settings.enable_connect_protocol == 0


def test_extended_connect_tunnel_both_ways_with_half_close(loop: Any) -> None:
    p = Pair()
    sid, rec = p.open_ext()
    assert rec.headers.method == b"GET" and rec.headers.get(b"upgrade") == b"websocket"
    ss = rec.conn
    # The upstream accepted (the connection manager calls start_tunnel, then the 101 head).
    ss.start_tunnel()
    ss.encode_headers(
        ResponseHeaders.make(101, [(b"upgrade", b"websocket"), (b"sec-websocket-accept", b"a")]), False
    )
    ev = p.pump()
    (resp,) = _of(ev, h2.events.ResponseReceived)
    h = dict(resp.headers)
    assert h[b":status"] == b"200" and h[b"sec-websocket-accept"] == b"a" and b"upgrade" not in h
    # Client bytes -> decode_tunnel; upstream bytes -> DATA.
    p.client.send_data(sid, b"from client")
    ss.encode_tunnel(b"from upstream", False)
    ev = p.pump()
    assert rec.tunnel == [(b"from client", False)]
    assert [e.data for e in _of(ev, h2.events.DataReceived)] == [b"from upstream"]
    # The upstream half-closes: END_STREAM, and the stream stays open for the client's bytes.
    ss.encode_tunnel(b"", True)
    ev = p.pump()
    assert _of(ev, h2.events.StreamEnded) and not _of(ev, h2.events.StreamReset)
    p.client.send_data(sid, b"late", end_stream=True)
    p.pump()
    assert rec.tunnel[-1] == (b"late", True)
    assert not _of(p.events, h2.events.StreamReset)
    assert sid not in p.server.streams  # both directions ended: the stream is gone


def test_client_rst_stream_resets_the_tunnel(loop: Any) -> None:
    p = Pair()
    sid, rec = p.open_ext()
    rec.conn.start_tunnel()
    rec.conn.encode_headers(ResponseHeaders.make(101, []), False)
    p.pump()
    p.client.reset_stream(sid, 8)
    p.pump()
    assert len(rec.resets) == 1 and sid not in p.server.streams


def test_refused_upgrade_is_an_ordinary_response(loop: Any) -> None:
    """The upstream answered 404 to the GET: no tunnel, the 404 goes out as it is."""
    p = Pair()
    sid, rec = p.open_ext()
    rec.conn.encode_headers(ResponseHeaders.make(404, [(b"content-length", b"0")]), True)
    ev = p.pump()
    (resp,) = _of(ev, h2.events.ResponseReceived)
    assert dict(resp.headers)[b":status"] == b"404"
    assert sid not in p.server.streams  # ended with the response, as any refused request


def test_extended_connect_without_allow_connect_ends_the_connection(loop: Any) -> None:
    p = Pair(allow_connect=False)
    sid = p.client.get_next_available_stream_id()
    p.client.send_headers(sid, EXT)
    ev = p.pump()
    # An invalid message: the connection ends (Envoy's default).
    (term,) = _of(ev, h2.events.ConnectionTerminated)
    assert term.error_code == 1 and not p.recs


def test_tunnel_output_beyond_the_client_window_pauses_the_upstream(loop: Any) -> None:
    """A client that grants no window: tunnel bytes queue in the codec up to the high-water mark,
    then the upstream is paused; the client's WINDOW_UPDATE resumes it."""
    p = Pair()
    sid, rec = p.open_ext()
    ss = rec.conn
    ss.start_tunnel()
    ss.encode_headers(ResponseHeaders.make(101, []), False)
    p.pump()
    chunk = b"x" * 16384
    sent = 0
    while not rec.paused and sent < 1 << 20:
        ss.encode_tunnel(chunk, False)
        sent += len(chunk)
    assert rec.paused == 1
    got = sum(len(e.data) for e in _of(p.pump(), h2.events.DataReceived))
    assert got <= 65535  # the client's initial window (it acknowledges nothing)
    p.client.acknowledge_received_data(got, sid)
    p.client.increment_flow_control_window(1 << 20)
    p.client.increment_flow_control_window(1 << 20, sid)
    p.pump()
    assert rec.paused == 0
