"""The gRPC backend of ``grpc-unary`` and its check client, run as children of the harness.

``python -m bench.grpc_backend serve``: a grpcio (asyncio) server on 127.0.0.1, an ephemeral
port, with one generic method ``/bench.Echo/Unary`` that echoes the request bytes (identity
serializers: no protobuf, no code generation). Prints ``READY port=<n>`` on stdout, then serves
until stdin closes or it gets SIGTERM.

``python -m bench.grpc_backend check <port>``: one unary call through a proxy; exits 0 if the
echo came back intact, 1 with the status on stderr otherwise. A child process, not a call in the
harness, so grpcio's threads never live in the process that forks the load generators.

``python -m bench.grpc_backend check-stream <port>``: one server-streaming call to
``/bench.Echo/Stream`` (the grpc-stream scenario's backend, ``bench/grpc_stream_server.js``)
through a proxy; exits 0 if exactly ``STREAM_MESSAGES`` messages of ``STREAM_MESSAGE_SIZE``
bytes came back and the call ended with status OK.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import Any

import grpc
from grpc import aio

SERVICE = "bench.Echo"
METHOD = "Unary"
PAYLOAD = b"hello, world\n"
STREAM_METHOD = "Stream"
STREAM_MESSAGES = 1000
STREAM_MESSAGE_SIZE = 1024


def _ident(b: bytes) -> bytes:
    return b


async def _echo(request: bytes, context: Any) -> bytes:
    return request


async def serve() -> None:
    server = aio.server(options=[("grpc.so_reuseport", 0)])
    handler = grpc.method_handlers_generic_handler(
        SERVICE, {METHOD: grpc.unary_unary_rpc_method_handler(_echo, _ident, _ident)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"READY port={port}", flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    # Closing stdin (the harness going away) stops the server too.
    fd = sys.stdin.fileno()
    loop.add_reader(fd, lambda: stop.set() if not os.read(fd, 4096) else None)
    await stop.wait()
    await server.stop(0)


def check(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.unary_unary(f"/{SERVICE}/{METHOD}", request_serializer=_ident, response_deserializer=_ident)
        try:
            got = call(PAYLOAD, timeout=10)
        except grpc.RpcError as exc:
            print(f"gRPC call failed: {exc.code()} {exc.details()}", file=sys.stderr)
            return 1
    if got != PAYLOAD:
        print(f"gRPC echo answered {got[:80]!r}", file=sys.stderr)
        return 1
    return 0


def check_stream(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.unary_stream(
            f"/{SERVICE}/{STREAM_METHOD}", request_serializer=_ident, response_deserializer=_ident
        )
        sizes: list[int] = []
        try:
            for msg in call(b"", timeout=20):
                sizes.append(len(msg))
        except grpc.RpcError as exc:
            print(
                f"gRPC stream failed after {len(sizes)} messages: {exc.code()} {exc.details()}",
                file=sys.stderr,
            )
            return 1
    if len(sizes) != STREAM_MESSAGES or set(sizes) != {STREAM_MESSAGE_SIZE}:
        print(f"gRPC stream: {len(sizes)} messages of sizes {sorted(set(sizes))[:5]}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["serve"]:
        asyncio.run(serve())
        return 0
    if len(argv) == 2 and argv[0] == "check":
        return check(int(argv[1]))
    if len(argv) == 2 and argv[0] == "check-stream":
        return check_stream(int(argv[1]))
    print("usage: python -m bench.grpc_backend serve | check <port> | check-stream <port>", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
