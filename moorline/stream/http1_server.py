"""Downstream HTTP/1.1 connections: codec events in, streams out.

One ``Http1ServerConnection`` per accepted connection. It feeds bytes to the
sans-IO ``RequestParser`` and turns its callbacks into calls on an
stream created by the connection manager's ``new_stream`` (the
``ServerConnectionCallbacks`` of ``moorline.stream.api``); the stream answers
through ``encode_headers`` / ``encode_data`` / ``encode_trailers`` here, which
frame the response (Content-Length, chunked or close-delimited) and write it
with one ``transport.write`` per event. This module never imports ``proxy/``.

What the HTTP/1.1 codec owns (and the connection manager never sees): the
request line and ``Host`` become ``RequestHeaders.method/path/authority``
(absolute-form targets are split here), keep-alive, ``Expect: 100-continue``,
response framing, pipelining and the delayed close.

Pipelining: while a stream is active, events for the next requests are kept
in ``backlog`` and reading is paused, so the backlog is bounded by one
socket read (at most the loop's read size, 256 KiB on uvloop).

Flow control: the transport's write high-water mark is the listener's
per-connection buffer limit; ``pause_writing`` from the transport pauses the
active stream's upstream reads, ``resume_writing`` resumes them.
"""

from __future__ import annotations

import asyncio
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from moorline.protocol.headers import HeaderMap, ResponseHeaders
from moorline.protocol.http1 import (
    HAS_CONTENT_LENGTH,
    HAS_DATE,
    HAS_SERVER,
    LAST_CHUNK,
    HttpProtocolError,
    RequestParser,
    encode_chunk,
    encode_last_chunk,
    encode_response_fields,
    encode_response_head,
)
from moorline.stream.api import HttpProtocol, ResetReason

if TYPE_CHECKING:
    from moorline.stream.api import ServerConnectionCallbacks, StreamDecoder

_CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"
_NO_BODY_STATUS = frozenset((204, 304))

_NO_BACKLOG: tuple[()] = ()
# Above this many connections on one connection manager, a keep-alive connection frees its
# parser between requests (``RequestParser.release``): idle connections then cost ~3 KiB each
# instead of ~4.
RELEASE_PARSERS_ABOVE = 1024
_HTTP10 = HttpProtocol.HTTP10
_HTTP11 = HttpProtocol.HTTP11


class Http1ServerConnection(asyncio.Protocol):
    __slots__ = (
        "_timer",
        "backlog",
        "cfg",
        "close_after_response",
        "closed",
        "in_backlog",
        "info",
        "last_activity",
        "loop",
        "parser",
        "parsing_backlog",
        "partial_since",
        "pending_head",
        "protocol",
        "read_paused",
        "requests",
        "resp_chunked",
        "resp_keep_alive",
        "resp_no_body",
        "start",
        "stats",
        "stream",
        "transport",
        "tunnel",
        "version",
        "write_paused",
    )

    def __init__(self, cfg: ServerConnectionCallbacks, info: Any) -> None:
        self.cfg = cfg
        self.info = info
        self.loop = asyncio.get_event_loop()
        self.transport: Any = None
        self.parser = RequestParser(self, cfg.limits)
        self.stream: StreamDecoder | None = None
        self.protocol = _HTTP11
        self.version = b"1.1"  # of the request being answered: the status line echoes it
        # Pipelined events waiting for the active stream: a shared empty tuple until needed (an
        # idle connection should not carry a deque's 600 bytes).
        self.backlog: list[tuple[int, Any]] | tuple[()] = _NO_BACKLOG
        self.parsing_backlog = False  # parser is inside a message that belongs to the backlog
        self.read_paused = False
        self.write_paused = False
        self.closed = False
        self.in_backlog = False  # delivering queued pipelined events (re-entrancy guard)
        self.close_after_response = False
        self.tunnel = False
        self.requests = 0
        self.partial_since = 0.0  # loop time of the first byte of a request whose head is incomplete
        self.last_activity = 0.0
        self._timer: asyncio.TimerHandle | None = None  # the delayed close only
        self.start = 0.0
        self.stats = cfg.stats
        # response framing state of the active stream
        self.pending_head: bytes | None = None  # response head waiting for its first body bytes
        self.resp_chunked = False
        self.resp_no_body = False
        self.resp_keep_alive = True

    # -- asyncio.Protocol -------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        limit = self.info.buffer_limit
        transport.set_write_buffer_limits(high=limit, low=limit // 4)
        st = self.stats
        st.downstream_cx_total.value += 1
        st.downstream_cx_http1_total.value += 1
        st.downstream_cx_active.value += 1
        self.start = self.last_activity = self.loop.time()
        # Idle-aware: swept at the fine period only while busy (a head arriving, a stream open).
        self.cfg.runtime.add(self, self.loop, idle_aware=True)

    def data_received(self, data: bytes) -> None:
        self.stats.downstream_cx_rx_bytes_total.value += len(data)
        if self.closed:
            return  # delayed close: drop what the peer still sends
        now = self.last_activity = self.loop.time()
        if self.tunnel:
            if self.stream is not None:
                self.stream.decode_tunnel(data, False)
            return
        if self.stream is None and not self.partial_since:
            self.partial_since = now
            self.cfg.runtime.busy.add(self)
        try:
            leftover = self.parser.feed(data)
        except HttpProtocolError as e:
            self._protocol_error(e)
            return
        if leftover is not None:
            if self.parsing_backlog:
                # The upgrade/CONNECT head is queued behind the active request: its tunnel bytes
                # wait with it (delivered to the active stream they would smuggle a request
                # into that stream's upstream connection).
                if leftover:
                    self._queue((4, leftover))
                return
            # Upgrade/CONNECT: the bytes after the head belong to the tunnel.
            self.tunnel = True
            if leftover and self.stream is not None:
                self.stream.decode_tunnel(leftover, False)

    def eof_received(self) -> bool | None:
        if self.closed:
            return None  # delayed close: the peer is done too
        if self.tunnel and self.stream is not None:
            self.stream.decode_tunnel(b"", True)
            return True
        # A FIN ends the connection, as in Envoy (its HTTP connection manager does not support
        # half-close): connection_lost resets an active stream, which cancels the upstream.
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        # A stream still active here was cut (abort, drain-time cut, peer gone): it is reset,
        # whoever closed, so its upstream request and counters are released.
        self.closed = True
        self._finish_close()
        s = self.stream
        if s is not None:
            self.stream = None
            s.on_reset(ResetReason.CONNECTION_TERMINATION)

    def _finish_close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.cfg.runtime.discard(self):
            st = self.stats
            st.downstream_cx_active.value -= 1
            st.downstream_cx_destroy.value += 1
            st.downstream_cx_length_ms.record((self.loop.time() - self.start) * 1000)
            self.info.notify_closed()

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.stream is not None:
            self.stream.on_write_paused()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.stream is not None:
            self.stream.on_write_resumed()

    # -- parser target ----------------------------------------------------
    def on_request_head(self, head: Any) -> None:
        if self.closed:
            return  # closed inside this read (a local reply): nothing more is served
        if self.stream is not None or self.backlog:
            self.parsing_backlog = True
            self._queue((0, head))
            self.pause_reading()
            return
        self.parsing_backlog = False
        self._new_stream(head)

    def _queue(self, event: tuple[int, Any]) -> None:
        b = self.backlog
        if isinstance(b, list):
            b.append(event)
        else:
            self.backlog = [event]

    def on_body(self, data: bytes) -> None:
        if self.parsing_backlog:
            self._queue((1, data))
            return
        s = self.stream
        if s is not None:
            s.decode_data(data, False)

    def on_message_complete(self, trailers: HeaderMap | None) -> None:
        if self.parsing_backlog:
            self._queue((2, trailers))
            return
        s = self.stream
        if s is not None:
            if trailers:
                s.decode_trailers(trailers)
            elif not s.request_complete:  # a request without a body ended with its head
                s.decode_data(b"", True)

    def _new_stream(self, head: Any) -> None:
        # ``head`` (protocol.http1.RequestHead) is the stream's RequestHeaders: the request line
        # is resolved in place into method / authority / path / scheme.
        self.requests += 1
        self.partial_since = 0.0
        self.resp_chunked = False
        method = head.method
        self.resp_no_body = method == b"HEAD"
        self.resp_keep_alive = head.keep_alive and not self.close_after_response
        version = self.version = head.version
        self.protocol = _HTTP11 if version == b"1.1" else _HTTP10
        if head.expect_continue:
            self.transport.write(_CONTINUE_100)
        target = head.target
        if method == b"CONNECT":
            head.authority = target
            head.path = b""
        elif target[:1] != b"/" and target != b"*":
            # absolute-form: the authority and path come from the target (RFC 9112 3.2.2)
            sep = target.find(b"://")
            if sep > 0:
                rest = target[sep + 3 :]
                slash = rest.find(b"/")
                head.authority = rest if slash < 0 else rest[:slash]
                head.path = b"/" if slash < 0 else rest[slash:]
        if self.info.tls is not None:
            head.scheme = b"https"
        s = self.cfg.new_stream(self)
        self.stream = s
        # A request without a body ends with its head; an upgrade's body is the tunnel.
        s.decode_headers(head, not head.upgrade and not head.chunked and not head.content_length)

    # -- called by the stream -------------------------------------------
    def encode_headers(self, headers: ResponseHeaders, end_stream: bool) -> None:
        """Write the response head.

        ``encode_response_fields`` writes the header lines in one pass (hop-by-hop ones dropped,
        the ``server`` policy applied, Content-Length and Date noted); the server, date and
        framing lines are then added as the response needs them."""
        h = headers._h
        status = headers.status
        version = self.version
        cfg = self.cfg
        server_mode = cfg.server_header_transformation  # 0 overwrite, 1 append if absent, 2 pass
        fields, seen = encode_response_fields(h, server_mode != 0)
        line = (_LINES_11 if version == b"1.1" else _LINES_10).get(status)
        parts = [line or _status_line(version, status), fields]
        has_len = seen & HAS_CONTENT_LENGTH
        if server_mode == 0 or (server_mode == 1 and not seen & HAS_SERVER):
            parts += (b"server: ", cfg.server_name, b"\r\n")
        if not seen & HAS_DATE:
            parts += (b"date: ", cfg.runtime.http_date(), b"\r\n")
        keep_alive = self.resp_keep_alive and not cfg.runtime.draining
        tunnel = self.tunnel and not end_stream  # 101, or a 2xx answer to CONNECT
        if status == 101:
            parts.append(b"connection: upgrade\r\n")
            upg = headers.get(b"upgrade")
            if upg is not None:
                parts += (b"upgrade: ", upg, b"\r\n")
        elif tunnel:
            pass  # CONNECT established: the bytes that follow are the tunnel, no framing
        elif status < 200:
            parts.append(b"\r\n")
            self.transport.write(b"".join(parts))
            return
        elif status in _NO_BODY_STATUS or self.resp_no_body:
            self.resp_chunked = False
        elif has_len:
            self.resp_chunked = False
        elif end_stream:
            parts.append(b"content-length: 0\r\n")
        elif version == b"1.1":
            self.resp_chunked = True
            parts.append(b"transfer-encoding: chunked\r\n")
        else:
            keep_alive = False  # HTTP/1.0 without length: close-delimited
        if status != 101 and not tunnel:
            if not keep_alive:
                parts.append(b"connection: close\r\n")
            elif version == b"1.0":
                parts.append(b"connection: keep-alive\r\n")
        self.resp_keep_alive = keep_alive
        parts.append(b"\r\n")
        if end_stream or status == 101 or tunnel:
            self.transport.write(b"".join(parts))
            if end_stream:
                self._response_complete()
        else:
            # Hold the head for the first body bytes: one write (one syscall) for both.
            # flush_pending() sends it alone when no body arrives in the same batch.
            self.pending_head = b"".join(parts)

    def flush_pending(self) -> None:
        ph = self.pending_head
        if ph is not None:
            self.pending_head = None
            if not self.closed:
                self.transport.write(ph)

    def encode_data(self, data: bytes, end_stream: bool) -> None:
        if self.closed:
            return
        ph = self.pending_head
        if ph is not None:
            self.pending_head = None
            if self.resp_no_body:
                self.transport.write(ph)
            elif self.resp_chunked:
                if end_stream:
                    self.transport.write(ph + encode_chunk(data) + LAST_CHUNK if data else ph + LAST_CHUNK)
                else:
                    self.transport.write(ph + encode_chunk(data))
            else:
                self.transport.write(ph + data if data else ph)
            if end_stream:
                self._response_complete()
            return
        if self.tunnel:
            if data:
                self.transport.write(data)
            if end_stream:
                if self.transport.can_write_eof():
                    self.transport.write_eof()
            return
        if self.resp_no_body:
            pass
        elif self.resp_chunked:
            if end_stream:
                self.transport.write(encode_chunk(data) + LAST_CHUNK if data else LAST_CHUNK)
            elif data:
                self.transport.write(encode_chunk(data))
        elif data:
            self.transport.write(data)
        if end_stream:
            self._response_complete()

    def encode_trailers(self, trailers: HeaderMap) -> None:
        if self.closed:
            return
        self.flush_pending()
        if self.resp_chunked and not self.resp_no_body:
            self.transport.write(encode_last_chunk(trailers))
        self._response_complete()

    def start_tunnel(self) -> None:
        self.tunnel = True

    def _response_complete(self) -> None:
        if self.pending_head is not None:
            self.flush_pending()
        s = self.stream
        request_complete = s is None or s.request_complete
        self.stream = None
        if not self.resp_keep_alive or not request_complete or self.close_after_response:
            self.close(delayed=not request_complete or self.close_after_response)
            return
        self.last_activity = self.loop.time()
        if self.in_backlog:
            return  # a queued request answered at once (a local reply): the loop below goes on
        # Run the next pipelined request, if any. Iteratively: a queued request answered at once
        # comes back here (re-entrant, see above) instead of recursing once per request.
        backlog = self.backlog
        if backlog:
            self.in_backlog = True
            try:
                self._drain_backlog(backlog)
            finally:
                self.in_backlog = False
            if self.backlog or self.closed:
                return  # the parser is past the active request; reading stays paused
            self.backlog = _NO_BACKLOG
        # All that was queued is delivered: what the parser sees next belongs to the active
        # stream (its body) or starts the next request.
        self.parsing_backlog = False
        if self.parser.head_pending and not self.partial_since:
            # The next request's head began arriving while this one was answered: its header
            # and idle timeouts run from now on.
            self.partial_since = self.last_activity
        if self.read_paused:
            self.resume_reading()
        rt = self.cfg.runtime
        if not self.partial_since and self.stream is None:
            rt.busy.discard(self)  # idle: only the connection deadlines remain
        if len(rt.conns) > RELEASE_PARSERS_ABOVE:
            # Many connections, most of them idle in keep-alive: between requests a connection
            # gives back its llhttp parser (rebuilding one costs ~0.5 us on the next request,
            # a price only paid here).
            self.parser.release()

    def _drain_backlog(self, backlog: Any) -> None:
        while backlog and not self.closed:
            kind, item = backlog[0]
            s = self.stream
            if kind == 3 and s is not None and not s.request_complete:
                # The error is in the body of the request that just became active (its head and
                # body were queued before it): that request fails now instead of waiting for
                # a response that cannot come.
                backlog.pop(0)  # type: ignore[union-attr]
                s.protocol_error(item.status_hint, item.detail)
                continue
            if (kind == 0 or kind == 3) and s is not None:
                break  # the next request (or the error answer) waits for this one
            backlog.pop(0)  # type: ignore[union-attr]
            if kind == 0:
                self._new_stream(item)
            elif kind == 1:
                if self.stream is not None:
                    self.stream.decode_data(item, False)
            elif kind == 2:
                s = self.stream
                if s is not None:
                    if item:
                        s.decode_trailers(item)
                    elif not s.request_complete:
                        s.decode_data(b"", True)
            elif kind == 4:  # tunnel bytes after a queued upgrade/CONNECT head, now active
                self.tunnel = True
                if self.stream is not None:
                    self.stream.decode_tunnel(item, False)
            else:  # a malformed request behind the good ones: answer it in its turn
                if self.stream is None:
                    self._reject(item)
                return

    # -- control ----------------------------------------------------------
    def drain_after_response(self) -> None:
        self.resp_keep_alive = False

    def pause_reading(self) -> None:
        if not self.read_paused and not self.closed:
            self.read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused and not self.closed:
            self.read_paused = False
            self.transport.resume_reading()

    def close(self, delayed: bool = False) -> None:
        """Close after what was written. ``delayed``: the peer may still be sending (a request
        body we will not read, bytes after a bad request): send FIN, then keep reading and
        dropping its bytes for ``delayed_close_timeout`` (Envoy's delayed close), so that they
        do not make the kernel answer with a RST that can destroy the response in flight."""
        if self.closed:
            return
        self.flush_pending()
        self.closed = True
        t = self.transport
        timeout = self.cfg.delayed_close_timeout
        if delayed and timeout and t.can_write_eof():
            t.write_eof()
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_later(timeout, t.close)
            if self.read_paused:
                self.read_paused = False
                t.resume_reading()
            return
        t.close()

    def abort(self) -> None:
        if not self.closed:
            self.pending_head = None
            self.closed = True
            self.transport.abort()

    def _protocol_error(self, e: HttpProtocolError) -> None:
        self.stats.downstream_cx_protocol_error.value += 1
        s = self.stream
        if s is not None and not self.parsing_backlog and not s.request_complete:
            # The error is inside the active request (its body): that request fails.
            s.protocol_error(e.status_hint, e.detail)
            return
        if s is None and not self.closed:
            self._reject(e)
            return
        if s is not None and not self.closed:
            # A malformed request pipelined behind good ones (the active request may already be
            # upstream): they are answered first, in order, then this error and the close
            # (Envoy stops parsing after each request).
            self._queue((3, e))
            self.parsing_backlog = True
            self.pause_reading()
            return
        if s is not None:
            self.stream = None
            s.on_reset(ResetReason.PROTOCOL_ERROR)
        self.abort()

    def _reject(self, e: HttpProtocolError) -> None:
        """Answer a request the codec rejected before a stream existed, then close."""
        self.close_after_response = True
        self.resp_keep_alive = False
        self.resp_no_body = False
        self.cfg.local_error(self, e.status_hint, e.detail)
        self.close(delayed=True)

    def encode_tunnel(self, data: bytes, end_stream: bool) -> None:
        if self.closed:
            return
        self.flush_pending()
        if data:
            self.transport.write(data)
        if end_stream and self.transport.can_write_eof():
            self.transport.write_eof()

    def stream_ended(self) -> None:
        """The stream finished without a complete response (reset): nothing more comes."""
        if self.stream is not None:
            self.stream = None

    # -- timers -----------------------------------------------------------
    def on_tick(self, now: float) -> None:
        """The connection manager's sweep (``stream.connections``): check the deadlines."""
        if self.closed:
            return
        cfg = self.cfg
        s = self.stream
        if s is None:
            if cfg.idle_timeout and now - self.last_activity >= cfg.idle_timeout:
                self.stats.downstream_cx_idle_timeout.value += 1
                self.close()
                return
            if self.partial_since:
                # A request head is arriving. In Envoy the stream exists from its first byte,
                # so the stream idle timeout covers a head that stops coming (slowloris).
                if cfg.request_headers_timeout and now - self.partial_since >= cfg.request_headers_timeout:
                    self.stats.downstream_rq_header_timeout.value += 1
                    self._reject(HttpProtocolError(408, "request_header_timeout"))
                    return
                if cfg.stream_idle_timeout and now - self.last_activity >= cfg.stream_idle_timeout:
                    self.stats.downstream_rq_idle_timeout.value += 1
                    self._reject(HttpProtocolError(408, "stream_idle_timeout"))
                    return
        elif s.check_timeouts(now):
            return
        if cfg.max_connection_duration and now - self.start >= cfg.max_connection_duration:
            if self.stream is None:
                self.stats.downstream_cx_max_duration_reached.value += 1
                self.close()
                return
            self.resp_keep_alive = False


def _status_line(version: bytes, status: int) -> bytes:
    return encode_response_head(status, [], version=version)[:-2]


# Status lines of the standard codes, built once (never written after import); other codes
# are built per response.
_LINES_11 = {int(c): _status_line(b"1.1", int(c)) for c in HTTPStatus}
_LINES_10 = {int(c): _status_line(b"1.0", int(c)) for c in HTTPStatus}
