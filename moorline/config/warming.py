"""Warming: what a listener or cluster waits for before it takes traffic.

A dynamic cluster whose endpoints come over xDS waits for its first ``ClusterLoadAssignment``;
a listener whose connection manager takes its routes over RDS waits for its route configuration
(and a TLS context for its SDS secrets). Each such wait is an ``InitTarget``, made by whoever
subscribes (``xds.ads`` targets) and marked done when the resource arrives or the source's
``initial_fetch_timeout`` passes. The cluster and listener managers hold a warming resource
aside, the previous one serving meanwhile, and swap it in when every target of it is done.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable


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


__all__ = ["InitTarget", "pending", "when_all_ready"]
