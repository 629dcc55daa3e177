"""``envoy.filters.http.ratelimit``: global rate limiting against a rate limit service speaking
``envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`` (the API envoyproxy/ratelimit
serves), over grpcio's asyncio client on the server's loop.

On the request headers the filter builds the descriptors of the route's ``rate_limits`` (and the
virtual host's: when the route has none, or with ``include_vh_rate_limits`` /
``RateLimitPerRoute.vh_rate_limits``) for its ``stage`` (compiled with the route table, see
``proxy.rate_limit_policy``). No descriptor: no call. Otherwise it holds the request (and
buffers its body, within the connection's limit) until the answer:

- ``OK``: the request goes on, with the service's ``request_headers_to_add``; its
  ``response_headers_to_add`` (and the ``x-ratelimit-*`` headers with
  ``enable_x_ratelimit_headers``) go on the response.
- ``OVER_LIMIT``: ``rate_limited_status`` (429) with flag ``RL``, details
  ``request_rate_limited`` and ``x-envoy-ratelimited: true`` (unless
  ``disable_x_envoy_ratelimited_header``); gRPC requests get ``UNAVAILABLE``, or
  ``RESOURCE_EXHAUSTED`` with ``rate_limited_as_resource_exhausted``. When ``filter_enforced``
  samples the request out, it goes on instead.
- an error or the ``timeout`` (20 ms by default, a gRPC deadline): the request goes on
  (``failure_mode_allowed``) unless ``failure_mode_deny``, then ``status_on_error`` (500) with flag
  ``RLSE``, details ``rate_limiter_error``.

Stats, as Envoy names them: ``cluster.<route target cluster>.ratelimit.[<stat_prefix>.]ok`` /
``over_limit`` / ``error`` / ``failure_mode_allowed`` (at most ``MAX_CLUSTER_STATS`` clusters).

The request waits without a task of ours: a done callback on the task grpc.aio already runs for
the call. One channel per filter config, opened on first use and reused; the target is the first
host of the ``envoy_grpc`` cluster (looked up when the channel opens, so an EDS cluster works),
or ``google_grpc.target_uri``. A reset stream cancels its call.
"""

from __future__ import annotations

import random
import re
from typing import Any

from moorline.config import registry
from moorline.config.errors import ConfigError
from moorline.protocol.headers import RequestHeaders, ResponseHeaders
from moorline.proxy.filter import CONTINUE, STOP_ALL_ITERATION_AND_BUFFER, HttpFilter
from moorline.proxy.rate_limit_policy import Facts, compile_rate_limits, descriptors
from moorline.proxy.route_table import HeaderMatcher

NAME = "envoy.filters.http.ratelimit"
TYPE = "envoy.extensions.filters.http.ratelimit.v3.RateLimit"
PER_ROUTE_TYPE = "envoy.extensions.filters.http.ratelimit.v3.RateLimitPerRoute"
METHOD = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"

MAX_CLUSTER_STATS = 1000  # bound on the per-route-cluster stat sets (a cluster_header route)
DEFAULT_TIMEOUT = 0.020
H_INTERNAL = b"x-envoy-internal"
H_RATELIMITED = b"x-envoy-ratelimited"
RATE_LIMITED = "RL"
RATE_LIMIT_SERVICE_ERROR = "RLSE"
GRPC_UNAVAILABLE = 14
GRPC_RESOURCE_EXHAUSTED = 8

VH_OVERRIDE, VH_INCLUDE, VH_IGNORE = 0, 1, 2
_UNIT_SECONDS = {1: 1, 2: 60, 3: 3600, 4: 86400, 5: 2592000, 6: 31536000}  # SECOND..YEAR

# What one call ends with (the first item of _Filter._done's argument).
OK, OVER_LIMIT, ERROR = 0, 1, 2


class _PerRoute:
    __slots__ = ("domain", "rate_limits", "vh_option")

    def __init__(self, vh_option: int, rate_limits: tuple[Any, ...] | None, domain: str | None) -> None:
        self.vh_option = vh_option
        self.rate_limits = rate_limits
        self.domain = domain


class RateLimitConfig:
    """The compiled filter config, its stats and its channel (opened on first use)."""

    __slots__ = (
        "_channel",
        "_cluster_stats",
        "_pb",
        "_stub",
        "cluster_manager",
        "deny",
        "domain",
        "enabled",
        "enforced",
        "error_status",
        "filter_rate_limits",
        "grpc_status",
        "local_cluster",
        "request_type",
        "response_headers",
        "rng",
        "stage",
        "stat_prefix",
        "stats_store",
        "status",
        "target",
        "target_cluster",
        "timeout",
        "x_envoy_header",
        "x_ratelimit_headers",
    )

    def __init__(self) -> None:
        self.domain = ""
        self.stage = 0
        self.request_type = 0  # 0 both, 1 internal only, 2 external only
        self.timeout = DEFAULT_TIMEOUT
        self.deny = False
        self.status = 429
        self.error_status = 500
        self.grpc_status = GRPC_UNAVAILABLE
        self.x_envoy_header = True
        self.x_ratelimit_headers = False
        self.response_headers: list[tuple[bytes, bytes]] = []
        self.enabled: tuple[int, int] = (1, 1)
        self.enforced: tuple[int, int] = (1, 1)
        self.filter_rate_limits: tuple[Any, ...] | None = None
        self.local_cluster = ""
        self.stat_prefix = ""
        self.target: str | None = None  # google_grpc.target_uri
        self.target_cluster = ""  # envoy_grpc.cluster_name
        self.cluster_manager: Any = None
        self.stats_store: Any = None
        self.rng = random.Random()
        self._cluster_stats: dict[str, tuple[Any, Any, Any, Any]] = {}
        self._channel: Any = None
        self._stub: Any = None
        self._pb: Any = None

    def __call__(self, stream: Any) -> RateLimitFilter:
        return RateLimitFilter(self)

    def sample(self, frac: tuple[int, int]) -> bool:
        num, den = frac
        return num >= den or (num > 0 and self.rng.randrange(den) < num)

    def stats(self, cluster: str | None) -> tuple[Any, Any, Any, Any] | None:
        """(ok, over_limit, error, failure_mode_allowed) of one route target cluster."""
        if cluster is None:
            return None
        s = self._cluster_stats.get(cluster)
        if s is None:
            if len(self._cluster_stats) >= MAX_CLUSTER_STATS:
                return None
            sc = self.stats_store.scope(f"cluster.{cluster}.ratelimit.{self.stat_prefix}")
            s = self._cluster_stats[cluster] = (
                sc.counter("ok"),
                sc.counter("over_limit"),
                sc.counter("error"),
                sc.counter("failure_mode_allowed"),
            )
        return s

    def _resolve(self) -> str | None:
        if self.target is not None:
            return self.target
        cm = self.cluster_manager
        c = cm.get(self.target_cluster) if cm is not None else None
        hosts = c.hosts if c is not None else ()
        if not hosts:
            return None
        h = hosts[0]
        if h.port is None:
            return f"unix:{h.address}"
        return f"[{h.address}]:{h.port}" if ":" in h.address else f"{h.address}:{h.port}"

    def start_call(self, domain: str, descs: list[Any]) -> Any:
        """Start one ShouldRateLimit call; the grpc.aio call object, or None when no target."""
        if self._stub is None:
            import grpc.aio
            from envoy.service.ratelimit.v3 import rls_pb2

            target = self._resolve()
            if target is None:
                return None
            self._pb = rls_pb2
            self._channel = grpc.aio.insecure_channel(target)
            self._stub = self._channel.unary_unary(
                METHOD,
                request_serializer=rls_pb2.RateLimitRequest.SerializeToString,
                response_deserializer=rls_pb2.RateLimitResponse.FromString,
            )
        pb = self._pb
        req = pb.RateLimitRequest(domain=domain)
        for d in descs:
            rd = req.descriptors.add()
            for k, v in d:
                e = rd.entries.add()
                e.key, e.value = k, v
        return self._stub(req, timeout=self.timeout)


def _x_ratelimit_headers(statuses: Any) -> list[tuple[bytes, bytes]]:
    """The draft-03 ``x-ratelimit-*`` headers from the descriptor statuses that carry a limit:
    the one with the least remaining gives the values, every one adds its quota policy."""
    with_limit = [s for s in statuses if s.HasField("current_limit")]
    if not with_limit:
        return []
    tightest = min(with_limit, key=lambda s: s.limit_remaining)
    policies = []
    for s in with_limit:
        cl = s.current_limit
        p = f"{cl.requests_per_unit};w={_UNIT_SECONDS.get(cl.unit, 0)}"
        if cl.name:
            p += f';name="{cl.name}"'
        policies.append(p)
    limit = f"{tightest.current_limit.requests_per_unit}, " + ", ".join(policies)
    out = [
        (b"x-ratelimit-limit", limit.encode()),
        (b"x-ratelimit-remaining", b"%d" % tightest.limit_remaining),
    ]
    if tightest.HasField("duration_until_reset"):
        out.append((b"x-ratelimit-reset", b"%d" % tightest.duration_until_reset.seconds))
    return out


_BAD_HEADER_BYTES = re.compile(rb"[\x00\r\n]")


def _header(h: Any) -> tuple[bytes, bytes]:
    """A header the service asked for, as bytes; ValueError for one that would break the framing
    (CR, LF, NUL) or is not latin-1 (the caller treats the answer as the service's error)."""
    k, v = h.key.lower().encode("latin-1"), h.value.encode("latin-1")
    if not k or _BAD_HEADER_BYTES.search(k) or _BAD_HEADER_BYTES.search(v) or b":" in k[1:]:
        raise ValueError("bad header from the rate limit service")
    return k, v


class RateLimitFilter(HttpFilter):
    __slots__ = ("call", "cfg", "cluster", "headers", "resp_headers", "state")

    def __init__(self, cfg: RateLimitConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.call: Any = None
        self.headers: RequestHeaders | None = None
        self.cluster: str | None = None
        self.resp_headers: list[tuple[bytes, bytes]] | None = None
        self.state = 0  # 0 idle, 1 waiting for the service, 2 done, 3 destroyed

    def decode_headers(self, headers: RequestHeaders, end_stream: bool) -> int:
        cfg = self.cfg
        if cfg.request_type:
            internal = headers.get(H_INTERNAL) == b"true"
            if internal != (cfg.request_type == 1):
                return CONTINUE
        cb = self.callbacks
        assert cb is not None
        route = cb.matched_route()
        if route is None or not cfg.sample(cfg.enabled):
            return CONTINUE
        per = cb.route_config(NAME)
        entries = cfg.filter_rate_limits
        vh_option = VH_OVERRIDE
        domain = cfg.domain
        if per is not None:
            vh_option = per.vh_option
            if per.domain:
                domain = per.domain
        if entries is None:
            entries = route.rate_limits
            if per is not None and per.rate_limits is not None:
                entries = per.rate_limits
            vh = route.vhost
            if route.include_vh_rate_limits or vh_option == VH_INCLUDE:
                entries = entries + vh.rate_limits
            elif vh_option == VH_OVERRIDE and not entries:
                entries = vh.rate_limits
        if not entries:
            return CONTINUE
        cluster = route.cluster
        if cluster is None and route.cluster_header is not None:
            v = headers.get(route.cluster_header)
            cluster = v.decode("latin-1") if v else None
        self.cluster = cluster
        remote = None
        down = cb.stream_info.downstream
        if down is not None and isinstance(down.remote, tuple):
            remote = str(down.remote[0])
        descs = descriptors(entries, cfg.stage, headers, Facts(cluster, remote, cfg.local_cluster))
        if not descs:
            return CONTINUE
        self.headers = headers
        try:
            call = cfg.start_call(domain, descs)
        except Exception:
            call = None
        if call is None:
            return self._error(sync=True)
        self.call = call
        self.state = 1
        fut = getattr(call, "_call_response", None)
        if fut is None or not hasattr(fut, "add_done_callback"):
            import asyncio

            fut = asyncio.ensure_future(call)
        fut.add_done_callback(self._on_done)
        return STOP_ALL_ITERATION_AND_BUFFER

    def _on_done(self, fut: Any) -> None:
        if self.state != 1:
            return
        self.state = 2
        self.call = None
        res = None
        if not fut.cancelled() and fut.exception() is None:
            res = fut.result()
        if res is None or not isinstance(res, self.cfg._pb.RateLimitResponse):
            self._error(sync=False)
            return
        try:
            self._decide(res)
        except Exception:
            # A stream must never be left waiting: a bad answer (a header value that is not
            # latin-1, say) is the service's error.
            self._error(sync=False)

    def _decide(self, res: Any) -> None:
        cfg = self.cfg
        cb = self.callbacks
        assert cb is not None
        st = cfg.stats(self.cluster)
        resp = [_header(h) for h in res.response_headers_to_add]
        if cfg.x_ratelimit_headers:
            resp.extend(_x_ratelimit_headers(res.statuses))
        if res.overall_code == res.OVER_LIMIT:
            if st is not None:
                st[1].value += 1
            if cfg.sample(cfg.enforced):
                extra = resp + cfg.response_headers
                if cfg.x_envoy_header:
                    extra.append((H_RATELIMITED, b"true"))
                cb.send_local_reply(
                    cfg.status,
                    b"",
                    RATE_LIMITED,
                    "request_rate_limited",
                    grpc_status=cfg.grpc_status,
                    extra=extra,
                )
                return
        elif st is not None:
            st[0].value += 1
        if len(res.request_headers_to_add) and self.headers is not None:
            for k, v in [_header(h) for h in res.request_headers_to_add]:
                self.headers.set(k, v)
        self.resp_headers = resp or None
        self.headers = None
        cb.continue_decoding()

    def _error(self, sync: bool) -> int:
        cfg = self.cfg
        cb = self.callbacks
        assert cb is not None
        self.headers = None
        st = cfg.stats(self.cluster)
        if st is not None:
            st[2].value += 1
        if cfg.deny:
            cb.send_local_reply(cfg.error_status, b"", RATE_LIMIT_SERVICE_ERROR, "rate_limiter_error")
            return STOP_ALL_ITERATION_AND_BUFFER
        if st is not None:
            st[3].value += 1
        if not sync:
            cb.continue_decoding()
        return CONTINUE

    def encode_headers(self, headers: ResponseHeaders, end_stream: bool) -> int:
        if self.resp_headers is not None:
            for k, v in self.resp_headers:
                headers.add(k, v)
        return CONTINUE

    def on_destroy(self) -> None:
        if self.state == 1 and self.call is not None:
            self.call.cancel()
        self.state = 3
        self.call = None
        self.headers = None


def _frac(msg: Any) -> tuple[int, int]:
    dv = msg.default_value
    den = (100, 10000, 1000000)[dv.denominator] if dv.denominator in (0, 1, 2) else 100
    return (int(dv.numerator), den)


def _per_route(msg: Any, path: str) -> _PerRoute:
    notes: list[str] = []
    rls = None
    if len(msg.rate_limits):
        rls = compile_rate_limits(msg.rate_limits, f"{path}.rate_limits", notes, HeaderMatcher)
    if notes:
        raise ConfigError(notes[0].split(":")[0], notes[0].split(": ", 1)[-1])
    if msg.override_option:
        raise ConfigError(f"{path}.override_option", "dynamic metadata overrides are not supported")
    return _PerRoute(int(msg.vh_rate_limits), rls, msg.domain or None)


def _factory(cfg: Any, ctx: Any, path: str) -> RateLimitConfig:
    tp = f"{path}.typed_config"
    if cfg is None:
        raise ConfigError(tp, "typed_config is required")
    c = RateLimitConfig()
    if not cfg.domain:
        raise ConfigError(f"{tp}.domain", "domain is required")
    c.domain = cfg.domain
    c.stage = int(cfg.stage)
    if c.stage > 10:
        raise ConfigError(f"{tp}.stage", "must be at most 10")
    rt = cfg.request_type or "both"
    if rt not in ("both", "internal", "external"):
        raise ConfigError(f"{tp}.request_type", "must be internal, external or both")
    c.request_type = {"both": 0, "internal": 1, "external": 2}[rt]
    if cfg.HasField("timeout"):
        c.timeout = cfg.timeout.seconds + cfg.timeout.nanos / 1e9
        if c.timeout <= 0:
            raise ConfigError(f"{tp}.timeout", "must be greater than 0")
    c.deny = bool(cfg.failure_mode_deny)
    if cfg.rate_limited_as_resource_exhausted:
        c.grpc_status = GRPC_RESOURCE_EXHAUSTED
    if cfg.HasField("rate_limited_status") and cfg.rate_limited_status.code >= 400:
        c.status = int(cfg.rate_limited_status.code)
    if cfg.HasField("status_on_error") and cfg.status_on_error.code:
        c.error_status = int(cfg.status_on_error.code)
        if not 200 <= c.error_status <= 599:
            raise ConfigError(f"{tp}.status_on_error.code", "must be an HTTP status between 200 and 599")
    c.x_envoy_header = not cfg.disable_x_envoy_ratelimited_header
    c.x_ratelimit_headers = cfg.enable_x_ratelimit_headers == 1
    for i, hv in enumerate(cfg.response_headers_to_add):
        if not hv.header.key:
            raise ConfigError(f"{tp}.response_headers_to_add[{i}].header.key", "key is required")
        c.response_headers.append(
            (hv.header.key.lower().encode("latin-1"), hv.header.value.encode("latin-1"))
        )
    if cfg.HasField("filter_enabled"):
        c.enabled = _frac(cfg.filter_enabled)
    if cfg.HasField("filter_enforced"):
        c.enforced = _frac(cfg.filter_enforced)
    if cfg.HasField("failure_mode_deny_percent"):
        ctx.notice(f"{tp}.failure_mode_deny_percent: no runtime; failure_mode_deny decides alone")
    if len(cfg.rate_limits):
        notes: list[str] = []
        c.filter_rate_limits = compile_rate_limits(cfg.rate_limits, f"{tp}.rate_limits", notes, HeaderMatcher)
        for n in notes:
            ctx.notice(n)
    c.stat_prefix = f"{cfg.stat_prefix}." if cfg.stat_prefix else ""
    if not cfg.HasField("rate_limit_service"):
        raise ConfigError(f"{tp}.rate_limit_service", "rate_limit_service is required")
    gs = cfg.rate_limit_service.grpc_service
    gp = f"{tp}.rate_limit_service.grpc_service"
    which = gs.WhichOneof("target_specifier")
    if which == "google_grpc":
        if not gs.google_grpc.target_uri:
            raise ConfigError(f"{gp}.google_grpc.target_uri", "target_uri is required")
        c.target = gs.google_grpc.target_uri
    elif which == "envoy_grpc":
        name = gs.envoy_grpc.cluster_name
        if not name:
            raise ConfigError(f"{gp}.envoy_grpc.cluster_name", "cluster_name is required")
        cm = ctx.cluster_manager
        if cm is not None and name not in cm:
            raise ConfigError(f"{gp}.envoy_grpc.cluster_name", f"no cluster named {name!r}")
        c.target_cluster = name
        c.cluster_manager = cm
    else:
        raise ConfigError(gp, "a grpc_service (envoy_grpc or google_grpc) is required")
    server = ctx.server
    boot = getattr(server, "bootstrap", None)
    c.local_cluster = boot.node.cluster if boot is not None else ""
    c.stats_store = ctx.stats
    return c


registry.register(
    "http",
    [NAME, "envoy.rate_limit"],
    ["type.googleapis.com/" + TYPE],
    _factory,
    per_route=_per_route,
    per_route_types=["type.googleapis.com/" + PER_ROUTE_TYPE],
)
