"""The HTTP filter interface.

An HTTP filter sees one stream (request/response exchange). On the request
path (decoding) the connection manager calls ``decode_headers``,
``decode_data`` and ``decode_trailers`` of each filter in config order; on the
response path (encoding) ``encode_*`` in reverse order. Each call returns
``CONTINUE`` (hand the event to the next filter) or one of the stop values
below (hold it; the filter calls ``callbacks.continue_decoding()`` /
``continue_encoding()`` later, or sends a local reply). The rules are in
``moorline.proxy.filter_manager``.

While a filter holds headers, later body chunks are buffered by the filter
manager up to the connection's buffer limit (then 413 on the request path,
500 on the response path, as Envoy).

The router (``envoy.filters.http.router``) is the terminal decoder filter; it
is not in this chain, the connection manager drives it directly.

Filters register a factory under category ``http`` in
``moorline.config.registry``; the factory gets the filter's typed config and
returns a callable that creates one filter instance per stream.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from moorline.protocol.headers import HeaderMap, RequestHeaders, ResponseHeaders

if TYPE_CHECKING:
    from moorline.observability.stream_info import StreamInfo

CONTINUE = 0
STOP_ITERATION = 1  # headers: hold them; data: hold and buffer (StopIterationAndBuffer)
STOP_ALL_ITERATION_AND_BUFFER = 2  # headers: hold them and buffer the body unseen
STOP_ITERATION_NO_BUFFER = 3  # data: the filter keeps the chunk itself


class FilterCallbacks(Protocol):
    """What a filter may do to its stream (implemented by ``proxy.hcm.ActiveStream``)."""

    @property
    def stream_info(self) -> StreamInfo: ...

    def continue_decoding(self) -> None: ...

    def continue_encoding(self) -> None: ...

    def send_local_reply(
        self,
        status: int,
        body: bytes = b"",
        flag: str | None = None,
        details: str | None = None,
        *,
        grpc_status: int | None = None,
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        """Answer locally (``grpc_status`` and ``extra`` by keyword: ``ActiveStream`` takes
        other arguments between them). A gRPC request gets a trailers-only reply whose grpc-status is
        ``grpc_status`` when given, else the one mapped from ``status``; ``extra`` headers go on
        the reply (a CORS preflight's allow-* ones)."""

    def matched_route(self) -> Any:
        """The route this stream matched (None: no route)."""

    def clear_route_cache(self) -> None: ...

    def bridge_to_grpc(self) -> None:
        """The request now goes upstream as gRPC (a protocol bridge such as grpc_web rewrote
        it): the router applies its gRPC handling to it (grpc-timeout and max_grpc_timeout,
        outlier detection by grpc-status), as Envoy's router judges the rewritten headers. Local
        replies stay what the downstream protocol gets."""

    def route_config(self, filter_name: str) -> Any:
        """The matched route's ``typed_per_filter_config`` for ``filter_name``, compiled at load
        by the filter's per-route factory (most specific level wins); None if not set."""

    def set_decoder_buffer_limit(self, limit: int) -> None:
        """How many bytes the decoder chain may buffer for this stream's stopped filters."""

    def decoding_buffer(self) -> bytes: ...

    def add_decoded_data(self, data: bytes) -> None: ...

    def encoding_buffer(self) -> bytes: ...

    def add_encoded_data(self, data: bytes) -> None: ...

    def set_decoded_data(self, data: bytes) -> None:
        """Only from inside ``decode_data``: the filters after this one (and the router) get
        ``data`` instead of the chunk (Envoy's filters edit the chunk's buffer in place). From
        inside ``decode_trailers``: ``data`` reaches them as a last chunk before the trailers."""

    def set_encoded_data(self, data: bytes) -> None:
        """``set_decoded_data`` for the response: from inside ``encode_data`` or
        ``encode_trailers`` only."""

    def inject_encoded_data(self, f: HttpFilter, data: bytes, end_stream: bool) -> None:
        """Filter ``f``, which kept response body chunks (``STOP_ITERATION_NO_BUFFER``),
        releases ``data`` to the filters after it (outside its hooks, e.g. from a timer)."""

    def encoder_above_high_watermark(self) -> None:
        """An encoder filter keeps more than the stream's buffer limit: pause the upstream's
        reading until ``encoder_below_low_watermark()``."""

    def encoder_below_low_watermark(self) -> None: ...


class HttpFilter:
    """Base class: every hook continues. Override the hooks you need."""

    __slots__ = ("callbacks",)

    def __init__(self) -> None:
        self.callbacks: FilterCallbacks | None = None

    def set_callbacks(self, callbacks: FilterCallbacks) -> None:
        self.callbacks = callbacks

    def decode_headers(self, headers: RequestHeaders, end_stream: bool) -> int:
        return CONTINUE

    def decode_data(self, data: bytes, end_stream: bool) -> int:
        return CONTINUE

    def decode_trailers(self, trailers: HeaderMap) -> int:
        return CONTINUE

    def encode_headers(self, headers: ResponseHeaders, end_stream: bool) -> int:
        return CONTINUE

    def encode_data(self, data: bytes, end_stream: bool) -> int:
        return CONTINUE

    def encode_trailers(self, trailers: HeaderMap) -> int:
        return CONTINUE

    def on_destroy(self) -> None:
        """The stream ended (completed or reset); release resources."""
