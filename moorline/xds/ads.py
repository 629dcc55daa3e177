"""ADS, state of the world, over gRPC: CDS and LDS from a control plane (istiod,
go-control-plane, ``moorline.testing.xds_server``).

One bidirectional ``AggregatedDiscoveryService.StreamAggregatedResources`` stream on the
server's loop (``grpc.aio``). On each stream the client subscribes to CDS, then LDS (wildcard:
no resource names), sending the node on the stream's first request. Each response is one
state-of-the-world update, checked and applied as a file is (``xds.files.check_resources`` /
``apply_resources``: all or nothing, then the dynamic resources it no longer names removed):

* applied: ACK, a request with the response's ``version_info`` and ``nonce``;
* refused (a resource that does not decode, compile or is named twice): NACK, a request with
  the last good ``version_info``, the response's nonce and ``error_detail`` (INVALID_ARGUMENT and
  the field path); the running configuration stays.

A broken stream is retried with jittered exponential backoff (0.5 s doubling to 30 s), and
``control_plane.connected_state`` says whether one is up. Stats per type, under Envoy's names:
``cluster_manager.cds.*`` / ``listener_manager.lds.*`` (``update_attempt``, ``update_success``,
``update_rejected``, ``version``).

Not here yet: delta xDS, RDS/EDS/SDS through ADS (their resources are named by the listeners
and clusters that use them), warming and ``initial_fetch_timeout``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import weakref
from dataclasses import dataclass, field
from typing import Any, Protocol

from moorline.config.errors import ConfigError
from moorline.observability.stats import Store
from moorline.xds.files import ResourceManager, apply_resources, check_resources, version_hash

log = logging.getLogger("moorline.xds")

BACKOFF_BASE = 0.5
BACKOFF_MAX = 30.0
_INVALID_ARGUMENT = 3
_INTERNAL = 13


class NamedTarget(Protocol):
    """Who asked for one named resource (RDS: an HCM's route configuration). Held weakly: when
    it is gone, its name is dropped from the next request."""

    def check(self, proto: Any, path: str) -> None: ...

    def apply(self, proto: Any, version_info: str) -> None: ...


@dataclass
class NamedKind:
    """A type subscribed to by name (not wildcard): RDS. A response carries the named resources;
    a name it leaves out is unchanged (as for Envoy's RDS and EDS)."""

    type_url: str
    message_cls: Any
    stat_prefix: str
    name_field: str = "name"
    version_info: str = ""
    nonce: str = ""
    targets: dict[str, list[weakref.ref[Any]]] = field(default_factory=dict)

    def names(self) -> list[str]:
        live = {}
        for name, refs in self.targets.items():
            alive = [r for r in refs if r() is not None]
            if alive:
                live[name] = alive
        self.targets = live
        return sorted(live)


@dataclass
class AdsKind:
    """One resource type subscribed to over ADS."""

    type_url: str
    message_cls: Any
    manager: ResourceManager
    stat_prefix: str
    version_info: str = ""
    stats: dict[str, Any] = field(default_factory=dict)


class AdsClient:
    def __init__(self, target: str, node: Any, kinds: list[AdsKind], stats: Store) -> None:
        self.target = target  # a gRPC target: "host:port" or "unix:/path"
        self.node = node
        self.kinds = {k.type_url: k for k in kinds}
        self.order = [k.type_url for k in kinds]
        for k in kinds:
            for n in ("update_attempt", "update_success", "update_rejected"):
                k.stats[n] = stats.counter(f"{k.stat_prefix}.{n}")
            k.stats["version"] = stats.gauge(f"{k.stat_prefix}.version")
        self.connected = stats.gauge("control_plane.connected_state")
        self.named: dict[str, NamedKind] = {}
        self._stats = stats
        self._out: asyncio.Queue[Any] | None = None  # the live stream's writes
        self._task: asyncio.Task[None] | None = None
        self._rng = random.Random()
        self.streams = 0  # streams opened (for tests and logs)

    def subscribe(self, type_url: str, message_cls: Any, name: str, target: NamedTarget) -> None:
        """Ask for the resource ``name`` of ``type_url`` on behalf of ``target`` (held weakly);
        on a live stream the request goes out at once, else with the next stream's first ones."""
        kind = self.named.get(type_url)
        if kind is None:
            name_field = "cluster_name" if type_url.endswith("ClusterLoadAssignment") else "name"
            kind = self.named[type_url] = NamedKind(
                type_url, message_cls, _named_prefix(type_url), name_field
            )
        before = kind.names()
        kind.targets.setdefault(name, []).append(weakref.ref(target))
        if kind.names() != before and self._out is not None:
            self._out.put_nowait(self._named_request(kind))

    def _named_request(self, kind: NamedKind) -> Any:
        from envoy.service.discovery.v3 import discovery_pb2

        return discovery_pb2.DiscoveryRequest(
            type_url=kind.type_url,
            resource_names=kind.names(),
            version_info=kind.version_info,
            response_nonce=kind.nonce,
        )

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._task is None:
            self._task = loop.create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self.connected.value = 0

    async def _run(self) -> None:
        import grpc

        delay = BACKOFF_BASE
        while True:
            try:
                async with grpc.aio.insecure_channel(self.target) as channel:
                    await self._stream(channel)
                delay = BACKOFF_BASE
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the stream broke (or never came up): retry after a while
                details = e.details() if hasattr(e, "details") else str(e)
                log.warning("ADS stream to %s ended: %s", self.target, details)
            self.connected.value = 0
            await asyncio.sleep(delay * (0.5 + self._rng.random()))
            delay = min(delay * 2, BACKOFF_MAX)

    async def _stream(self, channel: Any) -> None:
        from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        call = stub.StreamAggregatedResources()
        self.streams += 1
        out: asyncio.Queue[Any] = asyncio.Queue()
        first = True
        for url in self.order:
            req = discovery_pb2.DiscoveryRequest(type_url=url, version_info=self.kinds[url].version_info)
            if first:
                req.node.CopyFrom(self.node)
                first = False
            out.put_nowait(req)
        for kind in self.named.values():
            if kind.names():
                kind.nonce = ""  # (a nonce belongs to its stream)
                out.put_nowait(self._named_request(kind))

        async def writer() -> None:
            while True:
                await call.write(await out.get())

        self._out = out
        wtask = asyncio.ensure_future(writer())
        try:
            self.connected.value = 1
            while True:
                resp = await call.read()
                if resp is grpc_eof():
                    raise ConnectionError("the control plane closed the stream")
                if wtask.done():
                    wtask.result()  # a failed write ends the stream
                try:
                    reply = self.handle(resp, discovery_pb2)
                except Exception as e:  # a bug of ours: NACK it, log it, keep the stream
                    log.exception("ADS response for %s could not be handled", resp.type_url)
                    reply = discovery_pb2.DiscoveryRequest(type_url=resp.type_url, response_nonce=resp.nonce)
                    reply.error_detail.code = _INTERNAL
                    reply.error_detail.message = f"{type(e).__name__}: {e}"
                out.put_nowait(reply)
        finally:
            self._out = None
            wtask.cancel()

    def handle(self, resp: Any, discovery_pb2: Any) -> Any:
        """Apply one DiscoveryResponse; the ACK or NACK to send back."""
        named = self.named.get(resp.type_url)
        if named is not None:
            return self._handle_named(named, resp, discovery_pb2)
        kind = self.kinds.get(resp.type_url)
        req = discovery_pb2.DiscoveryRequest(type_url=resp.type_url, response_nonce=resp.nonce)
        if kind is None:
            req.error_detail.code = _INVALID_ARGUMENT
            req.error_detail.message = f"type {resp.type_url} was not subscribed to"
            return req
        kind.stats["update_attempt"].value += 1
        try:
            protos = [msg for _, msg in _decode(resp, kind.type_url, kind.message_cls)]
            check_resources(kind.manager, protos)
            apply_resources(kind.manager, protos, resp.version_info)
        except ConfigError as e:
            kind.stats["update_rejected"].value += 1
            log.warning(
                "%s update %r rejected (NACK), version %r keeps serving: %s",
                kind.stat_prefix,
                resp.version_info,
                kind.version_info,
                e,
            )
            req.version_info = kind.version_info
            req.error_detail.code = _INVALID_ARGUMENT
            req.error_detail.message = str(e)
            return req
        kind.version_info = resp.version_info
        kind.stats["update_success"].value += 1
        kind.stats["version"].value = version_hash(resp.version_info)
        log.info("%s: version %r applied from the control plane", kind.stat_prefix, resp.version_info)
        req.version_info = resp.version_info
        return req

    def _handle_named(self, kind: NamedKind, resp: Any, discovery_pb2: Any) -> Any:
        st = self._stats
        pre = kind.stat_prefix
        st.counter(f"{pre}.update_attempt").value += 1
        req = discovery_pb2.DiscoveryRequest(type_url=kind.type_url, response_nonce=resp.nonce)
        work: list[tuple[Any, Any]] = []
        try:
            for rpath, msg in _decode(resp, kind.type_url, kind.message_cls):
                for r in kind.targets.get(getattr(msg, kind.name_field), []):
                    t = r()
                    if t is not None:
                        t.check(msg, rpath)  # every target checks before any applies
                        work.append((t, msg))
        except ConfigError as e:
            st.counter(f"{pre}.update_rejected").value += 1
            log.warning("%s update %r rejected (NACK): %s", pre, resp.version_info, e)
            req.version_info = kind.version_info
            req.resource_names.extend(kind.names())
            req.error_detail.code = _INVALID_ARGUMENT
            req.error_detail.message = str(e)
            kind.nonce = resp.nonce
            return req
        for t, msg in work:
            t.apply(msg, resp.version_info)
        kind.version_info = resp.version_info
        kind.nonce = resp.nonce
        st.counter(f"{pre}.update_success").value += 1
        st.gauge(f"{pre}.version").value = version_hash(resp.version_info)
        req.version_info = resp.version_info
        req.resource_names.extend(kind.names())
        return req


def _decode(resp: Any, type_url: str, message_cls: Any) -> list[tuple[str, Any]]:
    """A response's resources as messages, with their ``resources[i]`` paths; ``ConfigError``
    for one of another type or one that does not decode."""
    out = []
    for i, any_msg in enumerate(resp.resources):
        rpath = f"resources[{i}]"
        if any_msg.type_url != type_url:
            raise ConfigError(rpath, f"expected {type_url}, got {any_msg.type_url}")
        msg = message_cls()
        try:
            msg.ParseFromString(any_msg.value)
        except Exception as e:
            raise ConfigError(rpath, f"cannot decode: {e}") from None
        out.append((rpath, msg))
    return out


def _named_prefix(type_url: str) -> str:
    return (
        "rds"
        if type_url.endswith("RouteConfiguration")
        else "eds"
        if type_url.endswith("ClusterLoadAssignment")
        else "xds"
    )


def grpc_eof() -> Any:
    import grpc

    return grpc.aio.EOF


def grpc_target(grpc_service: Any, clusters: Any, path: str) -> str:
    """The gRPC target of an ``ads_config.grpc_services[0]``: ``google_grpc.target_uri``, or the
    first endpoint of the static cluster ``envoy_grpc.cluster_name`` names (an IP and port, or
    a Unix socket as Istio's ``unix:./etc/istio/proxy/XDS``)."""
    which = grpc_service.WhichOneof("target_specifier")
    if which == "google_grpc":
        return str(grpc_service.google_grpc.target_uri)
    if which != "envoy_grpc":
        raise ConfigError(path, "a grpc_service (envoy_grpc or google_grpc) is required")
    name = grpc_service.envoy_grpc.cluster_name
    for c in clusters:
        if c.name != name:
            continue
        for lle in c.load_assignment.endpoints:
            for lbe in lle.lb_endpoints:
                addr = lbe.endpoint.address
                if addr.HasField("pipe"):
                    return f"unix:{addr.pipe.path}"
                sa = addr.socket_address
                host = f"[{sa.address}]" if ":" in sa.address else sa.address
                return f"{host}:{sa.port_value}"
        raise ConfigError(f"{path}.envoy_grpc.cluster_name", f"static cluster {name!r} has no endpoint")
    raise ConfigError(f"{path}.envoy_grpc.cluster_name", f"no static cluster named {name!r}")


__all__ = ["BACKOFF_BASE", "BACKOFF_MAX", "AdsClient", "AdsKind", "NamedKind", "NamedTarget", "grpc_target"]
