"""Listener filter ``envoy.filters.listener.tls_inspector``: SNI and ALPN from the ClientHello.

Peeks at the first bytes of a connection (without consuming them) and, when they are a TLS
ClientHello, sets ``info.transport_protocol = "tls"``, ``info.server_name`` and ``info.alpn`` so
the filter chain can be chosen by ``server_names`` / ``transport_protocol`` /
``application_protocols`` -- also for chains that do not terminate TLS (SNI-routed passthrough
with tcp_proxy). Parsing is ``moorline.protocol.tls_hello`` (sans-IO, at most 64 KiB).

Stats (Envoy's names, root scope ``tls_inspector.``): ``tls_found``, ``tls_not_found``,
``sni_found``, ``sni_not_found``, ``alpn_found``, ``alpn_not_found``, ``client_hello_too_large``.
"""

from __future__ import annotations

from typing import Any

from moorline.config import registry
from moorline.config.errors import ConfigError
from moorline.net.listener import LISTENER_FILTER_CLOSE
from moorline.protocol.tls_hello import MAX_CLIENT_HELLO, NEED_MORE, TLS, TOO_LARGE, parse_client_hello

TLS_INSPECTOR_TYPE = "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"


class TlsInspector:
    """One per listener; ``on_data`` is called with everything peeked so far."""

    __slots__ = (
        "alpn_found",
        "alpn_not_found",
        "max_read_bytes",
        "sni_found",
        "sni_not_found",
        "tls_found",
        "tls_not_found",
        "too_large",
    )

    def __init__(self, ctx: Any, max_read_bytes: int = MAX_CLIENT_HELLO) -> None:
        self.max_read_bytes = max_read_bytes
        scope = ctx.stats.scope("tls_inspector.")
        self.tls_found = scope.counter("tls_found")
        self.tls_not_found = scope.counter("tls_not_found")
        self.sni_found = scope.counter("sni_found")
        self.sni_not_found = scope.counter("sni_not_found")
        self.alpn_found = scope.counter("alpn_found")
        self.alpn_not_found = scope.counter("alpn_not_found")
        self.too_large = scope.counter("client_hello_too_large")

    def on_data(self, data: bytes, info: Any) -> bool | int:
        status, sni, alpn = parse_client_hello(data)
        if status == NEED_MORE:
            return False
        if status == TOO_LARGE:
            # Envoy closes the connection (client_hello_too_large) rather than routing it as
            # plain TCP.
            self.too_large.value += 1
            return LISTENER_FILTER_CLOSE
        if status != TLS:
            self.tls_not_found.value += 1
            return True
        self.tls_found.value += 1
        info.transport_protocol = "tls"
        if sni:
            self.sni_found.value += 1
            info.server_name = sni
        else:
            self.sni_not_found.value += 1
        if alpn:
            self.alpn_found.value += 1
            info.alpn = alpn
        else:
            self.alpn_not_found.value += 1
        return True


def _factory(cfg: Any, ctx: Any, path: str) -> TlsInspector:
    size = MAX_CLIENT_HELLO
    if cfg is not None and hasattr(cfg, "HasField"):
        if cfg.HasField("initial_read_buffer_size"):
            # Envoy grows its buffer from this size; we peek up to the bound at once anyway.
            v = cfg.initial_read_buffer_size.value
            if not 1 <= v <= MAX_CLIENT_HELLO:
                raise ConfigError(f"{path}.typed_config.initial_read_buffer_size", "must be 1..65536")
        if cfg.HasField("enable_ja3_fingerprinting") and cfg.enable_ja3_fingerprinting.value:
            ctx.notice(f"{path}.typed_config.enable_ja3_fingerprinting: ignored")
    return TlsInspector(ctx, size)


registry.register(
    "listener",
    ["envoy.filters.listener.tls_inspector", "envoy.listener.tls_inspector"],
    ["type.googleapis.com/" + TLS_INSPECTOR_TYPE],
    _factory,
)
