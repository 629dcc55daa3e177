"""In-memory connection pairs for unit tests of the request path (h11's ``ConnectionPair`` idea).

A ``Pair`` builds the real ``Server`` from a bootstrap (YAML or JSON text), so the connection
manager, its filters, the router, the upstream pools and the codecs are the ones that serve
traffic; only the sockets and the clock are replaced:

- the test plays the **downstream client**: ``pair.connect()`` creates the listener's real codec
  (``HcmConfig.server_factory``: HTTP/1.1, HTTP/2 or the AUTO sniffer) over a ``MemTransport``
  that records writes, pause/resume, close, abort and half-close; ``pair.connect_h2()`` puts an
  ``h2`` client connection on top;
- the test plays the **upstream servers**: the pools open connections through
  ``loop.create_connection`` (``moorline.net.upstream.connect``), which the ``VirtualLoop``
  answers with a ``ConnectAttempt`` the test accepts, refuses or leaves hanging (the cluster's
  connect timeout then fires); an accepted attempt is an ``UpstreamConn`` that shows the bytes
  the proxy wrote and takes response bytes, a FIN or a reset;
- **time** is the ``VirtualLoop``'s: ``pair.advance(seconds)`` runs every timer that falls due
  (route, per-try and stream idle timeouts, retry backoff, delayed close) in order; nothing
  waits for the wall clock.

Every action runs what it made ready (``call_soon`` callbacks, tasks) before it returns, and an
exception raised inside a loop callback fails the action (``LoopCallbackError``) instead of
being logged and lost. No socket is opened and the process-wide event loop is left alone: the
pair's loop is made the running loop only for the duration of each action.

Usage::

    with Pair(bootstrap_yaml()) as pair:
        client = pair.connect()
        client.send(b"GET / HTTP/1.1\\r\\nhost: a\\r\\n\\r\\n")
        up = pair.upstream.accept()
        assert up.request().target == b"/"
        up.respond(200, body=b"hi")
        assert client.response().body == b"hi"

Bounds: every buffer here grows with what the test sends; it is a test tool.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import heapq
import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from moorline.net.conn_info import ConnInfo

__all__ = [
    "ConnectAttempt",
    "Downstream",
    "H2Client",
    "H2Upstream",
    "LoopCallbackError",
    "MemTransport",
    "Message",
    "Pair",
    "RecordingAccessLog",
    "Upstream",
    "UpstreamConn",
    "VirtualLoop",
    "WireError",
    "bootstrap_yaml",
]

HeaderList = list[tuple[bytes, bytes]]


class LoopCallbackError(AssertionError):
    """A callback run by the loop raised; the original exception is ``__cause__``."""


class WireError(AssertionError):
    """The proxy wrote bytes that are not valid HTTP/1.1 (as this harness's strict parser reads them)."""


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


class _NoSelector:
    """What ``BaseEventLoop._run_once`` polls: there is no I/O, only callbacks and timers."""

    def select(self, timeout: float | None = None) -> list[Any]:
        return []

    def close(self) -> None:
        pass


class VirtualLoop(asyncio.BaseEventLoop):
    """An event loop whose clock moves only when the test says so.

    ``time()`` starts at 1000.0 (so a zero "last activity" reads as long ago). ``run_ready()``
    runs the callbacks that are ready now; ``advance(dt)`` moves the clock forward, firing each
    timer at its own time. Connection attempts (``create_connection``) become
    ``ConnectAttempt``s handed to ``on_connect``."""

    def __init__(self) -> None:
        super().__init__()
        self._now = 1000.0
        self._selector = _NoSelector()
        self._errors: list[dict[str, Any]] = []
        self.on_connect: Callable[[ConnectAttempt], None] | None = None

    # -- the clock
    def time(self) -> float:
        return self._now

    MAX_ROUNDS = 100_000  # loop iterations one run_ready() may take: a callback storm fails, never hangs

    def run_ready(self) -> None:
        """Run every callback that is due at the current time, including those they schedule."""
        rounds = 0
        base: Any = self  # BaseEventLoop's internals are not in the type stubs
        with self.active():
            while self._due():
                rounds += 1
                if rounds > self.MAX_ROUNDS:
                    raise LoopCallbackError(f"callbacks keep rescheduling themselves at t={self._now}")
                base._run_once()
        self._raise_errors()

    def advance(self, seconds: float) -> None:
        """Move the clock ``seconds`` forward, running each timer at its due time."""
        if seconds < 0:
            raise ValueError("time only moves forward")
        target = self._now + seconds
        self.run_ready()
        while True:
            when = self._next_timer()
            if when is None or when > target:
                break
            self._now = max(self._now, when)
            self.run_ready()
        self._now = target
        self.run_ready()

    def _next_timer(self) -> float | None:
        base: Any = self
        sched = base._scheduled
        while sched and sched[0]._cancelled:
            heapq.heappop(sched)._scheduled = False
            base._timer_cancelled_count -= 1
        return sched[0]._when if sched else None

    def _due(self) -> bool:
        base: Any = self
        if base._ready:
            return True
        when = self._next_timer()
        return when is not None and when <= self._now + base._clock_resolution

    def pending_timers(self) -> list[float]:
        """Due times (loop time) of the timers still scheduled, soonest first."""
        base: Any = self
        return sorted(h._when for h in base._scheduled if not h._cancelled)

    @contextlib.contextmanager
    def active(self) -> Iterator[VirtualLoop]:
        """Make this the running loop (``asyncio.get_event_loop()`` / ``get_running_loop()``
        answer it) for the duration of the block, as it is while real callbacks run."""
        prev = asyncio.events._get_running_loop()
        asyncio.events._set_running_loop(self)
        try:
            yield self
        finally:
            asyncio.events._set_running_loop(prev)

    # -- errors raised inside callbacks fail the test
    def call_exception_handler(self, context: dict[str, Any]) -> None:
        self._errors.append(context)

    def _raise_errors(self) -> None:
        if self._errors:
            ctx = self._errors.pop(0)
            self._errors.clear()
            exc = ctx.get("exception")
            raise LoopCallbackError(ctx.get("message", "loop callback failed")) from exc

    # -- what BaseEventLoop leaves to subclasses
    def _process_events(self, event_list: list[Any]) -> None:
        pass

    def _write_to_self(self) -> None:
        pass

    # -- connections: the test decides how each one goes
    async def create_connection(  # type: ignore[override]
        self,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        host: Any = None,
        port: Any = None,
        **kw: Any,
    ) -> tuple[asyncio.BaseTransport, asyncio.BaseProtocol]:
        return await self._connect(protocol_factory, (host, port), kw)

    async def create_unix_connection(  # type: ignore[override]
        self, protocol_factory: Callable[[], asyncio.BaseProtocol], path: Any = None, **kw: Any
    ) -> tuple[asyncio.BaseTransport, asyncio.BaseProtocol]:
        return await self._connect(protocol_factory, (path, None), kw)

    async def _connect(
        self, factory: Callable[[], Any], address: tuple[Any, Any], kw: dict[str, Any]
    ) -> tuple[asyncio.BaseTransport, asyncio.BaseProtocol]:
        if kw.get("ssl"):
            raise NotImplementedError("moorline.testing.pair: TLS upstreams are not simulated")
        attempt = ConnectAttempt(self, factory, address)
        if self.on_connect is None:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "no upstream in this test")
        self.on_connect(attempt)
        try:
            return await attempt._future
        finally:
            attempt.done = True


# ---------------------------------------------------------------------------------------------
# Transports
# ---------------------------------------------------------------------------------------------


class MemTransport(asyncio.Transport):
    """A transport that records what the protocol does to it.

    ``data`` holds every byte written; ``take()`` returns what was written since the last
    ``take()``. ``closed`` / ``aborted`` / ``eof_written`` say how the protocol ended its side;
    ``reading`` is False while the protocol paused reading. As with real transports,
    ``close()`` and ``abort()`` call the protocol's ``connection_lost`` on the next loop
    iteration, and writing after ``write_eof()`` raises."""

    def __init__(self, loop: VirtualLoop, protocol: Any, peername: Any = None, sockname: Any = None) -> None:
        super().__init__()
        self.loop = loop
        self._protocol = protocol
        self._extra = {"peername": peername, "sockname": sockname, "socket": None, "ssl_object": None}
        self.data = bytearray()
        self._taken = 0
        self.closed = False
        self.aborted = False
        self.eof_written = False
        self.reading = True
        self.pauses = 0
        self.writes_after_close = 0
        self.write_limits: tuple[int | None, int | None] = (None, None)
        self.lost = False
        self._writing_paused = False

    # -- asyncio.Transport
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.eof_written:
            raise RuntimeError("Cannot call write() after write_eof()")
        if self.closed:
            self.writes_after_close += 1  # asyncio drops them (uvloop too, once closed)
            return
        self.data += data

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        for d in list_of_data:
            self.write(d)

    def write_eof(self) -> None:
        self.eof_written = True

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.loop.call_soon(self._lost, None)

    def abort(self) -> None:
        self.aborted = True
        if not self.closed:
            self.closed = True
            self.loop.call_soon(self._lost, None)

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        if self.reading:
            self.pauses += 1
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.write_limits = (high, low)

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        v = self._extra.get(name)
        return default if v is None else v

    def set_protocol(self, protocol: Any) -> None:
        self._protocol = protocol

    def get_protocol(self) -> Any:
        return self._protocol

    # -- for the harness
    def take(self) -> bytes:
        out = bytes(self.data[self._taken :])
        self._taken = len(self.data)
        return out

    def _lost(self, exc: Exception | None) -> None:
        if not self.lost:
            self.lost = True
            self._protocol.connection_lost(exc)

    def peer_data(self, data: bytes) -> None:
        """Bytes from the peer; they reach the protocol even while reading is paused (a paused
        transport only stops *new* reads, the test decides what the peer sends)."""
        if self.lost:
            raise AssertionError("the connection is gone; the peer cannot send")
        self._protocol.data_received(data)

    def peer_eof(self) -> None:
        """The peer half-closes (FIN). Like asyncio: a falsy ``eof_received()`` closes the transport."""
        if self.lost:
            return
        keep = self._protocol.eof_received()
        if not keep:
            self.close()

    def peer_reset(self) -> None:
        """The peer resets the connection (RST): ``connection_lost`` with an error, at once."""
        if self.lost:
            return
        self.closed = True
        self.lost = True
        self._protocol.connection_lost(ConnectionResetError(errno.ECONNRESET, "reset by peer"))

    def block_writes(self) -> None:
        """The kernel buffer is full: the protocol gets ``pause_writing()``."""
        if not self._writing_paused:
            self._writing_paused = True
            self._protocol.pause_writing()

    def unblock_writes(self) -> None:
        if self._writing_paused:
            self._writing_paused = False
            self._protocol.resume_writing()


# ---------------------------------------------------------------------------------------------
# A strict HTTP/1.1 reader, independent of moorline's codec
# ---------------------------------------------------------------------------------------------


class Message:
    """One HTTP/1.1 request or response as it was on the wire.

    ``headers`` keep their order with lower-case names; ``header(name)`` joins repeated values
    with ``", "``. ``raw`` is the exact bytes of the message."""

    def __init__(
        self,
        start: list[bytes],
        headers: HeaderList,
        body: bytes,
        trailers: HeaderList,
        chunked: bool,
        raw: bytes,
    ) -> None:
        self.start = start
        self.headers = headers
        self.body = body
        self.trailers = trailers
        self.chunked = chunked
        self.raw = raw

    # requests
    @property
    def method(self) -> bytes:
        return self.start[0]

    @property
    def target(self) -> bytes:
        return self.start[1]

    # responses
    @property
    def status(self) -> int:
        return int(self.start[1])

    @property
    def version(self) -> bytes:
        return self.start[0] if self.start[0].startswith(b"HTTP/") else self.start[2]

    def header(self, name: bytes | str) -> bytes | None:
        n = name.encode() if isinstance(name, str) else name
        vals = [v for k, v in self.headers if k == n.lower()]
        return b", ".join(vals) if vals else None

    def header_all(self, name: bytes | str) -> list[bytes]:
        n = name.encode() if isinstance(name, str) else name
        return [v for k, v in self.headers if k == n.lower()]

    def names(self) -> list[bytes]:
        return [k for k, _ in self.headers]

    def trailer(self, name: bytes | str) -> bytes | None:
        n = (name.encode() if isinstance(name, str) else name).lower()
        for k, v in self.trailers:
            if k == n:
                return v
        return None

    @property
    def upgrade(self) -> bool:
        conn = (self.header(b"connection") or b"").lower()
        return b"upgrade" in [t.strip() for t in conn.split(b",")] and self.header(b"upgrade") is not None

    def __repr__(self) -> str:
        return f"Message({b' '.join(self.start)!r}, {self.headers!r}, body={self.body[:64]!r})"


def _parse_headers(block: bytes) -> HeaderList:
    out: HeaderList = []
    for line in block.split(b"\r\n"):
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip() or b" " in name:
            raise WireError(f"bad header line {line!r}")
        out.append((name.lower(), value.strip(b" \t")))
    return out


def parse_message(
    buf: bytes, response: bool, no_body: bool = False, eof: bool = False
) -> tuple[Message, int] | None:
    """Parse one message from the start of ``buf``: ``(message, bytes used)``, or None while it
    is incomplete. A response without framing ends with the connection (``eof``); ``no_body``
    is for answers to HEAD. Raises ``WireError`` on anything malformed or ambiguous
    (Content-Length and chunked together, two different Content-Lengths, bad chunk sizes)."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = buf[:end]
    line, _, rest = head.partition(b"\r\n")
    start = line.split(b" ", 2)
    if len(start) < 2:
        raise WireError(f"bad start line {line!r}")
    if response:
        if not start[0].startswith(b"HTTP/1.") or not start[1].isdigit() or len(start[1]) != 3:
            raise WireError(f"bad status line {line!r}")
    elif len(start) != 3 or not start[2].startswith(b"HTTP/1."):
        raise WireError(f"bad request line {line!r}")
    headers = _parse_headers(rest)
    pos = end + 4
    msg_len = [v for k, v in headers if k == b"content-length"]
    te = b",".join(v for k, v in headers if k == b"transfer-encoding").lower()
    chunked = te.replace(b" ", b"").endswith(b"chunked")
    if msg_len and te:
        raise WireError(f"both content-length and transfer-encoding: {headers!r}")
    if len(set(msg_len)) > 1:
        raise WireError(f"conflicting content-length values: {msg_len!r}")
    m = Message(start, headers, b"", [], chunked, b"")
    if response:
        status = int(start[1])
        bodiless = no_body or status < 200 or status in (204, 304)
        if status < 200 and msg_len:
            raise WireError(f"a {status} response with content-length")
        if status in (204, 304) and (te or (msg_len and msg_len[0] != b"0" and status == 204)):
            raise WireError(f"a {status} response with body framing: {headers!r}")
    else:
        bodiless = m.upgrade or start[0] == b"CONNECT"
    if bodiless:
        m.raw = buf[:pos]
        return m, pos
    if chunked:
        body = bytearray()
        while True:
            le = buf.find(b"\r\n", pos)
            if le < 0:
                return None
            size_s = buf[pos:le].split(b";", 1)[0].strip()
            try:
                size = int(size_s, 16)
            except ValueError:
                raise WireError(f"bad chunk size {buf[pos:le]!r}") from None
            pos = le + 2
            if size == 0:
                te_end = buf.find(b"\r\n", pos)
                if te_end < 0:
                    return None
                if te_end == pos:
                    pos += 2
                else:
                    tend = buf.find(b"\r\n\r\n", pos)
                    if tend < 0:
                        return None
                    m.trailers = _parse_headers(buf[pos:tend])
                    pos = tend + 4
                break
            if len(buf) < pos + size + 2:
                return None
            body += buf[pos : pos + size]
            if buf[pos + size : pos + size + 2] != b"\r\n":
                raise WireError("chunk data not followed by CRLF")
            pos += size + 2
        m.body = bytes(body)
    elif msg_len:
        n = int(msg_len[0])
        if len(buf) < pos + n:
            return None
        m.body = buf[pos : pos + n]
        pos += n
    elif response:
        if not eof:
            return None  # close-delimited
        m.body = buf[pos:]
        pos = len(buf)
    m.raw = buf[:pos]
    return m, pos


class _Reader:
    """Messages out of a growing byte stream; after an upgrade or CONNECT answer, the rest is
    raw tunnel bytes (``tunnel``)."""

    def __init__(self, response: bool) -> None:
        self.response = response
        self.pos = 0
        self.tunneled = False

    def next(
        self, data: bytes | bytearray, eof: bool, no_body: bool = False, connect: bool = False
    ) -> Message | None:
        """``connect``: the response answers a CONNECT (a 2xx has no body: the tunnel follows)."""
        if self.tunneled:
            return None
        buf = bytes(data[self.pos :])
        r = parse_message(buf, self.response, no_body=no_body or connect, eof=eof)
        if r is None:
            return None
        m, n = r
        self.pos += n
        if self.response and (m.status == 101 or (connect and 200 <= m.status < 300)):
            self.tunneled = True
        elif not self.response and (m.upgrade or m.method == b"CONNECT"):
            self.tunneled = True
        return m

    def tunnel(self, data: bytes | bytearray) -> bytes:
        """Tunnel bytes after the upgrade (all of them so far; the cursor does not move)."""
        return bytes(data[self.pos :]) if self.tunneled else b""


def build_request(
    method: str | bytes = "GET",
    target: str | bytes = "/",
    headers: Iterable[tuple[str | bytes, str | bytes]] = (),
    body: bytes | None = None,
    host: str | bytes | None = "example.com",
    version: str = "HTTP/1.1",
    chunked: bool = False,
) -> bytes:
    """HTTP/1.1 request bytes. ``body`` gets a Content-Length unless ``chunked`` (one chunk)."""
    out = [_b(method) + b" " + _b(target) + b" " + version.encode() + b"\r\n"]
    if host is not None:
        out.append(b"host: " + _b(host) + b"\r\n")
    for k, v in headers:
        out.append(_b(k) + b": " + _b(v) + b"\r\n")
    if chunked:
        out.append(b"transfer-encoding: chunked\r\n\r\n")
        if body:
            out.append(b"%x\r\n%s\r\n" % (len(body), body))
        out.append(b"0\r\n\r\n")
    else:
        if body is not None:
            out.append(b"content-length: %d\r\n" % len(body))
        out.append(b"\r\n")
        if body:
            out.append(body)
    return b"".join(out)


def build_response(
    status: int = 200,
    headers: Iterable[tuple[str | bytes, str | bytes]] = (),
    body: bytes = b"",
    chunked: bool = False,
    trailers: Iterable[tuple[str | bytes, str | bytes]] = (),
    reason: str = "",
    length: bool = True,
    version: str = "HTTP/1.1",
) -> bytes:
    """HTTP/1.1 response bytes: Content-Length framing (unless ``length=False``: close-delimited,
    or bodiless statuses), or one chunk plus optional trailers with ``chunked``."""
    out = [b"%s %d %s\r\n" % (version.encode(), status, (reason or _REASONS.get(status, "X")).encode())]
    for k, v in headers:
        out.append(_b(k) + b": " + _b(v) + b"\r\n")
    if chunked:
        out.append(b"transfer-encoding: chunked\r\n\r\n")
        if body:
            out.append(b"%x\r\n%s\r\n" % (len(body), body))
        out.append(b"0\r\n")
        for k, v in trailers:
            out.append(_b(k) + b": " + _b(v) + b"\r\n")
        out.append(b"\r\n")
        return b"".join(out)
    if length and status >= 200 and status not in (204, 304):
        out.append(b"content-length: %d\r\n" % len(body))
    out.append(b"\r\n")
    out.append(body)
    return b"".join(out)


_REASONS = {
    100: "Continue",
    101: "Switching Protocols",
    200: "OK",
    204: "No Content",
    304: "Not Modified",
    400: "Bad Request",
    404: "Not Found",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def _b(v: str | bytes) -> bytes:
    return v if isinstance(v, bytes) else v.encode()


# ---------------------------------------------------------------------------------------------
# The downstream side: the test is the client
# ---------------------------------------------------------------------------------------------


class _PeerSide:
    """What the test does as the far end of one in-memory connection (client or server): each
    action runs inside the virtual loop, then runs what it made ready."""

    transport: MemTransport

    def _loop(self) -> VirtualLoop:
        raise NotImplementedError

    def _act(self, fn: Callable[[], Any]) -> None:
        loop = self._loop()
        with loop.active():
            fn()
        loop.run_ready()

    def send(self, data: bytes) -> None:
        self._act(lambda: self.transport.peer_data(data))

    @property
    def data(self) -> bytes:
        """Every byte the proxy wrote to this connection."""
        return bytes(self.transport.data)

    def read(self) -> bytes:
        """What the proxy wrote since the last ``read``."""
        return self.transport.take()

    def eof(self) -> None:
        """Half-close (FIN) this side."""
        self._act(self.transport.peer_eof)

    def reset(self) -> None:
        """This side goes away abruptly (RST)."""
        self._act(self.transport.peer_reset)

    def block_writes(self) -> None:
        self._act(self.transport.block_writes)

    def unblock_writes(self) -> None:
        self._act(self.transport.unblock_writes)


class Downstream(_PeerSide):
    """One downstream connection; the test is its client.

    ``send()`` delivers bytes to the proxy's codec; ``response()`` / ``responses()`` parse what
    the proxy answered (strictly, see ``parse_message``); ``read()`` returns the raw bytes
    written since the last ``read()``. ``eof()`` half-closes, ``reset()`` drops the connection.
    """

    def __init__(self, pair: Pair, transport: MemTransport, info: ConnInfo) -> None:
        self.pair = pair
        self.transport = transport
        self.info = info
        self._reader = _Reader(response=True)
        self._heads: collections.deque[bool] = collections.deque()  # HEAD requests sent, in order
        self._connect = False  # a CONNECT was sent: its 2xx answer opens a tunnel

    @property
    def protocol(self) -> Any:
        """The codec serving this connection (after the AUTO sniffer chose one)."""
        return self.transport.get_protocol()

    # -- client actions
    def send(self, data: bytes) -> None:
        if data[:8] == b"CONNECT " and not self._reader.tunneled:
            self._connect = True  # the next response answers a CONNECT
        super().send(data)

    def request(self, method: str | bytes = "GET", target: str | bytes = "/", **kw: Any) -> None:
        """Send ``build_request(method, target, **kw)``; HEAD is remembered for the reader."""
        self._heads.append(_b(method).upper() == b"HEAD")
        self.send(build_request(method, target, **kw))

    def _loop(self) -> VirtualLoop:
        return self.pair.loop

    # -- what the proxy did
    @property
    def closed(self) -> bool:
        """The proxy closed (or aborted) its side."""
        return self.transport.closed

    @property
    def aborted(self) -> bool:
        return self.transport.aborted

    @property
    def reading(self) -> bool:
        return self.transport.reading

    def responses(self, head: bool | None = None) -> list[Message]:
        """Every complete response not returned yet (1xx interim answers included)."""
        out: list[Message] = []
        while True:
            m = self.next_response(head)
            if m is None:
                return out
            out.append(m)

    def next_response(self, head: bool | None = None) -> Message | None:
        no_body = head if head is not None else (self._heads[0] if self._heads else False)
        m = self._reader.next(
            self.transport.data, eof=self.transport.closed, no_body=no_body, connect=self._connect
        )
        if m is not None and m.status >= 200 and self._heads and head is None:
            self._heads.popleft()
        return m

    def response(self, head: bool | None = None) -> Message:
        """The next complete final-or-interim response; fails the test if there is none."""
        m = self.next_response(head)
        if m is None:
            raise AssertionError(f"no complete response; unread bytes: {self.data[self._reader.pos :]!r}")
        return m

    def tunnel_data(self) -> bytes:
        """Bytes after a 101 (all of them so far)."""
        return self._reader.tunnel(self.transport.data)


class _H2Peer:
    """An ``h2`` endpoint over one side of the pair, with header validation off both ways (so a
    test can send what a hostile peer would). Subclasses say how a stream starts
    (``_opened``); body, trailers, end and reset are recorded alike on both sides."""

    def __init__(self, side: _PeerSide, client_side: bool) -> None:
        import h2.config
        import h2.connection

        self._side = side
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=client_side,
                header_encoding=None,
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
                validate_inbound_headers=False,
            )
        )
        self.events: list[Any] = []
        self._streams: dict[int, Any] = {}
        self.h2.initiate_connection()
        self._flush()

    def _opened(self, ev: Any) -> bool:
        """Handle an event that starts or heads a stream; True when it was one."""
        raise NotImplementedError

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self._side.send(data)
        self._receive()

    def _receive(self) -> None:
        import h2.events

        data = self._side.read()
        if not data:
            return
        for ev in self.h2.receive_data(data):
            self.events.append(ev)
            if self._opened(ev):
                continue
            sid = getattr(ev, "stream_id", None)
            r = self._streams.get(sid) if sid else None
            if r is None:
                continue
            if isinstance(ev, h2.events.DataReceived):
                r.body += ev.data
                if ev.flow_controlled_length:
                    self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.TrailersReceived):
                r.trailers = list(ev.headers)
            elif isinstance(ev, h2.events.StreamEnded):
                r.ended = True
            elif isinstance(ev, h2.events.StreamReset):
                r.reset_code = int(ev.error_code)
        if self.h2.data_to_send():
            self._flush()

    def poll(self) -> None:
        """Read what the proxy wrote since the last call."""
        self._receive()


class H2Client(_H2Peer):
    """An ``h2`` client on a ``Downstream`` (prior knowledge: it sends the preface at once).

    Outbound header validation is off, so a test can send what a hostile client would."""

    def __init__(self, down: Downstream) -> None:
        self.down = down
        super().__init__(down, client_side=True)
        self.streams: dict[int, H2Response] = self._streams

    def _opened(self, ev: Any) -> bool:
        import h2.events

        if isinstance(ev, h2.events.ResponseReceived):
            r = self._streams.get(ev.stream_id)
            if r is not None:
                r.headers = list(ev.headers)
            return True
        if isinstance(ev, h2.events.InformationalResponseReceived):
            r = self._streams.get(ev.stream_id)
            if r is not None:
                r.informational.append(list(ev.headers))
            return True
        return False

    def request(
        self,
        method: str = "GET",
        path: str = "/",
        authority: str = "example.com",
        headers: Iterable[tuple[str | bytes, str | bytes]] = (),
        body: bytes | None = None,
        end_stream: bool = True,
        scheme: str = "http",
    ) -> int:
        """Open a stream; returns its id. ``end_stream`` with no body ends it with the headers."""
        sid = self.h2.get_next_available_stream_id()
        hl: list[tuple[bytes, bytes]] = [(b":method", _b(method)), (b":scheme", _b(scheme))]
        if authority is not None:
            hl.append((b":authority", _b(authority)))
        if path is not None:
            hl.append((b":path", _b(path)))
        hl += [(_b(k), _b(v)) for k, v in headers]
        self.streams[sid] = H2Response(sid)
        self.h2.send_headers(sid, hl, end_stream=end_stream and not body)
        if body:
            self.h2.send_data(sid, body, end_stream=end_stream)
        self._flush()
        return sid

    def send_data(self, sid: int, data: bytes, end_stream: bool = False) -> None:
        self.h2.send_data(sid, data, end_stream=end_stream)
        self._flush()

    def send_trailers(self, sid: int, trailers: Iterable[tuple[str | bytes, str | bytes]]) -> None:
        self.h2.send_headers(sid, [(_b(k), _b(v)) for k, v in trailers], end_stream=True)
        self._flush()

    def reset(self, sid: int, code: int = 8) -> None:
        self.h2.reset_stream(sid, code)
        self._flush()

    def response(self, sid: int) -> H2Response:
        self._receive()
        return self.streams[sid]

    def goaway_code(self) -> int | None:
        """The error code of the GOAWAY the server sent, or None."""
        import h2.events

        self._receive()
        for ev in self.events:
            if isinstance(ev, h2.events.ConnectionTerminated):
                return int(ev.error_code or 0)
        return None


class H2Response:
    """What one HTTP/2 stream received."""

    def __init__(self, sid: int) -> None:
        self.sid = sid
        self.headers: list[tuple[bytes, bytes]] | None = None
        self.informational: list[list[tuple[bytes, bytes]]] = []
        self.body = b""
        self.trailers: list[tuple[bytes, bytes]] | None = None
        self.ended = False
        self.reset_code: int | None = None

    @property
    def status(self) -> int | None:
        for k, v in self.headers or ():
            if k == b":status":
                return int(v)
        return None

    def header(self, name: bytes | str) -> bytes | None:
        n = _b(name)
        for k, v in self.headers or ():
            if k == n:
                return v
        return None

    def trailer(self, name: bytes | str) -> bytes | None:
        n = _b(name)
        for k, v in self.trailers or ():
            if k == n:
                return v
        return None


# ---------------------------------------------------------------------------------------------
# The upstream side: the test is every upstream server
# ---------------------------------------------------------------------------------------------


class ConnectAttempt:
    """A connection a pool is opening. ``accept()`` completes it, ``refuse()`` fails it; left
    alone it hangs until the pool's connect timeout cancels it (``cancelled`` then)."""

    def __init__(self, loop: VirtualLoop, factory: Callable[[], Any], address: tuple[Any, Any]) -> None:
        self.loop = loop
        self.factory = factory
        self.address = address  # (host, port) as the pool asked for it
        self._future: asyncio.Future[Any] = loop.create_future()
        self.done = False
        self.upstream: Upstream | None = None

    @property
    def cancelled(self) -> bool:
        return self._future.cancelled()

    @property
    def pending(self) -> bool:
        return not self._future.done()

    def accept(self) -> UpstreamConn:
        if not self.pending:
            raise AssertionError(f"connection attempt to {self.address} is over (cancelled={self.cancelled})")
        protocol = self.factory()
        t = MemTransport(self.loop, protocol, peername=self.address, sockname=("10.255.0.1", 40000))
        conn = UpstreamConn(self, t)
        assert self.upstream is not None
        self.upstream.connections.append(conn)
        with self.loop.active():
            protocol.connection_made(t)
            self._future.set_result((t, protocol))
        self.loop.run_ready()
        return conn

    def accept_and_reset(self) -> UpstreamConn:
        """The connection is made, then reset by the peer before the pool's connect callback
        runs (a real race: the RST lands in the same loop iteration as the connect)."""
        if not self.pending:
            raise AssertionError(f"connection attempt to {self.address} is over (cancelled={self.cancelled})")
        protocol = self.factory()
        t = MemTransport(self.loop, protocol, peername=self.address, sockname=("10.255.0.1", 40000))
        conn = UpstreamConn(self, t)
        assert self.upstream is not None
        self.upstream.connections.append(conn)
        with self.loop.active():
            protocol.connection_made(t)
            t.closed = True
            t._lost(ConnectionResetError(errno.ECONNRESET, "reset by peer"))
            self._future.set_result((t, protocol))
        self.loop.run_ready()
        return conn

    def refuse(self, err: int = errno.ECONNREFUSED) -> None:
        if not self.pending:
            raise AssertionError(f"connection attempt to {self.address} is over")
        self._future.set_exception(ConnectionRefusedError(err, "refused"))
        self.loop.run_ready()


class UpstreamConn(_PeerSide):
    """One upstream connection; the test is the server.

    ``request()`` parses the next request the proxy sent (strictly), ``read()`` returns raw bytes
    written since the last ``read()``; ``send()`` / ``respond()`` answer, ``eof()`` half-closes,
    ``close()`` closes (FIN then gone), ``reset()`` resets."""

    def __init__(self, attempt: ConnectAttempt, transport: MemTransport) -> None:
        self.attempt = attempt
        self.address = attempt.address
        self.transport = transport
        self.loop = attempt.loop
        self._reader = _Reader(response=False)

    @property
    def protocol(self) -> Any:
        return self.transport.get_protocol()

    def next_request(self) -> Message | None:
        return self._reader.next(self.transport.data, eof=self.transport.closed)

    def has_request(self) -> bool:
        """A complete request is waiting to be read (``request()`` would return it)."""
        if self._reader.tunneled:
            return False
        try:
            return parse_message(bytes(self.transport.data[self._reader.pos :]), False) is not None
        except WireError:
            return True

    def request(self) -> Message:
        m = self.next_request()
        if m is None:
            raise AssertionError(f"no complete request; unread bytes: {self.data[self._reader.pos :]!r}")
        return m

    def requests(self) -> list[Message]:
        out: list[Message] = []
        while (m := self.next_request()) is not None:
            out.append(m)
        return out

    def tunnel_data(self) -> bytes:
        return self._reader.tunnel(self.transport.data)

    @property
    def closed(self) -> bool:
        """The proxy closed or aborted this connection."""
        return self.transport.closed

    @property
    def aborted(self) -> bool:
        return self.transport.aborted

    @property
    def reading(self) -> bool:
        return self.transport.reading

    def respond(
        self,
        status: int = 200,
        headers: Iterable[tuple[str | bytes, str | bytes]] = (),
        body: bytes = b"",
        **kw: Any,
    ) -> None:
        self.send(build_response(status, headers, body, **kw))

    def _loop(self) -> VirtualLoop:
        return self.loop

    def close(self) -> None:
        """The server closes: FIN, then the connection is gone."""

        def fin_and_close() -> None:
            self.transport.peer_eof()
            self.transport.close()

        self._act(fin_and_close)

    def h2(self) -> H2Upstream:
        """Play an HTTP/2 server on this connection (the cluster speaks HTTP/2 upstream)."""
        return H2Upstream(self)


class H2Upstream(_H2Peer):
    """An ``h2`` server on an ``UpstreamConn``: ``requests`` by stream id, ``respond()``,
    ``reset()``, ``goaway()``."""

    def __init__(self, conn: UpstreamConn) -> None:
        self.conn = conn
        super().__init__(conn, client_side=False)
        self.requests: dict[int, H2Request] = self._streams

    def _opened(self, ev: Any) -> bool:
        import h2.events

        if isinstance(ev, h2.events.RequestReceived):
            self._streams[ev.stream_id] = H2Request(ev.stream_id, list(ev.headers))
            return True
        return False

    def request(self, sid: int | None = None) -> H2Request:
        """The request on stream ``sid`` (default: the newest)."""
        self._receive()
        if not self.requests:
            raise AssertionError("no HTTP/2 request received")
        return self.requests[sid if sid is not None else max(self.requests)]

    def respond(
        self,
        sid: int,
        status: int = 200,
        headers: Iterable[tuple[str | bytes, str | bytes]] = (),
        body: bytes = b"",
        trailers: Iterable[tuple[str | bytes, str | bytes]] | None = None,
        end_stream: bool = True,
    ) -> None:
        hl = [(b":status", str(status).encode())] + [(_b(k), _b(v)) for k, v in headers]
        ends_with_headers = end_stream and not body and trailers is None
        self.h2.send_headers(sid, hl, end_stream=ends_with_headers)
        if body:
            self.h2.send_data(sid, body, end_stream=end_stream and trailers is None)
        if trailers is not None:
            self.h2.send_headers(sid, [(_b(k), _b(v)) for k, v in trailers], end_stream=True)
        self._flush()

    def reset(self, sid: int, code: int = 7) -> None:
        """RST_STREAM (default REFUSED_STREAM, 7)."""
        self.h2.reset_stream(sid, code)
        self._flush()

    def goaway(self, code: int = 0, last_stream_id: int | None = None) -> None:
        self.h2.close_connection(code, last_stream_id=last_stream_id)
        self._flush()


class H2Request:
    def __init__(self, sid: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.sid = sid
        self.headers = headers
        self.body = b""
        self.trailers: list[tuple[bytes, bytes]] | None = None
        self.ended = False
        self.reset_code: int | None = None

    def header(self, name: bytes | str) -> bytes | None:
        n = _b(name)
        for k, v in self.headers:
            if k == n:
                return v
        return None


class Upstream:
    """Every upstream connection attempt of the pair's pools, in order."""

    def __init__(self, loop: VirtualLoop) -> None:
        self.loop = loop
        self.attempts: list[ConnectAttempt] = []
        self.connections: list[UpstreamConn] = []
        loop.on_connect = self._on_connect

    def _on_connect(self, a: ConnectAttempt) -> None:
        a.upstream = self
        self.attempts.append(a)

    @property
    def pending(self) -> list[ConnectAttempt]:
        """Attempts still waiting for the test's decision."""
        return [a for a in self.attempts if a.pending]

    def attempt(self, address: tuple[Any, Any] | None = None) -> ConnectAttempt:
        """The oldest pending attempt (to ``address``, if given)."""
        for a in self.attempts:
            if a.pending and (address is None or a.address == address):
                return a
        raise AssertionError(
            f"no pending upstream connection attempt{f' to {address}' if address else ''};"
            f" attempts so far: {[(x.address, 'pending' if x.pending else 'over') for x in self.attempts]}"
        )

    def accept(self, address: tuple[Any, Any] | None = None) -> UpstreamConn:
        return self.attempt(address).accept()

    def refuse(self, address: tuple[Any, Any] | None = None, err: int = errno.ECONNREFUSED) -> None:
        self.attempt(address).refuse(err)


# ---------------------------------------------------------------------------------------------
# Access log and the pair
# ---------------------------------------------------------------------------------------------


class RecordingAccessLog:
    """An access logger that keeps every ``StreamInfo`` it is given (added to the HCM's loggers)."""

    def __init__(self) -> None:
        self.entries: list[Any] = []

    def log(self, info: Any) -> None:
        self.entries.append(info)

    def flush(self) -> None:
        pass


class Pair:
    """The real server built from ``config`` (bootstrap YAML/JSON text), served in memory.

    ``listener`` picks the listener (index or name) and ``chain`` its filter chain; the chain's
    terminal must be an HTTP connection manager (``self.hcm``). ``filters`` are extra HTTP
    filter factories (``factory(stream) -> HttpFilter``) run before the router, after the
    configured ones, for tests of the filter manager that need no registry entry."""

    def __init__(
        self,
        config: str,
        listener: int | str = 0,
        chain: int = 0,
        filters: Iterable[Callable[[Any], Any]] = (),
    ) -> None:
        from moorline.config.loader import load_bootstrap
        from moorline.server import Server

        self.loop = VirtualLoop()
        self.upstream = Upstream(self.loop)
        self.downstreams: list[Downstream] = []
        with self.loop.active():
            self.server = Server(load_bootstrap(yaml_text=config), "pair")
        lst = self.server.listeners
        self.listener = (
            lst[listener] if isinstance(listener, int) else next(x for x in lst if x.name == listener)
        )
        chains = list(self.listener.selector.chains)
        if self.listener.selector.default is not None:
            chains.append(self.listener.selector.default)
        self.hcm = chains[chain].terminal
        if not hasattr(self.hcm, "new_stream"):
            raise TypeError(
                f"filter chain {chain} of {self.listener.name!r} is not an HTTP connection manager"
            )
        self.access_log = RecordingAccessLog()
        self.hcm.access_logs.append(self.access_log)
        self.hcm.filter_factories.extend(filters)
        self.stats = self.server.stats
        self._closed = False

    # -- downstream connections
    def connect(
        self,
        remote: tuple[str, int] = ("10.1.0.1", 50000),
        local: tuple[str, int] = ("10.0.0.1", 10000),
        buffer_limit: int | None = None,
    ) -> Downstream:
        """A new downstream connection served by the listener's codec."""
        info = ConnInfo(
            local,
            remote,
            self.listener.name,
            buffer_limit=buffer_limit if buffer_limit is not None else self.listener.buffer_limit,
            start_mono=self.loop.time(),
        )
        with self.loop.active():
            proto = self.hcm.server_factory(self.hcm, info)
            t = MemTransport(self.loop, proto, peername=remote, sockname=local)
            proto.connection_made(t)
        d = Downstream(self, t, info)
        self.downstreams.append(d)
        self.loop.run_ready()
        return d

    def connect_h2(self, **kw: Any) -> H2Client:
        """A downstream HTTP/2 (prior knowledge) client; the listener's codec must be AUTO or HTTP2."""
        return H2Client(self.connect(**kw))

    # -- time
    def advance(self, seconds: float) -> None:
        self.loop.advance(seconds)

    def run(self) -> None:
        self.loop.run_ready()

    @property
    def now(self) -> float:
        return self.loop.time()

    # -- stats
    def stat(self, name: str) -> int:
        """A counter's or gauge's value by its full name (0 when it was never created)."""
        s: Any = self.stats.get(name)
        return 0 if s is None else int(s.value)

    def http(self, name: str) -> int:
        """``http.<stat_prefix>.<name>`` of the pair's connection manager."""
        return self.stat(f"http.{self.hcm.stat_prefix}.{name}")

    def cluster_stat(self, cluster: str, name: str) -> int:
        return self.stat(f"cluster.{cluster}.{name}")

    def cluster(self, name: str) -> Any:
        c = self.server.cluster_manager.get(name)
        if c is None:
            raise KeyError(name)
        return c

    def clusters(self) -> list[Any]:
        cs = getattr(self.server.cluster_manager, "clusters", None) or {}
        return list(cs.values() if isinstance(cs, dict) else cs)

    def assert_settled(self) -> None:
        """Nothing is in flight and the paired counters agree: no active downstream request,
        every request that started completed (``downstream_rq_total == downstream_rq_completed``),
        one access-log entry per completed request, and no active or pending upstream request
        on any cluster."""
        problems = []
        if self.http("downstream_rq_active"):
            problems.append(f"downstream_rq_active={self.http('downstream_rq_active')}")
        total, done = self.http("downstream_rq_total"), self.http("downstream_rq_completed")
        if total != done:
            problems.append(f"downstream_rq_total={total} != downstream_rq_completed={done}")
        if len(self.access_log.entries) != done:
            problems.append(
                f"{len(self.access_log.entries)} access-log entries for {done} completed requests"
            )
        for c in self.clusters():
            for n in ("upstream_rq_active", "upstream_rq_pending_active"):
                v = self.cluster_stat(c.name, n)
                if v:
                    problems.append(f"cluster.{c.name}.{n}={v}")
        if problems:
            raise AssertionError("not settled: " + "; ".join(problems))

    # -- teardown
    def close(self) -> None:
        """Reset every downstream connection still open, cancel what hangs, close the loop."""
        if self._closed:
            return
        self._closed = True
        try:
            for d in self.downstreams:
                if not d.transport.lost:
                    with self.loop.active():
                        d.transport.peer_reset()
            for c in self.upstream.connections:
                if not c.transport.lost:
                    with self.loop.active():
                        c.transport.peer_reset()
            self.loop.run_ready()
            for a in self.upstream.attempts:
                if a.pending:
                    a._future.cancel()
            self.loop.run_ready()
        finally:
            with self.loop.active():
                for t in asyncio.all_tasks(self.loop):
                    t.cancel()
            with contextlib.suppress(LoopCallbackError):
                self.loop.run_ready()
            self.loop.close()

    def __enter__(self) -> Pair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def bootstrap_yaml(
    routes: list[dict[str, Any]] | None = None,
    clusters: list[dict[str, Any]] | dict[str, list[tuple[str, int]]] | None = None,
    hcm_extra: dict[str, Any] | None = None,
    virtual_hosts: list[dict[str, Any]] | None = None,
    http_filters: list[dict[str, Any]] | None = None,
    listener_extra: dict[str, Any] | None = None,
    stat_prefix: str = "ingress",
) -> str:
    """A bootstrap (JSON text) with one HTTP connection manager listener and STATIC clusters.

    Defaults: listener ``l`` with stat prefix ``ingress``, codec AUTO, every domain, prefix ``/``
    -> cluster ``be`` with one host 10.0.0.1:80. ``clusters``: full cluster dicts (see
    ``moorline.testing.procs.cluster``) or ``{name: [(ip, port), ...]}``. ``http_filters`` go
    before the router. No admin, no ports bound."""
    from moorline.testing.procs import cluster as make_cluster
    from moorline.testing.procs import hcm_listener

    cl: list[dict[str, Any]]
    if clusters is None:
        cl = [make_cluster("be", [("10.0.0.1", 80)])]
    elif isinstance(clusters, dict):
        cl = [make_cluster(n, list(eps)) for n, eps in clusters.items()]
    else:
        cl = list(clusters)
    if routes is None and virtual_hosts is None:
        routes = [{"match": {"prefix": "/"}, "route": {"cluster": cl[0]["name"]}}] if cl else []
    lst = hcm_listener(
        "l", 0, routes, virtual_hosts=virtual_hosts, hcm_extra=hcm_extra, stat_prefix=stat_prefix
    )
    if http_filters:
        hcm = lst["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["http_filters"] = list(http_filters) + hcm["http_filters"]
    lst.update(listener_extra or {})
    doc = {"static_resources": {"listeners": [lst], "clusters": cl}}
    return json.dumps(doc)
