"""xDS over gRPC: ADS and per-type streams, state of the world and delta (incremental), from a
control plane (istiod, go-control-plane, ``moorline xds-serve``, ``moorline.testing.xds_server``).

An ``XdsClient`` owns one bidirectional stream, re-opened with jittered exponential backoff
(0.5 s doubling to 30 s) when it breaks. The stream is either the aggregated one
(``AggregatedDiscoveryService``: every type on one stream, ``dynamic_resources.ads_config``) or a
type's own service (``ListenerDiscoveryService``, ``SecretDiscoveryService``, ...: a
``ConfigSource.api_config_source``), and speaks either protocol variant:

* state of the world (``GRPC``): ``DiscoveryRequest`` / ``DiscoveryResponse``; a response holds
  every resource of its type (wildcard types) or every requested one (named types);
* delta (``DELTA_GRPC``): ``DeltaDiscoveryRequest`` / ``DeltaDiscoveryResponse``; a response holds
  the resources that changed and the names removed; a new stream tells the server the versions
  it already has (``initial_resource_versions``).

Two kinds of subscription ride a stream:

* wildcard (CDS and LDS, ``WildcardKind``): the client wants every resource; updates go to a
  ``files.ResourceManager`` (the cluster or listener manager) all or nothing: every resource
  decoded and compiled first, a bad one refuses the whole response;
* named (RDS, EDS, SDS, ``NamedKind``): resources asked for by name on behalf of ``NamedTarget``s
  (an HCM's route configuration, an EDS cluster, a TLS context's secret), held weakly: when a
  target is gone its name is dropped from the next request. The last resource received for a
  name is kept, so a target that subscribes later (a cluster or listener replaced by an update)
  gets it at once instead of waiting for a push that will not come.

Each response is ACKed (state of the world: its ``version_info`` and nonce; delta: its nonce) or
NACKed (the last good version, the nonce and ``error_detail``: INVALID_ARGUMENT and the field path);
a NACKed response changes nothing. The node goes on the stream's first request.

A named target that has not received its resource ``initial_fetch_timeout`` (the config
source's, 15 s by default, 0 for never) after it subscribed is told so (``on_fetch_timeout``):
warming listeners and clusters then go ahead without it, as in Envoy.

Stats, under Envoy's names: ``control_plane.connected_state`` (the ADS stream);
``cluster_manager.cds.*`` / ``listener_manager.lds.*`` (``update_attempt``, ``update_success``,
``update_rejected``, ``version``); named resources count on their targets
(``http.<prefix>.rds.<name>.*``, ``cluster.<name>.*``, ``sds.<name>.*``).
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
from moorline.xds.files import (
    DEFAULT_INITIAL_FETCH_TIMEOUT,
    ResourceManager,
    apply_resources,
    check_resources,
    initial_fetch_timeout,
    version_hash,
)

log = logging.getLogger("moorline.xds")

BACKOFF_BASE = 0.5
BACKOFF_MAX = 30.0
# The largest response a stream takes (gRPC's own default, 4 MiB, is less than one state-of-the-
# world CDS or EDS response of a large mesh: the stream broke on it and reconnected for good).
# A bigger one still ends the stream (it cannot be NACKed: its nonce is in the part not read).
MAX_RESPONSE_BYTES = 128 * 1024 * 1024
_INVALID_ARGUMENT = 3
_INTERNAL = 13

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
# A type's own discovery service (a ConfigSource.api_config_source), by type URL.
SERVICES = {
    "type.googleapis.com/envoy.config.listener.v3.Listener": (
        "envoy.service.listener.v3.ListenerDiscoveryService",
        "Listeners",
    ),
    "type.googleapis.com/envoy.config.cluster.v3.Cluster": (
        "envoy.service.cluster.v3.ClusterDiscoveryService",
        "Clusters",
    ),
    "type.googleapis.com/envoy.config.route.v3.RouteConfiguration": (
        "envoy.service.route.v3.RouteDiscoveryService",
        "Routes",
    ),
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment": (
        "envoy.service.endpoint.v3.EndpointDiscoveryService",
        "Endpoints",
    ),
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret": (
        "envoy.service.secret.v3.SecretDiscoveryService",
        "Secrets",
    ),
}


def method_path(type_url: str | None, delta: bool) -> str:
    """The gRPC method of a stream: ADS (``type_url`` None) or a type's own service."""
    if type_url is None:
        return f"/{ADS_SERVICE}/{'Delta' if delta else 'Stream'}AggregatedResources"
    service, noun = SERVICES[type_url]
    return f"/{service}/{'Delta' if delta else 'Stream'}{noun}"


class NamedTarget(Protocol):
    """Who asked for one named resource. ``check`` validates (``ConfigError`` refuses the whole
    response), ``apply`` installs; ``on_fetch_timeout`` (optional) runs when nothing arrived
    within the initial fetch timeout."""

    def check(self, proto: Any, path: str) -> None: ...

    def apply(self, proto: Any, version_info: str) -> None: ...


@dataclass
class NamedKind:
    """A type subscribed to by name (RDS, EDS, SDS). A response carries some of the named
    resources; a name it leaves out is unchanged (as for Envoy's RDS, EDS and SDS)."""

    type_url: str
    message_cls: Any
    name_field: str = "name"
    version_info: str = ""
    nonce: str = ""
    targets: dict[str, list[weakref.ref[Any]]] = field(default_factory=dict)
    # The last resource received per name, with its version (delta: the resource's own).
    received: dict[str, tuple[Any, str]] = field(default_factory=dict)
    sent_names: tuple[str, ...] = ()  # the names the last request on this stream asked for

    def names(self) -> list[str]:
        live = {}
        for name, refs in self.targets.items():
            alive = [r for r in refs if r() is not None]
            if alive:
                live[name] = alive
        for gone in set(self.targets) - set(live):
            self.received.pop(gone, None)
        self.targets = live
        return sorted(live)


@dataclass
class WildcardKind:
    """A type subscribed to as a whole (CDS, LDS), applied to a resource manager."""

    type_url: str
    message_cls: Any
    manager: ResourceManager
    stat_prefix: str
    version_info: str = ""
    nonce: str = ""
    stats: dict[str, Any] = field(default_factory=dict)
    # Delta: the resources the client holds (name -> (proto, version)); the update applied is
    # this map with the response's changes, so the manager still sees a whole state.
    known: dict[str, tuple[Any, str]] = field(default_factory=dict)


AdsKind = WildcardKind  # (the name the server and tests used first)


class XdsClient:
    """One xDS stream (see the module docstring). ``service_type`` None: ADS; else the type URL
    whose own service the stream calls."""

    def __init__(
        self,
        target: str,
        node: Any,
        kinds: list[WildcardKind],
        stats: Store,
        delta: bool = False,
        service_type: str | None = None,
        connected_gauge: bool = True,
    ) -> None:
        self.target = target  # a gRPC target: "host:port" or "unix:/path"
        self.node = node
        self.delta = delta
        self.method = method_path(service_type, delta)
        self.kinds: dict[str, WildcardKind] = {}
        self.order: list[str] = []
        self._stats = stats
        for k in kinds:
            self.add_wildcard(k)
        # Only the ADS stream is "the control plane"; other streams do not touch the gauge.
        self.connected = stats.gauge("control_plane.connected_state") if connected_gauge else None
        self.is_connected = False
        self.named: dict[str, NamedKind] = {}
        self._out: asyncio.Queue[Any] | None = None  # the live stream's writes
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timers: list[tuple[float, weakref.ref[Any], str, str]] = []  # before start()
        self._rng = random.Random()
        self.streams = 0  # streams opened (for tests and logs)
        self.on_wildcard_applied: list[Any] = []  # callbacks(type_url) after a wildcard update
        self._dirty: set[str] = set()  # named types whose subscription changed this loop turn

    # -- subscriptions -----------------------------------------------------------------------
    def add_wildcard(self, kind: WildcardKind) -> None:
        """Subscribe to every resource of ``kind.type_url`` (before the stream starts)."""
        stats = self._stats
        for n in ("update_attempt", "update_success", "update_rejected"):
            kind.stats[n] = stats.counter(f"{kind.stat_prefix}.{n}")
        kind.stats["version"] = stats.gauge(f"{kind.stat_prefix}.version")
        self.kinds[kind.type_url] = kind
        self.order.append(kind.type_url)

    def subscribe(
        self,
        type_url: str,
        message_cls: Any,
        name: str,
        target: NamedTarget,
        initial_fetch_timeout: float = DEFAULT_INITIAL_FETCH_TIMEOUT,
    ) -> None:
        """Ask for the resource ``name`` of ``type_url`` on behalf of ``target`` (held weakly).
        A resource already received for ``name`` is handed to ``target`` at once; otherwise the
        request goes out now on a live stream, else with the next stream's first ones."""
        kind = self.named.get(type_url)
        if kind is None:
            name_field = "cluster_name" if type_url.endswith("ClusterLoadAssignment") else "name"
            kind = self.named[type_url] = NamedKind(type_url, message_cls, name_field)
        refs = kind.targets.get(name)
        is_new = not refs or all(r() is None for r in refs)
        kind.targets.setdefault(name, []).append(weakref.ref(target))
        have = kind.received.get(name)
        if have is not None:
            try:
                target.check(have[0], name)
                target.apply(have[0], have[1])
            except ConfigError as e:  # (valid for the targets it reached first; not for this one)
                log.warning("%s %r: the resource received earlier does not apply here: %s", type_url, name, e)
            return
        if initial_fetch_timeout > 0 and hasattr(target, "on_fetch_timeout"):
            self._arm_timer(initial_fetch_timeout, target, type_url, name)
        if is_new and self._out is not None:
            # One request for every name added in this turn of the loop (a CDS update with
            # a thousand EDS clusters asks once, not a thousand times).
            if not self._dirty:
                asyncio.get_running_loop().call_soon(self._flush_subscriptions)
            self._dirty.add(type_url)

    def _flush_subscriptions(self) -> None:
        dirty, self._dirty = self._dirty, set()
        if self._out is None:
            return  # (the next stream's first requests carry them)
        for type_url in sorted(dirty):
            kind = self.named.get(type_url)
            if kind is not None:
                self._send_subscription(kind)

    def _arm_timer(self, timeout: float, target: Any, type_url: str, name: str) -> None:
        ref = weakref.ref(target)
        if self._loop is None:
            self._timers.append((timeout, ref, type_url, name))
        else:
            self._loop.call_later(timeout, self._fetch_timeout, ref, type_url, name)

    def _fetch_timeout(self, ref: weakref.ref[Any], type_url: str, name: str) -> None:
        target = ref()
        kind = self.named.get(type_url)
        if target is None or kind is None or name in kind.received:
            return
        log.warning(
            "%s %r: nothing received within the initial fetch timeout", type_url.rsplit(".", 1)[-1], name
        )
        try:
            target.on_fetch_timeout()
        except Exception:
            log.exception("initial fetch timeout of %r", name)

    # -- requests ----------------------------------------------------------------------------
    def _discovery(self) -> Any:
        from envoy.service.discovery.v3 import discovery_pb2

        return discovery_pb2

    def _send_subscription(self, kind: NamedKind) -> None:
        assert self._out is not None
        names = kind.names()
        pb = self._discovery()
        if self.delta:
            old = set(kind.sent_names)
            req = pb.DeltaDiscoveryRequest(
                type_url=kind.type_url,
                resource_names_subscribe=sorted(set(names) - old),
                resource_names_unsubscribe=sorted(old - set(names)),
            )
        else:
            req = pb.DiscoveryRequest(
                type_url=kind.type_url,
                resource_names=names,
                version_info=kind.version_info,
                response_nonce=kind.nonce,
            )
        kind.sent_names = tuple(names)
        self._out.put_nowait(req)

    def _first_requests(self) -> list[Any]:
        """The requests that open a stream: wildcard types first (CDS before LDS), then the named
        ones; the node rides on the first."""
        pb = self._discovery()
        reqs: list[Any] = []
        for url in self.order:
            kind = self.kinds[url]
            kind.nonce = ""  # (a nonce belongs to its stream)
            if self.delta:
                reqs.append(
                    pb.DeltaDiscoveryRequest(
                        type_url=url,
                        initial_resource_versions={n: v for n, (_p, v) in kind.known.items()},
                    )
                )
            else:
                reqs.append(pb.DiscoveryRequest(type_url=url, version_info=kind.version_info))
        for nk in self.named.values():
            names = nk.names()
            nk.nonce = ""
            if not names:
                continue
            if self.delta:
                reqs.append(
                    pb.DeltaDiscoveryRequest(
                        type_url=nk.type_url,
                        resource_names_subscribe=names,
                        initial_resource_versions={
                            n: v for n, (_p, v) in nk.received.items() if n in nk.targets
                        },
                    )
                )
            else:
                reqs.append(
                    pb.DiscoveryRequest(
                        type_url=nk.type_url, resource_names=names, version_info=nk.version_info
                    )
                )
            nk.sent_names = tuple(names)
        if reqs and self.node is not None:
            reqs[0].node.CopyFrom(self.node)
        return reqs

    # -- the stream --------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        for timeout, ref, type_url, name in self._timers:
            loop.call_later(timeout, self._fetch_timeout, ref, type_url, name)
        self._timers.clear()
        if self._task is None:
            self._task = loop.create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._set_connected(False)

    def _set_connected(self, up: bool) -> None:
        self.is_connected = up
        if self.connected is not None:
            self.connected.value = int(up)

    async def _run(self) -> None:
        import grpc

        delay = BACKOFF_BASE
        while True:
            try:
                options = [("grpc.max_receive_message_length", MAX_RESPONSE_BYTES)]
                async with grpc.aio.insecure_channel(self.target, options=options) as channel:
                    await self._stream(channel)
                delay = BACKOFF_BASE
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the stream broke (or never came up): retry after a while
                details = e.details() if hasattr(e, "details") else str(e)
                log.warning("xDS stream %s to %s ended: %s", self.method, self.target, details)
            self._set_connected(False)
            await asyncio.sleep(delay * (0.5 + self._rng.random()))
            delay = min(delay * 2, BACKOFF_MAX)

    async def _stream(self, channel: Any) -> None:
        import grpc

        pb = self._discovery()
        req_cls = pb.DeltaDiscoveryRequest if self.delta else pb.DiscoveryRequest
        resp_cls = pb.DeltaDiscoveryResponse if self.delta else pb.DiscoveryResponse
        call = channel.stream_stream(
            self.method,
            request_serializer=req_cls.SerializeToString,
            response_deserializer=resp_cls.FromString,
        )()
        self.streams += 1
        out: asyncio.Queue[Any] = asyncio.Queue()
        for req in self._first_requests():
            out.put_nowait(req)

        async def writer() -> None:
            while True:
                await call.write(await out.get())

        self._out = out
        wtask = asyncio.ensure_future(writer())
        try:
            self._set_connected(True)
            received = False
            while True:
                resp = await call.read()
                if resp is grpc.aio.EOF:
                    raise ConnectionError("the control plane closed the stream")
                if not received:
                    received = True
                if wtask.done():
                    wtask.result()  # a failed write ends the stream
                try:
                    reply = self.handle(resp)
                except Exception as e:  # a bug of ours: NACK it, log it, keep the stream
                    log.exception("xDS response for %s could not be handled", resp.type_url)
                    reply = self._failed(resp, e)
                out.put_nowait(reply)
        finally:
            self._out = None
            wtask.cancel()

    def _failed(self, resp: Any, e: Exception) -> Any:
        """The NACK (INTERNAL) of a response whose handling raised. State of the world: with the
        last good version and, for a named type, the names (a request naming nothing would
        unsubscribe the stream from all of them, or make it a wildcard one)."""
        pb = self._discovery()
        if self.delta:
            reply = pb.DeltaDiscoveryRequest(type_url=resp.type_url, response_nonce=resp.nonce)
        else:
            reply = pb.DiscoveryRequest(type_url=resp.type_url, response_nonce=resp.nonce)
            named = self.named.get(resp.type_url)
            kind = named if named is not None else self.kinds.get(resp.type_url)
            if kind is not None:
                reply.version_info = kind.version_info
                kind.nonce = resp.nonce
            if named is not None:
                reply.resource_names.extend(named.names())
        reply.error_detail.code = _INTERNAL
        reply.error_detail.message = f"{type(e).__name__}: {e}"
        return reply

    # -- responses ---------------------------------------------------------------------------
    def handle(self, resp: Any, discovery_pb2: Any = None) -> Any:
        """Apply one response (state of the world or delta, as the stream speaks); the ACK or
        NACK to send back."""
        if self.delta:
            return self._handle_delta(resp)
        pb = discovery_pb2 or self._discovery()
        named = self.named.get(resp.type_url)
        if named is not None:
            return self._handle_named(named, resp, pb)
        kind = self.kinds.get(resp.type_url)
        req = pb.DiscoveryRequest(type_url=resp.type_url, response_nonce=resp.nonce)
        if kind is None:
            req.error_detail.code = _INVALID_ARGUMENT
            req.error_detail.message = f"type {resp.type_url} was not subscribed to"
            return req
        kind.stats["update_attempt"].value += 1
        try:
            protos = [msg for _, _n, _v, msg in _decode(resp.resources, kind.type_url, kind.message_cls)]
            compiled = check_resources(kind.manager, protos)
            apply_resources(kind.manager, protos, resp.version_info, compiled=compiled)
        except ConfigError as e:
            self._rejected(kind, resp.version_info, e, req)
            return req
        self._applied(kind, resp.version_info)
        req.version_info = resp.version_info
        return req

    def _rejected(self, kind: WildcardKind, version: str, e: ConfigError, req: Any) -> None:
        kind.stats["update_rejected"].value += 1
        log.warning(
            "%s update %r rejected (NACK), version %r keeps serving: %s",
            kind.stat_prefix,
            version,
            kind.version_info,
            e,
        )
        if not self.delta:
            req.version_info = kind.version_info
        req.error_detail.code = _INVALID_ARGUMENT
        req.error_detail.message = str(e)

    def _applied(self, kind: WildcardKind, version: str) -> None:
        kind.version_info = version
        kind.stats["update_success"].value += 1
        kind.stats["version"].value = version_hash(version)
        log.info("%s: version %r applied from the control plane", kind.stat_prefix, version)
        for cb in list(self.on_wildcard_applied):
            cb(kind.type_url)

    def _handle_named(self, kind: NamedKind, resp: Any, pb: Any) -> Any:
        req = pb.DiscoveryRequest(type_url=kind.type_url, response_nonce=resp.nonce)
        try:
            decoded = _decode(resp.resources, kind.type_url, kind.message_cls, kind.name_field)
            work = self._check_named(kind, decoded)
        except ConfigError as e:
            log.warning("%s update %r rejected (NACK): %s", kind.type_url, resp.version_info, e)
            req.version_info = kind.version_info
            req.resource_names.extend(kind.names())
            req.error_detail.code = _INVALID_ARGUMENT
            req.error_detail.message = str(e)
            kind.nonce = resp.nonce
            return req
        for _p, name, _v, msg in decoded:
            if name in kind.targets:
                kind.received[name] = (msg, resp.version_info)
        for t, msg, _v in work:
            t.apply(msg, resp.version_info)
        kind.version_info = resp.version_info
        kind.nonce = resp.nonce
        req.version_info = resp.version_info
        req.resource_names.extend(kind.names())
        return req

    def _check_named(
        self, kind: NamedKind, decoded: list[tuple[str, str, str, Any]]
    ) -> list[tuple[Any, Any, str]]:
        """Every target checks before any applies; the (target, resource, resource version)
        triples to apply."""
        work: list[tuple[Any, Any, str]] = []
        for rpath, name, version, msg in decoded:
            for r in kind.targets.get(name, []):
                t = r()
                if t is not None:
                    t.check(msg, rpath)
                    work.append((t, msg, version))
        return work

    def _handle_delta(self, resp: Any) -> Any:
        pb = self._discovery()
        req = pb.DeltaDiscoveryRequest(type_url=resp.type_url, response_nonce=resp.nonce)
        named = self.named.get(resp.type_url)
        kind = self.kinds.get(resp.type_url)
        if named is None and kind is None:
            req.error_detail.code = _INVALID_ARGUMENT
            req.error_detail.message = f"type {resp.type_url} was not subscribed to"
            return req
        version = resp.system_version_info
        if named is not None:
            try:
                decoded = _decode(resp.resources, named.type_url, named.message_cls, named.name_field)
                work = self._check_named(named, decoded)
            except ConfigError as e:
                log.warning("%s delta update rejected (NACK): %s", named.type_url, e)
                req.error_detail.code = _INVALID_ARGUMENT
                req.error_detail.message = str(e)
                return req
            for _p, name, v, msg in decoded:
                if name in named.targets:
                    named.received[name] = (msg, v)
            for t, msg, v in work:
                t.apply(msg, version or v)
            for name in resp.removed_resources:
                # A named resource withdrawn: its users keep what they have (Envoy's RDS and EDS
                # do not empty themselves either); a later push replaces it.
                named.received.pop(name, None)
                log.info(
                    "%s %r removed by the control plane; the last one received stays in use",
                    named.type_url,
                    name,
                )
            named.version_info = version
            # A delta ACK carries no names: the names of targets that are gone leave here (the
            # state of the world drops them from its ACK's names), or the server would push them
            # for good.
            live = set(named.names())
            gone = [n for n in named.sent_names if n not in live]
            if gone:
                req.resource_names_unsubscribe.extend(gone)
                named.sent_names = tuple(n for n in named.sent_names if n in live)
            return req
        assert kind is not None
        kind.stats["update_attempt"].value += 1
        try:
            decoded = _decode(resp.resources, kind.type_url, kind.message_cls)
            state = dict(kind.known)
            for _p, name, v, msg in decoded:
                state[name] = (msg, v)
            for name in resp.removed_resources:
                state.pop(name, None)
            # Only what changed is compiled here; the rest was compiled when it arrived.
            changed = [msg for _p, _n, _v, msg in decoded]
            compiled = check_resources(kind.manager, changed)
            protos = [p for p, _v in state.values()]
            apply_resources(kind.manager, protos, version, compiled=compiled)
        except ConfigError as e:
            self._rejected(kind, version, e, req)
            return req
        kind.known = state
        self._applied(kind, version)
        return req


def _decode(
    resources: Any, type_url: str, message_cls: Any, name_field: str = "name"
) -> list[tuple[str, str, str, Any]]:
    """A response's resources as ``(path, name, version, message)``: state of the world gives
    ``Any``s, delta gives ``Resource``s (name, version, the ``Any``). ``ConfigError`` for one of
    another type, one that does not decode, or (delta) a name that does not match."""
    out = []
    for i, item in enumerate(resources):
        rpath = f"resources[{i}]"
        version = ""
        wrapper_name = None
        if item.DESCRIPTOR.full_name == "envoy.service.discovery.v3.Resource":
            version = item.version
            wrapper_name = item.name
            any_msg = item.resource
            rpath_any = f"{rpath}.resource"
        else:
            any_msg = item
            rpath_any = rpath
        if any_msg.type_url != type_url:
            raise ConfigError(rpath_any, f"expected {type_url}, got {any_msg.type_url}")
        msg = message_cls()
        try:
            msg.ParseFromString(any_msg.value)
        except Exception as e:
            raise ConfigError(rpath_any, f"cannot decode: {e}") from None
        name = getattr(msg, name_field)
        if wrapper_name and name and wrapper_name != name:
            raise ConfigError(f"{rpath}.name", f"{wrapper_name!r} names a resource called {name!r}")
        out.append((rpath_any, name or wrapper_name or "", version, msg))
    return out


def grpc_target(grpc_service: Any, clusters: Any, path: str) -> str:
    """The gRPC target of a ``GrpcService``: ``google_grpc.target_uri``, or the first endpoint of
    the static cluster ``envoy_grpc.cluster_name`` names (an IP and port, or a Unix socket as
    Istio's ``unix:./etc/istio/proxy/XDS``)."""
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


class XdsClients:
    """A server's gRPC xDS streams: the ADS one (``dynamic_resources.ads_config``) and one per
    ``api_config_source`` target, type and protocol variant, made on first use and started with
    the server (or at once when it already runs)."""

    def __init__(self, node: Any, stats: Store, static_clusters: Any) -> None:
        self.node = node
        self.stats = stats
        self.static_clusters = static_clusters  # the bootstrap's static cluster protos
        self.ads: XdsClient | None = None
        self.others: dict[tuple[str, bool, str], XdsClient] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def all(self) -> list[XdsClient]:
        return ([self.ads] if self.ads is not None else []) + list(self.others.values())

    def for_source(self, source: Any, type_url: str, path: str) -> XdsClient | None:
        """The stream serving ``type_url`` from ``source`` (a ``ConfigSource``): the ADS stream for
        ``ads``, a type stream for a ``GRPC`` / ``DELTA_GRPC`` ``api_config_source``; None when the
        source is not a gRPC one. ``ConfigError`` for one that cannot work."""
        which = source.WhichOneof("config_source_specifier")
        if which == "ads":
            if self.ads is None:
                raise ConfigError(path, "ads is named, but dynamic_resources.ads_config is not set")
            return self.ads
        if which != "api_config_source":
            return None
        api = source.api_config_source
        if api.api_type not in (api.GRPC, api.DELTA_GRPC):
            raise ConfigError(
                f"{path}.api_config_source.api_type",
                "only GRPC and DELTA_GRPC are supported (REST polling is not)",
            )
        if not api.grpc_services:
            raise ConfigError(f"{path}.api_config_source.grpc_services", "a gRPC service is required")
        target = grpc_target(
            api.grpc_services[0], self.static_clusters, f"{path}.api_config_source.grpc_services[0]"
        )
        delta = api.api_type == api.DELTA_GRPC
        key = (target, delta, type_url)
        client = self.others.get(key)
        if client is None:
            client = self.others[key] = XdsClient(
                target, self.node, [], self.stats, delta=delta, service_type=type_url, connected_gauge=False
            )
            if self._loop is not None:
                client.start(self._loop)
        return client

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        for c in self.all():
            c.start(loop)

    def stop(self) -> None:
        for c in self.all():
            c.stop()
        self._loop = None


AdsClient = XdsClient  # (the name the server and tests used first)

__all__ = [
    "BACKOFF_BASE",
    "BACKOFF_MAX",
    "DEFAULT_INITIAL_FETCH_TIMEOUT",
    "MAX_RESPONSE_BYTES",
    "AdsClient",
    "AdsKind",
    "NamedKind",
    "NamedTarget",
    "WildcardKind",
    "XdsClient",
    "XdsClients",
    "grpc_target",
    "initial_fetch_timeout",
    "method_path",
]
