"""A test control plane: Envoy's ADS (state of the world) on grpcio, in a thread of its own.

    cp = XdsServer().start()               # cp.port
    cp.push(CLUSTER_TYPE, "1", [cluster])  # protos (or packed Anys, for NACK-worthy ones)
    cp.wait_for(lambda r: r.type_url == CLUSTER_TYPE and r.response_nonce == cp.nonce)
    cp.stop()

Every stream that subscribed to a type gets each push of it (and the current snapshot when it
subscribes). ``requests`` records every ``DiscoveryRequest`` received, so tests see ACKs
(``version_info`` = the push's, nonce echoed) and NACKs (``error_detail`` set).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2


class _Ads(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    def __init__(self, owner: XdsServer) -> None:
        self.owner = owner

    async def StreamAggregatedResources(self, request_iterator: Any, context: Any) -> Any:
        owner = self.owner
        queue: asyncio.Queue[Any] = asyncio.Queue()
        subscribed: set[str] = set()
        stream = (queue, subscribed)
        owner._streams.append(stream)
        owner.streams_opened += 1

        async def read() -> None:
            async for req in request_iterator:
                with owner._lock:
                    owner.requests.append(req)
                if req.type_url not in subscribed:
                    subscribed.add(req.type_url)
                    snap = owner._snapshot.get(req.type_url)
                    if snap is not None:
                        queue.put_nowait(owner._response(req.type_url, *snap))
            queue.put_nowait(None)

        reader = asyncio.ensure_future(read())
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                yield item
        finally:
            reader.cancel()
            owner._streams.remove(stream)


class XdsServer:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.requests: list[Any] = []
        self.nonce = ""
        self.streams_opened = 0
        self._lock = threading.Lock()
        self._snapshot: dict[str, tuple[str, list[Any]]] = {}
        self._streams: list[Any] = []
        self._n = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None

    # -- control ------------------------------------------------------------------------------
    def start(self) -> XdsServer:
        ready = threading.Event()

        def run() -> None:
            loop = self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)

            async def up() -> None:
                self._server = grpc.aio.server()
                ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(_Ads(self), self._server)
                self.port = self._server.add_insecure_port(f"{self.host}:{self.port}")
                await self._server.start()
                ready.set()

            loop.run_until_complete(up())
            loop.run_forever()

        self._thread = threading.Thread(target=run, name="xds-server", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the test xDS server did not start")
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is None:
            return
        fut = asyncio.run_coroutine_threadsafe(self._server.stop(0), loop)
        fut.result(10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop = None

    def push(self, type_url: str, version: str, resources: list[Any]) -> str:
        """Set ``type_url``'s resources (protos, or ``Any``s as they are) and send them to every
        stream subscribed to it. Returns the nonce of this push."""
        anys = []
        for r in resources:
            if isinstance(r, any_pb2.Any):
                anys.append(r)
            else:
                a = any_pb2.Any()
                a.Pack(r)
                anys.append(a)
        assert self._loop is not None
        done = threading.Event()
        out: list[str] = []

        def do() -> None:
            self._snapshot[type_url] = (version, anys)
            resp = self._response(type_url, version, anys)
            out.append(resp.nonce)
            for queue, subscribed in self._streams:
                if type_url in subscribed:
                    queue.put_nowait(resp)
            done.set()

        self._loop.call_soon_threadsafe(do)
        done.wait(10)
        self.nonce = out[0]
        return self.nonce

    def wait_for(self, pred: Callable[[Any], bool], timeout: float = 20.0) -> Any:
        """The first received request matching ``pred`` (waiting up to ``timeout``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                for r in self.requests:
                    if pred(r):
                        return r
            time.sleep(0.05)
        raise AssertionError("no matching DiscoveryRequest arrived")

    def _response(self, type_url: str, version: str, anys: list[Any]) -> Any:
        self._n += 1
        return discovery_pb2.DiscoveryResponse(
            version_info=version, type_url=type_url, nonce=f"n{self._n}", resources=anys
        )


__all__ = ["XdsServer"]
