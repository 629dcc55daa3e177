"""CONNECT termination: a raw TCP connection to the host as the router's upstream stream.

A route whose ``upgrade_configs`` CONNECT entry has ``connect_config`` terminates CONNECT here
instead of forwarding the request (Envoy's "CONNECT termination"): ``connect(host, loop, req)``
opens one TCP (or TLS) connection per CONNECT request, never pooled; once it is up,
``req.on_pool_ready(conn)``. The router then calls ``send_headers``, which writes nothing:
the request headers end here, and the router is told at once that the tunnel is open (a
synthesized ``200`` head, then ``on_upstream_upgrade``), so the client's payload flows as raw
TCP bytes both ways, over HTTP/1.1 or as DATA frames of an HTTP/2 stream.

Half-close both ways: the client's end of stream is a FIN (``write_eof``); the host's FIN is the
end of the response (END_STREAM over HTTP/2). A connection lost before both ends closed resets
the exchange. Backpressure: ``pause_reading`` / ``resume_reading`` stop and restart reads from
the host; above the transport's high-water mark (the cluster's
``per_connection_buffer_limit``) the router pauses the downstream.
"""

from __future__ import annotations

import asyncio
from typing import Any

from moorline.net import upstream as net_upstream
from moorline.protocol.headers import HeaderMap, RequestHeaders, ResponseHeaders
from moorline.stream.api import ResetReason


class PendingConnect:
    """The router's ``pending`` while the connection is being set up: ``cancel()``."""

    __slots__ = ("_cancel", "cancelled", "conn")

    def __init__(self, conn: TcpUpstream) -> None:
        self.conn = conn
        self.cancelled = False
        self._cancel: Any = None

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            if self._cancel is not None:
                self._cancel()
            if self.conn.transport is not None:
                self.conn.abort()  # (still connecting: the connect callback uncounts it)


class TcpUpstream(asyncio.Protocol):
    """One terminated CONNECT's upstream TCP connection (an ``UpstreamStream``)."""

    def __init__(self, host: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.host = host
        self.cluster = host.cluster
        self.stats = host.cluster.stats
        self.loop = loop
        self.pool = self  # on_connection_idle: a request that no longer wants it
        self.req: Any = None
        self.transport: Any = None
        self.closed = False
        self.counted = False
        self.local_end = False
        self.remote_end = False
        self._paused = False

    # -- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        limit = self.cluster.per_connection_buffer_limit
        transport.set_write_buffer_limits(high=limit, low=limit // 4)

    def data_received(self, data: bytes) -> None:
        self.stats.upstream_cx_rx_bytes_total.value += len(data)
        req = self.req
        if req is not None:
            req.on_upstream_data(data, False)

    def eof_received(self) -> bool | None:
        self.remote_end = True
        req = self.req
        if req is not None:
            req.on_upstream_data(b"", True)
        return True  # keep our write side open: the client may still send (half-close)

    def connection_lost(self, exc: Exception | None) -> None:
        was_closed = self.closed
        self.closed = True
        self._uncount(remote=not was_closed)
        req = self.req
        self.req = None
        if req is not None and not (self.local_end and self.remote_end):
            req.on_upstream_reset(ResetReason.CONNECTION_TERMINATION)

    def pause_writing(self) -> None:
        if self.req is not None:
            self.req.on_upstream_write_paused()

    def resume_writing(self) -> None:
        if self.req is not None:
            self.req.on_upstream_write_resumed()

    # -- UpstreamStream (stream.api) ------------------------------------------------------
    def send_headers(self, req: Any, headers: RequestHeaders, end_stream: bool) -> None:
        """The CONNECT head ends here: the tunnel is open as soon as the TCP connection is."""
        self.req = req
        req.on_upstream_headers(ResponseHeaders.make(200, []), False)
        if self.req is req and not self.closed:
            req.on_upstream_upgrade(b"")

    def send_data(self, data: bytes, end_stream: bool) -> None:
        if self.closed or self.local_end:
            return
        t = self.transport
        if data:
            self.stats.upstream_cx_tx_bytes_total.value += len(data)
            t.write(data)
        if end_stream:
            self.local_end = True
            if t.can_write_eof():
                t.write_eof()

    def send_trailers(self, trailers: HeaderMap) -> None:
        self.send_data(b"", True)

    def pause_reading(self) -> None:
        if not self._paused and not self.closed and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._paused and not self.closed:
            self._paused = False
            self.transport.resume_reading()

    def release(self) -> None:
        self.req = None
        self._close(self.local_end and self.remote_end)

    def abort(self) -> None:
        """The exchange is over (both ends closed) or was reset: the connection goes."""
        self.req = None
        self._close(self.local_end and self.remote_end)

    def on_connection_idle(self, conn: Any) -> None:
        self.abort()

    # -- internal -------------------------------------------------------------------------
    def _close(self, graceful: bool) -> None:
        if self.closed:
            return
        self.closed = True
        self._uncount(remote=False)
        if self.transport is not None:
            if graceful:
                self.transport.close()
            else:
                self.transport.abort()

    def _uncount(self, remote: bool) -> None:
        if not self.counted:
            return
        self.counted = False
        st = self.stats
        st.upstream_cx_active.value -= 1
        st.upstream_cx_destroy.value += 1
        if remote:
            st.upstream_cx_destroy_remote.value += 1
        else:
            st.upstream_cx_destroy_local.value += 1
        self.host.active_cx -= 1


def connect(host: Any, loop: asyncio.AbstractEventLoop, req: Any) -> PendingConnect:
    """Open a TCP connection to ``host`` for ``req`` (the router): ``req.on_pool_ready(conn)``
    once connected, ``req.on_pool_failure(reason, detail)`` if not. Counts in the cluster's
    ``upstream_cx_*`` and its ``max_connections`` breaker."""
    cluster = host.cluster
    st = cluster.stats
    conn = TcpUpstream(host, loop)
    pending = PendingConnect(conn)
    if st.upstream_cx_active.value >= cluster.max_connections:
        st.upstream_cx_overflow.value += 1
        loop.call_soon(_fail, pending, req, ResetReason.OVERFLOW, None)
        return pending
    st.upstream_cx_total.value += 1
    st.upstream_cx_active.value += 1
    host.active_cx += 1
    conn.counted = True
    start = loop.time()

    def done(err: BaseException | None, timed_out: bool) -> None:
        if err is None:
            st.upstream_cx_connect_ms.record((loop.time() - start) * 1000)
            if pending.cancelled or conn.closed:
                conn.abort()
                if not pending.cancelled:
                    req.on_pool_failure(ResetReason.CONNECTION_FAILURE, "connection closed by peer")
                return
            req.on_pool_ready(conn)
            return
        conn.closed = True
        if conn.counted:  # never connected: not a destroyed connection
            conn.counted = False
            st.upstream_cx_active.value -= 1
            host.active_cx -= 1
        if pending.cancelled:
            return
        if timed_out:
            st.upstream_cx_connect_timeout.value += 1
            reason = "connection timeout"
        else:
            n = getattr(err, "errno", None)
            reason = "delayed connect error: " + (str(n) if n else type(err).__name__)
        st.upstream_cx_connect_fail.value += 1
        req.on_pool_failure(ResetReason.CONNECTION_FAILURE, reason)

    pending._cancel = net_upstream.connect(
        loop, host, conn, cluster.connect_timeout, cluster.tcp_keepalive, done
    )
    return pending


def _fail(pending: PendingConnect, req: Any, reason: ResetReason, detail: str | None) -> None:
    if not pending.cancelled:
        req.on_pool_failure(reason, detail)
