"""``envoy.filters.http.rbac``: allow or deny requests by policy (what Istio's AuthorizationPolicy
compiles to).

The request headers are checked once: ``shadow_rules`` first (counted as ``shadow_allowed`` /
``shadow_denied``, never enforced), then ``rules``. A denied request is answered 403
``RBAC: access denied`` with response code details ``rbac_access_denied_matched_policy[<policy>]``
(``[none]`` when an ALLOW config matched nothing) and never reaches the upstream. Stats live in
the connection manager's namespace: ``http.<stat_prefix>.rbac.<rules_stat_prefix>allowed`` /
``denied`` and ``http.<stat_prefix>.rbac.<shadow_rules_stat_prefix>shadow_allowed`` /
``shadow_denied``. A config without ``rules`` enforces nothing and counts nothing but its shadow.

``RBACPerRoute`` replaces both engines for a route (its ``rbac``; without one the filter is off
there); the stats stay the filter's. The policy engine is ``moorline.filters.rbac_engine``.
"""

from __future__ import annotations

from typing import Any

from moorline.config import registry
from moorline.config.errors import ConfigError
from moorline.filters.rbac_engine import Engine, Facts, RbacStats, compile_pair, denied_details
from moorline.protocol.headers import RequestHeaders
from moorline.proxy.filter import CONTINUE, STOP_ITERATION, HttpFilter

NAME = "envoy.filters.http.rbac"
TYPE = "envoy.extensions.filters.http.rbac.v3.RBAC"
PER_ROUTE_TYPE = "envoy.extensions.filters.http.rbac.v3.RBACPerRoute"
DENIED_BODY = b"RBAC: access denied"


class _Engines:
    """The enforced and shadow engines of one config (the filter's, or a route's)."""

    __slots__ = ("rules", "shadow")

    def __init__(self, rules: Engine | None, shadow: Engine | None) -> None:
        self.rules = rules
        self.shadow = shadow


class _Config:
    __slots__ = ("engines", "stats")

    def __init__(self, engines: _Engines, stats: RbacStats) -> None:
        self.engines = engines
        self.stats = stats


class RbacFilter(HttpFilter):
    __slots__ = ("cfg",)

    def __init__(self, cfg: _Config) -> None:
        super().__init__()
        self.cfg = cfg

    def decode_headers(self, headers: RequestHeaders, end_stream: bool) -> int:
        cb = self.callbacks
        assert cb is not None
        engines = self.cfg.engines
        override = cb.route_config(NAME)
        if override is not None:
            engines = override
        rules, shadow = engines.rules, engines.shadow
        if rules is None and shadow is None:
            return CONTINUE
        facts = Facts(cb.stream_info.downstream, headers)
        st = self.cfg.stats
        if shadow is not None:
            ok, _ = shadow.evaluate(facts)
            if ok:
                st.shadow_allowed.value += 1
            else:
                st.shadow_denied.value += 1
        if rules is None:
            return CONTINUE
        ok, policy = rules.evaluate(facts)
        if ok:
            st.allowed.value += 1
            return CONTINUE
        st.denied.value += 1
        cb.send_local_reply(403, DENIED_BODY, None, denied_details(policy))
        return STOP_ITERATION


def _check_type(cfg: Any, expected: str, path: str) -> None:
    got = getattr(getattr(cfg, "DESCRIPTOR", None), "full_name", None)
    if got != expected:
        raise ConfigError(path, f"expected {expected}, got {got or type(cfg).__name__}")


def _notifier(ctx: Any) -> Any:
    return lambda path, why: ctx.notice(why, path=path)


def _factory(cfg: Any, ctx: Any, path: str, stat_prefix: str = "") -> Any:
    cpath = f"{path}.typed_config"
    if cfg is None:
        raise ConfigError(cpath, "typed_config is required")
    _check_type(cfg, TYPE, cpath)
    rules, shadow = compile_pair(cfg, cpath, _notifier(ctx), http=True)
    if cfg.track_per_rule_stats:
        ctx.notice(f"{cpath}.track_per_rule_stats: per-policy stats are not kept; ignored")
    stats = RbacStats(ctx.stats, stat_prefix, cfg.rules_stat_prefix, cfg.shadow_rules_stat_prefix)
    c = _Config(_Engines(rules, shadow), stats)
    return lambda stream: RbacFilter(c)


def _raise_notice(path: str, why: str) -> None:
    # A per-route config is compiled with the route table, which has no notice channel for
    # filters: what the filter's own config would announce is refused here instead.
    raise ConfigError(path, f"{why} (not accepted in RBACPerRoute)")


def _per_route(msg: Any, path: str) -> _Engines:
    _check_type(msg, PER_ROUTE_TYPE, path)
    if not msg.HasField("rbac"):
        return _Engines(None, None)  # Envoy: no rbac disables the filter on this route
    rbac = msg.rbac
    if rbac.track_per_rule_stats or rbac.rules_stat_prefix or rbac.shadow_rules_stat_prefix:
        raise ConfigError(f"{path}.rbac", "stat prefixes and per-rule stats are the filter's, not a route's")
    rules, shadow = compile_pair(rbac, f"{path}.rbac", _raise_notice, http=True)
    return _Engines(rules, shadow)


registry.register(
    "http",
    [NAME],
    ["type.googleapis.com/" + TYPE],
    _factory,
    per_route=_per_route,
    per_route_types=["type.googleapis.com/" + PER_ROUTE_TYPE],
    wants_stat_prefix=True,
)
