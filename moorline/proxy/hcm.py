"""HTTP connection manager: ``envoy.filters.network.http_connection_manager``.

``HcmConfig`` is the compiled ``HttpConnectionManager`` proto. Each accepted
connection gets a codec connection (``moorline.stream.http1_server``); each
request on it an ``ActiveStream``, which walks the request lifecycle
(MOSN's phases, named here):

1. ``decode_headers``: downstream headers arrive; connection-manager header
   handling (x-forwarded-*, x-request-id, hop-by-hop removal);
2. route match (cached on the stream; filters may clear it);
3. decoder filters (config order), then the router (terminal): choose the
   cluster and host, get a pooled upstream connection, send the request;
4. upstream response through the encoder filters (reverse order) to the
   downstream codec;
5. end: stats, access log, the connection moves on to the next request.

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
from moorline.protocol.headers import HeaderMap
from moorline.protocol.http1 import HttpProtocolError, Limits
from moorline.proxy.filter import CONTINUE, HttpFilter
from moorline.proxy.local_reply import LocalReplyConfig
from moorline.proxy.route_provider import RouteConfigProvider
from moorline.proxy.route_table import DIRECT_RESPONSE, REDIRECT, RouteTable
from moorline.proxy.router import Router
from moorline.stream.http1_server import Http1ServerConnection

HCM_TYPE = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER_NAMES = ("envoy.filters.http.router", "envoy.router")
ROUTER_TYPE = "envoy.extensions.filters.http.router.v3.Router"

# Request headers that never travel to the upstream (hop-by-hop, RFC 9110 7.6.1).
_REQ_HOP = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"te", b"host")
)

_HTTP_SCHEME = b"http"
# Headers the single pass in decode_headers looks at.
_REQ_SPECIAL = _REQ_HOP | frozenset(
    (b"x-forwarded-for", b"x-forwarded-proto", b"x-request-id", b"content-type", b"expect")
)

_rid_pool: list[bytes] = []


def new_request_id() -> bytes:
    """A random (version 4) UUID as bytes. Random bytes are drawn 256 ids at a time: one
    ``os.urandom`` call instead of one ``uuid.uuid4()`` object per request."""
    if not _rid_pool:
        raw = os.urandom(16 * 256).hex().encode()
        for i in range(0, len(raw), 32):
            x = raw[i : i + 32]
            _rid_pool.append(
                b"%s-%s-4%s-%c%s-%s" % (x[:8], x[8:12], x[13:16], b"89ab"[x[16] % 4], x[17:20], x[20:32])
            )
    return _rid_pool.pop()


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


class HcmConfig:
    """Compiled ``HttpConnectionManager``.

    Routes come from ``route_provider`` (``moorline.proxy.route_provider.RouteConfigProvider``):
    a stream reads ``route_provider.current`` once when its headers arrive. ``route_table`` is
    the provider's current table, for callers that do not pin a snapshot."""

    def __init__(self, proto: Any, ctx: BuildContext, path: str) -> None:
        from moorline.config.loader import unpack_any
        from moorline.observability.access_log import compile_access_logs

        self.ctx = ctx
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
            raise ConfigError(f"{path}.rds", "RDS needs an xDS control plane, which is not supported yet")
        elif kind is None:
            raise ConfigError(path, "one of route_config or rds is required")
        else:
            raise ConfigError(f"{path}.{kind}", f"{kind} is not supported")

        # filters: router must be last
        self.filter_factories: list[Any] = []
        fl = list(proto.http_filters)
        if not fl:
            raise ConfigError(f"{path}.http_filters", "http_filters must end with envoy.filters.http.router")
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
            self.filter_factories.append(ext.factory(cfg, ctx, fpath))

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
        self.upgrade_types = frozenset(u.upgrade_type.lower().encode() for u in proto.upgrade_configs)
        self.local_reply = (
            LocalReplyConfig.compile(proto.local_reply_config, f"{path}.local_reply_config")
            if (proto.HasField("local_reply_config"))
            else LocalReplyConfig.empty()
        )
        self.access_logs = compile_access_logs(list(proto.access_log), ctx, f"{path}.access_log")
        if proto.HasField("tracing"):
            ctx.notice(f"{path}.tracing: tracing is not supported yet; ignored")
        # Runtime state of this compiled config's connections (a listener update compiles a
        # new HcmConfig, so these stay with the connections accepted under the old one).
        self.draining = False
        self.connections: set[Any] = set()
        self.cluster_manager = ctx.cluster_manager

    @property
    def route_table(self) -> RouteTable:
        return self.route_provider.current

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
        # One lazily re-armed timer per connection checks every deadline (idle, request and
        # route timeouts); its period bounds how late a timeout can fire: a tenth of the
        # shortest configured one, between 10 ms and 1 s. Shorter deadlines that only appear at
        # run time (grpc-timeout) get a timer of their own. Connections read the period each
        # time they re-arm, so a route update reaches them within one old period.
        self.timer_period = max(0.01, min(1.0, min(periods) / 10)) if periods else 0.0
        self.lazy_timeout_min = self.timer_period * 10 if self.timer_period else float("inf")

    # -- network filter terminal ------------------------------------------
    terminal = True

    def on_accept(self, sock: Any, info: Any) -> None:
        loop = asyncio.get_event_loop()
        if self.codec_type == 1:
            factory: Any = lambda: Http1ServerConnection(self, info)  # noqa: E731
        else:
            # HTTP2, or AUTO: ALPN "h2" or the HTTP/2 preface picks HTTP/2 (see http2_server).
            from moorline.stream.http2_server import protocol_factory

            factory = protocol_factory(self, info, self.codec_type)
        # TLS chains (info.tls): handshake first, then factory() with info.negotiated_alpn set.
        serve_accepted(loop, sock, info, factory)

    def drain(self) -> None:
        """Stop keep-alive: in-flight responses get ``connection: close``; idle connections close."""
        self.draining = True
        for c in list(self.connections):
            if c.stream is None:
                c.close()

    def close_all(self) -> None:
        for c in list(self.connections):
            c.abort()

    def active_requests(self) -> int:
        return sum(1 for c in self.connections if c.stream is not None)

    def active_connections(self) -> int:
        """Live downstream connections (a draining listener waits for them)."""
        return len(self.connections)


def _accept_done(t: asyncio.Task) -> None:
    if not t.cancelled():
        t.exception()  # connection reset during accept: nothing to do


def _hcm_factory(cfg: Any, ctx: BuildContext, path: str) -> HcmConfig:
    if cfg is None:
        raise ConfigError(f"{path}.typed_config", "typed_config is required")
    return HcmConfig(cfg, ctx, f"{path}.typed_config")


registry.register(
    "network",
    ["envoy.filters.network.http_connection_manager", "envoy.http_connection_manager"],
    ["type.googleapis.com/" + HCM_TYPE],
    _hcm_factory,
)


class ActiveStream:
    """One request/response exchange on a downstream connection."""

    __slots__ = (
        "buffered_body",
        "buffered_bytes",
        "buffered_end",
        "buffered_trailers",
        "cfg",
        "conn",
        "deadline",
        "dec_hdr",
        "done",
        "filters",
        "headers",
        "headers_only",
        "info",
        "is_grpc",
        "last_activity",
        "method",
        "request_complete",
        "response_complete",
        "response_started",
        "route",
        "route_cached",
        "router",
        "stop_at",
        "upgrade",
        "version",
    )

    def __init__(self, conn: Any, head: Any) -> None:
        self.conn = conn
        cfg = self.cfg = conn.cfg
        loop_time = conn.last_activity
        info = self.info = StreamInfo(time.time(), loop_time)
        info.downstream_remote_address = conn.remote_str
        info.downstream_local_address = conn.local_str
        info.connection_id = conn.info.connection_id
        self.version = head.version
        self.method = head.method
        self.route: Any = None
        self.route_cached = False
        self.router: Any = None
        self.filters: list[HttpFilter] | None = None
        self.request_complete = False
        self.response_started = False
        self.response_complete = False
        self.dec_hdr = 0  # filters that have seen the headers (len(filters) + 1: the router has)
        self.stop_at: int | None = None  # index of the filter holding iteration
        self.headers_only = False
        self.buffered_body: list[bytes] | None = None
        self.buffered_bytes = 0
        self.buffered_trailers: HeaderMap | None = None
        self.buffered_end = False
        self.deadline = 0.0
        self.last_activity = loop_time
        self.is_grpc = False
        self.upgrade = False
        self.done = False
        st = cfg.stats
        st.downstream_rq_total.value += 1
        if head.version != b"2":
            st.downstream_rq_http1_total.value += 1
        st.downstream_rq_active.value += 1
        if cfg.request_timeout:
            self.deadline = loop_time + cfg.request_timeout

    # -- phase 1: downstream headers --------------------------------------
    def decode_headers(self, head: Any) -> None:
        cfg = self.cfg
        info = self.info
        info.protocol = (
            "HTTP/1.1" if head.version == b"1.1" else ("HTTP/2" if head.version == b"2" else "HTTP/1.0")
        )
        raw = head.headers._h
        authority = None
        target = head.target
        method = head.method
        if head.version == b"1.0" and not cfg.accept_http_10:
            self.send_local_reply(426, b"", flags.DOWNSTREAM_PROTOCOL_ERROR, "low_version")
            return
        # Build the header map in one pass: pseudo-headers first, then the rest without hop-by-hop
        # ones, noting the few headers the connection manager itself acts on.
        conn_tokens: list[bytes] | None = None
        rest: list[tuple[bytes, bytes]] = []
        xff = xfp = rid = ct = upg = None
        for k, v in raw:
            if k in _REQ_SPECIAL:
                if k in _REQ_HOP:
                    if k == b"host":
                        if authority is None:
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
                        continue  # answered here (proxy_100_continue off, Envoy's default)
            rest.append((k, v))
        if target[:1] != b"/":
            if method == b"CONNECT":
                authority = authority or target
            elif target == b"*" and method == b"OPTIONS":
                pass
            else:
                # absolute-form: take the authority and path out of it
                scheme_sep = target.find(b"://")
                if scheme_sep < 0:
                    cfg.stats.downstream_rq_non_relative_path.value += 1
                    self.send_local_reply(404, b"", flags.NO_ROUTE, "absolute_path_rejected")
                    return
                rest_t = target[scheme_sep + 3 :]
                slash = rest_t.find(b"/")
                authority = rest_t if slash < 0 else rest_t[:slash]
                target = b"/" if slash < 0 else rest_t[slash:]
        if authority is None:
            if head.version == b"1.0" and cfg.default_host_for_http_10:
                authority = cfg.default_host_for_http_10
            else:
                authority = b""
        upgrade = head.upgrade and method != b"CONNECT"
        if conn_tokens:
            drop = {t for t in conn_tokens if t not in (b"close", b"keep-alive", b"upgrade")}
            if drop:
                rest = [p for p in rest if p[0] not in drop]
        if upgrade and upg is not None:
            rest.append((b"upgrade", upg))
            rest.append((b"connection", b"upgrade"))
        h = [(b":method", method), (b":scheme", _HTTP_SCHEME), (b":authority", authority), (b":path", target)]
        h.extend(rest)
        headers = self.headers = HeaderMap.wrap(h)
        info.request_headers = headers
        self.upgrade = upgrade
        # x-forwarded-for / x-forwarded-proto (Envoy: append the peer only with use_remote_address)
        if cfg.use_remote_address:
            remote = self.conn.info.remote
            ip = remote[0].encode() if isinstance(remote, tuple) else b"127.0.0.1"
            if not cfg.skip_xff_append:
                xff = xff + b", " + ip if xff else ip
            if xfp is not None:
                headers.set(b"x-forwarded-proto", _HTTP_SCHEME)
            else:
                h.append((b"x-forwarded-proto", _HTTP_SCHEME))
        elif xfp is None:
            h.append((b"x-forwarded-proto", _HTTP_SCHEME))
        if xff is not None:
            h.append((b"x-forwarded-for", xff))
        # x-request-id: kept when the client sent one, generated otherwise
        if rid is None and cfg.generate_request_id:
            rid = new_request_id()
            h.append((b"x-request-id", rid))
        if rid is not None:
            info.request_id = rid.decode("latin-1")
        self.is_grpc = ct is not None and ct.startswith(b"application/grpc")
        if head.content_length == 0 and not head.chunked and not upgrade:
            # No body: the request ends with its headers.
            end_stream = True
        elif head.content_length is None and not head.chunked and not upgrade:
            end_stream = True
        else:
            end_stream = False
        self.headers_only = end_stream
        self._run_decoders_headers(end_stream)

    def _match_route(self) -> Any:
        if not self.route_cached:
            self.route_cached = True
            h = self.headers
            hh = h._h
            rt = self.cfg.route_table
            authority = hh[2][1]
            if rt.vhost_header is not None:
                authority = h.get(rt.vhost_header) or authority
            self.route = rt.match(authority, b"" if hh[0][1] == b"CONNECT" else hh[3][1], hh[0][1], h)
        return self.route

    def matched_route(self) -> Any:
        return self._match_route()

    def clear_route_cache(self) -> None:
        self.route_cached = False
        self.route = None

    # -- decoder filter chain ----------------------------------------------------
    # Filters see headers, data and trailers in config order, then the router. A filter that
    # answers STOP_ITERATION holds the stream at its index (``stop_at``): later data still
    # reaches the filters up to and including it (so it can decide), and is buffered by the
    # connection manager for the filters after it, up to the connection's buffer limit (then
    # 413). When the holding filter continues (CONTINUE from decode_data, or
    # ``continue_decoding()``), headers, buffered data and trailers resume at the next filter.

    def _run_decoders_headers(self, end_stream: bool) -> None:
        if end_stream:
            self.request_complete = True
        factories = self.cfg.filter_factories
        if not factories:
            self.dec_hdr = 1
            self._route_request(end_stream)
            return
        fl = self.filters = []
        for f in factories:
            inst = f(self)
            inst.set_callbacks(self)  # type: ignore[arg-type]
            fl.append(inst)
        self._resume(0)

    def continue_decoding(self) -> None:
        s = self.stop_at
        if s is None or self.done:
            return
        self._resume(s + 1)

    def _resume(self, start: int) -> None:
        fl = self.filters or []
        n = len(fl)
        self.stop_at = None
        i = max(start, self.dec_hdr)
        while self.dec_hdr <= n:
            if i >= n:
                self.dec_hdr = n + 1
                self._route_request(self.headers_only)
                if self.done or self.response_started or self.router is None:
                    return
                break
            r = fl[i].decode_headers(self.headers, self.headers_only)
            self.dec_hdr = i + 1
            if self.done or self.response_started:
                return
            if r != CONTINUE:
                self.stop_at = i
                return
            i += 1
        body = self.buffered_body
        trailers = self.buffered_trailers
        end = self.buffered_end
        self.buffered_body = None
        self.buffered_trailers = None
        self.buffered_end = False
        self.buffered_bytes = 0
        if body:
            self._push_data(b"".join(body), end and trailers is None, start)
        elif end and trailers is None:
            self._push_data(b"", True, start)
        if trailers is not None:
            if self.stop_at is not None:
                self.buffered_trailers = trailers
            else:
                self._push_trailers(trailers, start)

    def _push_data(self, data: bytes, end_stream: bool, start: int) -> None:
        fl = self.filters
        if fl:
            for i in range(start, len(fl)):
                r = fl[i].decode_data(data, end_stream)
                if self.done or self.response_started:
                    return
                if r != CONTINUE:
                    # Filter i saw this chunk and holds it: buffer it for the filters after i.
                    self.stop_at = i
                    self._buffer(data, end_stream)
                    return
        r2 = self.router
        if r2 is not None:
            r2.decode_data(data, end_stream)

    def _push_trailers(self, trailers: HeaderMap, start: int) -> None:
        fl = self.filters
        if fl:
            for i in range(start, len(fl)):
                if fl[i].decode_trailers(trailers) != CONTINUE:
                    self.stop_at = i
                    self.buffered_trailers = trailers
                    return
                if self.done:
                    return
        if self.router is not None:
            self.router.decode_trailers(trailers)

    def _buffer(self, data: bytes, end_stream: bool) -> None:
        if self.buffered_body is None:
            self.buffered_body = []
        if data:
            self.buffered_body.append(data)
            self.buffered_bytes += len(data)
        if end_stream:
            self.buffered_end = True
        if self.buffered_bytes > self.conn.info.buffer_limit:
            self.cfg.stats.downstream_rq_too_large.value += 1
            self.send_local_reply(413, b"Payload Too Large", None, "request_payload_too_large")

    def decoding_buffer(self) -> bytes:
        """What the connection manager holds for the filters after the stopped one."""
        return b"".join(self.buffered_body or ())

    def add_decoded_data(self, data: bytes) -> None:
        """A stopped filter adds body bytes (e.g. a rewrite) to what is buffered."""
        self._buffer(data, False)

    # -- phase 2/3: route and router ---------------------------------------
    def _route_request(self, end_stream: bool) -> None:
        if self.done or self.response_started:
            return
        route = self._match_route()
        cfg = self.cfg
        if route is None:
            cfg.stats.no_route.value += 1
            self.send_local_reply(404, b"", flags.NO_ROUTE, "route_not_found")
            return
        self.info.route_name = route.name or None
        kind = route.kind
        if kind == DIRECT_RESPONSE:
            cfg.stats.rq_direct_response.value += 1
            self.send_local_reply(
                route.direct_status, route.direct_body, None, "direct_response", route=route
            )
            return
        if kind == REDIRECT:
            cfg.stats.rq_redirect.value += 1
            hh = self.headers._h
            status, location = route.redirect_location(hh[1][1], hh[2][1], hh[3][1])
            self.send_local_reply(
                status, b"", None, "via_redirect", extra=[(b"location", location)], route=route
            )
            return
        if self.upgrade:
            upg = (self.headers.get(b"upgrade") or b"").lower()
            enabled = route.upgrade_configs.get(upg)
            if enabled is None:
                enabled = upg in cfg.upgrade_types
            if not enabled:
                cfg.stats.downstream_rq_ws_on_non_ws_route.value += 1
                self.send_local_reply(403, b"", None, "upgrade_failed")
                return
        self.router = Router(self, route)
        self.router.decode_headers(self.headers, end_stream)

    # -- downstream body -----------------------------------------------------
    def decode_data(self, data: bytes, end_stream: bool) -> None:
        self.info.bytes_received += len(data)
        if self.done:
            return
        s = self.stop_at
        if s is None:
            if self.filters:
                self._push_data(data, end_stream, 0)
                return
            r = self.router
            if r is not None:
                r.decode_data(data, end_stream)
            return
        # Held at filter s: the filters up to it see the data; the rest waits in the buffer.
        fl = self.filters or []
        for i in range(s + 1):
            if i < s and i >= self.dec_hdr:
                break
            r = fl[i].decode_data(data, end_stream)
            if self.done or self.response_started:
                return
            if r != CONTINUE:
                if i < s:
                    self.stop_at = i
                self._buffer(data, end_stream)
                return
        # The holding filter continued: what it held, then this data, go on.
        self._buffer(data, end_stream)
        if not self.done:
            self._resume(s + 1)

    def decode_complete(self, trailers: HeaderMap | None) -> None:
        self.request_complete = True
        if self.done and self.response_complete:
            return
        if trailers:
            if self.stop_at is not None:
                self.buffered_trailers = trailers
            elif self.filters:
                self._push_trailers(trailers, 0)
            elif self.router is not None:
                self.router.decode_trailers(trailers)
        else:
            self.decode_data(b"", True)
        if self.response_complete:
            self._finish()

    def on_tunnel_data(self, data: bytes, end_stream: bool) -> None:
        self.info.bytes_received += len(data)
        if self.router is not None:
            self.router.decode_tunnel(data, end_stream)

    # -- phase 4: response -----------------------------------------------------
    def encode_headers(self, headers: HeaderMap, end_stream: bool) -> None:
        if self.done or self.response_started:
            return
        self.response_started = True
        cfg = self.cfg
        info = self.info
        fl = self.filters
        if fl:
            for f in reversed(fl):
                if f.encode_headers(headers, end_stream) != CONTINUE:
                    break
        status = int(headers._h[0][1])
        info.response_code = status
        info.response_headers = headers
        # server and date headers are applied by the codec while it writes the head
        cfg.stats.rq_class[status // 100 if status < 600 else 5].value += 1
        if status == 101:
            self.conn.start_tunnel()
            cfg.stats.downstream_cx_upgrades_total.value += 1
        self.conn.encode_headers(headers, end_stream, self.version)
        if end_stream:
            self._response_done()

    def encode_data(self, data: bytes, end_stream: bool) -> None:
        if self.done:
            return
        self.info.bytes_sent += len(data)
        self.cfg.stats.downstream_cx_tx_bytes_total.value += len(data)
        fl = self.filters
        if fl:
            for f in reversed(fl):
                f.encode_data(data, end_stream)
        self.conn.encode_data(data, end_stream)
        if end_stream:
            self._response_done()

    def encode_trailers(self, trailers: HeaderMap) -> None:
        if self.done:
            return
        self.info.response_trailers = trailers
        fl = self.filters
        if fl:
            for f in reversed(fl):
                f.encode_trailers(trailers)
        self.conn.encode_trailers(trailers)
        self._response_done()

    def _response_done(self) -> None:
        self.response_complete = True
        self._finish()

    def _finish(self) -> None:
        if self.done:
            return
        self.done = True
        info = self.info
        cfg = self.cfg
        loop_time = self.conn.loop.time()
        info.end_mono = loop_time
        st = cfg.stats
        st.downstream_rq_active.value -= 1
        st.downstream_rq_completed.value += 1
        st.downstream_rq_time.record((loop_time - info.start_mono) * 1000)
        r = self.router
        if r is not None:
            r.on_stream_done()
            # Break the stream <-> router cycle so reference counting frees both now, instead of
            # leaving a cycle per request for the garbage collector (it cost ~30% of the
            # request's Python time, measured with bench/micro_h1.py).
            self.router = None
        fl = self.filters
        if fl:
            for f in fl:
                f.on_destroy()
            self.filters = None
        for al in cfg.access_logs:
            al.log(info)

    # -- local replies ----------------------------------------------------------
    def send_local_reply(
        self,
        status: int,
        body: bytes = b"",
        flag: str | None = None,
        details: str | None = None,
        extra: list[tuple[bytes, bytes]] | None = None,
        route: Any = None,
    ) -> None:
        info = self.info
        if flag is not None:
            info.response_flags.append(flag)
        info.response_code_details = details
        if self.response_started:
            # Too late for a reply: reset the stream (close the connection).
            self.cfg.stats.rq_reset_after_downstream_response_started.value += 1
            self.reset_stream()
            return
        status, body, ctype = self.cfg.local_reply.apply(status, body, self, info)
        grpc = self.is_grpc
        h: list[tuple[bytes, bytes]]
        if grpc:
            # Trailers-only gRPC answer, as Envoy.
            h = [
                (b":status", b"200"),
                (b"content-type", b"application/grpc"),
                (b"grpc-status", _grpc_status_for(status, details)),
                (b"grpc-message", _grpc_percent_encode(body)),
            ]
            body = b""
        else:
            h = [(b":status", str(status).encode())]
            if body:
                h.append((b"content-type", ctype or b"text/plain"))
            h.append((b"content-length", str(len(body)).encode()))
        if extra:
            h.extend(extra)
        headers = HeaderMap.wrap(h)
        if route is not None:
            route.apply_response_headers(headers)
        if not self.request_complete:
            # The request body would follow; the connection cannot be reused.
            self.conn.resp_keep_alive = False
        if self.method == b"HEAD":
            body = b""
        if body:
            self.encode_headers(headers, False)
            self.encode_data(body, True)
        else:
            self.encode_headers(headers, True)

    def protocol_error(self, e: HttpProtocolError) -> None:
        self.conn.resp_keep_alive = False
        self.send_local_reply(e.status_hint, b"", flags.DOWNSTREAM_PROTOCOL_ERROR, e.detail)

    def reset_stream(self) -> None:
        """Abort the exchange: close the downstream connection and the upstream request."""
        self.cfg.stats.downstream_rq_tx_reset.value += 1
        if not self.info.response_flags:
            self.info.response_flags.append(flags.LOCAL_RESET)
        r = self.router
        if r is not None:
            r.reset()
        self.conn.stream = None
        self.conn.abort()
        self._finish()

    def on_downstream_reset(self) -> None:
        """The downstream connection closed while this stream was active."""
        if self.done:
            return
        self.cfg.stats.downstream_rq_rx_reset.value += 1
        if not self.response_complete:
            self.info.response_flags.append(flags.DOWNSTREAM_CONNECTION_TERMINATION)
        r = self.router
        if r is not None:
            r.reset()
        self._finish()

    # -- flow control ------------------------------------------------------------
    def on_downstream_write_paused(self) -> None:
        if self.router is not None:
            self.router.pause_upstream()

    def on_downstream_write_resumed(self) -> None:
        if self.router is not None:
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
        if self.deadline and now >= self.deadline and not self.response_started:
            cfg.stats.downstream_rq_timeout.value += 1
            self.send_local_reply(408, b"request timeout", None, "request_overall_timeout")
            return True
        if (
            cfg.stream_idle_timeout
            and now - max(self.last_activity, self.conn.last_activity) >= cfg.stream_idle_timeout
        ):
            cfg.stats.downstream_rq_idle_timeout.value += 1
            self.info.response_flags.append(flags.STREAM_IDLE_TIMEOUT)
            if self.response_started:
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
            if self.response_started:
                self.reset_stream()
            else:
                self.send_local_reply(408, b"downstream duration timeout", None, "max_duration_timeout")
            return True
        return False


# gRPC status for an HTTP status, as Envoy maps local replies (grpc_utility.cc).
_GRPC_FOR_HTTP = {
    400: b"13",
    401: b"16",
    403: b"7",
    404: b"12",
    429: b"14",
    502: b"14",
    503: b"14",
    504: b"14",
}


# Router timeouts answer a gRPC request DEADLINE_EXCEEDED (4), not the UNAVAILABLE that 504 maps
# to: Envoy does so since envoyproxy/envoy#44479 (runtime guard
# envoy.reloadable_features.grpc_timeout_returns_deadline_exceeded), so clients do not retry a
# call whose deadline has passed.
_GRPC_DEADLINE_DETAILS = frozenset(("upstream_response_timeout", "upstream_per_try_timeout"))


def _grpc_percent_encode(msg: bytes) -> bytes:
    """grpc-message is percent-encoded: bytes outside printable ASCII, and '%' itself."""
    if all(0x20 <= c <= 0x7E and c != 0x25 for c in msg):
        return msg
    return b"".join(bytes((c,)) if 0x20 <= c <= 0x7E and c != 0x25 else b"%%%02X" % c for c in msg)


def _grpc_status_for(status: int, details: str | None = None) -> bytes:
    if details in _GRPC_DEADLINE_DETAILS:
        return b"4"
    return _GRPC_FOR_HTTP.get(status, b"2")


def protocol_error_reply(conn: Any, e: HttpProtocolError) -> None:
    """A request the codec rejected before a stream existed: answer and close."""
    from moorline.protocol.http1 import RequestHead

    head = RequestHead.__new__(RequestHead)
    _fill_dummy_head(head)
    conn.close_after_response = True
    conn.resp_keep_alive = False
    conn.resp_no_body = False
    s = ActiveStream(conn, head)
    conn.stream = s
    s.headers = HeaderMap.wrap(
        [(b":method", b""), (b":scheme", b"http"), (b":authority", b""), (b":path", b"")]
    )
    s.info.request_headers = s.headers
    s.info.protocol = "HTTP/1.1"
    s.request_complete = True
    s.send_local_reply(e.status_hint, b"", flags.DOWNSTREAM_PROTOCOL_ERROR, e.detail)
    conn.close()


def timeout_reply(conn: Any, details: bytes) -> None:
    conn.cfg.stats.downstream_rq_header_timeout.value += 1
    protocol_error_reply(conn, HttpProtocolError(408, details.decode()))


def _fill_dummy_head(head: Any) -> None:
    for name, value in (
        ("method", b""),
        ("target", b"/"),
        ("version", b"1.1"),
        ("headers", HeaderMap()),
        ("keep_alive", False),
        ("content_length", None),
        ("chunked", False),
        ("upgrade", False),
        ("expect_continue", False),
        ("header_bytes", 0),
    ):
        try:
            setattr(head, name, value)
        except AttributeError:
            pass
