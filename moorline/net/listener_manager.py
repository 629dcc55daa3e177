"""The listener manager: every listener by name; add, update and remove them while serving.

The server adds ``static_resources.listeners`` with ``add`` (they cannot be changed through the
dynamic API, as in Envoy) and the dynamic API (``add_or_update`` / ``remove``, which LDS will
drive) changes the others. A listener is a snapshot: an update compiles a new ``Listener``
(filter chains, HTTP connection managers, route tables) and swaps it in:

- **Same socket** (same address and socket options): the new listener takes the old one's
  listening socket (``Listener.take_over``). The port is never unbound, and connections waiting in
  the kernel's backlog are accepted with the new filter chains.
- **Other address**: the new address is bound first (a bind error rejects the update and the
  old listener keeps serving), then the old one stops accepting and its socket is closed.
- **Socket options changed on the same address**: rejected (``ConfigError``). A listening socket's
  options cannot be changed in place and a second socket on the port would drop the connections
  queued on the first when it closes; remove the listener and add it again instead.

The old listener then drains: it accepts nothing, every terminal filter is told to drain (the
HTTP connection manager answers in-flight requests with ``connection: close`` and closes idle
keep-alive connections; tcp_proxy connections run on) and after ``drain_time`` seconds whatever is
still open is cut. Connections accepted by the old listener keep its configuration to the end.
A removed listener stops accepting and closes its socket at once (the port is released) and
drains the same way.

Stats (Envoy's names): ``listener_manager.listener_added``, ``listener_modified``,
``listener_removed``, ``listener_create_success``, ``listener_create_failure`` (counters),
``total_listeners_active``, ``total_listeners_draining`` (gauges).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Iterator
from typing import Any

from moorline.config.errors import ConfigError
from moorline.config.util import addr_str
from moorline.config.warming import WarmingSet
from moorline.net.listener import Listener

log = logging.getLogger("moorline.listener")

# How often a draining listener checks whether its connections are gone (and at most a tenth
# of the drain time, so short drain times in tests end promptly).
DRAIN_POLL = 0.1


def _join(path: str, field: str) -> str:
    return f"{path}.{field}" if path else field


class DrainingListener:
    """A replaced or removed listener whose connections are draining."""

    __slots__ = ("deadline", "listener", "started", "task", "terminals")

    def __init__(self, listener: Listener, started: float, deadline: float) -> None:
        self.listener = listener
        self.started = started
        self.deadline = deadline
        self.terminals = [ch.terminal for ch in listener.filter_chains]
        self.task: asyncio.Task[None] | None = None

    def cut(self) -> None:
        """Close whatever is still open (the drain time is over, or the server stops)."""
        for t in self.terminals:
            c = getattr(t, "close_all", None)
            if c is not None:
                c()


def open_connections(terminal: Any) -> int:
    """Live downstream connections of a terminal network filter (0 when it cannot tell)."""
    f = getattr(terminal, "active_connections", None)
    return int(f()) if f is not None else 0


class ListenerManager:
    """Listeners by name, for the server (``moorline.server.Server.listener_manager``)."""

    def __init__(self, ctx: Any, drain_time: float = 600.0) -> None:
        self.ctx = ctx
        self.drain_time = drain_time
        self.listeners: dict[str, Listener] = {}
        # (ip, port) -> listener, for use_original_dst handoff; rebuilt whenever listeners change.
        self._by_address: dict[tuple[str, int], Listener] = {}
        self.draining: list[DrainingListener] = []
        # What a terminal's ``drain(decision)`` gets: True closes at once (Envoy's "immediate");
        # the server sets this for ``--drain-strategy gradual`` (net/ does not know the policy).
        self.drain_decision: Any = lambda: True
        self._loop: asyncio.AbstractEventLoop | None = None
        scope = ctx.stats.scope("listener_manager.")
        self._added = scope.counter("listener_added")
        self._modified = scope.counter("listener_modified")
        self._removed = scope.counter("listener_removed")
        self._create_success = scope.counter("listener_create_success")
        self._create_failure = scope.counter("listener_create_failure")
        self._active = scope.gauge("total_listeners_active")
        self._draining_gauge = scope.gauge("total_listeners_draining")
        # Dynamic listeners waiting for their first RDS / SDS resources (see add_or_update).
        self.warming: WarmingSet[Listener] = WarmingSet(scope.gauge("total_listeners_warming"))

    # -- reading -----------------------------------------------------------------------------

    def get(self, name: str) -> Listener | None:
        return self.listeners.get(name)

    def __iter__(self) -> Iterator[Listener]:
        return iter(list(self.listeners.values()))

    def __len__(self) -> int:
        return len(self.listeners)

    def find_by_destination(self, dst: tuple[str, int]) -> Listener | None:
        """The listener for a connection's original destination: the one on exactly that
        ``ip:port``, else the wildcard ``0.0.0.0:port`` / ``[::]:port`` of the same family.
        Listeners with ``bind_to_port: false`` count (they exist to be found here)."""
        by = self._by_address
        lst = by.get(dst)
        if lst is None:
            ip, port = dst
            lst = by.get(("::" if ":" in ip else "0.0.0.0", port))
        return lst

    def _reindex(self) -> None:
        by: dict[tuple[str, int], Listener] = {}
        for lst in self.listeners.values():
            kind, host, port = lst.address
            if kind != "tcp" or not port:
                continue
            try:
                host = ipaddress.ip_address(host).compressed
            except ValueError:
                continue
            by.setdefault((host, port), lst)
        self._by_address = by

    def _registered(self, lst: Listener) -> None:
        if lst.use_original_dst:
            lst.find_listener = self.find_by_destination
        self._reindex()
        self._active.value = len(self.listeners)

    def terminals(self) -> list[Any]:
        """Terminal filters of every listener still holding connections (active and draining)."""
        lsts = [*self.listeners.values(), *(d.listener for d in self.draining)]
        return [ch.terminal for lst in lsts for ch in lst.filter_chains]

    # -- changing ----------------------------------------------------------------------------

    def compile(self, proto: Any, path: str = "") -> Listener:
        """Compile without registering; ``ConfigError`` with the field path."""
        n = len(self.ctx.notices)
        lst = Listener(proto, self.ctx, path)
        if self._loop is not None:
            # Built while serving: the server's start-up logging has passed already.
            for msg in self.ctx.notices[n:]:
                log.info("listener %s: %s", lst.name, msg)
        return lst

    def add(self, proto: Any, path: str = "") -> Listener:
        """Add a static listener (``static_resources.listeners``); bound by ``start`` (or at
        once when the manager already runs). A duplicate name or address -> ``ConfigError``."""
        lst = self.compile(proto, path)
        if lst.name in self.listeners:
            if proto.name:
                raise ConfigError(_join(path, "name"), f"duplicate listener name {lst.name!r}")
            # Unnamed (named after the address, as several port-0 listeners may be): Envoy
            # makes up a unique name for such static listeners too.
            base, n = lst.name, 2
            while f"{base}#{n}" in self.listeners:
                n += 1
            lst.name = f"{base}#{n}"
        self._check_address(lst, path, None)
        lst.last_updated = time.time()
        self._bind_new(lst, path)
        self.listeners[lst.name] = lst
        self._added.value += 1
        self._registered(lst)
        return lst

    takes_compiled = True  # (xds.files.apply_resources hands over what its check compiled)

    def add_or_update(
        self, proto: Any, path: str = "", version_info: str = "", compiled: Listener | None = None
    ) -> Listener:
        """Add a dynamic listener, or replace the one of that name (see the module docstring).

        An unchanged proto keeps the running listener (only ``version_info`` is recorded).
        Errors (``ConfigError``: a bad proto, a static listener's name, an address another
        listener has, a bind failure) leave the running listeners as they were."""
        old = self.listeners.get(proto.name) if proto.name else None
        if old is not None and not old.added_via_api:
            raise ConfigError(
                _join(path, "name"),
                f"listener {proto.name!r} is static (static_resources) and cannot be updated",
            )
        if old is not None and old.proto == proto:
            old.version_info = version_info
            self.warming.pop(proto.name)
            return old
        warm = self.warming.get(proto.name) if proto.name else None
        if warm is not None and warm.proto == proto:
            warm.version_info = version_info
            return warm
        try:
            lst = compiled if compiled is not None else self.compile(proto, path)
        except ConfigError:
            self._create_failure.value += 1
            raise
        if old is None and lst.name in self.listeners:
            # No name in the proto: the address is the name, and that address is taken.
            raise ConfigError(_join(path, "name"), f"duplicate listener name {lst.name!r}")
        self._check_address(lst, path, old)
        lst.added_via_api = True
        lst.version_info = version_info
        lst.last_updated = time.time()
        if old is not None and old.address == lst.address and not old.same_socket(lst):
            raise ConfigError(
                _join(path, "socket_options"),
                f"listener {lst.name!r}: the socket options of a bound address cannot be changed in place; "
                "remove the listener and add it again",
            )
        self.warming.pop(lst.name)
        targets = lst.init_targets()
        if any(not t.ready for t in targets):
            # Warming: the listener waits aside for its routes / secrets (or the initial fetch
            # timeout); the listener it replaces, if any, keeps serving meanwhile.
            self.warming.add(lst.name, lst, targets, lambda w: self._warmed(w, path))
            return lst
        self._install(lst, path)
        return lst

    def _warmed(self, lst: Listener, path: str) -> None:
        try:
            self._install(lst, path)
        except ConfigError as e:  # (already ACKed: a bind that fails now can only be logged)
            log.warning("listener %s could not be started after warming: %s", lst.name, e)

    def _install(self, lst: Listener, path: str) -> None:
        """Put a compiled (and warmed) dynamic listener in service: bind it, or take over the
        socket of the one it replaces, which then drains."""
        old = self.listeners.get(lst.name)
        if old is None:
            self._bind_new(lst, path)
            self._added.value += 1
        else:
            loop = self._loop
            if loop is not None and old.serving and old.same_socket(lst):
                lst.take_over(old, loop)
                self._create_success.value += 1
            else:
                self._bind_new(lst, path)
            self._retire(old, close_socket=True)
            self._modified.value += 1
        self.listeners[lst.name] = lst
        self._registered(lst)

    def remove(self, name: str) -> bool:
        """Remove a dynamic listener: it stops accepting and its port is released at once; its
        connections drain. False when there is no dynamic listener of that name."""
        warm = self.warming.get(name) is not None
        self.warming.pop(name)
        lst = self.listeners.get(name)
        if lst is None or not lst.added_via_api:
            return warm
        del self.listeners[name]
        self._reindex()
        self._retire(lst, close_socket=True)
        self._removed.value += 1
        self._active.value = len(self.listeners)
        return True

    def _check_address(self, lst: Listener, path: str, replacing: Listener | None) -> None:
        kind, _host, port = lst.address
        if kind == "tcp" and not port:
            return  # port 0: the kernel picks a free one
        # (warming ones too: two new listeners on one address would both be ACKed, and the
        # second's bind fail when it warms, with no NACK to say so)
        warming = [w for w in self.warming.values() if w.name != lst.name]
        for other in [*self.listeners.values(), *warming]:
            if other is replacing or other.address != lst.address or not lst.bind_to_port:
                continue
            if other.bind_to_port:
                raise ConfigError(
                    _join(path, "address"),
                    f"listener {lst.name!r}: address {addr_str(lst.address)} is already used by "
                    f"listener {other.name!r}",
                )

    def _bind_new(self, lst: Listener, path: str) -> None:
        loop = self._loop
        if loop is None:
            return  # bound by start()
        try:
            lst.bind(loop)
        except OSError as e:
            self._create_failure.value += 1
            raise ConfigError(
                _join(path, "address"), f"cannot bind {addr_str(lst.address)}: {e.strerror or e}"
            ) from None
        self._create_success.value += 1
        log.info("listener %s on %s", lst.name, addr_str(lst.bound_address))

    def _retire(self, lst: Listener, close_socket: bool) -> None:
        """Stop accepting on ``lst`` (its socket may already belong to its successor) and drain
        its connections over ``drain_time``."""
        if close_socket:
            lst.stop_accepting()
        terminals = [ch.terminal for ch in lst.filter_chains]
        for t in terminals:
            d = getattr(t, "drain", None)
            if d is not None:
                d(self.drain_decision())
        loop = self._loop
        if loop is None or not any(open_connections(t) for t in terminals):
            for t in terminals:
                c = getattr(t, "close_all", None)
                if c is not None:
                    c()
            return
        now = loop.time()
        entry = DrainingListener(lst, time.time(), now + self.drain_time)
        self.draining.append(entry)
        self._draining_gauge.value = len(self.draining)
        entry.task = loop.create_task(self._drain(entry))

    async def _drain(self, entry: DrainingListener) -> None:
        loop = asyncio.get_running_loop()
        poll = max(0.01, min(DRAIN_POLL, self.drain_time / 10))
        while loop.time() < entry.deadline and any(open_connections(t) for t in entry.terminals):
            await asyncio.sleep(poll)
        entry.cut()  # past the drain time: cut what is still open
        if entry in self.draining:
            self.draining.remove(entry)
        self._draining_gauge.value = len(self.draining)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Bind every listener added so far; from now on additions bind at once. Raises
        ``OSError`` when a static listener cannot be bound (the server cannot start)."""
        loop = loop or asyncio.get_running_loop()
        for lst in self.listeners.values():
            lst.bind(loop)
            self._create_success.value += 1
            log.info("listener %s on %s", lst.name, addr_str(lst.bound_address))
        self._loop = loop

    def stop_accepting(self, only: list[Listener] | None = None) -> None:
        """Server drain: every listener (or those in ``only``) stops accepting (sockets
        closed); connections stay."""
        for lst in self.listeners.values() if only is None else only:
            lst.stop_accepting()

    def close(self) -> None:
        """Server stop: close every listening socket and cut what the drains still hold."""
        for lst in self.listeners.values():
            lst.close()
        for d in self.draining:
            if d.task is not None:
                d.task.cancel()
            d.cut()
        self.draining.clear()
        self._draining_gauge.value = 0
        self._loop = None
