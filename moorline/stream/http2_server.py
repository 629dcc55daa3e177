"""Downstream HTTP/2 connections (h2c prior knowledge, or TLS with ALPN "h2").

``Http2ServerConnection`` owns one connection's ``Http2Codec``; each HTTP/2 stream gets an
``H2ServerStream``, the per-stream ``ServerConnection`` (``moorline.stream.api``) the
connection manager's stream talks to, exactly as to an HTTP/1.1 connection: ``encode_headers`` / ``encode_data`` /
``encode_trailers`` write frames for that stream, ``abort()`` resets only that stream,
``pause_reading`` / ``resume_reading`` stop and restart the window updates of that stream.

Writes: frames produced while a read is being processed go out in one ``transport.write`` at
the end of the read; frames produced from upstream callbacks are written at once.

Flow control and bounds:
- inbound DATA is handed to the stream at once and acknowledged (window update) unless the
  stream is read-paused; a paused stream leaves at most one stream window
  (``initial_stream_window_size``) in flight, and all streams together at most the connection
  window;
- outbound DATA beyond the client's windows is queued in the codec; above ``_HIGH_WATER`` bytes
  queued for a stream its upstream reads are paused until the queue drained (WRITABLE);
- the transport's write high-water mark is the listener's buffer limit; above it every stream's
  upstream is paused.

Protocol selection (``server_factory``): codec_type HTTP2, or AUTO with ALPN "h2", gives this
connection; AUTO without ALPN sniffs the first bytes for the HTTP/2 preface (``_Sniffer``
buffers at most 24 bytes, then hands the transport to the chosen protocol).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from moorline.observability.stats import Counter, Gauge
from moorline.protocol import http2 as h2c
from moorline.protocol import http2_backends
from moorline.protocol.headers import HeaderMap, RequestHeaders, ResponseHeaders
from moorline.stream.api import HttpProtocol, ResetReason
from moorline.stream.http1_server import Http1ServerConnection

if TYPE_CHECKING:
    from moorline.stream.api import ServerConnectionCallbacks as HcmConfig

_HIGH_WATER = 64 * 1024  # bytes queued for one stream beyond the peer's window before pausing
# Connection-specific headers (RFC 9113 8.2.2): never sent on an HTTP/2 connection.
_CONN_SPECIFIC = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade")
)
_RESP_DROP = _CONN_SPECIFIC | frozenset((b"server", b"date"))
_EMPTY: tuple[Any, ...] = ()


class H2ServerStats:
    """Downstream HTTP/2 stats: ``http.<prefix>.*_http2_*`` and Envoy's root ``http2.*``."""

    __slots__ = (
        "downstream_cx_http2_active",
        "downstream_cx_http2_total",
        "downstream_rq_http2_total",
        "goaway_sent",
        "header_overflow",
        "inbound_empty_frames_flood",
        "inbound_priority_frames_flood",
        "inbound_window_update_frames_flood",
        "outbound_control_flood",
        "outbound_flood",
        "rx_messaging_error",
        "rx_reset",
        "streams_active",
        "too_many_header_frames",
        "too_many_premature_resets",
        "too_many_premature_resets_h2",
        "trailers",
        "tx_reset",
    )

    downstream_cx_http2_total: Counter
    downstream_rq_http2_total: Counter
    downstream_cx_http2_active: Gauge
    too_many_premature_resets: Counter
    rx_reset: Counter
    tx_reset: Counter
    goaway_sent: Counter
    header_overflow: Counter
    too_many_header_frames: Counter
    outbound_control_flood: Counter
    outbound_flood: Counter
    inbound_empty_frames_flood: Counter
    inbound_priority_frames_flood: Counter
    inbound_window_update_frames_flood: Counter
    rx_messaging_error: Counter
    too_many_premature_resets_h2: Counter
    trailers: Counter
    streams_active: Gauge

    def __init__(self, cfg: Any) -> None:
        store = cfg.ctx.stats
        http = store.scope(f"http.{cfg.stat_prefix}.")
        root = store.scope("http2.")
        self.downstream_cx_http2_total = http.counter("downstream_cx_http2_total")
        self.downstream_rq_http2_total = http.counter("downstream_rq_http2_total")
        self.downstream_cx_http2_active = http.gauge("downstream_cx_http2_active")
        self.too_many_premature_resets = http.counter("downstream_rq_too_many_premature_resets")
        for n in (
            "rx_reset",
            "tx_reset",
            "goaway_sent",
            "header_overflow",
            "too_many_header_frames",
            "outbound_control_flood",
            "outbound_flood",
            "inbound_empty_frames_flood",
            "inbound_priority_frames_flood",
            "inbound_window_update_frames_flood",
            "rx_messaging_error",
            "trailers",
        ):
            setattr(self, n, root.counter(n))
        self.too_many_premature_resets_h2 = root.counter("too_many_premature_resets")
        self.streams_active = root.gauge("streams_active")


def _stats_for(cfg: Any) -> H2ServerStats:
    st = getattr(cfg, "_h2_stats", None)
    if st is None:
        st = H2ServerStats(cfg)
        cfg._h2_stats = st
    return st


_REQ_PSEUDO = frozenset((b":method", b":scheme", b":authority", b":path"))
_REQ_PSEUDO_CONNECT = _REQ_PSEUDO | frozenset((b":protocol",))


def request_headers(headers: list[tuple[bytes, bytes]], allow_connect: bool = False) -> RequestHeaders | None:
    """An HTTP/2 request header block as ``RequestHeaders``, or None when it is malformed
    (RFC 9113 8.3: unknown or repeated pseudo-headers, pseudo-headers after regular ones, a
    request without ``:method``, or without ``:scheme`` and ``:path`` unless it is CONNECT).
    Split ``cookie`` headers are joined (RFC 9113 8.2.3). With ``allow_connect`` an RFC 8441
    extended CONNECT is taken (see ``parse_request``)."""
    return parse_request(headers, allow_connect)[0]


def parse_request(
    headers: list[tuple[bytes, bytes]], allow_connect: bool = False
) -> tuple[RequestHeaders | None, bool]:
    """``(request, extended)``: ``request_headers``, and whether it was an RFC 8441 extended
    CONNECT (``:method CONNECT`` with ``:protocol``, ``:scheme``, ``:path``, ``:authority``).

    An extended CONNECT becomes what an HTTP/1.1 client would have sent for the same upgrade,
    as Envoy translates it: ``GET`` with ``upgrade: <:protocol>`` and ``connection: upgrade``,
    so the connection manager, the route's ``upgrade_configs`` and an HTTP/1.1 upstream see an
    ordinary upgrade. Without ``allow_connect`` (SETTINGS_ENABLE_CONNECT_PROTOCOL not sent)
    ``:protocol`` is an unknown pseudo-header and the block is malformed (RFC 8441 3)."""
    method = scheme = authority = path = protocol = None
    rest: list[tuple[bytes, bytes]] = []
    cookies: list[bytes] | None = None
    allowed = _REQ_PSEUDO_CONNECT if allow_connect else _REQ_PSEUDO
    for k, v in headers:
        if k[:1] == b":":
            if rest or cookies or k not in allowed:
                return None, False
            if k == b":method":
                if method is not None:
                    return None, False
                method = v
            elif k == b":path":
                if path is not None:
                    return None, False
                path = v
            elif k == b":authority":
                if authority is not None:
                    return None, False
                authority = v
            elif k == b":protocol":
                if protocol is not None:
                    return None, False
                protocol = v
            else:
                if scheme is not None:
                    return None, False
                scheme = v
            continue
        if k == b"cookie":
            if cookies is None:
                cookies = []
            cookies.append(v)
            continue
        rest.append((k, v))
    if method is None:
        return None, False
    extended = False
    if protocol is not None:
        # RFC 8441 4: only with CONNECT, and with the full :scheme / :path / :authority tuple.
        if method != b"CONNECT" or scheme is None or not path or not authority or not protocol:
            return None, False
        extended = True
        method = b"GET"
        rest.append((b"upgrade", protocol))
        rest.append((b"connection", b"upgrade"))
    elif method == b"CONNECT":
        if scheme is not None or path is not None or not authority:
            return None, False
    elif scheme is None or not path:
        return None, False
    if cookies:
        rest.append((b"cookie", b"; ".join(cookies)))
    return RequestHeaders.make(method, path or b"", authority or b"", scheme or b"http", rest), extended


class H2ServerStream:
    """One HTTP/2 stream: the ``ServerConnection`` of one ``ActiveStream``."""

    protocol = HttpProtocol.HTTP2

    __slots__ = (
        "backlog",
        "cfg",
        "close_after_response",
        "closed",
        "conn",
        "drain",
        "extended",
        "info",
        "loop",
        "read_paused",
        "req_ended",
        "resp_ended",
        "resp_keep_alive",
        "resp_no_body",
        "sid",
        "stream",
        "tunnel",
        "tunnel_req",
        "unacked",
        "window_paused",
    )

    def __init__(self, conn: Http2ServerConnection, sid: int) -> None:
        self.conn = conn
        self.sid = sid
        self.cfg = conn.cfg
        self.info = conn.info
        self.loop = conn.loop
        self.backlog = _EMPTY
        self.resp_keep_alive = True
        self.resp_no_body = False
        self.close_after_response = False
        self.drain = False  # drain the connection once this response is done
        self.stream: Any = None
        self.closed = False
        self.req_ended = False
        self.resp_ended = False
        self.read_paused = False
        self.unacked = 0
        self.window_paused = False
        # CONNECT or an extended CONNECT (RFC 8441): the request's DATA is tunnel bytes from the
        # start (held by the router until the upstream accepts); ``extended``: the upstream's
        # 101 goes out as 200. ``tunnel``: the upstream accepted (``start_tunnel``); the stream
        # then half-closes per direction instead of ending with the response.
        self.tunnel_req = False
        self.extended = False
        self.tunnel = False

    @property
    def last_activity(self) -> float:
        return self.conn.last_activity

    @property
    def write_paused(self) -> bool:
        return self.window_paused or self.conn.write_paused

    # -- called by the ActiveStream ------------------------------------------------------
    def encode_headers(self, headers: ResponseHeaders, end_stream: bool) -> None:
        if self.closed:
            return
        h = headers._h
        cfg = self.cfg
        code = headers.status
        if code == 101 and self.extended:
            # RFC 8441 5: the upstream's 101 Switching Protocols is a 200 on an HTTP/2 stream
            # (its upgrade / connection headers are connection-specific and dropped below).
            code = 200
        status = _STATUS_BYTES.get(code) or str(code).encode()
        out = [(b":status", status)]
        server_mode = cfg.server_header_transformation
        has_server = has_date = False
        for k, v in h:
            if k in _RESP_DROP or k[:1] == b":":
                if k == b"server":
                    if server_mode == 0:
                        continue
                    has_server = True
                elif k == b"date":
                    has_date = True
                else:
                    continue
            out.append((k, v))
        if server_mode == 0 or (server_mode == 1 and not has_server):
            out.append((b"server", cfg.server_name))
        if not has_date:
            out.append((b"date", cfg.runtime.http_date()))
        informational = code < 200
        conn = self.conn
        conn.codec.send_headers(self.sid, out, end_stream and not informational)
        if end_stream and not informational:
            self._response_ended()
        conn.flush()

    def encode_data(self, data: bytes, end_stream: bool) -> None:
        if self.closed:
            return
        conn = self.conn
        codec = conn.codec
        codec.send_data(self.sid, data, end_stream)
        if end_stream:
            self._response_ended()
        elif not self.window_paused and codec.pending(self.sid) > _HIGH_WATER:
            self.window_paused = True
            s = self.stream
            if s is not None:
                s.on_write_paused()
        conn.flush()

    def encode_trailers(self, trailers: HeaderMap) -> None:
        if self.closed:
            return
        conn = self.conn
        fields = [p for p in trailers._h if p[0] not in _CONN_SPECIFIC]
        if fields:
            conn.codec.send_trailers(self.sid, fields)
        else:
            # A filter moved the trailers into the body (gRPC-Web): an empty trailer block is no
            # HEADERS frame, so the body ends with an empty DATA frame, as Envoy's codec does.
            conn.codec.send_data(self.sid, b"", True)
        self._response_ended()
        conn.flush()

    def flush_pending(self) -> None:
        self.conn.flush()

    def start_tunnel(self) -> None:
        self.tunnel = True

    def encode_tunnel(self, data: bytes, end_stream: bool) -> None:
        """Upstream tunnel bytes as DATA; ``end_stream`` (the upstream half-closed) is
        END_STREAM. Beyond the client's windows the codec queues them; above ``_HIGH_WATER``
        the upstream's reads are paused until WRITABLE: the same as a body's DATA."""
        self.encode_data(data, end_stream)

    def stream_ended(self) -> None:
        self.stream = None

    def drain_after_response(self) -> None:
        self.drain = True

    def pause_reading(self) -> None:
        self.read_paused = True

    def resume_reading(self) -> None:
        if self.read_paused:
            self.read_paused = False
            n = self.unacked
            if n and not self.closed:
                self.unacked = 0
                self.conn.codec.ack(self.sid, n)
                self.conn.flush()

    def close(self) -> None:
        """End this stream: nothing more will be sent on it."""
        if not self.resp_ended and not self.closed:
            self.abort(h2c.NO_ERROR)

    def abort(self, code: int = h2c.INTERNAL_ERROR) -> None:
        """Reset this stream only (RST_STREAM); the connection stays."""
        if self.closed:
            return
        conn = self.conn
        conn.stats_h2.tx_reset.value += 1
        conn.codec.reset(self.sid, code)
        self._detach()
        conn.flush()

    # -- internal ------------------------------------------------------------------------
    def _response_ended(self) -> None:
        self.resp_ended = True
        conn = self.conn
        if not self.req_ended:
            if self.tunnel:
                return  # a half-closed tunnel: the client may still send (its END_STREAM ends it)
            if conn.codec.pending(self.sid):
                return  # the queued data goes first; WRITABLE finishes the stream
            # The client is still sending a body nobody reads: stop it (RFC 9113 8.1).
            conn.codec.reset(self.sid, h2c.NO_ERROR)
        elif conn.codec.pending(self.sid):
            return
        self._detach()

    def _detach(self) -> None:
        self.closed = True
        # The stream and this object refer to each other: let go of it here, so a finished
        # exchange is freed by reference counting instead of waiting for the cycle collector
        # (which cost a fifth of the CPU of a gRPC call).
        self.stream = None
        conn = self.conn
        if self.unacked:
            conn.codec.ack(self.sid, self.unacked)
            self.unacked = 0
        if conn.streams.pop(self.sid, None) is not None:
            conn.stats_h2.streams_active.value -= 1
        conn.codec.forget(self.sid) if self.resp_ended and not conn.codec.pending(self.sid) else None
        if self.drain and self.resp_ended:
            # Keep-alive is disabled (overload): the listener drain's path once this response is
            # out (flushed first, so the GOAWAY follows its last frame): GOAWAY with the last
            # stream id, the streams in flight finish, then the connection closes.
            conn._flush_now()
            conn.close()
        elif not conn.streams and (conn.goaway_sent or conn.cfg.runtime.draining):
            conn.close()


class Http2ServerConnection(asyncio.Protocol):
    """One downstream HTTP/2 connection."""

    def __init__(self, cfg: HcmConfig, info: Any) -> None:
        self.cfg = cfg
        self.info = info
        self.loop = asyncio.get_event_loop()
        self.transport: Any = None
        self.codec = http2_backends.Codec(False, getattr(cfg, "http2_options", None))
        self.allow_connect = self.codec.options.allow_connect
        self.streams: dict[int, H2ServerStream] = {}
        self.stats = cfg.stats
        self.stats_h2 = _stats_for(cfg)
        self.closed = False
        self.write_paused = False
        self.in_batch = False
        self.flush_scheduled = False
        self.goaway_sent = False
        self.goaway_last = 0
        self.last_activity = 0.0
        self.start = 0.0
        self.backlog = _EMPTY

    @property
    def stream(self) -> Any:
        """None when no stream is active (``HcmConfig.drain`` closes such connections)."""
        for s in self.streams.values():
            return s
        return None

    # -- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        limit = self.info.buffer_limit
        transport.set_write_buffer_limits(high=limit, low=limit // 4)
        st = self.stats
        st.downstream_cx_total.value += 1
        st.downstream_cx_active.value += 1
        self.stats_h2.downstream_cx_http2_total.value += 1
        self.stats_h2.downstream_cx_http2_active.value += 1
        self.start = self.last_activity = self.loop.time()
        self.cfg.runtime.add(self, self.loop)
        self.codec.initiate()
        self._flush_now()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.stats.downstream_cx_rx_bytes_total.value += len(data)
        self.last_activity = self.loop.time()
        self.in_batch = True
        try:
            try:
                events = self.codec.receive(data)
            except h2c.Http2Error as e:
                self._connection_error(e)
                return
            for ev in events:
                kind = ev[0]
                if kind == h2c.DATA:
                    self._on_data(ev[1], ev[2], ev[3], ev[4])
                elif kind == h2c.HEADERS:
                    self._on_headers(ev[1], ev[2], ev[3])
                elif kind == h2c.TRAILERS:
                    self._on_trailers(ev[1], ev[2])
                elif kind == h2c.RESET:
                    self._on_reset(ev[1])
                elif kind == h2c.WRITABLE:
                    self._on_writable(ev[1])
                elif kind == h2c.GOAWAY:
                    # The client will open no more streams; as Envoy does, nothing else changes
                    # (RFC 9113 6.8: the connection stays until it closes it or an idle timeout).
                    pass
                elif kind == h2c.OVERSIZED:
                    self._on_oversized(ev[1])
                elif kind == h2c.MALFORMED:
                    self._on_malformed(ev[1])
                if self.closed:
                    return
        finally:
            self.in_batch = False
        self._flush_now()
        if not self.streams and (self.goaway_sent or self.codec.finished):
            self.close()

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        streams = list(self.streams.values())
        self.streams.clear()
        sh = self.stats_h2
        sh.streams_active.value -= len(streams)
        for ss in streams:
            ss.closed = True
            s = ss.stream
            if s is not None:
                s.on_reset(ResetReason.CONNECTION_TERMINATION)
        if self.cfg.runtime.discard(self):
            st = self.stats
            st.downstream_cx_active.value -= 1
            st.downstream_cx_destroy.value += 1
            sh.downstream_cx_http2_active.value -= 1
            st.downstream_cx_length_ms.record((self.loop.time() - self.start) * 1000)
            self.info.notify_closed()

    def pause_writing(self) -> None:
        self.write_paused = True
        for ss in list(self.streams.values()):
            if ss.stream is not None and not ss.window_paused:
                ss.stream.on_write_paused()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.codec.flushed()
        for ss in list(self.streams.values()):
            if ss.stream is not None and not ss.window_paused:
                ss.stream.on_write_resumed()

    # -- events ---------------------------------------------------------------------------
    def _on_headers(self, sid: int, headers: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        ss = self.streams.get(sid)
        if ss is not None:
            # A second header block without END_STREAM is not trailers: h2 rejects it; ignore.
            return
        if self.goaway_sent and sid > self.goaway_last:
            self.codec.reset(sid, h2c.REFUSED_STREAM)
            return
        sh = self.stats_h2
        if len(headers) > self.cfg.limits.max_headers:
            # More header fields than max_headers_count (the limit HTTP/1.1 answers 431 for):
            # the stream is reset, as Envoy's codec does (http2.header_overflow), and nothing
            # goes upstream; the connection and its other streams go on.
            sh.header_overflow.value += 1
            self.stats.downstream_rq_total.value += 1
            self.stats.downstream_rq_4xx.value += 1
            self.codec.reset(sid, h2c.INTERNAL_ERROR)
            return
        rh, extended = parse_request(headers, self.allow_connect)
        if rh is None:
            # A malformed request header block (RFC 9113 8.1.1): as Envoy, the connection ends
            # (GOAWAY PROTOCOL_ERROR) unless stream_error_on_invalid_http_messaging asks to reset
            # only this stream.
            self.stats.downstream_rq_total.value += 1
            self.stats.downstream_rq_4xx.value += 1
            if not self.codec.options.stream_error_on_invalid_http_messaging:
                self.codec.goaway(h2c.PROTOCOL_ERROR)
                self._connection_error(
                    h2c.Http2Error(h2c.PROTOCOL_ERROR, "malformed request", "rx_messaging_error")
                )
                return
            sh.rx_messaging_error.value += 1
            self.codec.reset(sid, h2c.PROTOCOL_ERROR)
            return
        ss = H2ServerStream(self, sid)
        ss.req_ended = end_stream
        ss.resp_no_body = rh.method == b"HEAD"
        if extended or rh.method == b"CONNECT":
            ss.tunnel_req = True
            ss.extended = extended
        self.streams[sid] = ss
        sh.streams_active.value += 1
        sh.downstream_rq_http2_total.value += 1
        if not end_stream and (rh.get(b"expect") or b"").lower() == b"100-continue":
            # Answered here, as over HTTP/1.1 (Envoy's proxy_100_continue off).
            self.codec.send_headers(sid, [(b":status", b"100")], False)
        s = self.cfg.new_stream(ss)
        ss.stream = s
        s.decode_headers(rh, end_stream)
        if self.cfg.runtime.draining and not self.goaway_sent:
            self._send_goaway(h2c.NO_ERROR)

    def _on_oversized(self, sid: int) -> None:
        # A header block past max_header_list_size: the codec reset that stream, as Envoy's
        # codec does. A request head never reached the proxy; trailers end a proxied stream.
        self.stats_h2.header_overflow.value += 1
        if sid in self.streams:
            self._on_reset(sid, remote=False)
            return
        self.stats.downstream_rq_total.value += 1
        self.stats.downstream_rq_4xx.value += 1

    def _on_data(self, sid: int, data: bytes, n: int, end_stream: bool) -> None:
        ss = self.streams.get(sid)
        if ss is None or ss.stream is None:
            self.codec.ack(sid, n)  # nobody reads it: hand the connection window back
            return
        s = ss.stream
        if end_stream:
            ss.req_ended = True
        if ss.tunnel_req:
            s.decode_tunnel(data, end_stream)
        elif data or end_stream:
            s.decode_data(data, end_stream)
        if ss.read_paused:
            ss.unacked += n
        elif n:
            self.codec.ack(sid, n)
        if end_stream:
            if ss.resp_ended and not ss.closed and not self.codec.pending(sid):
                ss._detach()

    def _on_trailers(self, sid: int, headers: list[tuple[bytes, bytes]]) -> None:
        ss = self.streams.get(sid)
        if ss is None or ss.stream is None:
            return
        self.stats_h2.trailers.value += 1
        ss.req_ended = True
        ss.stream.decode_trailers(HeaderMap.wrap(list(headers)))
        if ss.resp_ended and not ss.closed and not self.codec.pending(sid):
            ss._detach()

    def _on_reset(self, sid: int, remote: bool = True) -> None:
        if remote:
            self.stats_h2.rx_reset.value += 1
        self._end_reset(sid, ResetReason.REMOTE_RESET)

    def _on_malformed(self, sid: int) -> None:
        """The codec reset ``sid`` for an invalid message (stream_error_on_invalid_http_messaging)."""
        self.stats_h2.rx_messaging_error.value += 1
        if not self._end_reset(sid, ResetReason.PROTOCOL_ERROR):
            self.stats.downstream_rq_total.value += 1
            self.stats.downstream_rq_4xx.value += 1

    def _end_reset(self, sid: int, reason: ResetReason) -> bool:
        """``sid`` was reset (by the client or by the codec): end its exchange with ``reason``.
        False when no proxied stream had that id."""
        ss = self.streams.pop(sid, None)
        if ss is None:
            return False
        self.stats_h2.streams_active.value -= 1
        ss.closed = True
        if ss.unacked:
            # Never acknowledged while paused: the connection window gets the bytes back.
            self.codec.ack(sid, ss.unacked)
            ss.unacked = 0
        self.codec.forget(sid)
        s = ss.stream
        if s is not None:
            s.on_reset(reason)
        return True

    def _on_writable(self, sid: int) -> None:
        ss = self.streams.get(sid)
        if ss is None:
            return
        if ss.resp_ended:
            if not self.codec.pending(sid):
                if not ss.req_ended:
                    if ss.tunnel:
                        return  # half-closed tunnel: the client's END_STREAM ends the stream
                    self.codec.reset(sid, h2c.NO_ERROR)
                ss._detach()
            return
        if ss.window_paused:
            ss.window_paused = False
            if not self.write_paused and ss.stream is not None:
                ss.stream.on_write_resumed()

    def _connection_error(self, e: h2c.Http2Error) -> None:
        sh = self.stats_h2
        self.stats.downstream_cx_protocol_error.value += 1
        if e.stat == "too_many_premature_resets":
            sh.too_many_premature_resets.value += 1
            sh.too_many_premature_resets_h2.value += 1
        elif e.stat is not None:
            c = getattr(sh, e.stat, None)
            if c is not None:
                c.value += 1
        sh.goaway_sent.value += 1
        self.goaway_sent = True
        self.in_batch = False
        self._flush_now()
        self.abort()

    # -- writing and control ----------------------------------------------------------------
    def flush(self) -> None:
        """Write queued frames: at the end of the current read, or (for frames produced from
        upstream callbacks) once the current loop callback returns, so the HEADERS, DATA and
        END_STREAM of one upstream read leave in one write."""
        if self.in_batch or self.closed or self.flush_scheduled:
            return
        self.flush_scheduled = True
        self.loop.call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self.flush_scheduled = False
        if self.closed:
            return
        codec = self.codec
        data = codec.data_to_send()
        if data:
            self.transport.write(data)
        if codec.error is not None:
            # Frames produced for upstream responses passed max_outbound_frames while the client
            # did not read: the GOAWAY is written, the connection ends.
            e = codec.error
            codec.error = None
            self._connection_error(e)
            return
        if not self.write_paused:
            codec.flushed()

    def _send_goaway(self, code: int) -> None:
        if self.goaway_sent or self.closed:
            return
        self.goaway_sent = True
        self.goaway_last = self.codec.highest_inbound_stream_id
        self.stats_h2.goaway_sent.value += 1
        self.codec.goaway(code, self.goaway_last)
        self._flush_now()

    def close(self) -> None:
        """Graceful: GOAWAY, then close once the streams in flight are done."""
        if self.closed:
            return
        self._send_goaway(h2c.NO_ERROR)
        if self.streams:
            return
        self._flush_now()
        self.closed = True
        self.transport.close()

    def abort(self) -> None:
        if not self.closed:
            self._flush_now()
            self.closed = True
            self.transport.close()

    # -- timers -----------------------------------------------------------------------------
    def on_tick(self, now: float) -> None:
        """The connection manager's sweep (``stream.connections``): check the deadlines."""
        if self.closed:
            return
        cfg = self.cfg
        if self.streams:
            for ss in list(self.streams.values()):
                s = ss.stream
                if s is None or ss.closed:
                    continue
                if s.done:
                    # Answered, but the client never opened the window for the rest: the stream
                    # idle timeout ends it with RST_STREAM (once).
                    if cfg.stream_idle_timeout and now - s.last_activity >= cfg.stream_idle_timeout:
                        ss.abort(h2c.CANCEL)
                else:
                    s.check_timeouts(now)
        elif cfg.idle_timeout and now - self.last_activity >= cfg.idle_timeout:
            self.stats.downstream_cx_idle_timeout.value += 1
            self.close()
            return
        if cfg.runtime.draining and not self.goaway_sent:
            self.close()
        if cfg.max_connection_duration and now - self.start >= cfg.max_connection_duration:
            if not self.goaway_sent:  # counted once; GOAWAY, then close when streams end
                self.stats.downstream_cx_max_duration_reached.value += 1
            self.close()


class _Sniffer(asyncio.Protocol):
    """Codec AUTO without ALPN: the first bytes decide (the HTTP/2 preface or not). Holds at
    most the 24 bytes of the preface; idle connections are closed after the idle timeout."""

    def __init__(self, cfg: HcmConfig, info: Any) -> None:
        self.cfg = cfg
        self.info = info
        self.transport: Any = None
        self.buf = b""
        self.timer: asyncio.TimerHandle | None = None

    # What the connection manager's drain and sweep need of a connection (stream.connections):
    # a connection that has not sent its first byte is still one of the listener's.
    stream = None
    closed = False
    # A drain does not close it: its first request may be on the way (it is answered with
    # connection: close); the drain-time cut (close_all) aborts it if it stays silent.
    sniffing = True

    def on_tick(self, now: float) -> None:
        return  # the sniffer's own timer bounds how long it waits

    def close(self) -> None:
        self.closed = True
        self.transport.close()

    def abort(self) -> None:
        self.closed = True
        self.transport.abort()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        alpn = negotiated_alpn(self.info, transport)
        if alpn == "h2":
            self._switch(Http2ServerConnection, b"")
            return
        if alpn is not None:
            self._switch(Http1ServerConnection, b"")
            return
        self.cfg.runtime.add(self, asyncio.get_event_loop())
        t = self.cfg.request_headers_timeout or self.cfg.idle_timeout
        if t:
            self.timer = asyncio.get_event_loop().call_later(t, transport.close)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        n = min(len(buf), 24)
        if buf[:n] == h2c.PREFACE[:n]:
            if n < 24:
                self.buf = buf
                return
            self._switch(Http2ServerConnection, buf)
        else:
            self._switch(Http1ServerConnection, buf)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.cfg.runtime.discard(self)
        self.info.notify_closed()

    def _switch(self, cls: Any, buf: bytes) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.cfg.runtime.discard(self)
        p = cls(self.cfg, self.info)
        self.transport.set_protocol(p)
        p.connection_made(self.transport)
        if buf:
            p.data_received(buf)


def negotiated_alpn(info: Any, transport: Any = None) -> str | None:
    """The ALPN protocol of a TLS connection: the listener's ``ConnInfo.negotiated_alpn``, else
    the transport's SSL object; None for cleartext or no ALPN."""
    alpn = getattr(info, "negotiated_alpn", None)
    if alpn:
        return str(alpn)
    if transport is not None:
        ssl_obj = transport.get_extra_info("ssl_object")
        if ssl_obj is not None:
            v = ssl_obj.selected_alpn_protocol()
            return str(v) if v else None
    return None


def server_factory(force_h2: bool) -> Any:
    """The server codec for the registry (``moorline.stream.api.CodecRegistry``):
    ``factory(callbacks, info) -> asyncio.Protocol``. It decides when called, so behind a TLS
    handshake (``net.tls.serve_accepted`` calls it after the handshake) it sees
    ``info.negotiated_alpn``: ``force_h2`` (codec HTTP2) or ALPN "h2" -> HTTP/2; another ALPN
    -> HTTP/1.1; no ALPN -> sniff the preface."""

    def make(cfg: HcmConfig, info: Any) -> asyncio.Protocol:
        if force_h2:
            return Http2ServerConnection(cfg, info)
        alpn = getattr(info, "negotiated_alpn", None)
        if alpn == "h2":
            return Http2ServerConnection(cfg, info)
        if alpn:
            return Http1ServerConnection(cfg, info)
        return _Sniffer(cfg, info)

    return make


_STATUS_BYTES = {c: str(c).encode() for c in range(100, 600)}
