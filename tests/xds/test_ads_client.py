"""``xds.ads.XdsClient`` on its own, in memory: hand-built responses through ``handle`` and the
requests it answers with (subscriptions, ACKs and NACKs, delta bookkeeping, bad input)."""

from __future__ import annotations

import gc
from typing import Any

from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment
from envoy.service.discovery.v3 import discovery_pb2 as pb
from google.protobuf import any_pb2

from moorline.observability.stats import Store
from moorline.xds.ads import XdsClient
from moorline.xds.files import ENDPOINT_TYPE


class Named:
    """A named target recording what it was given."""

    def __init__(self) -> None:
        self.applied: list[tuple[str, str]] = []

    def check(self, proto: Any, path: str) -> None:
        pass

    def apply(self, proto: Any, version_info: str) -> None:
        self.applied.append((proto.cluster_name, version_info))


def cla_resource(name: str, version: str) -> Any:
    a = any_pb2.Any()
    a.Pack(ClusterLoadAssignment(cluster_name=name))
    return pb.Resource(name=name, version=version, resource=a)


def test_delta_acks_unsubscribe_the_names_of_targets_that_are_gone() -> None:
    client = XdsClient("127.0.0.1:1", None, [], Store(), delta=True)
    keep, gone = Named(), Named()
    client.subscribe(ENDPOINT_TYPE, ClusterLoadAssignment, "a", keep)
    client.subscribe(ENDPOINT_TYPE, ClusterLoadAssignment, "b", gone)
    first = client._first_requests()
    assert list(first[0].resource_names_subscribe) == ["a", "b"]
    ack = client.handle(
        pb.DeltaDiscoveryResponse(
            type_url=ENDPOINT_TYPE, nonce="n1", resources=[cla_resource("a", "1"), cla_resource("b", "1")]
        )
    )
    assert not ack.HasField("error_detail") and not ack.resource_names_unsubscribe
    del gone  # (its cluster was removed)
    gc.collect()
    ack = client.handle(
        pb.DeltaDiscoveryResponse(type_url=ENDPOINT_TYPE, nonce="n2", resources=[cla_resource("b", "2")])
    )
    assert ack.response_nonce == "n2" and list(ack.resource_names_unsubscribe) == ["b"]
    assert "b" not in client.named[ENDPOINT_TYPE].received
    assert keep.applied == [("a", "1")]
    # Once only: the next ACK has nothing to unsubscribe.
    ack = client.handle(
        pb.DeltaDiscoveryResponse(type_url=ENDPOINT_TYPE, nonce="n3", resources=[cla_resource("a", "2")])
    )
    assert not ack.resource_names_unsubscribe and keep.applied[-1] == ("a", "2")


class Mgr:
    """A resource manager that keeps what it is given."""

    def __init__(self) -> None:
        self.live: dict[str, Any] = {}

    def compile(self, proto: Any, path: str = "") -> Any:
        return proto

    def add_or_update(self, proto: Any, path: str = "", version_info: str = "") -> Any:
        self.live[proto.name] = type("R", (), {"name": proto.name, "added_via_api": True})()

    def remove(self, name: str) -> bool:
        return self.live.pop(name, None) is not None

    def __iter__(self) -> Any:
        return iter(list(self.live.values()))


def run_until(cp: Any, client: XdsClient, pred: Any) -> Any:
    """Run ``client`` against ``cp`` (a test control plane) until it sent a request matching
    ``pred``; that request."""
    import asyncio

    async def run() -> Any:
        loop = asyncio.get_running_loop()
        client.start(loop)
        try:
            return await loop.run_in_executor(None, lambda: cp.wait_for(pred))
        finally:
            client.stop()

    return asyncio.run(run())


def test_a_response_larger_than_grpcs_default_limit_is_received_and_acked() -> None:
    from envoy.config.cluster.v3.cluster_pb2 import Cluster

    from moorline.testing.xds_server import XdsServer
    from moorline.xds.ads import WildcardKind
    from moorline.xds.files import CLUSTER_TYPE

    # A mesh's whole CDS in one state-of-the-world response: 6 MiB, over gRPC's 4 MiB default.
    pad = "x" * 1024
    clusters = [Cluster(name=f"c{i}", alt_stat_name=pad) for i in range(6 * 1024)]
    cp = XdsServer().start()
    try:
        cp.push(CLUSTER_TYPE, "big", clusters)
        mgr = Mgr()
        client = XdsClient(
            f"127.0.0.1:{cp.port}",
            None,
            [WildcardKind(CLUSTER_TYPE, Cluster, mgr, "cluster_manager.cds")],
            Store(),
        )

        ack = run_until(cp, client, lambda r: r.type_url == CLUSTER_TYPE and r.response_nonce)
        assert ack.version_info == "big" and not ack.HasField("error_detail")
        assert len(mgr.live) == len(clusters)
    finally:
        cp.stop()


class Broken(Named):
    def apply(self, proto: Any, version_info: str) -> None:
        raise RuntimeError("a bug")


def test_a_response_whose_handling_raises_is_nacked_with_the_names_and_the_last_good_version() -> None:
    from moorline.testing.xds_server import XdsServer

    cp = XdsServer().start()
    try:
        cp.push(ENDPOINT_TYPE, "1", [ClusterLoadAssignment(cluster_name="a")])
        client = XdsClient(f"127.0.0.1:{cp.port}", None, [], Store())
        target = Broken()
        client.subscribe(ENDPOINT_TYPE, ClusterLoadAssignment, "a", target, initial_fetch_timeout=0)
        nack = run_until(cp, client, lambda r: r.type_url == ENDPOINT_TYPE and r.HasField("error_detail"))
        assert nack.error_detail.code == 13 and "RuntimeError: a bug" in nack.error_detail.message
        # Still subscribed to "a" (a request naming nothing unsubscribes a state-of-the-world
        # stream), with the version it had before (none).
        assert list(nack.resource_names) == ["a"] and nack.version_info == "" and nack.response_nonce
    finally:
        cp.stop()
