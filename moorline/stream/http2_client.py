"""HTTP/2 upstream connections and the per-host multiplexed pool.

``H2Pool.new_stream(req)`` hands ``req.on_pool_ready(stream)`` an ``H2UpstreamStream`` on a
connection with a free stream slot, or queues ``req`` (bounded by the cluster's
``max_pending_requests``) and opens a new connection (bounded by ``max_connections``) when the
connections being set up cannot take the queue. A connection's slots are the smaller of the
peer's SETTINGS_MAX_CONCURRENT_STREAMS and the cluster's
``http2_protocol_options.max_concurrent_streams`` (unset: no limit of ours, as Envoy's default).

``H2UpstreamStream`` is what the router (``moorline.proxy.router``) uses as its upstream
connection: ``send_headers(req, headers, end_stream)``, ``send_data``, ``send_trailers``,
``pause_reading`` / ``resume_reading`` (stop / restart window updates for this stream, so a
slow downstream slows the upstream), ``release()`` (the exchange is over), ``abort()``
(RST_STREAM CANCEL: the upstream sees the cancellation), ``closed`` and ``pool``. It calls on
the request: ``on_upstream_headers``, ``on_upstream_1xx``, ``on_upstream_data``,
``on_upstream_trailers``, ``on_upstream_reset(reason)``, ``on_upstream_batch_end()``,
``on_upstream_write_paused()`` / ``on_upstream_write_resumed()``.

Bounds: request DATA beyond the upstream's windows is queued in the codec; above
``_HIGH_WATER`` bytes for one stream the downstream is paused (``on_upstream_write_paused``)
until it drained. The transport's write high-water mark is the cluster's
``per_connection_buffer_limit``.

A GOAWAY from the upstream stops new streams on that connection; streams above its last
stream id are failed as refused (retriable), the others finish; the connection closes when
empty.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

from moorline.net import upstream as net_upstream
from moorline.protocol import http2 as h2c
from moorline.protocol import http2_backends
from moorline.protocol.headers import HeaderMap, RequestHeaders, ResponseHeaders
from moorline.stream.api import GOAWAY_REFUSED, ResetReason
from moorline.stream.http1_client import PendingRequest, may_connect, queue_request

_HIGH_WATER = 64 * 1024
_UNLIMITED_STREAMS = 2**31 - 1
# Connection-specific request headers (RFC 9113 8.2.2); "te" is kept only as "trailers".
_DROP = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"host")
)
_PSEUDO_ORDER = (b":method", b":scheme", b":authority", b":path")


class H2ClusterStats:
    """``cluster.<name>.http2.*`` (Envoy's upstream codec stats)."""

    __slots__ = ("goaway_received", "header_overflow", "rx_reset", "streams_active", "tx_reset")

    def __init__(self, cluster: Any) -> None:
        scope = cluster.stats.scope.scope("http2.")
        self.rx_reset = scope.counter("rx_reset")
        self.tx_reset = scope.counter("tx_reset")
        self.goaway_received = scope.counter("goaway_received")
        self.header_overflow = scope.counter("header_overflow")
        self.streams_active = scope.gauge("streams_active")


def request_headers(headers: RequestHeaders) -> list[tuple[bytes, bytes]]:
    """The HTTP/2 header list for a proxied request: pseudo-headers first, connection-specific
    headers dropped, an empty ``:authority`` left out."""
    out = headers.pseudo()
    for k, v in headers._h:
        if k in _DROP:
            continue
        if k == b"te":
            if v.lower() == b"trailers":
                out.append((k, v))
        else:
            out.append((k, v))
    return out


def tunnel_request_headers(
    headers: RequestHeaders, allow_connect: bool
) -> tuple[list[tuple[bytes, bytes]], bytes | None] | None:
    """The HTTP/2 header list of a CONNECT or upgrade request, with the upgrade token sent as
    ``:protocol`` (None when ``headers`` is neither). ``(block, protocol)``:

    - CONNECT: ``:method CONNECT`` and ``:authority`` only (RFC 9113 8.5); protocol None;
    - an HTTP/1.1 upgrade (``upgrade: websocket`` with ``connection: upgrade``, as the connection
      manager passes it on) to a cluster with ``allow_connect``: an RFC 8441 extended CONNECT,
      ``:method CONNECT``, ``:protocol <upgrade>``, ``:scheme``, ``:authority``, ``:path`` (Envoy's
      translation); protocol is the upgrade token. Without ``allow_connect`` an upgrade goes as
      the plain request it is (None): its upgrade headers are connection-specific, so the
      upstream answers it as an ordinary request and the router treats that as a refusal."""
    if headers.method == b"CONNECT":
        out = [(b":method", b"CONNECT"), (b":authority", headers.authority)]
        protocol = None
    else:
        upg = headers.get(b"upgrade")
        if upg is None or not allow_connect:
            return None
        protocol = upg.strip().lower()
        out = [
            (b":method", b"CONNECT"),
            (b":protocol", protocol),
            (b":scheme", headers.scheme or b"http"),
            (b":authority", headers.authority),
            (b":path", headers.path),
        ]
    for k, v in headers._h:
        if k in _DROP or k == b"content-length":
            continue
        if k == b"te":
            if v.lower() == b"trailers":
                out.append((k, v))
        else:
            out.append((k, v))
    return out, protocol


def _regular(headers: Any) -> list[tuple[bytes, bytes]]:
    return [p for p in headers if p[0][:1] != b":"]


class H2UpstreamStream:
    """One request's stream on an upstream HTTP/2 connection (the router's ``conn``)."""

    __slots__ = (
        "closed",
        "conn",
        "local_end",
        "pool",
        "protocol",
        "read_paused",
        "remote_end",
        "req",
        "sid",
        "tunnel",
        "unacked",
        "window_paused",
    )

    def __init__(self, conn: Http2ClientConnection) -> None:
        self.conn = conn
        self.pool = conn.pool
        self.sid = 0
        self.req: Any = None
        self.closed = False
        self.local_end = False
        self.remote_end = False
        self.read_paused = False
        self.unacked = 0
        self.window_paused = False
        # A CONNECT (tunnel, protocol None) or an extended CONNECT (protocol: the upgrade
        # token): its 2xx opens the tunnel; an extended CONNECT's 200 reaches the router as
        # the 101 an HTTP/1.1 upstream would have sent.
        self.tunnel = False
        self.protocol: bytes | None = None

    def send_headers(self, req: Any, headers: RequestHeaders, end_stream: bool) -> None:
        self.req = req
        conn = self.conn
        if conn.closed or self.closed:
            conn.loop.call_soon(self._fail_later, ResetReason.CONNECTION_TERMINATION)
            return
        if conn.goaway:
            # A handle given out before the upstream's GOAWAY: the stream would be refused (by
            # nghttp2 itself, with the RESET reported only on the next upstream read; or ignored
            # by the peer): refuse it here, retryable like the streams the GOAWAY cut.
            conn.loop.call_soon(self._fail_later, ResetReason.REMOTE_REFUSED_STREAM)
            return
        codec = conn.codec
        sid = self.sid = codec.next_stream_id()
        conn.streams[sid] = self
        conn.h2stats.streams_active.value += 1
        conn.requests += 1
        self.local_end = end_stream
        t = tunnel_request_headers(headers, codec.options.allow_connect)
        if t is None:
            block = request_headers(headers)
        else:
            block, self.protocol = t
            self.tunnel = True
        codec.send_headers(sid, block, end_stream)
        conn.flush_soon()

    def _fail_later(self, reason: ResetReason) -> None:
        req = self.req
        if req is not None and not self.closed:
            self._detach()
            req.on_upstream_reset(reason)

    def send_data(self, data: bytes, end_stream: bool) -> None:
        if self.closed or self.local_end or not self.sid:
            return
        conn = self.conn
        codec = conn.codec
        if end_stream:
            self.local_end = True
        codec.send_data(self.sid, data, end_stream)
        if not self.window_paused and codec.pending(self.sid) > _HIGH_WATER:
            self.window_paused = True
            if self.req is not None:
                self.req.on_upstream_write_paused()
        conn.flush_soon()

    def send_trailers(self, trailers: HeaderMap) -> None:
        if self.closed or self.local_end or not self.sid:
            return
        self.local_end = True
        self.conn.codec.send_trailers(self.sid, [p for p in trailers._h if p[0] not in _DROP])
        self.conn.flush_soon()

    def pause_reading(self) -> None:
        self.read_paused = True

    def resume_reading(self) -> None:
        if self.read_paused:
            self.read_paused = False
            n = self.unacked
            if n and not self.closed:
                self.unacked = 0
                self.conn.codec.ack(self.sid, n)
                self.conn.flush_soon()

    def release(self) -> None:
        """The response is complete (or the router gave up before sending): free the slot."""
        if self.closed:
            return
        if self.sid and (not self.local_end or self.conn.codec.pending(self.sid)):
            # The response ended before the request: tell the upstream to stop waiting for it.
            self.conn.codec.reset(self.sid, h2c.NO_ERROR)
            self.conn.flush_soon()
        self._detach()

    def abort(self) -> None:
        """Cancel the exchange: RST_STREAM CANCEL (a gRPC server sees the call cancelled)."""
        self.req = None
        if self.closed:
            return
        if self.sid and not self.remote_end:
            self.conn.h2stats.tx_reset.value += 1
            self.conn.codec.reset(self.sid, h2c.CANCEL)
            self.conn.flush_soon()
        self._detach()

    def _detach(self) -> None:
        self.closed = True
        if self.unacked:
            # Bytes held while paused: the stream is gone, give them back to the connection window.
            self.conn.codec.ack(self.sid, self.unacked)
            self.unacked = 0
            self.conn.flush_soon()
        self.conn.stream_done(self)


class Http2ClientConnection(asyncio.Protocol):
    """One upstream HTTP/2 connection carrying many streams."""

    def __init__(self, pool: H2Pool, high: bool = False) -> None:
        self.pool = pool
        self.high = high  # opened for a priority HIGH request: counts in cluster.high.cx_active
        self.loop = pool.loop
        self.cluster = pool.cluster
        self.stats = pool.cluster.stats
        self.h2stats = pool.h2stats
        self.codec = http2_backends.Codec(True, pool.options)
        self.transport: Any = None
        self.streams: dict[int, H2UpstreamStream] = {}
        self.reserved = 0  # handles given out (streams opened or about to be)
        self.requests = 0
        self.connected = False
        self.closed = False
        self.goaway = False
        self.write_paused = False
        self.in_batch = False
        self.flush_scheduled = False
        self.idle_since = 0.0

    # -- capacity ---------------------------------------------------------------------------
    def capacity(self) -> int:
        if self.closed or self.goaway:
            return 0
        mrpc = self.cluster.max_requests_per_connection
        limit = min(self.codec.peer_max_concurrent_streams, self.pool.max_streams)
        free = limit - self.reserved
        if mrpc:
            free = min(free, mrpc - self.requests - (self.reserved - len(self.streams)))
        return max(free, 0)

    def new_handle(self) -> H2UpstreamStream:
        self.reserved += 1
        return H2UpstreamStream(self)

    def stream_done(self, s: H2UpstreamStream) -> None:
        self.reserved -= 1
        if s.sid and self.streams.pop(s.sid, None) is not None:
            self.h2stats.streams_active.value -= 1
            self.codec.forget(s.sid)
        if not self.reserved:
            self.idle_since = self.loop.time()
            mrpc = self.cluster.max_requests_per_connection
            if self.goaway or (mrpc and self.requests >= mrpc) or self.pool.draining:
                if mrpc and self.requests >= mrpc:
                    self.stats.upstream_cx_max_requests.value += 1
                self.close()
                return
        self.pool.on_slot_free(self)

    # -- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        limit = self.cluster.per_connection_buffer_limit
        transport.set_write_buffer_limits(high=limit, low=limit // 4)
        self.stats.upstream_cx_http2_total.value += 1
        self.codec.initiate()
        self.flush()

    def data_received(self, data: bytes) -> None:
        self.stats.upstream_cx_rx_bytes_total.value += len(data)
        self.in_batch = True
        touched: dict[int, Any] = {}
        settings = False
        try:
            try:
                events = self.codec.receive(data)
            except h2c.Http2Error as e:
                self.stats.upstream_cx_protocol_error.value += 1
                self.in_batch = False
                self.flush()
                self._fail_all(ResetReason.PROTOCOL_ERROR, e.detail)
                self.close()
                return
            streams = self.streams
            for ev in events:
                kind = ev[0]
                if kind == h2c.DATA:
                    s = streams.get(ev[1])
                    if s is None:
                        self.codec.ack(ev[1], ev[3])
                        continue
                    req = s.req
                    if s.read_paused:
                        s.unacked += ev[3]
                    else:
                        self.codec.ack(ev[1], ev[3])
                    if ev[4]:
                        s.remote_end = True
                    if req is not None:
                        touched[ev[1]] = req
                        req.on_upstream_data(ev[2], ev[4])
                elif kind == h2c.HEADERS:
                    s = streams.get(ev[1])
                    if s is None or s.req is None:
                        continue
                    hs = ev[2]
                    st = hs[0][1] if hs and hs[0][0] == b":status" else b""
                    if len(st) != 3 or not st.isdigit():
                        # Malformed response (RFC 9113 8.3.2): a stream error, not a crash.
                        req = s.req
                        s.req = None
                        self.codec.reset(ev[1], h2c.PROTOCOL_ERROR)
                        s._detach()
                        touched.pop(ev[1], None)
                        req.on_upstream_reset(ResetReason.PROTOCOL_ERROR, "malformed :status")
                        continue
                    if ev[3]:
                        s.remote_end = True
                    req = touched[ev[1]] = s.req
                    status = int(st)
                    if s.tunnel and 200 <= status < 300 and not ev[3]:
                        self._tunnel_open(s, req, status, hs)
                        continue
                    req.on_upstream_headers(ResponseHeaders.make(status, _regular(hs)), ev[3])
                elif kind == h2c.TRAILERS:
                    s = streams.get(ev[1])
                    if s is None or s.req is None:
                        continue
                    s.remote_end = True
                    touched[ev[1]] = s.req
                    s.req.on_upstream_trailers(HeaderMap.wrap(list(ev[2])))
                elif kind == h2c.INFORMATIONAL:
                    s = streams.get(ev[1])
                    if s is not None and s.req is not None:
                        hs = ev[2]
                        code = hs[0][1] if hs and hs[0][0] == b":status" else b"100"
                        s.req.on_upstream_1xx(ResponseHeaders.make(int(code), _regular(hs)))
                elif kind == h2c.RESET:
                    self.h2stats.rx_reset.value += 1
                    self._stream_reset(
                        ev[1],
                        touched,
                        ResetReason.REMOTE_REFUSED_STREAM
                        if ev[2] == h2c.REFUSED_STREAM
                        else ResetReason.REMOTE_RESET,
                    )
                elif kind == h2c.OVERSIZED or kind == h2c.MALFORMED:
                    # The response's header block was past our max_header_list_size, or broke
                    # HTTP/2's messaging rules: the codec reset that stream alone; the request
                    # fails as an upstream protocol error (502), the connection goes on.
                    if kind == h2c.OVERSIZED:
                        self.h2stats.header_overflow.value += 1
                    self._stream_reset(
                        ev[1],
                        touched,
                        ResetReason.PROTOCOL_ERROR,
                        "response headers too large" if kind == h2c.OVERSIZED else str(ev[2]),
                    )
                elif kind == h2c.WRITABLE:
                    s = streams.get(ev[1])
                    if s is not None and s.window_paused:
                        s.window_paused = False
                        if s.req is not None and not self.write_paused:
                            s.req.on_upstream_write_resumed()
                elif kind == h2c.GOAWAY:
                    self._on_goaway(ev[1])
                elif kind == h2c.SETTINGS:
                    settings = True
        finally:
            self.in_batch = False
        self.flush()
        for req in touched.values():
            req.on_upstream_batch_end()
        if settings and not self.closed:
            self.pool.on_slot_free(self)

    def _tunnel_open(self, s: H2UpstreamStream, req: Any, code: int, hs: Any) -> None:
        """A 2xx to CONNECT or extended CONNECT: the stream is a tunnel. An extended CONNECT's
        200 becomes 101 with ``upgrade: <protocol>`` (Envoy's translation back to HTTP/1.1),
        so the connection manager answers an HTTP/1.1 client with Switching Protocols (and an
        HTTP/2 one with 200 again)."""
        regular = _regular(hs)
        if s.protocol is not None:
            code = 101
            regular = [p for p in regular if p[0] != b"content-length"]
            regular.append((b"upgrade", s.protocol))
        req.on_upstream_headers(ResponseHeaders.make(code, regular), False)
        if s.req is req and not s.closed:
            req.on_upstream_upgrade(b"")

    def _stream_reset(self, sid: int, touched: dict[int, Any], reason: ResetReason, detail: str = "") -> None:
        """``sid`` was reset (by the upstream or by the codec): its request fails with ``reason``."""
        s = self.streams.get(sid)
        if s is None:
            return
        req = s.req
        s.req = None
        s.remote_end = True
        s._detach()
        touched.pop(sid, None)
        if req is not None:
            req.on_upstream_reset(reason, detail)

    def _on_goaway(self, last_stream_id: int) -> None:
        self.goaway = True
        self.h2stats.goaway_received.value += 1
        for sid, s in list(self.streams.items()):
            if sid > last_stream_id:
                req = s.req
                s.req = None
                s._detach()
                if req is not None:
                    req.on_upstream_reset(ResetReason.REMOTE_REFUSED_STREAM, GOAWAY_REFUSED)
        if not self.reserved:
            self.close()

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        was_closed = self.closed
        self.closed = True
        self.pool.on_connection_closed(self, remote=not was_closed)
        self._fail_all(ResetReason.CONNECTION_TERMINATION)

    def _fail_all(self, reason: ResetReason, detail: str = "") -> None:
        streams = list(self.streams.values())
        for s in streams:
            req = s.req
            s.req = None
            if not s.closed:
                s.closed = True
                self.reserved -= 1
            if req is not None:
                req.on_upstream_reset(reason, detail)
        if self.streams:
            self.h2stats.streams_active.value -= len(self.streams)
            self.streams.clear()

    def pause_writing(self) -> None:
        self.write_paused = True
        for s in list(self.streams.values()):
            if s.req is not None and not s.window_paused:
                s.req.on_upstream_write_paused()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.codec.flushed()
        for s in list(self.streams.values()):
            if s.req is not None and not s.window_paused:
                s.req.on_upstream_write_resumed()

    # -- writing and control -----------------------------------------------------------------
    def flush_soon(self) -> None:
        """Write once the current loop callback returns: the HEADERS, DATA and END_STREAM a
        downstream read produces for this connection (a gRPC request is all three) leave in one
        write instead of one each."""
        if self.in_batch or self.flush_scheduled or self.transport is None or self.closed:
            return
        self.flush_scheduled = True
        self.loop.call_soon(self._flush_scheduled)

    def _flush_scheduled(self) -> None:
        self.flush_scheduled = False
        self.flush()

    def flush(self) -> None:
        if self.in_batch or self.transport is None or self.closed:
            return
        codec = self.codec
        data = codec.data_to_send()
        if data:
            self.stats.upstream_cx_tx_bytes_total.value += len(data)
            self.transport.write(data)
        if codec.error is not None:
            # Past max_outbound_frames while the upstream did not read: GOAWAY written, the
            # connection ends and its requests fail.
            e = codec.error
            codec.error = None
            self.stats.upstream_cx_protocol_error.value += 1
            self._fail_all(ResetReason.PROTOCOL_ERROR, e.detail)
            self.close()
            return
        if not self.write_paused:
            codec.flushed()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.stats.upstream_cx_destroy_local.value += 1
            if self.transport is not None:
                if not self.codec.goaway_sent:
                    self.codec.goaway(h2c.NO_ERROR)
                    data = self.codec.data_to_send()
                    if data:
                        self.transport.write(data)
                self.transport.close()


class H2Pool:
    """Multiplexed HTTP/2 connections to one host of one cluster; kept on the host
    (``host.h2pool``) and freed with it. ``drain()``: connections without streams close now,
    the others when their last stream ends."""

    def __init__(self, host: Any, cluster: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.host = host
        self.cluster = cluster
        self.loop = loop
        self.options = options_for(cluster)
        self.max_streams = self.options.max_concurrent_streams
        self.h2stats = _cluster_h2_stats(cluster)
        self.conns: list[Http2ClientConnection] = []
        self.connecting: list[Http2ClientConnection] = []
        self.pending: collections.deque[PendingRequest] = collections.deque()
        self.closed = False
        self.draining = False
        self._sweep: asyncio.TimerHandle | None = None

    def new_stream(self, req: Any) -> PendingRequest | None:
        for conn in self.conns:
            if conn.capacity() > 0:
                req.on_pool_ready(conn.new_handle())
                return None
        p = queue_request(self, req)
        if p is not None:
            self._maybe_open(p.high)
        return p

    def _maybe_open(self, high: bool) -> None:
        """Open a connection (counted against ``high``'s limit) when the queued requests
        outnumber the streams the connections being set up will take (their peer limit is not
        known yet)."""
        expected = len(self.connecting) * self.max_streams
        live = sum(1 for p in self.pending if not p.cancelled)
        if live > expected and may_connect(self.cluster, high):
            self._open(high)

    def _open(self, high: bool = False) -> None:
        cluster = self.cluster
        stats = cluster.stats
        conn = Http2ClientConnection(self, high)
        self.connecting.append(conn)
        stats.upstream_cx_total.value += 1
        stats.upstream_cx_active.value += 1
        if high:
            cluster.high.cx_active += 1
        self.host.active_cx += 1
        start = self.loop.time()

        def done(err: BaseException | None, timed_out: bool) -> None:
            if conn in self.connecting:
                self.connecting.remove(conn)
            if err is None:
                stats.upstream_cx_connect_ms.record((self.loop.time() - start) * 1000)
                if conn.closed:
                    # Closed between the connect and this callback (connection_lost has accounted
                    # it); never a member of conns. Closed by the peer before it served anything:
                    # its queue fails as on a connect failure. It may also have served requests
                    # already (its SETTINGS arrived first and the queue went onto it) and been
                    # closed after a GOAWAY: the requests it refused are queued for the next one.
                    if conn.requests and self.pending and not self.closed:
                        self._maybe_open(self.pending[0].high)
                    else:
                        self._fail_queued("delayed connect error: connection closed by peer")
                    return
                conn.connected = True
                if self.closed:
                    conn.close()
                    return
                self.conns.append(conn)
                self.on_slot_free(conn)
                return
            stats.upstream_cx_active.value -= 1
            if high:
                cluster.high.cx_active -= 1
            self.host.active_cx -= 1
            conn.closed = True
            if isinstance(err, asyncio.CancelledError) and not timed_out:
                return
            if timed_out:
                stats.upstream_cx_connect_timeout.value += 1
                reason = "connection timeout"
            else:
                n = getattr(err, "errno", None)
                reason = "delayed connect error: " + (str(n) if n else type(err).__name__)
            stats.upstream_cx_connect_fail.value += 1
            self._fail_queued(reason)

        net_upstream.connect(self.loop, self.host, conn, cluster.connect_timeout, cluster.tcp_keepalive, done)

    def _fail_queued(self, reason: str) -> None:
        """Fail the queued requests the connections still being set up and the live ones
        cannot serve."""
        stats = self.cluster.stats
        room = len(self.connecting) * self.max_streams + sum(c.capacity() for c in self.conns)
        while self.pending and len(self.pending) > room:
            p = self.pending.popleft()
            p.dequeued(stats)
            if not p.cancelled:
                p.req.on_pool_failure(ResetReason.CONNECTION_FAILURE, reason)

    def on_slot_free(self, conn: Http2ClientConnection) -> None:
        """A stream slot opened on ``conn`` (stream done, settings, connected)."""
        pending = self.pending
        stats = self.cluster.stats
        while pending and conn.capacity() > 0:
            p = pending.popleft()
            p.dequeued(stats)
            if p.cancelled:
                continue
            p.req.on_pool_ready(conn.new_handle())
        if not conn.reserved and not conn.closed:
            if self.draining:
                conn.close()
            else:
                self._arm_sweep()

    def on_connection_idle(self, handle: H2UpstreamStream) -> None:
        """The router got a stream it no longer needs (it finished while waiting)."""
        handle.release()

    def on_connection_closed(self, conn: Http2ClientConnection, remote: bool) -> None:
        cluster = self.cluster
        stats = cluster.stats
        early = False
        if conn in self.conns:
            self.conns.remove(conn)
        elif conn in self.connecting:
            # Closed before its connect callback: it will not take the queue any more; the
            # callback decides what happens to the queue (see _open).
            self.connecting.remove(conn)
            early = True
        stats.upstream_cx_active.value -= 1
        if conn.high:
            cluster.high.cx_active -= 1
        stats.upstream_cx_destroy.value += 1
        self.host.active_cx -= 1
        if remote:
            stats.upstream_cx_destroy_remote.value += 1
        if conn.streams:
            stats.upstream_cx_destroy_with_active_rq.value += 1
            if remote:
                stats.upstream_cx_destroy_remote_with_active_rq.value += 1
        if self.pending and not self.closed and not early:
            self._maybe_open(self.pending[0].high)

    def _arm_sweep(self) -> None:
        t = self.cluster.idle_timeout
        if t and self._sweep is None and not self.draining:
            self._sweep = self.loop.call_later(max(t / 4, 0.01), self._sweep_idle)

    def _sweep_idle(self) -> None:
        """Close connections without streams for longer than the cluster's idle timeout."""
        self._sweep = None
        t = self.cluster.idle_timeout
        if not t or self.closed:
            return
        now = self.loop.time()
        again = False
        for conn in list(self.conns):
            if conn.reserved:
                continue
            if now - conn.idle_since >= t:
                self.cluster.stats.upstream_cx_idle_timeout.value += 1
                conn.close()
            else:
                again = True
        if again:
            self._arm_sweep()

    def drain(self) -> None:
        self.draining = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for conn in list(self.conns):
            if not conn.reserved:
                conn.close()

    def close(self) -> None:
        self.closed = True
        self.drain()


def _cluster_h2_stats(cluster: Any) -> H2ClusterStats:
    """The cluster's ``http2.*`` stats, kept on the cluster (``cluster.h2_stats``)."""
    st = cluster.h2_stats
    if st is None:
        st = cluster.h2_stats = H2ClusterStats(cluster)
    return st  # type: ignore[no-any-return]


def options_for(cluster: Any) -> h2c.Http2Options:
    """The cluster's ``http2_protocol_options`` compiled (invalid values fall back to defaults:
    the cluster compiler owns config validation)."""
    proto = getattr(cluster, "http2_protocol_options", None)
    opts, _err = h2c.Http2Options.from_proto(proto, "http2_protocol_options")
    if proto is None or not proto.HasField("max_concurrent_streams"):
        # Envoy's default (2147483647): an upstream connection carries as many streams as the
        # upstream's SETTINGS_MAX_CONCURRENT_STREAMS allows. (Downstream keeps moorline's 100.)
        opts.max_concurrent_streams = _UNLIMITED_STREAMS
    return opts


def pool_for(host: Any, loop: asyncio.AbstractEventLoop) -> H2Pool:
    """The HTTP/2 pool of ``host`` (``host.h2pool``, beside the HTTP/1.1 ``host.pool``), made on
    first use; draining when the host already left its cluster (see ``http1_client.pool_for``)."""
    p = host.h2pool
    if p is None or p.closed:
        p = host.h2pool = H2Pool(host, host.cluster, loop)
        if host.removed:
            p.draining = True
    return p  # type: ignore[no-any-return]
