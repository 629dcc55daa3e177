"""HTTP/1.1 upstream connections and the per-host connection pool.

A pool belongs to one upstream host. ``Pool.new_stream(req)`` either hands an
idle keep-alive connection to ``req.on_pool_ready(conn)`` at once, opens a new
connection (within the cluster's ``max_connections``), or queues the request
(within ``max_pending_requests``; beyond it ``req.on_pool_failure(ResetReason.OVERFLOW)``).

The connection forwards response events to the attached request
(the ``ResponseDecoder`` of ``moorline.stream.api``: the router):
``on_upstream_headers(headers, end_stream)``, ``on_upstream_data(data,
end_stream)``, ``on_upstream_trailers(trailers)``,
``on_upstream_reset(reason)``, ``on_upstream_upgrade(leftover)`` and the flow
control pair ``on_upstream_write_paused()`` / ``on_upstream_write_resumed()``.

Bounds: the transport write buffer high-water mark is the cluster's
``per_connection_buffer_limit``; above it the request's downstream side is
paused. Pending requests are bounded by ``max_pending_requests``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any

from moorline.net import upstream as net_upstream
from moorline.protocol.headers import HeaderMap, RequestHeaders
from moorline.protocol.http1 import (
    LAST_CHUNK,
    HttpProtocolError,
    ResponseParser,
    encode_chunk,
    encode_last_chunk,
    encode_request_head_fields,
)
from moorline.stream.api import ResetReason

log = logging.getLogger("moorline.pool")


class Http1ClientConnection(asyncio.Protocol):
    __slots__ = (
        "_body",
        "_extraneous",
        "_in_feed",
        "_paused",
        "_release_pending",
        "_write_paused",
        "chunked_out",
        "closed",
        "high",
        "idle_since",
        "keep_alive",
        "parser",
        "pool",
        "req",
        "request_done",
        "requests",
        "response_done",
        "stats",
        "transport",
        "tunnel",
    )

    def __init__(self, pool: Pool, high: bool = False) -> None:
        self.pool = pool
        self.high = high  # opened for a priority HIGH request: counts in cluster.high.cx_active
        self.transport: Any = None
        self.parser = ResponseParser(self)
        self.req: Any = None
        self.request_done = False
        self.response_done = False
        self.keep_alive = True
        self.closed = False
        self.requests = 0
        self._paused = False
        self._in_feed = False  # inside parser.feed(): a release waits until it returns
        self._release_pending = False
        self._extraneous = False  # response bytes arrived after the response was complete
        # The last body chunk of the current read, held so that a response whose body and end
        # arrive in one read reaches the router as one data(end_stream=True) call.
        self._body: bytes | None = None
        self.idle_since = 0.0
        self.chunked_out = False
        self.stats = pool.cluster.stats
        self.tunnel = False
        self._write_paused = False

    # -- asyncio.Protocol
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        limit = self.pool.cluster.per_connection_buffer_limit
        transport.set_write_buffer_limits(high=limit, low=limit // 4)

    def data_received(self, data: bytes) -> None:
        self.stats.upstream_cx_rx_bytes_total.value += len(data)
        if self.tunnel:
            req = self.req
            if req is not None:
                req.on_upstream_data(data, False)
            return
        if self.req is None:
            # Bytes from an idle upstream: it is broken (or sent a 408); drop it.
            self.close()
            return
        self._in_feed = True
        try:
            leftover = self.parser.feed(data)
        except HttpProtocolError as e:
            self._in_feed = False
            self._release_pending = False
            self._body = None
            self.stats.upstream_cx_protocol_error.value += 1
            req = self.req
            self.close()
            if req is not None:
                req.on_upstream_reset(ResetReason.PROTOCOL_ERROR, e.detail)
            return
        self._in_feed = False
        body = self._body
        if body is not None:
            self._body = None
            req = self.req
            if req is not None:
                req.on_upstream_data(body, False)
        if self._release_pending:
            # The response completed inside this read. Anything the parser saw after it is
            # extraneous (Envoy: a protocol error): never let it become the next request's
            # response; the connection is closed instead of reused.
            self._release_pending = False
            if self._extraneous or self.parser.message_open or leftover is not None:
                self._extraneous = False
                self.stats.upstream_cx_protocol_error.value += 1
                self.close()
            else:
                self._release_now()
            return
        if leftover is not None:
            # 101 Switching Protocols: the connection is now a tunnel.
            self.tunnel = True
            if self.req is not None:
                self.req.on_upstream_upgrade(leftover)
            return
        req = self.req
        if req is not None:
            req.on_upstream_batch_end()

    def eof_received(self) -> bool | None:
        if self.tunnel:
            if self.req is not None:
                self.req.on_upstream_data(b"", True)
            return True  # keep the write side open for the half-closed tunnel
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        was_closed = self.closed
        self.closed = True
        self.pool.on_connection_closed(self, remote=not was_closed)
        req = self.req
        if req is None:
            return
        stats = self.stats
        stats.upstream_cx_destroy_with_active_rq.value += 1
        if not was_closed:
            stats.upstream_cx_destroy_remote_with_active_rq.value += 1
        self.req = None
        if self.tunnel:
            req.on_upstream_reset(ResetReason.CONNECTION_TERMINATION)
            return
        if not self.response_done:
            try:
                self.req = req
                self.parser.feed_eof()
            except HttpProtocolError:
                pass
            self.req = None
            if not self.response_done:
                req.on_upstream_reset(ResetReason.CONNECTION_TERMINATION)

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.req is not None:
            self.req.on_upstream_write_paused()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.req is not None:
            self.req.on_upstream_write_resumed()

    # -- ResponseParser target
    def on_response_head(self, head: Any) -> None:
        req = self.req
        if req is None:
            self._extraneous = True
            return
        if not head.keep_alive:
            self.keep_alive = False
        # ``head`` (protocol.http1.ResponseHead) is the response's ResponseHeaders: no copy.
        status = head.status
        if status < 200 and status != 101:
            req.on_upstream_1xx(head)
            return
        req.on_upstream_headers(head, False)

    def on_body(self, data: bytes) -> None:
        req = self.req
        if req is None:
            self._extraneous = True
            return
        body = self._body
        if body is not None:
            req.on_upstream_data(body, False)
        if self._in_feed:
            self._body = data
        else:
            req.on_upstream_data(data, False)

    def on_message_complete(self, trailers: HeaderMap | None) -> None:
        req = self.req
        self.response_done = True
        body = self._body
        self._body = None
        if req is None:
            if self._release_pending:
                self._extraneous = True
            return
        if trailers:
            if body:
                req.on_upstream_data(body, False)
            req.on_upstream_trailers(trailers)
        else:
            req.on_upstream_data(body or b"", True)

    # -- used by the router (UpstreamStream)
    def send_headers(self, req: Any, headers: RequestHeaders, end_stream: bool) -> None:
        """Attach ``req`` and write the request head (built here in one pass: names and values
        are written as given, the callers guarantee they hold no CR/LF)."""
        self.req = req
        self.request_done = end_stream
        self.response_done = False
        self.requests += 1
        method = headers.method
        authority = headers.authority
        path = headers.path
        if method == b"CONNECT":
            path = path or authority
        # A body of unknown length goes chunked; an upgrade request's "body" is the tunnel,
        # sent raw after the head (bytes a client sends before the 101 included).
        head, self.chunked_out = encode_request_head_fields(
            method, path, authority, headers._h, not end_stream
        )
        self.parser.expect(method)
        self.transport.write(head)

    def send_data(self, data: bytes, end_stream: bool) -> None:
        if self.tunnel:
            if data:
                self.transport.write(data)
            if end_stream and self.transport.can_write_eof():
                self.transport.write_eof()
            return
        if self.chunked_out:
            if end_stream:
                self.transport.write(encode_chunk(data) + LAST_CHUNK if data else LAST_CHUNK)
            elif data:
                self.transport.write(encode_chunk(data))
        elif data:
            self.transport.write(data)
        if end_stream:
            self.request_done = True

    def send_trailers(self, trailers: HeaderMap) -> None:
        if self.chunked_out:
            self.transport.write(encode_last_chunk(trailers))
        self.request_done = True

    def pause_reading(self) -> None:
        if not self._paused and not self.closed:
            self._paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._paused and not self.closed:
            self._paused = False
            self.transport.resume_reading()

    def release(self) -> None:
        """The request is done with this connection: reuse it or close it."""
        self.req = None
        if self._in_feed:
            # Called from a parser callback: decide once the parser has seen the whole read.
            self._release_pending = True
            return
        self._release_now()

    def _release_now(self) -> None:
        if self._paused:
            self.resume_reading()
        pool = self.pool
        mrpc = pool.cluster.max_requests_per_connection
        if (
            self.closed
            or not self.keep_alive
            or not self.request_done
            or not self.response_done
            or self.tunnel
            or (mrpc and self.requests >= mrpc)
            or pool.draining
        ):
            if mrpc and self.requests >= mrpc:
                self.stats.upstream_cx_max_requests.value += 1
            self.close()
            return
        pool.on_connection_idle(self)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.stats.upstream_cx_destroy_local.value += 1
            if self.transport is not None:
                self.transport.close()

    def abort(self) -> None:
        self.req = None
        if not self.closed:
            self.closed = True
            self.stats.upstream_cx_destroy_local.value += 1
            if self.transport is not None:
                self.transport.abort()


class PendingRequest:
    """A request queued for a connection (shared by the HTTP/1.1 and HTTP/2 pools: both keep
    ``pending`` and ``cluster``)."""

    __slots__ = ("cancelled", "high", "pool", "req")

    def __init__(self, req: Any, pool: Any, high: bool = False) -> None:
        self.req = req
        self.pool = pool
        self.high = high  # a priority HIGH request: its slot is in cluster.high.pending_active
        self.cancelled = False

    def cancel(self) -> None:
        """Leave the queue now: the slot counts against max_pending_requests no longer."""
        if self.cancelled:
            return
        self.cancelled = True
        try:
            self.pool.pending.remove(self)  # O(n), n <= max_pending_requests
        except ValueError:
            return  # already taken off the queue
        self.dequeued(self.pool.cluster.stats)

    def dequeued(self, stats: Any) -> None:
        """Off the queue (served, failed or cancelled): its pending slot is free again."""
        stats.upstream_rq_pending_active.value -= 1
        if self.high:
            self.pool.cluster.high.pending_active -= 1


def queue_request(pool: Any, req: Any) -> PendingRequest | None:
    """Queue ``req`` on ``pool`` (HTTP/1.1 or HTTP/2) within the cluster's max_pending_requests
    (``req.high``: the HIGH priority's); beyond it the request fails with "overflow" (503 UO)
    and None is returned."""
    cluster = pool.cluster
    stats = cluster.stats
    high = req.high
    if high:
        hi = cluster.high
        if hi.pending_active >= hi.max_pending_requests:
            stats.upstream_rq_pending_overflow.value += 1
            req.on_pool_failure(ResetReason.OVERFLOW, None)
            return None
        hi.pending_active += 1
    elif stats.upstream_rq_pending_active.value - cluster.high.pending_active >= cluster.max_pending_requests:
        stats.upstream_rq_pending_overflow.value += 1
        req.on_pool_failure(ResetReason.OVERFLOW, None)
        return None
    p = PendingRequest(req, pool, high)
    pool.pending.append(p)
    stats.upstream_rq_pending_total.value += 1
    stats.upstream_rq_pending_active.value += 1
    return p


def may_connect(cluster: Any, high: bool) -> bool:
    """Room for one more connection within the cluster's max_connections (``high``: the HIGH
    priority's; a connection counts against the priority of the request that opened it);
    without room ``upstream_cx_overflow`` counts."""
    if high:
        hi = cluster.high
        if hi.cx_active < hi.max_connections:
            return True
    elif cluster.stats.upstream_cx_active.value - cluster.high.cx_active < cluster.max_connections:
        return True
    cluster.stats.upstream_cx_overflow.value += 1
    return False


class Pool:
    """Connections to one host of one cluster; kept on the host (``host.pool``) and freed with it.

    ``drain()`` (the host left its cluster, or the cluster was replaced or removed): idle
    connections close at once, busy ones when their request ends, queued requests are still
    served. ``close()`` is a drain that also closes connections still being opened."""

    def __init__(self, host: Any, cluster: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.host = host
        self.cluster = cluster
        self.loop = loop
        self.idle: list[Http1ClientConnection] = []
        self.connecting = 0
        self.total = 0
        self.pending: collections.deque[PendingRequest] = collections.deque()
        self.closed = False
        self.draining = False
        self._sweep: asyncio.TimerHandle | None = None

    def new_stream(self, req: Any) -> PendingRequest | None:
        """Get a connection for ``req``. Returns a handle to cancel a queued request, or None
        when ``req.on_pool_ready`` / ``on_pool_failure`` was already called."""
        idle = self.idle
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            req.on_pool_ready(conn)
            return None
        p = queue_request(self, req)
        if p is None:
            return None
        if self.connecting < len(self.pending) and may_connect(self.cluster, p.high):
            self._open(p.high)
        return p

    def _open(self, high: bool = False) -> None:
        cluster = self.cluster
        stats = cluster.stats
        conn = Http1ClientConnection(self, high)
        self.connecting += 1
        self.total += 1
        stats.upstream_cx_total.value += 1
        stats.upstream_cx_active.value += 1
        if high:
            cluster.high.cx_active += 1
        self.host.active_cx += 1
        start = self.loop.time()

        def done(err: BaseException | None, timed_out: bool) -> None:
            self.connecting -= 1
            if err is None:
                stats.upstream_cx_connect_ms.record((self.loop.time() - start) * 1000)
                if conn.closed:
                    # The peer closed (or reset) it between the connect and this callback:
                    # connection_lost has accounted it. Its queued requests fail as on a
                    # connect failure (nothing was sent), rather than being handed a dead
                    # connection or waiting for one that never comes.
                    self._fail_queued("delayed connect error: connection closed by peer")
                    return
                if self.closed:
                    conn.close()
                    return
                self.on_connection_idle(conn)
                return
            # failed connection: it never became active
            self.total -= 1
            stats.upstream_cx_active.value -= 1
            if high:
                cluster.high.cx_active -= 1
            self.host.active_cx -= 1
            if isinstance(err, asyncio.CancelledError) and not timed_out:
                return
            if timed_out:
                stats.upstream_cx_connect_timeout.value += 1
                reason = "connection timeout"
            else:
                reason = "delayed connect error: " + _errno_text(err)
            stats.upstream_cx_connect_fail.value += 1
            self._fail_queued(reason)

        net_upstream.connect(self.loop, self.host, conn, cluster.connect_timeout, cluster.tcp_keepalive, done)

    def _fail_queued(self, reason: str) -> None:
        """Fail every queued request beyond what the connections still being set up can serve."""
        stats = self.cluster.stats
        while self.pending and len(self.pending) > self.connecting:
            p = self.pending.popleft()
            p.dequeued(stats)
            if not p.cancelled:
                p.req.on_pool_failure(ResetReason.CONNECTION_FAILURE, reason)

    def _assign(self, conn: Http1ClientConnection) -> bool:
        """Give ``conn`` to the first queued request still waiting; False when none is."""
        while self.pending:
            p = self.pending.popleft()
            p.dequeued(self.cluster.stats)
            if p.cancelled:
                continue
            p.req.on_pool_ready(conn)
            return True
        return False

    def on_connection_idle(self, conn: Http1ClientConnection) -> None:
        """``conn`` is free: a queued request gets it, else it waits in ``idle``."""
        if self.pending and self._assign(conn):
            return
        if self.draining:
            conn.close()
            return
        conn.idle_since = self.loop.time()
        self.idle.append(conn)
        if self._sweep is None:
            t = self.cluster.idle_timeout
            if t:
                self._sweep = self.loop.call_later(max(t / 4, 0.01), self._sweep_idle)

    def _sweep_idle(self) -> None:
        """Close connections idle longer than the cluster's idle timeout. One timer per pool,
        not one per request: a connection closes at most a quarter of the timeout late."""
        self._sweep = None
        t = self.cluster.idle_timeout
        if not t or self.closed:
            return
        now = self.loop.time()
        keep = []
        for conn in self.idle:
            if conn.closed:
                continue
            if now - conn.idle_since >= t:
                self.cluster.stats.upstream_cx_idle_timeout.value += 1
                conn.close()
            else:
                keep.append(conn)
        self.idle[:] = keep
        if keep:
            self._sweep = self.loop.call_later(max(t / 4, 0.01), self._sweep_idle)

    def remove_idle(self, conn: Http1ClientConnection) -> None:
        try:
            self.idle.remove(conn)
        except ValueError:
            pass

    def on_connection_closed(self, conn: Http1ClientConnection, remote: bool) -> None:
        cluster = self.cluster
        stats = cluster.stats
        self.total -= 1
        stats.upstream_cx_active.value -= 1
        if conn.high:
            cluster.high.cx_active -= 1
        stats.upstream_cx_destroy.value += 1
        self.host.active_cx -= 1
        if remote:
            stats.upstream_cx_destroy_remote.value += 1
        self.remove_idle(conn)
        # A queued request may now get a connection slot (within its priority's limit).
        if self.pending and not self.closed and self.connecting < len(self.pending):
            high = self.pending[0].high
            if may_connect(cluster, high):
                self._open(high)

    def drain(self) -> None:
        self.draining = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.close()

    def close(self) -> None:
        self.closed = True
        self.drain()


def _errno_text(err: BaseException) -> str:
    n = getattr(err, "errno", None)
    if n:
        return str(n)
    return type(err).__name__


def pool_for(host: Any, loop: asyncio.AbstractEventLoop) -> Pool:
    """The HTTP/1.1 pool of ``host`` (``host.pool``, made on first use). A host that already
    left its cluster (a retry after a cluster update) gets a draining pool: the request is
    served, the connection is not kept."""
    p = host.pool
    if p is None or p.closed:
        p = host.pool = Pool(host, host.cluster, loop)
        if host.removed:
            p.draining = True
    return p
