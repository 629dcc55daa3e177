"""HTTP connection manager: ``envoy.filters.network.http_connection_manager``.

``HcmConfig`` is the compiled ``HttpConnectionManager`` proto and the
``ServerConnectionCallbacks`` of ``moorline.stream.api``; its ``runtime``
(``stream.connections.ServerConnections``) holds the live connections. Each
accepted connection gets the codec the registry names; each request on it an
``ActiveStream``, whose one state value is a ``proxy.phases.Phase``:

1. INIT -> DOWNSTREAM_FILTERS: ``decode_headers`` (validation, hop-by-hop
   removal, x-forwarded-*, x-request-id), then the decoder filters in config
   order (no ``FilterManager`` at all when the router is the only filter);
2. MATCH_ROUTE: the route of the pinned route snapshot (cached; a filter may
   clear it);
3. CHOOSE_HOST, UPSTREAM_REQUEST: the router picks cluster and host, takes a
   pooled upstream connection and sends the request;
4. UPSTREAM_RESPONSE: the response (upstream or local) through the encoder
   filters in reverse order to the codec;
5. END: stats, access log; the connection moves on to the next request.

Local replies (no route, no healthy upstream, timeouts, protocol errors) go
through ``send_local_reply``, which applies ``local_reply_config``.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from moorline.config import registry
from moorline.config.context import BuildContext
from moorline.config.errors import ConfigError
from moorline.config.util import opt_bool, opt_duration_s, opt_uint
from moorline.net.tls import serve_accepted
from moorline.observability import stream_info as flags
from moorline.observability.stats import Counter, Gauge, Histogram
from moorline.observability.stream_info import StreamInfo
from moorline.protocol.grpc import grpc_status_for_http, percent_encode
from moorline.protocol.headers import HeaderMap, RequestHeaders, ResponseHeaders
from moorline.protocol.http1 import Limits
from moorline.proxy.filter_manager import FilterManager
from moorline.proxy.local_reply import LocalReplyConfig
from moorline.proxy.phases import Phase
from moorline.proxy.route_provider import RouteConfigProvider
from moorline.proxy.route_table import DIRECT_RESPONSE, REDIRECT, ROUTE, RouteTable
from moorline.proxy.router import Router
from moorline.stream import builtin_codecs
from moorline.stream.api import HttpProtocol, ResetReason
from moorline.stream.connections import ServerConnections

_HTTP10 = HttpProtocol.HTTP10
_HTTP2 = HttpProtocol.HTTP2

HCM_TYPE = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER_NAMES = ("envoy.filters.http.router", "envoy.router")
ROUTER_TYPE = "envoy.extensions.filters.http.router.v3.Router"

# Request headers that never travel to the upstream (hop-by-hop, RFC 9110 7.6.1).
_REQ_HOP = frozenset(
    (
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
        b"te",
        b"host",
        b"http2-settings",
    )
)

# Headers the single pass in decode_headers looks at.
_REQ_SPECIAL = _REQ_HOP | frozenset(
    (
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-request-id",
        b"content-type",
        b"expect",
        b"x-forwarded-client-cert",
    )
)


def _request_ids() -> list[bytes]:
    """256 random (version 4) UUIDs as bytes, from one ``os.urandom`` call instead of one
    ``uuid.uuid4()`` object per request."""
    raw = os.urandom(16 * 256).hex().encode()
    out = []
    for i in range(0, len(raw), 32):
        x = raw[i : i + 32]
        out.append(b"%s-%s-4%s-%c%s-%s" % (x[:8], x[8:12], x[13:16], b"89ab"[x[16] % 4], x[17:20], x[20:32]))
    return out


class HcmStats:
    """``http.<stat_prefix>.*`` stats, looked up once per listener."""

    downstream_cx_total: Counter
    downstream_cx_http1_total: Counter
    downstream_cx_destroy: Counter
    downstream_cx_idle_timeout: Counter
    downstream_cx_protocol_error: Counter
    downstream_cx_rx_bytes_total: Counter
    downstream_cx_tx_bytes_total: Counter
    downstream_cx_max_duration_reached: Counter
    downstream_cx_upgrades_total: Counter
    downstream_rq_total: Counter
    downstream_rq_http1_total: Counter
    downstream_rq_1xx: Counter
    downstream_rq_2xx: Counter
    downstream_rq_3xx: Counter
    downstream_rq_4xx: Counter
    downstream_rq_5xx: Counter
    downstream_rq_completed: Counter
    downstream_rq_timeout: Counter
    downstream_rq_header_timeout: Counter
    downstream_rq_idle_timeout: Counter
    downstream_rq_overload_close: Counter
    downstream_cx_overload_disable_keepalive: Counter
    downstream_rq_too_large: Counter
    downstream_rq_rx_reset: Counter
    downstream_rq_tx_reset: Counter
    downstream_rq_non_relative_path: Counter
    downstream_rq_ws_on_non_ws_route: Counter
    no_route: Counter
    no_cluster: Counter
    rq_direct_response: Counter
    rq_redirect: Counter
    rq_total: Counter
    rq_reset_after_downstream_response_started: Counter
    downstream_cx_active: Gauge
    downstream_rq_active: Gauge
    downstream_cx_upgrades_active: Gauge
    downstream_rq_time: Histogram
    downstream_cx_length_ms: Histogram
    rq_class: tuple[Counter, ...]

    COUNTERS = (
        "downstream_cx_total",
        "downstream_cx_http1_total",
        "downstream_cx_destroy",
        "downstream_cx_idle_timeout",
        "downstream_cx_protocol_error",
        "downstream_cx_rx_bytes_total",
        "downstream_cx_tx_bytes_total",
        "downstream_cx_max_duration_reached",
        "downstream_cx_upgrades_total",
        "downstream_rq_total",
        "downstream_rq_http1_total",
        "downstream_rq_1xx",
        "downstream_rq_2xx",
        "downstream_rq_3xx",
        "downstream_rq_4xx",
        "downstream_rq_5xx",
        "downstream_rq_completed",
        "downstream_rq_timeout",
        "downstream_rq_header_timeout",
        "downstream_rq_idle_timeout",
        "downstream_rq_overload_close",
        "downstream_cx_overload_disable_keepalive",
        "downstream_rq_too_large",
        "downstream_rq_rx_reset",
        "downstream_rq_tx_reset",
        "downstream_rq_non_relative_path",
        "downstream_rq_ws_on_non_ws_route",
        "no_route",
        "no_cluster",
        "rq_direct_response",
        "rq_redirect",
        "rq_total",
        "rq_reset_after_downstream_response_started",
    )
    GAUGES = ("downstream_cx_active", "downstream_rq_active", "downstream_cx_upgrades_active")
    HISTOGRAMS = ("downstream_rq_time", "downstream_cx_length_ms")
    __slots__ = COUNTERS + GAUGES + HISTOGRAMS + ("rq_class",)

    def __init__(self, scope: Any) -> None:
        for n in self.COUNTERS:
            setattr(self, n, scope.counter(n))
        for n in self.GAUGES:
            setattr(self, n, scope.gauge(n))
        for n in self.HISTOGRAMS:
            setattr(self, n, scope.histogram(n))
        self.rq_class = (
            self.downstream_rq_1xx,
            self.downstream_rq_1xx,
            self.downstream_rq_2xx,
            self.downstream_rq_3xx,
            self.downstream_rq_4xx,
            self.downstream_rq_5xx,
        )


class _RdsAdsTarget:
    """An HCM's route configuration over gRPC xDS (``xds.ads.NamedTarget``). ``init`` is what
    its listener warms on: done by the first route configuration, or by the source's initial
    fetch timeout (the listener then serves with no routes: 404)."""

    def __init__(self, provider: RouteConfigProvider, stats: Any, prefix: str, name: str) -> None:
        from moorline.config.warming import InitTarget

        self.provider = provider
        self.success = stats.counter(f"{prefix}.update_success")
        self.rejected = stats.counter(f"{prefix}.update_rejected")
        self.version = stats.gauge(f"{prefix}.version")
        self.init = InitTarget(f"rds {name}")
        self._table: RouteTable | None = None

    def check(self, proto: Any, path: str) -> None:
        try:
            self._table = RouteTable.compile(proto, path)
        except ConfigError:
            self.rejected.value += 1
            raise

    def apply(self, proto: Any, version_info: str) -> None:
        from moorline.xds.files import version_hash

        table = self._table if self._table is not None else RouteTable.compile(proto, "")
        self._table = None
        self.provider.update(table, proto, version_info)
        self.success.value += 1
        self.version.value = version_hash(version_info)
        self.init.done()

    def on_fetch_timeout(self) -> None:
        self.init.timed_out = True
        self.init.done()


class _RdsTarget:
    """The one route configuration an HCM asked RDS for, as an ``xds.files.ResourceManager``:
    other route configurations in the file are validated and not used."""

    def __init__(self, name: str, ctx: Any) -> None:
        self.name = name
        self.ctx = ctx
        self.provider: RouteConfigProvider | None = None

    def compile(self, proto: Any, path: str = "") -> Any:
        return RouteTable.compile(proto, path)

    def add_or_update(self, proto: Any, path: str = "", version_info: str = "") -> Any:
        if proto.name != self.name:
            return None
        table = RouteTable.compile(proto, path)
        if self.provider is None:
            for n in table.notices:
                self.ctx.notice(n)
            self.provider = RouteConfigProvider(table, proto, version_info, static=False)
        else:
            self.provider.update(table, proto, version_info)
        return self.provider

    def remove(self, name: str) -> bool:
        return False

    def __iter__(self) -> Any:
        return iter(())


class HcmConfig:
    """Compiled ``HttpConnectionManager``.

    Routes come from ``route_provider`` (``moorline.proxy.route_provider.RouteConfigProvider``):
    a stream reads ``route_provider.current`` once when its headers arrive. ``route_table`` is
    the provider's current table, for callers that do not pin a snapshot."""

    def __init__(self, proto: Any, ctx: BuildContext, path: str) -> None:
        from moorline.observability.access_log import compile_access_logs

        self.ctx = ctx
        # What the listener warms on (config.warming.InitTarget): the first RDS response.
        self.init_targets: list[Any] = []
        self.stat_prefix = proto.stat_prefix
        if not self.stat_prefix:
            raise ConfigError(f"{path}.stat_prefix", "stat_prefix is required")
        self.stats = HcmStats(ctx.stats.scope(f"http.{self.stat_prefix}."))
        codec = proto.codec_type
        # AUTO=0, HTTP1=1, HTTP2=2, HTTP3=3
        if codec == 3:
            raise ConfigError(f"{path}.codec_type", "HTTP/3 downstream codecs are not supported yet")
        # -- HTTP/2 (moorline.stream.http2_server): codec choice and http2_protocol_options --
        from moorline.protocol.http2 import Http2Options

        self.codec_type = codec
        h2o, h2err = Http2Options.from_proto(
            proto.http2_protocol_options if proto.HasField("http2_protocol_options") else None,
            f"{path}.http2_protocol_options",
            max_header_list_size=(opt_uint(proto, "max_request_headers_kb", 60) or 60) * 1024,
            hcm_stream_error=(
                proto.stream_error_on_invalid_http_message.value
                if proto.HasField("stream_error_on_invalid_http_message")
                else None
            ),
        )
        if h2err is not None:
            raise ConfigError(*h2err)
        self.http2_options = h2o
        # -- end HTTP/2 --
        kind = proto.WhichOneof("route_specifier")
        if kind == "route_config":
            table = RouteTable.compile(proto.route_config, f"{path}.route_config")
            for n in table.notices:
                ctx.notice(n)
            self.route_provider = RouteConfigProvider(table, proto.route_config)
        elif kind == "rds":
            self.route_provider = self._rds_from_file(proto.rds, f"{path}.rds")
        elif kind is None:
            raise ConfigError(path, "one of route_config or rds is required")
        else:
            raise ConfigError(f"{path}.{kind}", f"{kind} is not supported")

        # filters: router must be last. A factory may return None (nothing to do for any
        # stream: left out of the chain) or an object with ``wanted(table) -> bool`` (needed only
        # while some route asks for it, e.g. through typed_per_filter_config): such a filter is
        # in the chain only for route tables that want it, recomputed when the routes change, so
        # a configured-but-idle filter costs nothing per request.
        self.filter_factories: list[Any] = []
        self._all_filter_factories: list[Any] = []
        fl = list(proto.http_filters)
        saved = ctx.http_stat_prefix, ctx.http_chain_state
        ctx.http_stat_prefix, ctx.http_chain_state = f"http.{self.stat_prefix}.", {}
        try:
            self._compile_filters(fl, ctx, path)
        finally:
            ctx.http_stat_prefix, ctx.http_chain_state = saved
        self._conditional_filters = any(hasattr(f, "wanted") for f in self._all_filter_factories)
        self._select_filters()
        if self._conditional_filters:
            self.route_provider.subscribe(self._select_filters)

        # limits
        cho = proto.common_http_protocol_options
        lim = Limits()
        kb = opt_uint(proto, "max_request_headers_kb", 60)
        assert kb is not None
        if kb == 0 or kb > 8192:
            raise ConfigError(f"{path}.max_request_headers_kb", "must be between 1 and 8192")
        lim.max_header_bytes = kb * 1024
        if proto.HasField("common_http_protocol_options"):
            mh = opt_uint(cho, "max_headers_count", 100)
            lim.max_headers = mh or 100
            lim.headers_with_underscores = int(cho.headers_with_underscores_action)
        self.limits = lim
        self.idle_timeout = (
            opt_duration_s(cho, "idle_timeout", 3600.0)
            if proto.HasField("common_http_protocol_options")
            else 3600.0
        )
        self.max_connection_duration = (
            opt_duration_s(cho, "max_connection_duration", None)
            if proto.HasField("common_http_protocol_options")
            else None
        )
        self.max_stream_duration = (
            opt_duration_s(cho, "max_stream_duration", None)
            if proto.HasField("common_http_protocol_options")
            else None
        )
        self.stream_idle_timeout = opt_duration_s(proto, "stream_idle_timeout", 300.0)
        self.request_timeout = opt_duration_s(proto, "request_timeout", None)
        self.request_headers_timeout = opt_duration_s(proto, "request_headers_timeout", None)
        self.delayed_close_timeout = opt_duration_s(proto, "delayed_close_timeout", 1.0)
        self.timer_period = 0.0
        self.lazy_timeout_min = float("inf")
        # The runtime half: this config's live connections, its drain flag and their one sweep
        # timer (a listener update compiles a new HcmConfig, so connections accepted under the
        # old one stay with the old runtime).
        self.runtime = ServerConnections()
        self._set_timer_period()
        # A new route snapshot may bring shorter (or only longer) timeouts.
        self.route_provider.subscribe(self._set_timer_period)

        # headers
        self.server_name = (proto.server_name or "moorline").encode()
        self.server_header_transformation = int(proto.server_header_transformation)  # 0 OVERWRITE
        self.use_remote_address = opt_bool(proto, "use_remote_address", False)
        self.skip_xff_append = proto.skip_xff_append
        self.xff_num_trusted_hops = proto.xff_num_trusted_hops
        self.generate_request_id = opt_bool(proto, "generate_request_id", True)
        self.preserve_external_request_id = proto.preserve_external_request_id
        self.accept_http_10 = (
            proto.http_protocol_options.accept_http_10 if proto.HasField("http_protocol_options") else False
        )
        self.default_host_for_http_10 = (
            proto.http_protocol_options.default_host_for_http_10.encode()
            if proto.HasField("http_protocol_options")
            else b""
        )
        self.upgrade_types = frozenset(
            u.upgrade_type.lower().encode()
            for u in proto.upgrade_configs
            if not u.HasField("enabled") or u.enabled.value
        )
        # forward_client_cert_details SANITIZE (0, Envoy's default): a client must not be able
        # to claim a certificate through x-forwarded-client-cert.
        # SANITIZE_SET (3) strips it too: setting this connection's certificate details is not
        # implemented (announced), and forwarding the client's value would let it be spoofed.
        self.strip_xfcc = int(proto.forward_client_cert_details) in (0, 3)
        self.local_reply = (
            LocalReplyConfig.compile(proto.local_reply_config, f"{path}.local_reply_config")
            if (proto.HasField("local_reply_config"))
            else LocalReplyConfig.empty()
        )
        self.access_logs = compile_access_logs(list(proto.access_log), ctx, f"{path}.access_log")
        if proto.HasField("tracing"):
            ctx.notice(f"{path}.tracing: tracing is not supported yet; ignored")
        self.cluster_manager = ctx.cluster_manager
        # moorline.overload.OverloadState (None without an overload manager: nothing per request).
        self.overload = ctx.overload
        if self.overload is not None:
            self.overload.register_hcm(self)  # reduce_timeouts scales idle_timeout
        self._rid_pool: list[bytes] = []
        self.good_authorities: set[bytes] = {b""}  # validated authority values (check_authority)
        codecs = getattr(ctx, "codecs", None) or builtin_codecs()
        name = "http1" if codec == 1 else ("http2" if codec == 2 else "auto")
        factory = codecs.server(name)
        if factory is None:
            raise ConfigError(f"{path}.codec_type", f"no {name} codec is registered")
        self.server_factory = factory

    # -- ServerConnectionCallbacks (moorline.stream.api) ---------------------------------------
    def new_stream(self, conn: Any) -> ActiveStream:
        return ActiveStream(conn, self)

    def local_error(self, conn: Any, status: int, details: str) -> None:
        s = ActiveStream(conn, self)
        conn.stream = s
        s.headers = s.info.request_headers = RequestHeaders.make(b"", b"", b"", b"http", [])
        s.info.protocol = _PROTO_LABEL[conn.protocol]
        s.request_complete = True
        s.send_local_reply(status, b"", flags.DOWNSTREAM_PROTOCOL_ERROR, details)

    def check_authority(self, authority: bytes) -> bool:
        """Whether ``authority`` holds only what an authority may (the answer for a good one is
        remembered: a keep-alive client sends the same Host on every request)."""
        if authority.translate(None, _AUTH_CHARS):
            return False
        if len(authority) > 255:  # (a DNS name's limit) not kept: 1,024 long ones would be MiBs
            return True
        good = self.good_authorities
        if len(good) >= 1024:  # bounded: a client sending a new Host each time gets no cache
            good.clear()
        good.add(authority)
        return True

    def new_request_id(self) -> bytes:
        pool = self._rid_pool
        if not pool:
            pool.extend(_request_ids())
        return pool.pop()

    def _compile_filters(self, fl: list[Any], ctx: BuildContext, path: str) -> None:
        from moorline.config.loader import unpack_any

        # No http_filters at all is a valid Envoy config; the router alone serves it.
        for i, f in enumerate(fl):
            fpath = f"{path}.http_filters[{i}]"
            type_url = f.typed_config.type_url if f.HasField("typed_config") else None
            is_router = f.name in ROUTER_NAMES or (type_url or "").endswith(ROUTER_TYPE)
            if is_router:
                if i != len(fl) - 1:
                    raise ConfigError(fpath, "the router filter must be the last HTTP filter")
                continue
            if i == len(fl) - 1:
                raise ConfigError(
                    fpath, "the last HTTP filter must be the router (envoy.filters.http.router)"
                )
            reason = registry.noop_reason(f.name, type_url)
            if reason is not None:
                ctx.notice(f"{fpath} ({f.name}): accepted as a no-op: {reason}")
                continue
            ext = registry.lookup("http", f.name, type_url)
            if ext is None:
                if f.is_optional:
                    ctx.notice(f"{fpath} ({f.name}): optional filter not supported, skipped")
                    continue
                raise ConfigError(fpath, f"unknown or unsupported HTTP filter {f.name!r}")
            cfg = unpack_any(f.typed_config, f"{fpath}.typed_config") if type_url else None
            ctx.http_filter_name = f.name
            try:
                if ext.wants_stat_prefix:
                    made = ext.factory(cfg, ctx, fpath, stat_prefix=ctx.http_stat_prefix)  # type: ignore[call-arg]
                else:
                    made = ext.factory(cfg, ctx, fpath)
            finally:
                ctx.http_filter_name = ""
            if made is not None:  # (None: a filter with nothing to do, e.g. an empty fault)
                self._all_filter_factories.append(made)

    def _rds_from_file(self, rds: Any, path: str) -> RouteConfigProvider:
        """``rds`` with a file source (``xds.files``): the named route configuration is read now
        (a bad file fails this listener, as a bad inline one does) and followed when the file
        changes; a bad update is rejected and the routes in use stay."""
        from envoy.config.route.v3.route_pb2 import RouteConfiguration

        from moorline.net.secrets import secrets_of
        from moorline.xds.files import ROUTE_TYPE, FileSubscription, config_source_path

        file = config_source_path(rds.config_source)
        if file is None:
            clients = getattr(self.ctx.server, "xds", None)
            client = (
                clients.for_source(rds.config_source, ROUTE_TYPE, f"{path}.config_source")
                if clients is not None
                else None
            )
            if client is not None:
                return self._rds_over_grpc(rds, path, client)
            raise ConfigError(
                f"{path}.config_source",
                "RDS needs a file (path_config_source), ads or a gRPC api_config_source"
                + ("" if clients is not None else " (gRPC sources are served only by a running server)"),
            )
        name = rds.route_config_name
        if not name:
            raise ConfigError(f"{path}.route_config_name", "route_config_name is required")
        target = _RdsTarget(name, self.ctx)
        sub = FileSubscription(
            file,
            ROUTE_TYPE,
            RouteConfiguration,
            target,
            self.ctx.stats,
            f"http.{self.stat_prefix}.rds.{name}",
            path,
            name,
        )
        sub.load_initial()
        assert target.provider is not None
        self.rds_subscription = sub  # lives (and is watched) as long as this HCM
        sub.watch(secrets_of(self.ctx).watcher)
        return target.provider

    def _rds_over_grpc(self, rds: Any, path: str, client: Any) -> RouteConfigProvider:
        """``rds`` over gRPC xDS (ADS or an RDS stream): the route configuration is asked for by
        name; the listener warms until it arrives (``init_targets``)."""
        from envoy.config.route.v3.route_pb2 import RouteConfiguration

        from moorline.xds.files import ROUTE_TYPE

        name = rds.route_config_name
        if not name:
            raise ConfigError(f"{path}.route_config_name", "route_config_name is required")
        provider = RouteConfigProvider(RouteTable.compile(RouteConfiguration(name=name), path), static=False)
        provider.proto = None  # nothing received yet: not in /config_dump
        from moorline.xds.files import initial_fetch_timeout

        target = _RdsAdsTarget(provider, self.ctx.stats, f"http.{self.stat_prefix}.rds.{name}", name)
        self.rds_target = target  # lives as long as this HCM (the client holds it weakly)
        self.init_targets.append(target.init)
        client.subscribe(
            ROUTE_TYPE, RouteConfiguration, name, target, initial_fetch_timeout(rds.config_source)
        )
        return provider

    @property
    def route_table(self) -> RouteTable:
        return self.route_provider.current

    def _select_filters(self) -> None:
        """The chain new streams get: every factory, but those with ``wanted(table)`` only while
        the current route table wants them. Streams already running keep their chain."""
        table = self.route_provider.current
        self.filter_factories = [
            f for f in self._all_filter_factories if not hasattr(f, "wanted") or f.wanted(table)
        ]
        # When every filter left acts only on routes that configure it (``route_gate``: the
        # name it reads in ``typed_per_filter_config``, e.g. CORS), a stream whose route has
        # none of those names takes the router's fast path, without a filter manager.
        gates = [getattr(f, "route_gate", None) for f in self.filter_factories]
        self.route_gates: frozenset[str] | None = (
            frozenset(g for g in gates if g) if gates and all(gates) else None
        )

    def _set_timer_period(self) -> None:
        periods = [
            t
            for t in (
                self.idle_timeout,
                self.stream_idle_timeout,
                self.request_timeout,
                self.request_headers_timeout,
                self.max_connection_duration,
                self.max_stream_duration,
            )
            if t
        ]
        routes = [r for vh in self.route_provider.current.virtual_hosts for r in vh.routes]
        periods.extend(r.timeout for r in routes if getattr(r, "timeout", 0))
        periods.extend(d for r in routes if (d := r.max_stream_duration))
        # One sweep per connection manager (stream.connections) checks every connection's
        # deadlines (idle, request and route timeouts); its period bounds how late a timeout
        # can fire: a tenth of the shortest configured one, between 10 ms and 1 s (1 s with no
        # timeouts: HTTP/2 drains and GOAWAYs on it too). Shorter deadlines that only appear
        # at run time (grpc-timeout) get a timer of their own.
        self.timer_period = max(0.01, min(1.0, min(periods) / 10)) if periods else 0.0
        self.lazy_timeout_min = self.timer_period * 10 if self.timer_period else float("inf")
        # Idle keep-alive connections have only the connection deadlines (stream.connections).
        idle = [t for t in (self.idle_timeout, self.max_connection_duration) if t]
        self.runtime.set_period(
            self.timer_period or 1.0, max(0.01, min(1.0, min(idle) / 10)) if idle else 1.0
        )

    # -- network filter terminal ------------------------------------------
    terminal = True

    def on_accept(self, sock: Any, info: Any) -> None:
        loop = asyncio.get_event_loop()
        make = self.server_factory
        # TLS chains (info.tls): handshake first, then the codec with info.negotiated_alpn set
        # (AUTO: ALPN "h2" or the HTTP/2 preface picks HTTP/2, see stream.http2_server).
        # The chain's connection filters (network RBAC) decide first: at once on plain TCP,
        # after the handshake with TLS (they may need the peer certificate).
        admit = info.admit if info.filters else None
        serve_accepted(loop, sock, info, lambda: make(self, info), admit)

    def drain(self, decision: Any = True) -> None:
        """Stop keep-alive. ``True`` (Envoy's ``immediate``): in-flight responses get
        ``connection: close`` (HTTP/2: GOAWAY) and idle connections close now. A
        ``stream.connections.GradualDrain``: each response or new stream closes its connection
        with the drain's growing probability; idle ones are left until the drain time cuts them."""
        current = self.runtime.draining
        if current is True or (current is not False and decision is not True):
            return  # already draining: a second gradual drain must not restart (or relax) it
        self.runtime.draining = decision
        if decision is not True:
            return
        for c in self.runtime:
            if c.stream is None and not getattr(c, "sniffing", False):
                c.close()

    def close_all(self) -> None:
        for c in self.runtime:
            c.abort()
        self.runtime.stop()

    def active_requests(self) -> int:
        return sum(1 for c in self.runtime if c.stream is not None)

    def active_connections(self) -> int:
        """Live downstream connections (a draining listener waits for them)."""
        return len(self.runtime)


def _hcm_factory(cfg: Any, ctx: BuildContext, path: str) -> HcmConfig:
    cpath = f"{path}.typed_config"
    if cfg is None:
        raise ConfigError(cpath, "typed_config is required")
    # Picked by name, the config may be any type: Envoy's v2 HCM (xds-protos still ships it),
    # a type nobody knows (OpaqueAny), or an empty Any. Only the v3 message can be compiled.
    got = getattr(getattr(cfg, "DESCRIPTOR", None), "full_name", None)
    if got != HCM_TYPE:
        if got is None:
            got = str(getattr(cfg, "type_url", "")).rsplit("/", 1)[-1] or "an empty typed_config"
        hint = " (the Envoy v2 API is not supported; use the v3 type)" if ".v2." in got else ""
        raise ConfigError(cpath, f"expected {HCM_TYPE}, got {got}{hint}")
    return HcmConfig(cfg, ctx, cpath)


registry.register(
    "network",
    ["envoy.filters.network.http_connection_manager", "envoy.http_connection_manager"],
    ["type.googleapis.com/" + HCM_TYPE],
    _hcm_factory,
)


_INIT = Phase.INIT
_DOWNSTREAM_FILTERS = Phase.DOWNSTREAM_FILTERS
_MATCH_ROUTE = Phase.MATCH_ROUTE
_RESPONSE = Phase.UPSTREAM_RESPONSE
_END = Phase.END

_PROTO_LABEL = ("HTTP/1.0", "HTTP/1.1", "HTTP/2", "HTTP/3")

# What may appear in a method (RFC 9110 token), a request path (visible ASCII) and an authority
# (RFC 3986 reg-name / IP literal / port, as nghttp2_check_authority): ``bytes.translate``
# deletes the allowed bytes, so anything left over is invalid. Codecs differ in what they
# validate (llhttp checks the request line, HTTP/2 pseudo-headers are free-form), so the
# connection manager checks every codec's requests the same way, as Envoy does.
_TCHAR = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_PATH_CHARS = bytes(range(0x21, 0x7F))
_AUTH_CHARS = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=:%@[]"


class ActiveStream:
    """One request/response exchange on a downstream connection (any codec).

    The codec calls ``decode_headers`` / ``decode_data`` / ``decode_trailers``; responses leave
    through ``encode_*``, which run the encoder filters and end in the codec's ``encode_*``.
    Without HTTP filters there is no ``FilterManager``: events go straight to the router and
    the codec (the fast path)."""

    __slots__ = (
        "cfg",
        "conn",
        "deadline",
        "dec_aborted",
        "enc_watermark",
        "fm",
        "headers",
        "headers_only",
        "idle_mark",
        "info",
        "is_grpc",
        "last_activity",
        "method",
        "phase",
        "request_complete",
        "route",
        "route_cached",
        "router",
        "routes",
        "upgrade",
        "upstream_grpc",
    )

    def __init__(self, conn: Any, cfg: Any) -> None:
        self.conn = conn
        self.cfg = cfg
        loop_time = conn.last_activity
        info = self.info = StreamInfo(time.time(), loop_time)
        ci = info.downstream = conn.info
        info.connection_id = ci.connection_id
        self.phase = _INIT
        self.method = b""
        self.headers: Any = None
        self.routes: Any = None  # the route table snapshot, pinned when the headers arrive
        self.route: Any = None
        self.route_cached = False
        self.router: Any = None
        self.fm: FilterManager | None = None
        self.enc_watermark = False  # an encoder filter holds the upstream paused
        self.request_complete = False
        self.headers_only = False
        self.deadline = 0.0
        self.last_activity = loop_time
        self.idle_mark = 0  # bytes moved at the last sweep (progress either way resets the idle timer)
        self.is_grpc = False
        self.upstream_grpc = False
        self.upgrade = False
        # A local reply ended the request side: the decoder filters see nothing more. (An
        # upstream response does not: a full-duplex request body keeps flowing.)
        self.dec_aborted = False
        st = cfg.stats
        st.downstream_rq_total.value += 1
        if conn.protocol < _HTTP2:
            st.downstream_rq_http1_total.value += 1
        st.downstream_rq_active.value += 1
        if cfg.request_timeout:
            self.deadline = loop_time + cfg.request_timeout

    @property
    def stream_info(self) -> StreamInfo:
        return self.info

    @property
    def response_started(self) -> bool:
        return self.phase >= _RESPONSE

    @property
    def done(self) -> bool:
        return self.phase == _END

    # -- phase INIT -> DOWNSTREAM_FILTERS: the request headers ------------------------------
    def decode_headers(self, headers: RequestHeaders, end_stream: bool) -> None:
        cfg = self.cfg
        info = self.info
        proto = self.conn.protocol
        info.protocol = _PROTO_LABEL[proto]
        self.headers = headers
        info.request_headers = headers
        self.routes = cfg.route_provider.current  # pinned: a route update does not move this stream
        method = self.method = headers.method
        if end_stream:
            self.request_complete = True
        ol = cfg.overload
        if ol is not None and ol.request_actions:
            if ol.stop_requests:
                cfg.stats.downstream_rq_overload_close.value += 1
                self.send_local_reply(503, b"envoy overloaded", flags.OVERLOAD_MANAGER, "overload")
                return
            if ol.close_keepalive():
                cfg.stats.downstream_cx_overload_disable_keepalive.value += 1
                self.conn.drain_after_response()
        if proto == _HTTP10 and not cfg.accept_http_10:
            self.send_local_reply(426, b"", flags.DOWNSTREAM_PROTOCOL_ERROR, "low_version")
            return
        # One pass over the headers: drop hop-by-hop ones, note the few the connection
        # manager acts on.
        authority = headers.authority
        conn_tokens: list[bytes] | None = None
        rest: list[tuple[bytes, bytes]] = []
        xff = xfp = rid = ct = upg = None
        for k, v in headers._h:
            if k in _REQ_SPECIAL:
                if k in _REQ_HOP:
                    if k == b"host":
                        if not authority:
                            authority = v
                    elif k == b"connection":
                        conn_tokens = [t.strip().lower() for t in v.split(b",")]
                    elif k == b"upgrade":
                        upg = v
                    elif k == b"te":
                        # Only "trailers" survives (gRPC needs it).
                        if b"trailers" in v.lower():
                            rest.append((b"te", b"trailers"))
                    continue
                if k == b"x-forwarded-for":
                    xff = v
                    continue  # re-added below, after the others, as Envoy appends it
                if k == b"x-forwarded-proto":
                    xfp = v
                elif k == b"x-request-id":
                    rid = v
                elif k == b"content-type":
                    ct = v
                elif k == b"expect":
                    if v.lower() == b"100-continue":
                        continue  # answered by the codec (proxy_100_continue off, Envoy's default)
                elif k == b"x-forwarded-client-cert":
                    if cfg.strip_xfcc:
                        continue
            rest.append((k, v))
        path = headers.path
        if (
            not headers.line_checked
            and (not method or method.translate(None, _TCHAR) or path.translate(None, _PATH_CHARS))
        ) or (authority not in cfg.good_authorities and not cfg.check_authority(authority)):
            self._bad_request("invalid request line or authority", end_stream)
            return
        if method == b"CONNECT":
            if not authority:
                self._bad_request("missing_host_header", end_stream)
                return
        elif not path:
            self._bad_request("missing_path", end_stream)
            return
        elif path[:1] != b"/" and not (path == b"*" and method == b"OPTIONS"):
            cfg.stats.downstream_rq_non_relative_path.value += 1
            self.send_local_reply(404, b"", flags.NO_ROUTE, "absolute_path_rejected")
            return
        if not authority and proto == _HTTP10 and cfg.default_host_for_http_10:
            authority = cfg.default_host_for_http_10
        headers.authority = authority
        # CONNECT is a tunnel too (upgrade type "CONNECT" in upgrade_configs, as in Envoy).
        upgrade = method == b"CONNECT"
        if upg is not None and not upgrade:
            if upg.strip().lower() == b"h2c":
                # An HTTP/2 upgrade offer: served over HTTP/1.1 instead (Envoy strips it).
                if conn_tokens:
                    conn_tokens = [t for t in conn_tokens if t != b"upgrade"]
                    conn_tokens.append(b"http2-settings")
            elif conn_tokens is not None and b"upgrade" in conn_tokens:
                upgrade = True
        if conn_tokens:
            drop = {t for t in conn_tokens if t not in (b"close", b"keep-alive", b"upgrade")}
            if drop:
                # Headers the client names in Connection are this hop's: gone before the
                # connection manager acts on them (a nominated x-request-id is then generated
                # afresh, a nominated x-forwarded-for is not passed on).
                rest = [p for p in rest if p[0] not in drop]
                if b"x-forwarded-for" in drop:
                    xff = None
                if b"x-forwarded-proto" in drop:
                    xfp = None
                if b"x-request-id" in drop:
                    rid = None
                if b"content-type" in drop:
                    ct = None
        if upgrade and upg is not None and method != b"CONNECT":
            rest.append((b"upgrade", upg))
            rest.append((b"connection", b"upgrade"))
        headers._h = rest
        self.upgrade = upgrade
        # x-forwarded-for / x-forwarded-proto (Envoy: append the peer only with use_remote_address).
        # The protocol is the downstream connection's, whatever :scheme a client claims.
        scheme = b"https" if self.conn.info.tls is not None else b"http"
        if cfg.use_remote_address:
            remote = self.conn.info.remote
            ip = remote[0].encode() if isinstance(remote, tuple) else b"127.0.0.1"
            if not cfg.skip_xff_append:
                xff = xff + b", " + ip if xff else ip
            if xfp is not None:
                headers.set(b"x-forwarded-proto", scheme)
            else:
                rest.append((b"x-forwarded-proto", scheme))
        elif xfp is None:
            rest.append((b"x-forwarded-proto", scheme))
        if xff is not None:
            rest.append((b"x-forwarded-for", xff))
        # x-request-id: kept when the client sent one, generated otherwise
        if rid is None and cfg.generate_request_id:
            rid = cfg.new_request_id()
            rest.append((b"x-request-id", rid))
        info.request_id_bytes = rid
        # gRPC is application/grpc, +proto / +json, or with parameters; grpc-web is not (Envoy:
        # Grpc::Common::hasGrpcContentType).
        self.upstream_grpc = self.is_grpc = (
            ct is not None and ct.startswith(b"application/grpc") and ct[16:17] in b"+;"
        )
        self.headers_only = end_stream
        factories = cfg.filter_factories
        gates = cfg.route_gates
        if gates is not None and factories:
            route = self._match_route()
            fc = route.filter_configs if route is not None and route.kind == ROUTE else None
            if not fc or gates.isdisjoint(fc):
                factories = None
        if factories:
            self.phase = _DOWNSTREAM_FILTERS
            fm = self.fm = FilterManager(self, factories, self.conn.info.buffer_limit)
            fm.dec.on_headers(headers, end_stream)
        else:
            self.route_request(headers, end_stream)

    def _bad_request(self, details: str, end_stream: bool) -> None:
        self.conn.resp_keep_alive = False
        self.send_local_reply(400, b"", flags.DOWNSTREAM_PROTOCOL_ERROR, details)

    # -- phase MATCH_ROUTE -----------------------------------------------------------------
    def _match_route(self) -> Any:
        if not self.route_cached:
            self.route_cached = True
            h = self.headers
            rt = self.routes
            if rt is None:
                return None
            authority = h.authority
            if rt.vhost_header is not None:
                authority = h.get(rt.vhost_header) or authority
            self.route = rt.match(authority, h.path, h.method, h)
        return self.route

    def matched_route(self) -> Any:
        return self._match_route()

    def clear_route_cache(self) -> None:
        self.route_cached = False
        self.route = None

    def bridge_to_grpc(self) -> None:
        self.upstream_grpc = True

    def route_config(self, filter_name: str) -> Any:
        route = self._match_route()
        if route is None:
            return None
        return route.filter_configs.get(filter_name)

    # -- the decoder chain's terminal: the router ----------------------------------------------
    def route_request(self, headers: Any, end_stream: bool) -> None:
        if self.phase >= _RESPONSE:
            return
        self.phase = _MATCH_ROUTE
        route = self.route if self.route_cached else self._match_route()
        cfg = self.cfg
        if route is None:
            cfg.stats.no_route.value += 1
            self.send_local_reply(404, b"", flags.NO_ROUTE, "route_not_found")
            return
        self.info.route_name = route.name or None
        vh = route.vhost
        if vh is not None and vh.require_tls and self.conn.info.tls is None:
            # require_tls ALL / EXTERNAL_ONLY (no request is internal here): redirect to https.
            h = self.headers
            cfg.stats.rq_redirect.value += 1
            self.send_local_reply(
                301, b"", None, "tls_required", extra=[(b"location", b"https://" + h.authority + h.path)]
            )
            return
        kind = route.kind
        if kind == DIRECT_RESPONSE:
            cfg.stats.rq_direct_response.value += 1
            self.send_local_reply(
                route.direct_status, route.direct_body, None, "direct_response", route=route
            )
            return
        if kind == REDIRECT:
            cfg.stats.rq_redirect.value += 1
            h = self.headers
            status, location = route.redirect_location(h.scheme, h.authority, h.path)
            self.send_local_reply(
                status, b"", None, "via_redirect", extra=[(b"location", location)], route=route
            )
            return
        if self.upgrade:
            upg = b"connect" if self.method == b"CONNECT" else (self.headers.get(b"upgrade") or b"").lower()
            enabled = route.upgrade_configs.get(upg)
            if enabled is None:
                enabled = upg in cfg.upgrade_types
            if not enabled:
                cfg.stats.downstream_rq_ws_on_non_ws_route.value += 1
                self.send_local_reply(403, b"", None, "upgrade_failed")
                return
        self.router = Router(self, route)
        self.router.decode_headers(headers, end_stream)

    def router_data(self, data: bytes, end_stream: bool) -> None:
        r = self.router
        if r is not None:
            r.decode_data(data, end_stream)

    def router_trailers(self, trailers: HeaderMap) -> None:
        r = self.router
        if r is not None:
            r.decode_trailers(trailers)

    def decoding_alive(self) -> bool:
        return not self.dec_aborted and self.phase != _END

    def encoding_alive(self) -> bool:
        return self.phase != _END

    # -- downstream body and trailers --------------------------------------------------------
    def decode_data(self, data: bytes, end_stream: bool) -> None:
        self.info.bytes_received += len(data)
        if end_stream:
            self.request_complete = True
        if self.phase == _END:
            return
        fm = self.fm
        if fm is not None:
            if not self.dec_aborted:
                fm.dec.on_data(data, end_stream)
        else:
            r = self.router
            if r is not None:
                r.decode_data(data, end_stream)
        if end_stream and self.phase == _END:
            return

    def decode_trailers(self, trailers: HeaderMap) -> None:
        self.request_complete = True
        if self.phase == _END:
            return
        fm = self.fm
        if fm is not None:
            if not self.dec_aborted:
                fm.dec.on_trailers(trailers)
        elif self.router is not None:
            self.router.decode_trailers(trailers)

    def decode_tunnel(self, data: bytes, end_stream: bool) -> None:
        self.info.bytes_received += len(data)
        if self.router is not None:
            self.router.decode_tunnel(data, end_stream)

    def continue_decoding(self) -> None:
        fm = self.fm
        if fm is not None and not self.dec_aborted and self.phase != _END:
            fm.dec.resume()

    def decoding_buffer(self) -> bytes:
        """What the filter manager holds for the filters after the stopped one."""
        return self.fm.dec.buffered() if self.fm is not None else b""

    def add_decoded_data(self, data: bytes) -> None:
        """A stopped filter adds body bytes (e.g. a rewrite) to what is buffered."""
        if self.fm is not None:
            self.fm.dec.add_buffered(data)

    def set_decoded_data(self, data: bytes) -> None:
        if self.fm is not None:
            self.fm.dec.set_data(data)

    def set_decoder_buffer_limit(self, limit: int) -> None:
        """A filter that buffers whole requests (``buffer``) raises or lowers how much the
        decoder chain may hold for it (default: the connection's buffer limit)."""
        if self.fm is not None:
            self.fm.dec.limit = limit

    def request_too_large(self) -> None:
        self.cfg.stats.downstream_rq_too_large.value += 1
        self.send_local_reply(413, b"Payload Too Large", None, "request_payload_too_large")

    # -- phase UPSTREAM_RESPONSE: the response ---------------------------------------------------
    def encode_headers(self, headers: ResponseHeaders, end_stream: bool) -> None:
        if self.phase >= _RESPONSE:
            return
        self.phase = _RESPONSE
        fm = self.fm
        if fm is not None:
            fm.enc.on_headers(headers, end_stream)
        else:
            self.write_headers(headers, end_stream)

    def encode_data(self, data: bytes, end_stream: bool) -> None:
        if self.phase == _END:
            return
        fm = self.fm
        if fm is not None:
            fm.enc.on_data(data, end_stream)
        else:
            self.write_data(data, end_stream)

    def encode_trailers(self, trailers: HeaderMap) -> None:
        if self.phase == _END:
            return
        fm = self.fm
        if fm is not None:
            fm.enc.on_trailers(trailers)
        else:
            self.write_trailers(trailers)

    def continue_encoding(self) -> None:
        fm = self.fm
        if fm is not None and self.phase != _END:
            fm.enc.resume()

    def encoding_buffer(self) -> bytes:
        return self.fm.enc.buffered() if self.fm is not None else b""

    def add_encoded_data(self, data: bytes) -> None:
        if self.fm is not None:
            self.fm.enc.add_buffered(data)

    def set_encoded_data(self, data: bytes) -> None:
        if self.fm is not None:
            self.fm.enc.set_data(data)

    def inject_encoded_data(self, f: Any, data: bytes, end_stream: bool) -> None:
        fm = self.fm
        if fm is not None and self.phase != _END:
            fm.enc.inject(f, data, end_stream)

    def encoder_above_high_watermark(self) -> None:
        self.enc_watermark = True
        if self.router is not None:
            self.router.pause_upstream()

    def encoder_below_low_watermark(self) -> None:
        self.enc_watermark = False
        if self.router is not None and not self.conn.write_paused:
            self.router.resume_upstream()

    def response_too_large(self) -> None:
        """An encoder filter buffered more than the limit (Envoy: 500, or a reset once the
        response headers went out)."""
        info = self.info
        info.response_code_details = "response_payload_too_large"
        if self.fm is not None and self.fm.enc.hdr_idx <= len(self.fm.filters):
            # The headers are still held: answer 500 instead, without the filters.
            self.fm.enc.stop_at = None
            self.fm.enc.hdr_idx = len(self.fm.filters) + 1
            h = ResponseHeaders.make(500, [(b"content-length", b"0")])
            self.conn.resp_keep_alive = self.conn.resp_keep_alive and self.request_complete
            if self.router is not None:
                self.router.reset()
            self.write_headers(h, True)
            return
        self.reset_stream()

    # -- the encoder chain's terminal: the codec ------------------------------------------------
    def write_headers(self, headers: ResponseHeaders, end_stream: bool) -> None:
        cfg = self.cfg
        info = self.info
        status = headers.status
        info.response_code = status
        info.response_headers = headers
        # server and date headers are applied by the codec while it writes the head
        cfg.stats.rq_class[status // 100 if status < 600 else 5].value += 1
        if self.upgrade and (status == 101 or (200 <= status < 300 and self.method == b"CONNECT")):
            self.conn.start_tunnel()
            cfg.stats.downstream_cx_upgrades_total.value += 1
            cfg.stats.downstream_cx_upgrades_active.value += 1
        self.conn.encode_headers(headers, end_stream)
        if end_stream:
            self._finish()

    def write_data(self, data: bytes, end_stream: bool) -> None:
        n = len(data)
        self.info.bytes_sent += n
        self.cfg.stats.downstream_cx_tx_bytes_total.value += n
        self.conn.encode_data(data, end_stream)
        if end_stream:
            self._finish()

    def write_trailers(self, trailers: HeaderMap) -> None:
        self.info.response_trailers = trailers
        self.conn.encode_trailers(trailers)
        self._finish()

    def encode_tunnel(self, data: bytes, end_stream: bool) -> None:
        """Upgraded (WebSocket) bytes from the upstream: straight to the client."""
        if self.phase == _END:
            return
        self.info.bytes_sent += len(data)
        self.conn.encode_tunnel(data, end_stream)

    # -- phase END ----------------------------------------------------------------------------
    def _finish(self) -> None:
        if self.phase == _END:
            return
        self.phase = _END
        info = self.info
        cfg = self.cfg
        loop_time = self.conn.loop.time()
        info.end_mono = loop_time
        st = cfg.stats
        st.downstream_rq_active.value -= 1
        st.downstream_rq_completed.value += 1
        st.downstream_rq_time.record((loop_time - info.start_mono) * 1000)
        if self.upgrade and (
            info.response_code == 101 or (200 <= info.response_code < 300 and self.method == b"CONNECT")
        ):
            st.downstream_cx_upgrades_active.value -= 1
        r = self.router
        if r is not None:
            if not r.done:
                r.on_stream_done()
            # Break the stream <-> router cycle so reference counting frees both now, instead of
            # leaving a cycle per request for the garbage collector (it cost ~30% of the
            # request's Python time, measured with bench/micro_h1.py).
            self.router = None
        fm = self.fm
        if fm is not None:
            fm.destroy()
            self.fm = None
        for al in cfg.access_logs:
            al.log(info)

    def tunnel_closed(self) -> None:
        """Both sides of an upgraded exchange are done: the exchange ends here (a tunnel's
        response never has an end of its own)."""
        if self.phase != _END:
            self._finish()
            conn = self.conn
            conn.stream_ended()
            conn.close()  # an upgraded connection never carries another request

    # -- local replies ----------------------------------------------------------
    def send_local_reply(
        self,
        status: int,
        body: bytes = b"",
        flag: str | None = None,
        details: str | None = None,
        extra: list[tuple[bytes, bytes]] | None = None,
        route: Any = None,
        grpc_status: int | None = None,
    ) -> None:
        info = self.info
        if flag is not None:
            info.response_flags.append(flag)
        info.response_code_details = details
        direct = False
        if self.phase >= _RESPONSE:
            if self.phase == _END:
                return
            if info.response_code or self.upgrade:
                # The response's headers already went to the codec: too late, reset.
                self.cfg.stats.rq_reset_after_downstream_response_started.value += 1
                self.reset_stream()
                return
            # An encoder filter answers before the response reached the codec: Envoy's direct
            # local reply, written past the filters (the upstream response is dropped).
            direct = True
        self.dec_aborted = True
        status, body, ctype = self.cfg.local_reply.apply(status, body, self, info)
        h: list[tuple[bytes, bytes]]
        if self.is_grpc:
            # Trailers-only gRPC answer, as Envoy.
            h = [
                (b"content-type", b"application/grpc"),
                (
                    b"grpc-status",
                    _grpc_status_for(status, details) if grpc_status is None else b"%d" % grpc_status,
                ),
                (b"grpc-message", percent_encode(body)),
            ]
            status = 200
            body = b""
        else:
            h = []
            if body:
                h.append((b"content-type", ctype or b"text/plain"))
            h.append((b"content-length", str(len(body)).encode()))
        if extra:
            h.extend(extra)
        headers = ResponseHeaders.make(status, h)
        if route is not None:
            route.apply_response_headers(headers)
        if not self.request_complete:
            # The request body would follow; the connection cannot be reused.
            self.conn.resp_keep_alive = False
        if self.method == b"HEAD":
            body = b""
        r = self.router
        if r is not None:
            r.reset()
        if direct:
            self.conn.resp_keep_alive = False  # (the upstream response was cut short)
            send_headers, send_data = self.write_headers, self.write_data  # past the filters
        else:
            send_headers, send_data = self.encode_headers, self.encode_data
        if body:
            send_headers(headers, False)
            send_data(body, True)
        else:
            send_headers(headers, True)

    def protocol_error(self, status: int, details: str) -> None:
        self.conn.resp_keep_alive = False
        self.send_local_reply(status, b"", flags.DOWNSTREAM_PROTOCOL_ERROR, details)

    def reset_stream(self) -> None:
        """Abort the exchange: reset the downstream (HTTP/1.1: close the connection) and the
        upstream request."""
        if self.phase == _END:
            return
        self.cfg.stats.downstream_rq_tx_reset.value += 1
        if not self.info.response_flags:
            self.info.response_flags.append(flags.LOCAL_RESET)
        r = self.router
        if r is not None:
            r.reset()
        self.conn.stream_ended()
        self.conn.abort()
        self._finish()

    def on_reset(self, reason: ResetReason) -> None:
        """The downstream went away (connection closed, RST_STREAM) while this stream was on."""
        if self.phase == _END:
            return
        self.cfg.stats.downstream_rq_rx_reset.value += 1
        self.info.response_flags.append(flags.DOWNSTREAM_CONNECTION_TERMINATION)
        r = self.router
        if r is not None:
            r.reset()
        self._finish()

    # -- flow control ------------------------------------------------------------
    def on_write_paused(self) -> None:
        if self.router is not None:
            self.router.pause_upstream()

    def on_write_resumed(self) -> None:
        if self.router is not None and not self.enc_watermark:
            self.router.resume_upstream()

    def pause_downstream(self) -> None:
        self.conn.pause_reading()

    def resume_downstream(self) -> None:
        if not self.conn.backlog:
            self.conn.resume_reading()

    # -- timers (checked by the connection's lazy timer) ----------------------
    def check_timeouts(self, now: float) -> bool:
        cfg = self.cfg
        r = self.router
        if r is not None and r.deadline and now >= r.deadline:
            r._on_global_timeout()
            return True
        started = self.phase >= _RESPONSE
        if self.deadline and now >= self.deadline and not started:
            cfg.stats.downstream_rq_timeout.value += 1
            self.send_local_reply(408, b"request timeout", None, "request_overall_timeout")
            return True
        if self.upgrade and started:
            return False  # an open tunnel: the idle and duration timeouts of tcp_proxy apply
        info = self.info
        moved = info.bytes_sent + info.bytes_received
        if moved != self.idle_mark:
            # Bytes moved since the last sweep (a streaming response, an upload): activity, seen
            # here instead of a clock read per data event on the request path.
            self.idle_mark = moved
            self.last_activity = now
        if (
            cfg.stream_idle_timeout
            and now - max(self.last_activity, self.conn.last_activity) >= cfg.stream_idle_timeout
        ):
            cfg.stats.downstream_rq_idle_timeout.value += 1
            self.info.response_flags.append(flags.STREAM_IDLE_TIMEOUT)
            if started:
                self.reset_stream()
            else:
                self.send_local_reply(408, b"stream timeout", None, "stream_idle_timeout")
            return True
        msd = cfg.max_stream_duration
        route = self.route
        if route is not None and route.max_stream_duration is not None:
            msd = route.max_stream_duration  # the route's own (0: none), else the HCM's
        if msd and now - self.info.start_mono >= msd:
            self.info.response_flags.append(flags.DURATION_TIMEOUT)
            if started:
                self.reset_stream()
            else:
                self.send_local_reply(408, b"downstream duration timeout", None, "max_duration_timeout")
            return True
        return False


# gRPC status for an HTTP status, as Envoy maps local replies (grpc_utility.cc).


# Router timeouts answer a gRPC request DEADLINE_EXCEEDED (4), not the UNAVAILABLE that 504 maps
# to: Envoy does so since envoyproxy/envoy#44479 (runtime guard
# envoy.reloadable_features.grpc_timeout_returns_deadline_exceeded), so clients do not retry a
# call whose deadline has passed.
_GRPC_DEADLINE_DETAILS = frozenset(("upstream_response_timeout", "upstream_per_try_timeout"))


def _grpc_status_for(status: int, details: str | None = None) -> bytes:
    if details in _GRPC_DEADLINE_DETAILS:
        return b"4"
    return grpc_status_for_http(status)
