"""Two small x-protocol codecs and an upstream server speaking them, for testing the RPC proxy
without a real RPC protocol (registered nowhere: tests hand them to the proxy themselves).

Frame layout (both codecs; big-endian), ``HEAD`` = 18 bytes:

====== ===== ==========================================================
offset bytes field
====== ===== ==========================================================
0      2     magic: ``b"XM"`` (``MUX``, multiplexed) / ``b"XP"`` (``PINGPONG``)
2      1     kind (``FrameKind`` value)
3      1     status (responses; 0 = ok, 1 = busy: retriable, >= 2 errors)
4      4     request id
8      4     timeout in ms (requests; 0 = none)
12     2     header block length
14     4     body length
18     ...   headers (``key=value\\n`` lines, UTF-8), then the body
====== ===== ==========================================================

The routing keys are the ``service`` and ``method`` headers. Local replies carry
``STATUS_OF[reason]`` and the message as the body.

``serve(codec)`` starts an asyncio server answering requests by method: ``echo`` (default:
the body back, prefixed with ``<server name>:``), ``sleep`` (answers after ``float(body)``
seconds), ``busy`` (status 1), ``fail`` (status 2), ``close`` (closes the connection without
an answer), ``double`` (answers, and again 50 ms later), ``garbage`` (answers with bytes no codec frame starts with); every request frame
received is kept in ``RpcTestServer.received``.

``python -m moorline.testing.xcodecs <python> -m moorline run ...`` runs moorline in this process
with the test codecs added to the registered ones (``procs.start_moorline(wrap=...)``), for end
to end tests before a real protocol is registered.
"""

from __future__ import annotations

import asyncio
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from moorline.protocol.xprotocol.api import (
    MAX_FRAME,
    NEED_MORE,
    CodecError,
    FrameKind,
    FrameReader,
    Match,
    Reason,
)

HEAD = struct.Struct(">2sBBIIHI")
HEAD_LEN = HEAD.size  # 18
STATUS_OK = 0
STATUS_BUSY = 1
STATUS_FAIL = 2
STATUS_OF: dict[Reason, int] = {
    Reason.NO_ROUTE: 10,
    Reason.NO_HEALTHY_UPSTREAM: 11,
    Reason.OVERFLOW: 12,
    Reason.TIMEOUT: 13,
    Reason.CODEC_ERROR: 14,
    Reason.UPSTREAM_RESET: 15,
}


class TestFrame:
    __slots__ = ("_headers", "_hraw", "body", "kind", "raw", "request_id", "status", "timeout_ms")

    def __init__(self, raw: bytes) -> None:
        _, kind, status, rid, tmo, hlen, blen = HEAD.unpack_from(raw)
        self.raw = raw
        self.kind = FrameKind(kind)
        self.status = status
        self.request_id = rid
        self.timeout_ms = tmo
        self._hraw = raw[HEAD_LEN : HEAD_LEN + hlen]
        self.body: bytes = raw[HEAD_LEN + hlen : HEAD_LEN + hlen + blen]
        self._headers: dict[str, str] | None = None

    @property
    def headers(self) -> Mapping[str, str]:
        h = self._headers
        if h is None:
            h = {}
            for line in self._hraw.decode("utf-8", "replace").split("\n"):
                if line:
                    k, _, v = line.partition("=")
                    h[k] = v
            self._headers = h
        return h

    @property
    def service(self) -> str:
        return self.headers.get("service", "")

    @property
    def method(self) -> str:
        return self.headers.get("method", "")


def encode(
    magic: bytes,
    kind: FrameKind,
    request_id: int,
    headers: Mapping[str, str] | None = None,
    body: bytes = b"",
    status: int = 0,
    timeout_ms: int = 0,
) -> bytes:
    hraw = "".join(f"{k}={v}\n" for k, v in (headers or {}).items()).encode()
    return HEAD.pack(magic, int(kind), status, request_id, timeout_ms, len(hraw), len(body)) + hraw + body


class TestCodec:
    """Stateless; ``name`` ``xmux`` (multiplexed) or ``xpp`` (ping-pong)."""

    goaway = False

    def __init__(self, name: str, magic: bytes, multiplexed: bool, heartbeat: bool) -> None:
        self.name = name
        self.magic = magic
        self.multiplexed = multiplexed
        self.heartbeat = heartbeat

    def match(self, data: bytes) -> Match:
        n = min(len(data), 2)
        if data[:n] != self.magic[:n]:
            return Match.NO
        return Match.YES if n == 2 else Match.NEED_MORE

    def frame_length(self, buf: bytes | bytearray | memoryview) -> int:
        if len(buf) < 2:
            if bytes(buf[: len(buf)]) != self.magic[: len(buf)]:
                raise CodecError("bad magic")
            return NEED_MORE
        if bytes(buf[:2]) != self.magic:
            raise CodecError("bad magic")
        if len(buf) < HEAD_LEN:
            return NEED_MORE
        _, kind, _, _, _, hlen, blen = HEAD.unpack_from(buf)
        if kind < 1 or kind > 6:
            raise CodecError(f"bad frame kind {kind}")
        n = HEAD_LEN + hlen + blen
        if n > MAX_FRAME:
            raise CodecError("frame too large")
        return n

    def decode(self, raw: bytes) -> TestFrame:
        f = TestFrame(bytes(raw))
        if f.kind in (FrameKind.REQUEST, FrameKind.ONEWAY) and "bad" in f.headers:
            raise CodecError("bad request header")
        return f

    def with_request_id(self, frame: Any, request_id: int) -> bytes:
        raw = frame.raw
        return raw[:4] + struct.pack(">I", request_id) + raw[8:]

    def heartbeat_reply(self, frame: Any) -> bytes:
        return encode(self.magic, FrameKind.HEARTBEAT_RESPONSE, frame.request_id)

    def heartbeat_request(self, request_id: int) -> bytes:
        return encode(self.magic, FrameKind.HEARTBEAT, request_id)

    def local_reply(self, request: Any, reason: Reason, message: str) -> bytes:
        return encode(
            self.magic,
            FrameKind.RESPONSE,
            request.request_id,
            body=message.encode(),
            status=STATUS_OF[reason],
        )

    def is_success(self, response: Any) -> bool:
        return bool(response.status == STATUS_OK)

    def is_retriable(self, response: Any) -> bool:
        return bool(response.status == STATUS_BUSY)

    # helpers for tests
    def request(
        self,
        request_id: int,
        service: str = "svc",
        method: str = "echo",
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
        oneway: bool = False,
        timeout_ms: int = 0,
    ) -> bytes:
        h = {"service": service, "method": method, **(headers or {})}
        kind = FrameKind.ONEWAY if oneway else FrameKind.REQUEST
        return encode(self.magic, kind, request_id, h, body, timeout_ms=timeout_ms)

    def response(self, request_id: int, body: bytes = b"", status: int = 0) -> bytes:
        return encode(self.magic, FrameKind.RESPONSE, request_id, body=body, status=status)


MUX = TestCodec("xmux", b"XM", multiplexed=True, heartbeat=True)
PINGPONG = TestCodec("xpp", b"XP", multiplexed=False, heartbeat=False)
CODECS = (MUX, PINGPONG)


@dataclass
class RpcTestServer:
    server: asyncio.Server
    port: int
    name: str
    always: int | None = None  # answer every request with this status
    received: list[TestFrame] = field(default_factory=list)
    connections: int = 0
    reads: int = 0  # data_received calls (a coalesced write arrives in one)
    heartbeats: int = 0  # heartbeats received
    answer_heartbeats: bool = True
    transports: list[asyncio.Transport] = field(default_factory=list)

    def close(self) -> None:
        self.server.close()
        for t in self.transports:
            t.abort()


class _ServerProto(asyncio.Protocol):
    def __init__(self, srv: RpcTestServer, codec: TestCodec) -> None:
        self.srv = srv
        self.codec = codec
        self.reader = FrameReader(codec)
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.srv.connections += 1
        self.srv.transports.append(transport)

    def data_received(self, data: bytes) -> None:
        self.srv.reads += 1
        try:
            frames = self.reader.feed(data)
        except CodecError:
            self.transport.close()
            return
        for raw in frames:
            f = self.codec.decode(raw)
            if f.kind == FrameKind.HEARTBEAT:
                self.srv.heartbeats += 1
                if self.srv.answer_heartbeats:
                    self.transport.write(self.codec.heartbeat_reply(f))
                continue
            if f.kind not in (FrameKind.REQUEST, FrameKind.ONEWAY):
                continue
            self.srv.received.append(f)
            if f.kind == FrameKind.ONEWAY:
                continue
            self._answer(f)

    def _answer(self, f: TestFrame) -> None:
        m = f.method
        c = self.codec
        if self.srv.always is not None:
            self.transport.write(c.response(f.request_id, self.srv.name.encode(), self.srv.always))
        elif m == "close":
            self.transport.close()
        elif m == "double":  # a second answer 50 ms later (an upstream out of step)
            data = c.response(f.request_id, self.srv.name.encode() + b":double")
            self.transport.write(data)
            asyncio.get_running_loop().call_later(0.05, self._write, data)
        elif m == "garbage":
            self.transport.write(b"\xff" * 32)
        elif m == "tail_garbage":  # a good answer, then garbage in the same write
            self.transport.write(c.response(f.request_id, self.srv.name.encode() + b":ok") + b"\xff" * 32)
        elif m == "busy":
            self.transport.write(c.response(f.request_id, b"busy", STATUS_BUSY))
        elif m == "fail":
            self.transport.write(c.response(f.request_id, b"fail", STATUS_FAIL))
        elif m == "sleep":
            data = c.response(f.request_id, self.srv.name.encode() + b":slept")
            asyncio.get_running_loop().call_later(float(f.body or b"0"), self._write, data)
        else:
            self.transport.write(c.response(f.request_id, self.srv.name.encode() + b":" + bytes(f.body)))

    def _write(self, data: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(data)


async def serve(
    codec: TestCodec, name: str = "up", host: str = "127.0.0.1", port: int = 0, always: int | None = None
) -> RpcTestServer:
    """An upstream server for ``codec`` on ``host:port`` (0: any free port); ``always``: every
    request is answered with that status."""
    loop = asyncio.get_running_loop()
    holder: list[RpcTestServer] = []
    server = await loop.create_server(lambda: _ServerProto(holder[0], codec), host, port)
    srv = RpcTestServer(server, server.sockets[0].getsockname()[1], name, always)
    holder.append(srv)
    return srv


class RpcTestClient(asyncio.Protocol):
    """A downstream client: ``send(raw)``; decoded frames land in ``frames``."""

    def __init__(self, codec: TestCodec) -> None:
        self.codec = codec
        self.reader = FrameReader(codec)
        self.frames: list[TestFrame] = []
        self.transport: Any = None
        self.closed = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        for raw in self.reader.feed(data):
            self.frames.append(self.codec.decode(raw))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True

    def send(self, raw: bytes) -> None:
        self.transport.write(raw)

    def by_id(self, request_id: int) -> TestFrame | None:
        for f in self.frames:
            if f.request_id == request_id and f.kind == FrameKind.RESPONSE:
                return f
        return None


async def connect_client(codec: TestCodec, port: int, host: str = "127.0.0.1") -> RpcTestClient:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(lambda: RpcTestClient(codec), host, port)
    return proto


def _main(argv: list[str]) -> int:
    from moorline import cli
    from moorline.protocol import xprotocol

    registered = xprotocol.builtin_codecs

    def with_test_codecs() -> dict[str, Any]:
        out: dict[str, Any] = dict(registered())
        out.update((c.name, c) for c in CODECS)
        return out

    xprotocol.builtin_codecs = with_test_codecs  # type: ignore[assignment]
    return cli.main(argv[argv.index("moorline") + 1 :])


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))


# -- helpers for tests of the pools and the proxy ----------------------------------------------


def run(coro_fn: Any) -> Any:
    """Run ``coro_fn()`` to its end on a fresh uvloop loop."""
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
        return r.run(coro_fn())


async def until(pred: Any, timeout: float = 5.0) -> None:
    """Poll ``pred`` on the running loop; ``AssertionError`` after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.005)


def stat_value(store: Any, name: str) -> int:
    s = store.get(name)
    assert s is not None, name
    return int(s.value)


def static_cluster(store: Any, name: str, ports: list[int], **extra: Any) -> Any:
    """A compiled STATIC cluster over loopback ``ports`` (``procs.cluster``'s shape)."""
    import random

    from envoy.config.cluster.v3 import cluster_pb2
    from google.protobuf import json_format

    from moorline.net.upstream import UpstreamTransportFactory
    from moorline.testing.procs import cluster
    from moorline.upstream.cluster import compile_cluster

    return compile_cluster(
        json_format.ParseDict(cluster(name, list(ports), **extra), cluster_pb2.Cluster()),
        store,
        rng=random.Random(1),
        transport_factory=UpstreamTransportFactory(),
    )
