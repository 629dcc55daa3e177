"""``envoy.filters.network.local_ratelimit``: at most so many new connections per fill interval.

A non-terminal network filter (``moorline.net.api.ConnectionFilter``): each new connection of
the chain takes one token of the filter's bucket (``token_bucket``, refilled when used from the
event loop's clock); without one the connection is closed and counted in
``<stat_prefix>.local_rate_limit.rate_limited``. ``runtime_enabled`` is its default value
(moorline has no runtime; unset: on). ``share_key`` (buckets shared between filters of one
key) is a notice: each filter keeps its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from moorline.config import registry
from moorline.config.errors import ConfigError
from moorline.filters.token_bucket import BucketSpec, TokenBucket, compile_bucket

log = logging.getLogger("moorline.local_ratelimit")

NAME = "envoy.filters.network.local_ratelimit"
TYPE = "envoy.extensions.filters.network.local_ratelimit.v3.LocalRateLimit"


def _loop_clock() -> float:
    return asyncio.get_running_loop().time()


class NetworkLocalRateLimit:
    """One per filter chain: its bucket is shared by every connection of the chain."""

    terminal = False

    __slots__ = ("bucket", "clock", "enabled", "rate_limited", "spec")

    def __init__(self, spec: BucketSpec, enabled: bool, rate_limited: Any) -> None:
        self.spec = spec
        self.enabled = enabled
        self.rate_limited = rate_limited
        self.bucket: TokenBucket | None = None  # made on the first connection (the loop's clock)
        self.clock: Callable[[], float] = _loop_clock

    def on_new_connection(self, info: Any) -> bool:
        if not self.enabled:
            return True
        now = self.clock()
        b = self.bucket
        if b is None:
            b = self.bucket = self.spec.new(now)
        if b.consume(now):
            return True
        self.rate_limited.value += 1
        log.debug("connection %s closed: local rate limit", info)
        return False


def _factory(cfg: Any, ctx: Any, path: str) -> NetworkLocalRateLimit:
    cpath = f"{path}.typed_config"
    if cfg is None:
        raise ConfigError(cpath, "typed_config is required")
    got = getattr(getattr(cfg, "DESCRIPTOR", None), "full_name", None)
    if got != TYPE:
        raise ConfigError(cpath, f"expected {TYPE}, got {got or type(cfg).__name__}")
    if not cfg.stat_prefix:
        raise ConfigError(f"{cpath}.stat_prefix", "stat_prefix is required")
    if not cfg.HasField("token_bucket"):
        raise ConfigError(f"{cpath}.token_bucket", "token_bucket is required")
    spec = compile_bucket(cfg.token_bucket, f"{cpath}.token_bucket")
    enabled = True
    if cfg.HasField("runtime_enabled"):
        enabled = (
            cfg.runtime_enabled.default_value.value if cfg.runtime_enabled.HasField("default_value") else True
        )
    if cfg.share_key:
        ctx.notice(f"{cpath}.share_key: buckets are not shared between filters; each keeps its own; ignored")
    counter = ctx.stats.scope(f"{cfg.stat_prefix}.local_rate_limit.").counter("rate_limited")
    return NetworkLocalRateLimit(spec, enabled, counter)


registry.register("network", [NAME], ["type.googleapis.com/" + TYPE], _factory)
