"""moorline.net.tls.StreamRelay with a TLS downstream (HalfCloseTls), in process on loopback:
what happens to the downstream socket when the relay ends during the downstream handshake."""

from __future__ import annotations

import asyncio
import socket
import struct
import sys
from pathlib import Path
from typing import Any

import uvloop
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2

sys.path.insert(0, str(Path(__file__).parent))
from test_tls_certs import Pki

from moorline.config.context import BuildContext
from moorline.config.loader import parse_message
from moorline.net.conn_info import ConnInfo
from moorline.net.tls import StreamRelay, compile_downstream
from moorline.observability.stats import Store

PORT = 42731


def _tls(tmp_path: Path) -> Any:
    pki = Pki(tmp_path)
    cert, key = pki.issue("srv", "srv", ["DNS:srv.example.com"])
    proto = parse_message(
        {
            "common_tls_context": {
                "tls_certificates": [
                    {"certificate_chain": {"filename": str(cert)}, "private_key": {"filename": str(key)}}
                ]
            }
        },
        tls_pb2.DownstreamTlsContext,
    )
    return compile_downstream(proto, BuildContext(stats=Store()), "tls")


def _pair(lsock: socket.socket) -> tuple[socket.socket, socket.socket]:
    c = socket.create_connection(("127.0.0.1", PORT))
    s, _ = lsock.accept()
    s.setblocking(False)
    return c, s


def test_upstream_reset_during_the_downstream_handshake_closes_the_downstream_transport(
    tmp_path: Path,
) -> None:
    # The upstream resets while the client has not finished its TLS handshake: the relay must
    # end through the handshake's own plain transport (it owns the socket), not close the socket
    # under it and leave that transport (and its handshake timer) running on a stale fd.
    tls = _tls(tmp_path)
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", PORT))
    lsock.listen(4)
    client, down = _pair(lsock)
    up_peer, up = _pair(lsock)

    async def main() -> tuple[Any, Any]:
        loop = asyncio.get_running_loop()
        closed = loop.create_future()
        relay = StreamRelay(
            loop,
            down,
            up,
            down_tls=tls,
            up_tls=None,
            up_host=None,
            info=ConnInfo(down.getsockname(), down.getpeername(), "l"),
            buffer_limit=65536,
            idle_timeout=None,
            on_close=lambda a, b: closed.set_result((a, b)),
        )
        while relay.up.transport is None or relay._down_htls is None or relay._down_htls.raw is None:
            await asyncio.sleep(0.01)
        up_peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        up_peer.close()  # RST
        await asyncio.wait_for(closed, 10)
        htls = relay._down_htls
        raw_closing = htls.raw.is_closing()
        await asyncio.sleep(0)
        return relay, raw_closing

    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
            relay, raw_closing = r.run(main())
        assert relay.closed and relay.close_reason == "reset"
        assert raw_closing, "the handshake's transport still runs on a socket the relay closed"
        assert tls.stats.connection_error.value <= 1
    finally:
        client.close()
        lsock.close()
