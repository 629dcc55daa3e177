"""``envoy.filters.http.local_ratelimit``: a token bucket in this process, per request.

Per request, with a config that has a ``token_bucket`` (the filter's, or the matched route's
``typed_per_filter_config`` entry of the same type, which replaces it whole):

- ``filter_enabled`` (runtime fractional percent; moorline has no runtime, so its
  ``default_value`` is the fraction; unset is 0 %, as in Envoy: the filter does nothing) decides
  whether the request is looked at (``<stat_prefix>.http_local_rate_limit.enabled``).
- One token is taken from the bucket: the config's (shared by every connection), or, with
  ``local_rate_limit_per_downstream_connection``, one bucket per downstream connection kept on
  the connection (``ConnInfo.filter_state``). A token: ``ok``. None: ``rate_limited``, then
  ``filter_enforced`` (unset: 0 %) decides: enforced (``enforced``) the request is answered
  ``status`` (default 429; a code below 400 is 429 too) with body ``local_rate_limited``,
  details ``local_rate_limited``, flag ``RL`` and ``response_headers_to_add``; not enforced it
  goes on with ``request_headers_to_add_when_not_enforced``.
- ``enable_x_ratelimit_headers: DRAFT_VERSION_03`` adds ``x-ratelimit-limit`` (max tokens),
  ``x-ratelimit-remaining`` and ``x-ratelimit-reset`` (seconds to the next fill) to the response
  of every request the bucket was asked for, the local 429 included.

``descriptors``: the matched route's ``rate_limits`` (the virtual host's when the route has
none) whose ``stage`` is the config's produce request descriptors (``proxy.rate_limit_policy``).
The first request descriptor, in config order, whose entries equal a configured descriptor's
entries (same keys and values, same order: Envoy's "first full match") selects that
descriptor's own ``token_bucket`` instead of the default one; no match uses the default
bucket. The ``x-ratelimit-*`` headers describe the bucket that was asked. A configured entry
with an empty value (Envoy's dynamic descriptors) is announced and that descriptor dropped.

Buckets refill when used, from the event loop's clock (``token_bucket``): no timer per bucket.
A filter config without a bucket and no route carrying one leaves the filter out of the chain.
Not implemented (notices): ``local_cluster_rate_limit``, ``vh_rate_limits``, ``rate_limits``,
``max_dynamic_descriptors``, ``rate_limited_as_resource_exhausted``. A per-route config refuses them instead (``ConfigError``):
the route table has no notice channel.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

from moorline.config import registry
from moorline.config.errors import ConfigError
from moorline.filters.token_bucket import BucketSpec, TokenBucket, compile_bucket
from moorline.observability.stats import Counter, Store
from moorline.protocol.headers import RequestHeaders, ResponseHeaders
from moorline.proxy.filter import CONTINUE, STOP_ITERATION, HttpFilter
from moorline.proxy.rate_limit_policy import Descriptor, Facts, descriptors

NAME = "envoy.filters.http.local_ratelimit"
TYPE = "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"
BODY = b"local_rate_limited"
DETAILS = "local_rate_limited"
FLAG = "RL"  # RateLimited
_DRAFT_VERSION_03 = 1
MAX_CONN_BUCKETS = 16  # per downstream connection (ConnInfo.filter_state)
_DENOMINATORS = {0: 100, 1: 10_000, 2: 1_000_000}
_APPEND_IF_EXISTS_OR_ADD = 0
_OVERWRITE_IF_EXISTS_OR_ADD = 2

# config fields accepted but not acted on -> why (filter level: notice; route level: ConfigError)
_UNSUPPORTED = {
    "local_cluster_rate_limit": "sharing the limit across the local cluster is not implemented",
    "vh_rate_limits": "virtual host rate_limits are not read by this filter",
    "rate_limits": "rate_limits actions are not implemented",
    "rate_limited_as_resource_exhausted": "a rate-limited gRPC request gets the HTTP status's gRPC code",
}


class _Stats:
    __slots__ = ("enabled", "enforced", "ok", "rate_limited")

    def __init__(self, store: Store, prefix: str) -> None:
        scope = store.scope(f"{prefix}.http_local_rate_limit.")
        self.enabled: Counter = scope.counter("enabled")
        self.enforced: Counter = scope.counter("enforced")
        self.rate_limited: Counter = scope.counter("rate_limited")
        self.ok: Counter = scope.counter("ok")


class _Desc:
    """One configured descriptor: its bucket spec and its shared bucket (made on first use)."""

    __slots__ = ("bucket", "spec")

    def __init__(self, spec: BucketSpec) -> None:
        self.spec = spec
        self.bucket: TokenBucket | None = None


class _Limit:
    """One compiled ``LocalRateLimit`` (the filter's or a route's) with its shared bucket."""

    __slots__ = (
        "add_when_not_enforced",
        "bucket",
        "descriptors",
        "enabled",
        "enforced",
        "per_connection",
        "response_headers",
        "spec",
        "stage",
        "stat_prefix",
        "status",
        "x_headers",
    )

    def __init__(self) -> None:
        self.spec: BucketSpec | None = None
        self.bucket: TokenBucket | None = None  # made on first use (the loop's clock then)
        self.enabled = 0.0
        self.enforced = 0.0
        self.per_connection = False
        self.status = 429
        self.response_headers: list[tuple[bytes, bytes]] = []
        self.add_when_not_enforced: list[tuple[bytes, bytes, bool]] = []  # (name, value, append)
        self.x_headers = False
        self.stat_prefix = ""
        self.stage = 0
        # entries -> descriptor; empty when none configured (then no per-request lookup)
        self.descriptors: dict[Descriptor, _Desc] = {}


class _Shared:
    """What every filter instance of one configured filter shares."""

    __slots__ = ("clock", "limit", "rand", "route_stats", "stats", "store")

    def __init__(
        self, limit: _Limit, store: Store, clock: Callable[[], float], rand: Callable[[], float]
    ) -> None:
        self.limit = limit
        self.store = store
        self.clock = clock
        self.rand = rand
        self.stats = _Stats(store, limit.stat_prefix)
        # a route's stat_prefix -> its stats; bounded by the route configs' distinct prefixes
        self.route_stats: dict[str, _Stats] = {}

    def stats_for(self, limit: _Limit) -> _Stats:
        if limit is self.limit:
            return self.stats
        st = self.route_stats.get(limit.stat_prefix)
        if st is None:
            st = self.route_stats[limit.stat_prefix] = _Stats(self.store, limit.stat_prefix)
        return st


class LocalRateLimitFilter(HttpFilter):
    __slots__ = ("bucket", "shared")

    def __init__(self, shared: _Shared) -> None:
        super().__init__()
        self.shared = shared
        self.bucket: TokenBucket | None = None  # asked for this request, with x-ratelimit headers

    def decode_headers(self, headers: RequestHeaders, end_stream: bool) -> int:
        cb = self.callbacks
        assert cb is not None
        sh = self.shared
        limit: _Limit = cb.route_config(NAME) or sh.limit
        spec = limit.spec
        holder: _Limit | _Desc = limit
        if limit.descriptors:
            desc = self._descriptor(limit, headers)
            if desc is not None:
                holder, spec = desc, desc.spec
        if spec is None or not _sample(limit.enabled, sh.rand):
            return CONTINUE
        st = sh.stats_for(limit)
        st.enabled.value += 1
        now = sh.clock()
        bucket: TokenBucket
        if limit.per_connection:
            bucket = conn_bucket(cb.stream_info.downstream, holder, spec, now)
        elif holder.bucket is not None:
            bucket = holder.bucket
        else:
            bucket = holder.bucket = spec.new(now)
        if limit.x_headers:
            self.bucket = bucket
        if bucket.consume(now):
            st.ok.value += 1
            return CONTINUE
        st.rate_limited.value += 1
        if not _sample(limit.enforced, sh.rand):
            for name, value, append in limit.add_when_not_enforced:
                if append:
                    headers.add(name, value)
                else:
                    headers.set(name, value)
            return CONTINUE
        st.enforced.value += 1
        cb.send_local_reply(limit.status, BODY, FLAG, DETAILS, extra=list(limit.response_headers))
        return STOP_ITERATION

    def _descriptor(self, limit: _Limit, headers: RequestHeaders) -> _Desc | None:
        """The configured descriptor the request's first fully matching descriptor selects."""
        cb = self.callbacks
        assert cb is not None
        route = cb.matched_route()
        if route is None:
            return None
        entries = route.rate_limits or route.vhost.rate_limits
        if not entries:
            return None
        remote = None
        down = cb.stream_info.downstream
        if down is not None and isinstance(down.remote, tuple):
            remote = str(down.remote[0])
        facts = Facts(route.cluster, remote, "")
        table = limit.descriptors
        for d in descriptors(entries, limit.stage, headers, facts):
            hit = table.get(d)
            if hit is not None:
                return hit
        return None

    def encode_headers(self, headers: ResponseHeaders, end_stream: bool) -> int:
        bucket = self.bucket
        if bucket is not None:
            now = self.shared.clock()
            headers.set(b"x-ratelimit-limit", str(bucket.spec.max_tokens).encode())
            headers.set(b"x-ratelimit-remaining", str(bucket.remaining(now)).encode())
            headers.set(b"x-ratelimit-reset", str(bucket.reset_seconds(now)).encode())
        return CONTINUE


def conn_bucket(conn: Any, limit: object, spec: BucketSpec, now: float) -> TokenBucket:
    """The connection's bucket for ``limit`` (a ``_Limit`` or one of its descriptors). A route table update compiles new limits, so a
    long-lived connection would collect one bucket per update: at most MAX_CONN_BUCKETS are
    kept, the oldest dropped (its config is most likely gone)."""
    state = conn.filter_state
    if state is None:
        state = conn.filter_state = {}
    bucket: TokenBucket | None = state.get(limit)
    if bucket is None:
        if len(state) >= MAX_CONN_BUCKETS:
            del state[next(iter(state))]
        bucket = state[limit] = spec.new(now)
    return bucket


def _sample(fraction: float, rand: Callable[[], float]) -> bool:
    if fraction >= 1.0:
        return True
    if fraction <= 0.0:
        return False
    return rand() < fraction


def _fraction(msg: Any, field: str) -> float:
    """A ``RuntimeFractionalPercent``'s default value; unset is 0 (Envoy's default here)."""
    if not msg.HasField(field):
        return 0.0
    dv = getattr(msg, field).default_value
    return min(1.0, dv.numerator / _DENOMINATORS.get(int(dv.denominator), 100))


def _header_options(opts: Any, path: str) -> list[tuple[bytes, bytes, bool]]:
    out = []
    for i, hvo in enumerate(opts):
        key = hvo.header.key.lower().encode()
        if not key or key.startswith(b":") or key == b"host":
            raise ConfigError(f"{path}[{i}].header.key", f"header {hvo.header.key!r} cannot be added")
        value = hvo.header.raw_value or hvo.header.value.encode()
        if hvo.HasField("append"):
            append = hvo.append.value
        else:
            append = int(hvo.append_action) == _APPEND_IF_EXISTS_OR_ADD
            if int(hvo.append_action) not in (_APPEND_IF_EXISTS_OR_ADD, _OVERWRITE_IF_EXISTS_OR_ADD):
                raise ConfigError(
                    f"{path}[{i}].append_action",
                    "only APPEND_IF_EXISTS_OR_ADD and OVERWRITE_IF_EXISTS_OR_ADD",
                )
        out.append((key, value, append))
    return out


def _check_type(cfg: Any, path: str) -> None:
    got = getattr(getattr(cfg, "DESCRIPTOR", None), "full_name", None)
    if got != TYPE:
        raise ConfigError(path, f"expected {TYPE}, got {got or type(cfg).__name__}")


def compile_limit(cfg: Any, path: str, notice: Callable[[str, str], None]) -> _Limit:
    """Compile one ``LocalRateLimit``; ``notice(field_path, why)`` is told of fields not acted on."""
    _check_type(cfg, path)
    if not cfg.stat_prefix:
        raise ConfigError(f"{path}.stat_prefix", "stat_prefix is required")
    lim = _Limit()
    lim.stat_prefix = cfg.stat_prefix
    if cfg.HasField("token_bucket"):
        lim.spec = compile_bucket(cfg.token_bucket, f"{path}.token_bucket")
    lim.enabled = _fraction(cfg, "filter_enabled")
    lim.enforced = _fraction(cfg, "filter_enforced")
    lim.per_connection = cfg.local_rate_limit_per_downstream_connection
    if cfg.HasField("status") and cfg.status.code >= 400:
        lim.status = int(cfg.status.code)
    lim.response_headers = [
        (k, v) for k, v, _ in _header_options(cfg.response_headers_to_add, f"{path}.response_headers_to_add")
    ]
    lim.add_when_not_enforced = _header_options(
        cfg.request_headers_to_add_when_not_enforced, f"{path}.request_headers_to_add_when_not_enforced"
    )
    lim.x_headers = int(cfg.enable_x_ratelimit_headers) == _DRAFT_VERSION_03
    present = {f.name for f, _ in cfg.ListFields()}
    for field, why in _UNSUPPORTED.items():
        if field in present:
            notice(f"{path}.{field}", why)
    lim.stage = int(cfg.stage)
    for i, d in enumerate(cfg.descriptors):
        p = f"{path}.descriptors[{i}]"
        if not len(d.entries):
            raise ConfigError(f"{p}.entries", "at least one entry is required")
        if not d.HasField("token_bucket"):
            raise ConfigError(f"{p}.token_bucket", "token_bucket is required")
        dspec = compile_bucket(d.token_bucket, f"{p}.token_bucket")
        key: Descriptor = tuple((e.key, e.value) for e in d.entries)
        if any(not k for k, _ in key):
            raise ConfigError(f"{p}.entries", "every entry needs a key")
        if any(not v for _, v in key):
            notice(f"{p}.entries", "an entry without a value (a dynamic descriptor) is not implemented")
            continue
        if key in lim.descriptors:
            raise ConfigError(f"{p}.entries", "duplicate descriptor")
        lim.descriptors[key] = _Desc(dspec)
    return lim


class _Factory:
    __slots__ = ("shared",)

    def __init__(self, shared: _Shared) -> None:
        self.shared = shared

    def wanted(self, table: Any) -> bool:
        if self.shared.limit.spec is not None and self.shared.limit.enabled > 0.0:
            return True
        return any(NAME in r.filter_configs for vh in table.virtual_hosts for r in vh.routes)

    def __call__(self, stream: Any) -> LocalRateLimitFilter:
        return LocalRateLimitFilter(self.shared)


def _loop_clock() -> float:
    return asyncio.get_running_loop().time()


def _factory(cfg: Any, ctx: Any, path: str) -> _Factory:
    cpath = f"{path}.typed_config"
    if cfg is None:
        raise ConfigError(cpath, "typed_config is required")
    limit = compile_limit(cfg, cpath, lambda p, why: ctx.notice(f"{p}: {why}; ignored"))
    return _Factory(_Shared(limit, ctx.stats, _loop_clock, random.random))


def _refuse(path: str, why: str) -> None:
    # A per-route config is compiled with the route table, which has no notice channel for
    # filters: what the filter's own config would announce is refused here instead.
    raise ConfigError(path, f"{why} (not accepted per route)")


def _per_route(msg: Any, path: str) -> _Limit:
    return compile_limit(msg, path, _refuse)


registry.register(
    "http",
    [NAME],
    ["type.googleapis.com/" + TYPE],
    _factory,
    per_route=_per_route,
    per_route_types=["type.googleapis.com/" + TYPE],
)
