"""The cluster manager: every compiled cluster by name, one shared DNS resolver.

Static clusters are added before ``start()``; CDS adds, replaces and removes clusters while
running (``add_or_update`` / ``remove``), and a cluster added after ``start()`` is started at once.
Stats: ``cluster_manager.cluster_added``, ``cluster_modified``, ``cluster_removed`` (counters),
``active_clusters`` (gauge), as Envoy names them.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

from moorline.config.errors import ConfigError
from moorline.observability.stats import Store
from moorline.upstream.cluster import Cluster, compile_cluster
from moorline.upstream.dns import Resolver


class ClusterManager:
    def __init__(
        self,
        store: Store,
        loop: asyncio.AbstractEventLoop | None = None,
        resolver: Resolver | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.clusters: dict[str, Cluster] = {}
        self.resolver = resolver or Resolver()
        self._loop = loop
        self._rng = rng
        self._started = False
        # Background starts of clusters added while running; bounded by the clusters themselves.
        self._starting: set[asyncio.Task[None]] = set()
        scope = store.scope("cluster_manager.")
        self._added = scope.counter("cluster_added")
        self._modified = scope.counter("cluster_modified")
        self._removed = scope.counter("cluster_removed")
        self._active = scope.gauge("active_clusters")

    def compile(self, proto: Any, path: str = "") -> Cluster:
        """Compile without registering (validate mode); errors prefixed with ``path``."""
        try:
            return compile_cluster(proto, self.store, self.resolver, self._rng)
        except ConfigError as e:
            raise e.prefixed(path) from None

    def add(self, proto: Any, path: str = "") -> Cluster:
        """Compile and register; a name already present -> ``ConfigError(path + ".name")``."""
        if proto.name in self.clusters:
            p = f"{path}.name" if path else "name"
            raise ConfigError(p, f"duplicate cluster name {proto.name!r}")
        c = self.compile(proto, path)
        self._register(c)
        return c

    def add_or_update(self, proto: Any, path: str = "") -> Cluster:
        """CDS: add a new cluster, keep an unchanged one, replace a changed one (the old one is
        stopped; an EDS cluster keeps its hosts until the next assignment arrives)."""
        old = self.clusters.get(proto.name)
        if old is None:
            return self.add(proto, path)
        if old.proto is not None and old.proto == proto:
            return old
        c = self.compile(proto, path)
        # Keep serving the old members until the new cluster has its own: EDS until the next
        # assignment, DNS types until their next resolution (same names to resolve only).
        if c.type == old.type == "EDS" and c.eds_service_name == old.eds_service_name:
            c.update_hosts(old.hosts)
        elif (
            c.type == old.type and c.type in ("STRICT_DNS", "LOGICAL_DNS") and c._endpoints == old._endpoints
        ):
            c._resolved = dict(old._resolved)
            c.update_hosts(old.hosts)
        # Whoever watched the old cluster's membership (pools) watches the new one.
        c.on_membership_change.extend(old.on_membership_change)
        old.stop()
        self.clusters[c.name] = c
        self._modified.value += 1
        self._start_later(c)
        return c

    def _register(self, c: Cluster) -> None:
        self.clusters[c.name] = c
        self._added.value += 1
        self._active.value = len(self.clusters)
        self._start_later(c)

    def _start_later(self, c: Cluster) -> None:
        if not self._started:
            return
        task = asyncio.get_running_loop().create_task(c.start())
        self._starting.add(task)
        task.add_done_callback(self._starting.discard)

    def get(self, name: str) -> Cluster | None:
        return self.clusters.get(name)

    def remove(self, name: str) -> None:
        c = self.clusters.pop(name, None)
        if c is None:
            return
        c.stop()
        # Removed clusters drain like removed hosts: mark every host and tell the watchers.
        c.update_hosts([])
        self._removed.value += 1
        self._active.value = len(self.clusters)

    async def start(self) -> None:
        """Start every cluster concurrently; returns when each finished its first DNS round."""
        self._started = True
        await asyncio.gather(*(c.start() for c in list(self.clusters.values())))

    def stop(self) -> None:
        self._started = False
        for t in list(self._starting):
            t.cancel()
        for c in self.clusters.values():
            c.stop()
