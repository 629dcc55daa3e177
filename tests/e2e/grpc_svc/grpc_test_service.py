"""A tiny gRPC service for end-to-end tests, built without code generation: grpcio generic
handlers with raw-bytes (identity) serializers. Run in-process on a thread pool.

Methods (service ``moorline.test.Svc``):
- ``Unary``: echoes the request; ``b"status:<code>"`` aborts with that status; ``b"sleep:<ms>"``
  sleeps first (then echoes); ``b"flaky:<key>:<n>"`` answers UNAVAILABLE for the first ``n``
  calls with that key (trailers-only), then echoes.
- ``ClientStream``: answers ``b"<count>:<total bytes>"``.
- ``ServerStream``: request ``b"<n>:<size>"`` -> ``n`` messages of ``size`` bytes.
- ``Bidi``: echoes each message as it arrives.
- ``Hang``: never answers; records in ``cancelled`` when the call is cancelled.
"""

from __future__ import annotations

import threading
import time
from concurrent import futures
from typing import Any

import grpc

SERVICE = "moorline.test.Svc"
MAX_MSG = 8 * 1024 * 1024
OPTIONS = [
    ("grpc.max_send_message_length", MAX_MSG),
    ("grpc.max_receive_message_length", MAX_MSG),
]


def _ident(b: bytes) -> bytes:
    return b


class TestGrpcServer:
    __test__ = False  # not a pytest test class

    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self.hang_started = threading.Event()
        self.calls: dict[str, int] = {}
        self.lock = threading.Lock()
        self.server: Any = None
        self.port = 0

    # -- handlers
    def unary(self, req: bytes, ctx: Any) -> bytes:
        if req.startswith(b"status:"):
            ctx.abort(_code(int(req[7:])), "requested status")
        if req.startswith(b"sleep:"):
            time.sleep(int(req[6:]) / 1000)
        if req.startswith(b"flaky:"):
            _, key, n = req.split(b":")
            with self.lock:
                c = self.calls[key.decode()] = self.calls.get(key.decode(), 0) + 1
            if c <= int(n):
                ctx.abort(grpc.StatusCode.UNAVAILABLE, "flaky")
        return req

    def client_stream(self, it: Any, ctx: Any) -> bytes:
        count = total = 0
        for m in it:
            count += 1
            total += len(m)
        return b"%d:%d" % (count, total)

    def server_stream(self, req: bytes, ctx: Any) -> Any:
        n, size = (int(x) for x in req.split(b":"))
        for i in range(n):
            yield bytes([i % 256]) * size

    def bidi(self, it: Any, ctx: Any) -> Any:
        yield from it

    def hang(self, req: bytes, ctx: Any) -> bytes:
        self.hang_started.set()
        ctx.add_callback(self.cancelled.set)
        deadline = time.monotonic() + 20
        while ctx.is_active() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not ctx.is_active():
            self.cancelled.set()
        return b""

    def start(self) -> TestGrpcServer:
        h = {
            "Unary": grpc.unary_unary_rpc_method_handler(self.unary, _ident, _ident),
            "ClientStream": grpc.stream_unary_rpc_method_handler(self.client_stream, _ident, _ident),
            "ServerStream": grpc.unary_stream_rpc_method_handler(self.server_stream, _ident, _ident),
            "Bidi": grpc.stream_stream_rpc_method_handler(self.bidi, _ident, _ident),
            "Hang": grpc.unary_unary_rpc_method_handler(self.hang, _ident, _ident),
        }
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=OPTIONS)
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, h),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(0)


def _code(n: int) -> grpc.StatusCode:
    for c in grpc.StatusCode:
        if c.value[0] == n:
            return c
    raise ValueError(n)


def channel(port: int) -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS)


def method(ch: grpc.Channel, name: str, kind: str) -> Any:
    path = f"/{SERVICE}/{name}"
    f = {
        "uu": ch.unary_unary,
        "su": ch.stream_unary,
        "us": ch.unary_stream,
        "ss": ch.stream_stream,
    }[kind]
    return f(path, request_serializer=_ident, response_deserializer=_ident)
