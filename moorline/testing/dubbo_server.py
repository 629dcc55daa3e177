"""A Dubbo test server (Hessian2), on its own asyncio loop thread like ``upstream.py``'s servers.

    srv = DubboTestServer(server_id="a").start()
    ... DubboClient("com.example.Echo", "", host=f"127.0.0.1:{srv.port}").call("echo", ["hi"])
    srv.delay = 2.0       # every answer waits 2 s (call_later, no task per request)
    srv.die = True        # the next request closes its connection unanswered (RST)
    srv.reply_with = (Reason.TIMEOUT, "msg")   # answer with the codec's local reply instead
    srv.stop()

Methods, any service: ``echo`` returns its first argument (``null`` without one), ``whoami``
the ``server_id``, ``attachments`` the request's attachments (string values) as a map,
``fail`` a response with status 70 SERVICE_ERROR and the first argument as the error text,
``sleep`` answers after its first argument in milliseconds. Heartbeats are answered; one-way
requests are recorded and not answered. It uses the moorline codec (``FrameReader`` frames,
``DubboFrame`` routing fields) and reads the arguments with ``hessian2.Hessian2Reader``.

Records (at most ``MAX_RECORDED``): ``requests`` (``DubboCall``: service, method, version,
args, attachments, request id, connection id), ``heartbeats``, ``connections_total``.
Bound: one connection holds at most one incomplete frame (``FrameReader``, ``MAX_FRAME``); bad
bytes close the connection.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from dataclasses import dataclass
from typing import Any

from moorline.protocol.xprotocol import dubbo
from moorline.protocol.xprotocol.api import CodecError, FrameKind, FrameReader, Reason
from moorline.protocol.xprotocol.hessian2 import Hessian2Reader, Hessian2Writer, encode
from moorline.testing.upstream import _LoopThread, _ThreadedServer

MAX_RECORDED = 10000

# Dubbo's response body flags (the first value of a Hessian2 response body).
RESPONSE_WITH_EXCEPTION = 0
RESPONSE_VALUE = 1
RESPONSE_NULL_VALUE = 2


@dataclass
class DubboCall:
    service: str
    method: str
    version: str
    args: list[Any]
    attachments: dict[str, str]
    request_id: int
    conn_id: int
    oneway: bool = False


def value_body(value: Any) -> bytes:
    """A successful Hessian2 response body carrying ``value``."""
    if value is None:
        return encode(RESPONSE_NULL_VALUE)
    return Hessian2Writer().write(RESPONSE_VALUE).write(value).getvalue()


class _Conn(asyncio.Protocol):
    def __init__(self, server: DubboTestServer, conn_id: int) -> None:
        self.server = server
        self.conn_id = conn_id
        self.transport: asyncio.Transport | None = None
        self.reader = FrameReader(dubbo.CODEC)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server._active.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._active.discard(self)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.reader.feed(data)
            for raw in frames:
                self._frame(dubbo.CODEC.decode(raw))
        except CodecError:
            if self.transport is not None:
                self.transport.close()

    def _frame(self, frame: dubbo.DubboFrame) -> None:
        srv = self.server
        if self.transport is None or self.transport.is_closing():
            return  # e.g. reset by ``die`` earlier in the same read
        if frame.kind == FrameKind.HEARTBEAT:
            srv._record_heartbeat(frame.request_id)
            self.transport.write(dubbo.CODEC.heartbeat_reply(frame))
            return
        if frame.kind not in (FrameKind.REQUEST, FrameKind.ONEWAY):
            return
        args: list[Any] = []
        if frame.args_at:
            r = Hessian2Reader(frame.raw, frame.args_at)
            args = [r.read() for _ in range(dubbo._count_params(frame.param_types))]
        attachments = {k: v for k, v in frame.headers.items() if k not in ("service", "method", "dubbo")}
        oneway = frame.kind == FrameKind.ONEWAY
        srv._record(
            DubboCall(
                frame.service,
                frame.method,
                frame.version,
                args,
                attachments,
                frame.request_id,
                self.conn_id,
                oneway,
            )
        )
        if srv.die:
            srv.die = False
            self._reset()
            return
        if oneway:
            return
        out = self._answer(frame, args, attachments)
        delay = srv.delay
        if frame.method == "sleep" and args and isinstance(args[0], int):
            delay += args[0] / 1000.0
        if delay > 0:
            asyncio.get_running_loop().call_later(delay, self._write, out)
        else:
            self._write(out)

    def _answer(self, frame: dubbo.DubboFrame, args: list[Any], attachments: dict[str, str]) -> bytes:
        srv = self.server
        if srv.reply_with is not None:
            reason, msg = srv.reply_with
            return dubbo.CODEC.local_reply(frame, reason, msg)
        rid = frame.request_id
        m = frame.method
        if m == "whoami":
            return dubbo.response(rid, dubbo.OK, value_body(srv.server_id))
        if m == "attachments":
            return dubbo.response(rid, dubbo.OK, value_body(attachments))
        if m == "fail":
            return dubbo.response(rid, dubbo.SERVICE_ERROR, encode(str(args[0]) if args else "failed"))
        return dubbo.response(rid, dubbo.OK, value_body(args[0] if args and m == "echo" else None))

    def _write(self, out: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)

    def _reset(self) -> None:
        t = self.transport
        if t is None:
            return
        sock = t.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        t.abort()


class DubboTestServer(_ThreadedServer):
    """See the module docstring."""

    __test__ = False

    def __init__(self, host: str = "127.0.0.1", port: int = 0, server_id: str = "dubbo") -> None:
        self.host = host
        self.port = port
        self.server_id = server_id
        self.delay = 0.0
        self.die = False
        self.reply_with: tuple[Reason, str] | None = None
        self.requests: list[DubboCall] = []
        self.heartbeats: list[int] = []
        self.connections_total = 0
        self._lock = threading.Lock()
        self._lt: _LoopThread | None = None
        self._server: asyncio.Server | None = None
        self._active: set[Any] = set()

    def _protocol(self) -> asyncio.Protocol:
        with self._lock:
            self.connections_total += 1
            n = self.connections_total
        return _Conn(self, n)

    def _thread_name(self) -> str:
        return f"dubbo-{self.server_id}"

    def _record(self, call: DubboCall) -> None:
        with self._lock:
            if len(self.requests) < MAX_RECORDED:
                self.requests.append(call)

    def _record_heartbeat(self, request_id: int) -> None:
        with self._lock:
            if len(self.heartbeats) < MAX_RECORDED:
                self.heartbeats.append(request_id)

    @property
    def connections_active(self) -> int:
        return len(self._active)

    def kill_connections(self) -> None:
        """Reset every open connection now (the server keeps listening)."""
        if self._lt is None:
            return

        async def _kill() -> None:
            for c in list(self._active):
                c._reset()

        self._lt.call(_kill)

    def __enter__(self) -> DubboTestServer:
        return self.start()  # type: ignore[no-any-return]
