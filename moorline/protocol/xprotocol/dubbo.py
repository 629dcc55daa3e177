"""Dubbo (the ``dubbo://`` protocol of Apache Dubbo 2.x), an x-protocol codec (sans-IO).

A frame is a 16-byte head, big-endian, then the body::

    0      2      3        4                 12            16
    | dabb | flag | status | request id (u64) | body length (u32) | body ...

``flag``: 0x80 request, 0x40 two-way (expects a response), 0x20 event, the low five bits the
serialization id (2 = Hessian2). ``status`` (responses): 20 OK, 30 client timeout, 31 server
timeout, 40 bad request, 50 bad response, 60 service not found, 70 service error, 80 server
error, 90 client error, 100 server thread pool exhausted.

Kinds: a two-way event request is a heartbeat (answered with an event response, status 20,
body ``N``); an event response is a heartbeat response; a one-way event whose body is the
string ``R`` is Dubbo's read-only event (the server takes no new requests): ``GOAWAY``; other
requests are ``REQUEST`` (two-way) or ``ONEWAY``.

A Hessian2 request body is: dubbo version, service path, service version, method name,
parameter types (a JVM descriptor such as ``Ljava/lang/String;I``), one value per parameter,
then the attachments map. ``decode`` reads the five leading strings (what routing needs; a
malformed prefix is the ``CodecError`` of ``decode``); the attachments are read only when a
header other than those is asked for, skipping the arguments (an unreadable tail then just
gives no attachments: the frame still routes on its prefix). Other serializations pass through
with empty headers. Headers: ``service`` (the path, as MOSN's dubbo codec keys it), ``version``,
``method``, ``dubbo`` (the framework version), plus the attachments whose values are strings
(the four names above are the body's and win over attachments of the same name). A
``timeout`` attachment (milliseconds, as Java Dubbo sends) is the frame's ``timeout_ms``, read
only when asked for.

Local replies (the proxy's reasons -> Dubbo status; body: the message as a Hessian2 string, as
Java Dubbo writes an error response): no route and no healthy upstream -> 60 SERVICE_NOT_FOUND
(as MOSN), overflow -> 40 BAD_REQUEST (as MOSN: 100 would be the natural "busy" status, but
older clients, dubbo-ssl-python among them, cannot parse it), timeout -> 31 SERVER_TIMEOUT (the
request was sent and the server did not answer in time, Dubbo's own meaning; MOSN says 30),
codec error -> 40 BAD_REQUEST (Dubbo's answer to an undecodable request), upstream reset -> 80
SERVER_ERROR. ``is_retriable``: 100 (the server's pool refused the request before running it).

Bounds: ``frame_length`` refuses a body length beyond ``MAX_FRAME``; header decoding is bounded
by the frame (see ``hessian2``). The codec holds no state.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping
from typing import cast

from moorline.protocol.xprotocol.api import (
    MAX_FRAME,
    NEED_MORE,
    CodecError,
    Frame,
    FrameKind,
    Match,
    Reason,
)
from moorline.protocol.xprotocol.hessian2 import Hessian2Reader, encode_string

HEAD = 16
MAGIC = b"\xda\xbb"
FLAG_REQUEST = 0x80
FLAG_TWO_WAY = 0x40
FLAG_EVENT = 0x20
SERIALIZATION_MASK = 0x1F
HESSIAN2 = 2

OK = 20
CLIENT_TIMEOUT = 30
SERVER_TIMEOUT = 31
BAD_REQUEST = 40
BAD_RESPONSE = 50
SERVICE_NOT_FOUND = 60
SERVICE_ERROR = 70
SERVER_ERROR = 80
CLIENT_ERROR = 90
SERVER_THREADPOOL_EXHAUSTED = 100

REASON_STATUS: Mapping[Reason, int] = {
    Reason.NO_ROUTE: SERVICE_NOT_FOUND,
    Reason.NO_HEALTHY_UPSTREAM: SERVICE_NOT_FOUND,
    Reason.OVERFLOW: BAD_REQUEST,
    Reason.TIMEOUT: SERVER_TIMEOUT,
    Reason.CODEC_ERROR: BAD_REQUEST,
    Reason.UPSTREAM_RESET: SERVER_ERROR,
}

_HEAD = struct.Struct(">2sBBQI")
_ID = struct.Struct(">Q")
_NULL_BODY = b"\x00\x00\x00\x01N"
_READONLY = encode_string("R")
_BODY_KEYS = ("service", "version", "method", "dubbo")


def _count_params(desc: str) -> int:
    """How many parameters a JVM descriptor lists (``Ljava/lang/String;[II`` -> 3)."""
    n = i = 0
    end = len(desc)
    while i < end:
        c = desc[i]
        while c == "[":
            i += 1
            if i >= end:
                raise CodecError("dubbo: bad parameter types")
            c = desc[i]
        if c == "L":
            j = desc.find(";", i)
            if j < 0:
                raise CodecError("dubbo: bad parameter types")
            i = j + 1
        elif c in "ZBCSIJFDV":
            i += 1
        else:
            raise CodecError("dubbo: bad parameter types")
        n += 1
    return n


def _read_attachments(raw: bytes, args_at: int, param_types: str) -> dict[str, str]:
    """The attachments' string entries, after skipping the arguments that start at
    ``args_at``; {} when absent or unreadable."""
    try:
        r = Hessian2Reader(raw, args_at)
        for _ in range(_count_params(param_types)):
            r.skip()
        if r.at_end:
            return {}
        value = r.read()
    except CodecError:
        return {}
    if not isinstance(value, dict):
        return {}
    return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)}


class DubboHeaders(Mapping[str, str]):
    """The body's routing fields at once; the attachments on the first look-up of another
    name (or iteration). Holds the frame's bytes, not the frame: no reference cycle, so a
    frame is freed by its last reference going, without the cyclic GC."""

    __slots__ = ("_args_at", "_attachments", "_fields", "_param_types", "_raw")

    def __init__(self, raw: bytes, args_at: int, param_types: str, fields: dict[str, str]) -> None:
        self._raw = raw
        self._args_at = args_at
        self._param_types = param_types
        self._fields = fields
        self._attachments: dict[str, str] | None = None

    def _all(self) -> dict[str, str]:
        merged = self._attachments
        if merged is None:
            merged = _read_attachments(self._raw, self._args_at, self._param_types)
            merged.update(self._fields)
            self._attachments = merged
        return merged

    def __getitem__(self, key: str) -> str:
        v = self._fields.get(key)
        if v is not None:
            return v
        return self._all()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


_EMPTY: Mapping[str, str] = {}


class DubboFrame:
    __slots__ = (
        "_headers",
        "_timeout",
        "args_at",
        "flag",
        "kind",
        "method",
        "param_types",
        "raw",
        "request_id",
        "service",
        "status",
        "version",
    )

    def __init__(self, kind: FrameKind, flag: int, status: int, request_id: int, raw: bytes) -> None:
        self.kind = kind
        self.flag = flag
        self.status = status
        self.request_id = request_id
        self.raw = raw
        self.service = ""
        self.method = ""
        self.version = ""
        self.param_types = ""
        self.args_at = 0  # offset in raw of the first argument (0: no Hessian2 prefix read)
        self._headers: Mapping[str, str] = _EMPTY
        self._timeout: int | None = None

    @property
    def serialization(self) -> int:
        return self.flag & SERIALIZATION_MASK

    @property
    def body(self) -> memoryview:
        return memoryview(self.raw)[HEAD:]

    @property
    def headers(self) -> Mapping[str, str]:
        return self._headers

    @property
    def timeout_ms(self) -> int:
        t = self._timeout
        if t is None:
            t = 0
            if self.args_at:
                v = self._headers.get("timeout", "")
                if v.isascii() and v.isdigit() and len(v) < 10:
                    t = int(v)
            self._timeout = t
        return t

    @timeout_ms.setter
    def timeout_ms(self, value: int) -> None:
        self._timeout = value

    def _read_prefix(self) -> None:
        r = Hessian2Reader(self.raw, HEAD)
        dubbo = r.read_string()
        self.service = r.read_string()
        self.version = r.read_string()
        self.method = r.read_string()
        self.param_types = r.read_string()
        self.args_at = r.pos
        self._headers = DubboHeaders(
            self.raw,
            self.args_at,
            self.param_types,
            {"service": self.service, "version": self.version, "method": self.method, "dubbo": dubbo},
        )

    def __repr__(self) -> str:
        return f"DubboFrame({self.kind.name}, id={self.request_id}, status={self.status}, service={self.service!r}, method={self.method!r})"


def _head(flag: int, status: int, request_id: int, body: bytes) -> bytes:
    return _HEAD.pack(MAGIC, flag, status, request_id & 0xFFFFFFFFFFFFFFFF, len(body)) + body


class DubboCodec:
    name = "dubbo"
    multiplexed = True
    heartbeat = True
    goaway = False  # the read-only event is recognised (GOAWAY), not sent

    def match(self, data: bytes) -> Match:
        if not data:
            return Match.NEED_MORE
        if data[0] != 0xDA:
            return Match.NO
        if len(data) < 2:
            return Match.NEED_MORE
        return Match.YES if data[1] == 0xBB else Match.NO

    def frame_length(self, buf: bytes | bytearray | memoryview) -> int:
        n = len(buf)
        if (n and buf[0] != 0xDA) or (n > 1 and buf[1] != 0xBB):
            raise CodecError("dubbo: bad magic")
        if n < HEAD:
            return NEED_MORE
        length = int.from_bytes(buf[12:16], "big")
        if length > MAX_FRAME - HEAD:
            raise CodecError(f"dubbo: body of {length} bytes is too large")
        return HEAD + length

    def decode(self, raw: bytes) -> DubboFrame:
        if len(raw) < HEAD:
            raise CodecError("dubbo: frame shorter than its head")
        magic, flag, status, request_id, length = _HEAD.unpack_from(raw)
        if magic != MAGIC:
            raise CodecError("dubbo: bad magic")
        if length != len(raw) - HEAD:
            raise CodecError("dubbo: body length does not match the frame")
        if flag & FLAG_REQUEST:
            if flag & FLAG_EVENT:
                if flag & FLAG_TWO_WAY:
                    kind = FrameKind.HEARTBEAT
                elif len(raw) == HEAD + len(_READONLY) and raw[HEAD:] == _READONLY:
                    kind = FrameKind.GOAWAY
                else:
                    kind = FrameKind.ONEWAY
                return DubboFrame(kind, flag, 0, request_id, raw)
            kind = FrameKind.REQUEST if flag & FLAG_TWO_WAY else FrameKind.ONEWAY
            frame = DubboFrame(kind, flag, 0, request_id, raw)
            if flag & SERIALIZATION_MASK == HESSIAN2:
                frame._read_prefix()
            return frame
        kind = FrameKind.HEARTBEAT_RESPONSE if flag & FLAG_EVENT else FrameKind.RESPONSE
        return DubboFrame(kind, flag, status, request_id, raw)

    def with_request_id(self, frame: Frame, request_id: int) -> bytes:
        raw = frame.raw
        return raw[:4] + _ID.pack(request_id & 0xFFFFFFFFFFFFFFFF) + raw[12:]

    def heartbeat_reply(self, frame: Frame) -> bytes:
        frame = cast(DubboFrame, frame)  # decoded by this codec
        flag = FLAG_EVENT | (frame.flag & SERIALIZATION_MASK or HESSIAN2)
        return _HEAD.pack(MAGIC, flag, OK, frame.request_id, 0)[:12] + _NULL_BODY

    def heartbeat_request(self, request_id: int) -> bytes:
        flag = FLAG_REQUEST | FLAG_TWO_WAY | FLAG_EVENT | HESSIAN2
        return _HEAD.pack(MAGIC, flag, 0, request_id & 0xFFFFFFFFFFFFFFFF, 0)[:12] + _NULL_BODY

    def local_reply(self, request: Frame, reason: Reason, message: str) -> bytes:
        return _head(HESSIAN2, REASON_STATUS[reason], request.request_id, encode_string(message))

    def is_success(self, response: Frame) -> bool:
        return response.status == OK

    def is_retriable(self, response: Frame) -> bool:
        return response.status == SERVER_THREADPOOL_EXHAUSTED


def response(request_id: int, status: int, body: bytes, serialization: int = HESSIAN2) -> bytes:
    """A response frame (tests and the test server build theirs with it)."""
    return _head(serialization, status, request_id, body)


def request(request_id: int, body: bytes, two_way: bool = True, serialization: int = HESSIAN2) -> bytes:
    """A request frame around a body."""
    flag = FLAG_REQUEST | (FLAG_TWO_WAY if two_way else 0) | serialization
    return _head(flag, 0, request_id, body)


CODEC = DubboCodec()
CODECS = (CODEC,)
