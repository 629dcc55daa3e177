"""The calibration floor: the least a Python HTTP/1.1 proxy can do per request.

``python -m bench.floor --listen 127.0.0.1:P --to 127.0.0.1:Q`` forwards HTTP/1.1 from P to Q on
uvloop + httptools, the same stack as moorline, with nothing else: no routing, no stats, no
request id, no filters, no timeouts, no access log. It is still a real forwarder, not a byte
pipe: it parses every request and every response with httptools, rebuilds each head from the
parsed fields and frames each body itself (Content-Length bodies pass through, chunked bodies
are re-chunked with their trailers), so it pays what any Python HTTP proxy must pay per message.
The harness runs it beside nginx and HAProxy in the HTTP/1.1 scenarios; ``moorline ÷ floor``
is the overhead moorline adds on top of its own stack (see bench/README.md).

The shape, and why:

* One upstream connection per downstream connection, opened when the client connects; the
  client's socket is not read until it is up. A pair shares fate: when either side closes, the
  other is closed. That removes the pool (and its bookkeeping) from the floor; it also means
  ``Connection: close`` costs the floor an upstream connect per request, which moorline's pool
  avoids.
* Because the two connections are paired one to one, hop-by-hop semantics coincide on both
  hops, so header lines (``Connection`` included) and the HTTP version are forwarded as parsed.
* One ``transport.write`` per direction per read: what one ``data_received`` produces (a whole
  small request or response: head and body) is joined and written once.
* Backpressure: a side whose write buffer is over its high-water mark pauses reading on the
  other side.
* One request in flight per pair. Pipelined requests wait, each joined into one piece, until the
  answer before them is complete, and the client's socket is not read while any wait (so what
  waits is at most one read). This is what lets the floor frame answers to HEAD: httptools
  cannot be told that such an answer has no body, so its head is cut at the first CRLFCRLF, fed
  alone, and the parser is replaced (as ``moorline.protocol.http1`` does), which needs the
  answer to HEAD to be the only one on the wire. 1xx answers are forwarded and do not end the
  request.
* Not supported (answered 501, or the pair is closed): upgrades (WebSocket, CONNECT), and
  anything else a sidecar would need but a calibration does not.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import signal
import sys
from typing import Any, cast

import httptools

BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
BAD_GATEWAY = b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
NOT_IMPLEMENTED = b"HTTP/1.1 501 Not Implemented\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
LAST_CHUNK = b"0\r\n"
CRLF = b"\r\n"
# Bound on the bytes held while looking for the end of an answer to HEAD (httptools holds heads
# itself otherwise): llhttp's own default header limit is of this order.
MAX_HEAD = 80 * 1024


class Downstream(asyncio.Protocol):
    """The client side of a pair: parses requests, writes them to the upstream connection."""

    __slots__ = (
        "chunked",
        "closed",
        "connecting",
        "cur",
        "early",
        "h",
        "loop",
        "out",
        "parser",
        "queue",
        "t",
        "target",
        "up",
        "up_full",
        "url",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, target: tuple[str, int]) -> None:
        self.loop = loop
        self.target = target
        self.t: asyncio.Transport | None = None
        self.up = Upstream(self)
        self.parser = httptools.HttpRequestParser(self)
        self.out: list[bytes] = []  # pieces for the upstream, written once per read
        # Requests parsed while another is in flight: [pieces, (is HEAD, keep-alive) or None
        # while the head is incomplete]. Bounded: reading is paused while it is not empty.
        self.queue: collections.deque[list[Any]] = collections.deque()
        self.cur = self.out  # where the request being parsed goes: ``out`` or its queue entry
        self.url = b""
        self.h: list[bytes] = []
        self.chunked = False
        self.closed = False
        self.up_full = False  # the upstream's write buffer is over its high-water mark
        self.connecting: asyncio.Task[None] | None = None
        self.early = b""  # bytes read before the upstream connection was up (one read at most)

    # -- transport events -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not derive from asyncio's classes: cast, do not isinstance.
        self.t = transport = cast(asyncio.Transport, transport)
        transport.pause_reading()  # until the upstream connection is up
        # One task per connection (never per request): the connect is the only await here.
        self.connecting = self.loop.create_task(self._connect())

    async def _connect(self) -> None:
        try:
            await self.loop.create_connection(lambda: self.up, *self.target)
        except OSError:
            self.connecting = None
            if not self.closed and self.t is not None:
                self.t.write(BAD_GATEWAY)
                self.close()

    def data_received(self, data: bytes) -> None:
        if self.up.t is None:
            # uvloop starts reading after connection_made, so one read can arrive before the
            # upstream connection is up; reading stays paused, so it is the only one.
            self.early += data
            cast(asyncio.Transport, self.t).pause_reading()
            return
        refusal = None
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            refusal = NOT_IMPLEMENTED
        except httptools.HttpParserError:
            refusal = BAD_REQUEST
        out = self.out
        if out:
            self.up.t.write(b"".join(out))
            out.clear()
        if refusal is not None:
            self._refuse(refusal)

    def _refuse(self, answer: bytes) -> None:
        # Only a client with nothing in flight can be told why; otherwise its answers would be
        # out of order, so it just loses the connection.
        if not self.up.fifo and self.up.idle and not self.queue and self.t is not None:
            self.t.write(answer)
        self.close()

    def update_reading(self) -> None:
        """Read the client only while the upstream takes bytes and no request waits."""
        t = self.t
        if t is None or self.closed:
            return
        if self.up_full or self.queue:
            t.pause_reading()
        else:
            t.resume_reading()

    def release(self) -> None:
        """The answer in flight is complete: send the next waiting request, if any."""
        pieces, meta = self.queue.popleft()
        up = self.up
        cast(asyncio.Transport, up.t).write(b"".join(pieces))
        pieces.clear()
        if self.cur is pieces:
            self.cur = self.out  # still being parsed: the rest of it goes straight out
        if meta is not None:
            up.fifo.append(meta)
        self.update_reading()

    def pause_writing(self) -> None:
        if self.up.t is not None:
            self.up.t.pause_reading()

    def resume_writing(self) -> None:
        if self.up.t is not None:
            self.up.t.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.t is not None:
            self.t.close()  # flushes what is already written
        if self.up.t is not None:
            self.up.t.close()

    # -- httptools callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.url = b""
        self.h = []
        self.chunked = False
        up = self.up
        if up.fifo or not up.idle or self.queue:
            entry: list[Any] = [[], None]
            self.queue.append(entry)
            self.cur = entry[0]
            self.update_reading()
        else:
            self.cur = self.out

    def on_url(self, url: bytes) -> None:
        self.url += url  # llhttp may deliver the URL in pieces

    def on_header(self, name: bytes, value: bytes) -> None:
        # After the head, the same list collects the trailers (see on_headers_complete).
        self.h += (name, b": ", value, CRLF)

    def on_headers_complete(self) -> None:
        p = self.parser
        if p.should_upgrade():
            return  # refused once feed_data raises HttpParserUpgrade
        out = self.cur
        out.append(b"%s %s HTTP/%s\r\n" % (p.get_method(), self.url, p.get_http_version().encode()))
        out += self.h
        out.append(CRLF)
        self.h = []
        meta = (p.get_method() == b"HEAD", p.should_keep_alive())
        if out is self.out:
            self.up.fifo.append(meta)
        else:
            self.queue[-1][1] = meta

    def on_chunk_header(self) -> None:
        self.chunked = True

    def on_body(self, body: bytes) -> None:
        if self.chunked:
            self.cur += (b"%x\r\n" % len(body), body, CRLF)
        else:
            self.cur.append(body)

    def on_message_complete(self) -> None:
        if self.chunked:
            out = self.cur
            out.append(LAST_CHUNK)
            out += self.h
            out.append(CRLF)


class Upstream(asyncio.Protocol):
    """The server side of a pair: parses responses, writes them to the client."""

    __slots__ = ("chunked", "done", "down", "fifo", "h", "hbuf", "idle", "out", "parser", "reason", "t")

    def __init__(self, down: Downstream) -> None:
        self.down = down
        self.t: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.out: list[bytes] = []
        self.reason = b""
        self.h: list[bytes] = []
        self.chunked = False
        # (request was HEAD, request allows keep-alive) per request still awaiting its answer.
        self.fifo: collections.deque[tuple[bool, bool]] = collections.deque()
        self.idle = True  # between responses
        self.hbuf = b""  # start of an answer to HEAD, until its CRLFCRLF arrives
        self.done = False  # the answer just completed ends the pair

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport = cast(asyncio.Transport, transport)
        if self.down.closed:
            transport.close()
            return
        down = self.down
        down.update_reading()
        if down.early:
            early, down.early = down.early, b""
            down.data_received(early)

    def data_received(self, data: bytes) -> None:
        broken = False
        try:
            if self.idle and self.fifo and self.fifo[0][0]:
                rest = self._head_answers(data)
                if rest:
                    self.parser.feed_data(rest)
            else:
                self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            # An unsolicited answer (empty FIFO) fails in a callback and lands here too.
            broken = True
        out = self.out
        if out:
            dt = self.down.t
            assert dt is not None
            dt.write(b"".join(out))
            out.clear()
        if broken:
            self._broken()
        elif self.done:
            self.down.close()

    def _head_answers(self, data: bytes) -> bytes:
        """Consume answers to HEAD at the front of ``data``; return what follows them."""
        while self.idle and self.fifo and self.fifo[0][0] and not self.done:
            buf = self.hbuf + data if self.hbuf else data
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    raise httptools.HttpParserError("head of an answer to HEAD too large")
                self.hbuf = buf
                return b""
            self.hbuf = b""
            head, data = buf[: end + 4], buf[end + 4 :]
            self.parser.feed_data(head)
            if not self.idle:
                # The final answer: llhttp now waits for a body that never comes.
                self.on_message_complete()
                self.parser = httptools.HttpResponseParser(self)
        return b"" if self.done else data

    def _broken(self) -> None:
        # 502 only where no byte of the answer has been forwarded yet.
        if self.idle and self.fifo and self.down.t is not None:
            self.down.t.write(BAD_GATEWAY)
        self.down.close()

    def pause_writing(self) -> None:
        self.down.up_full = True
        self.down.update_reading()

    def resume_writing(self) -> None:
        self.down.up_full = False
        self.down.update_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        # A response read to EOF ends here too: what was forwarded is complete, and closing the
        # client's connection tells it so.
        if not self.down.closed:
            self._broken()

    # -- httptools callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.idle = False
        self.reason = b""
        self.h = []
        self.chunked = False

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.h += (name, b": ", value, CRLF)

    def on_headers_complete(self) -> None:
        p = self.parser
        out = self.out
        out.append(b"HTTP/%s %d %s\r\n" % (p.get_http_version().encode(), p.get_status_code(), self.reason))
        out += self.h
        out.append(CRLF)
        self.h = []

    def on_chunk_header(self) -> None:
        self.chunked = True

    def on_body(self, body: bytes) -> None:
        if self.chunked:
            self.out += (b"%x\r\n" % len(body), body, CRLF)
        else:
            self.out.append(body)

    def on_message_complete(self) -> None:
        out = self.out
        if self.chunked:
            out.append(LAST_CHUNK)
            out += self.h
            out.append(CRLF)
        self.idle = True
        p = self.parser
        if p.get_status_code() < 200:
            return  # 1xx: the final answer to the same request follows
        _, keep_alive = self.fifo.popleft()
        if not (keep_alive and p.should_keep_alive()):
            self.done = True
        elif self.down.queue:
            self.down.release()


def _hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.splitlines()[0])
    ap.add_argument("--listen", type=_hostport, required=True, metavar="HOST:PORT")
    ap.add_argument("--to", type=_hostport, required=True, metavar="HOST:PORT")
    ap.add_argument("--backlog", type=int, default=4096)
    args = ap.parse_args(argv)

    import uvloop

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    target: tuple[str, int] = args.to
    try:
        server = loop.run_until_complete(
            loop.create_server(
                lambda: Downstream(loop, target),
                args.listen[0],
                args.listen[1],
                backlog=args.backlog,
                reuse_address=True,
            )
        )
    except OSError as exc:
        print(f"bench.floor: cannot listen on {args.listen[0]}:{args.listen[1]}: {exc}", file=sys.stderr)
        return 1
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, loop.stop)
    try:
        loop.run_forever()
    finally:
        server.close()
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
