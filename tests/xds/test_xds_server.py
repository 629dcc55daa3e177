"""The control plane (``moorline.xds.server``) driven by raw gRPC streams: state of the world
and delta, wildcard and named subscriptions, what a push sends and what a request answers."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment
from envoy.service.discovery.v3 import discovery_pb2 as pb

from moorline.testing.xds_server import XdsServer
from moorline.xds.ads import method_path
from moorline.xds.files import CLUSTER_TYPE, ENDPOINT_TYPE


class _Stream:
    """A client stream: requests go in through ``send``, responses come out of ``get``."""

    def __init__(self, port: int, delta: bool, type_url: str | None = None) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        req, resp = (
            (pb.DeltaDiscoveryRequest, pb.DeltaDiscoveryResponse)
            if delta
            else (pb.DiscoveryRequest, pb.DiscoveryResponse)
        )
        call = self.channel.stream_stream(
            method_path(type_url, delta),
            request_serializer=req.SerializeToString,
            response_deserializer=resp.FromString,
        )
        self.out: queue.Queue[Any] = queue.Queue()
        self.responses: queue.Queue[Any] = queue.Queue()

        def reqs() -> Iterator[Any]:
            while True:
                item = self.out.get()
                if item is None:
                    return
                yield item

        self.call = call(reqs())
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for r in self.call:
                self.responses.put(r)
        except grpc.RpcError:
            pass

    def send(self, r: Any) -> None:
        self.out.put(r)

    def get(self, timeout: float = 10) -> Any:
        return self.responses.get(timeout=timeout)

    def nothing(self, wait: float = 0.3) -> bool:
        try:
            self.responses.get(timeout=wait)
        except queue.Empty:
            return True
        return False

    def close(self) -> None:
        self.out.put(None)
        self.channel.close()


@pytest.fixture
def cp() -> Iterator[XdsServer]:
    s = XdsServer().start()
    yield s
    s.stop()


def test_delta_sends_only_changes_and_removals(cp: XdsServer) -> None:
    cp.push(CLUSTER_TYPE, "1", [Cluster(name="a"), Cluster(name="b")])
    s = _Stream(cp.port, delta=True)
    try:
        s.send(pb.DeltaDiscoveryRequest(type_url=CLUSTER_TYPE))
        r = s.get()
        assert sorted(x.name for x in r.resources) == ["a", "b"] and r.system_version_info == "1"
        s.send(pb.DeltaDiscoveryRequest(type_url=CLUSTER_TYPE, response_nonce=r.nonce))  # ACK
        assert s.nothing()  # an ACK is not answered
        cp.push(CLUSTER_TYPE, "2", [Cluster(name="a"), Cluster(name="c", connect_timeout={"seconds": 2})])
        r = s.get()
        assert [x.name for x in r.resources] == ["c"] and list(r.removed_resources) == ["b"]
    finally:
        s.close()
    # A new stream that says what it has gets only what differs.
    s = _Stream(cp.port, delta=True)
    try:
        versions = {x: v for x, _v2, v in [(n, 0, cp_version(cp, CLUSTER_TYPE, n)) for n in ("a", "c")]}
        versions["c"] = "stale"
        s.send(pb.DeltaDiscoveryRequest(type_url=CLUSTER_TYPE, initial_resource_versions=versions))
        r = s.get()
        assert [x.name for x in r.resources] == ["c"]
    finally:
        s.close()


def cp_version(cp: XdsServer, type_url: str, name: str) -> str:
    for n, v, _a in cp._snapshot[("", type_url)][1]:
        if n == name:
            return v
    raise KeyError(name)


def test_named_subscriptions_get_what_they_ask_for(cp: XdsServer) -> None:
    cp.push(
        ENDPOINT_TYPE, "1", [ClusterLoadAssignment(cluster_name="x"), ClusterLoadAssignment(cluster_name="y")]
    )
    s = _Stream(cp.port, delta=False)
    d = _Stream(cp.port, delta=True, type_url=ENDPOINT_TYPE)  # the type's own service
    try:
        s.send(pb.DiscoveryRequest(type_url=ENDPOINT_TYPE, resource_names=["x"]))
        r = s.get()
        assert len(r.resources) == 1 and r.version_info == "1"
        s.send(
            pb.DiscoveryRequest(
                type_url=ENDPOINT_TYPE, resource_names=["x"], response_nonce=r.nonce, version_info="1"
            )
        )
        assert s.nothing()
        # Asking for one more name is answered with both.
        s.send(
            pb.DiscoveryRequest(
                type_url=ENDPOINT_TYPE, resource_names=["x", "y"], response_nonce=r.nonce, version_info="1"
            )
        )
        assert len(s.get().resources) == 2
        d.send(pb.DeltaDiscoveryRequest(resource_names_subscribe=["y"]))
        r = d.get()
        assert [x.name for x in r.resources] == ["y"]
        d.send(
            pb.DeltaDiscoveryRequest(
                response_nonce=r.nonce, resource_names_unsubscribe=["y"], resource_names_subscribe=["x"]
            )
        )
        assert [x.name for x in d.get().resources] == ["x"]
    finally:
        s.close()
        d.close()


def _until(cond: Any, timeout: float = 10.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_xds_serve_keeps_nothing_per_request_or_per_ended_stream() -> None:
    from moorline.xds.serve import control_plane

    cp = control_plane("127.0.0.1:0", None)
    cp.start()
    try:
        cp.push(CLUSTER_TYPE, "1", [Cluster(name="a")])
        for delta in (False, True):
            s = _Stream(cp.port, delta=delta)
            try:
                req = pb.DeltaDiscoveryRequest if delta else pb.DiscoveryRequest
                s.send(req(type_url=CLUSTER_TYPE))
                r = s.get()
                assert len(r.resources) == 1
                for _ in range(50):  # ACKs: answered with nothing, and not kept
                    s.send(req(type_url=CLUSTER_TYPE, response_nonce=r.nonce))
                assert s.nothing()
            finally:
                s.close()
        assert cp.requests == []
        assert _until(lambda: not cp._streams), "the ended streams' state is still held"
    finally:
        cp.stop()
