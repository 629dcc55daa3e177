"""Cluster compilation (fields, validation with field paths), membership, panic mode, stats,
and every cluster of the Istio fixtures (the cluster manager: test_manager.py)."""

from __future__ import annotations

import asyncio
import copy
import json
import random
import socket
from collections import Counter
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2

# Imported for their side effect: nested Any types in the fixtures must be in the default pool.
from envoy.extensions.transport_sockets.internal_upstream.v3 import internal_upstream_pb2  # noqa: F401
from envoy.extensions.transport_sockets.raw_buffer.v3 import raw_buffer_pb2  # noqa: F401
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401
from google.protobuf import json_format

from moorline.config.errors import ConfigError
from moorline.observability.stats import Counter as StatCounter
from moorline.observability.stats import Gauge, Histogram, Store
from moorline.testing.fixtures import FIXTURES as SHARED_FIXTURES
from moorline.upstream.cluster import Cluster, ClusterStats, Host, compile_cluster

FIXTURES = SHARED_FIXTURES / "istio"
HPO = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
HPO_TYPE = f"type.googleapis.com/{HPO}"


def proto(d: dict[str, Any]) -> Any:
    return json_format.ParseDict(d, cluster_pb2.Cluster())


def ep(addr: str, port: int = 80, **extra: Any) -> dict[str, Any]:
    return {"endpoint": {"address": {"socket_address": {"address": addr, "port_value": port}}}, **extra}


def static(name: str = "c1", *eps: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "type": "STATIC",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": list(eps)}]},
        **extra,
    }


def build(d: dict[str, Any], store: Store | None = None, seed: int = 1) -> Cluster:
    from moorline.net.upstream import UpstreamTransportFactory

    return compile_cluster(
        proto(d),
        store if store is not None else Store(),
        rng=random.Random(seed),
        transport_factory=UpstreamTransportFactory(),
    )


# -- fields -----------------------------------------------------------------------------------------


def test_static_defaults() -> None:
    c = build(static("c1", ep("10.0.0.1", 80), ep("::1", 81)))
    assert (c.name, c.type, c.lb_policy) == ("c1", "STATIC", "ROUND_ROBIN")
    assert c.connect_timeout == 5.0
    assert c.per_connection_buffer_limit == 1024 * 1024
    assert c.idle_timeout == 3600.0
    assert c.max_requests_per_connection is None
    assert c.http2 is False
    assert c.tcp_keepalive is None
    assert (c.max_connections, c.max_pending_requests, c.max_requests, c.max_retries) == (1024, 1024, 1024, 3)
    h4, h6 = c.hosts
    assert (h4.address, h4.port, h4.addr_str, h4.family, h4.hostname) == (
        "10.0.0.1",
        80,
        "10.0.0.1:80",
        socket.AF_INET,
        "10.0.0.1",
    )
    assert (h6.addr_str, h6.family) == ("[::1]:81", socket.AF_INET6)
    assert h4.weight == 1 and h4.healthy and h4.active_rq == 0 and h4.active_cx == 0 and h4.pool is None
    assert h4.cluster is c and c.healthy_hosts == [h4, h6]
    assert c.notices == []


def test_pipe_endpoint() -> None:
    c = build(static("p", {"endpoint": {"address": {"pipe": {"path": "/tmp/x.sock"}}}}))
    (h,) = c.hosts
    assert (h.address, h.port, h.addr_str, h.family) == ("/tmp/x.sock", None, "/tmp/x.sock", socket.AF_UNIX)


def test_protocol_options_and_limits() -> None:
    d = static(
        "xds-grpc",
        ep("127.0.0.1", 15010),
        alt_stat_name="xds-grpc;",
        connect_timeout="0.25s",
        per_connection_buffer_limit_bytes=32768,
        max_requests_per_connection=1,
        circuit_breakers={
            "thresholds": [
                {"priority": "HIGH", "max_connections": 7},
                {"max_connections": 100, "max_pending_requests": 200, "max_requests": 300, "max_retries": 4},
            ]
        },
        upstream_connection_options={"tcp_keepalive": {"keepalive_time": 300, "keepalive_probes": 3}},
        typed_extension_protocol_options={
            HPO: {
                "@type": HPO_TYPE,
                "explicit_http_config": {"http2_protocol_options": {"max_concurrent_streams": 50}},
                "common_http_protocol_options": {"idle_timeout": "30s", "max_requests_per_connection": 9},
            }
        },
    )
    store = Store()
    c = build(d, store)
    assert c.connect_timeout == 0.25
    assert c.per_connection_buffer_limit == 32768
    assert c.http2 is True and c.http2_protocol_options.max_concurrent_streams.value == 50
    assert c.idle_timeout == 30.0
    assert c.max_requests_per_connection == 9  # typed options override the legacy field
    assert c.tcp_keepalive == (3, 300, None)
    assert (c.max_connections, c.max_pending_requests, c.max_requests, c.max_retries) == (100, 200, 300, 4)
    assert c.high.max_connections == 7 and c.high.max_requests == 1024  # HIGH thresholds apart
    assert not any("HIGH" in n for n in c.notices)
    # alt_stat_name names the stats, verbatim.
    assert store.get("cluster.xds-grpc;.upstream_rq_total") is c.stats.upstream_rq_total


def test_use_downstream_protocol_and_idle_zero_disables() -> None:
    c = build(
        static(
            "c",
            ep("10.0.0.1"),
            typed_extension_protocol_options={
                HPO: {
                    "@type": HPO_TYPE,
                    "use_downstream_protocol_config": {},
                    "common_http_protocol_options": {"idle_timeout": "0s"},
                }
            },
        )
    )
    assert c.http2 is None
    assert c.idle_timeout is None


def test_legacy_protocol_fields() -> None:
    c = build(
        static(
            "c",
            ep("10.0.0.1"),
            http2_protocol_options={},
            common_http_protocol_options={"idle_timeout": "7s"},
        )
    )
    assert c.http2 is True and c.idle_timeout == 7.0
    c = build(static("c", ep("10.0.0.1"), protocol_selection="USE_DOWNSTREAM_PROTOCOL"))
    assert c.http2 is None
    c = build(static("c", ep("10.0.0.1"), max_requests_per_connection=0))
    assert c.max_requests_per_connection is None


def test_other_protocol_options_noticed() -> None:
    key = "envoy.extensions.upstreams.tcp.v3.TcpProtocolOptions"
    c = build(static("c", ep("10.0.0.1"), typed_extension_protocol_options={key: {"@type": HPO_TYPE}}))
    assert any(key in n for n in c.notices)


def test_weights_health_and_locality_from_load_assignment() -> None:
    d = static(
        "c",
        ep("10.0.0.1", load_balancing_weight=5),
        ep("10.0.0.2", health_status="UNHEALTHY"),
        ep("10.0.0.3", health_status="DRAINING"),
        ep("10.0.0.4", health_status="TIMEOUT"),
        ep("10.0.0.5", health_status="DEGRADED"),
        ep("10.0.0.6", health_status="HEALTHY"),
    )
    d["load_assignment"]["endpoints"][0]["locality"] = {"region": "r", "zone": "z"}
    d["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["hostname"] = "one.example"
    c = build(d)
    assert [h.healthy for h in c.hosts] == [True, False, False, False, True, True]
    assert [h.weight for h in c.hosts] == [5, 1, 1, 1, 1, 1]
    assert c.hosts[0].hostname == "one.example" and c.hosts[1].hostname == "10.0.0.2"
    assert c.hosts[0].locality == ("r", "z", "")
    assert c.hosts[4].degraded
    assert c.stats.membership_total.value == 6
    assert c.stats.membership_healthy.value == 3
    assert c.stats.membership_degraded.value == 1
    assert c.stats.max_host_weight.value == 5
    # Only healthy hosts are chosen, in proportion to weight.
    picks = Counter(c.choose_host() for _ in range(700))
    assert set(picks) == {c.hosts[0], c.hosts[4], c.hosts[5]}
    assert picks[c.hosts[0]] == 500


def _prio(levels: list[list[dict[str, Any]]], **policy: Any) -> Cluster:
    d = static("c")
    d["load_assignment"]["endpoints"] = [{"priority": p, "lb_endpoints": eps} for p, eps in enumerate(levels)]
    if policy:
        d["load_assignment"]["policy"] = policy
    return build(d)


def _unhealthy(addr: str) -> dict[str, Any]:
    return ep(addr, health_status="UNHEALTHY")


def test_priority_failover_follows_envoys_priority_load() -> None:
    # All of P0 healthy: P1 gets nothing.
    c = _prio([[ep("10.0.0.1"), ep("10.0.0.2")], [ep("10.0.1.1")]])
    assert {h.priority for h in c.hosts} == {0, 1}
    assert {c.choose_host().address for _ in range(200)} == {"10.0.0.1", "10.0.0.2"}  # type: ignore[union-attr]
    # Half of P0 healthy: health 50 * 1.4 = 70 %, P1 takes the other 30 %.
    c = _prio([[ep("10.0.0.1"), _unhealthy("10.0.0.2")], [ep("10.0.1.1")]])
    assert c._lb.loads == [70.0, 30.0]  # type: ignore[union-attr]
    picks = Counter(c.choose_host().address for _ in range(2000))  # type: ignore[union-attr]
    assert set(picks) == {"10.0.0.1", "10.0.1.1"}
    assert 1200 < picks["10.0.0.1"] < 1600
    # An overprovisioning factor of 100: P0 gets exactly its healthy share.
    c = _prio([[ep("10.0.0.1"), _unhealthy("10.0.0.2")], [ep("10.0.1.1")]], overprovisioning_factor=100)
    assert c._lb.loads == [50.0, 50.0]  # type: ignore[union-attr]
    # P0 all down: P1 takes everything.
    c = _prio([[_unhealthy("10.0.0.1")], [ep("10.0.1.1")], [ep("10.0.2.1")]])
    assert {c.choose_host().address for _ in range(200)} == {"10.0.1.1"}  # type: ignore[union-attr]


def test_priority_loads_are_normalized_when_every_level_is_degraded() -> None:
    from moorline.upstream.lb import priority_loads

    # 1 of 4 healthy on each of two levels: healths 35 and 35, scaled to 50 / 50.
    assert priority_loads([(1, 4), (1, 4)], 140) == [50.0, 50.0]
    assert priority_loads([(0, 3), (0, 2)], 140) == [0.0, 0.0]
    assert priority_loads([(3, 3)], 140) == [100.0]
    # No healthy host anywhere: level 0 panics over all of its hosts, as in Envoy.
    c = _prio([[_unhealthy("10.0.0.1")], [_unhealthy("10.0.1.1")]])
    assert c.choose_host().address == "10.0.0.1"  # type: ignore[union-attr]


def test_load_assignment_view_round_trips_priorities_and_health() -> None:
    c = _prio(
        [[ep("10.0.0.1", load_balancing_weight=3)], [_unhealthy("10.0.1.1")]], overprovisioning_factor=120
    )
    view = c.load_assignment_view()
    assert [(e.priority, len(e.lb_endpoints)) for e in view.endpoints] == [(0, 1), (1, 1)]
    assert view.endpoints[0].lb_endpoints[0].load_balancing_weight.value == 3
    assert view.endpoints[1].lb_endpoints[0].health_status == 2  # UNHEALTHY
    assert view.policy.overprovisioning_factor.value == 120


@pytest.mark.parametrize("policy", ["ROUND_ROBIN", "RANDOM", "LEAST_REQUEST"])
def test_lb_policies_compile(policy: str) -> None:
    c = build(static("c", ep("10.0.0.1"), ep("10.0.0.2"), lb_policy=policy))
    assert c.lb_policy == policy
    assert set(c.choose_host() for _ in range(200)) == set(c.hosts)


def test_least_request_config() -> None:
    c = build(
        static(
            "c",
            ep("10.0.0.1"),
            lb_policy="LEAST_REQUEST",
            least_request_lb_config={
                "choice_count": 4,
                "active_request_bias": {"default_value": 0.5, "runtime_key": "k"},
            },
        )
    )
    assert (c.choice_count, c.active_request_bias) == (4, 0.5)


def test_load_balancing_policy_extension_first_supported_wins() -> None:
    d = static(
        "c",
        ep("10.0.0.1"),
        load_balancing_policy={
            "policies": [
                {
                    "typed_extension_config": {
                        "name": "m",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.maglev.v3.Maglev"
                        },
                    }
                },
                {
                    "typed_extension_config": {
                        "name": "lr",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest",
                            "choice_count": 3,
                        },
                    }
                },
            ]
        },
    )
    from envoy.extensions.load_balancing_policies.least_request.v3 import least_request_pb2  # noqa: F401
    from envoy.extensions.load_balancing_policies.maglev.v3 import maglev_pb2  # noqa: F401

    c = build(d)
    assert (c.lb_policy, c.choice_count) == ("LEAST_REQUEST", 3)


# -- choose_host: exclude, panic ---------------------------------------------------------------------


def test_choose_host_round_robin_and_exclude() -> None:
    c = build(static("c", ep("10.0.0.1"), ep("10.0.0.2"), ep("10.0.0.3")))
    seq = [c.choose_host() for _ in range(6)]
    assert seq[:3] == seq[3:] and set(seq) == set(c.hosts)
    tried = frozenset(c.hosts[:2])
    assert all(c.choose_host(tried) is c.hosts[2] for _ in range(5))
    assert c.choose_host(set(c.hosts)) in c.hosts  # nothing else left: a tried host


def test_panic_mode_uses_all_hosts_and_counts() -> None:
    # 1 of 3 healthy = 33 % < 50 %: panic, balance over every host.
    c = build(
        static(
            "c",
            ep("10.0.0.1"),
            ep("10.0.0.2", health_status="UNHEALTHY"),
            ep("10.0.0.3", health_status="UNHEALTHY"),
        )
    )
    chosen = {c.choose_host() for _ in range(30)}
    assert chosen == set(c.hosts)
    assert c.stats.lb_healthy_panic.value == 30


def test_no_panic_above_threshold_and_all_unhealthy() -> None:
    c = build(static("c", ep("10.0.0.1"), ep("10.0.0.2"), ep("10.0.0.3", health_status="UNHEALTHY")))
    assert {c.choose_host() for _ in range(30)} == set(c.hosts[:2])
    assert c.stats.lb_healthy_panic.value == 0
    # All unhealthy: panic picks among all hosts.
    c = build(static("c", ep("10.0.0.1", health_status="UNHEALTHY")))
    assert c.choose_host() is c.hosts[0]
    assert c.stats.lb_healthy_panic.value == 1


def test_panic_threshold_zero_disables_panic() -> None:
    d = static(
        "c",
        ep("10.0.0.1", health_status="UNHEALTHY"),
        common_lb_config={"healthy_panic_threshold": {"value": 0}},
    )
    c = build(d)
    assert c.choose_host() is None
    assert c.stats.lb_healthy_panic.value == 0


def test_health_changed_rebuilds_balancer() -> None:
    c = build(static("c", ep("10.0.0.1"), ep("10.0.0.2"), ep("10.0.0.3")))
    c.hosts[0].healthy = False
    c.health_changed()
    assert c.hosts[0] not in {c.choose_host() for _ in range(20)}
    assert c.healthy_hosts == c.hosts[1:]
    assert c.stats.membership_healthy.value == 2


def test_no_hosts_gives_none() -> None:
    c = build({"name": "empty", "type": "STATIC"})
    assert c.hosts == [] and c.choose_host() is None


# -- membership updates (EDS) ------------------------------------------------------------------------


def cla(*eps: dict[str, Any]) -> Any:
    return json_format.ParseDict(
        {"cluster_name": "e", "endpoints": [{"lb_endpoints": list(eps)}]},
        endpoint_pb2.ClusterLoadAssignment(),
    )


def test_eds_starts_empty_and_updates_keep_host_objects() -> None:
    c = build(
        {"name": "e", "type": "EDS", "eds_cluster_config": {"service_name": "svc", "eds_config": {"ads": {}}}}
    )
    assert c.type == "EDS" and c.hosts == [] and c.eds_service_name == "svc"
    seen: list[list[str]] = []
    c.on_membership_change.append(lambda: seen.append([h.addr_str for h in c.last_removed]))
    c.update_load_assignment(cla(ep("10.0.0.1"), ep("10.0.0.2")))
    a, b = c.hosts
    a.active_rq = 2
    c.update_load_assignment(cla(ep("10.0.0.2", load_balancing_weight=3), ep("10.0.0.3")))
    assert c.hosts[0] is b and b.weight == 3
    assert a.removed and not b.removed
    assert [h.addr_str for h in c.hosts] == ["10.0.0.2:80", "10.0.0.3:80"]
    assert seen == [[], ["10.0.0.1:80"]]
    assert c.stats.membership_change.value == 2
    assert (c.stats.update_attempt.value, c.stats.update_success.value) == (2, 2)
    # Same members again (only health changes): no membership callback, balancer follows health.
    c.update_load_assignment(cla(ep("10.0.0.2", health_status="UNHEALTHY"), ep("10.0.0.3")))
    assert len(seen) == 2 and not c.hosts[0].healthy
    assert {c.choose_host() for _ in range(10)} == {c.hosts[1]}


def test_eds_update_rejects_hostnames_and_keeps_hosts() -> None:
    c = build({"name": "e", "type": "EDS"})
    c.update_load_assignment(cla(ep("10.0.0.1")))
    with pytest.raises(ConfigError) as ei:
        c.update_load_assignment(cla(ep("foo.example")), "resources[0]")
    assert (
        ei.value.path == "resources[0].endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address"
    )
    assert [h.address for h in c.hosts] == ["10.0.0.1"]


def test_update_hosts_with_host_objects() -> None:
    c = build({"name": "e", "type": "EDS"})
    c.update_hosts([c.make_host("10.1.1.1", 8080, weight=2), Host(c, "10.1.1.2", 8080)])
    assert [(h.addr_str, h.weight) for h in c.hosts] == [("10.1.1.1:8080", 2), ("10.1.1.2:8080", 1)]
    assert c.choose_host() in c.hosts


def test_endpoints_config_dump_assignments_apply() -> None:
    dump = json.loads((FIXTURES / "endpoints_configdump.json").read_text())
    hosts = 0
    n = 0
    for cfg in dump["configs"]:
        for key in ("static_endpoint_configs", "dynamic_endpoint_configs"):
            for item in cfg.get(key, []):
                d = {k: v for k, v in item["endpoint_config"].items() if k != "@type"}
                m = json_format.ParseDict(d, endpoint_pb2.ClusterLoadAssignment())
                c = build({"name": m.cluster_name or "x", "type": "EDS"})
                c.update_load_assignment(m)  # every assignment of the fixture is usable
                hosts += len(c.hosts)
                n += 1
                if m.cluster_name == "outbound|53||kube-dns.kube-system.svc.cluster.local":
                    assert [h.addr_str for h in c.hosts] == ["10.244.0.8:53", "10.244.0.3:53"]
    assert n == 37 and hosts > 30


# -- ORIGINAL_DST ---------------------------------------------------------------------------------------


def test_original_dst_hosts_by_destination() -> None:
    async def main() -> None:
        c = build(
            {
                "name": "PassthroughCluster",
                "type": "ORIGINAL_DST",
                "lb_policy": "CLUSTER_PROVIDED",
                "cleanup_interval": "3600s",
            }
        )
        await c.start()
        try:
            assert c.choose_host() is None
            h = c.original_dst_host("10.9.9.9", 8080)
            assert c.original_dst_host("10.9.9.9", 8080) is h
            assert h.addr_str == "10.9.9.9:8080" and c.hosts == [h]
            g = c.original_dst_host("::1", 53)
            # Sweeps drop hosts unused since the previous sweep and carrying no traffic.
            g.active_cx = 1
            c._od_sweep(reschedule=False)  # both used since start: kept
            c._od_sweep(reschedule=False)  # h idle and unused: dropped; g still has a connection
            assert c.hosts == [g] and h.removed
        finally:
            c.stop()

    asyncio.run(main())


class Ctx:
    """An ``api.LbContext``: the downstream connection's destination and request headers."""

    def __init__(self, dst: tuple[str, int] | None, headers: dict[bytes, bytes] | None = None) -> None:
        self.dst = dst
        self.headers = headers or {}

    def downstream_local_address(self) -> tuple[str, int] | None:
        return self.dst

    def downstream_header(self, name: bytes) -> bytes | None:
        return self.headers.get(name)


def _od(**extra: Any) -> dict[str, Any]:
    return {"name": "PassthroughCluster", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED", **extra}


def test_original_dst_choose_host_from_the_connection() -> None:
    store = Store()
    c = build(_od(), store)
    assert type(c).__name__ == "OriginalDstCluster"
    assert c.choose_host() is None  # no context: nowhere to go
    assert c.choose_host(None, Ctx(None)) is None  # not redirected: no host (Envoy: UH)
    h = c.choose_host(None, Ctx(("10.1.1.1", 8080)))
    assert h is not None and h.addr_str == "10.1.1.1:8080"
    assert c.choose_host({h}, Ctx(("10.1.1.1", 8080))) is h  # the destination is the destination
    assert store.get("cluster.PassthroughCluster.membership_total").value == 1  # type: ignore[union-attr]
    assert store.get("cluster.PassthroughCluster.membership_change").value == 1  # type: ignore[union-attr]
    # The header is not looked at unless use_http_header is on.
    g = c.choose_host(None, Ctx(("10.1.1.1", 8080), {b"x-envoy-original-dst-host": b"10.2.2.2:80"}))
    assert g is h
    # Other clusters ignore the context altogether.
    s = build(static("s", ep("10.0.0.1", 80)))
    sh = s.choose_host(None, Ctx(("10.9.9.9", 1)))
    assert sh is not None and sh.addr_str == "10.0.0.1:80"


def test_original_dst_http_header_override_and_port_override() -> None:
    store = Store()
    c = build(_od(original_dst_lb_config={"use_http_header": True}), store)
    conn = ("10.1.1.1", 8080)
    h = c.choose_host(None, Ctx(conn, {b"x-envoy-original-dst-host": b"10.2.2.2:9090"}))
    assert h is not None and h.addr_str == "10.2.2.2:9090"
    h6 = c.choose_host(None, Ctx(conn, {b"x-envoy-original-dst-host": b"[fd00::0:1]:443"}))
    assert h6 is not None and (h6.address, h6.port) == ("fd00::1", 443)
    # Absent: the connection's destination. Invalid (a name, no port, a bad port): counted, and
    # the connection's destination is used.
    assert c.choose_host(None, Ctx(conn)).addr_str == "10.1.1.1:8080"  # type: ignore[union-attr]
    for bad in (b"svc.local:80", b"10.2.2.2", b"10.2.2.2:0", b"10.2.2.2:99999", b"fd00::1:80", b"\xff:1"):
        got = c.choose_host(None, Ctx(conn, {b"x-envoy-original-dst-host": bad}))
        assert got is not None and got.addr_str == "10.1.1.1:8080", bad
    assert store.get("cluster.PassthroughCluster.original_dst_host_invalid").value == 6  # type: ignore[union-attr]
    # An invalid header and no connection destination: no host.
    assert c.choose_host(None, Ctx(None, {b"x-envoy-original-dst-host": b"nope"})) is None

    named = build(
        _od(
            original_dst_lb_config={
                "use_http_header": True,
                "http_header_name": "X-Target",
                "upstream_port_override": 7070,
            }
        )
    )
    t = named.choose_host(None, Ctx(conn, {b"x-target": b"10.3.3.3:1"}))
    assert t is not None and t.addr_str == "10.3.3.3:7070"
    assert named.choose_host(None, Ctx(conn, {b"x-envoy-original-dst-host": b"10.2.2.2:80"})).addr_str == (  # type: ignore[union-attr]
        "10.1.1.1:7070"
    )
    assert not named.notices


def test_original_dst_config_checks_and_notices() -> None:
    with pytest.raises(ConfigError) as ei:
        build(_od(original_dst_lb_config={"upstream_port_override": 70000}))
    assert ei.value.path == "original_dst_lb_config.upstream_port_override"
    c = build(_od(original_dst_lb_config={"http_header_name": "x-a", "metadata_key": {"key": "k"}}))
    assert any(n.startswith("original_dst_lb_config.http_header_name") for n in c.notices)
    assert any(n.startswith("original_dst_lb_config.metadata_key") for n in c.notices)
    assert c.original_dst_header is None
    assert build(_od(cleanup_interval="2s")).cleanup_interval == 2.0
    assert build(_od()).cleanup_interval == 5.0


def test_original_dst_idle_hosts_are_swept_on_the_cleanup_interval() -> None:
    async def main() -> None:
        c = build(_od(cleanup_interval="0.05s"))
        await c.start()
        try:
            h = c.choose_host(None, Ctx(("10.1.1.1", 1)))
            busy = c.choose_host(None, Ctx(("10.1.1.2", 2)))
            assert h is not None and busy is not None
            busy.active_cx = 1
            for _ in range(200):
                if h.removed:
                    break
                await asyncio.sleep(0.02)
            assert h.removed and c.hosts == [busy]
            # A host made again for the same destination is a new one.
            again = c.choose_host(None, Ctx(("10.1.1.1", 1)))
            assert again is not h and again in c.hosts
        finally:
            c.stop()

    asyncio.run(main())


class _Pool:
    closed = False
    draining = False

    def drain(self) -> None:
        self.draining = True


def test_original_dst_sweep_drops_hosts_with_only_idle_pooled_connections() -> None:
    c = build(_od(cleanup_interval="3600s"))
    idle_http = c.choose_host(None, Ctx(("10.1.1.1", 80)))
    in_flight = c.choose_host(None, Ctx(("10.1.1.2", 80)))
    tcp_session = c.choose_host(None, Ctx(("10.1.1.3", 5432)))
    assert idle_http is not None and in_flight is not None and tcp_session is not None
    pool = _Pool()
    idle_http.pool = pool
    idle_http.active_cx = 1  # a keep-alive connection waiting in the pool
    in_flight.pool = _Pool()
    in_flight.active_cx = in_flight.active_rq = 1
    tcp_session.active_cx = 1  # tcp_proxy: no pool
    c._od_sweep(reschedule=False)  # all used since the start
    c._od_sweep(reschedule=False)
    assert idle_http.removed and pool.draining
    assert c.hosts == [in_flight, tcp_session]


def test_original_dst_host_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import moorline.upstream.cluster as cluster_mod

    monkeypatch.setattr(cluster_mod, "MAX_ORIGINAL_DST_HOSTS", 2)
    c = build(_od(cleanup_interval="3600s"))
    a = c.choose_host(None, Ctx(("10.0.0.1", 1)))
    b = c.choose_host(None, Ctx(("10.0.0.2", 1)))
    assert a is not None and b is not None
    # Full, both used since the last sweep: a new destination is served by a host nothing
    # keeps (its pools drain after use), and the cached ones keep their marks.
    extra = c.choose_host(None, Ctx(("10.0.0.3", 1)))
    assert extra is not None and extra.removed and extra not in c.hosts
    assert c.hosts == [a, b] and c._od_used == {a, b}
    # After a sweep cleared the marks, an idle host makes room for the next destination.
    c._od_sweep(reschedule=False)
    b.active_rq = 1
    d = c.choose_host(None, Ctx(("10.0.0.4", 1)))
    assert d is not None and not d.removed and a.removed
    assert c.hosts == [b, d]


def test_original_dst_retired_cluster_keeps_no_new_hosts() -> None:
    c = build(_od())
    c.retire()
    h = c.choose_host(None, Ctx(("10.1.1.1", 1)))
    assert h is not None and h.removed and c.hosts == []


# -- validation: every ConfigError path -------------------------------------------------------------

LA0 = "load_assignment.endpoints[0].lb_endpoints"


def _sa(port: int | None = 80, addr: str = "10.0.0.1") -> dict[str, Any]:
    sa: dict[str, Any] = {"address": addr}
    if port is not None:
        sa["port_value"] = port
    return {"endpoint": {"address": {"socket_address": sa}}}


BAD: list[tuple[str, dict[str, Any], str, str]] = [
    ("empty name", {"type": "STATIC"}, "name", "required"),
    (
        "custom type",
        {"name": "c", "cluster_type": {"name": "envoy.clusters.aggregate"}},
        "cluster_type",
        "not supported",
    ),
    ("ring hash", static("c", lb_policy="RING_HASH"), "lb_policy", "RING_HASH is not supported"),
    ("maglev", static("c", lb_policy="MAGLEV"), "lb_policy", "MAGLEV is not supported"),
    (
        "cluster provided",
        static("c", lb_policy="CLUSTER_PROVIDED"),
        "lb_policy",
        "only valid for ORIGINAL_DST",
    ),
    ("original dst rr", {"name": "c", "type": "ORIGINAL_DST"}, "lb_policy", "CLUSTER_PROVIDED"),
    (
        "original dst endpoints",
        {**static("c", _sa()), "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED"},
        "load_assignment",
        "must not have endpoints",
    ),
    ("zero connect timeout", static("c", connect_timeout="0s"), "connect_timeout", "greater than 0"),
    ("negative connect timeout", static("c", connect_timeout="-1s"), "connect_timeout", "greater than 0"),
    (
        "static hostname",
        static("c", _sa(80), _sa(80, "foo.example")),
        f"{LA0}[1].endpoint.address.socket_address.address",
        "STATIC clusters need IP addresses",
    ),
    (
        "missing port",
        static("c", _sa(None)),
        f"{LA0}[0].endpoint.address.socket_address.port_value",
        "port is required",
    ),
    (
        "port zero",
        static("c", _sa(0)),
        f"{LA0}[0].endpoint.address.socket_address.port_value",
        "port is required",
    ),
    (
        "port too big",
        static("c", _sa(70000)),
        f"{LA0}[0].endpoint.address.socket_address.port_value",
        "out of range",
    ),
    ("no address", static("c", {"endpoint": {}}), f"{LA0}[0].endpoint.address", "address is required"),
    (
        "empty address",
        static("c", {"endpoint": {"address": {"socket_address": {"port_value": 80}}}}),
        f"{LA0}[0].endpoint.address.socket_address.address",
        "address is required",
    ),
    (
        "named port",
        static(
            "c", {"endpoint": {"address": {"socket_address": {"address": "10.0.0.1", "named_port": "http"}}}}
        ),
        f"{LA0}[0].endpoint.address.socket_address.named_port",
        "not supported",
    ),
    (
        "resolver name",
        static(
            "c",
            {
                "endpoint": {
                    "address": {
                        "socket_address": {"address": "10.0.0.1", "port_value": 1, "resolver_name": "r"}
                    }
                }
            },
        ),
        f"{LA0}[0].endpoint.address.socket_address.resolver_name",
        "not supported",
    ),
    (
        "internal address",
        static("c", {"endpoint": {"address": {"envoy_internal_address": {"server_listener_name": "x"}}}}),
        f"{LA0}[0].endpoint.address.envoy_internal_address",
        "not supported",
    ),
    (
        "weight zero",
        static("c", _sa(80) | {"load_balancing_weight": 0}),
        f"{LA0}[0].load_balancing_weight",
        "at least 1",
    ),
    (
        "endpoint name",
        static("c", {"endpoint_name": "n"}),
        f"{LA0}[0].endpoint_name",
        "named endpoints are not supported",
    ),
    (
        "named endpoints",
        {"name": "c", "load_assignment": {"named_endpoints": {"n": _sa()["endpoint"]}}},
        "load_assignment.named_endpoints",
        "not supported",
    ),
    (
        "leds",
        {
            "name": "c",
            "load_assignment": {
                "endpoints": [{"leds_cluster_locality_config": {"leds_collection_name": "x"}}]
            },
        },
        "load_assignment.endpoints[0]",
        "LEDS",
    ),
    (
        "logical dns two endpoints",
        {**static("c", _sa(80, "a.example"), _sa(80, "b.example")), "type": "LOGICAL_DNS"},
        "load_assignment",
        "exactly one",
    ),
    (
        "logical dns no endpoint",
        {"name": "c", "type": "LOGICAL_DNS"},
        "load_assignment",
        "exactly one endpoint",
    ),
    (
        "dns pipe",
        {**static("c", {"endpoint": {"address": {"pipe": {"path": "/x"}}}}), "type": "STRICT_DNS"},
        f"{LA0}[0].endpoint.address.pipe",
        "need socket addresses",
    ),
    (
        "dns refresh too small",
        {**static("c", _sa(80, "a.example")), "type": "STRICT_DNS", "dns_refresh_rate": "0.001s"},
        "dns_refresh_rate",
        "greater than 1ms",
    ),
    (
        "dns failure base",
        {**static("c", _sa(80, "a.example")), "type": "STRICT_DNS", "dns_failure_refresh_rate": {}},
        "dns_failure_refresh_rate.base_interval",
        "greater than 1ms",
    ),
    (
        "dns failure max",
        {
            **static("c", _sa(80, "a.example")),
            "type": "STRICT_DNS",
            "dns_failure_refresh_rate": {"base_interval": "2s", "max_interval": "1s"},
        },
        "dns_failure_refresh_rate.max_interval",
        "less than base_interval",
    ),
    (
        "least request choice",
        static("c", lb_policy="LEAST_REQUEST", least_request_lb_config={"choice_count": 1}),
        "least_request_lb_config.choice_count",
        "at least 2",
    ),
    (
        "least request bias",
        static(
            "c",
            lb_policy="LEAST_REQUEST",
            least_request_lb_config={"active_request_bias": {"default_value": -1, "runtime_key": "k"}},
        ),
        "least_request_lb_config.active_request_bias",
        "negative",
    ),
    (
        "panic threshold",
        static("c", common_lb_config={"healthy_panic_threshold": {"value": 150}}),
        "common_lb_config.healthy_panic_threshold",
        "between 0 and 100",
    ),
    (
        "protocol options wrong type",
        static(
            "c",
            typed_extension_protocol_options={
                HPO: {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"
                }
            },
        ),
        f'typed_extension_protocol_options["{HPO}"]',
        "expected",
    ),
    (
        "http3 upstream",
        static(
            "c",
            typed_extension_protocol_options={
                HPO: {"@type": HPO_TYPE, "explicit_http_config": {"http3_protocol_options": {}}}
            },
        ),
        f'typed_extension_protocol_options["{HPO}"].explicit_http_config.http3_protocol_options',
        "HTTP/3",
    ),
    (
        "http3 downstream",
        static(
            "c",
            typed_extension_protocol_options={
                HPO: {"@type": HPO_TYPE, "use_downstream_protocol_config": {"http3_protocol_options": {}}}
            },
        ),
        f'typed_extension_protocol_options["{HPO}"].use_downstream_protocol_config.http3_protocol_options',
        "HTTP/3",
    ),
    (
        "no supported lb extension",
        static(
            "c",
            load_balancing_policy={
                "policies": [
                    {
                        "typed_extension_config": {
                            "name": "m",
                            "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.maglev.v3.Maglev"
                            },
                        }
                    }
                ]
            },
        ),
        "load_balancing_policy.policies",
        "no supported policy",
    ),
]


@pytest.mark.parametrize(("d", "path", "msg"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_config_errors(d: dict[str, Any], path: str, msg: str) -> None:
    from envoy.extensions.load_balancing_policies.maglev.v3 import maglev_pb2  # noqa: F401

    with pytest.raises(ConfigError) as ei:
        build(d)
    assert ei.value.path == path, str(ei.value)
    assert msg in ei.value.message, str(ei.value)


RAW_BUFFER_TS = {
    "name": "envoy.transport_sockets.raw_buffer",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"
    },
}
TAP_TS = {
    "name": "envoy.transport_sockets.tap",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tap.v3.Tap",
        "common_config": {
            "static_config": {"output_config": {"sinks": [{"file_per_tap": {"path_prefix": "/tmp/t"}}]}}
        },
        "transport_socket": RAW_BUFFER_TS,
    },
}
IU_TYPE = (
    "type.googleapis.com/envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport"
)


@pytest.mark.parametrize(
    ("ts", "path", "msg"),
    [
        (
            TAP_TS,
            "transport_socket",
            "unsupported transport socket 'envoy.extensions.transport_sockets.tap.v3.Tap'",
        ),
        ({"name": "envoy.transport_sockets.alts"}, "transport_socket", "'envoy.transport_sockets.alts'"),
        (
            {"name": "internal_upstream", "typed_config": {"@type": IU_TYPE, "transport_socket": TAP_TS}},
            "transport_socket.typed_config.transport_socket",
            "unsupported transport socket",
        ),
    ],
    ids=["tap", "alts by name", "tap inside internal_upstream"],
)
def test_unknown_transport_socket_is_a_load_error(ts: dict[str, Any], path: str, msg: str) -> None:
    """A transport socket moorline does not have used to validate and then fail every upstream
    connection with 503; it is a config error at load now."""
    from envoy.extensions.transport_sockets.tap.v3 import tap_pb2  # noqa: F401

    with pytest.raises(ConfigError) as ei:
        build(static("c", ep("10.0.0.1"), transport_socket=ts))
    assert ei.value.path == path, str(ei.value)
    assert msg in ei.value.message, str(ei.value)


def test_internal_upstream_uses_its_inner_transport_socket() -> None:
    """Istio's internal_upstream only adds metadata for internal listeners; the bytes go through
    its inner transport socket (raw_buffer here), and the ignored metadata is announced."""
    ts = {
        "name": "internal_upstream",
        "typed_config": {
            "@type": IU_TYPE,
            "passthrough_metadata": [{"kind": {"host": {}}, "name": "tunnel"}],
            "transport_socket": RAW_BUFFER_TS,
        },
    }
    c = build(static("c", ep("10.0.0.1"), transport_socket=ts))
    assert c.transport_socket is not None
    assert c.notices == [
        "transport_socket.typed_config.passthrough_metadata: ignored (no internal listeners)"
    ]


def test_manager_prefixes_paths_and_rejects_duplicates() -> None:
    from moorline.upstream.manager import ClusterManager

    m = ClusterManager(Store())
    m.add(proto(static("a", _sa())), "static_resources.clusters[0]")
    with pytest.raises(ConfigError) as ei:
        m.add(proto(static("a", _sa())), "static_resources.clusters[1]")
    assert ei.value.path == "static_resources.clusters[1].name" and "duplicate" in ei.value.message
    with pytest.raises(ConfigError) as ei:
        m.add(proto(static("b", _sa(0))), "static_resources.clusters[2]")
    assert (
        ei.value.path == f"static_resources.clusters[2].{LA0}[0].endpoint.address.socket_address.port_value"
    )
    assert m.get("b") is None


# -- stats -------------------------------------------------------------------------------------------


def test_stats_exist_with_envoy_names() -> None:
    store = Store()
    c = build(static("svc", ep("10.0.0.1")), store)
    for n in ClusterStats.COUNTERS:
        assert isinstance(store.get(f"cluster.svc.{n}"), StatCounter), n
        assert getattr(c.stats, n) is store.get(f"cluster.svc.{n}")
    for n in ClusterStats.GAUGES:
        assert isinstance(store.get(f"cluster.svc.{n}"), Gauge), n
    for n in ClusterStats.HISTOGRAMS:
        assert isinstance(store.get(f"cluster.svc.{n}"), Histogram), n
    assert isinstance(store.get("cluster.svc.circuit_breakers.default.rq_open"), Gauge)
    brief = (
        "upstream_cx_total upstream_cx_connect_fail upstream_cx_connect_timeout upstream_cx_destroy "
        "upstream_cx_destroy_local upstream_cx_destroy_remote upstream_cx_rx_bytes_total upstream_cx_tx_bytes_total "
        "upstream_cx_idle_timeout upstream_cx_overflow upstream_cx_max_requests upstream_cx_protocol_error "
        "upstream_rq_total upstream_rq_pending_total upstream_rq_pending_overflow upstream_rq_pending_failure_eject "
        "upstream_rq_cancelled upstream_rq_retry upstream_rq_retry_success upstream_rq_retry_overflow "
        "upstream_rq_retry_limit_exceeded upstream_rq_timeout upstream_rq_per_try_timeout upstream_rq_rx_reset "
        "upstream_rq_tx_reset upstream_rq_completed upstream_rq_maintenance_mode update_attempt update_success "
        "update_failure update_empty lb_healthy_panic upstream_flow_control_paused_reading_total "
        "upstream_flow_control_resumed_reading_total upstream_cx_active upstream_rq_active upstream_rq_pending_active "
        "membership_healthy membership_total membership_degraded max_host_weight upstream_rq_time "
        "upstream_cx_connect_ms upstream_cx_length_ms"
    ).split()
    for n in brief:
        assert store.get(f"cluster.svc.{n}") is not None, n
    # Slots: a typo on the hot path fails loudly instead of creating a new attribute.
    with pytest.raises(AttributeError):
        c.stats.upstream_rq_totl = 1  # type: ignore[attr-defined]


def test_rq_status_counts_code_and_class() -> None:
    store = Store()
    c = build(static("svc", ep("10.0.0.1")), store)
    c.stats.rq_status(503)
    c.stats.rq_status(503)
    c.stats.rq_status(504)
    c.stats.rq_status(200)
    assert store.counter("cluster.svc.upstream_rq_503").value == 2
    assert store.counter("cluster.svc.upstream_rq_504").value == 1
    assert store.counter("cluster.svc.upstream_rq_5xx").value == 3
    assert store.counter("cluster.svc.upstream_rq_2xx").value == 1


# -- Istio fixtures ----------------------------------------------------------------------------------------


def _dump_clusters(name: str) -> list[dict[str, Any]]:
    dump = json.loads((FIXTURES / name).read_text())
    out = []
    for cfg in dump["configs"]:
        if not cfg.get("@type", "").endswith("ClustersConfigDump"):
            continue
        for key in ("static_clusters", "dynamic_active_clusters"):
            out.extend(item["cluster"] for item in cfg.get(key, []))
    return out


def _bootstrap_clusters(name: str) -> list[dict[str, Any]]:
    return list(json.loads((FIXTURES / name).read_text())["static_resources"]["clusters"])


FIXTURE_CLUSTERS = [
    (f, c)
    for f in ("sidecar_config_dump_full.json", "sidecar_configdump_compare.json")
    for c in _dump_clusters(f)
] + [
    (f, c)
    for f in (
        "bootstrap_default_golden.json",
        "bootstrap_authsds_golden.json",
        "bootstrap_running_golden.json",
    )
    for c in _bootstrap_clusters(f)
]


@pytest.mark.parametrize(
    ("fname", "raw"), FIXTURE_CLUSTERS, ids=[f"{f}:{c['name']}" for f, c in FIXTURE_CLUSTERS]
)
def test_istio_fixture_clusters_compile(fname: str, raw: dict[str, Any]) -> None:
    d = {k: v for k, v in copy.deepcopy(raw).items() if k != "@type"}
    # Every nested Any in these fixtures has a type xds-protos knows, so no field is skipped.
    m = json_format.ParseDict(d, cluster_pb2.Cluster())
    c = compile_cluster(m, Store())  # none of these uses an unsupported feature
    assert c.name == raw["name"]
    if c.type == "STATIC":
        assert c.hosts and c.choose_host() is not None
    if raw["name"] == "xds-grpc":
        assert c.http2 is True and c.max_requests_per_connection == 1 and c.tcp_keepalive == (None, 300, None)
        assert c.hosts[0].family == socket.AF_UNIX and c.max_connections == 100000
    if raw["name"].startswith("inbound-vip"):
        assert c.type == "EDS" and c.hosts == []
        assert c.transport_socket is not None and c.transport_socket.name == "internal_upstream"
    if raw["name"] == "zipkin":
        assert c.type == "STRICT_DNS" and c.notices  # respect_dns_ttl is noticed


def test_sparse_priorities_cost_only_the_levels_they_use() -> None:
    # Priorities 0 and 2**32 - 1 (a control plane may skip levels): two levels, as 0 and 1 would be.
    d = static("c")
    d["load_assignment"]["endpoints"] = [
        {"priority": 0, "lb_endpoints": [ep("10.0.0.1"), _unhealthy("10.0.0.2")]},
        {"priority": 2**32 - 1, "lb_endpoints": [ep("10.0.9.1")]},
    ]
    c = build(d)
    assert c._lb.loads == [70.0, 30.0]  # type: ignore[union-attr]
    assert {c.choose_host().address for _ in range(400)} == {"10.0.0.1", "10.0.9.1"}  # type: ignore[union-attr]
