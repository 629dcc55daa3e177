"""``envoy.filters.http.buffer``: hold the request until its whole body is in, then forward it
with a Content-Length (Envoy's buffer filter). A body over ``max_request_bytes`` gets 413.

Per-route ``BufferPerRoute`` (``disabled`` or its own ``max_request_bytes``) is honoured through
``typed_per_filter_config`` on the route, virtual host or route configuration, compiled once
with the route table (``callbacks.route_config(NAME)``).
"""

from __future__ import annotations

from typing import Any

from moorline.config import registry
from moorline.config.errors import ConfigError
from moorline.protocol.headers import HeaderMap
from moorline.proxy.filter import CONTINUE, STOP_ITERATION, HttpFilter

NAME = "envoy.filters.http.buffer"
TYPE = "envoy.extensions.filters.http.buffer.v3.Buffer"
PER_ROUTE_TYPE = "envoy.extensions.filters.http.buffer.v3.BufferPerRoute"


class BufferFilter(HttpFilter):
    __slots__ = ("active", "headers", "max_bytes", "size")

    def __init__(self, max_bytes: int) -> None:
        super().__init__()
        self.max_bytes = max_bytes
        self.size = 0
        self.headers: HeaderMap | None = None
        self.active = True

    def decode_headers(self, headers: HeaderMap, end_stream: bool) -> int:
        limit = _per_route_limit(self.callbacks, self.max_bytes)
        if limit is None or end_stream:
            self.active = False
            return CONTINUE
        self.max_bytes = limit
        self.headers = headers
        # The chain holds the body for us: let it hold up to our limit, not only the
        # connection's buffer limit (Envoy's setDecoderBufferLimit). Bounded either way.
        assert self.callbacks is not None
        self.callbacks.set_decoder_buffer_limit(max(limit, 1))
        return STOP_ITERATION

    def decode_data(self, data: bytes, end_stream: bool) -> int:
        if not self.active:
            return CONTINUE
        self.size += len(data)
        if self.size > self.max_bytes:
            self.active = False
            assert self.callbacks is not None
            self.callbacks.send_local_reply(413, b"Payload Too Large", None, "request_payload_too_large")
            return STOP_ITERATION
        if not end_stream:
            return STOP_ITERATION
        # Whole body buffered: forward it with its length instead of chunked framing.
        h = self.headers
        if h is not None:
            h.remove(b"transfer-encoding")
            h.set(b"content-length", str(self.size).encode())
        self.active = False
        return CONTINUE

    def decode_trailers(self, trailers: HeaderMap) -> int:
        self.active = False
        return CONTINUE


def _per_route_limit(callbacks: Any, default: int) -> int | None:
    """The route's BufferPerRoute (compiled at load): None when disabled there, else its limit
    (or the filter's)."""
    cfg = callbacks.route_config(NAME) if callbacks is not None else None
    if cfg is None:
        return default
    disabled, limit = cfg
    if disabled:
        return None
    return limit if limit is not None else default


def _per_route(msg: Any, path: str) -> tuple[bool, int | None]:
    if msg.disabled:
        return True, None
    if msg.HasField("buffer") and msg.buffer.HasField("max_request_bytes"):
        limit = int(msg.buffer.max_request_bytes.value)
        if limit <= 0:
            raise ConfigError(f"{path}.buffer.max_request_bytes", "must be greater than 0")
        return False, limit
    return False, None


def _factory(cfg: Any, ctx: Any, path: str) -> Any:
    if cfg is None or not cfg.HasField("max_request_bytes"):
        raise ConfigError(f"{path}.typed_config.max_request_bytes", "max_request_bytes is required")
    limit = int(cfg.max_request_bytes.value)
    if limit <= 0:
        raise ConfigError(f"{path}.typed_config.max_request_bytes", "must be greater than 0")
    return lambda stream: BufferFilter(limit)


registry.register(
    "http",
    [NAME],
    ["type.googleapis.com/" + TYPE],
    _factory,
    per_route=_per_route,
    per_route_types=["type.googleapis.com/" + PER_ROUTE_TYPE],
)
