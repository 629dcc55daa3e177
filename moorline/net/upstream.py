"""Opening upstream connections (the only place the HTTP pools and tcp_proxy reach sockets).

- ``connect(loop, host, protocol, timeout, keepalive, on_done)``: an asyncio connection for the
  HTTP pools, through TLS when the host's cluster has one.
- ``connect_socket(loop, host, timeout, keepalive, on_done)``: a connected non-blocking socket
  for tcp_proxy (it splices or relays the bytes itself).
- ``UpstreamTransportFactory(secrets)``: what the ``ClusterManager`` compiles a cluster's
  ``transport_socket`` with (``upstream/`` may not import ``net/``): an ``UpstreamTlsContext``
  becomes ``cluster.transport`` (a ``moorline.net.tls.UpstreamTls`` counting into the cluster's
  ``ssl.*`` stats); ``raw_buffer`` is plain TCP; any other transport socket is announced and
  every connection to the cluster fails (``cluster.transport_error``) instead of going
  plaintext.

TLS: SNI is ``sni`` (or the host name with ``auto_host_sni``); the SAN check runs before the
pool's protocol sees the connection; a failed handshake or SAN check is a connect failure.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable
from typing import Any

from moorline.net.secrets import SecretsManager
from moorline.net.sockopts import set_keepalive, set_nodelay
from moorline.net.tls import (
    TlsVerifyError,
    UpstreamTls,
    compile_transport_socket,
    upstream_connect_coro,
)

Keepalive = tuple[int | None, int | None, int | None]


class TransportError(OSError):
    """The cluster's transport socket cannot be used (unsupported, or not compiled)."""


class _ClusterCtx:
    """What the TLS compiler needs from its build context, for one cluster."""

    def __init__(self, cluster: Any, secrets: SecretsManager) -> None:
        self.notice = cluster.notice
        self.secrets = secrets


class UpstreamTransportFactory:
    """Compiles clusters' transport sockets (``moorline.upstream.api.TransportFactory``)."""

    def __init__(self, secrets: SecretsManager | None = None) -> None:
        self.secrets = secrets if secrets is not None else SecretsManager()

    def __call__(self, transport_socket: Any, cluster: Any, path: str) -> UpstreamTls | None:
        # raw_buffer -> None; TLS compiled; internal_upstream looked through; anything else (tap,
        # ALTS, ...) is a ConfigError now, with its field path, not a 503 on every connection.
        ts = transport_socket
        compiled = compile_transport_socket(ts, _ClusterCtx(cluster, self.secrets), path, server=False)
        assert compiled is None or isinstance(compiled, UpstreamTls)
        if compiled is not None:
            compiled.bind_stats(cluster.stats.scope)
        return compiled


def _transport_of(host: Any) -> tuple[UpstreamTls | None, BaseException | None]:
    cluster = getattr(host, "cluster", None)
    err = getattr(cluster, "transport_error", None)
    if err:
        return None, TransportError(err)
    return getattr(cluster, "transport", None), None


def _apply_options(sock: Any, keepalive: Keepalive | None) -> None:
    if sock is None:
        return
    set_nodelay(sock)
    set_keepalive(sock, keepalive)


def connect(
    loop: asyncio.AbstractEventLoop,
    host: Any,
    protocol: asyncio.Protocol,
    timeout: float,
    keepalive: Keepalive | None,
    on_done: Callable[[BaseException | None, bool], None],
) -> Callable[[], None]:
    """Connect ``protocol`` to ``host`` (an ``upstream.cluster.Host``).

    ``on_done(error, timed_out)`` is called once: ``error`` is None on success
    (the protocol's ``connection_made`` has run by then). Returns a cancel
    function. One task per new connection, none per request.
    """
    gate = None
    tls, err = _transport_of(host)
    if err is not None:
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
            _apply_options(transport.get_extra_info("socket"), keepalive)
        on_done(None, False)

    task.add_done_callback(done)

    def cancel() -> None:
        if th is not None:
            th.cancel()
        task.cancel()

    return cancel


def _family_of(host: Any) -> int:
    fam = getattr(host, "family", None)
    if fam:
        return int(fam)
    addr = host.address
    if host.port is None or addr.startswith(("/", "@")):
        return socket.AF_UNIX
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def connect_socket(
    loop: asyncio.AbstractEventLoop,
    host: Any,
    timeout: float,
    keepalive: Keepalive | None,
    on_done: Callable[[socket.socket | None, BaseException | None, bool], None],
) -> Callable[[], None]:
    """Open a plain non-blocking socket to ``host`` for tcp_proxy.

    ``on_done(sock, error, timed_out)`` is called once: ``sock`` is the connected socket (the
    caller owns it), or None with ``error`` / ``timed_out`` saying why. It may run before this
    returns (a pipe connects or is refused at once). The returned function cancels a connect in
    progress and closes its socket. TLS is not done here: tcp_proxy relays through TLS itself
    (``moorline.net.tls.StreamRelay``), over this socket."""
    family = _family_of(host)
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as e:
        on_done(None, e, False)
        return _noop
    sock.setblocking(False)
    if family != socket.AF_UNIX:
        _apply_options(sock, keepalive)
    target: Any = host.address if family == socket.AF_UNIX else (host.address, host.port)
    if family == socket.AF_UNIX and target.startswith("@"):
        target = "\0" + target[1:]
    err = sock.connect_ex(target)
    if err == 0:
        on_done(sock, None, False)
        return _noop
    if err != errno.EINPROGRESS:
        # Refused at once (a pipe nobody listens on, an unreachable network, a full unix backlog).
        sock.close()
        on_done(None, OSError(err, errno.errorcode.get(err, str(err))), False)
        return _noop
    fd = sock.fileno()
    timer: asyncio.TimerHandle | None = None
    finished = False

    def finish(ok: bool, error: BaseException | None, timed_out: bool) -> None:
        nonlocal finished, timer
        if finished:
            return
        finished = True
        loop.remove_writer(fd)
        if timer is not None:
            timer.cancel()
            timer = None
        if ok:
            on_done(sock, None, False)
        else:
            sock.close()
            on_done(None, error, timed_out)

    def ready() -> None:
        e = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if e:
            finish(False, OSError(e, errno.errorcode.get(e, str(e))), False)
        else:
            finish(True, None, False)

    def expired() -> None:
        finish(False, TimeoutError("connect timeout"), True)

    loop.add_writer(fd, ready)
    if timeout and timeout > 0:
        timer = loop.call_later(timeout, expired)

    def cancel() -> None:
        nonlocal finished, timer
        if finished:
            return
        finished = True
        loop.remove_writer(fd)
        if timer is not None:
            timer.cancel()
            timer = None
        sock.close()

    return cancel


def _noop() -> None:
    return None
