"""ServerConnections: one sweep timer per connection manager, not one per connection."""

from __future__ import annotations

from typing import Any

import pytest

from moorline.stream.connections import ServerConnections


class FakeLoop:
    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[list[Any]] = []  # [when, fn, cancelled]

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, fn: Any) -> Any:
        t = [self.now + delay, fn, False]
        self.timers.append(t)
        loop = self

        class H:
            def cancel(self) -> None:
                t[2] = True
                if t in loop.timers:
                    loop.timers.remove(t)

        return H()

    def advance(self, dt: float) -> None:
        self.now += dt
        for t in sorted(self.timers, key=lambda t: t[0]):
            if t[0] <= self.now and not t[2] and t in self.timers:
                self.timers.remove(t)
                t[1]()


class Conn:
    def __init__(self) -> None:
        self.closed = False
        self.ticks: list[float] = []

    def on_tick(self, now: float) -> None:
        self.ticks.append(now)


def test_one_timer_for_all_connections_and_none_when_empty() -> None:
    loop = FakeLoop()
    sc = ServerConnections(0.5)
    a, b = Conn(), Conn()
    sc.add(a, loop)  # type: ignore[arg-type]
    sc.add(b, loop)  # type: ignore[arg-type]
    assert len(loop.timers) == 1
    loop.advance(0.5)
    loop.advance(0.5)
    assert a.ticks == [0.5, 1.0] and b.ticks == [0.5, 1.0]
    b.closed = True
    loop.advance(0.5)
    assert b.ticks == [0.5, 1.0] and a.ticks[-1] == 1.5  # a closed connection is not ticked
    assert sc.discard(a) and sc.discard(b) and not sc.discard(b)  # counted once
    assert loop.timers == []  # no connections: no timer


def test_period_change_rearms_the_sweep() -> None:
    loop = FakeLoop()
    sc = ServerConnections(1.0)
    c = Conn()
    sc.add(c, loop)  # type: ignore[arg-type]
    sc.set_period(0.1)
    assert len(loop.timers) == 1 and loop.timers[0][0] == 0.1
    loop.advance(0.1)
    assert c.ticks == [0.1]
    sc.stop()
    assert loop.timers == []


def test_the_date_is_formatted_once_per_second_per_manager(monkeypatch: pytest.MonkeyPatch) -> None:
    from moorline.stream import connections

    clock = [1_780_000_000.2]
    monkeypatch.setattr(connections.time, "time", lambda: clock[0])
    sc = connections.ServerConnections()
    first = sc.http_date()
    assert first == b"Thu, 28 May 2026 20:26:40 GMT"
    clock[0] += 0.5
    assert sc.http_date() is first  # same second: not formatted again
    clock[0] += 1.0
    assert sc.http_date() == b"Thu, 28 May 2026 20:26:41 GMT"
    # Each manager keeps its own (no module-level cache).
    assert connections.ServerConnections().http_date() == b"Thu, 28 May 2026 20:26:41 GMT"


def test_idle_connections_are_ticked_only_every_idle_period() -> None:
    loop = FakeLoop()
    sc = ServerConnections(0.125, idle_period=1.0)  # (binary fractions: exact sums)
    idle, busy, other = Conn(), Conn(), Conn()
    sc.add(idle, loop, idle_aware=True)  # type: ignore[arg-type]
    sc.add(busy, loop, idle_aware=True)  # type: ignore[arg-type]
    sc.add(other, loop)  # type: ignore[arg-type]  # not idle-aware: always busy
    sc.busy.add(busy)
    for _ in range(8):
        loop.advance(0.125)
    assert len(busy.ticks) == 8 and len(other.ticks) == 8
    assert idle.ticks == [0.125]  # the first sweep is a full one, then one per idle period
    loop.advance(0.125)
    assert idle.ticks == [0.125, 1.125]
    sc.busy.discard(busy)  # its request finished
    for _ in range(4):
        loop.advance(0.125)
    assert len(busy.ticks) == 9 and len(other.ticks) == 13
    assert sc.discard(busy) and busy not in sc.busy


def test_a_route_update_keeps_the_idle_period_at_least_the_period() -> None:
    sc = ServerConnections(0.01, idle_period=1.0)
    sc.set_period(2.0)
    assert sc.idle_period == 2.0
    sc.set_period(0.01, 0.5)
    assert sc.idle_period == 0.5
