"""Upstream connections from net/: plain sockets for tcp_proxy, and the transport factory that
compiles clusters' transport sockets (so upstream/ never imports net/)."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import socket
from pathlib import Path
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2

from moorline.config.errors import ConfigError
from moorline.config.loader import parse_message
from moorline.net.secrets import SecretsManager
from moorline.net.tls import UpstreamTls
from moorline.net.upstream import TransportError, UpstreamTransportFactory, connect, connect_socket
from moorline.observability.stats import Store
from moorline.testing.procs import cluster, free_port
from moorline.upstream.cluster import compile_cluster
from moorline.upstream.manager import ClusterManager

_spec = importlib.util.spec_from_file_location("tls_certs", Path(__file__).parent / "test_tls_certs.py")
assert _spec is not None and _spec.loader is not None
_certs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_certs)
Pki = _certs.Pki

UTLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"


def cl(name: str, ports: list[int], **extra: Any) -> Any:
    return parse_message(cluster(name, ports, **extra), cluster_pb2.Cluster)


def _connect(host: Any, timeout: float = 5.0) -> tuple[socket.socket | None, BaseException | None, bool]:
    async def main() -> tuple[socket.socket | None, BaseException | None, bool]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        connect_socket(asyncio.get_running_loop(), host, timeout, (3, 30, 5), lambda *a: fut.set_result(a))
        return await asyncio.wait_for(fut, 10)  # type: ignore[no-any-return]

    return asyncio.run(main())


def test_connect_socket_tcp_refused_and_pipe(tmp_path: Path) -> None:
    srv = socket.create_server(("127.0.0.1", 0))
    try:
        (h,) = compile_cluster(
            cl(
                "a",
                [srv.getsockname()[1]],
                upstream_connection_options={"tcp_keepalive": {"keepalive_time": 30}},
            ),
            Store(),
        ).hosts
        sock, err, timed_out = _connect(h)
        assert sock is not None and err is None and not timed_out
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert not sock.getblocking()
        sock.close()
    finally:
        srv.close()
    (h,) = compile_cluster(cl("b", [free_port()]), Store()).hosts
    sock, err, timed_out = _connect(h)
    assert sock is None and isinstance(err, OSError) and not timed_out
    path = str(tmp_path / "u.sock")
    us = socket.socket(socket.AF_UNIX)
    us.bind(path)
    us.listen(1)
    try:
        c = compile_cluster(
            parse_message(
                {
                    "name": "p",
                    "load_assignment": {
                        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": path}}}}]}]
                    },
                },
                cluster_pb2.Cluster,
            ),
            Store(),
        )
        sock, err, _ = _connect(c.hosts[0])
        assert sock is not None and sock.family == socket.AF_UNIX
        sock.close()
    finally:
        us.close()
        os.unlink(path)


def _full_backlog() -> tuple[socket.socket, list[socket.socket]]:
    """A listener that never accepts, with its backlog full: Linux drops further SYNs, so a new
    connect stays in progress."""
    srv = socket.create_server(("127.0.0.1", 0), backlog=0)
    fillers = []
    for _ in range(8):
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(srv.getsockname())
        fillers.append(c)
    return srv, fillers


def test_connect_socket_timeout_and_cancel() -> None:
    srv, fillers = _full_backlog()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        (h,) = compile_cluster(cl("a", [srv.getsockname()[1]]), Store()).hosts
        fut: asyncio.Future[Any] = loop.create_future()
        connect_socket(loop, h, 0.2, None, lambda *a: fut.set_result(a))
        sock, err, timed_out = await asyncio.wait_for(fut, 10)
        assert sock is None and isinstance(err, TimeoutError) and timed_out
        calls: list[Any] = []
        cancel = connect_socket(loop, h, 0.2, None, lambda *a: calls.append(a))
        cancel()
        cancel()  # idempotent
        await asyncio.sleep(0.5)
        assert calls == []  # a cancelled connect never reports

    try:
        asyncio.run(main())
    finally:
        for c in fillers:
            c.close()
        srv.close()


def test_transport_factory_builds_tls_raw_and_refuses_unknown(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    f = UpstreamTransportFactory(SecretsManager())
    m = ClusterManager(Store(), transport_factory=f)
    raw = m.add(cl("raw", [1], transport_socket={"name": "envoy.transport_sockets.raw_buffer"}))
    assert raw.transport is None and raw.transport_error is None
    tls = m.add(
        cl(
            "tls",
            [1],
            transport_socket={
                "name": "envoy.transport_sockets.tls",
                "typed_config": {
                    "@type": UTLS,
                    "sni": "srv",
                    "common_tls_context": {
                        "validation_context": {"trusted_ca": {"filename": str(pki.ca_cert)}}
                    },
                },
            },
        )
    )
    assert isinstance(tls.transport, UpstreamTls) and tls.transport.sni == "srv"
    assert tls.transport.stats.handshake is m.store.counter("cluster.tls.ssl.handshake")
    with pytest.raises(ConfigError) as ei:
        m.add(
            cl(
                "tap",
                [1],
                transport_socket={
                    "name": "internal",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport",
                        "transport_socket": {"name": "raw"},
                    },
                },
            )
        )
    assert "unsupported transport socket" in ei.value.message
    assert ei.value.path.endswith("transport_socket.typed_config.transport_socket")
    with pytest.raises(ConfigError) as ei:
        m.add(
            cl(
                "bad",
                [1],
                transport_socket={
                    "name": "envoy.transport_sockets.tls",
                    "typed_config": {
                        "@type": UTLS,
                        "common_tls_context": {
                            "validation_context": {"trusted_ca": {"filename": "/nonexistent.pem"}}
                        },
                    },
                },
            ),
            "static_resources.clusters[3]",
        )
    assert ei.value.path.startswith(
        "static_resources.clusters[3].transport_socket.typed_config.common_tls_context.validation_context"
    ), ei.value.path


def test_a_cluster_that_cannot_use_its_transport_never_goes_plaintext() -> None:
    srv = socket.create_server(("127.0.0.1", 0))
    try:
        ts = {"name": "envoy.transport_sockets.tls", "typed_config": {"@type": UTLS}}
        c = compile_cluster(cl("t", [srv.getsockname()[1]], transport_socket=ts), Store())  # no factory
        assert c.transport is None and c.transport_error

        async def main() -> Any:
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[Any] = loop.create_future()
            connect(loop, c.hosts[0], asyncio.Protocol(), 5.0, None, lambda e, t: fut.set_result(e))
            return await asyncio.wait_for(fut, 10)

        assert isinstance(asyncio.run(main()), TransportError)
    finally:
        srv.close()
