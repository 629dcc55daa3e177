"""The cluster manager: static and dynamic clusters, updates as new snapshots, removal, and what
a replaced or removed cluster takes with it (pools, timers), driven through its public API,
also while traffic flows through an in-process server."""

from __future__ import annotations

import asyncio
import gc
import http.client
import socket
import threading
import time
import weakref
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from google.protobuf import json_format

from moorline.config.errors import ConfigError
from moorline.observability.stats import Store
from moorline.stream import http1_client, http2_client
from moorline.testing.inproc import ServerThread
from moorline.testing.procs import bootstrap, cluster, free_port, hcm_listener
from moorline.testing.upstream import TestUpstream
from moorline.upstream.cluster import Host
from moorline.upstream.manager import ClusterManager

LA0 = "load_assignment.endpoints[0].lb_endpoints"


def proto(d: dict[str, Any]) -> Any:
    return json_format.ParseDict(d, cluster_pb2.Cluster())


def static(name: str, *ports: int, **extra: Any) -> Any:
    return proto(cluster(name, list(ports), **extra))


def test_static_clusters_reject_duplicates_and_prefix_paths() -> None:
    m = ClusterManager(Store())
    a = m.add(static("a", 80), "static_resources.clusters[0]")
    assert not a.added_via_api and a.last_updated > 0
    with pytest.raises(ConfigError) as ei:
        m.add(static("a", 80), "static_resources.clusters[1]")
    assert ei.value.path == "static_resources.clusters[1].name" and "duplicate" in ei.value.message
    with pytest.raises(ConfigError) as ei:
        m.add(static("b", 0), "static_resources.clusters[2]")
    assert (
        ei.value.path == f"static_resources.clusters[2].{LA0}[0].endpoint.address.socket_address.port_value"
    )
    assert "b" not in m
    # Static clusters are not the dynamic API's to change.
    with pytest.raises(ConfigError) as ei:
        m.add_or_update(static("a", 81), "clusters[0]")
    assert ei.value.path == "clusters[0].name" and "static" in ei.value.message
    assert m.remove("a") is False and m.get("a") is a


def test_dynamic_lifecycle_versions_and_stats() -> None:
    store = Store()
    m = ClusterManager(store)
    a = m.add_or_update(static("a", 80), "", "v1")
    assert a.added_via_api and a.version_info == "v1" and m.get("a") is a
    # Unchanged: the running object stays, the version is recorded.
    assert m.add_or_update(static("a", 80), "", "v2") is a and a.version_info == "v2"
    calls: list[int] = []
    a.on_membership_change.append(lambda: calls.append(1))
    a.stats.upstream_rq_total.value += 7
    a.active_retries = 2
    a2 = m.add_or_update(static("a", 81), "", "v3")
    assert a2 is not a and m.get("a") is a2 and a2.hosts[0].port == 81 and a2.version_info == "v3"
    assert a2.last_updated >= a.last_updated
    # The old snapshot is retired; its hosts left; the watchers follow the name.
    assert a.retired and a.hosts[0].removed and not a2.retired
    assert len(a2.on_membership_change) == 1
    # Same Envoy stat names: the counters go on; the retry slots belong to the old object.
    assert a2.stats.upstream_rq_total is a.stats.upstream_rq_total
    assert store.counter("cluster.a.upstream_rq_total").value == 7
    assert a2.active_retries == 0 and a.active_retries == 2
    m.add_or_update(static("b", 80))
    assert [c.name for c in m] == ["a", "b"] and len(m) == 2 and "b" in m
    h = a2.hosts[0]
    assert m.remove("a") is True
    assert h.removed and calls == [1] and m.get("a") is None and a2.retired
    assert store.gauge("cluster.a.membership_total").value == 0
    assert m.remove("nope") is False
    assert store.counter("cluster_manager.cluster_added").value == 2
    assert store.counter("cluster_manager.cluster_modified").value == 1
    assert store.counter("cluster_manager.cluster_removed").value == 1
    assert store.gauge("cluster_manager.active_clusters").value == 1


def test_bad_update_keeps_the_running_cluster() -> None:
    m = ClusterManager(Store())
    a = m.add_or_update(static("a", 80))
    with pytest.raises(ConfigError) as ei:
        m.add_or_update(static("a", 0), "clusters[0]")
    assert ei.value.path.startswith("clusters[0].load_assignment")
    assert m.get("a") is a and not a.retired


def test_eds_update_keeps_members_as_new_hosts() -> None:
    m = ClusterManager(Store())
    e = m.add_or_update(proto({"name": "e", "type": "EDS"}))
    e.update_load_assignment(
        json_format.ParseDict(
            {
                "cluster_name": "e",
                "endpoints": [
                    {
                        "lb_endpoints": [
                            {
                                "endpoint": {
                                    "address": {"socket_address": {"address": "10.0.0.1", "port_value": 80}}
                                }
                            }
                        ]
                    }
                ],
            },
            endpoint_pb2.ClusterLoadAssignment(),
        )
    )
    (old_host,) = e.hosts
    e2 = m.add_or_update(proto({"name": "e", "type": "EDS", "connect_timeout": "1s"}))
    assert e2.connect_timeout == 1.0 and [h.addr_str for h in e2.hosts] == ["10.0.0.1:80"]
    assert e2.hosts[0] is not old_host and e2.hosts[0].cluster is e2 and old_host.removed


def test_cds_update_turning_on_locality_weighting_keeps_eds_weights_and_overprovisioning() -> None:
    from moorline.upstream.lb import LocalityLB

    def lle(zone: str, addrs: list[str], weight: int) -> dict[str, Any]:
        return {
            "locality": {"zone": zone},
            "load_balancing_weight": weight,
            "lb_endpoints": [
                {
                    "endpoint": {"address": {"socket_address": {"address": a, "port_value": 80}}},
                    **({"health_status": "UNHEALTHY"} if a.endswith(".2") else {}),
                }
                for a in addrs
            ],
        }

    m = ClusterManager(Store())
    e = m.add_or_update(proto({"name": "e", "type": "EDS"}))
    e.update_load_assignment(
        json_format.ParseDict(
            {
                "cluster_name": "e",
                "endpoints": [lle("a", ["10.0.0.1", "10.0.0.2"], 1), lle("b", ["10.0.1.1"], 3)],
                "policy": {"overprovisioning_factor": 100},
            },
            endpoint_pb2.ClusterLoadAssignment(),
        )
    )
    e2 = m.add_or_update(
        proto({"name": "e", "type": "EDS", "common_lb_config": {"locality_weighted_lb_config": {}}})
    )
    assert e2.overprovisioning == 100
    # a: weight 1 times its availability 1/2 (factor 100, not the default 140); b: 3.
    assert isinstance(e2._lb, LocalityLB) and e2._lb.weights == [0.5, 3.0]


def test_retire_stops_dns_refresh_and_original_dst_sweeps() -> None:
    async def main() -> None:
        async def resolve(name: str, family: int) -> Any:
            return [(socket.AF_INET, "10.0.0.9")]

        from moorline.upstream.dns import Resolver

        m = ClusterManager(Store(), resolver=Resolver(resolve))
        dns = proto(
            {
                "name": "d",
                "type": "STRICT_DNS",
                "dns_refresh_rate": "3600s",
                "load_assignment": {
                    "endpoints": [
                        {
                            "lb_endpoints": [
                                {
                                    "endpoint": {
                                        "address": {"socket_address": {"address": "x.test", "port_value": 80}}
                                    }
                                }
                            ]
                        }
                    ]
                },
            }
        )
        od = proto({"name": "o", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED"})
        d1 = m.add_or_update(dns)
        o1 = m.add_or_update(od)
        await m.start()
        assert d1._task is not None and o1._od_timer is not None
        task = d1._task
        d2 = m.add_or_update(proto({**json_format.MessageToDict(dns), "connect_timeout": "2s"}))
        assert d1._task is None and task.cancelling() and d2.hosts[0].address == "10.0.0.9"
        m.remove("o")
        assert o1._od_timer is None and o1.retired
        m.stop()

    asyncio.run(main())


class _Req:
    """The router's side of a pooled request, just enough to run one exchange."""

    high = False  # DEFAULT priority

    def __init__(self) -> None:
        self.conn: Any = None
        self.done = asyncio.Event()
        self.ready = asyncio.Event()
        self.status = 0

    def on_pool_ready(self, conn: Any) -> None:
        self.conn = conn
        self.ready.set()

    def on_pool_failure(self, reason: str, detail: str | None) -> None:
        raise AssertionError(f"pool failure: {reason} {detail}")

    def on_upstream_headers(self, headers: Any, end_stream: bool) -> None:
        self.status = headers.status
        if end_stream:
            self.done.set()

    def on_upstream_data(self, data: bytes, end_stream: bool) -> None:
        if end_stream:
            self.done.set()

    def on_upstream_trailers(self, trailers: Any) -> None:
        self.done.set()

    def on_upstream_reset(self, reason: str) -> None:
        raise AssertionError(f"reset: {reason}")

    def on_upstream_batch_end(self) -> None:
        pass

    def on_upstream_1xx(self, headers: Any) -> None:
        pass


async def _exchange(host: Host, path: str = "/") -> _Req:
    from moorline.protocol.headers import RequestHeaders

    loop = asyncio.get_running_loop()
    req = _Req()
    http1_client.pool_for(host, loop).new_stream(req)
    await asyncio.wait_for(req.ready.wait(), 10)
    hm = RequestHeaders(b"GET", path.encode(), b"x", b"http")
    req.conn.send_headers(req, hm, True)
    await asyncio.wait_for(req.done.wait(), 10)
    return req


def test_update_drains_the_old_pools_and_frees_the_old_cluster(upstream: TestUpstream) -> None:
    async def main() -> None:
        m = ClusterManager(Store())
        old = m.add_or_update(static("a", upstream.port))
        (h,) = old.hosts
        loop = asyncio.get_running_loop()
        # A connection held by a request that will still be running when the cluster is replaced.
        busy = _Req()
        http1_client.pool_for(h, loop).new_stream(busy)
        await asyncio.wait_for(busy.ready.wait(), 10)
        # Another one, back in the pool: idle and kept alive.
        r = await _exchange(h)
        assert r.status == 200
        r.conn.release()
        pool = h.pool
        assert pool is not None and len(pool.idle) == 1 and old.stats.upstream_cx_active.value == 2
        idle_conn = pool.idle[0]

        new = m.add_or_update(static("a", upstream.port, connect_timeout="2s"))
        assert pool.draining and idle_conn.closed and pool.idle == []
        from moorline.protocol.headers import RequestHeaders

        hm = RequestHeaders(b"GET", b"/delay/50", b"x", b"http")
        busy.conn.send_headers(busy, hm, True)
        await asyncio.wait_for(busy.done.wait(), 10)
        assert busy.status == 200  # finished on the old cluster's connection
        busy.conn.release()
        assert busy.conn.closed  # ... which is not reused
        # The new cluster has hosts and pools of its own.
        (nh,) = new.hosts
        assert nh is not h and nh.pool is None
        assert (await _exchange(nh)).status == 200
        # A late retry on the old cluster still gets a connection, which is not kept.
        late = await _exchange(h)
        assert late.status == 200 and h.pool is pool
        late.conn.release()
        assert late.conn.closed
        for _ in range(20):
            await asyncio.sleep(0.01)
            if new.stats.upstream_cx_active.value == 1:
                break
        assert new.stats.upstream_cx_active.value == 1  # only the new cluster's connection
        # Nothing else holds the old snapshot: it is freed.
        ref = weakref.ref(old)
        del old, h, pool, idle_conn, busy, late, r
        m.remove("a")
        await asyncio.sleep(0.05)
        gc.collect()
        assert ref() is None
        m.stop()

    asyncio.run(main())


def test_pools_and_http2_stats_live_on_hosts_and_clusters() -> None:
    async def main() -> None:
        m = ClusterManager(Store())
        c = m.add_or_update(static("a", 80))
        (h,) = c.hosts
        loop = asyncio.get_running_loop()
        p1 = http1_client.pool_for(h, loop)
        p2 = http2_client.pool_for(h, loop)
        assert h.pool is p1 and h.h2pool is p2 and http1_client.pool_for(h, loop) is p1
        assert c.h2_stats is p2.h2stats
        assert not hasattr(http2_client, "_pools") and not hasattr(http2_client, "_h2_stats_by_cluster")
        h.drain_pools()
        assert p1.draining and p2.draining and not p1.closed
        m.stop()

    asyncio.run(main())


# -- while traffic flows --------------------------------------------------------------------------


def test_endpoint_update_under_traffic_reaches_the_new_endpoints(upstreams: Any) -> None:
    a = upstreams(upstream_id="a")
    b = upstreams(upstream_id="b")
    port = free_port()
    cfg = bootstrap(
        [hcm_listener("web", port, [{"match": {"prefix": "/"}, "route": {"cluster": "svc"}}])], []
    )
    with ServerThread(cfg) as srv:
        cm = srv.server.cluster_manager
        srv.call(cm.add_or_update, static("svc", a.port), "", "1")
        seen: list[list[tuple[float, str]]] = [[], []]
        errors: list[str] = []
        stop = threading.Event()

        def client(out: list[tuple[float, str]]) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    conn.request("GET", "/delay/5")
                    r = conn.getresponse()
                    r.read()
                except (OSError, http.client.HTTPException) as e:
                    errors.append(f"{type(e).__name__}: {e}")
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                    continue
                if r.status != 200:
                    errors.append(f"status {r.status}")
                out.append((t0, r.getheader("x-upstream-id") or ""))
            conn.close()

        threads = [threading.Thread(target=client, args=(s,), daemon=True) for s in seen]
        for t in threads:
            t.start()
        try:
            a.wait_for_requests(10)
            old = srv.call(cm.get, "svc")
            ref = weakref.ref(old)
            srv.call(cm.add_or_update, static("svc", b.port), "", "2")
            swapped = time.monotonic()
            del old
            b.wait_for_requests(10)
        finally:
            stop.set()
            for t in threads:
                t.join(20)
        assert errors == []
        # Routed after the update: the new endpoint only.
        after = {u for s in seen for t0, u in s if t0 > swapped + 0.001}
        assert after == {"b"}
        total = sum(len(s) for s in seen)
        assert srv.server.stats.counter("cluster.svc.upstream_rq_total").value == total
        # The old snapshot drained and was freed.
        for _ in range(100):
            srv.call(gc.collect)
            if ref() is None:
                break
            time.sleep(0.05)
        assert ref() is None
        dump = srv.call(srv.server.config_dump)
        cl = next(c for c in dump["configs"] if c["@type"].endswith("ClustersConfigDump"))
        (dc,) = cl["dynamic_active_clusters"]
        assert dc["version_info"] == "2" and dc["cluster"]["name"] == "svc" and dc["last_updated"]
