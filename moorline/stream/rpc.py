"""x-protocol (RPC) connections: the downstream connection and the upstream pools.

``RpcServerConnection(handler, info, codec, sniff)`` is the ``asyncio.Protocol`` of one
downstream connection: a ``FrameReader`` cuts the bytes into frames, heartbeats are answered
here, requests and oneways go to ``handler.on_rpc_request(conn, frame)`` (the proxy,
``moorline.proxy.rpc_proxy``), responses come back through ``conn.send(raw)``. With ``codec``
None the first bytes pick it among ``sniff`` (each codec's ``match``). At most
``handler.max_pending`` requests are in flight per connection: beyond, the request gets an
``OVERFLOW`` local reply; while the connection's write buffer is above its high-water mark
(``info.buffer_limit``) its requests are not read. Bytes that are not the protocol (``CodecError``) count
``codec_error`` and close the connection; a frame that decodes but cannot come from a client
(a response) is answered with a ``CODEC_ERROR`` local reply first (its request id is known).

Upstream, per host and codec (``pool_for(host, codec, loop)``, kept in ``host.rpcpool``):

- ``MultiplexPool``: one ``RpcClientConnection`` per host (another only once
  ``max_requests_per_connection`` retired the first), connected lazily. Each request gets an
  upstream request id allocated by the connection (``codec.with_request_id``); the response is
  matched by it and handed back to its request, which restores the downstream id. A response
  whose id nobody waits for (a request that timed out) is dropped and counted in
  ``cluster.<name>.rpc.upstream_rq_unknown_id``.
- ``PingPongPool``: one request at a time per connection, an idle list, new connections within
  the cluster's ``max_connections``; a request abandoned in flight (timeout, downstream gone)
  closes its connection, so its late answer can never become the next request's, and so does
  an answer whose id is not the in-flight request's (or that comes with none in flight).

Connections without a request in flight close after the cluster's ``idle_timeout``
(``common_http_protocol_options``, default 1 hour; one sweep timer per pool). Both queue
requests while connecting (bounded by ``max_pending_requests``) and check
``max_requests``: over a breaker the request fails with ``Reason.OVERFLOW``
(``upstream_rq_pending_overflow``), and so does a oneway (done once written, so outside
``max_requests``) for a connection whose write buffer is above the cluster's
``per_connection_buffer_limit`` (an upstream that does not read). A connect failure or timeout fails the queued requests
with ``Reason.UPSTREAM_RESET`` and ``connect_failure=True`` (the proxy may retry on another
host); a connection dying with requests in flight fails each of them the same way with
``connect_failure=False``. A connection reset between the connect and its callback is a
connect failure of its queued requests (the race the HTTP pools have).

The request object (the proxy's) has ``frame``, ``oneway`` and the slots ``up_conn``,
``up_id``, ``up_state`` the pool manages, and takes ``on_upstream_response(frame)``,
``on_upstream_failure(reason, detail, connect_failure)`` and ``on_oneway_sent()``. No Task or Future per request:
``pool.send(req)``, ``pool.cancel(req)`` and callbacks only.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import TYPE_CHECKING, Any

from moorline.net import upstream as net_upstream
from moorline.protocol.xprotocol.api import CodecError, FrameKind, FrameReader, Match, Reason

if TYPE_CHECKING:
    from moorline.protocol.xprotocol.api import Frame, XCodec

log = logging.getLogger("moorline.rpc")

SNIFF_MAX = 64  # bytes a protocol sniff may hold before giving up
MAX_ID = 0x7FFFFFFF

# Keepalive of multiplexed upstream connections whose codec has heartbeats (after MOSN's: a
# heartbeat on a connection quiet for KEEPALIVE_INTERVAL, closed after KEEPALIVE_MAX_MISSES
# heartbeats in a row go unanswered for KEEPALIVE_TIMEOUT each); one pool timer, every
# KEEPALIVE_TICK seconds.
KEEPALIVE_INTERVAL = 15.0
KEEPALIVE_TIMEOUT = 5.0
KEEPALIVE_MAX_MISSES = 3
KEEPALIVE_TICK = 1.0

# request.up_state
IDLE = 0
QUEUED = 1
IN_FLIGHT = 2
DONE = 3


# -- downstream -----------------------------------------------------------------------------------


class RpcServerConnection(asyncio.Protocol):
    """One downstream connection. ``handler`` is the proxy: ``stats`` (``codec_error``,
    ``heartbeat``, ``cx_active``, ...), ``max_pending``, ``on_rpc_request(conn, frame)``,
    ``on_rpc_overflow(conn, frame)``, ``on_rpc_closed(conn)``."""

    __slots__ = (
        "_sniff",
        "active",
        "closed",
        "codec",
        "handler",
        "info",
        "last_rx",
        "reader",
        "sniff_codecs",
        "transport",
        "write_paused",
    )

    def __init__(self, handler: Any, info: Any, codec: XCodec | None, sniff: tuple[XCodec, ...] = ()) -> None:
        self.handler = handler
        self.info = info
        self.codec = codec
        self.sniff_codecs = sniff
        self.reader: FrameReader | None = FrameReader(codec) if codec is not None else None
        self._sniff = b""
        self.transport: Any = None
        self.closed = False
        self.write_paused = False
        self.active: set[Any] = set()  # requests in flight (the proxy's objects)
        self.last_rx = 0.0  # loop time of the last read (the proxy's idle sweep reads it)

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.last_rx = asyncio.get_running_loop().time()
        limit = getattr(self.info, "buffer_limit", 0) or 1024 * 1024
        transport.set_write_buffer_limits(high=limit, low=limit // 4)
        self.handler.stats.cx_active.value += 1

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.last_rx = asyncio.get_running_loop().time()
        reader = self.reader
        if reader is None:
            reader = self._sniff_codec(data)
            if reader is None:
                return
            data, self._sniff = self._sniff, b""
        try:
            frames = reader.feed(data)
        except CodecError as e:
            self._codec_error(None, e.detail)
            return
        codec = reader.codec
        handler = self.handler
        for raw in frames:
            if self.closed:
                return
            try:
                frame = codec.decode(raw)
            except CodecError as e:
                self._codec_error(None, e.detail)
                return
            kind = frame.kind
            if kind == FrameKind.REQUEST or kind == FrameKind.ONEWAY:
                if len(self.active) >= handler.max_pending:
                    handler.on_rpc_overflow(self, frame)
                    continue
                handler.on_rpc_request(self, frame)
            elif kind == FrameKind.HEARTBEAT:
                handler.stats.heartbeat.value += 1
                self.send(codec.heartbeat_reply(frame))
            elif kind == FrameKind.GOAWAY or kind == FrameKind.HEARTBEAT_RESPONSE:
                continue
            else:
                self._codec_error(frame, "unexpected response from the downstream")
                return
        if reader.error is not None and not self.closed:
            # Garbage after whole frames in the same read: those were served first.
            self._codec_error(None, reader.error.detail)

    def _sniff_codec(self, data: bytes) -> FrameReader | None:
        buf = self._sniff = self._sniff + data
        undecided = False
        for c in self.sniff_codecs:
            m = c.match(buf)
            if m == Match.YES:
                self.codec = c
                self.reader = FrameReader(c)
                return self.reader
            if m == Match.NEED_MORE:
                undecided = True
        if not undecided or len(buf) >= SNIFF_MAX:
            self._codec_error(None, "no protocol matches")
        return None

    def _codec_error(self, frame: Frame | None, detail: str) -> None:
        self.handler.stats.codec_error.value += 1
        log.debug("rpc downstream codec error: %s", detail)
        if frame is not None and self.codec is not None:
            self.handler.on_rpc_codec_error(self, frame, detail)
        self.close()

    def send(self, raw: bytes) -> None:
        if not self.closed:
            self.transport.write(raw)

    def pause_writing(self) -> None:
        # A client that does not read its answers: stop reading its requests, so what waits in
        # the write buffer stays within the high-water mark plus the requests in flight.
        self.write_paused = True
        if not self.closed:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if not self.closed:
            self.transport.resume_reading()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()  # writes what is buffered first

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.handler.stats.cx_active.value -= 1
        active, self.active = self.active, set()
        self.handler.on_rpc_closed(self, active)
        self.info.notify_closed()


# -- upstream -------------------------------------------------------------------------------------


class RpcClientConnection(asyncio.Protocol):
    """One upstream connection of a pool (multiplexed or one request at a time)."""

    __slots__ = (
        "closed",
        "codec",
        "connected",
        "hb_id",
        "hb_misses",
        "hb_sent",
        "idle_since",
        "inflight",
        "last_active",
        "next_id",
        "out",
        "pool",
        "reader",
        "requests",
        "retired",
        "stats",
        "transport",
        "write_paused",
    )

    def __init__(self, pool: RpcPool) -> None:
        self.pool = pool
        self.codec = pool.codec
        self.stats = pool.cluster.stats
        self.reader = FrameReader(pool.codec)
        self.inflight: dict[int, Any] = {}
        self.next_id = 0
        self.requests = 0
        self.closed = False
        self.connected = False
        self.retired = False  # takes no new requests (max_requests_per_connection, GOAWAY)
        self.idle_since = 0.0  # loop time its last request ended (read by the idle sweep)
        self.transport: Any = None
        # Multiplexed: the frames sent in this loop turn, written together at its end (one
        # write, one syscall, for the many clients sharing this connection); None: none yet.
        self.out: list[bytes] | None = None
        # Keepalive (multiplexed codecs with heartbeats): loop time of the last frame either
        # way (read and written once per loop turn, not per request), the heartbeat in flight
        # (its id, 0: none, and when it went) and the heartbeats missed in a row.
        self.last_active = 0.0
        self.hb_id = 0
        self.hb_sent = 0.0
        self.hb_misses = 0
        self.write_paused = False  # write buffer above per_connection_buffer_limit

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        limit = self.pool.cluster.per_connection_buffer_limit
        transport.set_write_buffer_limits(high=limit, low=limit // 4)

    def _alloc_id(self) -> int:
        inflight = self.inflight
        n = self.next_id
        while True:
            n = n + 1 if n < MAX_ID else 1
            if n not in inflight and n != self.hb_id:
                self.next_id = n
                return n

    def send(self, req: Any) -> None:
        """Write ``req`` (the pool has counted it); a oneway is done once written."""
        frame = req.frame
        self.requests += 1
        if self.codec.multiplexed:
            uid = self._alloc_id()
            raw = frame.raw if uid == frame.request_id else self.codec.with_request_id(frame, uid)
        else:
            uid = frame.request_id
            raw = frame.raw
        self.stats.upstream_cx_tx_bytes_total.value += len(raw)
        if self.codec.multiplexed:
            out = self.out
            if out is None:
                self.out = [raw]
                self.pool.loop.call_soon(self._flush)
            else:
                out.append(raw)
        else:
            self.transport.write(raw)
        if req.oneway:
            self.pool.request_done(req)
            req.on_oneway_sent()
        else:
            req.up_conn = self
            req.up_id = uid
            req.up_state = IN_FLIGHT
            self.inflight[uid] = req
        mrpc = self.pool.cluster.max_requests_per_connection
        if mrpc and self.requests >= mrpc and not self.retired:
            self.stats.upstream_cx_max_requests.value += 1
            self.pool.retire(self)
        if req.oneway:
            if not self.codec.multiplexed:
                self.pool.on_free(self)
            elif not self.inflight:
                self.pool.on_idle(self)

    def cancel(self, req: Any) -> None:
        """``req`` gave up (timeout, downstream gone): its answer, if it comes, is dropped."""
        if self.inflight.pop(req.up_id, None) is None:
            return
        req.up_conn = None
        if not self.codec.multiplexed:
            # One request at a time: the late answer would be the next request's.
            self.close()
        elif not self.inflight:
            if self.retired:
                self.close()
            else:
                self.pool.on_idle(self)

    def data_received(self, data: bytes) -> None:
        self.stats.upstream_cx_rx_bytes_total.value += len(data)
        self.last_active = self.pool.loop.time()
        codec = self.codec
        try:
            frames = self.reader.feed(data)
            for raw in frames:
                if self.closed:
                    return
                f = codec.decode(raw)
                kind = f.kind
                if kind == FrameKind.RESPONSE:
                    self._response(f)
                elif kind == FrameKind.HEARTBEAT:
                    if not self.write_paused:  # else the upstream is not reading: no answer
                        self.transport.write(codec.heartbeat_reply(f))
                elif kind == FrameKind.HEARTBEAT_RESPONSE:
                    if f.request_id == self.hb_id and self.hb_id:
                        self.hb_id = 0
                        self.hb_misses = 0
                elif kind == FrameKind.GOAWAY:
                    self.pool.retire(self)
            if self.reader.error is not None and not self.closed:
                raise self.reader.error  # (after the answers that came before the garbage)
        except CodecError as e:
            log.debug("rpc upstream codec error: %s", e.detail)
            self.stats.upstream_cx_protocol_error.value += 1
            self.abort()

    def _response(self, f: Frame) -> None:
        inflight = self.inflight
        if self.codec.multiplexed:
            req = inflight.pop(f.request_id, None)
            if req is None:
                self.pool.unknown_id.value += 1
                return
        else:
            # One request at a time: an answer that is not the in-flight request's (none is in
            # flight, or another id) means the connection is out of step; it is closed rather
            # than let the answer pass for the next request's.
            if not inflight or f.request_id not in inflight:
                self.pool.unknown_id.value += 1
                self.stats.upstream_cx_protocol_error.value += 1
                self.abort()
                return
            req = inflight.pop(f.request_id)
        req.up_conn = None
        pool = self.pool
        pool.request_done(req)
        self.stats.upstream_rq_completed.value += 1
        req.on_upstream_response(f)
        if not self.closed:
            if self.codec.multiplexed:
                if not inflight:
                    if self.retired:
                        self.close()
                    else:
                        pool.on_idle(self)
            else:
                pool.on_free(self)

    def _flush(self) -> None:
        out, self.out = self.out, None
        if out and not self.closed and self.transport is not None:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
            self.last_active = self.pool.loop.time()

    def keepalive(self, now: float, interval: float, timeout: float) -> None:
        """The pool's keepalive tick: a heartbeat on a connection quiet for ``interval``; one
        unanswered for ``timeout`` is a miss, and ``KEEPALIVE_MAX_MISSES`` in a row close the
        connection (its requests in flight fail as an upstream reset)."""
        if self.closed or self.transport is None:
            return
        if self.hb_id:
            if now - self.hb_sent < timeout:
                return
            self.hb_id = 0
            self.hb_misses += 1
            self.pool.heartbeat_timeout.value += 1
            if self.hb_misses >= KEEPALIVE_MAX_MISSES:
                log.debug(
                    "rpc upstream %s: %d heartbeats unanswered, closing", self.pool.host, self.hb_misses
                )
                self.abort()
                return
        elif now - self.last_active < interval:
            return
        hid = self._alloc_id()
        self.hb_id = hid
        self.hb_sent = now
        self.pool.heartbeat_sent.value += 1
        self.transport.write(self.codec.heartbeat_request(hid))

    def close(self) -> None:
        if not self.closed:
            self._flush()  # (a graceful close still sends what this turn queued)
            self.closed = True
            self.stats.upstream_cx_destroy_local.value += 1
            if self.transport is not None:
                self.transport.close()

    def abort(self) -> None:
        if not self.closed:
            self.out = None
            self.closed = True
            self.stats.upstream_cx_destroy_local.value += 1
            if self.transport is not None:
                self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        remote = not self.closed
        self.closed = True
        pool = self.pool
        pool.on_connection_closed(self, remote)
        if not self.inflight:
            return
        stats = self.stats
        stats.upstream_cx_destroy_with_active_rq.value += 1
        if remote:
            stats.upstream_cx_destroy_remote_with_active_rq.value += 1
        reqs = list(self.inflight.values())
        self.inflight.clear()
        for req in reqs:
            req.up_conn = None
            pool.request_done(req)
            stats.upstream_rq_rx_reset.value += 1
            req.on_upstream_failure(Reason.UPSTREAM_RESET, "upstream connection reset", False)


class RpcPool:
    """What both pools share: breakers, the queue, connecting, accounting."""

    multiplexed = False

    def __init__(self, host: Any, cluster: Any, codec: XCodec, loop: asyncio.AbstractEventLoop) -> None:
        self.host = host
        self.cluster = cluster
        self.codec = codec
        self.loop = loop
        self.pending: collections.deque[Any] = collections.deque()
        self.connecting = 0
        self.conns: list[RpcClientConnection] = []  # connected (multiplexed) / idle (ping-pong)
        self.total = 0
        self.closed = False
        self.draining = False
        self.unknown_id = cluster.stats.scope.counter("rpc.upstream_rq_unknown_id")
        self.heartbeat_sent = cluster.stats.scope.counter("rpc.upstream_heartbeat")
        self.heartbeat_timeout = cluster.stats.scope.counter("rpc.upstream_heartbeat_timeout")
        self._sweep: asyncio.TimerHandle | None = None
        self._keepalive: asyncio.TimerHandle | None = None

    # -- requests

    def send(self, req: Any) -> None:
        """Send ``req`` now, queue it until a connection is ready, or fail it (overflow)."""
        cluster = self.cluster
        st = cluster.stats
        if st.upstream_rq_active.value - cluster.high.rq_active >= cluster.max_requests:
            st.upstream_rq_pending_overflow.value += 1
            req.on_upstream_failure(Reason.OVERFLOW, "max_requests", False)
            return
        conn = self._take()
        if conn is not None:
            if req.oneway and conn.write_paused:
                # A oneway is done once written, so max_requests does not bound it: over the
                # connection's high-water mark (the upstream is not reading) it is dropped,
                # which keeps the write buffer within per_connection_buffer_limit.
                if not self.multiplexed:
                    self.conns.insert(0, conn)  # still idle; the next take tries another first
                st.upstream_rq_pending_overflow.value += 1
                req.on_upstream_failure(Reason.OVERFLOW, "upstream connection not reading", False)
                return
            self._start(req)
            conn.send(req)
            return
        if not self._can_queue():
            st.upstream_rq_pending_overflow.value += 1
            req.on_upstream_failure(Reason.OVERFLOW, "max_pending_requests", False)
            return
        if self._need_connect(1) and not self._may_connect() and not self._will_serve():
            # No connection may be opened and none will free up: overflow now.
            st.upstream_rq_pending_overflow.value += 1
            req.on_upstream_failure(Reason.OVERFLOW, "max_connections", False)
            return
        self._start(req)
        req.up_state = QUEUED
        self.pending.append(req)
        st.upstream_rq_pending_total.value += 1
        st.upstream_rq_pending_active.value += 1
        if self._need_connect(0) and self._may_connect(count=False):
            self._open()

    def _can_queue(self) -> bool:
        cluster = self.cluster
        st = cluster.stats
        return bool(
            st.upstream_rq_pending_active.value - cluster.high.pending_active < cluster.max_pending_requests
        )

    def _may_connect(self, count: bool = True) -> bool:
        cluster = self.cluster
        if cluster.stats.upstream_cx_active.value - cluster.high.cx_active < cluster.max_connections:
            return True
        if count:
            cluster.stats.upstream_cx_overflow.value += 1
        return False

    def _start(self, req: Any) -> None:
        st = self.cluster.stats
        st.upstream_rq_total.value += 1
        st.upstream_rq_active.value += 1
        host = self.host
        host.active_rq += 1
        host.stats_rq_total += 1
        req.up_state = IN_FLIGHT
        req.up_pool = self

    def request_done(self, req: Any) -> None:
        """``req`` leaves the pool's accounting (answered, failed, cancelled or oneway sent)."""
        if req.up_state == DONE or req.up_state == IDLE:
            return
        req.up_state = DONE
        self.cluster.stats.upstream_rq_active.value -= 1
        self.host.active_rq -= 1

    def _dequeue(self, req: Any) -> None:
        self.cluster.stats.upstream_rq_pending_active.value -= 1
        req.up_state = IN_FLIGHT

    def cancel(self, req: Any) -> None:
        """The proxy gave up on ``req``: leave the queue, or the connection's in-flight table."""
        state = req.up_state
        if state == QUEUED:
            try:
                self.pending.remove(req)  # O(n), n <= max_pending_requests
            except ValueError:
                pass
            else:
                self._dequeue(req)
        elif state == IN_FLIGHT and req.up_conn is not None:
            req.up_conn.cancel(req)
        self.request_done(req)

    # -- connections

    def _open(self) -> None:
        cluster = self.cluster
        stats = cluster.stats
        conn = RpcClientConnection(self)
        self.connecting += 1
        self.total += 1
        stats.upstream_cx_total.value += 1
        stats.upstream_cx_active.value += 1
        host = self.host
        host.active_cx += 1
        host.stats_cx_total += 1
        start = self.loop.time()

        def done(err: BaseException | None, timed_out: bool) -> None:
            self.connecting -= 1
            if err is None:
                stats.upstream_cx_connect_ms.record((self.loop.time() - start) * 1000)
                if conn.closed:
                    # Reset between the connect and this callback: connection_lost accounted
                    # the connection; its queued requests fail as on a connect failure.
                    self._fail_queued("connection closed by peer right after connect")
                    return
                conn.connected = True
                self._ready(conn)
                if self.closed or self.draining:
                    self.retire(conn)
                return
            self.total -= 1
            stats.upstream_cx_active.value -= 1
            host.active_cx -= 1
            if isinstance(err, asyncio.CancelledError) and not timed_out:
                return
            if timed_out:
                stats.upstream_cx_connect_timeout.value += 1
                reason = "connection timeout"
            else:
                reason = f"connect error: {err}"
            stats.upstream_cx_connect_fail.value += 1
            host.stats_cx_connect_fail += 1
            self._fail_queued(reason)

        net_upstream.connect(self.loop, host, conn, cluster.connect_timeout, cluster.tcp_keepalive, done)

    def _fail_queued(self, reason: str) -> None:
        """Fail every queued request beyond what the connections still being set up can serve."""
        while self.pending and len(self.pending) > self.connecting * self._per_connect():
            req = self.pending.popleft()
            self._dequeue(req)
            self.request_done(req)
            req.on_upstream_failure(Reason.UPSTREAM_RESET, reason, True)

    def _per_connect(self) -> int:
        return 1

    def _need_connect(self, extra: int) -> bool:
        """Should a connection be opened for the queue (plus ``extra`` requests about to join)?"""
        raise NotImplementedError

    def _will_serve(self) -> bool:
        raise NotImplementedError

    def on_connection_closed(self, conn: RpcClientConnection, remote: bool) -> None:
        stats = self.cluster.stats
        self.host.active_cx -= 1
        stats.upstream_cx_active.value -= 1
        stats.upstream_cx_destroy.value += 1
        if remote:
            stats.upstream_cx_destroy_remote.value += 1
        self.total -= 1
        try:
            self.conns.remove(conn)
        except ValueError:
            pass
        if self.pending and not self.closed and self._need_connect(0) and self._may_connect():
            self._open()

    def on_idle(self, conn: RpcClientConnection) -> None:
        """``conn`` has no request in flight: it closes after the cluster's idle timeout."""
        conn.idle_since = self.loop.time()
        if self._sweep is None:
            t = self.cluster.idle_timeout
            if t:
                self._sweep = self.loop.call_later(max(t / 4, 0.01), self._sweep_idle)

    def _sweep_idle(self) -> None:
        """Close connections idle longer than the idle timeout: one timer per pool, so a
        connection closes at most a quarter of the timeout late."""
        self._sweep = None
        t = self.cluster.idle_timeout
        if not t or self.closed:
            return
        now = self.loop.time()
        waiting = False
        for conn in list(self.conns):
            if conn.inflight or conn.closed:
                continue
            if now - conn.idle_since >= t:
                self.cluster.stats.upstream_cx_idle_timeout.value += 1
                self.retire(conn)
            else:
                waiting = True
        if waiting:
            self._sweep = self.loop.call_later(max(t / 4, 0.01), self._sweep_idle)

    def retire(self, conn: RpcClientConnection) -> None:
        conn.retired = True
        try:
            self.conns.remove(conn)
        except ValueError:
            pass
        if not conn.inflight:
            conn.close()

    def drain(self) -> None:
        """The host left its cluster: idle connections close now, busy ones when empty."""
        self.draining = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
        for conn in list(self.conns):
            self.retire(conn)

    def close(self) -> None:
        self.closed = True
        self.drain()

    # -- per kind

    def _take(self) -> RpcClientConnection | None:
        raise NotImplementedError

    def _ready(self, conn: RpcClientConnection) -> None:
        raise NotImplementedError

    def on_free(self, conn: RpcClientConnection) -> None:
        """A ping-pong connection finished its request."""


class MultiplexPool(RpcPool):
    """One connection per host carrying every request (ids rewritten per connection)."""

    multiplexed = True

    def _take(self) -> RpcClientConnection | None:
        for conn in self.conns:
            if not conn.closed and not conn.retired:
                return conn
        return None

    def _per_connect(self) -> int:
        # A connection being set up serves the whole queue.
        return len(self.pending) if self.connecting else 0

    def _need_connect(self, extra: int) -> bool:
        return self.connecting == 0

    def _will_serve(self) -> bool:
        return False

    def _ready(self, conn: RpcClientConnection) -> None:
        self.conns.append(conn)
        conn.last_active = self.loop.time()
        if self.codec.heartbeat and self._keepalive is None and not self.draining:
            self._keepalive = self.loop.call_later(KEEPALIVE_TICK, self._keepalive_tick)
        while self.pending and not conn.closed and not conn.retired:
            req = self.pending.popleft()
            self._dequeue(req)
            conn.send(req)
        if self.pending and self._need_connect(0) and self._may_connect():
            # Retired by max_requests_per_connection with requests still queued: the rest go
            # to the next connection (or wait for this one to close, within max_connections).
            self._open()
        if not conn.inflight and not conn.closed and not conn.retired:
            self.on_idle(conn)

    def _keepalive_tick(self) -> None:
        """One timer per pool while it has connections (codecs with heartbeats only)."""
        self._keepalive = None
        if self.closed or self.draining or not self.conns:
            return
        now = self.loop.time()
        for conn in list(self.conns):
            conn.keepalive(now, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT)
        if self.conns:
            self._keepalive = self.loop.call_later(KEEPALIVE_TICK, self._keepalive_tick)


class PingPongPool(RpcPool):
    """Connections carrying one request at a time; ``conns`` are the idle ones."""

    def _need_connect(self, extra: int) -> bool:
        return self.connecting < len(self.pending) + extra

    def _will_serve(self) -> bool:
        # Any connection, busy or being opened, will free up and take the queue in turn.
        return self.total > 0

    def _take(self) -> RpcClientConnection | None:
        idle = self.conns
        while idle:
            conn = idle.pop()
            if not conn.closed and not conn.retired:
                return conn
        return None

    def _ready(self, conn: RpcClientConnection) -> None:
        self.on_free(conn)

    def on_free(self, conn: RpcClientConnection) -> None:
        if conn.closed:
            return
        if conn.retired:
            # Retired while busy (max_requests_per_connection, GOAWAY): its last request is
            # done, so nothing else will close it.
            conn.close()
            return
        while self.pending:
            req = self.pending.popleft()
            self._dequeue(req)
            conn.send(req)
            return
        if self.draining:
            conn.close()
            return
        self.conns.append(conn)
        self.on_idle(conn)


def pool_for(host: Any, codec: XCodec, loop: asyncio.AbstractEventLoop) -> RpcPool:
    """The pool of ``host`` for ``codec`` (``host.rpcpool[codec.name]``, made on first use). A
    host that already left its cluster gets a draining pool."""
    pools = host.rpcpool
    if pools is None:
        pools = host.rpcpool = {}
    p = pools.get(codec.name)
    if p is None or p.closed:
        cls = MultiplexPool if codec.multiplexed else PingPongPool
        p = pools[codec.name] = cls(host, host.cluster, codec, loop)
        if host.removed:
            p.draining = True
    return p
