"""A scriptable HTTP/1.1 test upstream (and a TCP echo server) for end-to-end tests.

The servers run on their own asyncio event loop in a daemon thread, so synchronous pytest tests
(and blocking clients such as ``http.client``, curl or raw sockets) can use them directly::

    with TestUpstream(upstream_id="a") as up:
        ...  # proxy to 127.0.0.1:up.port
        assert up.requests[-1].path == "/hello"

Behaviour is chosen per request by path (or by the ``x-test-status`` / ``x-test-delay-ms``
request headers, which apply to the echo behaviour):

=====================  =======================================================================
``/`` and anything     echo: 200 JSON with method, path, headers, body length and sha256
``/status/<code>``     that status, small text body (none for HEAD, 1xx, 204, 304)
``/delay/<ms>``        wait, then echo
``/close``             close the connection without answering
``/reset``             SO_LINGER 0 then close: the peer sees a TCP RST
``/chunked/<n>``       chunked response of ``n`` chunks, see :func:`chunked_payload`
``/bytes/<n>``         ``n`` bytes of :func:`pattern_bytes`, Content-Length, streamed with
                       backpressure (never built whole)
``/trailers``          chunked response with trailers ``x-trailer-a: 1``, ``x-trailer-b: 2``
``/fail-n/<key>/<n>``  503 for the first ``n`` requests with this key, then 200
``?status=&retry-after=``  on ``/status/<code>`` and ``/fail-n/...``: ``status`` replaces
                       fail-n's 503; ``retry-after`` adds ``Retry-After`` to the failing answer
``/truncate/<n>``      promises ``n`` bytes, sends half of them, closes the connection
``/garbage``           writes bytes that are not an HTTP response, keeps the connection open
``/ws``                WebSocket handshake (``Upgrade: websocket``), then echoes each frame
=====================  =======================================================================

Every response carries ``x-upstream-id`` (the constructor's ``upstream_id``) and ``server:
moorline-test-upstream`` (so a proxy overwriting ``server`` is visible). ``Expect:
100-continue`` is answered with ``100 Continue`` as soon as the head is parsed. Constructor
knobs make every request on this upstream answer one way (``always_status=503``,
``garbage=True``), for retry and protocol-error tests.

Request bodies are hashed as they stream in and never kept, so the memory held per request is
one socket read (asyncio reads at most 256 KiB at a time). Each finished request is recorded as
a :class:`RequestRecord` in ``requests`` (with the connection id, so keep-alive reuse is
visible). Responses on a connection are written in request order (pipelining): parsed
requests wait in a per-connection FIFO that is bounded by :data:`MAX_PIPELINED`; beyond it the
server stops reading from that connection until the FIFO drains.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httptools

MAX_PIPELINED = 64
_PATTERN = bytes(range(256)) * 256  # 64 KiB block of the deterministic byte pattern
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

_REASONS = {
    100: "Continue",
    101: "Switching Protocols",
    200: "OK",
    201: "Created",
    204: "No Content",
    301: "Moved Permanently",
    302: "Found",
    304: "Not Modified",
    400: "Bad Request",
    404: "Not Found",
    408: "Request Timeout",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def pattern_bytes(n: int, offset: int = 0) -> bytes:
    """Bytes ``offset .. offset+n`` of the endless pattern 00 01 .. ff 00 01 .. (what
    ``/bytes/<n>`` serves). Build only small slices with it; use :func:`pattern_sha256` for big
    sizes."""
    out = bytearray()
    pos = offset
    while len(out) < n:
        start = pos % len(_PATTERN)
        take = min(len(_PATTERN) - start, n - len(out))
        out += _PATTERN[start : start + take]
        pos += take
    return bytes(out)


def pattern_sha256(n: int) -> str:
    """sha256 hex of the first ``n`` pattern bytes, computed in 64 KiB steps."""
    h = hashlib.sha256()
    full, rest = divmod(n, len(_PATTERN))
    for _ in range(full):
        h.update(_PATTERN)
    h.update(_PATTERN[:rest])
    return h.hexdigest()


def chunked_payload(n: int) -> list[bytes]:
    """The chunk payloads ``/chunked/<n>`` sends, in order (sizes vary so that chunk
    boundaries are not all alike)."""
    return [(f"chunk-{i}:" + "x" * (i * 37 % 1000)).encode() + b"\n" for i in range(n)]


def websocket_accept(key: bytes | str) -> str:
    """The ``Sec-WebSocket-Accept`` value for a client key (RFC 6455 section 4.2.2)."""
    if isinstance(key, str):
        key = key.encode()
    return base64.b64encode(hashlib.sha1(key + _WS_GUID).digest()).decode()


def _query(q: str) -> dict[str, str]:
    """``a=1&b=2`` -> dict (no percent-decoding: the test paths need none)."""
    out = {}
    for kv in q.split("&"):
        k, _, v = kv.partition("=")
        if k:
            out[k] = v
    return out


def _retry_after(q: dict[str, str]) -> list[tuple[str, str]]:
    v = q.get("retry-after")
    return [("retry-after", v)] if v else []


@dataclass
class RequestRecord:
    """What the upstream saw of one request. Header names are lower-case ``str``."""

    method: str
    path: str
    http_version: str
    headers: list[tuple[str, str]]
    body_len: int
    sha256: str
    conn_id: int
    trailers: list[tuple[str, str]] = field(default_factory=list)
    at: float = field(default_factory=time.monotonic)  # when the head was parsed (monotonic)

    def header(self, name: str) -> str | None:
        """First value of header ``name`` (case-insensitive), or None."""
        name = name.lower()
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def header_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k == name]


class _Request:
    """A request being parsed; the body is hashed, not stored."""

    __slots__ = ("body_len", "complete", "hasher", "headers", "in_trailers", "method", "trailers", "url")

    def __init__(self) -> None:
        self.url = b""
        self.method = ""
        self.headers: list[tuple[str, str]] = []
        self.trailers: list[tuple[str, str]] = []
        self.in_trailers = False
        self.hasher = hashlib.sha256()
        self.body_len = 0
        self.complete = False


class _HttpConn(asyncio.Protocol):
    """One accepted connection: httptools parsing, a FIFO of requests, one writer task."""

    def __init__(self, server: TestUpstream) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.cur: _Request | None = None
        self.queue: asyncio.Queue[tuple[_Request, str, bool]] = asyncio.Queue()
        self.conn_id = 0
        self.closed = False
        self.read_paused = False
        self.can_write = asyncio.Event()
        self.can_write.set()
        self.ws_mode = False
        self.upgrading = False
        self.ws_buf = b""
        self.worker: asyncio.Task[None] | None = None

    # -- asyncio.Protocol --
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.conn_id = self.server._new_conn_id()
        with self.server._lock:
            self.server._open.add(self)
        self.worker = asyncio.get_running_loop().create_task(self._work())

    def data_received(self, data: bytes) -> None:
        if self.ws_mode:
            self._ws_data(data)
            return
        if self.upgrading:
            # Bytes after an upgrade request, before the 101 is written: keep them for the
            # WebSocket echo (bounded by the frame bound in _ws_data).
            self.ws_buf += data
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            # The head (and on_message_complete) went through; the rest is WebSocket frames.
            self.ws_buf = data[exc.args[0] :] if exc.args else b""
        except httptools.HttpParserError:
            self._write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            self._close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.can_write.set()
        self.queue.put_nowait((_Request(), "", False))  # wake the worker so it exits
        self.server._conn_closed(self)

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    # -- httptools callbacks --
    def on_message_begin(self) -> None:
        self.cur = _Request()

    def on_url(self, url: bytes) -> None:
        assert self.cur is not None
        self.cur.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.cur is not None
        item = (name.decode("latin-1").lower(), value.decode("latin-1"))
        (self.cur.trailers if self.cur.in_trailers else self.cur.headers).append(item)

    def on_headers_complete(self) -> None:
        cur = self.cur
        assert cur is not None and self.transport is not None
        cur.in_trailers = True
        cur.method = self.parser.get_method().decode()
        for k, v in cur.headers:
            if k == "expect" and v.lower() == "100-continue" and not self.server.garbage:
                self._write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        assert self.cur is not None
        self.cur.hasher.update(body)
        self.cur.body_len += len(body)

    def on_message_complete(self) -> None:
        cur = self.cur
        assert cur is not None and self.transport is not None
        cur.complete = True
        self.cur = None
        version = self.parser.get_http_version()
        keep_alive = self.parser.should_keep_alive()
        if self.parser.should_upgrade():
            # The parser stops at an upgrade; only /ws continues (as WebSocket), any other
            # upgrade request gets its echo and the connection closes.
            self.upgrading = True
            keep_alive = cur.url.startswith(b"/ws")
        self.queue.put_nowait((cur, version, keep_alive))
        if self.queue.qsize() >= MAX_PIPELINED and not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    # -- responses --
    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def _close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()

    async def _work(self) -> None:
        while True:
            req, version, keep_alive = await self.queue.get()
            if self.closed:
                return
            if self.read_paused and self.queue.qsize() < MAX_PIPELINED // 2:
                self.read_paused = False
                assert self.transport is not None
                self.transport.resume_reading()
            try:
                keep = await self._respond(req, version, keep_alive)
            except (ConnectionError, OSError):
                keep = False
            if not keep:
                self._close()
                return

    async def _drain(self) -> None:
        await self.can_write.wait()

    def _record(self, req: _Request, version: str) -> RequestRecord:
        rec = RequestRecord(
            method=req.method,
            path=req.url.decode("latin-1"),
            http_version=version,
            headers=list(req.headers),
            body_len=req.body_len,
            sha256=req.hasher.hexdigest(),
            conn_id=self.conn_id,
            trailers=list(req.trailers),
        )
        self.server._add_record(rec)
        return rec

    def _head(
        self,
        status: int,
        headers: list[tuple[str, str]],
        version: str,
        keep_alive: bool,
    ) -> bytes:
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
        lines.append(f"x-upstream-id: {self.server.upstream_id}")
        lines.append("server: moorline-test-upstream")
        lines.extend(f"{k}: {v}" for k, v in headers)
        if not keep_alive:
            lines.append("connection: close")
        elif version == "1.0":
            lines.append("connection: keep-alive")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _respond(self, req: _Request, version: str, keep_alive: bool) -> bool:
        """Write the response for ``req``; return whether the connection stays open."""
        rec = self._record(req, version)
        path, _, query = rec.path.partition("?")
        parts = [p for p in path.split("/") if p]
        head_only = rec.method == "HEAD"
        srv = self.server

        if srv.garbage or path == "/garbage":
            self._write(b"THIS IS NOT HTTP\r\n\x00\x01\x02 garbage\r\n\r\n")
            return True  # keep it open: the proxy must detect the garbage, not a close
        if srv.always_status is not None:
            await self._fixed(srv.always_status, version, keep_alive, head_only)
            return keep_alive

        held = srv._held
        if held is not None and path.startswith(held[0]):
            await held[1].wait()
            if self.closed:
                return False
        delay_ms = None if srv.ignore_delay_header else rec.header("x-test-delay-ms")
        if parts[:1] == ["delay"] and len(parts) >= 2:
            delay_ms = parts[1]
        if delay_ms:
            await asyncio.sleep(int(delay_ms) / 1000.0)
            if self.closed:
                return False

        if parts[:1] == ["close"]:
            return False
        if parts[:1] == ["truncate"] and len(parts) >= 2:
            # Promise n bytes, send half, then close: an upstream dying mid-response.
            n = int(parts[1])
            hdrs = [("content-type", "application/octet-stream"), ("content-length", str(n))]
            self._write(self._head(200, hdrs, version, keep_alive) + pattern_bytes(n // 2))
            return False
        if parts[:1] == ["reset"]:
            assert self.transport is not None
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.transport.abort()
            return False
        if parts[:1] == ["status"] and len(parts) >= 2:
            q = _query(query)
            await self._fixed(int(parts[1]), version, keep_alive, head_only, _retry_after(q))
            return keep_alive
        if parts[:1] == ["fail-n"] and len(parts) >= 3:
            if srv._fail_n(parts[1], int(parts[2])):
                q = _query(query)
                code = int(q.get("status", "503"))
                await self._fixed(code, version, keep_alive, head_only, _retry_after(q))
            else:
                await self._fixed(200, version, keep_alive, head_only)
            return keep_alive
        if parts[:1] == ["bytes"] and len(parts) >= 2:
            await self._bytes(int(parts[1]), version, keep_alive, head_only)
            return keep_alive
        if parts[:1] == ["chunked"] and len(parts) >= 2:
            await self._chunked(chunked_payload(int(parts[1])), [], version, keep_alive, head_only)
            return keep_alive
        if parts[:1] == ["trailers"]:
            await self._chunked(
                [b"body-with-trailers\n"],
                [("x-trailer-a", "1"), ("x-trailer-b", "2")],
                version,
                keep_alive,
                head_only,
            )
            return keep_alive
        if parts[:1] == ["ws"] and (rec.header("upgrade") or "").lower() == "websocket":
            key = rec.header("sec-websocket-key") or ""
            self._write(
                "HTTP/1.1 101 Switching Protocols\r\n"
                f"x-upstream-id: {srv.upstream_id}\r\n"
                "upgrade: websocket\r\nconnection: Upgrade\r\n"
                f"sec-websocket-accept: {websocket_accept(key)}\r\n\r\n".encode()
            )
            self.ws_mode = True
            if self.ws_buf:
                buf, self.ws_buf = self.ws_buf, b""
                self._ws_data(buf)
            return True

        status = int(rec.header("x-test-status") or 200)
        body = json.dumps(
            {
                "method": rec.method,
                "path": rec.path,
                "http_version": version,
                "headers": rec.headers,
                "body_len": rec.body_len,
                "body_sha256": rec.sha256,
                "trailers": rec.trailers,
                "conn_id": rec.conn_id,
                "upstream_id": srv.upstream_id,
            }
        ).encode()
        await self._send_simple(status, body, "application/json", version, keep_alive, head_only)
        return keep_alive

    async def _fixed(
        self,
        status: int,
        version: str,
        keep_alive: bool,
        head_only: bool,
        extra: list[tuple[str, str]] | None = None,
    ) -> None:
        body = f"status {status} from {self.server.upstream_id}\n".encode()
        await self._send_simple(status, body, "text/plain", version, keep_alive, head_only, extra)

    async def _send_simple(
        self,
        status: int,
        body: bytes,
        ctype: str,
        version: str,
        keep_alive: bool,
        head_only: bool,
        extra: list[tuple[str, str]] | None = None,
    ) -> None:
        if status < 200 or status in (204, 304):
            # RFC 9112 section 6.3: these never have a body; 204 also has no Content-Length.
            hdrs = [] if status != 304 else [("etag", '"v1"')]
            self._write(self._head(status, hdrs, version, keep_alive))
            return
        hdrs = [("content-type", ctype), ("content-length", str(len(body)))]
        if extra:
            hdrs.extend(extra)
        self._write(self._head(status, hdrs, version, keep_alive) + (b"" if head_only else body))

    async def _bytes(self, n: int, version: str, keep_alive: bool, head_only: bool) -> None:
        hdrs = [("content-type", "application/octet-stream"), ("content-length", str(n))]
        self._write(self._head(200, hdrs, version, keep_alive))
        if head_only:
            return
        sent = 0
        while sent < n and not self.closed:
            take = min(len(_PATTERN), n - sent)
            # The pattern repeats every 256 bytes and blocks are 64 KiB, so every block
            # starts at pattern offset 0.
            self._write(_PATTERN[:take])
            sent += take
            await self._drain()

    async def _chunked(
        self,
        chunks: list[bytes],
        trailers: list[tuple[str, str]],
        version: str,
        keep_alive: bool,
        head_only: bool,
    ) -> None:
        if version == "1.0":
            # HTTP/1.0 has no chunked coding: send the body delimited by close instead.
            self._write(self._head(200, [("content-type", "text/plain")], version, False))
            if not head_only:
                self._write(b"".join(chunks))
            self._close()
            return
        hdrs = [("content-type", "text/plain"), ("transfer-encoding", "chunked")]
        if trailers:
            hdrs.append(("trailer", ", ".join(k for k, _ in trailers)))
        self._write(self._head(200, hdrs, version, keep_alive))
        if head_only:
            return
        for c in chunks:
            self._write(b"%x\r\n%s\r\n" % (len(c), c))
            await self._drain()
        tail = "".join(f"{k}: {v}\r\n" for k, v in trailers).encode()
        self._write(b"0\r\n" + tail + b"\r\n")

    # -- WebSocket echo (server side of RFC 6455, unfragmented frames only) --
    def _ws_data(self, data: bytes) -> None:
        self.ws_buf += data
        while True:
            frame = _ws_parse(self.ws_buf)
            if frame is None:
                # Bound: one frame of at most 16 MiB may be buffered while it arrives.
                if len(self.ws_buf) > 16 << 20:
                    self._close()
                return
            opcode, payload, used = frame
            self.ws_buf = self.ws_buf[used:]
            self._write(ws_frame(opcode, payload, mask=False))
            if opcode == 0x8:  # close: echo it and close
                self._close()
                return


def ws_frame(opcode: int, payload: bytes, mask: bool = True) -> bytes:
    """Encode one final WebSocket frame (clients must mask, servers must not)."""
    head = bytearray([0x80 | opcode])
    mbit = 0x80 if mask else 0
    n = len(payload)
    if n < 126:
        head.append(mbit | n)
    elif n < 1 << 16:
        head.append(mbit | 126)
        head += struct.pack("!H", n)
    else:
        head.append(mbit | 127)
        head += struct.pack("!Q", n)
    if not mask:
        return bytes(head) + payload
    key = b"\x1f\x2e\x3d\x4c"
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return bytes(head) + key + masked


def _ws_parse(buf: bytes) -> tuple[int, bytes, int] | None:
    """Parse one frame from ``buf``: ``(opcode, unmasked payload, bytes used)`` or None."""
    if len(buf) < 2:
        return None
    opcode = buf[0] & 0x0F
    masked = bool(buf[1] & 0x80)
    n = buf[1] & 0x7F
    pos = 2
    if n == 126:
        if len(buf) < 4:
            return None
        n = struct.unpack("!H", buf[2:4])[0]
        pos = 4
    elif n == 127:
        if len(buf) < 10:
            return None
        n = struct.unpack("!Q", buf[2:10])[0]
        pos = 10
    key = b""
    if masked:
        if len(buf) < pos + 4:
            return None
        key = buf[pos : pos + 4]
        pos += 4
    if len(buf) < pos + n:
        return None
    payload = buf[pos : pos + n]
    if masked:
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return opcode, payload, pos + n


def ws_read_frame(sock: socket.socket, buf: bytearray | None = None) -> tuple[int, bytes]:
    """Blocking read of one WebSocket frame from ``sock`` (client side): ``(opcode, payload)``.

    ``buf`` may carry bytes already read past an HTTP head; consumed bytes are removed from it.
    """
    data = buf if buf is not None else bytearray()
    while True:
        frame = _ws_parse(bytes(data))
        if frame is not None:
            opcode, payload, used = frame
            del data[:used]
            return opcode, payload
        more = sock.recv(65536)
        if not more:
            raise ConnectionError("connection closed before a whole WebSocket frame arrived")
        data += more


class _LoopThread:
    """An event loop running in a daemon thread; ``call(coro_fn)`` runs a coroutine on it."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()
        # Cancel stragglers (connection workers) so the loop closes cleanly.
        pending = asyncio.all_tasks(self.loop)
        for t in pending:
            t.cancel()
        if pending:
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.loop.close()

    def call(self, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
        fut = asyncio.run_coroutine_threadsafe(fn(), self.loop)
        return fut.result(timeout)

    def stop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class _ThreadedServer:
    """Start, stop and context management of a test server running on its own loop thread.
    Subclasses set ``host``, ``port`` and ``_active`` (connections with a ``transport``) and
    give the protocol factory and the thread's name."""

    host: str
    port: int
    _active: set[Any]
    _lt: _LoopThread | None
    _server: asyncio.Server | None
    _backlog = 100

    def _protocol(self) -> asyncio.Protocol:
        raise NotImplementedError

    def _thread_name(self) -> str:
        raise NotImplementedError

    def start(self) -> Any:
        self._lt = _LoopThread(self._thread_name())

        async def _start() -> asyncio.Server:
            loop = asyncio.get_running_loop()
            return await loop.create_server(self._protocol, self.host, self.port, backlog=self._backlog)

        self._server = self._lt.call(_start)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        if self._lt is None:
            return
        lt, self._lt = self._lt, None

        async def _stop() -> None:
            if self._server is not None:
                self._server.close()
            for c in list(self._active):
                if c.transport is not None:
                    c.transport.abort()

        with contextlib.suppress(Exception):
            lt.call(_stop)
        lt.stop()

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class TestUpstream(_ThreadedServer):
    """The scriptable HTTP/1.1 upstream; see the module docstring for the behaviours.

    ``port=0`` binds an ephemeral port (read ``.port`` after ``start()``). Thread-safe readers:
    ``requests`` (a snapshot list of :class:`RequestRecord`), ``connections_total``,
    ``connections_active``, ``connection_ids()``. ``hold(prefix)`` / ``release()`` keep answers
    back; ``close_connections()`` ends the open connections from the server side.
    """

    __test__ = False  # not a pytest test class despite the name

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        upstream_id: str = "upstream",
        always_status: int | None = None,
        garbage: bool = False,
    ) -> None:
        self.host = host
        self.port = port
        self.upstream_id = upstream_id
        self.always_status = always_status
        self.garbage = garbage
        # Ignore the x-test-delay-ms header (so one upstream of several can be the slow one).
        self.ignore_delay_header = False
        self._lock = threading.Lock()
        self._records: list[RequestRecord] = []
        self._conn_seq = 0
        self._active: set[_HttpConn] = set()
        self._fail_counts: dict[str, int] = {}
        self._record_cond = threading.Condition(self._lock)
        self._held: tuple[str, asyncio.Event] | None = None
        # Open connections, for connections_active / close_connections (stop() leaves them be,
        # as before: _active stays empty).
        self._open: set[_HttpConn] = set()
        self._lt: _LoopThread | None = None
        self._server: asyncio.Server | None = None

    # -- lifecycle (start / stop / with: _ThreadedServer) --
    _backlog = 512

    def _protocol(self) -> asyncio.Protocol:
        return _HttpConn(self)

    def _thread_name(self) -> str:
        return f"test-upstream-{self.upstream_id}"

    def __enter__(self) -> TestUpstream:
        return self.start()  # type: ignore[no-any-return]

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    # -- records --
    def _new_conn_id(self) -> int:
        with self._lock:
            self._conn_seq += 1
            return self._conn_seq

    def _conn_closed(self, conn: _HttpConn) -> None:
        with self._lock:
            self._active.discard(conn)
            self._open.discard(conn)

    def _add_record(self, rec: RequestRecord) -> None:
        with self._record_cond:
            self._records.append(rec)
            self._record_cond.notify_all()

    def _fail_n(self, key: str, n: int) -> bool:
        with self._lock:
            seen = self._fail_counts.get(key, 0)
            self._fail_counts[key] = seen + 1
            return seen < n

    @property
    def requests(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._records)

    @property
    def connections_total(self) -> int:
        with self._lock:
            return self._conn_seq

    def connection_ids(self) -> set[int]:
        """Distinct connection ids among the recorded requests."""
        return {r.conn_id for r in self.requests}

    @property
    def connections_active(self) -> int:
        with self._lock:
            return len(self._open)

    def hold(self, prefix: str) -> None:
        """Requests whose path starts with ``prefix`` get no answer until ``release()`` (they
        are recorded when they arrive)."""
        assert self._lt is not None

        async def _set() -> None:
            self._held = (prefix, asyncio.Event())

        self._lt.call(_set)

    def release(self) -> None:
        """Answer the held requests (and stop holding)."""
        assert self._lt is not None

        async def _release() -> None:
            held, self._held = self._held, None
            if held is not None:
                held[1].set()

        self._lt.call(_release)

    def close_connections(self) -> None:
        """Close every open connection from this side (between requests: a keep-alive peer
        sees its idle connection end)."""
        assert self._lt is not None

        async def _close() -> None:
            with self._lock:
                conns = list(self._open)
            for c in conns:
                if c.transport is not None:
                    c.transport.close()

        self._lt.call(_close)

    def clear(self) -> None:
        """Forget recorded requests and fail-n counters (connection ids keep counting)."""
        with self._lock:
            self._records.clear()
            self._fail_counts.clear()

    def wait_for_requests(self, n: int, timeout: float = 10.0) -> list[RequestRecord]:
        """Block until at least ``n`` requests were recorded (raises TimeoutError)."""
        with self._record_cond:
            if not self._record_cond.wait_for(lambda: len(self._records) >= n, timeout):
                raise TimeoutError(f"upstream {self.upstream_id}: {len(self._records)} of {n} requests")
            return list(self._records)


@dataclass
class RawRequest:
    """One request exactly as it reached :class:`RecordingUpstream`: the head bytes (request
    line and header lines, without the blank line) and the body after de-chunking."""

    conn_id: int
    head: bytes
    body: bytes = b""

    @property
    def request_line(self) -> bytes:
        return self.head.split(b"\r\n", 1)[0]

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        """Header lines split at the first colon; names lower-cased, values stripped."""
        out = []
        for line in self.head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            out.append((k.strip().lower(), v.strip()))
        return out

    def header(self, name: bytes) -> bytes | None:
        name = name.lower()
        return next((v for k, v in self.headers if k == name), None)


class _RecordingConn(asyncio.Protocol):
    """Byte-exact HTTP/1.1 framing (Content-Length or chunked); no header validation at all,
    so whatever a proxy forwards is recorded as sent."""

    def __init__(self, server: RecordingUpstream) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.conn_id = 0
        self.buf = bytearray()
        self.cur: RawRequest | None = None
        self.body = bytearray()
        self.left: int | None = None  # Content-Length bytes still due; None: chunked
        self.chunk: int | None = None  # bytes (with CRLF) of the current chunk still due
        self.in_trailers = False
        self.tunnel = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.conn_id = self.server._new_conn(self)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.server._on_raw(self.conn_id, data)
        if self.tunnel:
            self._tunnel_data(data)
            return
        self.buf += data
        while self._step():
            pass
        # Bound: 1 MiB of unparsed bytes and 1 MiB of body per request (bodies are kept whole
        # for the record; this upstream is for small probes, TestUpstream for big transfers).
        if len(self.buf) > 1 << 20 or len(self.body) > 1 << 20:
            self.transport.close()

    def _step(self) -> bool:
        assert self.transport is not None
        if self.cur is None:
            i = self.buf.find(b"\r\n\r\n")
            if i < 0:
                return False
            self.cur = RawRequest(self.conn_id, bytes(self.buf[:i]))
            del self.buf[: i + 4]
            self.body.clear()
            if self.cur.header(b"upgrade") is not None:
                # Everything after an upgrade head is tunnel payload: record and echo it raw.
                upg = self.cur.header(b"upgrade") or b""
                self.server._add(self.cur)
                self.cur = None
                self.tunnel = True
                self.transport.write(
                    b"HTTP/1.1 101 Switching Protocols\r\nupgrade: "
                    + upg
                    + b"\r\nconnection: upgrade\r\n\r\n"
                )
                if self.buf:
                    rest, self.buf = bytes(self.buf), bytearray()
                    self._tunnel_data(rest)
                return False
            te = (self.cur.header(b"transfer-encoding") or b"").lower()
            self.left = None if b"chunked" in te else int(self.cur.header(b"content-length") or 0)
            self.chunk, self.in_trailers = None, False
        if self.left is not None:
            take = min(self.left, len(self.buf))
            self.body += self.buf[:take]
            del self.buf[:take]
            self.left -= take
            if self.left:
                return False
        elif not self._chunked():
            return False
        req, self.cur = self.cur, None
        req.body = bytes(self.body)
        self.server._add(req)
        self.transport.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n%s"
            % (len(req.request_line), req.request_line)
        )
        return True

    def _chunked(self) -> bool:
        """Consume chunked body bytes; True once the last chunk and trailers are in."""
        while True:
            if self.in_trailers:
                if self.buf.startswith(b"\r\n"):
                    del self.buf[:2]
                    return True
                i = self.buf.find(b"\r\n\r\n")
                if i < 0:
                    return False
                del self.buf[: i + 4]
                return True
            if self.chunk is None:
                i = self.buf.find(b"\r\n")
                if i < 0:
                    return False
                size = int(bytes(self.buf[:i]).split(b";")[0].strip() or b"0", 16)
                del self.buf[: i + 2]
                if size == 0:
                    self.in_trailers = True
                    continue
                self.chunk = size + 2
            take = min(self.chunk, len(self.buf))
            self.body += self.buf[:take]
            del self.buf[:take]
            self.chunk -= take
            if self.chunk:
                return False
            del self.body[-2:]  # the CRLF after the chunk data
            self.chunk = None

    def _tunnel_data(self, data: bytes) -> None:
        assert self.transport is not None
        self.server._on_tunnel(self.conn_id, data)
        self.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._lost(self)


class RecordingUpstream(_ThreadedServer):
    """A raw HTTP/1.1 upstream that records what a proxy actually sends, byte for byte.

    It validates nothing: each request head is recorded as it arrived (:class:`RawRequest`,
    in ``requests``), and answered ``200`` with the request line as the body. A request with an
    ``Upgrade`` header is answered ``101`` at once and every later byte on that connection is
    tunnel payload: recorded in ``tunnel_bytes(conn_id)`` and echoed back. ``raw_bytes(conn_id)``
    is everything the connection received. ``connections_active`` counts open connections.
    """

    __test__ = False

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._requests: list[RawRequest] = []
        self._raw_by_conn: dict[int, bytearray] = {}
        self._tunnels: dict[int, bytearray] = {}
        self._active: set[_RecordingConn] = set()
        self._seq = 0
        self._lt: _LoopThread | None = None
        self._server: asyncio.Server | None = None

    def _protocol(self) -> asyncio.Protocol:
        return _RecordingConn(self)

    def _thread_name(self) -> str:
        return "recording-upstream"

    def __enter__(self) -> RecordingUpstream:
        return self.start()  # type: ignore[no-any-return]

    # -- called on the loop thread --
    def _new_conn(self, conn: _RecordingConn) -> int:
        with self._lock:
            self._active.add(conn)
            self._seq += 1
            return self._seq

    def _on_raw(self, conn_id: int, data: bytes) -> None:
        with self._cond:
            self._raw_by_conn.setdefault(conn_id, bytearray()).extend(data)
            self._cond.notify_all()

    def _on_tunnel(self, conn_id: int, data: bytes) -> None:
        with self._cond:
            self._tunnels.setdefault(conn_id, bytearray()).extend(data)
            self._cond.notify_all()

    def _add(self, req: RawRequest) -> None:
        with self._cond:
            self._requests.append(req)
            self._cond.notify_all()

    def _lost(self, conn: _RecordingConn) -> None:
        with self._lock:
            self._active.discard(conn)

    # -- readers (any thread) --
    @property
    def requests(self) -> list[RawRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def connections_active(self) -> int:
        with self._lock:
            return len(self._active)

    def raw_bytes(self, conn_id: int) -> bytes:
        with self._lock:
            return bytes(self._raw_by_conn.get(conn_id, b""))

    def tunnel_bytes(self, conn_id: int) -> bytes:
        with self._lock:
            return bytes(self._tunnels.get(conn_id, b""))

    def all_raw_bytes(self) -> bytes:
        """Every byte received on every connection, in connection order."""
        with self._lock:
            return b"".join(bytes(self._raw_by_conn[k]) for k in sorted(self._raw_by_conn))

    def wait_for(self, pred: Callable[[RecordingUpstream], bool], timeout: float = 10.0) -> bool:
        """Block until ``pred(self)`` holds (re-checked whenever bytes arrive); False on timeout."""
        deadline = time.monotonic() + timeout
        while not pred(self):
            if time.monotonic() > deadline:
                return False
            with self._cond:
                self._cond.wait(0.05)
        return True


class _EchoConn(asyncio.Protocol):
    """Echo with half-close: EOF from the client is echoed as EOF after the data."""

    def __init__(self, server: TcpEchoServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server._count()

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def pause_writing(self) -> None:
        # Backpressure: stop reading while the client is not reading our echo.
        assert self.transport is not None
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        assert self.transport is not None
        self.transport.resume_reading()

    def eof_received(self) -> bool:
        assert self.transport is not None
        if self.transport.can_write_eof():
            self.transport.write_eof()
        return True  # keep the transport open until our data has been flushed


class TcpEchoServer(_ThreadedServer):
    """A TCP echo server on its own loop thread (for tcp_proxy and ``proxy --to`` tests)."""

    __test__ = False

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.connections_total = 0
        self._lock = threading.Lock()
        self._lt: _LoopThread | None = None
        self._server: asyncio.Server | None = None
        self._active: set[Any] = set()  # (never filled: stop() leaves echoing connections be)

    def _count(self) -> None:
        with self._lock:
            self.connections_total += 1

    def _protocol(self) -> asyncio.Protocol:
        return _EchoConn(self)

    def _thread_name(self) -> str:
        return "tcp-echo"

    def __enter__(self) -> TcpEchoServer:
        return self.start()  # type: ignore[no-any-return]
