"""The live downstream connections of one connection manager, and their one timer.

``ServerConnections`` is the runtime half of an HTTP connection manager (the compiled half is
``proxy.hcm.HcmConfig``): the set of connections its listener accepted, whether it is
draining, and a single sweep timer. Every ``period`` seconds the sweep calls ``on_tick(now)``
on each connection, which checks that connection's deadlines (idle, request-header, stream
idle, request, route and duration timeouts). One timer per connection manager instead of one
per connection: an idle keep-alive connection holds no timer object, and the loop's timer heap
holds one entry per listener, not one per connection.

The timer runs only while there are connections (``HcmConfig`` always gives it a period: a
tenth of the shortest timeout, or 1 s; HTTP/2 GOAWAYs on drain from the sweep). A deadline fires at most ``period`` late (a tenth of the shortest timeout,
between 10 ms and 1 s, see ``HcmConfig``).

Idle connections are swept less often. A connection added with ``idle_aware=True`` (HTTP/1.1)
says when it is ``busy`` (a request head arriving, a stream open) and when it is idle again; an
idle one has only the connection deadlines (idle timeout, max connection duration), so it is
ticked every ``idle_period`` (a tenth of the shorter of those two, 10 ms to 1 s) instead of every
``period``. Otherwise a short route timeout (period 10 ms) would tick every idle keep-alive
connection a hundred times a second: 4,000 idle connections cost 16% of a core that way.
Connections that do not say (HTTP/2) are always busy.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol


class GradualDrain:
    """``ServerConnections.draining`` under Envoy's ``--drain-strategy gradual``: truthy with a
    probability that grows linearly from 0 when the drain starts to 1 at ``span`` seconds, so
    each response (HTTP/1.1 ``connection: close``) or new stream (HTTP/2 GOAWAY) asks once and
    the connections close spread over the drain time instead of all at once. ``clock`` and
    ``rand`` are passed in (tests fix both)."""

    __slots__ = ("clock", "rand", "span", "start")

    def __init__(self, span: float, clock: Any, rand: Any) -> None:
        self.clock = clock
        self.rand = rand
        self.span = span
        self.start = clock()

    def __bool__(self) -> bool:
        elapsed = self.clock() - self.start
        if self.span <= 0 or elapsed >= self.span:
            return True
        return bool(self.rand() < elapsed / self.span)


class Tickable(Protocol):
    closed: bool

    def on_tick(self, now: float) -> None: ...


class ServerConnections:
    __slots__ = (
        "_date",
        "_date_sec",
        "_handle",
        "_loop",
        "_next_full",
        "busy",
        "conns",
        "draining",
        "idle_period",
        "period",
    )

    def __init__(self, period: float = 0.0, idle_period: float = 1.0) -> None:
        self.conns: set[Any] = set()
        # Ticked every ``period``: connections with a request in progress, and those that do
        # not report it (the rest only every ``idle_period``).
        self.busy: set[Any] = set()
        # False, True (drain now: Envoy's "immediate") or a GradualDrain; only read once
        # a drain started, so serving costs nothing extra.
        self.draining: Any = False
        self.period = period
        self.idle_period = max(period, idle_period)
        self._next_full = 0.0
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._date_sec = -1
        self._date = b""

    def http_date(self) -> bytes:
        """The ``date`` of this manager's responses (RFC 9110 IMF-fixdate), formatted at most
        once per second."""
        now = int(time.time())
        if now != self._date_sec:
            self._date_sec = now
            self._date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now)).encode()
        return self._date

    def __len__(self) -> int:
        return len(self.conns)

    def __iter__(self) -> Any:
        return iter(list(self.conns))

    def __contains__(self, conn: object) -> bool:
        return conn in self.conns

    def add(self, conn: Tickable, loop: asyncio.AbstractEventLoop, idle_aware: bool = False) -> None:
        """Track ``conn``. With ``idle_aware`` it starts idle and adds itself to ``busy`` while a
        request is in progress (``busy.add`` / ``busy.discard``); else it is always busy."""
        self.conns.add(conn)
        if not idle_aware:
            self.busy.add(conn)
        if self._handle is None and self.period:
            self._loop = loop
            self._handle = loop.call_later(self.period, self._sweep)

    def discard(self, conn: Any) -> bool:
        """Forget ``conn``; True if it was known (its close is counted once)."""
        if conn not in self.conns:
            return False
        self.conns.discard(conn)
        self.busy.discard(conn)
        if not self.conns and self._handle is not None:
            self._handle.cancel()
            self._handle = None
        return True

    def set_period(self, period: float, idle_period: float | None = None) -> None:
        """The shortest configured timeout changed (a route update)."""
        self.period = period
        self.idle_period = max(period, self.idle_period if idle_period is None else idle_period)
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if period and self.conns and self._loop is not None:
            self._handle = self._loop.call_later(period, self._sweep)

    def _sweep(self) -> None:
        loop = self._loop
        assert loop is not None
        now = loop.time()
        if now >= self._next_full or len(self.busy) == len(self.conns):
            self._next_full = now + self.idle_period
            ticked = list(self.conns)
        else:
            ticked = list(self.busy)
        for c in ticked:
            if not c.closed:
                c.on_tick(now)
        if self.conns and self.period:
            self._handle = loop.call_later(self.period, self._sweep)
        else:
            self._handle = None

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
