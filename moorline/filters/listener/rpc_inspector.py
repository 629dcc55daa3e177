"""Listener filter ``moorline.filters.listener.rpc_inspector``: HTTP and RPC protocols on one port.

Looks at the peeked first bytes of a plaintext connection and sets ``info.alpn`` so that
``filter_chain_match.application_protocols`` picks the chain (MOSN's ``auto`` protocol, done the
Envoy way): the HTTP/2 connection preface gives ``["h2c"]``, an HTTP/1.x request line
``["http/1.1"]`` (``["http/1.0"]`` for 1.0, as ``http_inspector`` says), otherwise the first
x-protocol codec (``moorline.protocol.xprotocol.builtin_codecs()``, in registration order) whose
``match()`` says YES gives ``[codec.name]`` (``["example"]``, ``["bolt"]``, ``["dubbo"]``). When
every candidate says NO, ``alpn`` is left as it was and the chain without
``application_protocols`` (if any) serves the connection.

The candidates are asked in that order, and one only wins once every candidate before it said NO:
the answer does not depend on how the first bytes were split into reads. While an earlier
candidate still needs more bytes the filter waits, bounded by bytes (below) and by the
listener's ``listener_filters_timeout`` (then the connection is closed, or handed on with what is
known under ``continue_on_listener_filters_timeout``).

Bounds: ``MAX_READ`` (8 KiB, as ``http_inspector``) for an HTTP/1.x request line; a codec sees at
most the first ``MATCH_BYTES`` (64) bytes, and one still saying NEED_MORE there counts as NO.
Binary protocols are told apart by their first bytes (a magic byte is not an HTTP token
character), so they never wait for the HTTP bound.

Config: none, ``google.protobuf.Empty``, or a TypedStruct (``xds.type.v3`` / ``udpa.type.v1``)
of type ``moorline.filters.listener.rpc_inspector.v1.RpcInspector`` with an empty ``value``.

Stats (root scope ``rpc_inspector.``): ``http1_found``, ``http2_found``, ``<codec>_found`` for
each registered codec, ``not_found``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from moorline.config import registry
from moorline.config.errors import ConfigError
from moorline.config.loader import OpaqueAny
from moorline.protocol.xprotocol import builtin_codecs
from moorline.protocol.xprotocol.api import CodecError, Match

NAME = "moorline.filters.listener.rpc_inspector"
TYPE = "moorline.filters.listener.rpc_inspector.v1.RpcInspector"
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_READ = 8192
MATCH_BYTES = 64
_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_H11 = ["http/1.1"]
_H10 = ["http/1.0"]
_H2C = ["h2c"]


def match_h2(data: bytes) -> Match | list[str]:
    n = min(len(data), len(H2_PREFACE))
    if data[:n] != H2_PREFACE[:n]:
        return Match.NO
    return _H2C if n == len(H2_PREFACE) else Match.NEED_MORE


def match_http1(data: bytes) -> Match | list[str]:
    """An HTTP/1.x request line: ``token SP target SP HTTP/1.x CRLF`` within ``MAX_READ``."""
    end = data.find(b"\r\n", 0, MAX_READ)
    line = data[:end] if end >= 0 else data[:MAX_READ]
    sp = line.find(b" ")
    method = line if sp < 0 else line[:sp]
    if sp == 0 or any(c not in _TOKEN for c in method):
        return Match.NO
    if end < 0:
        return Match.NO if len(data) >= MAX_READ else Match.NEED_MORE
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        return Match.NO
    if parts[2] == b"HTTP/1.1":
        return _H11
    if parts[2] == b"HTTP/1.0":
        return _H10
    return Match.NO


def _codec_matcher(codec: Any) -> Callable[[bytes], Match | list[str]]:
    alpn = [codec.name]

    def match(data: bytes) -> Match | list[str]:
        try:
            r = codec.match(data[:MATCH_BYTES])
        except CodecError:
            return Match.NO  # bytes that cannot be this protocol, said the other way
        if r is Match.YES:
            return alpn
        if r is Match.NEED_MORE and len(data) < MATCH_BYTES:
            return Match.NEED_MORE
        return Match.NO

    return match


class RpcInspector:
    __slots__ = ("candidates", "max_read_bytes", "not_found")

    def __init__(self, ctx: Any, codecs: dict[str, Any]) -> None:
        self.max_read_bytes = MAX_READ
        scope = ctx.stats.scope("rpc_inspector.")
        self.not_found = scope.counter("not_found")
        # (matcher, counter), asked in this order.
        self.candidates: list[tuple[Callable[[bytes], Match | list[str]], Any]] = [
            (match_h2, scope.counter("http2_found")),
            (match_http1, scope.counter("http1_found")),
        ]
        for name, codec in codecs.items():
            self.candidates.append((_codec_matcher(codec), scope.counter(f"{name}_found")))

    def on_data(self, data: bytes, info: Any) -> bool:
        if info.transport_protocol == "tls":
            return True  # TLS: the ClientHello's ALPN decides, not the plaintext
        for match, found in self.candidates:
            r = match(data)
            if isinstance(r, list):
                found.value += 1
                info.alpn = list(r)  # the connection's own list
                return True
            if r is Match.NEED_MORE:
                # An earlier candidate is undecided: a later YES must not win over it.
                if len(data) >= self.max_read_bytes:
                    break
                return False
        self.not_found.value += 1
        return True


def _factory(cfg: Any, ctx: Any, path: str) -> RpcInspector:
    if isinstance(cfg, OpaqueAny):
        if cfg.type_name != TYPE:
            raise ConfigError(f"{path}.typed_config", f"expected {TYPE}, got {cfg.type_name}")
        for key in cfg.value:
            raise ConfigError(
                f"{path}.typed_config.value.{key}", "unknown field (rpc_inspector takes no settings)"
            )
    elif cfg is not None and cfg.DESCRIPTOR.full_name != "google.protobuf.Empty":
        raise ConfigError(
            f"{path}.typed_config",
            f"expected {TYPE} or google.protobuf.Empty, got {cfg.DESCRIPTOR.full_name}",
        )
    return RpcInspector(ctx, builtin_codecs())


registry.register("listener", [NAME], ["type.googleapis.com/" + TYPE], _factory)
