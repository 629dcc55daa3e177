"""The "example" protocol: the x-protocol template filled in for a small multiplexed RPC.

This module is the worked example of this package's README: everything a protocol has to give
the proxy (``api.XCodec``), for a wire format small enough to read in one sitting. It is a real
protocol nonetheless (the proxy serves it like Bolt or Dubbo), handy for tests and demos.

Wire format, big-endian. A 13-byte head, then the header block, then the payload::

    0      magic        u8   0xEB
    1      type         u8   1 request, 2 oneway, 3 response, 4 heartbeat, 5 heartbeat response
    2      status       u8   responses: see STATUS_* (0 success); 0 on every other type
    3..6   request id   u32  a response carries its request's id
    7..8   header len   u16  bytes of the header block
    9..12  payload len  u32  bytes of the payload
    13     header block: strings, each [u8 length][UTF-8 bytes]: the service, the method, then
           name / value pairs of user headers (an even number of strings after the first two)
    ...    payload (opaque)

Multiplexed: many requests may be in flight on one connection, answered in any order; the id
is patched at offset 3 when the proxy shares an upstream connection. Heartbeats are answered
locally. The type byte values are ``api.FrameKind``'s, so decoding the kind is one lookup.

Bounds: a frame is at most ``api.MAX_FRAME`` bytes (the lengths in the head are checked before
anything is buffered); the header block is at most 65535 bytes by its u16 length.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping

from moorline.protocol.xprotocol.api import (
    MAX_FRAME,
    NEED_MORE,
    CodecError,
    Frame,
    FrameKind,
    Match,
    Reason,
    XCodec,
)

MAGIC = 0xEB
HEAD = struct.Struct(">BBBIHI")  # magic, type, status, request id, header len, payload len
HEAD_LEN = HEAD.size  # 13
ID_OFFSET = 3
_ID = struct.Struct(">I")
_KINDS = {k.value: k for k in FrameKind if k is not FrameKind.GOAWAY}

STATUS_SUCCESS = 0
STATUS_ERROR = 1  # the server failed the request
STATUS_BUSY = 2  # the server did not process it: another host may (retriable)
STATUS_NO_ROUTE = 3
STATUS_NO_HEALTHY_UPSTREAM = 4
STATUS_OVERFLOW = 5
STATUS_TIMEOUT = 6
STATUS_CODEC_ERROR = 7
STATUS_UPSTREAM_RESET = 8

# How each local-reply reason is told to the client.
REASON_STATUS: Mapping[Reason, int] = {
    Reason.NO_ROUTE: STATUS_NO_ROUTE,
    Reason.NO_HEALTHY_UPSTREAM: STATUS_NO_HEALTHY_UPSTREAM,
    Reason.OVERFLOW: STATUS_OVERFLOW,
    Reason.TIMEOUT: STATUS_TIMEOUT,
    Reason.CODEC_ERROR: STATUS_CODEC_ERROR,
    Reason.UPSTREAM_RESET: STATUS_UPSTREAM_RESET,
}


class ExampleFrame:
    """One decoded frame (``api.Frame``). The header block is decoded by ``decode``: it is
    only the routing key and a few user headers, and every request is routed on it."""

    __slots__ = ("_body_at", "_headers", "kind", "raw", "request_id", "status", "timeout_ms")

    def __init__(
        self, kind: FrameKind, request_id: int, status: int, raw: bytes, headers: dict[str, str], body_at: int
    ) -> None:
        self.kind = kind
        self.request_id = request_id
        self.status = status
        self.raw = raw
        self.timeout_ms = 0  # the protocol carries no timeout: the route's applies
        self._headers = headers
        self._body_at = body_at

    @property
    def headers(self) -> Mapping[str, str]:
        return self._headers

    @property
    def service(self) -> str:
        return self._headers.get("service", "")

    @property
    def method(self) -> str:
        return self._headers.get("method", "")

    @property
    def body(self) -> memoryview:
        return memoryview(self.raw)[self._body_at :]

    def __repr__(self) -> str:
        return f"ExampleFrame({self.kind.name}, id={self.request_id}, status={self.status}, {len(self.raw)} bytes)"


def encode_frame(
    kind: FrameKind,
    request_id: int,
    service: str = "",
    method: str = "",
    payload: bytes = b"",
    status: int = 0,
    headers: Iterable[tuple[str, str]] = (),
) -> bytes:
    """One frame's bytes (for clients, servers and tests; the proxy never re-encodes)."""
    block = bytearray()
    if service or method or headers:
        for s in (service, method, *(x for kv in headers for x in kv)):
            b = s.encode()
            if len(b) > 255:
                raise ValueError(f"header string longer than 255 bytes: {s[:40]!r}...")
            block.append(len(b))
            block += b
    if len(block) > 0xFFFF:
        raise ValueError("header block longer than 65535 bytes")
    head = HEAD.pack(MAGIC, kind.value, status, request_id, len(block), len(payload))
    return b"".join((head, block, payload))


def _parse_block(raw: bytes, start: int, end: int) -> dict[str, str]:
    strings: list[str] = []
    pos = start
    while pos < end:
        n = raw[pos]
        pos += 1
        if pos + n > end:
            raise CodecError("example: header string runs past the header block")
        try:
            strings.append(raw[pos : pos + n].decode())
        except UnicodeDecodeError:
            raise CodecError("example: header string is not UTF-8") from None
        pos += n
    if not strings:
        return {}
    if len(strings) < 2 or len(strings) % 2:
        raise CodecError("example: header block needs a service, a method and name/value pairs")
    out = {"service": strings[0], "method": strings[1]}
    for i in range(2, len(strings), 2):
        name = strings[i]
        if name in ("service", "method"):
            # A user header must not replace the routing key the proxy matched on.
            raise CodecError(f"example: user header {name!r} is reserved")
        out[name] = strings[i + 1]
    return out


class ExampleCodec:
    """``api.XCodec`` for the example protocol. Stateless: one object serves every connection."""

    name = "example"
    multiplexed = True
    heartbeat = True
    goaway = False

    def match(self, data: bytes) -> Match:
        # The whole head is 13 bytes: waiting for it makes a false YES unlikely (magic, a known
        # type, a zero status on requests and lengths within bounds must all hold).
        if not data:
            return Match.NEED_MORE
        if data[0] != MAGIC:
            return Match.NO
        if len(data) < HEAD_LEN:
            return Match.NO if len(data) >= 2 and data[1] not in _KINDS else Match.NEED_MORE
        _, kind, status, _, hlen, plen = HEAD.unpack_from(data)
        if kind not in _KINDS or (status and kind != FrameKind.RESPONSE):
            return Match.NO
        if HEAD_LEN + hlen + plen > MAX_FRAME:
            return Match.NO
        return Match.YES

    def frame_length(self, buf: bytes | bytearray | memoryview) -> int:
        # Fail on the first byte that cannot be this protocol, not only once a head is whole.
        if not buf:
            return NEED_MORE
        if buf[0] != MAGIC:
            raise CodecError(f"example: bad magic 0x{buf[0]:02x}")
        if len(buf) >= 2 and buf[1] not in _KINDS:
            raise CodecError(f"example: unknown frame type {buf[1]}")
        if len(buf) < HEAD_LEN:
            return NEED_MORE
        _, _, _, _, hlen, plen = HEAD.unpack_from(buf)
        total = HEAD_LEN + hlen + plen
        if total > MAX_FRAME:
            raise CodecError(f"example: frame of {total} bytes is over the {MAX_FRAME} limit")
        return total

    def decode(self, raw: bytes) -> ExampleFrame:
        if len(raw) < HEAD_LEN:
            raise CodecError("example: frame shorter than its head")
        magic, kind_v, status, rid, hlen, plen = HEAD.unpack_from(raw)
        if magic != MAGIC:
            raise CodecError(f"example: bad magic 0x{magic:02x}")
        kind = _KINDS.get(kind_v)
        if kind is None:
            raise CodecError(f"example: unknown frame type {kind_v}")
        if status and kind is not FrameKind.RESPONSE:
            raise CodecError(f"example: status {status} on a {kind.name.lower()} frame")
        body_at = HEAD_LEN + hlen
        if body_at + plen != len(raw):
            raise CodecError("example: frame length does not match its head")
        headers = _parse_block(raw, HEAD_LEN, body_at) if hlen else {}
        return ExampleFrame(kind, rid, status, raw, headers, body_at)

    def with_request_id(self, frame: Frame, request_id: int) -> bytes:
        raw = frame.raw
        return b"".join((raw[:ID_OFFSET], _ID.pack(request_id), raw[ID_OFFSET + 4 :]))

    def heartbeat_reply(self, frame: Frame) -> bytes:
        return HEAD.pack(MAGIC, FrameKind.HEARTBEAT_RESPONSE.value, 0, frame.request_id, 0, 0)

    def heartbeat_request(self, request_id: int) -> bytes:
        return HEAD.pack(MAGIC, FrameKind.HEARTBEAT.value, 0, request_id, 0, 0)

    def local_reply(self, request: Frame, reason: Reason, message: str) -> bytes:
        payload = message.encode()
        return (
            HEAD.pack(
                MAGIC, FrameKind.RESPONSE.value, REASON_STATUS[reason], request.request_id, 0, len(payload)
            )
            + payload
        )

    def is_success(self, response: Frame) -> bool:
        return response.status == STATUS_SUCCESS

    def is_retriable(self, response: Frame) -> bool:
        return response.status == STATUS_BUSY


CODEC = ExampleCodec()
CODECS: tuple[XCodec, ...] = (CODEC,)  # typed: mypy checks the codec against the contract
