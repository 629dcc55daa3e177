"""Listener filter ``envoy.filters.listener.http_inspector``: HTTP/1.x or h2c prior knowledge.

For a connection that is not TLS (``info.transport_protocol != "tls"``), looks at the peeked
first bytes: the HTTP/2 connection preface sets ``info.alpn = ["h2c"]``, an HTTP/1.x request line
sets ``["http/1.1"]`` (or ``["http/1.0"]``), so chains can match ``application_protocols``.
Bound: the request line is looked for in the first ``MAX_READ`` (8 KiB) bytes; anything longer
is not taken for HTTP.

Stats (root scope ``http_inspector.``): ``http10_found``, ``http11_found``, ``http2_found``,
``http_not_found``.
"""

from __future__ import annotations

from typing import Any

from moorline.config import registry

HTTP_INSPECTOR_TYPE = "envoy.extensions.filters.listener.http_inspector.v3.HttpInspector"
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_READ = 8192
_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


class HttpInspector:
    __slots__ = ("h2", "h10", "h11", "max_read_bytes", "none")

    def __init__(self, ctx: Any) -> None:
        self.max_read_bytes = MAX_READ
        scope = ctx.stats.scope("http_inspector.")
        self.h10 = scope.counter("http10_found")
        self.h11 = scope.counter("http11_found")
        self.h2 = scope.counter("http2_found")
        self.none = scope.counter("http_not_found")

    def on_data(self, data: bytes, info: Any) -> bool:
        if info.transport_protocol == "tls":
            return True  # TLS: ALPN decides, not the plaintext
        n = min(len(data), len(H2_PREFACE))
        if data[:n] == H2_PREFACE[:n]:
            if n < len(H2_PREFACE):
                return False
            self.h2.value += 1
            info.alpn = ["h2c"]
            return True
        end = data.find(b"\r\n", 0, MAX_READ)
        line = data[:end] if end >= 0 else data[:MAX_READ]
        # Still reading the method: it must be a token, or this is not HTTP.
        sp = line.find(b" ")
        method = line if sp < 0 else line[:sp]
        if not method or any(c not in _TOKEN for c in method):
            self.none.value += 1
            return True
        if end < 0:
            if len(data) >= MAX_READ:
                self.none.value += 1
                return True
            return False
        parts = line.split(b" ")
        if len(parts) != 3 or not parts[1]:
            self.none.value += 1
            return True
        version = parts[2]
        if version == b"HTTP/1.1":
            self.h11.value += 1
            info.alpn = ["http/1.1"]
        elif version == b"HTTP/1.0":
            self.h10.value += 1
            info.alpn = ["http/1.0"]
        else:
            self.none.value += 1
        return True


def _factory(cfg: Any, ctx: Any, path: str) -> HttpInspector:
    return HttpInspector(ctx)


registry.register(
    "listener",
    ["envoy.filters.listener.http_inspector", "envoy.listener.http_inspector"],
    ["type.googleapis.com/" + HTTP_INSPECTOR_TYPE],
    _factory,
)
