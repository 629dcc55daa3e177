"""Socket options used by listeners and upstream connections.

Everything here runs once per socket (at bind, accept or connect), never per byte.
"""

from __future__ import annotations

import socket
import sys
from typing import Any

from moorline.config.errors import ConfigError

# envoy.config.core.v3.SocketOption.SocketState
STATE_PREBIND = 0
STATE_BOUND = 1
STATE_LISTENING = 2

# (state, level, name, value) with value an int or bytes
CompiledSockOpt = tuple[int, int, int, int | bytes]


def set_nodelay(sock: socket.socket) -> None:
    """Disable Nagle: a proxy forwards what it has at once; the peer decides about batching."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            # The peer may already have reset the connection; the relay will see it.
            pass


def set_keepalive(sock: socket.socket, keepalive: Any) -> None:
    """Turn on TCP keepalive.

    ``keepalive`` is an ``envoy.config.core.v3.TcpKeepalive`` message, an object with
    ``probes``/``time``/``interval`` attributes (``None`` = kernel default), or a tuple
    ``(probes, time_s, interval_s)``. Unset fields keep the kernel's defaults, as in Envoy.
    """
    if keepalive is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    probes, idle, interval = _keepalive_values(keepalive)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if probes is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, int(probes))
        if idle is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, int(idle)))
        if interval is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, int(interval)))
    except OSError:
        pass


def _keepalive_values(k: Any) -> tuple[int | None, int | None, int | None]:
    if isinstance(k, tuple):
        return k[0], k[1], k[2]
    if hasattr(k, "HasField"):  # the proto
        return tuple(  # type: ignore[return-value]
            int(getattr(k, f).value) if k.HasField(f) else None
            for f in ("keepalive_probes", "keepalive_time", "keepalive_interval")
        )
    return getattr(k, "probes", None), getattr(k, "time", None), getattr(k, "interval", None)


def compile_socket_options(opts: Any, path: str) -> list[CompiledSockOpt]:
    """``repeated envoy.config.core.v3.SocketOption`` -> tuples applied at bind time."""
    out: list[CompiledSockOpt] = []
    for i, o in enumerate(opts):
        p = f"{path}[{i}]"
        kind = o.WhichOneof("value")
        if kind == "int_value":
            value: int | bytes = int(o.int_value)
        elif kind == "buf_value":
            value = bytes(o.buf_value)
        else:
            raise ConfigError(p, "socket option needs int_value or buf_value")
        if o.HasField("type"):
            # Envoy filters options by socket type (stream/datagram); every moorline listener is a stream.
            if o.type.HasField("datagram"):
                continue
        out.append((int(o.state), int(o.level), int(o.name), value))
    return out


def apply_socket_options(sock: socket.socket, opts: list[CompiledSockOpt], state: int) -> None:
    """Apply the options that belong to ``state``; an option the kernel refuses raises ``OSError``."""
    for st, level, name, value in opts:
        if st == state:
            sock.setsockopt(level, name, value)


# Netfilter's getsockopt for the destination a connection had before NAT (REDIRECT/DNAT):
# SO_ORIGINAL_DST at SOL_IP for IPv4, IP6T_SO_ORIGINAL_DST (same number) at SOL_IPV6 for IPv6.
SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80
_SOCKADDR_IN = 16
_SOCKADDR_IN6 = 28


def original_dst(sock: socket.socket) -> tuple[str, int] | None:
    """The connection's destination before NAT, from conntrack, or ``None`` when the kernel has
    none (no conntrack entry: the connection was not tracked, or not TCP over IP). A tracked
    connection that was not redirected reports its own local address."""
    fam = sock.family
    try:
        if fam == socket.AF_INET:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN)
        elif fam == socket.AF_INET6:
            try:
                raw = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6)
            except OSError:
                # A dual-stack socket carrying IPv4 (a mapped address): conntrack knows it as IPv4.
                raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN)
        else:
            return None
    except OSError:
        return None
    return parse_sockaddr(raw)


def parse_sockaddr(raw: bytes) -> tuple[str, int] | None:
    """A ``struct sockaddr_in`` / ``sockaddr_in6`` as the kernel returns it -> ``(ip, port)``."""
    if len(raw) < 8:
        return None
    family = int.from_bytes(raw[:2], sys.byteorder)
    port = int.from_bytes(raw[2:4], "big")
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
    if family == socket.AF_INET6 and len(raw) >= 24:
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
    return None
