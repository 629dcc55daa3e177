"""Python cost of one proxied HTTP/2 request (h2c downstream, HTTP/1.1 upstream), without the
kernel: the counterpart of ``bench.micro_h1``.

The real connection manager, router, pool and codecs run on in-memory transports. The client is
a second codec of the same backend, driven in the same process; ``peer`` runs the same exchange
between two bare codecs, so ``proxy - peer`` is what moorline adds. Process CPU time, not wall
time. Run:

    python -m bench.micro_h2 [N] [grpc]   # MOORLINE_HTTP2_BACKEND=h2 for the reference backend

``grpc``: gRPC unary calls (HEADERS + DATA, answered HEADERS + DATA + trailers) with an HTTP/2
upstream, whose server side is a third bare codec in the same process.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bench.micro_h1 import CONFIG, RESPONSE, MemTransport
from moorline.config.loader import load_bootstrap
from moorline.net.conn_info import ConnInfo
from moorline.protocol import http2 as h2c
from moorline.protocol import http2_backends
from moorline.stream.http1_client import Http1ClientConnection, pool_for

REQUEST = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"127.0.0.1:10000"), (b":path", b"/")]
GRPC_REQUEST = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":authority", b"127.0.0.1:10000"),
    (b":path", b"/bench.Echo/Unary"),
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
]
GRPC_MESSAGE = b"\x00\x00\x00\x00\x0dhello, world\n"
GRPC_CONFIG = CONFIG.replace(
    """    type: STATIC
    load_assignment:""",
    """    type: STATIC
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {http2_protocol_options: {}}
    load_assignment:""",
)
BATCH = 10  # streams per client write, as h2load -m 10


def _server(config: str) -> tuple[Any, Any, Any]:
    """A new loop, a server on ``config``; returns (loop, the HCM config, cluster ``be``)."""
    import uvloop

    from moorline.server import Server

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    server = Server(load_bootstrap(yaml_text=config), "bench")
    cluster = server.cluster_manager.get("be")
    assert cluster is not None
    return loop, server.listeners[0].selector.chains[0].terminal, cluster


def _downstream(hcm: Any) -> tuple[Any, MemTransport, Any]:
    """An h2c downstream connection and its client codec, past the preface; then the GC is set
    up as the server does it (the setup's objects frozen)."""
    from moorline.stream.http2_server import Http2ServerConnection

    info = ConnInfo(("127.0.0.1", 10000), ("127.0.0.1", 40000), "l")
    down = Http2ServerConnection(hcm, info)
    down_t = MemTransport()
    down.connection_made(down_t)
    client = http2_backends.Codec(True, None)
    client.initiate()
    down.data_received(client.data_to_send())
    gc.collect()
    gc.freeze()
    gc.set_threshold(20000, 50, 100)
    return down, down_t, client


def _measure(loop: Any, one_round: Callable[[], Awaitable[int]], n: int, what: str) -> float:
    """Warm up (every exchange of 50 rounds must complete), then CPU microseconds per exchange."""

    async def measure() -> float:
        done = 0
        for _ in range(50):
            done += await one_round()
        assert done == 50 * BATCH, f"{done} of {50 * BATCH} {what} completed"
        t0 = time.process_time()
        for _ in range(n // BATCH):
            await one_round()
        return time.process_time() - t0

    dt = loop.run_until_complete(measure())
    loop.close()
    return dt / n * 1e6


def run(n: int) -> float:
    loop, hcm, cluster = _server(CONFIG)
    pool = pool_for(cluster.hosts[0], loop)
    ups = []
    for _ in range(BATCH):
        up = Http1ClientConnection(pool)
        up.connection_made(MemTransport())
        pool.total += 1
        cluster.stats.upstream_cx_active.value += 1
        pool.idle.append(up)
        ups.append(up)
    down, down_t, client = _downstream(hcm)

    async def one_round() -> int:
        """One batch through the proxy; returns the number of 200 responses that ended."""
        for _ in range(BATCH):
            client.send_headers(client.next_stream_id(), REQUEST, True)
        down.data_received(client.data_to_send())
        client.flushed()
        for up in ups:  # each pooled connection got one request
            up.data_received(RESPONSE)
        await asyncio.sleep(0)  # the glue's flush runs as a loop callback
        data = b"".join(down_t.out)
        down_t.out.clear()
        ok = 0
        for ev in client.receive(data):
            if ev[0] == h2c.DATA:
                if ev[3]:
                    client.ack(ev[1], ev[3])
                ok += ev[4]
            elif ev[0] == h2c.HEADERS and ev[2][0] != (b":status", b"200"):
                raise AssertionError(f"unexpected response {ev[2]}")
        out = client.data_to_send()
        client.flushed()
        if out:
            down.data_received(out)
        return ok

    return _measure(loop, one_round, n, "responses")


def run_grpc(n: int) -> float:
    """gRPC unary through the proxy, HTTP/2 on both sides; microseconds of CPU per call."""
    from moorline.stream.http2_client import Http2ClientConnection
    from moorline.stream.http2_client import pool_for as h2_pool_for

    loop, hcm, cluster = _server(GRPC_CONFIG)
    pool = h2_pool_for(cluster.hosts[0], loop)
    up = Http2ClientConnection(pool)
    up_t = MemTransport()
    up.connection_made(up_t)
    up.connected = True
    pool.conns.append(up)
    cluster.stats.upstream_cx_active.value += 1
    backend = http2_backends.Codec(False, None)
    backend.initiate()
    down, down_t, client = _downstream(hcm)

    def to_backend() -> None:
        data = b"".join(up_t.out)
        up_t.out.clear()
        if not data:
            return
        for ev in backend.receive(data):
            if ev[0] == h2c.DATA:
                if ev[3]:
                    backend.ack(ev[1], ev[3])
                if ev[4]:
                    sid = ev[1]
                    backend.send_headers(
                        sid, [(b":status", b"200"), (b"content-type", b"application/grpc")], False
                    )
                    backend.send_data(sid, GRPC_MESSAGE, False)
                    backend.send_trailers(sid, [(b"grpc-status", b"0")])
        out = backend.data_to_send()
        backend.flushed()
        if out:
            up.data_received(out)

    async def one_round() -> int:
        for _ in range(BATCH):
            sid = client.next_stream_id()
            client.send_headers(sid, GRPC_REQUEST, False)
            client.send_data(sid, GRPC_MESSAGE, True)
        down.data_received(client.data_to_send())
        client.flushed()
        await asyncio.sleep(0)  # the upstream write leaves after the downstream read
        to_backend()
        await asyncio.sleep(0)  # the downstream write leaves after the upstream read
        data = b"".join(down_t.out)
        down_t.out.clear()
        ok = 0
        for ev in client.receive(data):
            if ev[0] == h2c.DATA and ev[3]:
                client.ack(ev[1], ev[3])
            elif ev[0] == h2c.TRAILERS:
                ok += ev[2] == [(b"grpc-status", b"0")]
        out = client.data_to_send()
        client.flushed()
        if out:
            down.data_received(out)
        to_backend()
        return ok

    return _measure(loop, one_round, n, "calls")


def peer(n: int) -> float:
    """The same exchange between two bare codecs: the client's share of ``run``."""
    client = http2_backends.Codec(True, None)
    srv = http2_backends.Codec(False, None)
    client.initiate()
    srv.initiate()
    srv.receive(client.data_to_send())
    client.receive(srv.data_to_send())
    t0 = time.process_time()
    for _ in range(n // BATCH):
        sids = []
        for _ in range(BATCH):
            sid = client.next_stream_id()
            client.send_headers(sid, REQUEST, True)
            sids.append(sid)
        client.flushed()
        srv.flushed()
        for ev in srv.receive(client.data_to_send()):
            if ev[0] == h2c.HEADERS:
                srv.send_headers(ev[1], [(b":status", b"200"), (b"content-length", b"13")], False)
                srv.send_data(ev[1], b"hello, world\n", True)
        for ev in client.receive(srv.data_to_send()):
            if ev[0] == h2c.DATA and ev[3]:
                client.ack(ev[1], ev[3])
        srv.receive(client.data_to_send())
    return (time.process_time() - t0) / n * 1e6


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    if sys.argv[2:] == ["grpc"]:
        runs = sorted(run_grpc(n) for _ in range(3))
        print(
            f"{http2_backends.BACKEND}: python cost per proxied gRPC unary call: median {runs[1]:.1f} us "
            f"(min {runs[0]:.1f}, max {runs[2]:.1f}); the client and backend codecs are included"
        )
        return
    runs = sorted(run(n) for _ in range(3))
    p = sorted(peer(n) for _ in range(3))[1]
    print(
        f"{http2_backends.BACKEND}: python cost per proxied HTTP/2 request: median {runs[1]:.1f} us "
        f"(min {runs[0]:.1f}, max {runs[2]:.1f}); two bare codecs, one exchange: {p:.1f} us"
    )


if __name__ == "__main__":
    main()
