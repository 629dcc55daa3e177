"""The STREAM -> PROXY contract: what every codec produces and what the proxy hands it.

Codec glue in ``stream/`` (HTTP/1.1, HTTP/2; Bolt, Dubbo and HTTP/3 later) implements the
connection side of these interfaces; ``proxy/`` implements the callbacks. ``stream/`` never
imports ``proxy/``: the connection manager reaches a codec through a ``CodecRegistry`` and the
codec reaches the connection manager through the ``ServerConnectionCallbacks`` it was given.

==========================  ==================================================  ==========================
interface                   implemented by                                      used by
==========================  ==================================================  ==========================
``RequestHeaders``          ``protocol.headers`` (one type for every codec)      everything
``ResponseHeaders``         ``protocol.headers``                                 everything
``ServerConnection``        ``stream.http1_server.Http1ServerConnection``,      ``proxy.hcm.ActiveStream``
                            ``stream.http2_server.H2ServerStream``
``ServerConnectionCallbacks`` ``proxy.hcm.HcmConfig``                           the server codecs
``StreamDecoder``           ``proxy.hcm.ActiveStream``                           the server codecs
``UpstreamStream``          ``stream.http1_client.Http1ClientConnection``,      ``proxy.router.Router``
                            ``stream.http2_client.H2UpstreamStream``,
                            ``stream.tcp_upstream.TcpUpstream`` (CONNECT termination)
``ResponseDecoder``         ``proxy.router.Router``                              the upstream pools
``CodecRegistry``           this module                                          ``proxy.hcm``, ``server``
==========================  ==================================================  ==========================
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, Protocol

from moorline.protocol.headers import HeaderMap, RequestHeaders, ResponseHeaders

__all__ = [
    "CodecRegistry",
    "HttpProtocol",
    "RequestHeaders",
    "ResetReason",
    "ResponseDecoder",
    "ResponseHeaders",
    "ServerConnection",
    "ServerConnectionCallbacks",
    "StreamDecoder",
    "UpstreamStream",
]


class HttpProtocol(enum.IntEnum):
    """The protocol a stream arrived on (Envoy's ``Http::Protocol``)."""

    HTTP10 = 0
    HTTP11 = 1
    HTTP2 = 2
    HTTP3 = 3

    @property
    def label(self) -> str:
        """As access logs print it (``%PROTOCOL%``)."""
        return _LABELS[self]


_LABELS = {
    HttpProtocol.HTTP10: "HTTP/1.0",
    HttpProtocol.HTTP11: "HTTP/1.1",
    HttpProtocol.HTTP2: "HTTP/2",
    HttpProtocol.HTTP3: "HTTP/3",
}


class ResetReason(enum.Enum):
    """Why a stream ended without completing (Envoy's ``StreamResetReason``)."""

    LOCAL_RESET = "local reset"
    LOCAL_REFUSED_STREAM = "local refused stream reset"
    REMOTE_RESET = "remote reset"
    REMOTE_REFUSED_STREAM = "remote refused stream reset"  # safe to retry (RFC 9113 8.7)
    CONNECTION_FAILURE = "connection failure"
    CONNECTION_TERMINATION = "connection termination"
    OVERFLOW = "overflow"
    PROTOCOL_ERROR = "protocol error"

    @property
    def flag_detail(self) -> str:
        """The ``{...}`` part of Envoy's ``upstream_reset_before_response_started`` details."""
        return self.value.replace(" ", "_")


# ``detail`` of ``on_upstream_reset(REMOTE_REFUSED_STREAM, detail)`` when the stream was above
# the last stream id of a GOAWAY from the upstream: the upstream never saw it (RFC 9113 6.8), so
# it may be sent again on another connection however often that happens.
GOAWAY_REFUSED = "goaway"


class ServerConnection(Protocol):
    """A downstream codec connection (HTTP/1.1) or stream (HTTP/2) as one exchange sees it."""

    protocol: HttpProtocol
    info: Any  # net.conn_info.ConnInfo
    loop: Any
    resp_keep_alive: bool  # False: the connection closes after this response
    close_after_response: bool

    @property
    def last_activity(self) -> float: ...

    @property
    def backlog(self) -> Any: ...  # pipelined events still queued (truthy: do not resume reading)

    @property
    def write_paused(self) -> bool: ...  # above the write high-water mark: do not push more

    def encode_headers(self, headers: ResponseHeaders, end_stream: bool) -> None: ...
    def encode_data(self, data: bytes, end_stream: bool) -> None: ...
    def encode_trailers(self, trailers: HeaderMap) -> None: ...
    def encode_tunnel(self, data: bytes, end_stream: bool) -> None:
        """Raw bytes of an upgraded (WebSocket) or CONNECT exchange."""

    def flush_pending(self) -> None: ...
    def start_tunnel(self) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None:
        """Reset the exchange: HTTP/1.1 closes the connection, HTTP/2 resets the stream."""

    def stream_ended(self) -> None:
        """The exchange finished; the connection may serve the next one."""

    def drain_after_response(self) -> None:
        """Keep-alive is off for this exchange (overload's ``disable_http_keepalive``): HTTP/1.1
        answers with ``connection: close``; HTTP/2 drains the connection (GOAWAY, the streams in
        flight finish, then it closes) once this response is done."""


class StreamDecoder(Protocol):
    """What a server codec calls on the exchange it created (``ActiveStream``)."""

    request_complete: bool

    def decode_headers(self, headers: RequestHeaders, end_stream: bool) -> None: ...
    def decode_data(self, data: bytes, end_stream: bool) -> None: ...
    def decode_trailers(self, trailers: HeaderMap) -> None: ...
    def decode_tunnel(self, data: bytes, end_stream: bool) -> None: ...
    def on_reset(self, reason: ResetReason) -> None:
        """The downstream went away (connection closed, RST_STREAM)."""

    def on_write_paused(self) -> None: ...
    def on_write_resumed(self) -> None: ...
    def check_timeouts(self, now: float) -> bool: ...
    def protocol_error(self, status: int, details: str) -> None:
        """The codec found the request malformed after the stream started."""


class ServerConnectionCallbacks(Protocol):
    """What a server codec needs from its connection manager (``HcmConfig``)."""

    stats: Any  # the HCM's HcmStats
    limits: Any
    server_name: bytes
    server_header_transformation: int
    runtime: Any  # stream.connections.ServerConnections: live connections, drain flag, sweep
    timer_period: float
    idle_timeout: float | None
    request_headers_timeout: float | None
    max_connection_duration: float | None
    stream_idle_timeout: float | None
    delayed_close_timeout: float | None

    def new_stream(self, conn: ServerConnection) -> StreamDecoder: ...
    def local_error(self, conn: ServerConnection, status: int, details: str) -> None:
        """Answer a request the codec rejected before (or instead of) a stream: status and
        Envoy's response_code_details, through the same local-reply path as any stream."""


class ResponseDecoder(Protocol):
    """What an upstream pool and connection call on the request using them (the router)."""

    # RouteAction.priority HIGH: the pool counts its pending slot and the connection it opens
    # against the cluster's HIGH thresholds (``cluster.high``)
    high: bool

    def on_pool_ready(self, conn: UpstreamStream) -> None: ...
    def on_pool_failure(self, reason: ResetReason, detail: str | None) -> None: ...
    def on_upstream_1xx(self, headers: ResponseHeaders) -> None: ...
    def on_upstream_headers(self, headers: ResponseHeaders, end_stream: bool) -> None: ...
    def on_upstream_data(self, data: bytes, end_stream: bool) -> None: ...
    def on_upstream_trailers(self, trailers: HeaderMap) -> None: ...
    def on_upstream_reset(self, reason: ResetReason, detail: str = "") -> None: ...
    def on_upstream_upgrade(self, leftover: bytes) -> None: ...
    def on_upstream_batch_end(self) -> None: ...
    def on_upstream_write_paused(self) -> None: ...
    def on_upstream_write_resumed(self) -> None: ...


class UpstreamStream(Protocol):
    """A pooled upstream connection (HTTP/1.1) or stream (HTTP/2) carrying one request."""

    pool: Any

    def send_headers(self, req: ResponseDecoder, headers: RequestHeaders, end_stream: bool) -> None: ...
    def send_data(self, data: bytes, end_stream: bool) -> None: ...
    def send_trailers(self, trailers: HeaderMap) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def release(self) -> None:
        """The exchange completed: the connection goes back to its pool (or closes)."""

    def abort(self) -> None: ...


ServerCodecFactory = Callable[[ServerConnectionCallbacks, Any], Any]
"""``factory(callbacks, conn_info) -> asyncio.Protocol`` for one accepted connection."""


class CodecRegistry:
    """Server codecs by name (``http1``, ``http2``, ``auto``; ``bolt``, ``dubbo``, ``http3``
    later). The server owns one (``BuildContext.codecs``, built-ins from ``stream.builtin_codecs``); listeners look codecs up
    when they are compiled, never per connection."""

    __slots__ = ("_server",)

    def __init__(self) -> None:
        self._server: dict[str, ServerCodecFactory] = {}

    def register_server(self, name: str, factory: ServerCodecFactory) -> None:
        self._server[name] = factory

    def server(self, name: str) -> ServerCodecFactory | None:
        return self._server.get(name)

    def names(self) -> list[str]:
        return sorted(self._server)
