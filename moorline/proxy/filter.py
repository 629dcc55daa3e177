"""The HTTP filter interface.

An HTTP filter sees one stream (request/response exchange). On the request
path (decoding) the connection manager calls ``decode_headers``,
``decode_data`` and ``decode_trailers`` of each filter in config order; on the
response path (encoding) ``encode_*`` in reverse order. Each call returns
``CONTINUE`` (hand the event to the next filter) or ``STOP_ITERATION`` (hold
it; the filter calls ``callbacks.continue_decoding()`` /
``continue_encoding()`` later, or sends a local reply).

While a filter holds headers, later body chunks are buffered by the connection
manager up to the connection's buffer limit (then 413 on the request path,
500 on the response path, as Envoy).

The router (``envoy.filters.http.router``) is the terminal decoder filter; it
is not in this chain, the connection manager drives it directly.

Filters register a factory under category ``http`` in
``moorline.config.registry``; the factory gets the filter's typed config and
returns a callable that creates one filter instance per stream.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moorline.protocol.headers import HeaderMap

if TYPE_CHECKING:
    from moorline.observability.stream_info import StreamInfo

CONTINUE = 0
STOP_ITERATION = 1


class FilterCallbacks:
    """What a filter may do to its stream (implemented by the HCM's ActiveStream)."""

    stream_info: StreamInfo

    def continue_decoding(self) -> None:
        raise NotImplementedError

    def continue_encoding(self) -> None:
        raise NotImplementedError

    def send_local_reply(
        self, status: int, body: bytes = b"", flag: str | None = None, details: str | None = None
    ) -> None:
        raise NotImplementedError

    def matched_route(self) -> Any:
        """The route this stream matched (None: no route)."""
        raise NotImplementedError

    def clear_route_cache(self) -> None:
        raise NotImplementedError


class HttpFilter:
    """Base class: every hook continues. Override the hooks you need."""

    __slots__ = ("callbacks",)

    def __init__(self) -> None:
        self.callbacks: FilterCallbacks | None = None

    def set_callbacks(self, callbacks: FilterCallbacks) -> None:
        self.callbacks = callbacks

    def decode_headers(self, headers: HeaderMap, end_stream: bool) -> int:
        return CONTINUE

    def decode_data(self, data: bytes, end_stream: bool) -> int:
        return CONTINUE

    def decode_trailers(self, trailers: HeaderMap) -> int:
        return CONTINUE

    def encode_headers(self, headers: HeaderMap, end_stream: bool) -> int:
        return CONTINUE

    def encode_data(self, data: bytes, end_stream: bool) -> int:
        return CONTINUE

    def encode_trailers(self, trailers: HeaderMap) -> int:
        return CONTINUE

    def on_destroy(self) -> None:
        """The stream ended (completed or reset); release resources."""
