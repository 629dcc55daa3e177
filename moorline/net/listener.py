"""Listener: owns a listening socket, accepts, picks a filter chain, hands the socket over.

Accepting runs as a plain ``loop.add_reader`` callback on the listening fd that accepts up to
``max_connections_to_accept_per_socket_event`` (default 64) sockets per wakeup, so one busy
listener cannot starve the loop and no Task exists per connection. The chain's terminal network
filter owns each accepted socket and reports its end through ``ConnInfo.notify_closed()``.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import socket
import stat
from typing import Any

from moorline.config.errors import ConfigError
from moorline.config.util import Addr, addr_str, address_of
from moorline.net.conn_info import DEFAULT_BUFFER_LIMIT, ConnInfo
from moorline.net.filter_chain import FilterChain, FilterChainSelector, compile_filter_chains
from moorline.net.sockopts import (
    STATE_BOUND,
    STATE_LISTENING,
    STATE_PREBIND,
    CompiledSockOpt,
    apply_socket_options,
    compile_socket_options,
    set_nodelay,
)
from moorline.observability.stats import listener_stat_prefix

log = logging.getLogger("moorline.listener")

DEFAULT_BACKLOG = 1024
DEFAULT_ACCEPTS_PER_EVENT = 64

# accept() errors that mean "try later" rather than "this listener is broken": out of fds or
# memory. Envoy logs and keeps listening; so do we.
_ACCEPT_TRANSIENT = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_ACCEPT_SKIP = (errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR)


def _join(path: str, field: str) -> str:
    return f"{path}.{field}" if path else field


class Listener:
    """A compiled ``envoy.config.listener.v3.Listener``.

    ``Listener(proto, ctx, path)`` compiles everything (raising ``ConfigError`` with field paths);
    ``await start(loop)`` binds and starts accepting.
    """

    def __init__(self, proto: Any, ctx: Any, path: str = "") -> None:
        self.ctx = ctx
        self.path = path
        if proto.WhichOneof("listener_specifier") == "internal_listener":
            raise ConfigError(_join(path, "internal_listener"), "internal listeners are not supported")
        if proto.HasField("api_listener"):
            raise ConfigError(_join(path, "api_listener"), "api_listener is not supported")
        if proto.HasField("udp_listener_config"):
            raise ConfigError(_join(path, "udp_listener_config"), "UDP listeners are not supported")
        if not proto.HasField("address"):
            raise ConfigError(_join(path, "address"), "address is required")
        apath = _join(path, "address")
        self.address: Addr = address_of(proto.address, apath)
        self.pipe_mode = 0
        self.ipv4_compat = False
        if self.address[0] == "tcp":
            sa = proto.address.socket_address
            if sa.protocol != 0:  # TCP = 0, UDP = 1
                raise ConfigError(f"{apath}.socket_address.protocol", "only TCP listeners are supported")
            try:
                ipaddress.ip_address(self.address[1])
            except ValueError:
                raise ConfigError(
                    f"{apath}.socket_address.address", f"{self.address[1]!r} is not an IP address"
                ) from None
            self.ipv4_compat = bool(sa.ipv4_compat)
        else:
            self.pipe_mode = int(proto.address.pipe.mode)
        if len(proto.additional_addresses):
            raise ConfigError(
                _join(path, "additional_addresses"), "additional_addresses are not supported yet"
            )
        self.name: str = proto.name or addr_str(self.address)

        self.backlog = (
            int(proto.tcp_backlog_size.value) if proto.HasField("tcp_backlog_size") else DEFAULT_BACKLOG
        )
        self.accepts_per_event = (
            int(proto.max_connections_to_accept_per_socket_event.value) or DEFAULT_ACCEPTS_PER_EVENT
            if proto.HasField("max_connections_to_accept_per_socket_event")
            else DEFAULT_ACCEPTS_PER_EVENT
        )
        # Envoy: enable_reuse_port defaults to true (workers share the port through the kernel);
        # the deprecated reuse_port bool only matters when it is set.
        if proto.HasField("enable_reuse_port"):
            self.reuse_port = bool(proto.enable_reuse_port.value)
        else:
            self.reuse_port = True
        self.bind_to_port = proto.bind_to_port.value if proto.HasField("bind_to_port") else True
        self.buffer_limit = (
            int(proto.per_connection_buffer_limit_bytes.value)
            if proto.HasField("per_connection_buffer_limit_bytes")
            else DEFAULT_BUFFER_LIMIT
        )
        self.freebind = bool(proto.freebind.value) if proto.HasField("freebind") else False
        self.transparent = bool(proto.transparent.value) if proto.HasField("transparent") else False
        self.socket_options: list[CompiledSockOpt] = compile_socket_options(
            proto.socket_options, _join(path, "socket_options")
        )
        if proto.HasField("use_original_dst") and proto.use_original_dst.value:
            ctx.notice(
                f"{_join(path, 'use_original_dst')}: original destination is not supported yet; ignored"
            )
        if len(proto.listener_filters):
            names = ", ".join(f.name for f in proto.listener_filters)
            ctx.notice(
                f"{_join(path, 'listener_filters')}: listener filters not supported yet; ignored ({names})"
            )
        if proto.HasField("connection_balance_config"):
            ctx.notice(
                f"{_join(path, 'connection_balance_config')}: ignored (the kernel balances with SO_REUSEPORT)"
            )
        if len(proto.access_log):
            ctx.notice(f"{_join(path, 'access_log')}: listener access logs are not supported yet; ignored")

        self.selector: FilterChainSelector = compile_filter_chains(proto, ctx, path)

        scope = ctx.stats.scope(listener_stat_prefix(self.address[1], self.address[2], proto.stat_prefix))
        self.stats_prefix = scope.prefix
        self.cx_total = scope.counter("downstream_cx_total")
        self.cx_destroy = scope.counter("downstream_cx_destroy")
        self.cx_active = scope.gauge("downstream_cx_active")
        self.cx_length_ms = scope.histogram("downstream_cx_length_ms")
        self.no_filter_chain_match = scope.counter("no_filter_chain_match")
        self.cx_overflow = scope.counter("downstream_cx_overflow")

        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._accepting = False
        self._bound: Addr | None = None
        self._is_tcp = self.address[0] == "tcp"

    @property
    def filter_chains(self) -> list[FilterChain]:
        """Every compiled chain, the default chain last (for the server's drain and admin)."""
        chains = list(self.selector.chains)
        if self.selector.default is not None:
            chains.append(self.selector.default)
        return chains

    # -- lifecycle --

    @property
    def bound_address(self) -> Addr:
        """The address actually bound (the kernel's port when port 0 was configured)."""
        return self._bound if self._bound is not None else self.address

    async def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Bind, listen and start accepting. Raises ``OSError`` when the address cannot be bound."""
        if self._sock is not None:
            return
        loop = loop or asyncio.get_running_loop()
        self._loop = loop
        if not self.bind_to_port:
            # Envoy uses such listeners only as targets of use_original_dst redirection.
            return
        sock = self._open_socket()
        self._sock = sock
        self._accepting = True
        loop.add_reader(sock.fileno(), self._accept)

    def _open_socket(self) -> socket.socket:
        kind, host, port = self.address
        if kind == "pipe":
            return self._open_pipe(host)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.reuse_port and hasattr(socket, "SO_REUSEPORT"):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                # ipv4_compat only makes sense on the any-address: accept IPv4 as mapped addresses.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if self.ipv4_compat else 1)
            if self.freebind:
                sock.setsockopt(socket.SOL_IP, 15, 1)  # IP_FREEBIND
            if self.transparent:
                sock.setsockopt(socket.SOL_IP, 19, 1)  # IP_TRANSPARENT (needs CAP_NET_ADMIN)
            apply_socket_options(sock, self.socket_options, STATE_PREBIND)
            sock.bind((host, port or 0))
            apply_socket_options(sock, self.socket_options, STATE_BOUND)
            sock.listen(self.backlog)
            apply_socket_options(sock, self.socket_options, STATE_LISTENING)
            sock.setblocking(False)
            name = sock.getsockname()
            self._bound = ("tcp", host, int(name[1]))
        except BaseException:
            sock.close()
            raise
        return sock

    def _open_pipe(self, path: str) -> socket.socket:
        abstract = path.startswith("@")
        bind_path = "\0" + path[1:] if abstract else path
        if not abstract:
            try:
                st = os.stat(path)
            except FileNotFoundError:
                pass
            else:
                # A socket file left by a previous run blocks bind(); anything else is not ours.
                if stat.S_ISSOCK(st.st_mode):
                    os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            apply_socket_options(sock, self.socket_options, STATE_PREBIND)
            sock.bind(bind_path)
            if self.pipe_mode and not abstract:
                os.chmod(path, self.pipe_mode)
            apply_socket_options(sock, self.socket_options, STATE_BOUND)
            sock.listen(self.backlog)
            apply_socket_options(sock, self.socket_options, STATE_LISTENING)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._bound = ("pipe", path, None)
        return sock

    def stop_accepting(self) -> None:
        """For drain: stop accepting and close the listening socket; live connections stay."""
        sock = self._sock
        if sock is None:
            return
        self._sock = None
        if self._accepting and self._loop is not None:
            self._loop.remove_reader(sock.fileno())
        self._accepting = False
        sock.close()
        kind, path, _ = self.address
        if kind == "pipe" and not path.startswith("@"):
            try:
                os.unlink(path)
            except OSError:
                pass

    def close(self) -> None:
        self.stop_accepting()

    # -- accepting --

    def _accept(self) -> None:
        sock = self._sock
        if sock is None:
            return
        for _ in range(self.accepts_per_event):
            try:
                conn, peer = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in _ACCEPT_SKIP:
                    continue
                if e.errno in _ACCEPT_TRANSIENT:
                    log.warning("listener %s: accept failed: %s", self.name, e)
                    return
                log.error("listener %s: accept failed: %s", self.name, e)
                return
            try:
                self._on_connection(conn, peer)
            except Exception:  # a broken filter must not stop the listener
                log.exception("listener %s: connection handling failed", self.name)
                conn.close()

    def _on_connection(self, conn: socket.socket, peer: Any) -> None:
        conn.setblocking(False)
        if self._is_tcp:
            set_nodelay(conn)
            try:
                local = conn.getsockname()
            except OSError:  # reset before we looked
                conn.close()
                return
            local_t: tuple[str, int] | str = (local[0], local[1])
            remote_t: tuple[str, int] | str = (peer[0], peer[1])
            chain = self.selector.select(local[0], local[1], peer[0], peer[1])
        else:
            local_t = self.address[1]
            remote_t = peer if isinstance(peer, str) and peer else self.address[1]
            chain = self.selector.select(None, None, None, None)
        if chain is None:
            self.no_filter_chain_match.value += 1
            conn.close()
            return
        self._hand_over(chain, conn, local_t, remote_t)

    def _hand_over(self, chain: FilterChain, conn: socket.socket, local: Any, remote: Any) -> None:
        loop = self._loop
        assert loop is not None
        info = ConnInfo(local, remote, self.name, buffer_limit=self.buffer_limit, start_mono=loop.time())
        self.cx_total.value += 1
        self.cx_active.value += 1
        closed = False

        def on_close() -> None:
            nonlocal closed
            if closed:
                return
            closed = True
            self.cx_active.value -= 1
            self.cx_destroy.value += 1
            self.cx_length_ms.record((loop.time() - info.start_mono) * 1000.0)

        info.on_close = on_close
        try:
            chain.on_accept(conn, info)
        except Exception:
            log.exception("listener %s: filter chain %s failed on accept", self.name, chain.name)
            conn.close()
            info.notify_closed()

    def __repr__(self) -> str:
        return f"Listener({self.name!r}, {addr_str(self.bound_address)})"
