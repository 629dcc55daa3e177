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
from collections.abc import Callable
from typing import Any

from moorline.config import registry
from moorline.config.errors import ConfigError
from moorline.config.util import Addr, addr_str, address_of, duration_s
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

ORIGINAL_DST_FILTER = "envoy.filters.listener.original_dst"
DEFAULT_BACKLOG = 1024
DEFAULT_ACCEPTS_PER_EVENT = 64
DEFAULT_LISTENER_FILTERS_TIMEOUT = 15.0  # Envoy's listener_filters_timeout default
# Listener filters peek at bytes that are not complete yet: the socket stays readable (the bytes
# are not consumed), so instead of a spinning reader we re-peek on a timer, backing off.
PEEK_RETRY_FIRST = 0.001
PEEK_RETRY_MAX = 0.05

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
        self.proto = proto  # what was compiled, for /config_dump and change detection
        # Management (the ListenerManager sets these): origin, version, when it was built.
        self.added_via_api = False
        self.version_info = ""
        self.last_updated = 0.0
        internal = proto.WhichOneof("listener_specifier") == "internal_listener"
        if internal:
            # Envoy's in-process listeners (Istio's tunnel origination): compiled, never served.
            ctx.notice(
                f"{_join(path, 'internal_listener')}: internal listeners are not supported; "
                "the listener is compiled and takes no connections"
            )
        if proto.HasField("api_listener"):
            raise ConfigError(_join(path, "api_listener"), "api_listener is not supported")
        if proto.HasField("udp_listener_config"):
            raise ConfigError(_join(path, "udp_listener_config"), "UDP listeners are not supported")
        if not proto.HasField("address") and not internal:
            raise ConfigError(_join(path, "address"), "address is required")
        apath = _join(path, "address")
        self.address: Addr = ("internal", proto.name, None) if internal else address_of(proto.address, apath)
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
        self.bind_to_port = proto.bind_to_port.value if proto.HasField("bind_to_port") else not internal
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
        # use_original_dst (Istio's virtualOutbound): a connection whose original destination is
        # another listener's address is handed to that listener (``find_listener``, set by the
        # listener manager); as in Envoy the original_dst listener filter is implied.
        self.use_original_dst = bool(proto.HasField("use_original_dst") and proto.use_original_dst.value)
        self.find_listener: Callable[[tuple[str, int]], Listener | None] | None = None
        filters, has_original_dst = _compile_listener_filters(
            proto.listener_filters, ctx, _join(path, "listener_filters")
        )
        if self.use_original_dst and not has_original_dst:
            if self.address[0] != "tcp":
                raise ConfigError(
                    _join(path, "use_original_dst"), "only TCP listeners have an original destination"
                )
            ext = registry.lookup("listener", ORIGINAL_DST_FILTER, None)
            if ext is None:
                raise ConfigError(
                    _join(path, "use_original_dst"), f"needs the {ORIGINAL_DST_FILTER} listener filter"
                )
            filters.insert(0, ext.factory(None, ctx, _join(path, "use_original_dst")))
        # Filters that need no bytes (original_dst) run once at accept, before any peeking.
        self.accept_filters: list[Any] = [f for f in filters if not f.max_read_bytes]
        self.listener_filters: list[Any] = [f for f in filters if f.max_read_bytes]
        # Envoy: 15 s by default; an explicit 0 disables the timeout.
        self.listener_filters_timeout: float | None = (
            (duration_s(proto.listener_filters_timeout) or None)
            if proto.HasField("listener_filters_timeout")
            else DEFAULT_LISTENER_FILTERS_TIMEOUT
        )
        self.continue_on_listener_filters_timeout = bool(proto.continue_on_listener_filters_timeout)
        self.peek_bytes = max((f.max_read_bytes for f in self.listener_filters), default=0)
        if proto.HasField("connection_balance_config"):
            ctx.notice(
                f"{_join(path, 'connection_balance_config')}: ignored (the kernel balances with SO_REUSEPORT)"
            )
        if len(proto.access_log):
            ctx.notice(f"{_join(path, 'access_log')}: listener access logs are not supported yet; ignored")

        # An internal listener takes no connections: what only matters to its traffic (tcp_proxy
        # tunneling) is noticed instead of refused (``BuildContext.in_internal_listener``).
        saved = getattr(ctx, "in_internal_listener", False)
        if internal:
            ctx.in_internal_listener = True
        try:
            self.selector: FilterChainSelector = compile_filter_chains(proto, ctx, path)
        finally:
            if internal:
                ctx.in_internal_listener = saved

        scope = ctx.stats.scope(listener_stat_prefix(self.address[1], self.address[2], proto.stat_prefix))
        self.stats_prefix = scope.prefix
        self.cx_total = scope.counter("downstream_cx_total")
        self.cx_destroy = scope.counter("downstream_cx_destroy")
        self.cx_active = scope.state_gauge(
            "downstream_cx_active"
        )  # pilot-agent reads its 0 (EXIT_ON_ZERO_ACTIVE_CONNECTIONS)
        self.cx_length_ms = scope.histogram("downstream_cx_length_ms")
        self.no_filter_chain_match = scope.counter("no_filter_chain_match")
        self.cx_overflow = scope.counter("downstream_cx_overflow")
        self.pre_cx_timeout = scope.counter("downstream_pre_cx_timeout")
        self.pre_cx_active = scope.gauge("downstream_pre_cx_active")
        # The overload manager's shared state (moorline.overload.OverloadState), None without one.
        self._ol = getattr(ctx, "overload", None)
        self._global_limit = not proto.ignore_global_conn_limit
        if self._ol is not None:
            self.cx_overload_reject = scope.counter("downstream_cx_overload_reject")
        for fc in self.filter_chains:
            if fc.tls is not None:
                fc.tls.bind_stats(scope)

        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._accepting = False
        self._bound: Addr | None = None
        self._is_tcp = self.address[0] == "tcp"
        self._backoff = 0.0  # seconds out after an accept failure for lack of resources
        self._backoff_handle: asyncio.TimerHandle | None = None

    @property
    def filter_chains(self) -> list[FilterChain]:
        """Every compiled chain, the default chain last (for the server's drain and admin)."""
        chains = list(self.selector.chains)
        if self.selector.default is not None:
            chains.append(self.selector.default)
        return chains

    def init_targets(self) -> list[Any]:
        """What this listener warms on (``config.warming.InitTarget``): its connection managers'
        first RDS responses and its TLS contexts' first SDS secrets."""
        out: list[Any] = []
        for fc in self.filter_chains:
            out.extend(getattr(fc.terminal, "init_targets", ()))
            if fc.tls is not None:
                out.extend(getattr(fc.tls, "init_targets", ()))
        return out

    # -- lifecycle --

    @property
    def bound_address(self) -> Addr:
        """The address actually bound (the kernel's port when port 0 was configured)."""
        return self._bound if self._bound is not None else self.address

    async def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Bind, listen and start accepting. Raises ``OSError`` when the address cannot be bound."""
        self.bind(loop or asyncio.get_running_loop())

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """``start`` without the coroutine (the listener manager binds from plain calls)."""
        if self._sock is not None:
            return
        self._loop = loop
        if not self.bind_to_port:
            # Envoy uses such listeners only as targets of use_original_dst redirection.
            return
        self._serve(self._open_socket())

    def _serve(self, sock: socket.socket) -> None:
        loop = self._loop
        assert loop is not None
        self._sock = sock
        self._accepting = True
        loop.add_reader(sock.fileno(), self._accept)
        for fc in self.filter_chains:
            if fc.tls is not None:
                fc.tls.watcher.start(loop)  # certificate files are polled on the server's loop

    @property
    def serving(self) -> bool:
        """True while this listener owns a listening socket."""
        return self._sock is not None

    def same_socket(self, other: Listener) -> bool:
        """True when ``other``'s listening socket can serve this listener unchanged: same
        address and the same options applied when the socket was made."""
        return (
            self.address == other.address
            and self.bind_to_port == other.bind_to_port
            and self.reuse_port == other.reuse_port
            and self.ipv4_compat == other.ipv4_compat
            and self.freebind == other.freebind
            and self.transparent == other.transparent
            and self.socket_options == other.socket_options
            and self.pipe_mode == other.pipe_mode
        )

    def take_over(self, old: Listener, loop: asyncio.AbstractEventLoop) -> None:
        """Serve ``old``'s listening socket from now on (a listener update). The port is never
        unbound: the socket passes from one reader callback to the other within one loop
        iteration, and connections waiting in the kernel's backlog are accepted by this
        listener, with its filter chains."""
        self._loop = loop
        sock = old._release_socket()
        if sock is None:
            self.bind(loop)
            return
        self._bound = old._bound
        if self.backlog != old.backlog:
            sock.listen(self.backlog)  # listen() again only changes the backlog
        self._serve(sock)

    def _release_socket(self) -> socket.socket | None:
        """Stop accepting and hand the listening socket to the caller (it stays open)."""
        sock = self._sock
        if sock is None:
            return None
        self._sock = None
        if self._backoff_handle is not None:
            self._backoff_handle.cancel()
            self._backoff_handle = None
        if self._accepting and self._loop is not None:
            self._loop.remove_reader(sock.fileno())
        self._accepting = False
        return sock

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
        sock = self._release_socket()
        if sock is None:
            return
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
                    # Out of file descriptors or memory: the backlog stays readable, so step
                    # out for a while (doubling up to 1 s) instead of spinning on the same error.
                    loop = self._loop
                    if self._accepting and loop is not None:
                        loop.remove_reader(sock.fileno())
                        self._accepting = False
                        if not self._backoff:
                            log.warning("listener %s: accept failed: %s (backing off)", self.name, e)
                        self._backoff = min(max(self._backoff * 2, 0.01), 1.0)
                        self._backoff_handle = loop.call_later(self._backoff, self._resume_accept)
                    return
                log.error("listener %s: accept failed: %s", self.name, e)
                return
            self._backoff = 0.0
            try:
                self._on_connection(conn, peer)
            except Exception:  # a broken filter must not stop the listener
                log.exception("listener %s: connection handling failed", self.name)
                conn.close()

    def _resume_accept(self) -> None:
        self._backoff_handle = None
        sock = self._sock
        if sock is not None and not self._accepting and self._loop is not None:
            self._accepting = True
            self._loop.add_reader(sock.fileno(), self._accept)

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
        else:
            local_t = self.address[1]
            remote_t = peer if isinstance(peer, str) and peer else self.address[1]
        loop = self._loop
        assert loop is not None
        info = ConnInfo(local_t, remote_t, self.name, buffer_limit=self.buffer_limit, start_mono=loop.time())
        self._run_listener_filters(conn, info, loop)

    def _run_listener_filters(
        self, conn: socket.socket, info: ConnInfo, loop: asyncio.AbstractEventLoop
    ) -> None:
        for f in self.accept_filters:
            if f.on_accept(conn, info) == LISTENER_FILTER_CLOSE:
                conn.close()
                return
        if self.listener_filters:
            _ListenerFilterRun(self, loop, conn, info).start()
            return
        self._select_and_hand_over(conn, info)

    def accept_redirected(self, conn: socket.socket, info: ConnInfo, loop: asyncio.AbstractEventLoop) -> None:
        """Take a connection another listener accepted (``use_original_dst``: its original
        destination is this listener's address). It runs this listener's listener filters and
        filter chains, and counts in this listener's stats, as if accepted here; it is not
        redirected again."""
        if self._loop is None:
            self._loop = loop
        info.listener_name = self.name
        info.buffer_limit = self.buffer_limit
        self._run_listener_filters(conn, info, loop)

    def _select_and_hand_over(self, conn: socket.socket, info: ConnInfo) -> None:
        find = self.find_listener
        if find is not None and info.local_restored:
            lo = info.local
            assert isinstance(lo, tuple)
            target = find(lo)
            if target is not None and target is not self:
                loop = self._loop
                assert loop is not None
                target.accept_redirected(conn, info, loop)
                return
        if self._is_tcp:
            lo, re = info.local, info.remote
            assert isinstance(lo, tuple) and isinstance(re, tuple)
            chain = self.selector.select(
                lo[0], lo[1], re[0], re[1], info.server_name, info.transport_protocol, info.alpn
            )
        else:
            chain = self.selector.select(
                None, None, None, None, info.server_name, info.transport_protocol, info.alpn
            )
        if chain is None:
            self.no_filter_chain_match.value += 1
            conn.close()
            return
        self._hand_over(chain, conn, info)

    def _hand_over(self, chain: FilterChain, conn: socket.socket, info: ConnInfo) -> None:
        loop = self._loop
        assert loop is not None
        ol = self._ol
        counted = False
        if ol is not None:
            if ol.refuse_connections:  # stop_accepting_connections
                self.cx_overload_reject.value += 1
                conn.close()
                return
            if ol.cx_max is not None and self._global_limit:
                if ol.cx_active >= ol.cx_max:
                    self.cx_overflow.value += 1
                    conn.close()
                    return
                ol.cx_active += 1
                counted = True
        self.cx_total.value += 1
        self.cx_active.value += 1
        closed = False

        def on_close() -> None:
            nonlocal closed
            if closed:
                return
            closed = True
            if counted:
                assert ol is not None
                ol.cx_active -= 1
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


# --- listener filters ----------------------------------------------------------------------------
#
# A listener filter (registry category ``listener``) is an object with ``max_read_bytes: int``
# (how much of the stream's beginning it may need to see) and ``on_data(data: bytes, info:
# ConnInfo) -> bool`` (True: done; False: needs more bytes). ``on_data`` reads *peeked* bytes,
# never consuming them, and records what it learnt in ``info`` (``server_name``, ``alpn``,
# ``transport_protocol``) for filter chain selection. ``data`` always starts at the first byte of
# the connection (each call sees everything received so far).
#
# A filter with ``max_read_bytes == 0`` has ``on_accept(sock, info) -> bool |
# LISTENER_FILTER_CLOSE`` instead, called once at accept before any peeking filter (original_dst:
# it hands the socket to ``moorline.net.sockopts`` and never reads from it).


def _compile_listener_filters(protos: Any, ctx: Any, path: str) -> tuple[list[Any], bool]:
    """The compiled filters, and whether original_dst is among them."""
    out: list[Any] = []
    has_original_dst = False
    for i, f in enumerate(protos):
        fpath = f"{path}[{i}]"
        kind = f.WhichOneof("config_type")
        type_url = f.typed_config.type_url if kind == "typed_config" else None
        ext = registry.lookup("listener", f.name, type_url)
        if ext is None:
            ctx.notice(f"{fpath}: listener filter {f.name!r} is not supported yet; ignored")
            continue
        if f.HasField("filter_disabled"):
            ctx.notice(f"{fpath}.filter_disabled: ignored (the filter runs for every connection)")
        cfg = None
        if kind == "typed_config":
            from moorline.config.loader import unpack_any

            cfg = unpack_any(f.typed_config, f"{fpath}.typed_config")
        elif kind == "config_discovery":
            raise ConfigError(
                f"{fpath}.config_discovery", "extension config discovery (ECDS) is not supported"
            )
        flt = ext.factory(cfg, ctx, fpath)
        if not flt.max_read_bytes and not hasattr(flt, "on_accept"):
            raise ConfigError(fpath, f"listener filter {f.name!r} reads no bytes and has no on_accept")
        has_original_dst = has_original_dst or ext.names[0] == ORIGINAL_DST_FILTER
        out.append(flt)
    return out, has_original_dst


# A listener filter's on_data may return this (instead of True/False) to close the connection.
LISTENER_FILTER_CLOSE = 2


class _ListenerFilterRun:
    """Runs a listener's filters over the peeked start of one accepted connection, then
    selects the filter chain. Bound: at most ``listener.peek_bytes`` (the filters' largest
    ``max_read_bytes``, 64 KiB for tls_inspector) are peeked; the socket's own receive buffer
    holds them."""

    __slots__ = (
        "conn",
        "delay",
        "fd",
        "info",
        "last_len",
        "listener",
        "loop",
        "pending",
        "reading",
        "timeout",
        "timer",
    )

    def __init__(
        self, listener: Listener, loop: asyncio.AbstractEventLoop, conn: socket.socket, info: ConnInfo
    ) -> None:
        self.listener = listener
        self.loop = loop
        self.conn = conn
        self.info = info
        self.pending = list(listener.listener_filters)
        self.fd = conn.fileno()
        self.last_len = -1
        self.delay = PEEK_RETRY_FIRST
        self.reading = False
        self.timer: asyncio.TimerHandle | None = None
        self.timeout: asyncio.TimerHandle | None = None

    def start(self) -> None:
        lst = self.listener
        lst.pre_cx_active.value += 1
        if lst.listener_filters_timeout:
            self.timeout = self.loop.call_later(lst.listener_filters_timeout, self._on_timeout)
        self.reading = True
        self.loop.add_reader(self.fd, self._peek)

    def _stop_io(self) -> None:
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.fd)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.timeout is not None:
            self.timeout.cancel()
            self.timeout = None
        self.listener.pre_cx_active.value -= 1

    def _peek(self) -> None:
        self.timer = None
        try:
            data = self.conn.recv(self.listener.peek_bytes, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            if not self.reading:
                self._retry_later()
            return
        except OSError:
            self._abort()
            return
        if not data:
            self._abort()  # closed before saying anything
            return
        if len(data) == self.last_len:
            self._retry_later()
            return
        self.last_len = len(data)
        still = []
        for f in self.pending:
            r = f.on_data(data, self.info)
            if r == LISTENER_FILTER_CLOSE:
                self._abort()  # the filter refuses the connection (e.g. an oversized ClientHello)
                return
            if not r:
                still.append(f)
        self.pending = still
        if not still or len(data) >= self.listener.peek_bytes:
            self._finish()
            return
        self._retry_later()

    def _retry_later(self) -> None:
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.fd)
        self.timer = self.loop.call_later(self.delay, self._peek)
        self.delay = min(self.delay * 2, PEEK_RETRY_MAX)

    def _finish(self) -> None:
        self._stop_io()
        try:
            self.listener._select_and_hand_over(self.conn, self.info)
        except Exception:
            log.exception("listener %s: connection handling failed", self.listener.name)
            self.conn.close()

    def _abort(self) -> None:
        self._stop_io()
        self.conn.close()

    def _on_timeout(self) -> None:
        self.timeout = None
        if self.listener.continue_on_listener_filters_timeout:
            self._finish()
            return
        self.listener.pre_cx_timeout.value += 1
        self._abort()
