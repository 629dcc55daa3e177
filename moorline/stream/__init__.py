"""STREAM: codec events in, streams out; upstream connection pools. The contract with
``proxy/`` is ``moorline.stream.api``; see README.md."""

from __future__ import annotations

from moorline.stream.api import CodecRegistry


def builtin_codecs() -> CodecRegistry:
    """A codec registry holding the HTTP/1.1 and HTTP/2 server codecs."""
    from moorline.stream import http1_server, http2_server

    r = CodecRegistry()
    r.register_server("http1", http1_server.Http1ServerConnection)
    r.register_server("http2", http2_server.server_factory(force_h2=True))
    r.register_server("auto", http2_server.server_factory(force_h2=False))
    return r
