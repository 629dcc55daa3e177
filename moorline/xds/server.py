"""A small xDS control plane on grpcio: ADS and every type's own service, state of the world and
delta, serving snapshots it is handed. ``moorline xds-serve DIR`` serves a directory of YAML
files with it; ``moorline.testing.xds_server`` drives it in tests.

    cp = XdsServer().start()               # its own thread and loop; cp.port
    cp.push(CLUSTER_TYPE, "1", [cluster])  # protos (or packed Anys as they are: NACK-worthy ones)
    cp.stop()

Per stream and type it keeps what the client asked for (a wildcard subscription: the first
request names nothing, or ``*``; else the names) and, for delta, what it already sent
(name -> version, seeded from ``initial_resource_versions``). A push goes to every stream
subscribed to its type: state of the world sends the whole snapshot (for named subscriptions,
the named resources); delta sends the resources whose version changed and the names that left
(``removed_resources``). A request that changes a named subscription is answered with the
resources newly asked for. ``requests`` records every request received (unless
``record_requests`` is False, as for ``moorline xds-serve``), so callers see ACKs and NACKs
(``error_detail``).
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from typing import Any, Self

from moorline.xds.ads import ADS_SERVICE, SERVICES


def _any(resource: Any) -> Any:
    from google.protobuf import any_pb2

    if isinstance(resource, any_pb2.Any):
        return resource
    a = any_pb2.Any()
    a.Pack(resource, deterministic=True)
    return a


def resource_name(any_msg: Any) -> str:
    """The name of a packed resource (``name``, or ``cluster_name`` for an assignment); "" when
    it does not decode (a resource injected to be NACKed)."""
    from google.protobuf import symbol_database

    try:
        cls = symbol_database.Default().GetSymbol(any_msg.type_url.rsplit("/", 1)[-1])
        msg = cls()
        msg.ParseFromString(any_msg.value)
    except Exception:
        return ""
    return str(getattr(msg, "cluster_name", "") or getattr(msg, "name", ""))


class _Sub:
    """One type on one stream."""

    __slots__ = ("names", "sent", "wildcard")

    def __init__(self) -> None:
        self.wildcard = False
        self.names: set[str] = set()
        self.sent: dict[str, str] = {}  # delta: name -> version sent


class _Stream:
    def __init__(self, delta: bool, only_type: str | None) -> None:
        self.node = ""  # the node id of the stream's first request
        self.delta = delta
        self.only_type = only_type  # a type's own service: that type only
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.subs: dict[str, _Sub] = {}


class XdsServer:
    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        unix_path: str | None = None,
        record_requests: bool = True,
    ) -> None:
        self.host = host
        self.port = port
        self.unix_path = unix_path
        # Every request received, for tests (unbounded: one per ACK); a long-running control
        # plane (``moorline xds-serve``) passes record_requests=False and keeps none.
        self.record_requests = record_requests
        self.requests: list[Any] = []
        self.nonce = ""
        self.streams_opened = 0
        self._lock = threading.Lock()
        # (node id or "" for every node, type URL) -> (version, [(name, version, Any)])
        self._snapshot: dict[tuple[str, str], tuple[str, list[tuple[str, str, Any]]]] = {}
        self._streams: list[_Stream] = []
        self._n = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None

    # -- control --------------------------------------------------------------------------------
    def start(self) -> Self:
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._up())
            except BaseException as e:  # (reported to start()'s caller)
                errors.append(e)
                ready.set()
                return
            ready.set()
            loop.run_forever()

        self._thread = threading.Thread(target=run, name="xds-server", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the xDS server did not start")
        if errors:
            raise errors[0]
        return self

    async def _up(self) -> None:
        import grpc

        self._server = grpc.aio.server()
        self._server.add_generic_rpc_handlers((self._handlers(),))
        if self.unix_path is not None:
            self._server.add_insecure_port(f"unix:{self.unix_path}")
        else:
            self.port = self._server.add_insecure_port(f"{self.host}:{self.port}")
        await self._server.start()

    def _handlers(self) -> Any:
        import grpc
        from envoy.service.discovery.v3 import discovery_pb2 as pb

        def handler(delta: bool, only_type: str | None) -> Any:
            req_cls = pb.DeltaDiscoveryRequest if delta else pb.DiscoveryRequest

            async def serve(request_iterator: Any, context: Any) -> Any:
                async for item in self._serve(request_iterator, delta, only_type):
                    yield item

            return grpc.stream_stream_rpc_method_handler(
                serve,
                request_deserializer=req_cls.FromString,
                response_serializer=lambda m: m.SerializeToString(),
            )

        services: dict[str, dict[str, Any]] = {
            ADS_SERVICE: {
                "StreamAggregatedResources": handler(False, None),
                "DeltaAggregatedResources": handler(True, None),
            }
        }
        for type_url, (service, noun) in SERVICES.items():
            services[service] = {
                f"Stream{noun}": handler(False, type_url),
                f"Delta{noun}": handler(True, type_url),
            }

        class _Generic(grpc.GenericRpcHandler):
            def service(self, details: Any) -> Any:
                _, service, method = details.method.split("/")
                return services.get(service, {}).get(method)

        return _Generic()

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

    def push(self, type_url: str, version: str, resources: list[Any], node: str = "") -> str:
        """Set ``type_url``'s resources (protos, or ``Any``s as they are) and send them to every
        stream subscribed to it: for ``node`` "" every node without a snapshot of its own, else
        the streams of that node id. Returns the nonce of the last response sent (or "")."""
        items = []
        for r in resources:
            a = _any(r)
            items.append((resource_name(a), hashlib.sha256(a.value).hexdigest()[:16], a))
        assert self._loop is not None
        done = threading.Event()
        out: list[str] = []

        def do() -> None:
            self._snapshot[(node, type_url)] = (version, items)
            for st in self._streams:
                sub = st.subs.get(type_url)
                if node and st.node != node:
                    continue
                if not node and (st.node, type_url) in self._snapshot and st.node:
                    continue  # (that node has its own)
                if sub is not None:
                    resp = self._response(st, type_url, sub, changed_only=True)
                    if resp is not None:
                        out.append(resp.nonce)
                        st.queue.put_nowait(resp)
            done.set()

        self._loop.call_soon_threadsafe(do)
        done.wait(10)
        self.nonce = out[-1] if out else self.nonce
        return self.nonce

    def snapshot_names(self, type_url: str, node: str = "") -> list[str]:
        snap = self._snapshot.get((node, type_url))
        return [n for n, _v, _a in snap[1]] if snap else []

    # -- streams --------------------------------------------------------------------------------
    async def _serve(self, request_iterator: Any, delta: bool, only_type: str | None) -> Any:
        st = _Stream(delta, only_type)
        self._streams.append(st)
        self.streams_opened += 1

        async def read() -> None:
            try:
                async for req in request_iterator:
                    if self.record_requests:
                        with self._lock:
                            self.requests.append(req)
                    self._on_request(st, req)
            finally:
                st.queue.put_nowait(None)

        reader = asyncio.ensure_future(read())
        try:
            while True:
                item = await st.queue.get()
                if item is None:
                    return
                yield item
        finally:
            reader.cancel()
            self._streams.remove(st)

    def _on_request(self, st: _Stream, req: Any) -> None:
        if not st.node and req.HasField("node"):
            st.node = req.node.id
        type_url = req.type_url or st.only_type or ""
        if st.only_type is not None and type_url != st.only_type:
            return
        sub = st.subs.get(type_url)
        new = sub is None
        if sub is None:
            sub = st.subs[type_url] = _Sub()
        if st.delta:
            if new:
                subscribe = list(req.resource_names_subscribe)
                sub.wildcard = not subscribe or "*" in subscribe
                sub.sent = dict(req.initial_resource_versions)
            added = set(req.resource_names_subscribe) - {"*"} - sub.names
            sub.names |= added
            sub.names -= set(req.resource_names_unsubscribe)
            for n in req.resource_names_unsubscribe:
                sub.sent.pop(n, None)
            if new or added:
                resp = self._response(st, type_url, sub, changed_only=True)
                if resp is not None:
                    st.queue.put_nowait(resp)
            return
        names = set(req.resource_names) - {"*"}
        if new:
            sub.wildcard = not names
        changed = names != sub.names
        sub.names = names
        if new or (changed and not sub.wildcard):
            resp = self._response(st, type_url, sub, changed_only=False)
            if resp is not None:
                st.queue.put_nowait(resp)

    def _response(self, st: _Stream, type_url: str, sub: _Sub, changed_only: bool) -> Any:
        from envoy.service.discovery.v3 import discovery_pb2 as pb

        snap = self._snapshot.get((st.node, type_url)) or self._snapshot.get(("", type_url))
        if snap is None:
            return None
        version, items = snap
        wanted = [(n, v, a) for n, v, a in items if sub.wildcard or n in sub.names or not n]
        self._n += 1
        nonce = f"n{self._n}"
        if not st.delta:
            return pb.DiscoveryResponse(
                version_info=version, type_url=type_url, nonce=nonce, resources=[a for _n, _v, a in wanted]
            )
        present = {n for n, _v, _a in wanted}
        send = [(n, v, a) for n, v, a in wanted if not n or sub.sent.get(n) != v]
        removed = sorted(n for n in sub.sent if n not in present)
        if changed_only and not send and not removed and sub.sent:
            return None
        for n, v, _a in send:
            sub.sent[n] = v
        for n in removed:
            del sub.sent[n]
        return pb.DeltaDiscoveryResponse(
            system_version_info=version,
            type_url=type_url,
            nonce=nonce,
            resources=[pb.Resource(name=n, version=v, resource=a) for n, v, a in send],
            removed_resources=removed,
        )


__all__ = ["XdsServer", "resource_name"]
