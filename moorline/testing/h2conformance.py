"""An HTTP/2 server conformance suite in the manner of h2spec, for h2c prior knowledge.

h2spec (github.com/summerwind/h2spec) is not packaged for PyPI, npm or Debian, so this module
carries our own cases, one per h2spec case (same ids: ``http2/6.5/1``, ``generic/3.1/2``,
``hpack/5.2/3``), written from the requirement each checks in RFC 9113 (HTTP/2) and RFC 7541
(HPACK). h2spec numbers its cases after RFC 7540; ``Case.section`` names the RFC 9113 / 7541
section that holds the requirement today.

Each case opens a real TCP connection, sends raw frames (well-formed ones built with
``hyperframe`` and ``hpack``, malformed ones byte by byte) and waits for the server's reaction.
As in h2spec a case passes on any reaction the RFC allows: a connection error may be a GOAWAY
with one of the listed codes or the connection closing; a stream error may also be an
RST_STREAM with one of the codes. A reaction with a code the RFC does not allow fails.

``CASES`` lists them; ``run_case(case, host, port)`` runs one and returns a ``Result``;
``moorline_config(listener_port, upstream_port)`` is the proxy configuration the suite is run
against (an HTTP/2-only listener in front of ``moorline.testing.upstream.TestUpstream``).
"""

from __future__ import annotations

import select
import socket
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import yaml
from hpack import Decoder, Encoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DEFAULT_TIMEOUT = 3.0

# Error codes (RFC 9113 7).
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
FLOW_CONTROL_ERROR = 0x3
SETTINGS_TIMEOUT = 0x4
STREAM_CLOSED = 0x5
FRAME_SIZE_ERROR = 0x6
REFUSED_STREAM = 0x7
CANCEL = 0x8
COMPRESSION_ERROR = 0x9
ENHANCE_YOUR_CALM = 0xB
CODE_NAMES = {
    0x0: "NO_ERROR",
    0x1: "PROTOCOL_ERROR",
    0x2: "INTERNAL_ERROR",
    0x3: "FLOW_CONTROL_ERROR",
    0x4: "SETTINGS_TIMEOUT",
    0x5: "STREAM_CLOSED",
    0x6: "FRAME_SIZE_ERROR",
    0x7: "REFUSED_STREAM",
    0x8: "CANCEL",
    0x9: "COMPRESSION_ERROR",
    0xA: "CONNECT_ERROR",
    0xB: "ENHANCE_YOUR_CALM",
    0xC: "INADEQUATE_SECURITY",
    0xD: "HTTP_1_1_REQUIRED",
}

# Frame types and flags (RFC 9113 6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    range(10)
)
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

# Settings identifiers.
S_HEADER_TABLE_SIZE = 0x1
S_ENABLE_PUSH = 0x2
S_MAX_CONCURRENT_STREAMS = 0x3
S_INITIAL_WINDOW_SIZE = 0x4
S_MAX_FRAME_SIZE = 0x5


def code_name(code: int) -> str:
    return CODE_NAMES.get(code, f"0x{code:x}")


# -- frames and header blocks, byte by byte ------------------------------------------------


def raw_frame(ftype: int, flags: int, sid: int, payload: bytes = b"", length: int | None = None) -> bytes:
    """A frame with any header at all: ``length`` overrides the payload's true length."""
    n = len(payload) if length is None else length
    return struct.pack(">I", n)[1:] + bytes((ftype, flags)) + struct.pack(">I", sid) + payload


def settings_payload(values: Iterable[tuple[int, int]]) -> bytes:
    return b"".join(struct.pack(">HI", k, v) for k, v in values)


def hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """RFC 7541 5.1 integer with an N-bit prefix; ``first`` holds the pattern bits above it."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def huffman_bits(
    data: bytes, eos: bool = False, pad_with_ones: bool = True, extra_pad_bytes: int = 0
) -> bytes:
    """Huffman-code ``data`` (RFC 7541 5.2, appendix B); the knobs make the invalid forms:
    ``eos`` appends the EOS symbol, ``pad_with_ones=False`` pads with zeros, and
    ``extra_pad_bytes`` adds whole bytes of padding (padding longer than 7 bits)."""
    acc = 0
    nbits = 0
    for b in data:
        acc = (acc << REQUEST_CODES_LENGTH[b]) | REQUEST_CODES[b]
        nbits += REQUEST_CODES_LENGTH[b]
    if eos:
        acc = (acc << REQUEST_CODES_LENGTH[256]) | REQUEST_CODES[256]
        nbits += REQUEST_CODES_LENGTH[256]
    pad = (8 - nbits % 8) % 8
    acc = (acc << pad) | (((1 << pad) - 1) if pad_with_ones else 0)
    nbits += pad
    out = acc.to_bytes(nbits // 8, "big") + b"\xff" * extra_pad_bytes
    return out


def hpack_str(s: bytes, huffman: bool = False) -> bytes:
    if huffman:
        enc = huffman_bits(s)
        return hpack_int(len(enc), 7, 0x80) + enc
    return hpack_int(len(s), 7, 0) + s


def hpack_raw_str(encoded: bytes, huffman: bool = True) -> bytes:
    """A string literal whose (possibly invalid) coded bytes are given as they are."""
    return hpack_int(len(encoded), 7, 0x80 if huffman else 0) + encoded


# Static table indexes (RFC 7541 appendix A).
IDX_AUTHORITY = 1
IDX_METHOD_GET = 2
IDX_PATH_ROOT = 4
IDX_SCHEME_HTTP = 6
IDX_USER_AGENT = 58


def indexed(index: int) -> bytes:
    return hpack_int(index, 7, 0x80)


def literal(name: bytes | int, value: bytes, kind: str = "incremental", huffman: bool = False) -> bytes:
    """A literal header field: ``kind`` is ``incremental`` (6.2.1), ``without`` (6.2.2) or
    ``never`` (6.2.3); ``name`` is a static/dynamic index or a new name."""
    bits, first = {"incremental": (6, 0x40), "without": (4, 0x00), "never": (4, 0x10)}[kind]
    if isinstance(name, int):
        return hpack_int(name, bits, first) + hpack_str(value, huffman)
    return bytes((first,)) + hpack_str(name, huffman) + hpack_str(value, huffman)


def table_size_update(size: int) -> bytes:
    return hpack_int(size, 5, 0x20)


def base_block(authority: bytes = b"127.0.0.1") -> bytes:
    """``GET http://<authority>/`` from the static table only: no dynamic table state."""
    return (
        indexed(IDX_METHOD_GET)
        + indexed(IDX_SCHEME_HTTP)
        + indexed(IDX_PATH_ROOT)
        + literal(IDX_AUTHORITY, authority, "without")
    )


# -- the client side of one connection -----------------------------------------------------


class CaseFailed(Exception):
    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(f"expected {expected}; got {actual}")
        self.expected = expected
        self.actual = actual


CLOSED = "connection closed"
TIMEOUT = "timeout"


def describe(ev: Frame | str) -> str:
    if isinstance(ev, str):
        return ev
    if isinstance(ev, GoAwayFrame):
        return f"GOAWAY(last_stream_id={ev.last_stream_id}, code={code_name(ev.error_code)})"
    if isinstance(ev, RstStreamFrame):
        return f"RST_STREAM(stream={ev.stream_id}, code={code_name(ev.error_code)})"
    if isinstance(ev, HeadersFrame):
        return f"HEADERS(stream={ev.stream_id}, flags={sorted(ev.flags)})"
    if isinstance(ev, DataFrame):
        return f"DATA(stream={ev.stream_id}, length={len(ev.data)}, flags={sorted(ev.flags)})"
    if isinstance(ev, SettingsFrame):
        return f"SETTINGS(flags={sorted(ev.flags)})"
    if isinstance(ev, PingFrame):
        return f"PING(flags={sorted(ev.flags)}, data={ev.opaque_data!r})"
    return f"{type(ev).__name__}(stream={ev.stream_id})"


class Conn:
    """One h2c connection to the server under test, driven frame by frame."""

    def __init__(self, host: str, port: int, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.encoder = Encoder()
        self.decoder = Decoder()
        self.closed = False
        self.server_settings: dict[int, int] = {}
        self.responses: dict[int, list[tuple[bytes, bytes]]] = {}
        self._block: tuple[int, bytearray] | None = None
        self._ping_seq = 0
        # What the server did about errors (GOAWAY, RST_STREAM, closing), in order: a passing
        # case reports the first as its reaction.
        self.reactions: list[str] = []

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    # -- sending ---------------------------------------------------------------------------
    def send(self, *parts: bytes | Frame) -> None:
        data = b"".join(p.serialize() if isinstance(p, Frame) else p for p in parts)
        try:
            self.sock.sendall(data)
        except OSError:
            # The server may close while we still write (it found the error early): what it
            # sent before is still in our receive buffer, and the verifiers read it.
            pass

    def handshake(self, settings: Iterable[tuple[int, int]] = ()) -> None:
        """Preface and our SETTINGS; read up to the server's SETTINGS and acknowledge them."""
        self.send(PREFACE, raw_frame(SETTINGS, 0, 0, settings_payload(settings)))
        deadline = time.monotonic() + self.timeout
        while True:
            ev = self.next_event(deadline)
            if isinstance(ev, SettingsFrame) and "ACK" not in ev.flags:
                self.server_settings.update(ev.settings)
                self.send(raw_frame(SETTINGS, ACK, 0))
                return
            if isinstance(ev, str):
                raise CaseFailed("the server's SETTINGS frame", ev)

    def request(
        self, path: bytes = b"/", method: bytes = b"GET", extra: Iterable[tuple[bytes, bytes]] = ()
    ) -> bytes:
        """A request header block from this connection's HPACK encoder."""
        headers = [
            (b":method", method),
            (b":scheme", b"http"),
            (b":path", path),
            (b":authority", self.host.encode()),
            *extra,
        ]
        return bytes(self.encoder.encode(headers))

    def encode(self, headers: list[tuple[bytes, bytes]]) -> bytes:
        return bytes(self.encoder.encode(headers))

    def headers(
        self,
        sid: int,
        block: bytes | None = None,
        end_stream: bool = True,
        end_headers: bool = True,
        send: bool = True,
    ) -> bytes:
        flags = (END_STREAM if end_stream else 0) | (END_HEADERS if end_headers else 0)
        f = raw_frame(HEADERS, flags, sid, self.request() if block is None else block)
        if send:
            self.send(f)
        return f

    def data(self, sid: int, payload: bytes, end_stream: bool = True) -> None:
        self.send(raw_frame(DATA, END_STREAM if end_stream else 0, sid, payload))

    def ping_payload(self) -> bytes:
        self._ping_seq += 1
        return b"h2c" + struct.pack(">I", self._ping_seq) + b"!"

    # -- receiving ---------------------------------------------------------------------------
    def next_event(self, deadline: float) -> Frame | str:
        """The next frame, or ``CLOSED`` / ``TIMEOUT``. Header blocks are decoded as they
        come, so the decoder's state follows the server's encoder."""
        while True:
            if len(self.buf) >= 9:
                length = int.from_bytes(self.buf[:3], "big")
                if len(self.buf) >= 9 + length:
                    head = memoryview(bytes(self.buf[:9]))
                    body = bytes(self.buf[9 : 9 + length])
                    del self.buf[: 9 + length]
                    frame, _ = Frame.parse_frame_header(head)
                    frame.parse_body(memoryview(body))
                    self._track(frame)
                    if isinstance(frame, (GoAwayFrame, RstStreamFrame)):
                        self.reactions.append(describe(frame))
                    return frame
            if self.closed:
                if not self.reactions or self.reactions[-1] != CLOSED:
                    self.reactions.append(CLOSED)
                return CLOSED
            left = deadline - time.monotonic()
            if left <= 0:
                return TIMEOUT
            r, _, _ = select.select([self.sock], [], [], left)
            if not r:
                return TIMEOUT
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError, TimeoutError, OSError):
                chunk = b""
            if not chunk:
                self.closed = True
            self.buf += chunk

    def _track(self, frame: Frame) -> None:
        if isinstance(frame, HeadersFrame):
            self._block = (frame.stream_id, bytearray(frame.data))
        elif isinstance(frame, ContinuationFrame) and self._block is not None:
            self._block[1].extend(frame.data)
        else:
            return
        if "END_HEADERS" in frame.flags and self._block is not None:
            sid, block = self._block
            self._block = None
            self.responses[sid] = [
                (bytes(k), bytes(v)) for k, v in self.decoder.decode(bytes(block), raw=True)
            ]

    def events(self, timeout: float | None = None) -> Iterable[Frame | str]:
        """Frames until the connection closes or ``timeout`` passes (the last item is
        ``CLOSED`` or ``TIMEOUT``)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            ev = self.next_event(deadline)
            yield ev
            if isinstance(ev, str):
                return

    # -- verifiers (h2spec's rules) ------------------------------------------------------------
    def expect_connection_error(self, *codes: int) -> None:
        """GOAWAY with one of ``codes``, or the connection closed."""
        want = " or ".join(f"GOAWAY {code_name(c)}" for c in codes) + " or connection close"
        seen = TIMEOUT
        for ev in self.events():
            if ev == CLOSED:
                return
            if isinstance(ev, GoAwayFrame):
                if ev.error_code in codes:
                    return
                raise CaseFailed(want, describe(ev))
            if ev == TIMEOUT:
                raise CaseFailed(want, seen)
            if not isinstance(ev, (SettingsFrame, WindowUpdateFrame, PingFrame)):
                seen = describe(ev)

    def expect_stream_error(self, *codes: int, sid: int | None = None) -> None:
        """RST_STREAM (on ``sid`` when given) or GOAWAY with one of ``codes``, or the
        connection closed. A GOAWAY with another code fails at once; an RST_STREAM with
        another code fails only if nothing right follows before the timeout."""
        names = "/".join(code_name(c) for c in codes)
        want = f"RST_STREAM or GOAWAY {names}, or connection close"
        seen = TIMEOUT
        for ev in self.events():
            if ev == CLOSED:
                return
            if isinstance(ev, GoAwayFrame):
                if ev.error_code in codes:
                    return
                raise CaseFailed(want, describe(ev))
            if isinstance(ev, RstStreamFrame) and (sid is None or ev.stream_id == sid):
                if ev.error_code in codes:
                    return
                # Not yet a failure: a server may answer early and reset the unread request
                # (NO_ERROR, RFC 9113 8.1) before it finds the error; as h2spec, keep reading.
                seen = describe(ev)
                continue
            if ev == TIMEOUT:
                raise CaseFailed(want, seen)
            if not isinstance(ev, (SettingsFrame, WindowUpdateFrame, PingFrame)):
                seen = describe(ev)

    def expect_response(self, sid: int, end: bool = True) -> list[tuple[bytes, bytes]]:
        """A final response HEADERS on ``sid`` (and, with ``end``, the end of that stream)."""
        want = f"a response on stream {sid}" + (" ending the stream" if end else "")
        got: list[tuple[bytes, bytes]] | None = None
        for ev in self.events():
            if isinstance(ev, str):
                raise CaseFailed(want, ev if got is None else f"response headers, then {ev}")
            if isinstance(ev, GoAwayFrame):
                raise CaseFailed(want, describe(ev))
            if isinstance(ev, RstStreamFrame) and ev.stream_id == sid:
                raise CaseFailed(want, describe(ev))
            if ev.stream_id != sid or not isinstance(ev, (HeadersFrame, ContinuationFrame, DataFrame)):
                continue
            if got is None and sid in self.responses:
                status = dict(self.responses[sid]).get(b":status", b"")
                if not status.startswith(b"1"):
                    got = self.responses[sid]
            if got is not None and (not end or "END_STREAM" in ev.flags):
                return got
        raise AssertionError("unreachable")

    def expect_data(self, sid: int) -> DataFrame:
        want = f"a DATA frame on stream {sid}"
        for ev in self.events():
            if isinstance(ev, str):
                raise CaseFailed(want, ev)
            if isinstance(ev, (GoAwayFrame, RstStreamFrame)) and ev.stream_id in (0, sid):
                raise CaseFailed(want, describe(ev))
            if isinstance(ev, DataFrame) and ev.stream_id == sid:
                return ev
        raise AssertionError("unreachable")

    def expect_settings_ack(self) -> None:
        for ev in self.events():
            if isinstance(ev, SettingsFrame) and "ACK" in ev.flags:
                return
            if isinstance(ev, (str, GoAwayFrame)):
                raise CaseFailed("SETTINGS with ACK", describe(ev))

    def expect_ping_ack(self, payload: bytes) -> None:
        """The next PING the server sends is the ACK of ``payload``."""
        for ev in self.events():
            if isinstance(ev, PingFrame):
                if "ACK" in ev.flags and ev.opaque_data == payload:
                    return
                raise CaseFailed(f"PING ACK {payload!r}", describe(ev))
            if isinstance(ev, (str, GoAwayFrame)):
                raise CaseFailed(f"PING ACK {payload!r}", describe(ev))

    def expect_alive(self, sid: int | None = None) -> None:
        """The connection still works: a PING is acknowledged with nothing fatal before it
        (no GOAWAY, no close, no RST_STREAM on ``sid``)."""
        payload = self.ping_payload()
        self.send(raw_frame(PING, 0, 0, payload))
        want = "the connection to stay open (PING answered)"
        for ev in self.events():
            if isinstance(ev, PingFrame) and "ACK" in ev.flags and ev.opaque_data == payload:
                return
            if isinstance(ev, (str, GoAwayFrame)):
                raise CaseFailed(want, describe(ev))
            if isinstance(ev, RstStreamFrame) and sid is not None and ev.stream_id == sid:
                raise CaseFailed(want, describe(ev))


# -- the cases -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str  # h2spec's id: <group>/<section>/<n>
    section: str  # where the requirement is today (RFC 9113 or RFC 7541)
    desc: str
    run: Callable[[Conn], None]
    handshake: bool = True

    def __str__(self) -> str:
        return self.id


@dataclass(frozen=True)
class Result:
    case: Case
    passed: bool
    detail: str = ""
    reaction: str = ""  # the server's first GOAWAY / RST_STREAM / close, if any


CASES: list[Case] = []


def case(
    cid: str, section: str, desc: str, handshake: bool = True
) -> Callable[[Callable[[Conn], None]], Callable[[Conn], None]]:
    def add(fn: Callable[[Conn], None]) -> Callable[[Conn], None]:
        CASES.append(Case(cid, section, desc, fn, handshake))
        return fn

    return add


def run_case(c: Case, host: str, port: int, timeout: float = DEFAULT_TIMEOUT) -> Result:
    try:
        conn = Conn(host, port, timeout)
    except OSError as exc:
        return Result(c, False, f"connect failed: {exc}")
    try:
        if c.handshake:
            conn.handshake()
        c.run(conn)
    except CaseFailed as exc:
        return Result(c, False, str(exc), ", ".join(conn.reactions))
    finally:
        conn.close()
    return Result(c, True, "", ", ".join(conn.reactions[:2]))


def run_all(host: str, port: int, timeout: float = DEFAULT_TIMEOUT) -> list[Result]:
    return [run_case(c, host, port, timeout) for c in CASES]


# RFC 9113 3.4: connection preface


@case(
    "http2/3.5/1",
    "RFC 9113 3.4",
    "Sends client connection preface: the server's first frame is SETTINGS",
    False,
)
def _preface_ok(c: Conn) -> None:
    c.send(PREFACE, raw_frame(SETTINGS, 0, 0))
    ev = c.next_event(time.monotonic() + c.timeout)
    if not (isinstance(ev, SettingsFrame) and "ACK" not in ev.flags):
        raise CaseFailed("SETTINGS as the server's first frame", describe(ev))


@case(
    "http2/3.5/2", "RFC 9113 3.4", "Sends invalid connection preface: the server closes the connection", False
)
def _preface_bad(c: Conn) -> None:
    c.send(b"INVALID CONNECTION PREFACE\r\n\r\n")
    c.expect_connection_error(PROTOCOL_ERROR)


# RFC 9113 4.1: frame format


@case("http2/4.1/1", "RFC 9113 4.1", "Sends a frame with unknown type: ignored")
def _unknown_type(c: Conn) -> None:
    c.send(raw_frame(0x16, 0, 0, b"\0" * 8))
    c.expect_alive()


@case("http2/4.1/2", "RFC 9113 4.1", "Sends a frame with undefined flag: ignored")
def _undefined_flag(c: Conn) -> None:
    payload = c.ping_payload()
    c.send(raw_frame(PING, 0x16, 0, payload))
    c.expect_ping_ack(payload)


@case("http2/4.1/3", "RFC 9113 4.1", "Sends a frame with reserved field bit: ignored")
def _reserved_bit(c: Conn) -> None:
    c.send(raw_frame(HEADERS, END_STREAM | END_HEADERS, 1 | 0x80000000, c.request()))
    c.expect_response(1)


# RFC 9113 4.2: frame size


@case("http2/4.2/1", "RFC 9113 4.2", "Sends a DATA frame with 2^14 octets in length: accepted")
def _data_16k(c: Conn) -> None:
    c.headers(1, c.request(method=b"POST"), end_stream=False)
    c.data(1, b"x" * 16384)
    c.expect_response(1)


@case(
    "http2/4.2/2", "RFC 9113 4.2", "Sends a DATA frame larger than SETTINGS_MAX_FRAME_SIZE: FRAME_SIZE_ERROR"
)
def _data_too_big(c: Conn) -> None:
    c.headers(1, c.request(method=b"POST"), end_stream=False)
    c.data(1, b"x" * (c.server_settings.get(S_MAX_FRAME_SIZE, 16384) + 1))
    c.expect_stream_error(FRAME_SIZE_ERROR)


@case(
    "http2/4.2/3",
    "RFC 9113 4.2",
    "Sends a HEADERS frame larger than SETTINGS_MAX_FRAME_SIZE: connection FRAME_SIZE_ERROR",
)
def _headers_too_big(c: Conn) -> None:
    size = c.server_settings.get(S_MAX_FRAME_SIZE, 16384)
    c.headers(1, base_block() + literal(b"x-pad", b"a" * size, "without"))
    c.expect_connection_error(FRAME_SIZE_ERROR)


# RFC 9113 4.3 / RFC 7541: field block decoding


@case("http2/4.3/1", "RFC 9113 4.3", "Sends invalid header block fragment: COMPRESSION_ERROR")
def _bad_block(c: Conn) -> None:
    # A literal with a new name whose length runs past the end of the block.
    c.headers(1, b"\x00\x85" + b"ab")
    c.expect_connection_error(COMPRESSION_ERROR)


@case("http2/4.3/2", "RFC 9113 4.3", "Sends a PRIORITY frame while sending the header blocks: PROTOCOL_ERROR")
def _priority_inside_block(c: Conn) -> None:
    c.headers(1, end_headers=False)
    c.send(raw_frame(PRIORITY, 0, 1, struct.pack(">IB", 0, 15)))
    c.send(raw_frame(CONTINUATION, END_HEADERS, 1, c.encode([(b"x-dummy", b"1")])))
    c.expect_connection_error(PROTOCOL_ERROR)


@case(
    "http2/4.3/3",
    "RFC 9113 4.3",
    "Sends a HEADERS frame to another stream while sending the header blocks: PROTOCOL_ERROR",
)
def _headers_inside_block(c: Conn) -> None:
    c.headers(1, end_headers=False)
    c.headers(3)
    c.expect_connection_error(PROTOCOL_ERROR)


# RFC 9113 5.1: stream states


@case("http2/5.1/1", "RFC 9113 5.1", "idle: Sends a DATA frame: PROTOCOL_ERROR")
def _idle_data(c: Conn) -> None:
    c.data(1, b"test")
    c.expect_stream_error(PROTOCOL_ERROR, STREAM_CLOSED)


@case("http2/5.1/2", "RFC 9113 5.1", "idle: Sends a RST_STREAM frame: connection PROTOCOL_ERROR")
def _idle_rst(c: Conn) -> None:
    c.send(RstStreamFrame(1, error_code=CANCEL))
    c.expect_connection_error(PROTOCOL_ERROR)


@case("http2/5.1/3", "RFC 9113 5.1", "idle: Sends a WINDOW_UPDATE frame: connection PROTOCOL_ERROR")
def _idle_wu(c: Conn) -> None:
    c.send(WindowUpdateFrame(1, window_increment=100))
    c.expect_connection_error(PROTOCOL_ERROR)


@case("http2/5.1/4", "RFC 9113 5.1", "idle: Sends a CONTINUATION frame: connection PROTOCOL_ERROR")
def _idle_continuation(c: Conn) -> None:
    c.send(raw_frame(CONTINUATION, END_HEADERS, 1, c.request()))
    c.expect_connection_error(PROTOCOL_ERROR)


@case("http2/5.1/5", "RFC 9113 5.1", "half closed (remote): Sends a DATA frame: STREAM_CLOSED")
def _hcr_data(c: Conn) -> None:
    c.headers(1)
    c.data(1, b"test")
    c.expect_stream_error(STREAM_CLOSED)


@case("http2/5.1/6", "RFC 9113 5.1", "half closed (remote): Sends a HEADERS frame: STREAM_CLOSED")
def _hcr_headers(c: Conn) -> None:
    c.headers(1)
    c.headers(1)
    c.expect_stream_error(STREAM_CLOSED)


@case(
    "http2/5.1/7",
    "RFC 9113 5.1",
    "half closed (remote): Sends a CONTINUATION frame: STREAM_CLOSED or PROTOCOL_ERROR",
)
def _hcr_continuation(c: Conn) -> None:
    c.headers(1)
    c.send(raw_frame(CONTINUATION, END_HEADERS, 1, c.encode([(b"x-dummy", b"1")])))
    c.expect_stream_error(STREAM_CLOSED, PROTOCOL_ERROR)


@case("http2/5.1/8", "RFC 9113 5.1", "closed: Sends a DATA frame after sending RST_STREAM: STREAM_CLOSED")
def _closed_rst_data(c: Conn) -> None:
    c.headers(1, end_stream=False)
    c.send(RstStreamFrame(1, error_code=CANCEL))
    c.data(1, b"test")
    c.expect_stream_error(STREAM_CLOSED)


@case("http2/5.1/9", "RFC 9113 5.1", "closed: Sends a HEADERS frame after sending RST_STREAM: STREAM_CLOSED")
def _closed_rst_headers(c: Conn) -> None:
    c.headers(1, end_stream=False)
    c.send(RstStreamFrame(1, error_code=CANCEL))
    c.headers(1)
    c.expect_stream_error(STREAM_CLOSED)


@case(
    "http2/5.1/10",
    "RFC 9113 5.1",
    "closed: Sends a CONTINUATION frame after sending RST_STREAM: STREAM_CLOSED or PROTOCOL_ERROR",
)
def _closed_rst_continuation(c: Conn) -> None:
    c.headers(1, end_stream=False)
    c.send(RstStreamFrame(1, error_code=CANCEL))
    c.send(raw_frame(CONTINUATION, END_HEADERS, 1, c.encode([(b"x-dummy", b"1")])))
    c.expect_stream_error(STREAM_CLOSED, PROTOCOL_ERROR)


@case("http2/5.1/11", "RFC 9113 5.1", "closed: Sends a DATA frame: STREAM_CLOSED")
def _closed_data(c: Conn) -> None:
    c.headers(1)
    c.expect_response(1)
    c.data(1, b"test")
    c.expect_stream_error(STREAM_CLOSED)


@case("http2/5.1/12", "RFC 9113 5.1", "closed: Sends a HEADERS frame: connection STREAM_CLOSED")
def _closed_headers(c: Conn) -> None:
    c.headers(1)
    c.expect_response(1)
    c.headers(1)
    c.expect_connection_error(STREAM_CLOSED, PROTOCOL_ERROR)


@case("http2/5.1/13", "RFC 9113 5.1", "closed: Sends a CONTINUATION frame: STREAM_CLOSED or PROTOCOL_ERROR")
def _closed_continuation(c: Conn) -> None:
    c.headers(1)
    c.expect_response(1)
    c.send(raw_frame(CONTINUATION, END_HEADERS, 1, c.encode([(b"x-dummy", b"1")])))
    c.expect_connection_error(STREAM_CLOSED, PROTOCOL_ERROR)


# RFC 9113 5.1.1: stream identifiers


@case("http2/5.1.1/1", "RFC 9113 5.1.1", "Sends even-numbered stream identifier: PROTOCOL_ERROR")
def _even_sid(c: Conn) -> None:
    c.headers(2)
    c.expect_connection_error(PROTOCOL_ERROR)


@case(
    "http2/5.1.1/2", "RFC 9113 5.1.1", "Sends stream identifier smaller than the previous one: PROTOCOL_ERROR"
)
def _smaller_sid(c: Conn) -> None:
    c.headers(5)
    c.headers(3)
    c.expect_connection_error(PROTOCOL_ERROR)


# RFC 9113 5.1.2: stream concurrency


@case(
    "http2/5.1.2/1",
    "RFC 9113 5.1.2",
    "Exceeds SETTINGS_MAX_CONCURRENT_STREAMS: PROTOCOL_ERROR or REFUSED_STREAM",
)
def _concurrency(c: Conn) -> None:
    limit = c.server_settings.get(S_MAX_CONCURRENT_STREAMS)
    if limit is None or limit > 1000:
        raise CaseFailed("a SETTINGS_MAX_CONCURRENT_STREAMS of at most 1000", f"{limit}")
    frames = [
        c.headers(1 + 2 * i, c.request(method=b"POST"), end_stream=False, send=False)
        for i in range(limit + 1)
    ]
    c.send(*frames)
    c.expect_stream_error(PROTOCOL_ERROR, REFUSED_STREAM)


# RFC 9113 5.3.1 (RFC 7540 5.3.1): self dependency


@case("http2/5.3.1/1", "RFC 9113 5.3.1", "Sends HEADERS frame that depends on itself: PROTOCOL_ERROR")
def _headers_self_dep(c: Conn) -> None:
    c.send(
        raw_frame(
            HEADERS, END_STREAM | END_HEADERS | PRIORITY_FLAG, 3, struct.pack(">IB", 3, 15) + c.request()
        )
    )
    c.expect_stream_error(PROTOCOL_ERROR)


@case("http2/5.3.1/2", "RFC 9113 5.3.1", "Sends PRIORITY frame that depends on itself: PROTOCOL_ERROR")
def _priority_self_dep(c: Conn) -> None:
    c.send(raw_frame(PRIORITY, 0, 2, struct.pack(">IB", 2, 15)))
    c.expect_stream_error(PROTOCOL_ERROR)


# RFC 9113 5.4.1: connection error handling


@case("http2/5.4.1/1", "RFC 9113 5.4.1", "Sends an invalid PING frame: the server closes the connection")
def _bad_ping_close(c: Conn) -> None:
    c.send(raw_frame(PING, 0, 0, b"\0" * 6))
    for ev in c.events():
        if ev == CLOSED:
            return
        if ev == TIMEOUT:
            raise CaseFailed("connection close", ev)


@case("http2/5.4.1/2", "RFC 9113 5.4.1", "Sends an invalid PING frame: GOAWAY before the close")
def _bad_ping_goaway(c: Conn) -> None:
    c.send(raw_frame(PING, 0, 0, b"\0" * 6))
    for ev in c.events():
        if isinstance(ev, GoAwayFrame):
            return
        if isinstance(ev, str):
            raise CaseFailed("GOAWAY", ev)


# RFC 9113 5.5: extending HTTP/2


@case("http2/5.5/1", "RFC 9113 5.5", "Sends an unknown extension frame: ignored")
def _extension(c: Conn) -> None:
    c.send(raw_frame(0xFF, 0, 0, b"\0" * 8))
    c.expect_alive()


@case("http2/5.5/2", "RFC 9113 5.5", "Sends an unknown extension frame inside a header block: PROTOCOL_ERROR")
def _extension_inside_block(c: Conn) -> None:
    c.headers(1, end_headers=False)
    c.send(raw_frame(0xFF, 0, 1, b"\0" * 8))
    c.send(raw_frame(CONTINUATION, END_HEADERS, 1, c.encode([(b"x-dummy", b"1")])))
    c.expect_connection_error(PROTOCOL_ERROR)


# RFC 9113 6.1: DATA


@case("http2/6.1/1", "RFC 9113 6.1", "Sends a DATA frame with 0x0 stream identifier: PROTOCOL_ERROR")
def _data_sid0(c: Conn) -> None:
    c.data(0, b"test")
    c.expect_connection_error(PROTOCOL_ERROR)


@case(
    "http2/6.1/2",
    "RFC 9113 6.1",
    "Sends a DATA frame on a stream not open or half-closed (local): STREAM_CLOSED",
)
def _data_not_open(c: Conn) -> None:
    c.headers(1)
    c.data(1, b"test")
    c.expect_stream_error(STREAM_CLOSED)


@case("http2/6.1/3", "RFC 9113 6.1", "Sends a DATA frame with invalid pad length: PROTOCOL_ERROR")
def _data_bad_pad(c: Conn) -> None:
    c.headers(1, c.request(method=b"POST"), end_stream=False)
    c.send(raw_frame(DATA, END_STREAM | PADDED, 1, b"\x06test"))
    c.expect_connection_error(PROTOCOL_ERROR)


# RFC 9113 6.2: HEADERS


@case(
    "http2/6.2/1",
    "RFC 9113 6.2",
    "Sends a HEADERS frame without END_HEADERS, then a PRIORITY frame: PROTOCOL_ERROR",
)
def _headers_then_priority(c: Conn) -> None:
    c.headers(1, end_headers=False)
    c.send(raw_frame(PRIORITY, 0, 1, struct.pack(">IB", 0, 15)))
    c.expect_connection_error(PROTOCOL_ERROR)


@case(
    "http2/6.2/2",
    "RFC 9113 6.2",
    "Sends a HEADERS frame to another stream while sending a HEADERS frame: PROTOCOL_ERROR",
)
def _headers_other_stream(c: Conn) -> None:
    c.headers(1, end_headers=False)
    c.headers(3)
    c.expect_connection_error(PROTOCOL_ERROR)


@case("http2/6.2/3", "RFC 9113 6.2", "Sends a HEADERS frame with 0x0 stream identifier: PROTOCOL_ERROR")
def _headers_sid0(c: Conn) -> None:
    c.headers(0)
    c.expect_connection_error(PROTOCOL_ERROR)


@case("http2/6.2/4", "RFC 9113 6.2", "Sends a HEADERS frame with invalid pad length: PROTOCOL_ERROR")
def _headers_bad_pad(c: Conn) -> None:
    block = c.request()
    c.send(raw_frame(HEADERS, END_STREAM | END_HEADERS | PADDED, 1, bytes((len(block) + 1,)) + block))
    c.expect_connection_error(PROTOCOL_ERROR)


# RFC 9113 6.3: PRIORITY


@case("http2/6.3/1", "RFC 9113 6.3", "Sends a PRIORITY frame with 0x0 stream identifier: PROTOCOL_ERROR")
def _priority_sid0(c: Conn) -> None:
    c.send(raw_frame(PRIORITY, 0, 0, struct.pack(">IB", 1, 15)))
    c.expect_connection_error(PROTOCOL_ERROR)


@case(
    "http2/6.3/2",
    "RFC 9113 6.3",
    "Sends a PRIORITY frame with a length other than 5 octets: FRAME_SIZE_ERROR",
)
def _priority_bad_len(c: Conn) -> None:
    c.headers(1, c.request(method=b"POST"), end_stream=False)
    c.send(raw_frame(PRIORITY, 0, 1, struct.pack(">IB", 0, 15) + b"\0"))
    c.expect_stream_error(FRAME_SIZE_ERROR)


# RFC 9113 6.4: RST_STREAM


@case("http2/6.4/1", "RFC 9113 6.4", "Sends a RST_STREAM frame with 0x0 stream identifier: PROTOCOL_ERROR")
def _rst_sid0(c: Conn) -> None:
    c.send(raw_frame(RST_STREAM, 0, 0, struct.pack(">I", CANCEL)))
    c.expect_connection_error(PROTOCOL_ERROR)


@case("http2/6.4/2", "RFC 9113 6.4", "Sends a RST_STREAM frame on an idle stream: PROTOCOL_ERROR")
def _rst_idle(c: Conn) -> None:
    c.send(raw_frame(RST_STREAM, 0, 1, struct.pack(">I", CANCEL)))
    c.expect_connection_error(PROTOCOL_ERROR)


@case(
    "http2/6.4/3",
    "RFC 9113 6.4",
    "Sends a RST_STREAM frame with a length other than 4 octets: FRAME_SIZE_ERROR",
)
def _rst_bad_len(c: Conn) -> None:
    c.headers(1, c.request(method=b"POST"), end_stream=False)
    c.send(raw_frame(RST_STREAM, 0, 1, struct.pack(">I", CANCEL)[:3]))
    c.expect_connection_error(FRAME_SIZE_ERROR)


# RFC 9113 6.5: SETTINGS


@case("http2/6.5/1", "RFC 9113 6.5", "Sends a SETTINGS frame with ACK flag and payload: FRAME_SIZE_ERROR")
def _settings_ack_payload(c: Conn) -> None:
    c.send(raw_frame(SETTINGS, ACK, 0, settings_payload([(S_ENABLE_PUSH, 0)])))
    c.expect_connection_error(FRAME_SIZE_ERROR)


@case(
    "http2/6.5/2",
    "RFC 9113 6.5",
    "Sends a SETTINGS frame with a stream identifier other than 0x0: PROTOCOL_ERROR",
)
def _settings_sid(c: Conn) -> None:
    c.send(raw_frame(SETTINGS, 0, 1, settings_payload([(S_ENABLE_PUSH, 0)])))
    c.expect_connection_error(PROTOCOL_ERROR)


@case(
    "http2/6.5/3",
    "RFC 9113 6.5",
    "Sends a SETTINGS frame with a length other than a multiple of 6: FRAME_SIZE_ERROR",
)
def _settings_len(c: Conn) -> None:
    c.send(raw_frame(SETTINGS, 0, 0, settings_payload([(S_ENABLE_PUSH, 0)])[:3]))
    c.expect_connection_error(FRAME_SIZE_ERROR)


# RFC 9113 6.5.2: defined settings


@case("http2/6.5.2/1", "RFC 9113 6.5.2", "SETTINGS_ENABLE_PUSH other than 0 or 1: PROTOCOL_ERROR")
def _settings_push(c: Conn) -> None:
    c.send(raw_frame(SETTINGS, 0, 0, settings_payload([(S_ENABLE_PUSH, 2)])))
    c.expect_connection_error(PROTOCOL_ERROR)


@case("http2/6.5.2/2", "RFC 9113 6.5.2", "SETTINGS_INITIAL_WINDOW_SIZE above 2^31-1: FLOW_CONTROL_ERROR")
def _settings_window(c: Conn) -> None:
    c.send(raw_frame(SETTINGS, 0, 0, settings_payload([(S_INITIAL_WINDOW_SIZE, 2**31)])))
    c.expect_connection_error(FLOW_CONTROL_ERROR)


@case("http2/6.5.2/3", "RFC 9113 6.5.2", "SETTINGS_MAX_FRAME_SIZE below the initial value: PROTOCOL_ERROR")
def _settings_mfs_low(c: Conn) -> None:
    c.send(raw_frame(SETTINGS, 0, 0, settings_payload([(S_MAX_FRAME_SIZE, 16383)])))
    c.expect_connection_error(PROTOCOL_ERROR)


@case("http2/6.5.2/4", "RFC 9113 6.5.2", "SETTINGS_MAX_FRAME_SIZE above 2^24-1: PROTOCOL_ERROR")
def _settings_mfs_high(c: Conn) -> None:
    c.send(raw_frame(SETTINGS, 0, 0, settings_payload([(S_MAX_FRAME_SIZE, 2**24)])))
    c.expect_connection_error(PROTOCOL_ERROR)


@case("http2/6.5.2/5", "RFC 9113 6.5.2", "Sends a SETTINGS frame with unknown identifier: ignored")
def _settings_unknown(c: Conn) -> None:
    c.send(raw_frame(SETTINGS, 0, 0, settings_payload([(0xFF, 1)])))
    c.expect_settings_ack()
    c.expect_alive()


# RFC 9113 6.5.3: settings synchronization


@case(
    "http2/6.5.3/1",
    "RFC 9113 6.5.3",
    "Sends multiple values of SETTINGS_INITIAL_WINDOW_SIZE: the last one applies",
)
def _settings_order(c: Conn) -> None:
    c.send(
        raw_frame(
            SETTINGS, 0, 0, settings_payload([(S_INITIAL_WINDOW_SIZE, 100), (S_INITIAL_WINDOW_SIZE, 1)])
        )
    )
    c.expect_settings_ack()
    c.headers(1, c.request(b"/bytes/100"))
    f = c.expect_data(1)
    if len(f.data) != 1:
        raise CaseFailed("a DATA frame of 1 byte (window 1)", describe(f))


@case("http2/6.5.3/2", "RFC 9113 6.5.3", "Sends a SETTINGS frame without ACK flag: SETTINGS ACK")
def _settings_acked(c: Conn) -> None:
    c.send(raw_frame(SETTINGS, 0, 0, settings_payload([(S_ENABLE_PUSH, 0)])))
    c.expect_settings_ack()


# RFC 9113 6.7: PING


@case("http2/6.7/1", "RFC 9113 6.7", "Sends a PING frame: PING ACK with the same payload")
def _ping(c: Conn) -> None:
    payload = c.ping_payload()
    c.send(PingFrame(0, opaque_data=payload))
    c.expect_ping_ack(payload)


@case("http2/6.7/2", "RFC 9113 6.7", "Sends a PING frame with ACK: not answered")
def _ping_ack_not_answered(c: Conn) -> None:
    c.send(raw_frame(PING, ACK, 0, b"unsolic!"))
    payload = c.ping_payload()
    c.send(raw_frame(PING, 0, 0, payload))
    c.expect_ping_ack(payload)


@case(
    "http2/6.7/3",
    "RFC 9113 6.7",
    "Sends a PING frame with a stream identifier other than 0x0: PROTOCOL_ERROR",
)
def _ping_sid(c: Conn) -> None:
    c.send(raw_frame(PING, 0, 1, b"\0" * 8))
    c.expect_connection_error(PROTOCOL_ERROR)


@case("http2/6.7/4", "RFC 9113 6.7", "Sends a PING frame with a length other than 8: FRAME_SIZE_ERROR")
def _ping_len(c: Conn) -> None:
    c.send(raw_frame(PING, 0, 0, b"\0" * 6))
    c.expect_connection_error(FRAME_SIZE_ERROR)


# RFC 9113 6.8: GOAWAY


@case(
    "http2/6.8/1",
    "RFC 9113 6.8",
    "Sends a GOAWAY frame with a stream identifier other than 0x0: PROTOCOL_ERROR",
)
def _goaway_sid(c: Conn) -> None:
    c.send(raw_frame(GOAWAY, 0, 1, struct.pack(">II", 0, NO_ERROR)))
    c.expect_connection_error(PROTOCOL_ERROR)


# RFC 9113 6.9: WINDOW_UPDATE


@case("http2/6.9/1", "RFC 9113 6.9", "Sends a WINDOW_UPDATE frame with an increment of 0: PROTOCOL_ERROR")
def _wu_zero(c: Conn) -> None:
    c.send(raw_frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 0)))
    c.expect_connection_error(PROTOCOL_ERROR)


@case(
    "http2/6.9/2",
    "RFC 9113 6.9",
    "Sends a WINDOW_UPDATE frame with an increment of 0 on a stream: PROTOCOL_ERROR",
)
def _wu_zero_stream(c: Conn) -> None:
    c.headers(1, c.request(method=b"POST"), end_stream=False)
    c.send(raw_frame(WINDOW_UPDATE, 0, 1, struct.pack(">I", 0)))
    c.expect_stream_error(PROTOCOL_ERROR)


@case(
    "http2/6.9/3",
    "RFC 9113 6.9",
    "Sends a WINDOW_UPDATE frame with a length other than 4 octets: FRAME_SIZE_ERROR",
)
def _wu_len(c: Conn) -> None:
    c.send(raw_frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 1)[:3]))
    c.expect_connection_error(FRAME_SIZE_ERROR)


# RFC 9113 6.9.1: the flow-control window


@case(
    "http2/6.9.1/1",
    "RFC 9113 6.9.1",
    "Sets the initial window size to 1 and sends HEADERS: a DATA frame of 1 byte",
)
def _window_one(c: Conn) -> None:
    c.send(raw_frame(SETTINGS, 0, 0, settings_payload([(S_INITIAL_WINDOW_SIZE, 1)])))
    c.expect_settings_ack()
    c.headers(1, c.request(b"/bytes/100"))
    f = c.expect_data(1)
    if len(f.data) != 1:
        raise CaseFailed("a DATA frame of 1 byte", describe(f))


@case(
    "http2/6.9.1/2",
    "RFC 9113 6.9.1",
    "WINDOW_UPDATEs take the connection window above 2^31-1: GOAWAY FLOW_CONTROL_ERROR",
)
def _window_overflow(c: Conn) -> None:
    c.send(WindowUpdateFrame(0, window_increment=2**31 - 1), WindowUpdateFrame(0, window_increment=2**31 - 1))
    for ev in c.events():
        if isinstance(ev, GoAwayFrame):
            if ev.error_code == FLOW_CONTROL_ERROR:
                return
            raise CaseFailed("GOAWAY FLOW_CONTROL_ERROR", describe(ev))
        if isinstance(ev, str):
            raise CaseFailed("GOAWAY FLOW_CONTROL_ERROR", ev)


@case(
    "http2/6.9.1/3",
    "RFC 9113 6.9.1",
    "WINDOW_UPDATEs take a stream window above 2^31-1: RST_STREAM FLOW_CONTROL_ERROR",
)
def _window_overflow_stream(c: Conn) -> None:
    c.headers(1, c.request(method=b"POST"), end_stream=False)
    c.send(WindowUpdateFrame(1, window_increment=2**31 - 1), WindowUpdateFrame(1, window_increment=2**31 - 1))
    for ev in c.events():
        if isinstance(ev, RstStreamFrame) and ev.stream_id == 1:
            if ev.error_code == FLOW_CONTROL_ERROR:
                return
            raise CaseFailed("RST_STREAM FLOW_CONTROL_ERROR", describe(ev))
        if isinstance(ev, (str, GoAwayFrame)):
            raise CaseFailed("RST_STREAM FLOW_CONTROL_ERROR", describe(ev))


# RFC 9113 6.9.2: initial window size


@case(
    "http2/6.9.2/1",
    "RFC 9113 6.9.2",
    "Changes SETTINGS_INITIAL_WINDOW_SIZE after HEADERS: the open stream's window follows",
)
def _window_change(c: Conn) -> None:
    c.send(raw_frame(SETTINGS, 0, 0, settings_payload([(S_INITIAL_WINDOW_SIZE, 0)])))
    c.expect_settings_ack()
    c.headers(1, c.request(b"/bytes/100"))
    c.send(raw_frame(SETTINGS, 0, 0, settings_payload([(S_INITIAL_WINDOW_SIZE, 1)])))
    f = c.expect_data(1)
    if len(f.data) != 1:
        raise CaseFailed("a DATA frame of 1 byte", describe(f))


@case(
    "http2/6.9.2/2",
    "RFC 9113 6.9.2",
    "Sends a SETTINGS frame that makes the window negative: the server tracks it",
)
def _window_negative(c: Conn) -> None:
    c.send(raw_frame(SETTINGS, 0, 0, settings_payload([(S_INITIAL_WINDOW_SIZE, 3)])))
    c.expect_settings_ack()
    c.headers(1, c.request(b"/bytes/100"))
    c.expect_data(1)
    c.send(raw_frame(SETTINGS, 0, 0, settings_payload([(S_INITIAL_WINDOW_SIZE, 2)])))
    c.expect_settings_ack()
    c.send(WindowUpdateFrame(1, window_increment=2))
    f = c.expect_data(1)
    if len(f.data) != 1:
        raise CaseFailed("a DATA frame of 1 byte (window -1 + 2)", describe(f))


@case("http2/6.9.2/3", "RFC 9113 6.9.2", "SETTINGS_INITIAL_WINDOW_SIZE above the maximum: FLOW_CONTROL_ERROR")
def _window_setting_max(c: Conn) -> None:
    c.send(raw_frame(SETTINGS, 0, 0, settings_payload([(S_INITIAL_WINDOW_SIZE, 2**31)])))
    c.expect_connection_error(FLOW_CONTROL_ERROR)


# RFC 9113 6.10: CONTINUATION


@case("http2/6.10/1", "RFC 9113 6.10", "Sends multiple CONTINUATION frames after a HEADERS frame: accepted")
def _continuations(c: Conn) -> None:
    block = c.request(extra=[(b"x-a", b"1" * 100), (b"x-b", b"2" * 100)])
    third = len(block) // 3
    c.headers(1, block[:third], end_headers=False)
    c.send(raw_frame(CONTINUATION, 0, 1, block[third : 2 * third]))
    c.send(raw_frame(CONTINUATION, END_HEADERS, 1, block[2 * third :]))
    c.expect_response(1)


@case(
    "http2/6.10/2",
    "RFC 9113 6.10",
    "Sends a CONTINUATION frame followed by a non-CONTINUATION frame: PROTOCOL_ERROR",
)
def _continuation_then_data(c: Conn) -> None:
    block = c.request()
    c.headers(1, block[:2], end_headers=False)
    c.send(raw_frame(CONTINUATION, 0, 1, block[2:]))
    c.data(1, b"test")
    c.expect_connection_error(PROTOCOL_ERROR)


@case(
    "http2/6.10/3", "RFC 9113 6.10", "Sends a CONTINUATION frame with 0x0 stream identifier: PROTOCOL_ERROR"
)
def _continuation_sid0(c: Conn) -> None:
    block = c.request()
    c.headers(1, block[:2], end_headers=False)
    c.send(raw_frame(CONTINUATION, END_HEADERS, 0, block[2:]))
    c.expect_connection_error(PROTOCOL_ERROR)


@case(
    "http2/6.10/4",
    "RFC 9113 6.10",
    "Sends a CONTINUATION frame after HEADERS with END_HEADERS: PROTOCOL_ERROR",
)
def _continuation_after_end(c: Conn) -> None:
    c.headers(1, end_stream=False)
    c.send(raw_frame(CONTINUATION, END_HEADERS, 1, c.encode([(b"x-dummy", b"1")])))
    c.expect_connection_error(PROTOCOL_ERROR)


@case(
    "http2/6.10/5",
    "RFC 9113 6.10",
    "Sends a CONTINUATION frame after a CONTINUATION with END_HEADERS: PROTOCOL_ERROR",
)
def _continuation_after_continuation(c: Conn) -> None:
    block = c.request()
    c.headers(1, block[:2], end_stream=False, end_headers=False)
    c.send(raw_frame(CONTINUATION, END_HEADERS, 1, block[2:]))
    c.send(raw_frame(CONTINUATION, END_HEADERS, 1, c.encode([(b"x-dummy", b"1")])))
    c.expect_connection_error(PROTOCOL_ERROR)


@case("http2/6.10/6", "RFC 9113 6.10", "Sends a CONTINUATION frame after a DATA frame: PROTOCOL_ERROR")
def _continuation_after_data(c: Conn) -> None:
    c.headers(1, c.request(method=b"POST"), end_stream=False)
    c.data(1, b"test", end_stream=False)
    c.send(raw_frame(CONTINUATION, END_HEADERS, 1, c.encode([(b"x-dummy", b"1")])))
    c.expect_connection_error(PROTOCOL_ERROR)


# RFC 9113 7: error codes


@case("http2/7/1", "RFC 9113 7", "Sends a GOAWAY frame with unknown error code: no special behaviour")
def _goaway_unknown(c: Conn) -> None:
    # With a stream open, so that the connection has a reason to stay: an idle one may close
    # once the client said it leaves (nghttp2 and Envoy do).
    c.headers(1, c.request(method=b"POST"), end_stream=False)
    c.send(raw_frame(GOAWAY, 0, 0, struct.pack(">II", 0, 0xFF)))
    c.expect_alive(1)


@case("http2/7/2", "RFC 9113 7", "Sends a RST_STREAM frame with unknown error code: no special behaviour")
def _rst_unknown(c: Conn) -> None:
    c.headers(1, c.request(method=b"POST"), end_stream=False)
    c.send(raw_frame(RST_STREAM, 0, 1, struct.pack(">I", 0xFF)))
    c.expect_alive()


# RFC 9113 8.3: pseudo-header fields


def _malformed(headers: list[tuple[bytes, bytes]]) -> Callable[[Conn], None]:
    def run(c: Conn) -> None:
        c.headers(1, c.encode(headers))
        c.expect_stream_error(PROTOCOL_ERROR)

    return run


def _req(**override: bytes | None) -> list[tuple[bytes, bytes]]:
    base: list[tuple[bytes, bytes | None]] = [
        (b":method", override.get("method", b"GET")),
        (b":scheme", override.get("scheme", b"http")),
        (b":path", override.get("path", b"/")),
        (b":authority", b"127.0.0.1"),
    ]
    return [(k, v) for k, v in base if v is not None]


for _cid, _desc, _hdrs in (
    ("http2/8.1.2.1/1", "a unknown pseudo-header field", [*_req(), (b":test", b"ok")]),
    ("http2/8.1.2.1/2", "the pseudo-header field defined for response", [*_req(), (b":status", b"200")]),
    (
        "http2/8.1.2.1/4",
        "a pseudo-header after a regular header field",
        [*_req()[:3], (b"x-test", b"ok"), _req()[3]],
    ),
    ("http2/8.1.2/1", "an upper-case header field name", [*_req(), (b"X-Test", b"ok")]),
    ("http2/8.1.2.2/1", "a connection-specific header field", [*_req(), (b"connection", b"keep-alive")]),
    ("http2/8.1.2.2/2", "TE with a value other than trailers", [*_req(), (b"te", b"trailers, deflate")]),
    ("http2/8.1.2.3/1", "an empty :path", _req(path=b"")),
    ("http2/8.1.2.3/2", "no :method", _req(method=None)),
    ("http2/8.1.2.3/3", "no :scheme", _req(scheme=None)),
    ("http2/8.1.2.3/4", "no :path", _req(path=None)),
    ("http2/8.1.2.3/5", "a duplicated :method", [(b":method", b"GET"), *_req()]),
    ("http2/8.1.2.3/6", "a duplicated :scheme", [(b":scheme", b"http"), *_req()]),
    ("http2/8.1.2.3/7", "a duplicated :path", [(b":path", b"/"), *_req()]),
):
    _sec = {
        "8.1.2.1": "RFC 9113 8.3",
        "8.1.2": "RFC 9113 8.2.1",
        "8.1.2.2": "RFC 9113 8.2.2",
        "8.1.2.3": "RFC 9113 8.3.1",
    }[_cid.split("/")[1]]
    CASES.append(Case(_cid, _sec, f"Sends a HEADERS frame with {_desc}: PROTOCOL_ERROR", _malformed(_hdrs)))


@case("http2/8.1.2.1/3", "RFC 9113 8.1", "Sends a pseudo-header field as trailers: PROTOCOL_ERROR")
def _pseudo_trailers(c: Conn) -> None:
    c.headers(1, c.request(method=b"POST"), end_stream=False)
    c.data(1, b"test", end_stream=False)
    c.headers(1, c.encode([(b":method", b"GET"), (b"x-trailer", b"1")]))
    c.expect_stream_error(PROTOCOL_ERROR)


# RFC 9113 8.1.1: malformed messages


@case(
    "http2/8.1.2.6/1", "RFC 9113 8.1.1", "content-length differs from the DATA payload length: PROTOCOL_ERROR"
)
def _content_length(c: Conn) -> None:
    c.headers(1, c.request(method=b"POST", extra=[(b"content-length", b"1")]), end_stream=False)
    c.data(1, b"test")
    c.expect_stream_error(PROTOCOL_ERROR)


@case(
    "http2/8.1.2.6/2",
    "RFC 9113 8.1.1",
    "content-length differs from the sum of DATA payload lengths: PROTOCOL_ERROR",
)
def _content_length_multi(c: Conn) -> None:
    # One write: a server may answer once it has the 8 announced bytes and reset the stream
    # (NO_ERROR) before the surplus arrives, which then only meets a closed stream.
    c.send(
        c.headers(
            1, c.request(method=b"POST", extra=[(b"content-length", b"8")]), end_stream=False, send=False
        ),
        raw_frame(DATA, 0, 1, b"test"),
        raw_frame(DATA, 0, 1, b"test"),
        raw_frame(DATA, END_STREAM, 1, b"test"),
    )
    c.expect_stream_error(PROTOCOL_ERROR)


# RFC 9113 8.1: request/response exchange


@case("http2/8.1/1", "RFC 9113 8.1", "Sends a second HEADERS frame without END_STREAM: PROTOCOL_ERROR")
def _second_headers(c: Conn) -> None:
    c.headers(1, c.request(method=b"POST"), end_stream=False)
    c.headers(1, c.encode([(b"x-trailer", b"1")]), end_stream=False)
    c.expect_stream_error(PROTOCOL_ERROR)


# RFC 9113 8.4: server push


@case("http2/8.2/1", "RFC 9113 8.4", "Sends a PUSH_PROMISE frame: PROTOCOL_ERROR")
def _push_promise(c: Conn) -> None:
    c.headers(1, c.request(method=b"POST"), end_stream=False)
    c.send(raw_frame(PUSH_PROMISE, END_HEADERS, 1, struct.pack(">I", 2) + c.request()))
    c.expect_connection_error(PROTOCOL_ERROR)


# RFC 7541: HPACK decoding errors


@case(
    "hpack/2.3.3/1",
    "RFC 7541 2.3.3",
    "Indexed header field with an index past both tables: COMPRESSION_ERROR",
)
def _hpack_bad_index(c: Conn) -> None:
    c.headers(1, base_block() + indexed(70))
    c.expect_connection_error(COMPRESSION_ERROR)


@case(
    "hpack/2.3.3/2",
    "RFC 7541 2.3.3",
    "Literal header field with a name index past both tables: COMPRESSION_ERROR",
)
def _hpack_bad_name_index(c: Conn) -> None:
    c.headers(1, base_block() + literal(70, b"test"))
    c.expect_connection_error(COMPRESSION_ERROR)


@case(
    "hpack/4.2/1", "RFC 7541 4.2", "Dynamic table size update at the end of a header block: COMPRESSION_ERROR"
)
def _hpack_late_size_update(c: Conn) -> None:
    c.headers(1, base_block() + table_size_update(0))
    c.expect_connection_error(COMPRESSION_ERROR)


@case("hpack/5.2/1", "RFC 7541 5.2", "Huffman string with padding longer than 7 bits: COMPRESSION_ERROR")
def _hpack_long_padding(c: Conn) -> None:
    c.headers(
        1,
        base_block()
        + literal(b"x-test", b"", "without")[:-1]
        + hpack_raw_str(huffman_bits(b"test", extra_pad_bytes=1)),
    )
    c.expect_connection_error(COMPRESSION_ERROR)


@case("hpack/5.2/2", "RFC 7541 5.2", "Huffman string padded with zeros: COMPRESSION_ERROR")
def _hpack_zero_padding(c: Conn) -> None:
    c.headers(
        1,
        base_block()
        + literal(b"x-test", b"", "without")[:-1]
        + hpack_raw_str(huffman_bits(b"test", pad_with_ones=False)),
    )
    c.expect_connection_error(COMPRESSION_ERROR)


@case("hpack/5.2/3", "RFC 7541 5.2", "Huffman string containing the EOS symbol: COMPRESSION_ERROR")
def _hpack_eos(c: Conn) -> None:
    c.headers(
        1,
        base_block()
        + literal(b"x-test", b"", "without")[:-1]
        + hpack_raw_str(huffman_bits(b"test", eos=True)),
    )
    c.expect_connection_error(COMPRESSION_ERROR)


@case("hpack/6.1/1", "RFC 7541 6.1", "Indexed header field with index 0: COMPRESSION_ERROR")
def _hpack_index_zero(c: Conn) -> None:
    c.headers(1, base_block() + indexed(0))
    c.expect_connection_error(COMPRESSION_ERROR)


@case(
    "hpack/6.3/1",
    "RFC 7541 6.3",
    "Dynamic table size update above SETTINGS_HEADER_TABLE_SIZE: COMPRESSION_ERROR",
)
def _hpack_size_update_too_big(c: Conn) -> None:
    limit = c.server_settings.get(S_HEADER_TABLE_SIZE, 4096)
    c.headers(1, table_size_update(limit + 1) + base_block())
    c.expect_connection_error(COMPRESSION_ERROR)


# Generic: things every server must accept (h2spec's "generic" group)


@case("generic/1/1", "RFC 9113 3.4", "Sends a client connection preface: accepted")
def _g_preface(c: Conn) -> None:
    c.expect_alive()


@case("generic/2/1", "RFC 9113 5.1", "Sends a PRIORITY frame on an idle stream: accepted")
def _g_priority_idle(c: Conn) -> None:
    c.send(PriorityFrame(1, depends_on=0, stream_weight=15))
    c.expect_alive()
    c.headers(1)
    c.expect_response(1)


@case("generic/2/2", "RFC 9113 5.1", "Sends a WINDOW_UPDATE frame on a half-closed (remote) stream: accepted")
def _g_wu_hcr(c: Conn) -> None:
    c.headers(1)
    c.send(WindowUpdateFrame(1, window_increment=1))
    c.expect_response(1)
    c.expect_alive()


@case("generic/2/3", "RFC 9113 5.1", "Sends a PRIORITY frame on a half-closed (remote) stream: accepted")
def _g_priority_hcr(c: Conn) -> None:
    c.headers(1)
    c.send(PriorityFrame(1, depends_on=0, stream_weight=15))
    c.expect_response(1)
    c.expect_alive()


@case("generic/2/4", "RFC 9113 5.1", "Sends a RST_STREAM frame on a half-closed (remote) stream: accepted")
def _g_rst_hcr(c: Conn) -> None:
    c.headers(1, c.request(b"/delay/200"))
    c.send(RstStreamFrame(1, error_code=CANCEL))
    c.expect_alive()


@case("generic/2/5", "RFC 9113 5.1", "Sends a PRIORITY frame on a closed stream: accepted")
def _g_priority_closed(c: Conn) -> None:
    c.headers(1)
    c.expect_response(1)
    c.send(PriorityFrame(1, depends_on=0, stream_weight=15))
    c.expect_alive()


@case("generic/3.1/1", "RFC 9113 6.1", "Sends a DATA frame: accepted")
def _g_data(c: Conn) -> None:
    c.headers(1, c.request(method=b"POST"), end_stream=False)
    c.data(1, b"test")
    c.expect_response(1)


@case("generic/3.1/2", "RFC 9113 6.1", "Sends multiple DATA frames: accepted")
def _g_datas(c: Conn) -> None:
    c.headers(1, c.request(method=b"POST"), end_stream=False)
    c.data(1, b"test", end_stream=False)
    c.data(1, b"test")
    c.expect_response(1)


@case("generic/3.1/3", "RFC 9113 6.1", "Sends a DATA frame with padding: accepted")
def _g_data_padded(c: Conn) -> None:
    c.headers(1, c.request(method=b"POST"), end_stream=False)
    c.send(raw_frame(DATA, END_STREAM | PADDED, 1, b"\x08test" + b"\0" * 8))
    c.expect_response(1)


@case("generic/3.2/1", "RFC 9113 6.2", "Sends a HEADERS frame: accepted")
def _g_headers(c: Conn) -> None:
    c.headers(1)
    c.expect_response(1)


@case("generic/3.2/2", "RFC 9113 6.2", "Sends a HEADERS frame with padding: accepted")
def _g_headers_padded(c: Conn) -> None:
    c.send(raw_frame(HEADERS, END_STREAM | END_HEADERS | PADDED, 1, b"\x08" + c.request() + b"\0" * 8))
    c.expect_response(1)


@case("generic/3.2/3", "RFC 9113 6.2", "Sends a HEADERS frame with priority: accepted")
def _g_headers_priority(c: Conn) -> None:
    c.send(
        raw_frame(
            HEADERS, END_STREAM | END_HEADERS | PRIORITY_FLAG, 1, struct.pack(">IB", 0, 255) + c.request()
        )
    )
    c.expect_response(1)


for _n, (_dep, _weight, _excl, _what) in enumerate(
    (
        (0, 0, False, "priority 1"),
        (0, 255, False, "priority 256"),
        (3, 15, False, "stream dependency"),
        (3, 15, True, "exclusive"),
    ),
    start=1,
):

    def _g_prio(c: Conn, dep: int = _dep, weight: int = _weight, excl: bool = _excl) -> None:
        c.headers(1, c.request(method=b"POST"), end_stream=False)
        c.send(PriorityFrame(1, depends_on=dep, stream_weight=weight, exclusive=excl))
        c.data(1, b"test")
        c.expect_response(1)

    CASES.append(
        Case(f"generic/3.3/{_n}", "RFC 9113 6.3", f"Sends a PRIORITY frame with {_what}: accepted", _g_prio)
    )


@case(
    "generic/3.3/5",
    "RFC 9113 5.1.1",
    "PRIORITY for an idle stream, then HEADERS on a lower stream id: answered",
)
def _g_prio_then_lower(c: Conn) -> None:
    c.send(PriorityFrame(5, depends_on=0, stream_weight=15))
    c.headers(3)
    c.expect_response(3)


@case("generic/3.4/1", "RFC 9113 6.4", "Sends a RST_STREAM frame: accepted")
def _g_rst(c: Conn) -> None:
    c.headers(1, c.request(method=b"POST"), end_stream=False)
    c.send(RstStreamFrame(1, error_code=CANCEL))
    c.expect_alive()


@case("generic/3.5/1", "RFC 9113 6.5", "Sends a SETTINGS frame: acknowledged")
def _g_settings(c: Conn) -> None:
    c.send(raw_frame(SETTINGS, 0, 0, settings_payload([(S_ENABLE_PUSH, 0), (S_MAX_CONCURRENT_STREAMS, 100)])))
    c.expect_settings_ack()


@case("generic/3.7/1", "RFC 9113 6.7", "Sends a PING frame: answered")
def _g_ping(c: Conn) -> None:
    payload = c.ping_payload()
    c.send(raw_frame(PING, 0, 0, payload))
    c.expect_ping_ack(payload)


@case("generic/3.8/1", "RFC 9113 6.8", "Sends a GOAWAY frame: accepted, in-flight stream still answered")
def _g_goaway(c: Conn) -> None:
    c.headers(1)
    c.send(GoAwayFrame(0, last_stream_id=0, error_code=NO_ERROR))
    c.expect_response(1)


@case("generic/3.9/1", "RFC 9113 6.9", "Sends a WINDOW_UPDATE frame with stream ID 0: accepted")
def _g_wu0(c: Conn) -> None:
    c.send(WindowUpdateFrame(0, window_increment=1))
    c.expect_alive()


@case("generic/3.9/2", "RFC 9113 6.9", "Sends a WINDOW_UPDATE frame with stream ID 1: accepted")
def _g_wu1(c: Conn) -> None:
    c.headers(1, c.request(method=b"POST"), end_stream=False)
    c.send(WindowUpdateFrame(1, window_increment=1))
    c.data(1, b"test")
    c.expect_response(1)


@case("generic/3.10/1", "RFC 9113 6.10", "Sends a CONTINUATION frame: accepted")
def _g_cont(c: Conn) -> None:
    block = c.request()
    c.headers(1, block[:3], end_headers=False)
    c.send(raw_frame(CONTINUATION, END_HEADERS, 1, block[3:]))
    c.expect_response(1)


@case("generic/3.10/2", "RFC 9113 6.10", "Sends multiple CONTINUATION frames: accepted")
def _g_conts(c: Conn) -> None:
    block = c.request(extra=[(b"x-a", b"1" * 50)])
    c.headers(1, block[:2], end_headers=False)
    for i in range(2, len(block) - 1, 8):
        c.send(raw_frame(CONTINUATION, 0, 1, block[i : min(i + 8, len(block) - 1)]))
    c.send(raw_frame(CONTINUATION, END_HEADERS, 1, block[len(block) - 1 :]))
    c.expect_response(1)


@case("generic/4/1", "RFC 9113 8.1", "Sends a GET request: answered")
def _g_get(c: Conn) -> None:
    c.headers(1)
    c.expect_response(1)


@case("generic/4/2", "RFC 9113 8.1", "Sends a HEAD request: answered, no body")
def _g_head(c: Conn) -> None:
    c.headers(1, c.request(method=b"HEAD"))
    for ev in c.events():
        if isinstance(ev, DataFrame) and ev.stream_id == 1 and ev.data:
            raise CaseFailed("no DATA payload for HEAD", describe(ev))
        if isinstance(ev, (HeadersFrame, DataFrame)) and ev.stream_id == 1 and "END_STREAM" in ev.flags:
            return
        if isinstance(ev, (str, GoAwayFrame, RstStreamFrame)):
            raise CaseFailed("a response to HEAD", describe(ev))


@case("generic/4/3", "RFC 9113 8.1", "Sends a POST request: answered")
def _g_post(c: Conn) -> None:
    c.headers(1, c.request(method=b"POST", extra=[(b"content-length", b"4")]), end_stream=False)
    c.data(1, b"test")
    c.expect_response(1)


@case("generic/4/4", "RFC 9113 8.1", "Sends a POST request with trailers: answered")
def _g_post_trailers(c: Conn) -> None:
    c.headers(1, c.request(method=b"POST"), end_stream=False)
    c.data(1, b"test", end_stream=False)
    c.headers(1, c.encode([(b"x-trailer", b"ok")]))
    c.expect_response(1)


def _hpack_case(block_tail: bytes) -> Callable[[Conn], None]:
    def run(c: Conn) -> None:
        c.headers(1, base_block() + block_tail)
        c.expect_response(1)

    return run


for _n, (_what, _tail) in enumerate(
    (
        ("an indexed header field representation", indexed(31)),  # accept-encoding: gzip, deflate
        ("a literal with incremental indexing, indexed name", literal(IDX_USER_AGENT, b"h2conformance")),
        (
            "a literal with incremental indexing, indexed name, Huffman",
            literal(IDX_USER_AGENT, b"h2conformance", huffman=True),
        ),
        ("a literal with incremental indexing, new name", literal(b"x-test", b"ok")),
        ("a literal with incremental indexing, new name, Huffman", literal(b"x-test", b"ok", huffman=True)),
        ("a literal without indexing, indexed name", literal(IDX_USER_AGENT, b"h2conformance", "without")),
        (
            "a literal without indexing, indexed name, Huffman",
            literal(IDX_USER_AGENT, b"h2conformance", "without", True),
        ),
        ("a literal without indexing, new name", literal(b"x-test", b"ok", "without")),
        ("a literal without indexing, new name, Huffman", literal(b"x-test", b"ok", "without", True)),
        ("a literal never indexed, indexed name", literal(IDX_USER_AGENT, b"h2conformance", "never")),
        (
            "a literal never indexed, indexed name, Huffman",
            literal(IDX_USER_AGENT, b"h2conformance", "never", True),
        ),
        ("a literal never indexed, new name", literal(b"x-test", b"ok", "never")),
        ("a literal never indexed, new name, Huffman", literal(b"x-test", b"ok", "never", True)),
    ),
    start=1,
):
    CASES.append(Case(f"generic/5/{_n}", "RFC 7541 6", f"Sends {_what}: accepted", _hpack_case(_tail)))


@case("generic/5/14", "RFC 7541 6.3", "Sends a dynamic table size update: accepted")
def _g_size_update(c: Conn) -> None:
    c.headers(1, table_size_update(1024) + base_block())
    c.expect_response(1)


@case("generic/5/15", "RFC 7541 4.2", "Sends multiple dynamic table size updates: accepted")
def _g_size_updates(c: Conn) -> None:
    c.headers(1, table_size_update(0) + table_size_update(1024) + base_block())
    c.expect_response(1)


@case("generic/5/16", "RFC 7541 2.3.2", "Uses an entry of the dynamic table on a second request: accepted")
def _g_dynamic_table(c: Conn) -> None:
    c.headers(1, base_block() + literal(b"x-test", b"ok"))
    c.expect_response(1)
    # Index 62 is the newest dynamic entry: x-test: ok.
    c.headers(3, base_block() + indexed(62))
    c.expect_response(3)


def moorline_config(
    listener_port: int,
    upstream_port: int,
    admin_port: int | None = None,
    hcm_extra: dict[str, Any] | None = None,
) -> str:
    """Bootstrap YAML: an HTTP/2-only (h2c prior knowledge) listener routing every path to
    ``upstream_port`` (a ``TestUpstream``), admin on ``admin_port``."""
    from moorline.testing import procs

    extra: dict[str, Any] = {"codec_type": "HTTP2"}
    extra.update(hcm_extra or {})
    text = procs.config_http(
        listener_port, {"upstream": [upstream_port]}, hcm_extra=extra, admin_port=admin_port
    )
    yaml.safe_load(text)  # the builder's YAML is what we serve; a broken one fails here, early
    return text
