"""The cluster manager: every compiled cluster by name, one shared DNS resolver.

Static clusters (``static_resources.clusters``) are added with ``add``; the public API that CDS
will drive adds, replaces and removes dynamic ones while traffic flows (``add_or_update`` /
``remove``). A cluster added after ``start()`` is started (first DNS round) in the background.

A cluster is a snapshot: an update compiles a new ``Cluster`` object and the old one is retired
(``Cluster.retire``): requests already routed to it finish there, its hosts' pools drain (idle
connections close at once, busy ones after their request), its DNS refresh and timers stop, and
it is freed when the last request on it ends. Nothing about a cluster lives outside its object,
so nothing else has to be cleaned up. Stats are kept by name in the store, so the replacement
counts on in the same ``cluster.<name>.*`` stats.

Stats: ``cluster_manager.cluster_added``, ``cluster_modified``, ``cluster_removed``,
``cluster_updated`` (counters), ``active_clusters`` (gauge), as Envoy names them.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from typing import Any

from moorline.config.errors import ConfigError
from moorline.config.warming import WarmingSet
from moorline.observability.stats import Store
from moorline.upstream.api import EdsSourceFactory, HealthConnect, TransportFactory
from moorline.upstream.cluster import Cluster, compile_cluster
from moorline.upstream.dns import Resolver


class ClusterManager:
    def __init__(
        self,
        store: Store,
        loop: asyncio.AbstractEventLoop | None = None,
        resolver: Resolver | None = None,
        rng: random.Random | None = None,
        transport_factory: TransportFactory | None = None,
        eds_sources: EdsSourceFactory | None = None,
        health_connect: HealthConnect | None = None,
    ) -> None:
        self.store = store
        # What active health checks connect with (moorline.net.upstream.connect, from the server).
        self.health_connect = health_connect
        self.eds_sources = eds_sources
        self.clusters: dict[str, Cluster] = {}
        self.resolver = resolver or Resolver()
        self.transport_factory = transport_factory
        self._loop = loop
        self._rng = rng
        self._started = False
        # Background starts of clusters added while running; bounded by the clusters themselves.
        self._starting: set[asyncio.Task[None]] = set()
        scope = store.scope("cluster_manager.")
        self._added = scope.counter("cluster_added")
        self._modified = scope.counter("cluster_modified")
        self._removed = scope.counter("cluster_removed")
        self._updated = scope.counter("cluster_updated")
        self._active = scope.gauge("active_clusters")
        # Dynamic clusters waiting for their first EDS assignment (see add_or_update).
        self.warming: WarmingSet[Cluster] = WarmingSet(scope.gauge("warming_clusters"))
        # The bootstrap's cluster_manager.outlier_detection.event_log_path (outlier.EventLog).
        self.outlier_event_log: Any = None

    # -- reading -----------------------------------------------------------------------------

    def get(self, name: str) -> Cluster | None:
        return self.clusters.get(name)

    def __iter__(self) -> Iterator[Cluster]:
        return iter(list(self.clusters.values()))

    def __len__(self) -> int:
        return len(self.clusters)

    def __contains__(self, name: object) -> bool:
        return name in self.clusters

    # -- changing ----------------------------------------------------------------------------

    def compile(self, proto: Any, path: str = "") -> Cluster:
        """Compile without registering (validate mode); errors prefixed with ``path``."""
        try:
            c = compile_cluster(proto, self.store, self.resolver, self._rng, self.transport_factory)
        except ConfigError as e:
            raise e.prefixed(path) from None
        c.health_connect = self.health_connect
        if c.outlier is not None:
            c.outlier.event_log = self.outlier_event_log
        return c

    def add(self, proto: Any, path: str = "") -> Cluster:
        """Add a static cluster (``static_resources``): it cannot be updated or removed through
        the dynamic API. A name already present -> ``ConfigError(path + ".name")``."""
        if proto.name in self.clusters:
            p = f"{path}.name" if path else "name"
            raise ConfigError(p, f"duplicate cluster name {proto.name!r}")
        c = self.compile(proto, path)
        self._follow_eds(c, proto, path)
        c.last_updated = time.time()
        self._register(c)
        return c

    takes_compiled = True  # (xds.files.apply_resources hands over what its check compiled)

    def add_or_update(
        self, proto: Any, path: str = "", version_info: str = "", compiled: Cluster | None = None
    ) -> Cluster:
        """Add a dynamic cluster, or replace the one of that name (CDS semantics).

        An unchanged proto keeps the running cluster (only ``version_info`` is recorded). A
        changed one is compiled into a new ``Cluster`` that takes over at once; the old one is
        retired (see the module docstring). Membership that only arrives at run time is carried
        over so traffic never sees an empty cluster: EDS hosts until the next assignment, DNS
        hosts until the next resolution (when the names to resolve are the same). A static
        cluster's name -> ``ConfigError(path + ".name")``; a bad proto -> ``ConfigError`` and the
        running cluster stays."""
        old = self.clusters.get(proto.name)
        if old is not None and not old.added_via_api:
            p = f"{path}.name" if path else "name"
            raise ConfigError(p, f"cluster {proto.name!r} is static (static_resources) and cannot be updated")
        if old is not None and old.proto is not None and old.proto == proto:
            old.version_info = version_info
            self._drop_warming(proto.name)
            return old
        warm = self.warming.get(proto.name)
        if warm is not None and warm.proto == proto:
            warm.version_info = version_info
            return warm
        c = compiled if compiled is not None else self.compile(proto, path)
        c.added_via_api = True
        c.version_info = version_info
        c.last_updated = time.time()
        same_eds = (
            old is not None and c.type == old.type == "EDS" and c.eds_service_name == old.eds_service_name
        )
        if same_eds:
            assert old is not None
            # (the assignment's overprovisioning factor comes with its hosts; locality weights
            # are on the hosts)
            c.overprovisioning = old.overprovisioning
            c.update_hosts([h.copy_for(c) for h in old.hosts])
        self._follow_eds(c, proto, path)  # (a file source replaces the carried-over hosts)
        self._drop_warming(c.name)
        if any(not t.ready for t in c.init_targets):
            # Warming: the cluster waits for its first assignment (or the initial fetch timeout)
            # aside; the cluster it replaces, if any, serves meanwhile.
            self.warming.add(c.name, c, c.init_targets, self._install)
            if c.health_checker is not None:
                self._start_later(c)  # (its first health check round runs while it warms)
            return c
        self._install(c)
        return c

    def _drop_warming(self, name: str) -> None:
        c = self.warming.pop(name)
        if c is not None:
            c.retire()  # (never served: nothing to drain, but its EDS subscription stops applying)

    def _install(self, c: Cluster) -> None:
        """Put a compiled (and warmed) dynamic cluster in service, retiring the one it replaces."""
        old = self.clusters.get(c.name)
        if old is None:
            self._register(c)
            return
        if c.type == old.type and c.type in ("STRICT_DNS", "LOGICAL_DNS") and c._endpoints == old._endpoints:
            c._resolved = dict(old._resolved)
            c.update_hosts([h.copy_for(c) for h in old.hosts])
        # Whoever watched the old cluster's membership watches the new one.
        c.on_membership_change.extend(old.on_membership_change)
        self.clusters[c.name] = c
        old.retire()
        self._modified.value += 1
        self._updated.value += 1
        self._start_later(c)

    def _follow_eds(self, c: Cluster, proto: Any, path: str) -> None:
        """An EDS cluster whose ``eds_config`` the server serves gets its subscription now (its
        first assignment applied, or ``ConfigError``), kept on the cluster."""
        if self.eds_sources is None or c.type != "EDS" or not proto.eds_cluster_config.HasField("eds_config"):
            return
        p = f"{path}.eds_cluster_config.eds_config" if path else "eds_cluster_config.eds_config"
        sub = self.eds_sources(c, proto.eds_cluster_config.eds_config, p)
        if sub is None:
            c.notice(
                "eds_cluster_config.eds_config: this EDS source is not served (EDS comes from files, or "
                "over ADS for clusters the ADS stream pushes): the cluster has no endpoints"
            )
        c.eds_subscription = sub

    def remove(self, name: str) -> bool:
        """Remove a dynamic cluster: routing to it answers "no cluster" from now on; requests
        already on it finish and its connections drain. False when there is no dynamic cluster
        of that name (static clusters stay, as in Envoy)."""
        warm = self.warming.get(name) is not None
        self._drop_warming(name)
        c = self.clusters.get(name)
        if c is None or not c.added_via_api:
            return warm
        del self.clusters[name]
        # The membership gauges of a removed cluster read 0 (the stats themselves stay).
        c.update_hosts([])
        c.retire()
        self._removed.value += 1
        self._active.value = len(self.clusters)
        return True

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

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every cluster concurrently (and the warming ones with health checks); returns
        when each finished its first DNS round and its first health check round (Envoy starts
        no listener before that)."""
        self._started = True
        warming = [c for c in self.warming.values() if c.health_checker is not None]
        await asyncio.gather(*(c.start() for c in list(self.clusters.values()) + warming))

    def stop(self) -> None:
        self._started = False
        for t in list(self._starting):
            t.cancel()
        for c in self.clusters.values():
            c.stop()
        for c in self.warming.values():
            c.stop()  # (health checks of a cluster that warms)
