"""SOFARPC Bolt, protocol versions 1 (proto byte 0x01) and 2 (0x02), as sofa-bolt speaks them.

One codec, named ``bolt``, reads both: each frame is decoded by its first byte, and every frame
the codec makes for a request (local reply, heartbeat answer) has the request's version.

Heads, big-endian (offsets in bytes)::

    v1 request  (22)  proto type cmdcode:2 ver2 id:4 codec timeout:4 classLen:2 headerLen:2 contentLen:4
    v1 response (20)  proto type cmdcode:2 ver2 id:4 codec status:2  classLen:2 headerLen:2 contentLen:4
    v2 request  (24)  proto ver1 type cmdcode:2 ver2 id:4 codec switch timeout:4 classLen:2 ...
    v2 response (22)  proto ver1 type cmdcode:2 ver2 id:4 codec switch status:2 classLen:2 ...

then the class name, the header block (``[u32 len][key][u32 len][value]`` repeated; a length of
-1 is Java's null, read as the empty string) and the content (opaque: Hessian2 or protobuf). In
v2, when ``ver1`` is 2 and bit 0 of ``switch`` is set, a CRC32 (zlib's) of everything before it
follows the content, as sofa-bolt's ``RpcCommandEncoderV2`` writes it. (sofa-bolt-node appends
the CRC whenever ``switch`` is 1, whatever ``ver1`` says; sofa-bolt, the reference, is followed:
its Java client sets the switch bit on every request and, with ``ver1`` 1, sends no CRC.)

``type`` is 0 response, 1 request, 2 oneway; ``cmdcode`` is 0 heartbeat, 1 request, 2 response,
100 MOSN's goaway. The routing key is the ``service`` header (``interface:version``); SOFARPC's
Java client also sends ``sofa_head_method_name``, the method. sofa-bolt-node sends the method only
inside the Hessian2 body, which this codec does not open: ``method`` is then empty.

Local replies follow MOSN's mapping (no route and no healthy upstream -> 6 no processor,
overflow -> 4 thread pool busy, timeout -> 7, codec error -> 9), except an upstream reset, which
is 0x10 connection closed (MOSN says 6; but 6 is retriable here and a reset request may have
run). Like MOSN, they carry no class, header or content: a SOFARPC client then raises its own
error for the status, so ``message`` is not sent (Bolt has no place for text outside the
serialized content).

Bounds: ``frame_length`` refuses a frame over ``MAX_FRAME``; decoding is linear in the frame and
keeps no state. Header strings are decoded on first access; their lengths are checked by
``decode``, so ``headers`` never raises.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping

from moorline.protocol.xprotocol.api import (
    MAX_FRAME,
    NEED_MORE,
    CodecError,
    Frame,
    FrameKind,
    Match,
    Reason,
)

PROTO_V1 = 0x01
PROTO_V2 = 0x02

TYPE_RESPONSE = 0
TYPE_REQUEST = 1
TYPE_ONEWAY = 2

CMD_HEARTBEAT = 0
CMD_REQUEST = 1
CMD_RESPONSE = 2
CMD_GOAWAY = 100  # MOSN's extension

HESSIAN2 = 1
PROTOBUF = 11

CRC_SWITCH = 0x01  # bit 0 of the v2 switch byte

# Response status codes (sofa-bolt's ResponseStatus).
SUCCESS = 0x00
ERROR = 0x01
SERVER_EXCEPTION = 0x02
UNKNOWN = 0x03
SERVER_THREADPOOL_BUSY = 0x04
ERROR_COMM = 0x05
NO_PROCESSOR = 0x06
TIMEOUT = 0x07
CLIENT_SEND_ERROR = 0x08
CODEC_EXCEPTION = 0x09
CONNECTION_CLOSED = 0x10
SERVER_SERIAL_EXCEPTION = 0x11
SERVER_DESERIAL_EXCEPTION = 0x12

REASON_STATUS: Mapping[Reason, int] = {
    Reason.NO_ROUTE: NO_PROCESSOR,
    Reason.NO_HEALTHY_UPSTREAM: NO_PROCESSOR,
    Reason.OVERFLOW: SERVER_THREADPOOL_BUSY,
    Reason.TIMEOUT: TIMEOUT,
    Reason.CODEC_ERROR: CODEC_EXCEPTION,
    Reason.UPSTREAM_RESET: CONNECTION_CLOSED,
}

# Statuses that say the server did not run the request, so another host may take it.
RETRIABLE = frozenset((SERVER_THREADPOOL_BUSY, NO_PROCESSOR))

V1_REQUEST_HEAD = 22
V1_RESPONSE_HEAD = 20
V2_REQUEST_HEAD = 24
V2_RESPONSE_HEAD = 22

_V1_REQ = struct.Struct(">BBHBIBiHHI")
_V1_RSP = struct.Struct(">BBHBIBHHHI")
_V2_REQ = struct.Struct(">BBBHBIBBiHHI")
_V2_RSP = struct.Struct(">BBBHBIBBHHHI")
_LENS = struct.Struct(">HHI")  # classLen, headerLen, contentLen
_U32 = struct.Struct(">I")
_I32 = struct.Struct(">i")

# (head size, offset of classLen) by (proto, is request); the id is at 5 (v1) or 6 (v2).
_HEADS = {
    (PROTO_V1, True): (V1_REQUEST_HEAD, 14),
    (PROTO_V1, False): (V1_RESPONSE_HEAD, 12),
    (PROTO_V2, True): (V2_REQUEST_HEAD, 16),
    (PROTO_V2, False): (V2_RESPONSE_HEAD, 14),
}
_ID_OFFSET = {PROTO_V1: 5, PROTO_V2: 6}

_REQUEST_KINDS = {
    CMD_HEARTBEAT: FrameKind.HEARTBEAT,
    CMD_REQUEST: FrameKind.REQUEST,
    CMD_GOAWAY: FrameKind.GOAWAY,
}
_RESPONSE_KINDS = {CMD_HEARTBEAT: FrameKind.HEARTBEAT_RESPONSE, CMD_RESPONSE: FrameKind.RESPONSE}


def _has_crc(proto: int, ver1: int, switch: int) -> bool:
    return proto == PROTO_V2 and ver1 == 2 and bool(switch & CRC_SWITCH)


def _head(buf: bytes | bytearray | memoryview) -> tuple[int, int, bool] | None:
    """(proto, command type, is request) of the frame at ``buf``'s start; None while the bytes
    that say so have not arrived. Raises CodecError on impossible bytes."""
    n = len(buf)
    if n < 1:
        return None
    proto = buf[0]
    if proto == PROTO_V1:
        if n < 2:
            return None
        kind = buf[1]
    elif proto == PROTO_V2:
        if n < 3:
            return None
        if buf[1] not in (1, 2):
            raise CodecError(f"bolt: unknown v2 protocol version {buf[1]}")
        kind = buf[2]
    else:
        raise CodecError(f"bolt: unknown protocol code {proto:#04x}")
    if kind not in (TYPE_RESPONSE, TYPE_REQUEST, TYPE_ONEWAY):
        raise CodecError(f"bolt: unknown command type {kind}")
    return proto, kind, kind != TYPE_RESPONSE


class BoltFrame:
    """One Bolt frame; ``raw`` is its bytes exactly as received."""

    __slots__ = (
        "_headers",
        "_hend",
        "_hstart",
        "body_end",
        "body_start",
        "class_start",
        "cmdcode",
        "crc",
        "kind",
        "proto",
        "raw",
        "request_id",
        "serializer",
        "status",
        "switch",
        "timeout_ms",
        "type",
        "ver1",
        "ver2",
    )

    kind: FrameKind
    request_id: int
    raw: bytes
    timeout_ms: int
    status: int

    def __init__(self, raw: bytes) -> None:
        head = _head(raw)
        if head is None:
            raise CodecError("bolt: truncated frame")
        proto, kind, request = head
        size = _HEADS[proto, request][0]
        if len(raw) < size:
            raise CodecError("bolt: truncated frame")
        timeout = status = switch = 0
        ver1 = 1
        if proto == PROTO_V1:
            if request:
                _, _, cmd, ver2, rid, ser, timeout, clen, hlen, blen = _V1_REQ.unpack_from(raw)
            else:
                _, _, cmd, ver2, rid, ser, status, clen, hlen, blen = _V1_RSP.unpack_from(raw)
        elif request:
            _, ver1, _, cmd, ver2, rid, ser, switch, timeout, clen, hlen, blen = _V2_REQ.unpack_from(raw)
        else:
            _, ver1, _, cmd, ver2, rid, ser, switch, status, clen, hlen, blen = _V2_RSP.unpack_from(raw)
        crc = _has_crc(proto, ver1, switch)
        end = size + clen + hlen + blen
        if len(raw) != end + (4 if crc else 0):
            raise CodecError("bolt: frame length does not match its head")
        if crc and _U32.unpack_from(raw, end)[0] != zlib.crc32(memoryview(raw)[:end]):
            raise CodecError("bolt: CRC32 check failed")
        kinds = _REQUEST_KINDS if request else _RESPONSE_KINDS
        fk = kinds.get(cmd)
        if fk is None:
            raise CodecError(f"bolt: unknown command code {cmd} for type {kind}")
        if fk is FrameKind.REQUEST and kind == TYPE_ONEWAY:
            fk = FrameKind.ONEWAY
        hstart = size + clen
        # A request's header block is read now (routing reads it anyway, and a malformed one
        # is the request's codec error); a response's is not needed to forward it, so it is
        # read only if asked for, and a malformed one then reads as no headers.
        self._headers: dict[str, str] | None = (
            _parse_header_block(raw, hstart, hstart + hlen) if request else None
        )
        self.raw = raw
        self.kind = fk
        self.proto = proto
        self.ver1 = ver1
        self.type = kind
        self.cmdcode = cmd
        self.ver2 = ver2
        self.request_id = rid
        self.serializer = ser
        self.switch = switch
        self.crc = crc
        self.timeout_ms = timeout if timeout > 0 else 0
        self.status = status
        self.class_start = size
        self._hstart = hstart
        self._hend = hstart + hlen
        self.body_start = hstart + hlen
        self.body_end = end

    @property
    def class_name(self) -> str:
        return self.raw[self.class_start : self._hstart].decode("utf-8", "replace")

    @property
    def headers(self) -> Mapping[str, str]:
        h = self._headers
        if h is None:
            try:
                h = _parse_header_block(self.raw, self._hstart, self._hend)
            except CodecError:
                h = {}
            self._headers = h
        return h

    @property
    def service(self) -> str:
        h = self.headers
        return h.get("service") or h.get("sofa_head_target_service", "")

    @property
    def method(self) -> str:
        return self.headers.get("sofa_head_method_name", "")

    @property
    def body(self) -> memoryview:
        return memoryview(self.raw)[self.body_start : self.body_end]

    def __repr__(self) -> str:
        return f"BoltFrame(v{self.proto}, {self.kind.name}, id={self.request_id}, status={self.status}, {len(self.raw)}B)"


def _entry_length(raw: bytes, pos: int, end: int) -> int:
    if pos + 4 > end:
        raise CodecError("bolt: header block truncated")
    n = _I32.unpack_from(raw, pos)[0]
    if n == -1:  # Java's null
        return 0
    if n < 0 or pos + 4 + n > end:
        raise CodecError("bolt: bad header length")
    return n


def _parse_header_block(raw: bytes, pos: int, end: int) -> dict[str, str]:
    out: dict[str, str] = {}
    while pos < end:
        n = _entry_length(raw, pos, end)
        key = raw[pos + 4 : pos + 4 + n].decode("utf-8", "replace")
        pos += 4 + n
        n = _entry_length(raw, pos, end)
        out[key] = raw[pos + 4 : pos + 4 + n].decode("utf-8", "replace")
        pos += 4 + n
    return out


def encode_headers(headers: Mapping[str, str]) -> bytes:
    """A header block (SOFARPC's SimpleMapSerializer layout)."""
    parts: list[bytes] = []
    for k, v in headers.items():
        kb, vb = k.encode(), v.encode()
        parts += (_U32.pack(len(kb)), kb, _U32.pack(len(vb)), vb)
    return b"".join(parts)


def encode_request(
    request_id: int,
    *,
    headers: Mapping[str, str] | None = None,
    content: bytes = b"",
    class_name: str = "",
    timeout_ms: int = -1,
    oneway: bool = False,
    cmdcode: int = CMD_REQUEST,
    serializer: int = HESSIAN2,
    proto: int = PROTO_V1,
    ver1: int = 1,
    switch: int = 0,
) -> bytes:
    """A request frame (tests, test peers and heartbeats)."""
    cls = class_name.encode()
    hdr = encode_headers(headers) if headers else b""
    kind = TYPE_ONEWAY if oneway else TYPE_REQUEST
    if proto == PROTO_V1:
        head = _V1_REQ.pack(
            PROTO_V1, kind, cmdcode, 1, request_id, serializer, timeout_ms, len(cls), len(hdr), len(content)
        )
    else:
        head = _V2_REQ.pack(
            PROTO_V2,
            ver1,
            kind,
            cmdcode,
            1,
            request_id,
            serializer,
            switch,
            timeout_ms,
            len(cls),
            len(hdr),
            len(content),
        )
    return _seal(b"".join((head, cls, hdr, content)), proto, ver1, switch)


def encode_response(
    request_id: int,
    status: int = SUCCESS,
    *,
    headers: Mapping[str, str] | None = None,
    content: bytes = b"",
    class_name: str = "",
    cmdcode: int = CMD_RESPONSE,
    serializer: int = HESSIAN2,
    proto: int = PROTO_V1,
    ver1: int = 1,
    switch: int = 0,
) -> bytes:
    """A response frame."""
    cls = class_name.encode()
    hdr = encode_headers(headers) if headers else b""
    if proto == PROTO_V1:
        head = _V1_RSP.pack(
            PROTO_V1,
            TYPE_RESPONSE,
            cmdcode,
            1,
            request_id,
            serializer,
            status,
            len(cls),
            len(hdr),
            len(content),
        )
    else:
        head = _V2_RSP.pack(
            PROTO_V2,
            ver1,
            TYPE_RESPONSE,
            cmdcode,
            1,
            request_id,
            serializer,
            switch,
            status,
            len(cls),
            len(hdr),
            len(content),
        )
    return _seal(b"".join((head, cls, hdr, content)), proto, ver1, switch)


def _seal(frame: bytes, proto: int, ver1: int, switch: int) -> bytes:
    if _has_crc(proto, ver1, switch):
        return frame + _U32.pack(zlib.crc32(frame))
    return frame


class BoltCodec:
    """The ``bolt`` codec: v1 and v2 frames, multiplexed by request id, with heartbeats."""

    name = "bolt"
    multiplexed = True
    heartbeat = True
    goaway = False  # sofa-bolt peers know no goaway (MOSN's cmdcode 100 is decoded, never sent)

    def match(self, data: bytes) -> Match:
        try:
            head = _head(data)
        except CodecError:
            return Match.NO
        if head is None:
            return Match.NEED_MORE
        proto, _, request = head
        at = 1 if proto == PROTO_V1 else 2  # the type byte; cmdcode follows
        if len(data) < at + 3:
            return Match.NEED_MORE
        cmd = (data[at + 1] << 8) | data[at + 2]
        ok = (
            cmd in (CMD_HEARTBEAT, CMD_REQUEST, CMD_GOAWAY)
            if request
            else cmd in (CMD_HEARTBEAT, CMD_RESPONSE)
        )
        return Match.YES if ok else Match.NO

    def frame_length(self, buf: bytes | bytearray | memoryview) -> int:
        head = _head(buf)
        if head is None:
            return NEED_MORE
        proto, _, request = head
        size, lens_at = _HEADS[proto, request]
        if len(buf) < size:
            return NEED_MORE
        clen, hlen, blen = _LENS.unpack_from(buf, lens_at)
        total = size + clen + hlen + blen
        if proto == PROTO_V2 and _has_crc(proto, buf[1], buf[11]):
            total += 4
        if total > MAX_FRAME:
            raise CodecError(f"bolt: frame of {total} bytes exceeds {MAX_FRAME}")
        return total

    def decode(self, raw: bytes) -> BoltFrame:
        return BoltFrame(bytes(raw))

    def with_request_id(self, frame: Frame, request_id: int) -> bytes:
        assert isinstance(frame, BoltFrame)
        if not 0 <= request_id <= 0xFFFFFFFF:
            raise ValueError(f"bolt request ids are 32-bit: {request_id}")
        raw = memoryview(frame.raw)
        at = _ID_OFFSET[frame.proto]
        head = raw[:at].tobytes() + _U32.pack(request_id)
        if not frame.crc:
            return b"".join((head, raw[at + 4 :]))  # one copy of the body, however large
        rest = raw[at + 4 : -4]
        return b"".join((head, rest, _U32.pack(zlib.crc32(rest, zlib.crc32(head)))))

    def heartbeat_reply(self, frame: Frame) -> bytes:
        # As sofa-bolt's HeartbeatAckCommand: success, nothing after the head, the default
        # serializer, the request's protocol version and an empty switch (so no CRC).
        assert isinstance(frame, BoltFrame)
        return encode_response(
            frame.request_id, SUCCESS, cmdcode=CMD_HEARTBEAT, proto=frame.proto, ver1=frame.ver1
        )

    def heartbeat_request(self, request_id: int) -> bytes:
        # v1: every sofa-bolt server registers it beside v2.
        return encode_request(request_id, cmdcode=CMD_HEARTBEAT, timeout_ms=-1)

    def local_reply(self, request: Frame, reason: Reason, message: str) -> bytes:
        assert isinstance(request, BoltFrame)
        return encode_response(
            request.request_id,
            REASON_STATUS[reason],
            serializer=request.serializer,
            proto=request.proto,
            ver1=request.ver1,
            switch=request.switch,  # sofa-bolt answers with the request's switch
        )

    def is_success(self, response: Frame) -> bool:
        return response.status == SUCCESS and response.kind in (
            FrameKind.RESPONSE,
            FrameKind.HEARTBEAT_RESPONSE,
        )

    def is_retriable(self, response: Frame) -> bool:
        return response.kind is FrameKind.RESPONSE and response.status in RETRIABLE


CODECS = (BoltCodec(),)
