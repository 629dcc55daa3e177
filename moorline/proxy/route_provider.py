"""Route-config providers: where an HTTP connection manager gets its current route table.

A provider holds one compiled ``RouteTable`` snapshot (``current``) and swaps it whole on
``update``; a stream reads ``current`` once when its headers arrive and keeps that snapshot to its
end, so an update never changes the routes under a request in flight. ``route_config`` inline in
the HCM gets a provider of its own (Envoy's static route config); RDS will share one provider per
``route_config_name`` between the HCMs that name it.

Subscribers (``subscribe(callback)``, held weakly) run after each update: the HCM recomputes its
timer period from the new routes' timeouts.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from typing import Any

from moorline.proxy.route_table import RouteTable


class RouteConfigProvider:
    __slots__ = ("_subs", "current", "last_updated", "name", "proto", "static", "version_info")

    def __init__(
        self, table: RouteTable, proto: Any = None, version_info: str = "", static: bool = True
    ) -> None:
        self.current = table
        self.proto = proto  # the RouteConfiguration compiled, for /config_dump
        self.name: str = getattr(proto, "name", "") or ""
        self.version_info = version_info
        self.static = static
        self.last_updated = time.time()
        self._subs: list[weakref.WeakMethod[Any]] = []

    def update(self, table: RouteTable, proto: Any = None, version_info: str = "") -> None:
        """Swap in a new snapshot; streams that already started keep the one they read."""
        self.current = table
        if proto is not None:
            self.proto = proto
            self.name = getattr(proto, "name", "") or self.name
        self.version_info = version_info
        self.last_updated = time.time()
        live = []
        for r in self._subs:
            cb = r()
            if cb is not None:
                live.append(r)
                cb()
        self._subs = live

    def subscribe(self, callback: Callable[[], None]) -> None:
        """``callback`` (a bound method, held weakly) runs after every ``update``."""
        self._subs.append(weakref.WeakMethod(callback))  # type: ignore[arg-type]
