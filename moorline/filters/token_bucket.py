"""The token bucket both local rate limit filters share (``envoy.type.v3.TokenBucket``).

A bucket starts full (``max_tokens``) and gains ``tokens_per_fill`` at each whole
``fill_interval``, never above ``max_tokens``. There is no timer: the bucket catches up on the
fills it missed when it is next used, from the ``now`` the caller passes in (the event loop's
clock in the filters, a fake clock in tests). State is three numbers, whatever the traffic.
"""

from __future__ import annotations

import math
from typing import Any

from moorline.config.errors import ConfigError

# Envoy refuses a fill interval below 50 ms (its timers would fire too often).
MIN_FILL_INTERVAL = 0.05


class BucketSpec:
    """A compiled ``TokenBucket``: what each bucket made from it starts with."""

    __slots__ = ("fill_interval", "max_tokens", "tokens_per_fill")

    def __init__(self, max_tokens: int, tokens_per_fill: int, fill_interval: float) -> None:
        self.max_tokens = max_tokens
        self.tokens_per_fill = tokens_per_fill
        self.fill_interval = fill_interval

    def new(self, now: float) -> TokenBucket:
        return TokenBucket(self, now)


class TokenBucket:
    __slots__ = ("last_fill", "spec", "tokens")

    def __init__(self, spec: BucketSpec, now: float) -> None:
        self.spec = spec
        self.tokens = spec.max_tokens
        self.last_fill = now

    def _refill(self, now: float) -> None:
        spec = self.spec
        elapsed = now - self.last_fill
        if elapsed < spec.fill_interval:
            return
        fills = int(elapsed // spec.fill_interval)
        self.last_fill += fills * spec.fill_interval
        self.tokens = min(spec.max_tokens, self.tokens + fills * spec.tokens_per_fill)

    def consume(self, now: float) -> bool:
        """Take one token if there is one."""
        self._refill(now)
        if self.tokens > 0:
            self.tokens -= 1
            return True
        return False

    def remaining(self, now: float) -> int:
        self._refill(now)
        return self.tokens

    def reset_seconds(self, now: float) -> int:
        """Whole seconds (rounded up) until the next fill."""
        self._refill(now)
        return max(0, math.ceil(self.last_fill + self.spec.fill_interval - now))


def compile_bucket(tb: Any, path: str) -> BucketSpec:
    """Check an ``envoy.type.v3.TokenBucket`` (``path`` names it for errors)."""
    if tb.max_tokens <= 0:
        raise ConfigError(f"{path}.max_tokens", "must be greater than 0")
    per_fill = tb.tokens_per_fill.value if tb.HasField("tokens_per_fill") else 1
    if tb.HasField("tokens_per_fill") and per_fill <= 0:
        raise ConfigError(f"{path}.tokens_per_fill", "must be greater than 0")
    if not tb.HasField("fill_interval"):
        raise ConfigError(f"{path}.fill_interval", "fill_interval is required")
    interval = tb.fill_interval.seconds + tb.fill_interval.nanos / 1e9
    if interval < MIN_FILL_INTERVAL:
        raise ConfigError(f"{path}.fill_interval", "must be at least 50ms")
    return BucketSpec(int(tb.max_tokens), int(per_fill), interval)
