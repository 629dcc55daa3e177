"""``envoy.filters.http.cors``: Cross-Origin Resource Sharing as Envoy's CORS filter does it.

The filter config (``envoy.extensions.filters.http.cors.v3.Cors``) has no fields: the policy
comes from the matched route. Its sources, compiled once with the route table:

- ``typed_per_filter_config["envoy.filters.http.cors"]`` holding a ``...cors.v3.CorsPolicy``
  on the route, its virtual host or the route configuration; the levels are folded field by
  field, the most specific level that sets a field wins (``_merge``);
- without one, the deprecated ``cors`` field of the virtual host and of the route action
  (``envoy.config.route.v3.CorsPolicy``, the route's fields over its virtual host's).

Only routes that forward (``route`` action) are served; redirects and direct responses bypass
the filter, as in Envoy. A route without a policy costs nothing: a route table with no policy
leaves the filter out of the chain (``wanted``), and the factory is route-gated (``route_gate``),
so when every filter of a listener is, a stream whose route has no policy runs the router's fast
path with no filter manager at all.

Per request, with a policy:

- ``filter_enabled`` / ``shadow_enabled`` (runtime fractional percents; moorline has no
  runtime, so their ``default_value`` is the fraction) decide whether the filter runs and
  whether it only counts (shadow: origin checked and counted, nothing enforced). Without
  ``filter_enabled`` the filter is on for every request; it takes precedence over shadow.
- A request without ``Origin`` is not a CORS request. The origin is checked against
  ``allow_origin_string_match`` (a matcher that matches ``*`` allows every origin); stats
  ``http.<stat_prefix>.cors.origin_valid`` / ``origin_invalid``.
- A preflight (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``) from an
  allowed origin is answered here with 200 and ``access-control-allow-origin`` (the request's
  origin), ``-allow-credentials: true`` (``allow_credentials``), ``-allow-methods``,
  ``-allow-headers``, ``-max-age`` (as configured) and ``-allow-private-network: true``
  (``allow_private_network_access`` and a request carrying
  ``access-control-request-private-network: true``). A preflight from another origin goes to
  the upstream when ``forward_not_matching_preflights`` (default true), else it is answered
  200 without CORS headers.
- Any other request from an allowed origin goes on; its response gets
  ``access-control-allow-origin``, ``-allow-credentials`` and ``-expose-headers``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from moorline.config import registry
from moorline.config.errors import ConfigError
from moorline.config.matchers import StringMatcher
from moorline.protocol.headers import RequestHeaders, ResponseHeaders
from moorline.proxy.filter import CONTINUE, STOP_ITERATION, HttpFilter
from moorline.proxy.route_table import ROUTE

NAME = "envoy.filters.http.cors"
TYPE = "envoy.extensions.filters.http.cors.v3.Cors"
PER_ROUTE_TYPE = "envoy.extensions.filters.http.cors.v3.CorsPolicy"
LEGACY_TYPE = "envoy.config.route.v3.CorsPolicy"  # the route / virtual host ``cors`` field

_DENOMINATORS = (100, 10_000, 1_000_000)  # FractionalPercent.DenominatorType: HUNDRED, ...
_STAR = b"*"


@dataclass(frozen=True, slots=True)
class CorsPolicy:
    """One level's policy as configured: ``None`` is "not set here" (``_merge`` looks further)."""

    origins: tuple[StringMatcher, ...] | None = None
    allow_methods: bytes | None = None
    allow_headers: bytes | None = None
    expose_headers: bytes | None = None
    max_age: bytes | None = None
    allow_credentials: bool | None = None
    allow_private_network_access: bool | None = None
    forward_not_matching_preflights: bool | None = None
    enabled: float | None = None  # fraction of requests, from filter_enabled.default_value
    shadow: float | None = None  # fraction of requests, from shadow_enabled.default_value


def _merge(less: CorsPolicy, more: CorsPolicy) -> CorsPolicy:
    """Field by field, the more specific level's value when it sets one. ``filter_enabled`` and
    ``shadow_enabled`` come from the most specific policy only (Envoy asks the first policy)."""
    return CorsPolicy(
        origins=more.origins if more.origins else less.origins,
        allow_methods=more.allow_methods if more.allow_methods is not None else less.allow_methods,
        allow_headers=more.allow_headers if more.allow_headers is not None else less.allow_headers,
        expose_headers=more.expose_headers if more.expose_headers is not None else less.expose_headers,
        max_age=more.max_age if more.max_age is not None else less.max_age,
        allow_credentials=_first(more.allow_credentials, less.allow_credentials),
        allow_private_network_access=_first(
            more.allow_private_network_access, less.allow_private_network_access
        ),
        forward_not_matching_preflights=_first(
            more.forward_not_matching_preflights, less.forward_not_matching_preflights
        ),
        enabled=more.enabled,
        shadow=more.shadow,
    )


def _first(a: bool | None, b: bool | None) -> bool | None:
    return a if a is not None else b


def _fraction(rfp: Any, path: str) -> float:
    dv = rfp.default_value
    den = int(dv.denominator)
    if den >= len(_DENOMINATORS):
        raise ConfigError(f"{path}.default_value.denominator", f"unknown denominator {den}")
    return min(1.0, dv.numerator / _DENOMINATORS[den])


def _opt_str(msg: Any, field: str) -> bytes | None:
    v = getattr(msg, field)
    return v.encode("latin-1", "replace") if v else None


def _opt_bool(msg: Any, field: str) -> bool | None:
    return bool(getattr(msg, field).value) if msg.HasField(field) else None


def compile_policy(msg: Any, path: str) -> CorsPolicy:
    """A ``CorsPolicy`` (either type: the filter's per-route one or the route's legacy field)."""
    origins = tuple(
        StringMatcher.compile(m, f"{path}.allow_origin_string_match[{i}]")
        for i, m in enumerate(msg.allow_origin_string_match)
    )
    for field in ("allow_methods", "allow_headers", "expose_headers", "max_age"):
        v = getattr(msg, field)
        if any(c in v for c in "\r\n\0"):
            raise ConfigError(f"{path}.{field}", "must not contain CR, LF or NUL")
    return CorsPolicy(
        origins=origins or None,
        allow_methods=_opt_str(msg, "allow_methods"),
        allow_headers=_opt_str(msg, "allow_headers"),
        expose_headers=_opt_str(msg, "expose_headers"),
        max_age=_opt_str(msg, "max_age"),
        allow_credentials=_opt_bool(msg, "allow_credentials"),
        allow_private_network_access=_opt_bool(msg, "allow_private_network_access"),
        forward_not_matching_preflights=_opt_bool(msg, "forward_not_matching_preflights"),
        enabled=_fraction(msg.filter_enabled, f"{path}.filter_enabled")
        if msg.HasField("filter_enabled")
        else None,
        shadow=_fraction(msg.shadow_enabled, f"{path}.shadow_enabled")
        if msg.HasField("shadow_enabled")
        else None,
    )


class CorsStats:
    __slots__ = ("origin_invalid", "origin_valid")

    def __init__(self, scope: Any) -> None:
        self.origin_valid = scope.counter("origin_valid")
        self.origin_invalid = scope.counter("origin_invalid")


def _origin_allowed(p: CorsPolicy, origin: bytes) -> bool:
    for m in p.origins or ():
        if m.match(_STAR) or m.match(origin):
            return True
    return False


def _on(fraction: float | None, default: bool, rand: Any) -> bool:
    if fraction is None:
        return default
    return fraction >= 1.0 or (fraction > 0.0 and rand() < fraction)


class CorsFilter(HttpFilter):
    __slots__ = ("origin", "policy", "rand", "stats")

    def __init__(self, stats: CorsStats, rand: Any) -> None:
        super().__init__()
        self.stats = stats
        self.rand = rand
        self.policy: CorsPolicy | None = None
        self.origin: bytes | None = None  # set: a CORS request whose response gets the headers

    def decode_headers(self, headers: RequestHeaders, end_stream: bool) -> int:
        cb = self.callbacks
        assert cb is not None
        route = cb.matched_route()
        if route is None or route.kind != ROUTE:  # redirects and direct responses bypass CORS
            return CONTINUE
        p = cb.route_config(NAME)
        if p is None:
            return CONTINUE
        enabled = _on(p.enabled, True, self.rand)
        if not enabled and not _on(p.shadow, False, self.rand):
            return CONTINUE
        origin = headers.get(b"origin")
        if not origin:
            return CONTINUE
        preflight = headers.method == b"OPTIONS" and bool(headers.get(b"access-control-request-method"))
        if not _origin_allowed(p, origin):
            self.stats.origin_invalid.value += 1
            if preflight and enabled and p.forward_not_matching_preflights is False:
                cb.send_local_reply(200, b"", None, "cors_response")
                return STOP_ITERATION
            return CONTINUE
        self.stats.origin_valid.value += 1
        if not enabled:  # shadow mode: counted, not enforced
            return CONTINUE
        if not preflight:
            self.policy = p
            self.origin = origin
            return CONTINUE
        extra = [(b"access-control-allow-origin", origin)]
        if p.allow_credentials:
            extra.append((b"access-control-allow-credentials", b"true"))
        if p.allow_methods is not None:
            extra.append((b"access-control-allow-methods", p.allow_methods))
        if p.allow_headers is not None:
            extra.append((b"access-control-allow-headers", p.allow_headers))
        if p.max_age is not None:
            extra.append((b"access-control-max-age", p.max_age))
        if (
            p.allow_private_network_access
            and headers.get(b"access-control-request-private-network") == b"true"
        ):
            extra.append((b"access-control-allow-private-network", b"true"))
        cb.send_local_reply(200, b"", None, "cors_response", extra=extra)
        return STOP_ITERATION

    def encode_headers(self, headers: ResponseHeaders, end_stream: bool) -> int:
        origin = self.origin
        if origin is None:
            return CONTINUE
        p = self.policy
        assert p is not None
        headers.set(b"access-control-allow-origin", origin)
        if p.allow_credentials:
            headers.set(b"access-control-allow-credentials", b"true")
        if p.expose_headers is not None:
            headers.set(b"access-control-expose-headers", p.expose_headers)
        return CONTINUE


class _Factory:
    """Makes one ``CorsFilter`` per stream. The filter acts only where a route has a policy:
    ``wanted(table)`` leaves it out of the chain of a route table with none, and ``route_gate``
    lets the connection manager skip it for a stream whose route has none."""

    __slots__ = ("rand", "stats")
    route_gate = NAME

    def __init__(self, stats: CorsStats) -> None:
        self.stats = stats
        self.rand = random.random

    def wanted(self, table: Any) -> bool:
        return any(NAME in r.filter_configs for vh in table.virtual_hosts for r in vh.routes)

    def __call__(self, stream: Any) -> CorsFilter:
        return CorsFilter(self.stats, self.rand)


def _factory(cfg: Any, ctx: Any, path: str, stat_prefix: str = "http.") -> _Factory:
    return _Factory(CorsStats(ctx.stats.scope(f"{stat_prefix}cors.")))


registry.register(
    "http",
    [NAME, "envoy.cors"],
    ["type.googleapis.com/" + TYPE],
    _factory,
    per_route=compile_policy,
    per_route_types=["type.googleapis.com/" + PER_ROUTE_TYPE, "type.googleapis.com/" + LEGACY_TYPE],
    per_route_merge=_merge,
    wants_stat_prefix=True,
)
