"""The x-protocol codec contract: what an RPC protocol codec gives the proxy (sans-IO).

A protocol (SOFARPC Bolt, Dubbo, the worked example in ``example.py``) is one module in this
package that builds an object satisfying :class:`XCodec` and registers it in
:data:`CODECS` through :func:`builtin_codecs`. The proxy (``moorline.proxy.rpc_proxy``) and the
connections and pools under it (``moorline.stream.rpc``) only ever call what is declared here:
adding a protocol means filling the template, never touching the proxy.

The model, after MOSN's x-protocol:

- Bytes become **frames**. Every supported protocol is length-delimited: a fixed-size head says
  how long the frame is. ``XCodec.frame_length(buf)`` looks at the start of ``buf`` and says how
  many bytes the first frame takes (``NEED_MORE`` while the head is incomplete), or raises
  :class:`CodecError` on bytes that cannot be this protocol. ``FrameReader`` (below) does the
  buffering once for every codec: the codec never keeps a buffer of its own.
- ``XCodec.decode(raw)`` turns exactly one frame's bytes into a :class:`Frame`. The frame keeps
  ``raw``: the proxy forwards those bytes untouched unless something must change. What the
  proxy may change without re-encoding is the request id (``XCodec.with_request_id``), patched
  at a fixed offset, so many downstream connections can share an upstream connection.
- Headers (service or interface, method, version, user headers) are a lazily decoded
  ``Mapping[str, str]``: routing reads them, nothing else pays for them. The body stays opaque
  bytes.
- Local replies (no route, no healthy upstream, overflow, timeout, codec error, upstream reset)
  are made by the codec in the protocol's own format from the request frame:
  ``XCodec.local_reply(request, reason, message)``.

Bounds: ``MAX_FRAME`` caps what a codec accepts as one frame (a longer length field is a
``CodecError``), so ``FrameReader`` holds at most one incomplete frame plus one read.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

MAX_FRAME = 16 * 1024 * 1024  # largest frame any codec accepts (its head's length field)
NEED_MORE = -1  # frame_length(): the head is not complete yet


class CodecError(Exception):
    """Bytes that cannot be this protocol (bad magic, impossible lengths, oversize frame).

    ``detail`` goes to the access log (``%RESPONSE_CODE_DETAILS%``) and the connection is then
    answered with a codec-error reply when the request id is known, and closed."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class Match(enum.Enum):
    """What ``XCodec.match(first_bytes)`` says, for protocol sniffing on one port."""

    YES = "yes"
    NEED_MORE = "need_more"
    NO = "no"


class FrameKind(enum.IntEnum):
    REQUEST = 1  # expects a response with the same request id
    ONEWAY = 2  # a request without a response
    RESPONSE = 3
    HEARTBEAT = 4  # a keepalive request: the proxy answers it itself
    HEARTBEAT_RESPONSE = 5
    GOAWAY = 6  # the peer will take no new requests on this connection


class Reason(enum.Enum):
    """Why the proxy answers a request itself; each codec maps it to its own status code."""

    NO_ROUTE = "no_route"
    NO_HEALTHY_UPSTREAM = "no_healthy_upstream"
    OVERFLOW = "overflow"  # circuit breaker
    TIMEOUT = "timeout"
    CODEC_ERROR = "codec_error"
    UPSTREAM_RESET = "upstream_reset"  # connect failure, or the connection died mid-request


@runtime_checkable
class Frame(Protocol):
    """One decoded frame. ``raw`` is the frame's bytes exactly as received (head, headers and
    body); ``body`` is the opaque payload (a view into ``raw`` where the codec can)."""

    kind: FrameKind
    request_id: int
    raw: bytes
    timeout_ms: int  # the request's own timeout (0: none given)
    status: int  # responses: the protocol's status code (0 on requests)

    @property
    def headers(self) -> Mapping[str, str]:
        """Routing attributes and user headers, decoded on first access."""
        ...

    @property
    def service(self) -> str:
        """The routing key: Bolt's ``service`` header (interface:version), Dubbo's path."""
        ...

    @property
    def method(self) -> str: ...

    @property
    def body(self) -> bytes | memoryview: ...


@runtime_checkable
class XCodec(Protocol):
    """One protocol. Stateless: the same object serves every connection (state is in
    ``FrameReader`` and the connection that owns it)."""

    name: str  # as configured: "bolt", "dubbo", "example"
    multiplexed: bool  # request ids: many requests in flight per connection, any order
    heartbeat: bool  # has heartbeat frames (answered locally, sent upstream as keepalives)
    goaway: bool  # can tell a peer to stop sending requests (graceful close)

    def match(self, data: bytes) -> Match:
        """Is ``data`` (the first bytes of a connection) this protocol?"""
        ...

    def frame_length(self, buf: bytes | bytearray | memoryview) -> int:
        """Total bytes of the first frame at the start of ``buf``, or ``NEED_MORE``. Raises
        ``CodecError`` for bytes that cannot start a frame or announce more than ``MAX_FRAME``."""
        ...

    def decode(self, raw: bytes) -> Frame:
        """One whole frame (exactly ``frame_length`` bytes). Raises ``CodecError``."""
        ...

    def with_request_id(self, frame: Frame, request_id: int) -> bytes:
        """``frame.raw`` with its request id replaced (the rest of the bytes untouched)."""
        ...

    def heartbeat_reply(self, frame: Frame) -> bytes:
        """The answer to a ``HEARTBEAT`` frame, with its request id."""
        ...

    def heartbeat_request(self, request_id: int) -> bytes:
        """A keepalive to send upstream on an idle connection (codecs with ``heartbeat``)."""
        ...

    def local_reply(self, request: Frame, reason: Reason, message: str) -> bytes:
        """A response to ``request`` in the protocol's format, with the status ``reason`` maps
        to and ``message`` where the protocol carries one."""
        ...

    def is_success(self, response: Frame) -> bool:
        """A response that carries a successful status."""
        ...

    def is_retriable(self, response: Frame) -> bool:
        """A response whose status says the request was not processed and may go to another
        host (e.g. Bolt's server thread pool busy)."""
        ...


class FrameReader:
    """Splits a byte stream into frames for one connection: ``feed(data)`` returns the whole
    frames' bytes (possibly none); what is left waits for the next feed. At most one
    incomplete frame is held (``MAX_FRAME``, checked by the codec's ``frame_length``).

    Bytes that cannot be a frame raise ``CodecError``, but not at the cost of the whole frames
    before them in the same read: those are returned, the error is kept in ``error`` (the
    caller handles the frames, then the error), and every later ``feed`` raises it."""

    __slots__ = ("buf", "codec", "error")

    def __init__(self, codec: XCodec) -> None:
        self.codec = codec
        self.buf = bytearray()
        self.error: CodecError | None = None

    def feed(self, data: bytes) -> list[bytes]:
        if self.error is not None:
            raise self.error
        out: list[bytes] = []
        try:
            self._split(data, out)
        except CodecError as e:
            if not out:
                raise
            self.error = e
            self.buf.clear()
        return out

    def _split(self, data: bytes, out: list[bytes]) -> None:
        buf = self.buf
        length = self.codec.frame_length
        if not buf:
            # Fast path: frames that arrive whole in one read are sliced without a copy into
            # the buffer.
            view = memoryview(data)
            pos, end = 0, len(data)
            while pos < end:
                n = length(view[pos:])
                if n == NEED_MORE or pos + n > end:
                    break
                if n <= 0:
                    raise CodecError("frame length not positive")
                out.append(data[pos : pos + n])
                pos += n
            if pos < end:
                buf += view[pos:]
            return
        buf += data
        while buf:
            n = length(buf)
            if n == NEED_MORE or n > len(buf):
                break
            if n <= 0:
                raise CodecError("frame length not positive")
            out.append(bytes(buf[:n]))
            del buf[:n]

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held."""
        return len(self.buf)
