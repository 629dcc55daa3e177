"""The HTTP filter manager: runs one stream's filter chain in both directions.

Separate from the connection manager, as Envoy's ``filter_manager.cc`` is: the connection
manager (``proxy.hcm.ActiveStream``) owns one ``FilterManager`` per stream *only when the
listener has filters besides the router*; a chain of just the router never builds one.

Decoding runs the filters in config order and ends in the stream's terminal (the router);
encoding runs them in reverse order and ends in the downstream codec. Each direction is a
``_Chain`` with the same rules (Envoy's semantics):

- ``*_headers`` returns ``CONTINUE``, ``STOP_ITERATION`` (hold the headers; later body chunks
  still reach this filter, which may ``CONTINUE`` to release everything) or
  ``STOP_ALL_ITERATION_AND_BUFFER`` (hold the headers and buffer the body without showing it
  to this filter, until ``continue_decoding()`` / ``continue_encoding()``).
- ``*_data`` returns ``CONTINUE``, ``STOP_ITERATION`` (= StopIterationAndBuffer: this chunk
  is buffered for the filters after it) or ``STOP_ITERATION_NO_BUFFER`` (the filter keeps
  the chunk itself).
- ``*_trailers`` returns ``CONTINUE`` or ``STOP_ITERATION``.

Bound: what a chain buffers for a stopped filter is at most the connection's buffer limit;
beyond it the request gets 413, a response whose headers were not sent yet 500, and a
response already started is reset (Envoy's rules).

A filter that keeps the body itself (``STOP_ITERATION_NO_BUFFER``) and releases it later, such
as the fault filter's response rate limit, hands each part on with ``inject(filter, data,
end_stream)`` (Envoy's ``injectEncodedDataToFilterChain``): the filters after it see the part,
in order behind anything a later filter holds. It bounds what it keeps with the stream's
watermark callbacks (``proxy.hcm.ActiveStream.encoder_above_high_watermark``), which pause the
upstream's reading, instead of the chain's 500/reset.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from moorline.protocol.headers import HeaderMap
from moorline.proxy.filter import (
    CONTINUE,
    STOP_ALL_ITERATION_AND_BUFFER,
    STOP_ITERATION_NO_BUFFER,
    HttpFilter,
)


class _Chain:
    """One direction of a stream's filter chain (see the module docstring)."""

    __slots__ = (
        "alive",
        "body",
        "body_bytes",
        "end",
        "filters",
        "hdr_hold",
        "hdr_idx",
        "headers",
        "headers_end",
        "kind",
        "limit",
        "on_overflow",
        "stop_all",
        "stop_at",
        "swap",
        "t_data",
        "t_headers",
        "t_trailers",
        "trailers",
    )

    def __init__(
        self,
        filters: list[Any],
        kind: str,
        limit: int,
        terminal_headers: Callable[[Any, bool], None],
        terminal_data: Callable[[bytes, bool], None],
        terminal_trailers: Callable[[HeaderMap], None],
        on_overflow: Callable[[], None],
        alive: Callable[[], bool],
    ) -> None:
        self.filters = filters  # bound methods' owners, in iteration order
        self.kind = kind  # "decode" or "encode": which hooks to call
        self.limit = limit
        self.t_headers = terminal_headers
        self.t_data = terminal_data
        self.t_trailers = terminal_trailers
        self.on_overflow = on_overflow
        self.alive = alive  # False once the stream ended or answered: stop iterating
        self.headers: Any = None
        self.headers_end = False
        self.hdr_idx = 0  # filters that have seen the headers
        self.stop_at: int | None = None  # the filter holding iteration
        self.stop_all = False  # it asked for the body to be buffered without seeing it
        self.hdr_hold: int | None = None  # a later filter still holding the headers (see _feed_held)
        self.body: list[bytes] | None = None
        self.body_bytes = 0
        self.end = False  # the buffered body ends the stream (no trailers follow)
        self.trailers: HeaderMap | None = None
        # A filter's replacement for the chunk it is handling (``set_data``): our chunks are
        # immutable bytes where Envoy's filters edit a buffer in place. Read after every data
        # hook, so it never outlives the call that set it.
        self.swap: bytes | None = None

    # -- hooks of the filters, by direction
    def _h(self, f: Any, headers: Any, end: bool) -> int:
        return f.decode_headers(headers, end) if self.kind == "decode" else f.encode_headers(headers, end)

    def _d(self, f: Any, data: bytes, end: bool) -> int:
        return f.decode_data(data, end) if self.kind == "decode" else f.encode_data(data, end)

    def _t(self, f: Any, trailers: HeaderMap) -> int:
        return f.decode_trailers(trailers) if self.kind == "decode" else f.encode_trailers(trailers)

    # -- events from the previous stage
    def on_headers(self, headers: Any, end_stream: bool) -> None:
        self.headers = headers
        self.headers_end = end_stream
        self._resume(0)

    def on_data(self, data: bytes, end_stream: bool) -> None:
        s = self.stop_at
        if s is None:
            self._push_data(data, end_stream, 0)
            return
        self._feed_held(data, end_stream, 0, s)

    def _feed_held(self, data: bytes, end_stream: bool, first: int, s: int) -> None:
        """Iteration is held at filter ``s``: the filters ``first``..``s`` see the chunk (``s``
        itself unless it stopped all iteration); what they pass on waits in the buffer."""
        fl = self.filters
        last = s - 1 if self.stop_all else s
        for i in range(first, last + 1):
            r = self._d(fl[i], data, end_stream)
            if not self.alive():
                return
            if self.swap is not None:
                data = self.swap
                self.swap = None
            if r != CONTINUE:
                if i < s:
                    if self.hdr_idx == s + 1 and self.hdr_hold is None:
                        # s still holds the headers: when i continues, the body goes on to s,
                        # and the headers stay held until s continues them.
                        self.hdr_hold = s
                    self.stop_at = i
                    self.stop_all = False
                if r != STOP_ITERATION_NO_BUFFER:
                    self._buffer(data, end_stream)
                elif end_stream:
                    self.end = True
                return
        self._buffer(data, end_stream)
        if last == s and self.alive():
            # The holding filter continued on this chunk: everything it held goes on.
            self._resume(s + 1)

    def on_trailers(self, trailers: HeaderMap) -> None:
        if self.stop_at is None:
            self._push_trailers(trailers, 0)
        else:
            self._trailers_held(trailers, 0)

    def _trailers_held(self, trailers: HeaderMap, first: int) -> None:
        """Iteration is held at filter ``stop_at``: filters ``first``.. up to it see the
        trailers, which then wait behind the buffered body."""
        s = self.stop_at
        assert s is not None
        fl = self.filters
        last = s - 1 if self.stop_all else s
        for i in range(first, last + 1):
            r = self._t(fl[i], trailers)
            if not self.alive():
                return
            sw = self.swap
            if sw is not None:
                # Filter i ends its body here (a compressor's last block): the filters up to
                # the holder see it as a chunk, and it waits in the buffer before the trailers.
                self.swap = None
                self._held_chunk(sw, i + 1, last)
                if not self.alive():
                    return
            if r != CONTINUE:
                if i < s:
                    self.stop_at = i
                    self.stop_all = False
                self.trailers = trailers
                return
        self.trailers = trailers
        if last == s:
            self._resume(s + 1)

    def _held_chunk(self, data: bytes, first: int, last: int) -> None:
        """A chunk a filter added from its trailers hook while a later filter holds iteration:
        filters ``first``..``last`` see it (they may replace it), then it is buffered."""
        fl = self.filters
        for j in range(first, last + 1):
            self._d(fl[j], data, False)
            if not self.alive():
                return
            if self.swap is not None:
                data = self.swap
                self.swap = None
        self._buffer(data, False)

    def resume(self) -> None:
        """``continue_decoding()`` / ``continue_encoding()`` from the holding filter. A filter
        that stopped all iteration has not seen the body it held: the body resumes at that
        filter (Envoy's iterate-from-current-filter), the headers after it."""
        s = self.stop_at
        if s is None or not self.alive():
            return
        h = self.hdr_hold
        if h is not None and h > s:
            # A filter before the one holding the headers continued: what it held reaches the
            # filters up to the holder, the headers stay where they are.
            self.hdr_hold = None
            self.stop_at = h
            body = self.body
            end = self.end
            self.body = None
            self.end = False
            self.body_bytes = 0
            if body or end:
                self._feed_held(b"".join(body) if body else b"", end, s + 1, h)
            return
        self._resume(s + 1, s if self.stop_all else s + 1)

    # -- iteration
    def _resume(self, start: int, body_start: int | None = None) -> None:
        fl = self.filters
        n = len(fl)
        self.stop_at = None
        self.stop_all = False
        i = max(start, self.hdr_idx)
        if self.hdr_idx <= n and self.headers is not None:
            while i < n:
                r = self._h(fl[i], self.headers, self.headers_end)
                self.hdr_idx = i + 1
                if not self.alive():
                    return
                if r != CONTINUE:
                    self.stop_at = i
                    self.stop_all = r == STOP_ALL_ITERATION_AND_BUFFER
                    return
                i += 1
            if self.hdr_idx <= n:
                self.hdr_idx = n + 1
                self.t_headers(self.headers, self.headers_end)
                if not self.alive():
                    return
        body = self.body
        trailers = self.trailers
        end = self.end
        self.body = None
        self.trailers = None
        self.end = False
        self.body_bytes = 0
        if body_start is None:
            body_start = start
        if body:
            self._push_data(b"".join(body) if len(body) > 1 else body[0], end, body_start)
        elif end:
            self._push_data(b"", True, body_start)
        if trailers is not None and self.alive():
            if self.stop_at is not None:
                self.trailers = trailers
            else:
                self._push_trailers(trailers, body_start)

    def _push_data(self, data: bytes, end_stream: bool, start: int) -> None:
        fl = self.filters
        for i in range(start, len(fl)):
            r = self._d(fl[i], data, end_stream)
            if not self.alive():
                return
            if self.swap is not None:
                data = self.swap
                self.swap = None
            if r != CONTINUE:
                # Filter i saw this chunk and holds it: buffer it for the filters after i.
                self.stop_at = i
                if r != STOP_ITERATION_NO_BUFFER:
                    self._buffer(data, end_stream)
                elif end_stream:
                    self.end = True
                return
        self.t_data(data, end_stream)

    def _push_trailers(self, trailers: HeaderMap, start: int) -> None:
        fl = self.filters
        for i in range(start, len(fl)):
            r = self._t(fl[i], trailers)
            if not self.alive():
                return
            sw = self.swap
            if sw is not None:
                # Filter i ends its body before the trailers: the filters after it get that
                # chunk first (Envoy's addEncodedData from a trailers callback).
                self.swap = None
                self._push_data(sw, False, i + 1)
                if not self.alive():
                    return
                if self.stop_at is not None and r == CONTINUE:
                    # A later filter holds that chunk: the filters up to it see the trailers,
                    # which then wait behind it.
                    self._trailers_held(trailers, i + 1)
                    return
            if r != CONTINUE:
                self.stop_at = i
                self.trailers = trailers
                return
        self.t_trailers(trailers)

    def _buffer(self, data: bytes, end_stream: bool) -> None:
        if data:
            if self.body is None:
                self.body = []
            self.body.append(data)
            self.body_bytes += len(data)
        if end_stream:
            self.end = True
        if self.body_bytes > self.limit:
            self.body = None
            self.body_bytes = 0
            self.on_overflow()

    def buffered(self) -> bytes:
        return b"".join(self.body or ())

    def inject(self, f: Any, data: bytes, end_stream: bool) -> None:
        """Filter ``f`` releases ``data`` it kept (see the module docstring). With
        ``end_stream`` the filter ends the body itself: the end it kept from the chain
        (``STOP_ITERATION_NO_BUFFER`` on the last chunk) is dropped, not sent twice."""
        if not self.alive():
            return
        i = self.filters.index(f)
        if end_stream:
            self.end = False
        s = self.stop_at
        if s is not None and s > i:
            # A filter after f holds iteration: the part reaches the filters up to it and
            # waits behind what it already holds.
            self._feed_held(data, end_stream, i + 1, s)
        else:
            self._push_data(data, end_stream, i + 1)

    def add_buffered(self, data: bytes) -> None:
        self._buffer(data, False)

    def set_data(self, data: bytes) -> None:
        """From a data hook: the chunk the following filters see becomes ``data``. From a
        trailers hook: ``data`` is a last body chunk the following filters see before the
        trailers."""
        self.swap = data


class FilterManager:
    """One stream's HTTP filters (decoder side to the router, encoder side to the codec)."""

    __slots__ = ("dec", "enc", "filters")

    def __init__(self, stream: Any, factories: list[Any], limit: int) -> None:
        fl: list[HttpFilter] = []
        for f in factories:
            inst = f(stream)
            inst.set_callbacks(stream)
            fl.append(inst)
        self.filters = fl
        self.dec = _Chain(
            fl,
            "decode",
            limit,
            stream.route_request,
            stream.router_data,
            stream.router_trailers,
            stream.request_too_large,
            stream.decoding_alive,
        )
        self.enc = _Chain(
            fl[::-1],
            "encode",
            limit,
            stream.write_headers,
            stream.write_data,
            stream.write_trailers,
            stream.response_too_large,
            stream.encoding_alive,
        )

    def destroy(self) -> None:
        for f in self.filters:
            f.on_destroy()
        self.filters = []
        # The chains hold bound methods of the stream: drop them so the stream is freed by
        # reference counting, not by the cycle collector.
        self.dec = self.enc = None  # type: ignore[assignment]
