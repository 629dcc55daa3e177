"""Downstream HTTP/1.1 connections: codec events in, streams out.

One ``Http1ServerConnection`` per accepted connection. It feeds bytes to the
sans-IO ``RequestParser`` and turns its callbacks into calls on an
``ActiveStream`` (``moorline.proxy.hcm``); the stream answers through
``encode_headers`` / ``encode_data`` / ``encode_trailers`` here, which frame
the response (Content-Length, chunked or close-delimited) and write it with
one ``transport.write`` per event.

Pipelining: while a stream is active, events for the next requests are kept
in ``backlog`` and reading is paused, so the backlog is bounded by one
socket read (at most the loop's read size, 256 KiB on uvloop).

Flow control: the transport's write high-water mark is the listener's
per-connection buffer limit; ``pause_writing`` from the transport pauses the
active stream's upstream reads, ``resume_writing`` resumes them.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import TYPE_CHECKING, Any

from moorline.protocol.headers import HeaderMap
from moorline.protocol.http1 import (
    LAST_CHUNK,
    HttpProtocolError,
    RequestParser,
    encode_chunk,
    encode_last_chunk,
    encode_response_head,
)

if TYPE_CHECKING:
    from moorline.proxy.hcm import ActiveStream, HcmConfig

_CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"
_NO_BODY_STATUS = frozenset((204, 304))

_date_cache = [0, b""]


def http_date() -> bytes:
    """RFC 7231 date, recomputed at most once per second."""
    now = int(time.time())
    if now != _date_cache[0]:
        _date_cache[0] = now
        _date_cache[1] = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now)).encode()
    return _date_cache[1]  # type: ignore[return-value]


_ActiveStream: Any = None


def _active_stream_cls() -> Any:
    # proxy.hcm imports this module; resolve the stream class once, not per request.
    global _ActiveStream
    if _ActiveStream is None:
        from moorline.proxy.hcm import ActiveStream

        _ActiveStream = ActiveStream
    return _ActiveStream


class Http1ServerConnection(asyncio.Protocol):
    __slots__ = (
        "_timer",
        "backlog",
        "cfg",
        "close_after_response",
        "closed",
        "info",
        "last_activity",
        "local_str",
        "loop",
        "parser",
        "parsing_backlog",
        "partial_since",
        "pending_head",
        "read_paused",
        "remote_str",
        "requests",
        "resp_chunked",
        "resp_keep_alive",
        "resp_no_body",
        "start",
        "stats",
        "stream",
        "transport",
        "tunnel",
        "write_paused",
    )

    def __init__(self, cfg: HcmConfig, info: Any) -> None:
        self.cfg = cfg
        self.info = info
        self.loop = asyncio.get_event_loop()
        self.transport: Any = None
        self.parser = RequestParser(self, cfg.limits)
        self.stream: ActiveStream | None = None
        self.backlog: collections.deque[tuple[int, Any]] = collections.deque()
        self.parsing_backlog = False  # parser is inside a message that belongs to the backlog
        self.read_paused = False
        self.write_paused = False
        self.closed = False
        self.close_after_response = False
        self.tunnel = False
        self.requests = 0
        self.partial_since = 0.0  # loop time of the first byte of a request whose head is incomplete
        self.last_activity = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self.start = 0.0
        self.stats = cfg.stats
        self.remote_str = ""
        self.local_str = ""
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
        self.remote_str = self.info.remote_str()
        self.local_str = self.info.local_str()
        self.cfg.connections.add(self)
        self._arm_timer()

    def data_received(self, data: bytes) -> None:
        self.stats.downstream_cx_rx_bytes_total.value += len(data)
        if self.closed:
            return  # delayed close: drop what the peer still sends
        now = self.last_activity = self.loop.time()
        if self.tunnel:
            if self.stream is not None:
                self.stream.on_tunnel_data(data, False)
            return
        if self.stream is None and not self.partial_since:
            self.partial_since = now
        try:
            leftover = self.parser.feed(data)
        except HttpProtocolError as e:
            self._protocol_error(e)
            return
        if leftover is not None:
            # Upgrade/CONNECT: the bytes after the head belong to the tunnel.
            self.tunnel = True
            if leftover and self.stream is not None:
                self.stream.on_tunnel_data(leftover, False)

    def eof_received(self) -> bool | None:
        if self.closed:
            return None  # delayed close: the peer is done too
        if self.tunnel and self.stream is not None:
            self.stream.on_tunnel_data(b"", True)
            return True
        # A FIN ends the connection, as in Envoy (its HTTP connection manager does not support
        # half-close): connection_lost resets an active stream, which cancels the upstream.
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            self._finish_close()
            return
        self.closed = True
        self._finish_close()
        s = self.stream
        if s is not None:
            self.stream = None
            s.on_downstream_reset()

    def _finish_close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self in self.cfg.connections:
            self.cfg.connections.discard(self)
            st = self.stats
            st.downstream_cx_active.value -= 1
            st.downstream_cx_destroy.value += 1
            st.downstream_cx_length_ms.record((self.loop.time() - self.start) * 1000)
            self.info.notify_closed()

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.stream is not None:
            self.stream.on_downstream_write_paused()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.stream is not None:
            self.stream.on_downstream_write_resumed()

    # -- parser target ----------------------------------------------------
    def on_request_head(self, head: Any) -> None:
        if self.stream is not None or self.backlog:
            self.parsing_backlog = True
            self.backlog.append((0, head))
            self.pause_reading()
            return
        self.parsing_backlog = False
        self._new_stream(head)

    def on_body(self, data: bytes) -> None:
        if self.parsing_backlog:
            self.backlog.append((1, data))
            return
        s = self.stream
        if s is not None:
            s.decode_data(data, False)

    def on_message_complete(self, trailers: HeaderMap | None) -> None:
        if self.parsing_backlog:
            self.backlog.append((2, trailers))
            return
        s = self.stream
        if s is not None:
            s.decode_complete(trailers)

    def _new_stream(self, head: Any) -> None:
        self.requests += 1
        self.partial_since = 0.0
        self.resp_chunked = False
        self.resp_no_body = head.method == b"HEAD"
        self.resp_keep_alive = head.keep_alive and not self.close_after_response
        if head.expect_continue:
            self.transport.write(_CONTINUE_100)
        s = _active_stream_cls()(self, head)
        self.stream = s
        s.decode_headers(head)

    # -- called by the stream -------------------------------------------
    def encode_headers(self, headers: HeaderMap, end_stream: bool, version: bytes) -> None:
        """Write the response head. ``headers`` starts with ``:status``.

        One pass over the headers builds the wire bytes: it drops pseudo and hop-by-hop headers,
        applies the ``server`` header policy, notes Content-Length and Date; framing headers
        are then added as the response needs them."""
        h = headers._h
        status = int(h[0][1]) if h and h[0][0] == b":status" else 200
        cfg = self.cfg
        server_mode = cfg.server_header_transformation  # 0 overwrite, 1 append if absent, 2 pass
        line = _status_line(version, status)
        parts = [line]
        has_len = has_date = has_server = False
        for k, v in h:
            if k in _RESP_SPECIAL:
                if k[0] == 58:  # pseudo header
                    continue
                if k == b"content-length":
                    has_len = True
                elif k == b"date":
                    has_date = True
                elif k == b"server":
                    if server_mode == 0:
                        continue
                    has_server = True
                else:  # hop-by-hop
                    continue
            parts += (k, b": ", v, b"\r\n")
        if server_mode == 0 or (server_mode == 1 and not has_server):
            parts += (b"server: ", cfg.server_name, b"\r\n")
        if not has_date:
            parts += (b"date: ", http_date(), b"\r\n")
        keep_alive = self.resp_keep_alive and not cfg.draining
        if status == 101:
            parts.append(b"connection: upgrade\r\n")
            upg = headers.get(b"upgrade")
            if upg is not None:
                parts += (b"upgrade: ", upg, b"\r\n")
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
        if status != 101:
            if not keep_alive:
                parts.append(b"connection: close\r\n")
            elif version == b"1.0":
                parts.append(b"connection: keep-alive\r\n")
        self.resp_keep_alive = keep_alive
        parts.append(b"\r\n")
        if end_stream or status == 101:
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
        self.flush_pending()
        s = self.stream
        request_complete = s is None or s.request_complete
        self.stream = None
        if not self.resp_keep_alive or not request_complete or self.close_after_response:
            self.close(delayed=not request_complete or self.close_after_response)
            return
        self.last_activity = self.loop.time()
        # Run the next pipelined request, if any.
        backlog = self.backlog
        while backlog and not self.closed:
            kind, item = backlog[0]
            if (kind == 0 or kind == 3) and self.stream is not None:
                break  # the next request (or the error answer) waits for this one
            backlog.popleft()
            if kind == 0:
                self._new_stream(item)
            elif kind == 1:
                if self.stream is not None:
                    self.stream.decode_data(item, False)
            elif kind == 2:
                if self.stream is not None:
                    self.stream.decode_complete(item)
            else:  # a malformed request behind the good ones: answer it in its turn
                if self.stream is None:
                    from moorline.proxy.hcm import protocol_error_reply

                    protocol_error_reply(self, item)
                return
        if backlog or self.closed:
            return  # the parser is past the active request; reading stays paused
        # All that was queued is delivered: what the parser sees next belongs to the active
        # stream (its body) or starts the next request.
        self.parsing_backlog = False
        self.resume_reading()

    # -- control ----------------------------------------------------------
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
        if s is not None and not self.parsing_backlog and not s.response_started:
            s.protocol_error(e)
            return
        if s is None and not self.closed:
            from moorline.proxy.hcm import protocol_error_reply

            protocol_error_reply(self, e)
            return
        if self.parsing_backlog and s is not None and not self.closed:
            # A malformed request pipelined behind good ones: they are answered first (Envoy
            # stops parsing after each request); reading is already paused.
            self.backlog.append((3, e))
            return
        # The response already started: just close.
        if s is not None:
            self.stream = None
            s.on_downstream_reset()
        self.abort()

    # -- timers -----------------------------------------------------------
    def _arm_timer(self) -> None:
        t = self.cfg.timer_period
        if t and not self.closed:
            self._timer = self.loop.call_later(t, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.closed:
            return
        now = self.loop.time()
        cfg = self.cfg
        s = self.stream
        if s is None:
            if cfg.idle_timeout and now - self.last_activity >= cfg.idle_timeout:
                self.stats.downstream_cx_idle_timeout.value += 1
                self.close()
                return
            if self.partial_since and cfg.request_headers_timeout:
                if now - self.partial_since >= cfg.request_headers_timeout:
                    from moorline.proxy.hcm import timeout_reply

                    timeout_reply(self, b"request_header_timeout")
                    return
        else:
            if s.check_timeouts(now):
                self._arm_timer()  # keep-alive connections go on needing their timeouts
                return
        if cfg.max_connection_duration and now - self.start >= cfg.max_connection_duration:
            if self.stream is None:
                self.stats.downstream_cx_max_duration_reached.value += 1
                self.close()
                return
            self.resp_keep_alive = False
        self._arm_timer()


_RESP_HOP = frozenset(
    (
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
    )
)
# Names the response encoder looks at: hop-by-hop ones, framing, date/server and pseudo headers.
_RESP_SPECIAL = _RESP_HOP | frozenset((b"content-length", b"date", b"server", b":status"))

_status_lines: dict[tuple[bytes, int], bytes] = {}


def _status_line(version: bytes, status: int) -> bytes:
    line = _status_lines.get((version, status))
    if line is None:
        line = encode_response_head(status, [], version=version)[:-2]
        if len(_status_lines) < 1024:  # bounded: unusual codes are rebuilt each time
            _status_lines[(version, status)] = line
    return line
