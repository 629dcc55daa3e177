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
