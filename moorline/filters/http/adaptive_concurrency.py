"""``envoy.filters.http.adaptive_concurrency``: a concurrency limit that follows upstream latency.

One ``GradientController`` per configured filter (shared by the streams of its connection
manager) keeps the number of requests in flight below ``concurrency_limit``; a request over it is
answered 503 (``concurrency_limit_exceeded_status``) with details ``reached_concurrency_limit``
and counted ``rq_blocked``, and never reaches the upstream. A request holds its slot from its
headers until the stream ends (``on_destroy``), so the upstream never sees more requests from
this filter than the limit.

The latency of each request (headers in to response headers out: the upstream's time, plus the
proxy's) is a sample. No timer runs: when a request arrives after a deadline has passed, the
controller does the due work inline, with the time read from its ``clock`` (the loop's):

- every ``concurrency_update_interval`` (default 100 ms) the samples of the interval are
  aggregated to their ``sample_aggregate_percentile`` (default 50) -> ``sample_rtt``; the
  gradient is ``min_rtt * (1 + buffer) / sample_rtt`` clamped to [0.5, 2]; the new limit is
  ``floor(g + sqrt(g))`` with ``g = gradient * limit`` (the square root is headroom for bursts:
  ``burst_queue_size``), clamped to [``min_concurrency``, ``max_concurrency_limit``] (default
  3, 1000);
- every ``min_rtt_calc_params.interval`` (default 60 s, stretched by up to ``jitter`` percent,
  default 15) the limit drops to ``min_concurrency`` until ``request_count`` (default 50)
  samples are in; their percentile becomes ``min_rtt``. The first window starts with the first
  request. ``fixed_value`` instead fixes ``min_rtt`` and never measures it.

Bounds: at most ``MAX_SAMPLES`` samples per interval are kept (the rest of that interval is not
sampled). ``enabled`` (a runtime-backed flag) is read at its default; its runtime key is not.
Stats ``http.<prefix>.adaptive_concurrency.gradient_controller.concurrency_limit`` /
``gradient`` (percent) / ``burst_queue_size`` / ``min_rtt_msecs`` / ``sample_rtt_msecs`` /
``rq_blocked``; ``min_rtt_calculation_active``.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Callable
from typing import Any

from moorline.config import registry
from moorline.config.errors import ConfigError
from moorline.proxy.filter import CONTINUE, STOP_ITERATION, HttpFilter

NAME = "envoy.filters.http.adaptive_concurrency"
TYPE = "envoy.extensions.filters.http.adaptive_concurrency.v3.AdaptiveConcurrency"
DETAILS = "reached_concurrency_limit"
BODY = b"reached concurrency limit"
MAX_SAMPLES = 10_000


def _dur(msg: Any, field: str, default: float) -> float:
    if not msg.HasField(field):
        return default
    d = getattr(msg, field)
    return d.seconds + d.nanos / 1e9


def _percentile(samples: list[float], p: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, max(0, math.ceil(p * len(s)) - 1))]


class GradientController:
    """The limit and its inputs; ``clock()`` is seconds (monotonic), ``rng()`` in [0, 1)."""

    def __init__(
        self,
        *,
        percentile: float = 0.5,
        max_limit: int = 1000,
        update_interval: float = 0.1,
        min_rtt_interval: float = 60.0,
        fixed_min_rtt: float | None = None,
        request_count: int = 50,
        jitter: float = 0.15,
        min_concurrency: int = 3,
        buffer: float = 0.25,
        scope: Any = None,
        clock: Callable[[], float] | None = None,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.percentile = percentile
        self.max_limit = max_limit
        self.update_interval = update_interval
        self.min_rtt_interval = min_rtt_interval
        self.request_count = request_count
        self.jitter = jitter
        self.min_concurrency = min_concurrency
        self.buffer = buffer
        self.clock = clock or (lambda: asyncio.get_running_loop().time())
        self.rng = rng
        self.in_flight = 0
        self.samples: list[float] = []
        self.fixed = fixed_min_rtt is not None
        self.min_rtt = fixed_min_rtt or 0.0
        # Before the first window, and during each: the limit is min_concurrency.
        self.measuring = not self.fixed
        self.limit = min_concurrency
        self.next_update: float | None = None  # set by the first request
        self.next_min_rtt = float("inf")
        p = "adaptive_concurrency.gradient_controller."
        if scope is None:
            from moorline.observability.stats import Store

            scope = Store().scope("")
        self.st_limit = scope.gauge(p + "concurrency_limit")
        self.st_gradient = scope.gauge(p + "gradient")
        self.st_burst = scope.gauge(p + "burst_queue_size")
        self.st_min_rtt = scope.gauge(p + "min_rtt_msecs")
        self.st_sample_rtt = scope.gauge(p + "sample_rtt_msecs")
        self.st_measuring = scope.gauge(p + "min_rtt_calculation_active")
        self.rq_blocked = scope.counter(p + "rq_blocked")
        self.st_limit.value = self.limit
        self.st_min_rtt.value = round(self.min_rtt * 1000)

    # -- per request ------------------------------------------------------------------------
    def try_acquire(self) -> bool:
        now = self.clock()
        if self.next_update is None:
            self.next_update = now + self.update_interval
            self.st_measuring.value = 1 if self.measuring else 0
        elif now >= self.next_update:
            self._update(now)
        if self.in_flight >= self.limit:
            self.rq_blocked.value += 1
            return False
        self.in_flight += 1
        return True

    def release(self) -> None:
        self.in_flight -= 1

    def sample(self, rtt: float) -> None:
        if len(self.samples) >= MAX_SAMPLES:
            return
        self.samples.append(rtt)
        if self.measuring and len(self.samples) >= self.request_count:
            self._end_min_rtt_window(self.clock())

    # -- the controller -----------------------------------------------------------------------
    def _end_min_rtt_window(self, now: float) -> None:
        self.min_rtt = _percentile(self.samples, self.percentile)
        self.samples.clear()
        self.measuring = False
        self.st_measuring.value = 0
        self.st_min_rtt.value = round(self.min_rtt * 1000)
        self.next_min_rtt = now + self.min_rtt_interval * (1.0 + self.jitter * self.rng())
        self.next_update = now + self.update_interval

    def _update(self, now: float) -> None:
        self.next_update = now + self.update_interval
        if self.measuring:
            return  # the window ends on its sample count, not on time
        if now >= self.next_min_rtt and not self.fixed:
            self.measuring = True
            self.st_measuring.value = 1
            self.samples.clear()
            self._set_limit(self.min_concurrency)
            return
        if not self.samples:
            return
        sample_rtt = _percentile(self.samples, self.percentile)
        self.samples.clear()
        self.st_sample_rtt.value = round(sample_rtt * 1000)
        gradient = (
            max(0.5, min(2.0, (self.min_rtt * (1.0 + self.buffer)) / sample_rtt)) if sample_rtt > 0 else 2.0
        )
        self.st_gradient.value = round(gradient * 100)
        scaled = gradient * self.limit
        headroom = math.sqrt(scaled)
        self.st_burst.value = round(headroom)
        self._set_limit(int(scaled + headroom))

    def _set_limit(self, limit: int) -> None:
        self.limit = max(self.min_concurrency, min(self.max_limit, limit))
        self.st_limit.value = self.limit


class AdaptiveConcurrencyFilter(HttpFilter):
    __slots__ = ("ctl", "held", "start", "status")

    def __init__(self, ctl: GradientController, status: int) -> None:
        super().__init__()
        self.ctl = ctl
        self.status = status
        self.start = 0.0
        self.held = False

    def decode_headers(self, headers: Any, end_stream: bool) -> int:
        ctl = self.ctl
        if not ctl.try_acquire():
            cb = self.callbacks
            assert cb is not None
            cb.send_local_reply(self.status, BODY, None, DETAILS)
            return STOP_ITERATION
        self.held = True
        self.start = ctl.clock()
        return CONTINUE

    def encode_headers(self, headers: Any, end_stream: bool) -> int:
        if self.held and self.start:
            self.ctl.sample(self.ctl.clock() - self.start)
            self.start = 0.0  # one sample per request (1xx headers do not count twice)
        return CONTINUE

    def on_destroy(self) -> None:
        if self.held:
            self.held = False
            self.ctl.release()


class AdaptiveConcurrencyConfig:
    __slots__ = ("ctl", "status")

    def __init__(self, ctl: GradientController, status: int) -> None:
        self.ctl = ctl
        self.status = status

    def __call__(self, stream: Any) -> AdaptiveConcurrencyFilter:
        return AdaptiveConcurrencyFilter(self.ctl, self.status)


def _factory(cfg: Any, ctx: Any, path: str, stat_prefix: str = "") -> AdaptiveConcurrencyConfig | None:
    tp = f"{path}.typed_config"
    if cfg is None or not cfg.HasField("gradient_controller_config"):
        raise ConfigError(f"{tp}.gradient_controller_config", "gradient_controller_config is required")
    if cfg.HasField("enabled"):
        if cfg.enabled.runtime_key:
            ctx.notice(f"{tp}.enabled.runtime_key: runtime keys are not read (its default applies); ignored")
        if not cfg.enabled.default_value.value:
            return None  # disabled: left out of the chain
    status = 503
    if cfg.HasField("concurrency_limit_exceeded_status"):
        code = int(cfg.concurrency_limit_exceeded_status.code)
        # Envoy keeps 503 for anything that is not an error status.
        status = code if 400 <= code <= 599 else 503
    g = cfg.gradient_controller_config
    gp = f"{tp}.gradient_controller_config"
    if not g.HasField("concurrency_limit_params"):
        raise ConfigError(f"{gp}.concurrency_limit_params", "concurrency_limit_params is required")
    if not g.HasField("min_rtt_calc_params"):
        raise ConfigError(f"{gp}.min_rtt_calc_params", "min_rtt_calc_params is required")
    cl, mr = g.concurrency_limit_params, g.min_rtt_calc_params
    pct = g.sample_aggregate_percentile.value if g.HasField("sample_aggregate_percentile") else 50.0
    if not 0.0 <= pct <= 100.0:
        raise ConfigError(f"{gp}.sample_aggregate_percentile", "must be between 0 and 100")
    max_limit = cl.max_concurrency_limit.value if cl.HasField("max_concurrency_limit") else 1000
    if max_limit <= 0:
        raise ConfigError(f"{gp}.concurrency_limit_params.max_concurrency_limit", "must be greater than 0")
    update = _dur(cl, "concurrency_update_interval", 0.0)
    if update <= 0:
        raise ConfigError(
            f"{gp}.concurrency_limit_params.concurrency_update_interval", "must be greater than 0"
        )
    min_conc = mr.min_concurrency.value if mr.HasField("min_concurrency") else 3
    if min_conc <= 0:
        raise ConfigError(f"{gp}.min_rtt_calc_params.min_concurrency", "must be greater than 0")
    fixed = _dur(mr, "fixed_value", 0.0) if mr.HasField("fixed_value") else None
    interval = _dur(mr, "interval", 60.0)
    if fixed is None and interval < 0.001:
        raise ConfigError(f"{gp}.min_rtt_calc_params.interval", "must be at least 1ms")
    rc = mr.request_count.value if mr.HasField("request_count") else 50
    if rc <= 0:
        raise ConfigError(f"{gp}.min_rtt_calc_params.request_count", "must be greater than 0")
    ctl = GradientController(
        percentile=pct / 100.0,
        max_limit=max_limit,
        update_interval=update,
        min_rtt_interval=interval,
        fixed_min_rtt=fixed if fixed else None,
        request_count=min(rc, MAX_SAMPLES),
        jitter=(mr.jitter.value if mr.HasField("jitter") else 15.0) / 100.0,
        min_concurrency=min(min_conc, max_limit),
        buffer=(mr.buffer.value if mr.HasField("buffer") else 25.0) / 100.0,
        scope=ctx.stats.scope(stat_prefix or ctx.http_stat_prefix),
    )
    return AdaptiveConcurrencyConfig(ctl, status)


registry.register("http", [NAME], ["type.googleapis.com/" + TYPE], _factory, wants_stat_prefix=True)
