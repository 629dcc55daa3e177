"""Resolver (dedupe, lookup families, failures) and the DNS cluster types over a fake backend.

Real DNS servers are not reachable here, so lookups go to an injected fake; one test uses the real
system resolver on ``localhost`` (answered from /etc/hosts)."""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import Awaitable
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from google.protobuf import json_format

from moorline.observability.stats import Store
from moorline.upstream.cluster import Cluster, compile_cluster
from moorline.upstream.dns import Answer, DnsError, Resolver, select_family
from moorline.upstream.manager import ClusterManager

V4, V6 = socket.AF_INET, socket.AF_INET6


def run(coro: Awaitable[Any]) -> Any:
    async def main() -> Any:
        return await asyncio.wait_for(coro, 10)

    return asyncio.run(main())


class FakeDns:
    """Answers from a mutable table; a name mapped to an exception raises it."""

    def __init__(self, table: dict[str, Answer | Exception]) -> None:
        self.table = table
        self.calls: list[tuple[str, int]] = []
        self.gate: asyncio.Event | None = None

    async def __call__(self, name: str, family: int) -> Answer:
        self.calls.append((name, family))
        if self.gate is not None:
            await self.gate.wait()
        ans = self.table.get(name)
        if ans is None:
            raise DnsError(f"{name}: not found")
        if isinstance(ans, Exception):
            raise ans
        if family == socket.AF_UNSPEC:
            return list(ans)
        return [a for a in ans if a[0] == family]


def dns_cluster(ctype: str, *eps: tuple[str, int, int], resolver: Resolver, **extra: Any) -> Cluster:
    d = {
        "name": "d",
        "type": ctype,
        "load_assignment": {
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {"address": {"socket_address": {"address": n, "port_value": p}}},
                            "load_balancing_weight": w,
                        }
                        for n, p, w in eps
                    ]
                }
            ]
        },
        **extra,
    }
    return compile_cluster(
        json_format.ParseDict(d, cluster_pb2.Cluster()), Store(), resolver, random.Random(1)
    )


# -- lookup family policy ----------------------------------------------------------------------------

MIXED: Answer = [(V4, "10.0.0.1"), (V6, "fd00::1"), (V4, "10.0.0.1"), (V4, "10.0.0.2")]


@pytest.mark.parametrize(
    ("family", "answer", "expect"),
    [
        ("AUTO", MIXED, [(V6, "fd00::1")]),
        ("AUTO", [(V4, "10.0.0.1")], [(V4, "10.0.0.1")]),
        ("V4_PREFERRED", MIXED, [(V4, "10.0.0.1"), (V4, "10.0.0.2")]),
        ("V4_PREFERRED", [(V6, "fd00::1")], [(V6, "fd00::1")]),
        ("V4_ONLY", MIXED, [(V4, "10.0.0.1"), (V4, "10.0.0.2")]),
        ("V6_ONLY", [(V4, "10.0.0.1")], []),
        ("ALL", MIXED, [(V4, "10.0.0.1"), (V4, "10.0.0.2"), (V6, "fd00::1")]),
    ],
)
def test_select_family(family: str, answer: Answer, expect: Answer) -> None:
    assert select_family(answer, family) == expect


def test_resolver_asks_backend_for_the_family() -> None:
    fake = FakeDns({"a.test": MIXED})
    r = Resolver(fake)
    assert run(r.resolve("a.test", "V4_ONLY")) == [(V4, "10.0.0.1"), (V4, "10.0.0.2")]
    assert run(r.resolve("a.test", "V6_ONLY")) == [(V6, "fd00::1")]
    run(r.resolve("a.test", "AUTO"))
    assert [f for _n, f in fake.calls] == [V4, V6, socket.AF_UNSPEC]


def test_ip_literal_needs_no_query() -> None:
    fake = FakeDns({})
    r = Resolver(fake)
    assert run(r.resolve("10.1.2.3")) == [(V4, "10.1.2.3")]
    assert run(r.resolve("::1", "ALL")) == [(V6, "::1")]
    assert fake.calls == [] and r.queries == 0


def test_concurrent_lookups_are_deduplicated() -> None:
    async def main() -> None:
        fake = FakeDns({"a.test": [(V4, "10.0.0.1")]})
        fake.gate = asyncio.Event()
        r = Resolver(fake)
        tasks = [asyncio.ensure_future(r.resolve("a.test", "V4_ONLY")) for _ in range(5)]
        tasks.append(asyncio.ensure_future(r.resolve("A.TEST", "V4_ONLY")))
        other = asyncio.ensure_future(r.resolve("a.test", "V6_ONLY"))  # other family: own query
        while len(fake.calls) < 2:
            await asyncio.sleep(0)
        fake.gate.set()
        results = await asyncio.gather(*tasks)
        assert all(res == [(V4, "10.0.0.1")] for res in results)
        assert await other == []
        assert r.queries == 2 and len(fake.calls) == 2
        # Nothing in flight any more: the next lookup queries again.
        await r.resolve("a.test", "V4_ONLY")
        assert r.queries == 3

    run(main())


def test_failure_reaches_every_waiter() -> None:
    async def main() -> None:
        fake = FakeDns({"bad.test": RuntimeError("backend broke")})
        fake.gate = asyncio.Event()
        r = Resolver(fake)
        tasks = [asyncio.ensure_future(r.resolve("bad.test")) for _ in range(3)]
        await asyncio.sleep(0)
        fake.gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(e, DnsError) and "backend broke" in str(e) for e in results)
        with pytest.raises(DnsError, match="not found"):
            await r.resolve("missing.test")

    run(main())


def test_real_resolver_localhost() -> None:
    ans = run(Resolver().resolve("localhost", "ALL"))
    assert ans and {ip for _f, ip in ans} <= {"127.0.0.1", "::1"}


# -- STRICT_DNS ------------------------------------------------------------------------------------


def test_strict_dns_hosts_from_every_address_and_refresh() -> None:
    async def main() -> None:
        fake = FakeDns({"a.test": [(V4, "10.0.0.1"), (V4, "10.0.0.2")], "b.test": [(V4, "10.0.0.9")]})
        c = dns_cluster(
            "STRICT_DNS",
            ("a.test", 80, 2),
            ("b.test", 81, 1),
            resolver=Resolver(fake),
            dns_refresh_rate="0.01s",
            dns_lookup_family="V4_ONLY",
        )
        assert c.hosts == []
        changed = asyncio.Event()
        await c.start()
        try:
            assert [(h.addr_str, h.weight, h.hostname) for h in c.hosts] == [
                ("10.0.0.1:80", 2, "a.test"),
                ("10.0.0.2:80", 2, "a.test"),
                ("10.0.0.9:81", 1, "b.test"),
            ]
            assert c.stats.update_attempt.value >= 2 and c.stats.update_success.value >= 2
            kept = c.hosts[1]
            c.on_membership_change.append(changed.set)
            fake.table["a.test"] = [(V4, "10.0.0.2"), (V4, "10.0.0.3")]
            await changed.wait()  # the periodic refresh picked the new answer up
            assert [h.addr_str for h in c.hosts] == ["10.0.0.2:80", "10.0.0.3:80", "10.0.0.9:81"]
            assert c.hosts[0] is kept  # surviving address keeps its Host (active_rq, pool)
            assert {c.choose_host() for _ in range(20)} == set(c.hosts)
        finally:
            c.stop()

    run(main())


def test_dns_failure_keeps_previous_hosts() -> None:
    async def main() -> None:
        fake = FakeDns({"a.test": [(V4, "10.0.0.1")], "b.test": [(V4, "10.0.0.2")]})
        c = dns_cluster("STRICT_DNS", ("a.test", 80, 1), ("b.test", 80, 1), resolver=Resolver(fake))
        assert await c.refresh() is True
        before = list(c.hosts)
        fake.table["a.test"] = DnsError("a.test: timeout")
        fake.table["b.test"] = [(V4, "10.0.0.3")]
        assert await c.refresh() is False
        # a.test's last good answer stays; b.test moved on.
        assert [h.addr_str for h in c.hosts] == ["10.0.0.1:80", "10.0.0.3:80"]
        assert c.hosts[0] is before[0]
        assert c.stats.update_failure.value == 1
        assert c.stats.update_success.value == 3 and c.stats.update_attempt.value == 4
        assert c.last_dns_error == "a.test: timeout"

    run(main())


def test_first_resolution_failure_still_starts() -> None:
    async def main() -> None:
        c = dns_cluster(
            "STRICT_DNS", ("gone.test", 80, 1), resolver=Resolver(FakeDns({})), dns_refresh_rate="60s"
        )
        await c.start()
        try:
            assert c.hosts == [] and c.choose_host() is None
            assert c.stats.update_failure.value == 1
        finally:
            c.stop()

    run(main())


def test_failure_refresh_rate_retries_sooner() -> None:
    async def main() -> None:
        fake = FakeDns({})
        c = dns_cluster(
            "STRICT_DNS",
            ("late.test", 80, 1),
            resolver=Resolver(fake),
            dns_refresh_rate="3600s",
            dns_failure_refresh_rate={"base_interval": "0.01s", "max_interval": "0.02s"},
        )
        changed = asyncio.Event()
        c.on_membership_change.append(changed.set)
        await c.start()
        try:
            assert c.hosts == []
            fake.table["late.test"] = [(V4, "10.0.0.7")]
            await changed.wait()  # retried on the failure schedule, not after an hour
            assert [h.addr_str for h in c.hosts] == ["10.0.0.7:80"]
        finally:
            c.stop()

    run(main())


def test_auto_family_prefers_v6() -> None:
    async def main() -> None:
        c = dns_cluster("STRICT_DNS", ("m.test", 80, 1), resolver=Resolver(FakeDns({"m.test": MIXED})))
        await c.refresh()
        assert [(h.addr_str, h.family) for h in c.hosts] == [("[fd00::1]:80", V6)]

    run(main())


# -- LOGICAL_DNS -------------------------------------------------------------------------------------


def test_logical_dns_single_host_updated_in_place() -> None:
    async def main() -> None:
        fake = FakeDns({"l.test": [(V4, "10.0.0.1"), (V4, "10.0.0.2")]})
        c = dns_cluster(
            "LOGICAL_DNS", ("l.test", 8080, 1), resolver=Resolver(fake), dns_lookup_family="V4_ONLY"
        )
        calls: list[int] = []
        c.on_membership_change.append(lambda: calls.append(1))
        await c.refresh()
        (h,) = c.hosts
        assert (h.addr_str, h.hostname) == ("10.0.0.1:8080", "l.test")
        assert c.choose_host() is h
        fake.table["l.test"] = [(V4, "10.0.0.5")]
        await c.refresh()
        assert c.hosts == [h] and h.addr_str == "10.0.0.5:8080" and h.address == "10.0.0.5"
        fake.table["l.test"] = DnsError("l.test: servfail")
        await c.refresh()
        assert h.address == "10.0.0.5" and c.stats.update_failure.value == 1
        assert calls == [1]  # added once; address changes are not membership changes

    run(main())


# -- manager ---------------------------------------------------------------------------------------


def test_manager_start_resolves_all_clusters_sharing_one_query() -> None:
    async def main() -> None:
        fake = FakeDns({"shared.test": [(V4, "10.0.0.1")]})
        m = ClusterManager(Store(), resolver=Resolver(fake))
        for name in ("x", "y"):
            d = {
                "name": name,
                "type": "STRICT_DNS",
                "load_assignment": {
                    "endpoints": [
                        {
                            "lb_endpoints": [
                                {
                                    "endpoint": {
                                        "address": {
                                            "socket_address": {"address": "shared.test", "port_value": 80}
                                        }
                                    }
                                }
                            ]
                        }
                    ]
                },
            }
            m.add(json_format.ParseDict(d, cluster_pb2.Cluster()))
        fake.gate = asyncio.Event()
        starting = asyncio.ensure_future(m.start())
        for _ in range(5):  # both clusters' first lookups get under way (FIFO scheduling)
            await asyncio.sleep(0)
        assert not starting.done()  # start() waits for the first resolution
        fake.gate.set()
        await starting
        try:
            assert all(c.hosts and c.hosts[0].addr_str == "10.0.0.1:80" for c in m.clusters.values())
            assert len(fake.calls) == 1  # concurrent first lookups of one name: one query
        finally:
            m.stop()

    run(main())


def test_cluster_added_while_running_is_started() -> None:
    async def main() -> None:
        fake = FakeDns({"late.test": [(V4, "10.0.0.4")]})
        m = ClusterManager(Store(), resolver=Resolver(fake))
        await m.start()
        try:
            d = {
                "name": "late",
                "type": "STRICT_DNS",
                "load_assignment": {
                    "endpoints": [
                        {
                            "lb_endpoints": [
                                {
                                    "endpoint": {
                                        "address": {
                                            "socket_address": {"address": "late.test", "port_value": 80}
                                        }
                                    }
                                }
                            ]
                        }
                    ]
                },
            }
            c = m.add(json_format.ParseDict(d, cluster_pb2.Cluster()))
            changed = asyncio.Event()
            c.on_membership_change.append(changed.set)
            await changed.wait()
            assert [h.addr_str for h in c.hosts] == ["10.0.0.4:80"]
        finally:
            m.stop()

    run(main())


def test_updated_dns_cluster_keeps_hosts_until_it_resolves() -> None:
    async def main() -> None:
        fake = FakeDns({"k.test": [(V4, "10.0.0.1")]})
        m = ClusterManager(Store(), resolver=Resolver(fake))

        def d(timeout: str) -> Any:
            return json_format.ParseDict(
                {
                    "name": "k",
                    "type": "STRICT_DNS",
                    "connect_timeout": timeout,
                    "dns_refresh_rate": "3600s",
                    "load_assignment": {
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {"address": "k.test", "port_value": 80}
                                            }
                                        }
                                    }
                                ]
                            }
                        ]
                    },
                },
                cluster_pb2.Cluster(),
            )

        old = m.add_or_update(d("1s"))
        await m.start()
        try:
            h = old.hosts[0]
            fake.gate = asyncio.Event()  # the new cluster's first lookup hangs
            new = m.add_or_update(d("2s"))
            assert new is not old and new.connect_timeout == 2.0
            # The new cluster serves the old addresses with hosts of its own; the old host
            # (and its pools) drain with the old cluster.
            (nh,) = new.hosts
            assert nh is not h and nh.cluster is new and nh.addr_str == h.addr_str
            assert new.choose_host() is nh and h.removed and old.retired
        finally:
            m.stop()

    run(main())
