"""Opening upstream connections (the only place the HTTP pools reach sockets).

A cluster with a ``transport_socket`` ``UpstreamTlsContext`` gets TLS here: the context is
compiled once per cluster (``moorline.net.tls.tls_for_cluster``), SNI is ``sni`` (or the host
name with ``auto_host_sni``), and the SAN check runs before the pool's protocol sees the
connection; a failed handshake or SAN check is a connect failure.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from typing import Any

from moorline.config.errors import ConfigError
from moorline.net.tls import TlsVerifyError, tls_for_cluster, upstream_connect_coro


def _apply_keepalive(sock: Any, ka: tuple[int | None, int | None, int | None] | None) -> None:
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass
    if ka is None:
        return
    probes, idle, interval = ka
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if probes:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, probes)
        if idle:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        if interval:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
    except OSError:
        pass


def connect(
    loop: asyncio.AbstractEventLoop,
    host: Any,
    protocol: asyncio.Protocol,
    timeout: float,
    keepalive: tuple[int | None, int | None, int | None] | None,
    on_done: Callable[[BaseException | None, bool], None],
) -> Callable[[], None]:
    """Connect ``protocol`` to ``host`` (an ``upstream.cluster.Host``).

    ``on_done(error, timed_out)`` is called once: ``error`` is None on success
    (the protocol's ``connection_made`` has run by then). Returns a cancel
    function. One task per new connection, none per request.
    """
    gate = None
    try:
        tls = tls_for_cluster(getattr(host, "cluster", None))
    except ConfigError as e:
        # The cluster's UpstreamTlsContext cannot be compiled (bad file, unsupported field):
        # every connect fails with the reason instead of silently going plaintext.
        err = ssl.SSLError(f"upstream TLS context: {e}")
        h = loop.call_soon(on_done, err, False)
        return h.cancel
    if tls is not None:
        coro, gate = upstream_connect_coro(loop, tls, host, protocol, timeout)
    elif host.port is None:
        coro = loop.create_unix_connection(lambda: protocol, host.address)
    else:
        coro = loop.create_connection(lambda: protocol, host.address, host.port)
    task = loop.create_task(coro)
    state = {"timed_out": False}

    def fire_timeout() -> None:
        state["timed_out"] = True
        task.cancel()

    th = loop.call_later(timeout, fire_timeout) if timeout and timeout > 0 else None

    def done(t: asyncio.Task) -> None:
        if th is not None:
            th.cancel()
        if t.cancelled():
            on_done(TimeoutError("connect timeout") if state["timed_out"] else asyncio.CancelledError(), True)
            return
        exc = t.exception()
        if exc is not None:
            on_done(exc, False)
            return
        transport, _ = t.result()
        if gate is not None and gate.failed:
            on_done(TlsVerifyError("upstream certificate SAN mismatch"), False)
            return
        if host.port is not None:
            _apply_keepalive(transport.get_extra_info("socket"), keepalive)
        on_done(None, False)

    task.add_done_callback(done)

    def cancel() -> None:
        if th is not None:
            th.cancel()
        task.cancel()

    return cancel
