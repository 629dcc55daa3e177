"""Warming: what a listener or cluster waits for before it takes traffic.

A dynamic cluster whose endpoints come over xDS waits for its first ``ClusterLoadAssignment``;
a listener whose connection manager takes its routes over RDS waits for its route configuration
(and a TLS context for its SDS secrets). Each such wait is an ``InitTarget``, made by whoever
subscribes (``xds.ads`` targets) and marked done when the resource arrives or the source's
``initial_fetch_timeout`` passes. The cluster and listener managers hold a warming resource
aside, the previous one serving meanwhile, and swap it in when every target of it is done.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class InitTarget:
    """One thing to wait for. ``done()`` runs the waiters once; later calls do nothing."""

    __slots__ = ("_waiters", "name", "ready", "timed_out")

    def __init__(self, name: str) -> None:
        self.name = name
        self.ready = False
        self.timed_out = False
        self._waiters: list[Callable[[], None]] = []

    def done(self) -> None:
        if self.ready:
            return
        self.ready = True
        waiters, self._waiters = self._waiters, []
        for cb in waiters:
            cb()

    def when_ready(self, cb: Callable[[], None]) -> None:
        if self.ready:
            cb()
        else:
            self._waiters.append(cb)

    def forget(self, cb: Callable[[], None]) -> None:
        """Withdraw a waiter that has not run (what waited is gone)."""
        try:
            self._waiters.remove(cb)
        except ValueError:
            pass

    def __repr__(self) -> str:
        return f"InitTarget({self.name!r}, ready={self.ready})"


def pending(targets: Iterable[InitTarget]) -> list[InitTarget]:
    return [t for t in targets if not t.ready]


def when_all_ready(targets: Iterable[InitTarget], cb: Callable[[], None]) -> Callable[[], None]:
    """Run ``cb`` once, when every target is done (at once when they already are). Returns what
    withdraws ``cb`` from the targets not done yet: a target may outlive the resource warming on
    it (an SDS secret shared by listeners), and its waiters would keep a replaced or removed
    resource alive until it is done, which may be never."""
    waiting = pending(targets)
    if not waiting:
        cb()
        return _nothing
    left = [len(waiting)]

    def one() -> None:
        left[0] -= 1
        if left[0] == 0:
            cb()

    for t in waiting:
        t.when_ready(one)

    def cancel() -> None:
        for t in waiting:
            t.forget(one)

    return cancel


def _nothing() -> None:
    pass


class WarmingSet(Generic[T]):
    """A manager's resources that wait aside for their init targets, by name (the listener and
    cluster managers each keep one): at most one per name, counted by ``gauge``. Iterating gives
    the names; ``values()`` the resources."""

    __slots__ = ("_cancel", "_items", "gauge")

    def __init__(self, gauge: Any) -> None:
        self.gauge = gauge
        self._items: dict[str, T] = {}
        self._cancel: dict[str, Callable[[], None]] = {}

    def add(self, name: str, item: T, targets: Iterable[InitTarget], on_ready: Callable[[T], None]) -> None:
        """Hold ``item`` until every target is done, then hand it to ``on_ready`` (unless it
        was popped or replaced meanwhile). The caller pops any previous one first."""
        self._items[name] = item
        self.gauge.value = len(self._items)
        self._cancel[name] = when_all_ready(targets, lambda: self._ready(name, item, on_ready))

    def _ready(self, name: str, item: T, on_ready: Callable[[T], None]) -> None:
        if self._items.get(name) is not item:
            return  # replaced or removed while it warmed
        del self._items[name]
        self._cancel.pop(name, None)
        self.gauge.value = len(self._items)
        on_ready(item)

    def pop(self, name: str) -> T | None:
        """Drop the resource warming under ``name`` (withdrawing its waiters); it, or None."""
        item = self._items.pop(name, None)
        if item is not None:
            self.gauge.value = len(self._items)
            cancel = self._cancel.pop(name, None)
            if cancel is not None:
                cancel()
        return item

    def get(self, name: str) -> T | None:
        return self._items.get(name)

    def values(self) -> list[T]:
        return list(self._items.values())

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._items))

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __len__(self) -> int:
        return len(self._items)


__all__ = ["InitTarget", "WarmingSet", "pending", "when_all_ready"]
