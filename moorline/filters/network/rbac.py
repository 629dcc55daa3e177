"""``envoy.filters.network.rbac``: allow or refuse connections by policy.

A non-terminal network filter (``moorline.net.api.ConnectionFilter``): the chain's terminal
filter asks it once per connection, after the TLS handshake when the chain terminates TLS (the
peer certificate is known) and before a byte goes upstream. ``shadow_rules`` are evaluated and
counted (``<stat_prefix>.rbac.<shadow_rules_stat_prefix>shadow_allowed`` / ``shadow_denied``),
then ``rules`` decide (``<stat_prefix>.rbac.allowed`` / ``denied``); a refused connection is
closed (its details ``rbac_access_denied_matched_policy[<policy>]`` go to the debug log).
Header and path rules see no request on this filter: headers count as missing, paths never match.
"""

from __future__ import annotations

import logging
from typing import Any

from moorline.config import registry
from moorline.config.errors import ConfigError
from moorline.filters.rbac_engine import Engine, Facts, RbacStats, compile_pair, denied_details

log = logging.getLogger("moorline.rbac")

NAME = "envoy.filters.network.rbac"
TYPE = "envoy.extensions.filters.network.rbac.v3.RBAC"
_CONTINUOUS = 1


class NetworkRbac:
    """One per filter chain; ``on_new_connection(info)`` is the decision."""

    terminal = False

    __slots__ = ("rules", "shadow", "stats")

    def __init__(self, rules: Engine | None, shadow: Engine | None, stats: RbacStats) -> None:
        self.rules = rules
        self.shadow = shadow
        self.stats = stats

    def on_new_connection(self, info: Any) -> bool:
        facts = Facts(info)
        st = self.stats
        if self.shadow is not None:
            ok, _ = self.shadow.evaluate(facts)
            if ok:
                st.shadow_allowed.value += 1
            else:
                st.shadow_denied.value += 1
        if self.rules is None:
            return True
        ok, policy = self.rules.evaluate(facts)
        if ok:
            st.allowed.value += 1
            return True
        st.denied.value += 1
        log.debug("connection %s closed: %s", info, denied_details(policy))
        return False


def _notifier(ctx: Any) -> Any:
    return lambda path, why: ctx.notice(why, path=path)


def _factory(cfg: Any, ctx: Any, path: str) -> NetworkRbac:
    cpath = f"{path}.typed_config"
    if cfg is None:
        raise ConfigError(cpath, "typed_config is required")
    got = getattr(getattr(cfg, "DESCRIPTOR", None), "full_name", None)
    if got != TYPE:
        raise ConfigError(cpath, f"expected {TYPE}, got {got or type(cfg).__name__}")
    if not cfg.stat_prefix:
        raise ConfigError(f"{cpath}.stat_prefix", "stat_prefix is required")
    rules, shadow = compile_pair(cfg, cpath, _notifier(ctx), http=False)
    if cfg.enforcement_type == _CONTINUOUS:
        ctx.notice(
            f"{cpath}.enforcement_type: CONTINUOUS is evaluated once per connection "
            "(nothing a policy reads changes during a connection here)"
        )
    if cfg.HasField("delay_deny"):
        ctx.notice(f"{cpath}.delay_deny: refused connections are closed at once; ignored")
    stats = RbacStats(ctx.stats, cfg.stat_prefix, "", cfg.shadow_rules_stat_prefix)
    return NetworkRbac(rules, shadow, stats)


registry.register("network", [NAME], ["type.googleapis.com/" + TYPE], _factory)
