"""``envoy.filters.http.fault``: inject delays and aborts into requests (Envoy's fault filter).

``HTTPFault`` at filter level, and the same type per route through ``typed_per_filter_config``
(the route's replaces the filter's whole, as in Envoy). A request is faulted only when it matches
``upstream_cluster`` (the route's cluster or cluster header; weighted routes pick their cluster in
the router, later, and never match), ``downstream_nodes`` (``x-envoy-downstream-service-node``)
and every ``headers`` matcher. Then, in Envoy's order:

- ``delay``: ``fixed_delay`` or ``header_delay`` (``x-envoy-fault-delay-request``, ms), sampled
  with ``percentage`` (header-controlled: ``x-envoy-fault-delay-request-percentage`` is the
  numerator, capped by the configured one). The headers are held on one ``loop.call_later``
  handle (no task); the body meanwhile is buffered by the filter manager (bounded by the
  connection's buffer limit, then 413). Flag ``DI``. The route timeout starts in the router when
  it has the whole request, so the delay does not use it up (Envoy's router arms its global
  timeout in ``onRequestComplete``, after the filters before it continued).
- ``abort`` (after the delay, if any): ``http_status``, ``grpc_status`` (HTTP 200 and a
  trailers-only reply for a gRPC request) or ``header_abort`` (``x-envoy-fault-abort-request`` in
  [200, 600), else ``x-envoy-fault-abort-grpc-request`` in [0, 16];
  ``x-envoy-fault-abort-request-percentage``). Flag ``FI``, details ``fault_filter_abort``.
- ``response_rate_limit`` (sampled first, when the request headers arrive, as Envoy):
  ``fixed_limit.limit_kbps`` or ``header_limit`` (``x-envoy-fault-throttle-response``, KiB/s, > 0;
  ``x-envoy-fault-throttle-response-percentage`` caps the configured percentage). The response
  headers pass at once; the body is kept by the filter (``STOP_ITERATION_NO_BUFFER``) and
  released in slices of 1/16 of the rate, each on one ``loop.call_later`` handle (no task), from
  a token bucket of at most one second of tokens that starts with one slice, so the first slice
  leaves on the next loop turn. Trailers wait until the body is out. Bound: above the stream's
  buffer limit (the connection's ``per_connection_buffer_limit_bytes``) the upstream's reading is
  paused (``encoder_above_high_watermark``) until half of it is released; what is kept is then at
  most the limit plus what the upstream codec had already read. While the client is write-paused
  the upstream stays paused (the stream resumes it only when neither holds it), so what the
  filter still releases into the codec is at most what it kept. A reset cancels the timer.
- ``max_active_faults``: a stream over the limit is not faulted (``faults_overflow``); a rate
  limited stream holds one of ``active_faults`` until it ends, as a delayed or aborted one.

The random draws come from the ``random.Random`` of the filter's ``FaultConfig`` (``rng``,
seedable); a percentage of 0 or of 100 % draws nothing. Stats ``http.<stat_prefix>.fault.``
``delays_injected``, ``aborts_injected``, ``faults_overflow``, ``response_rl_injected``, gauge
``active_faults``, and per downstream cluster
(``x-envoy-downstream-service-cluster``) ``<cluster>.delays_injected`` / ``.aborts_injected``
unless ``disable_downstream_cluster_stats`` (at most ``MAX_DOWNSTREAM_CLUSTERS`` names; later
ones are counted only in the totals).

Cost when idle: Istio puts an empty ``HTTPFault`` on every HTTP listener. Then the factory's
``FaultConfig`` is idle and answers ``wanted(table)`` with whether some route of the table has a
per-route fault; the connection manager leaves an unwanted filter out of the chain (recomputed
when the routes change), so a listener whose only extra filter is an empty fault builds no filter
manager at all.

Not implemented (a notice): the ``*_runtime`` keys, ``filter_metadata``.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

from moorline.config import registry
from moorline.config.errors import ConfigError
from moorline.observability.stream_info import DELAY_INJECTED, FAULT_INJECTED
from moorline.protocol.headers import HeaderMap, RequestHeaders
from moorline.proxy.filter import CONTINUE, STOP_ITERATION, STOP_ITERATION_NO_BUFFER, HttpFilter
from moorline.proxy.route_table import HeaderMatcher

NAME = "envoy.filters.http.fault"
TYPE = "envoy.extensions.filters.http.fault.v3.HTTPFault"

H_DELAY = b"x-envoy-fault-delay-request"
H_DELAY_PCT = b"x-envoy-fault-delay-request-percentage"
H_ABORT = b"x-envoy-fault-abort-request"
H_ABORT_GRPC = b"x-envoy-fault-abort-grpc-request"
H_ABORT_PCT = b"x-envoy-fault-abort-request-percentage"
H_THROTTLE = b"x-envoy-fault-throttle-response"
H_THROTTLE_PCT = b"x-envoy-fault-throttle-response-percentage"
H_NODE = b"x-envoy-downstream-service-node"
H_CLUSTER = b"x-envoy-downstream-service-cluster"

ABORT_DETAILS = "fault_filter_abort"
ABORT_BODY = b"fault filter abort"
# Distinct downstream-cluster names that get stats of their own (the names come from a request
# header: bounded so clients cannot grow the stats store without end).
MAX_DOWNSTREAM_CLUSTERS = 100
# The response rate limit releases 1/SLICES_PER_SECOND of a second's bytes per timer tick.
SLICES_PER_SECOND = 16

_DENOMINATORS = (100, 10_000, 1_000_000)  # FractionalPercent.DenominatorType HUNDRED..MILLION
_UNSET_RUNTIME = (
    "delay_percent_runtime",
    "abort_percent_runtime",
    "delay_duration_runtime",
    "abort_http_status_runtime",
    "max_active_faults_runtime",
    "response_rate_limit_percent_runtime",
    "abort_grpc_status_runtime",
)


class _Fault:
    """One compiled ``HTTPFault`` (the filter's, or a route's)."""

    __slots__ = (
        "abort_den",
        "abort_grpc",
        "abort_header",
        "abort_http",
        "abort_num",
        "delay_den",
        "delay_header",
        "delay_num",
        "delay_s",
        "has_abort",
        "has_delay",
        "headers",
        "max_active",
        "nodes",
        "rl_den",
        "rl_header",
        "rl_kbps",
        "rl_num",
        "upstream_cluster",
    )

    def __init__(self) -> None:
        self.has_delay = False
        self.delay_s: float | None = None  # fixed_delay, seconds
        self.delay_header = False
        self.delay_num = 0
        self.delay_den = 100
        self.has_abort = False
        self.abort_http: int | None = None
        self.abort_grpc: int | None = None
        self.abort_header = False
        self.abort_num = 0
        self.abort_den = 100
        self.upstream_cluster: str | None = None
        self.nodes: frozenset[bytes] = frozenset()
        self.headers: tuple[HeaderMatcher, ...] = ()
        self.max_active: int | None = None
        self.rl_kbps: int | None = None  # response_rate_limit.fixed_limit
        self.rl_header = False  # response_rate_limit.header_limit
        self.rl_num = 0
        self.rl_den = 100

    @property
    def has_rate_limit(self) -> bool:
        return self.rl_kbps is not None or self.rl_header

    @property
    def active(self) -> bool:
        return self.has_delay or self.has_abort or self.has_rate_limit


def _percent(msg: Any, path: str) -> tuple[int, int]:
    """FractionalPercent -> (numerator, denominator), capped at 100 %. Unset: 0 % (Envoy)."""
    d = int(msg.denominator)
    if d >= len(_DENOMINATORS):
        raise ConfigError(f"{path}.denominator", f"unknown denominator {d}")
    den = _DENOMINATORS[d]
    return min(int(msg.numerator), den), den


def _compile(msg: Any, path: str, notices: list[str]) -> _Fault:
    f = _Fault()
    if msg.HasField("delay"):
        d = msg.delay
        dp = f"{path}.delay"
        kind = d.WhichOneof("fault_delay_secifier")
        if kind == "fixed_delay":
            s = d.fixed_delay.seconds + d.fixed_delay.nanos / 1e9
            if s <= 0:
                raise ConfigError(f"{dp}.fixed_delay", "must be greater than 0")
            f.delay_s = s
        elif kind == "header_delay":
            f.delay_header = True
        else:
            raise ConfigError(dp, "one of fixed_delay or header_delay is required")
        f.delay_num, f.delay_den = _percent(d.percentage, f"{dp}.percentage")
        f.has_delay = True
    if msg.HasField("abort"):
        a = msg.abort
        ap = f"{path}.abort"
        kind = a.WhichOneof("error_type")
        if kind == "http_status":
            if not 200 <= a.http_status < 600:
                raise ConfigError(f"{ap}.http_status", "must be in [200, 600)")
            f.abort_http = int(a.http_status)
        elif kind == "grpc_status":
            f.abort_grpc = int(a.grpc_status)
        elif kind == "header_abort":
            f.abort_header = True
        else:
            raise ConfigError(ap, "one of http_status, grpc_status or header_abort is required")
        f.abort_num, f.abort_den = _percent(a.percentage, f"{ap}.percentage")
        f.has_abort = True
    f.upstream_cluster = msg.upstream_cluster or None
    f.nodes = frozenset(n.encode() for n in msg.downstream_nodes)
    f.headers = tuple(HeaderMatcher.compile(h, f"{path}.headers[{i}]") for i, h in enumerate(msg.headers))
    if msg.HasField("max_active_faults"):
        f.max_active = int(msg.max_active_faults.value)
    if msg.HasField("response_rate_limit"):
        r = msg.response_rate_limit
        rp = f"{path}.response_rate_limit"
        kind = r.WhichOneof("limit_type")
        if kind == "fixed_limit":
            if r.fixed_limit.limit_kbps < 1:
                raise ConfigError(f"{rp}.fixed_limit.limit_kbps", "must be at least 1")
            f.rl_kbps = int(r.fixed_limit.limit_kbps)
        elif kind == "header_limit":
            f.rl_header = True
        else:
            raise ConfigError(rp, "one of fixed_limit or header_limit is required")
        f.rl_num, f.rl_den = _percent(r.percentage, f"{rp}.percentage")
    for name in _UNSET_RUNTIME:
        if getattr(msg, name):
            notices.append(f"{path}.{name}: runtime overrides are not supported; ignored")
    if msg.HasField("filter_metadata"):
        notices.append(f"{path}.filter_metadata: not supported; ignored")
    return f


class _PerRoute:
    """A route's compiled fault (what ``callbacks.route_config(NAME)`` returns)."""

    __slots__ = ("fault", "notices")

    def __init__(self, fault: _Fault, notices: list[str]) -> None:
        self.fault = fault
        self.notices = notices


class FaultConfig:
    """The filter's compiled config, its stats and its random source; ``config(stream)`` makes
    the stream's filter. ``wanted(table)`` tells the connection manager whether the chain needs
    this filter at all for a route table (see the module docstring)."""

    __slots__ = (
        "_ds",
        "aborts_injected",
        "active_faults",
        "delays_injected",
        "ds_stats",
        "fault",
        "faults_overflow",
        "response_rl_injected",
        "rng",
        "scope",
    )

    def __init__(self, fault: _Fault, scope: Any, ds_stats: bool, seed: int | None = None) -> None:
        self.fault = fault
        self.rng = random.Random(seed)
        self.scope = scope
        self.delays_injected = scope.counter("delays_injected")
        self.aborts_injected = scope.counter("aborts_injected")
        self.faults_overflow = scope.counter("faults_overflow")
        self.response_rl_injected = scope.counter("response_rl_injected")
        self.active_faults = scope.gauge("active_faults")
        self.ds_stats = ds_stats
        self._ds: dict[bytes, tuple[Any, Any]] = {}  # downstream cluster -> (delays, aborts)

    def wanted(self, table: Any) -> bool:
        if self.fault.active:
            return True
        return any(NAME in r.filter_configs for vh in table.virtual_hosts for r in vh.routes)

    def __call__(self, stream: Any) -> FaultFilter:
        return FaultFilter(self)

    def downstream(self, cluster: bytes) -> tuple[Any, Any] | None:
        """(delays_injected, aborts_injected) of one downstream cluster, or None past the bound."""
        s = self._ds.get(cluster)
        if s is None:
            if len(self._ds) >= MAX_DOWNSTREAM_CLUSTERS:
                return None
            name = cluster.decode("latin-1")
            s = self._ds[cluster] = (
                self.scope.counter(f"{name}.delays_injected"),
                self.scope.counter(f"{name}.aborts_injected"),
            )
        return s

    def sample(self, num: int, den: int) -> bool:
        if num <= 0:
            return False
        if num >= den:
            return True
        return self.rng.randrange(den) < num


def _int_header(headers: HeaderMap, name: bytes) -> int | None:
    """A non-negative integer header, or None. At most 18 digits: a longer value is not a
    number here (and would make ``int()`` slow, or raise past Python's digit limit)."""
    v = headers.get(name)
    if v is None:
        return None
    v = v.strip()
    return int(v) if 0 < len(v) <= 18 and v.isdigit() else None


class _Throttle:
    """One rate-limited response: the body the filter keeps and its token bucket (bytes)."""

    __slots__ = (
        "buf",
        "end",
        "high",
        "last",
        "loop",
        "low",
        "paused",
        "rate",
        "slice",
        "timer",
        "tokens",
        "trailers",
    )

    def __init__(self, kbps: int, limit: int, loop: asyncio.AbstractEventLoop) -> None:
        self.rate = kbps * 1024  # bytes per second
        self.slice = max(1, self.rate // SLICES_PER_SECOND)
        # Bound: above ``high`` kept bytes the upstream is paused, resumed at ``low``.
        self.buf = bytearray()
        self.high = max(limit, 1)
        self.low = self.high // 2
        self.paused = False
        self.end = False  # the body's end is kept (released with its last byte)
        self.trailers = False  # trailers wait in the chain until the body is out
        self.loop = loop
        self.tokens = float(self.slice)  # one slice at once: no slower to start than unthrottled
        self.last = loop.time()
        self.timer: asyncio.TimerHandle | None = None


class FaultFilter(HttpFilter):
    __slots__ = ("active", "cfg", "ds_cluster", "fault", "headers", "rl", "timer")

    def __init__(self, cfg: FaultConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.fault: _Fault | None = None
        self.headers: RequestHeaders | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.active = False  # this stream holds one of active_faults
        self.ds_cluster: bytes | None = None
        self.rl: _Throttle | None = None  # the response is rate limited

    # -- matching
    def _matches(self, f: _Fault, headers: RequestHeaders) -> bool:
        cb = self.callbacks
        assert cb is not None
        if f.upstream_cluster is not None:
            route = cb.matched_route()
            if route is None:
                return False
            cluster = route.cluster
            if cluster is None and route.cluster_header is not None:
                v = headers.get(route.cluster_header)
                cluster = v.decode("latin-1") if v else None
            if cluster != f.upstream_cluster:
                return False
        if f.nodes:
            node = headers.get(H_NODE)
            if node is None or node not in f.nodes:
                return False
        if f.headers:
            method, authority, path = headers.method, headers.authority, headers.path
            for m in f.headers:
                if not m.match(headers, method, authority, path):
                    return False
        return True

    def _try_activate(self, f: _Fault) -> bool:
        """Take one of ``max_active_faults`` for this stream (once), or count an overflow."""
        if self.active:
            return True
        cfg = self.cfg
        g = cfg.active_faults
        if f.max_active is not None and g.value >= f.max_active:
            cfg.faults_overflow.value += 1
            return False
        g.value += 1
        self.active = True
        return True

    # -- hooks
    def decode_headers(self, headers: RequestHeaders, end_stream: bool) -> int:
        cb = self.callbacks
        assert cb is not None
        f = self.cfg.fault
        per_route = cb.route_config(NAME)
        if per_route is not None:
            f = per_route.fault
        if not f.active or not self._matches(f, headers):
            return CONTINUE
        self.fault = f
        if self.cfg.ds_stats:
            self.ds_cluster = headers.get(H_CLUSTER)
        if f.has_rate_limit:
            self._maybe_rate_limit(f, headers)
        delay = self._delay(f, headers)
        if delay is not None and self._try_activate(f):
            cfg = self.cfg
            cfg.delays_injected.value += 1
            if self.ds_cluster is not None:
                ds = cfg.downstream(self.ds_cluster)
                if ds is not None:
                    ds[0].value += 1
            cb.stream_info.response_flags.append(DELAY_INJECTED)
            self.headers = headers
            self.timer = asyncio.get_running_loop().call_later(delay, self._delay_done)
            return STOP_ITERATION
        if self._maybe_abort(f, headers):
            return STOP_ITERATION
        return CONTINUE

    def decode_data(self, data: bytes, end_stream: bool) -> int:
        # While delayed, the body waits in the filter manager's buffer (bounded, 413 beyond).
        return STOP_ITERATION if self.timer is not None else CONTINUE

    def decode_trailers(self, trailers: HeaderMap) -> int:
        return STOP_ITERATION if self.timer is not None else CONTINUE

    # -- response rate limit
    def _maybe_rate_limit(self, f: _Fault, headers: RequestHeaders) -> None:
        num = f.rl_num
        kbps = f.rl_kbps
        if f.rl_header:
            kbps = _int_header(headers, H_THROTTLE)
            if not kbps:  # absent, not a number, or 0: no limit (Envoy)
                return
            pct = _int_header(headers, H_THROTTLE_PCT)
            if pct is not None:
                num = min(num, pct)
        if kbps is None or not self.cfg.sample(num, f.rl_den) or not self._try_activate(f):
            return
        self.cfg.response_rl_injected.value += 1
        cb = self.callbacks
        assert cb is not None
        self.rl = _Throttle(kbps, cb.stream_info.downstream.buffer_limit, asyncio.get_running_loop())

    def encode_data(self, data: bytes, end_stream: bool) -> int:
        rl = self.rl
        if rl is None:
            return CONTINUE
        rl.buf += data
        if end_stream:
            rl.end = True
        if rl.timer is None:
            rl.timer = rl.loop.call_later(0, self._release)
        if not rl.paused and len(rl.buf) > rl.high:
            rl.paused = True
            cb = self.callbacks
            assert cb is not None
            cb.encoder_above_high_watermark()
        return STOP_ITERATION_NO_BUFFER

    def encode_trailers(self, trailers: HeaderMap) -> int:
        rl = self.rl
        if rl is None or (not rl.buf and rl.timer is None):
            return CONTINUE
        rl.trailers = True
        return STOP_ITERATION

    def _release(self) -> None:
        """One tick: release what the bucket allows (at most one slice), then wait for the next."""
        rl = self.rl
        cb = self.callbacks
        if rl is None or cb is None:
            return
        rl.timer = None
        now = rl.loop.time()
        rl.tokens = min(float(rl.slice), rl.tokens + (now - rl.last) * rl.rate)
        rl.last = now
        buf = rl.buf
        n = min(len(buf), int(rl.tokens))
        if n or (rl.end and not buf):
            rl.tokens -= n
            chunk = bytes(buf[:n])
            del buf[:n]
            end = rl.end and not buf
            if rl.paused and len(buf) <= rl.low:
                rl.paused = False
                cb.encoder_below_low_watermark()
            cb.inject_encoded_data(self, chunk, end)
            if self.rl is None or end:
                return  # the stream ended (destroyed)
        if buf:
            wait = (min(rl.slice, len(buf)) - rl.tokens) / rl.rate
            rl.timer = rl.loop.call_later(max(wait, 0.0), self._release)
        elif rl.trailers:
            rl.trailers = False
            cb.continue_encoding()

    def _delay(self, f: _Fault, headers: RequestHeaders) -> float | None:
        if not f.has_delay:
            return None
        num = f.delay_num
        if f.delay_header:
            ms = _int_header(headers, H_DELAY)
            if ms is None:
                return None
            pct = _int_header(headers, H_DELAY_PCT)
            if pct is not None:
                num = min(num, pct)
            if not self.cfg.sample(num, f.delay_den):
                return None
            return ms / 1000.0
        if not self.cfg.sample(num, f.delay_den):
            return None
        return f.delay_s

    def _abort_status(self, f: _Fault, headers: RequestHeaders) -> tuple[int, int | None] | None:
        """(http status, grpc status or None) to abort with, or None (no abort)."""
        num = f.abort_num
        if f.abort_header:
            status = _int_header(headers, H_ABORT)
            grpc = None
            if status is None or not 200 <= status < 600:
                status = None
                grpc = _int_header(headers, H_ABORT_GRPC)
                if grpc is None or grpc > 16:
                    return None
            pct = _int_header(headers, H_ABORT_PCT)
            if pct is not None:
                num = min(num, pct)
            if not self.cfg.sample(num, f.abort_den):
                return None
            return (status, None) if status is not None else (200, grpc)
        if not self.cfg.sample(num, f.abort_den):
            return None
        if f.abort_http is not None:
            return f.abort_http, None
        return 200, f.abort_grpc

    def _maybe_abort(self, f: _Fault, headers: RequestHeaders) -> bool:
        if not f.has_abort:
            return False
        st = self._abort_status(f, headers)
        if st is None or not self._try_activate(f):
            return False
        cfg = self.cfg
        cfg.aborts_injected.value += 1
        if self.ds_cluster is not None:
            ds = cfg.downstream(self.ds_cluster)
            if ds is not None:
                ds[1].value += 1
        cb = self.callbacks
        assert cb is not None
        status, grpc = st
        cb.send_local_reply(status, ABORT_BODY, FAULT_INJECTED, ABORT_DETAILS, grpc_status=grpc)
        return True

    def _delay_done(self) -> None:
        self.timer = None
        headers = self.headers
        self.headers = None
        f = self.fault
        cb = self.callbacks
        if cb is None or f is None or headers is None:
            return
        if self._maybe_abort(f, headers):
            return
        cb.continue_decoding()

    def on_destroy(self) -> None:
        # A reset (either side) or the end of the stream: no timer may outlive it.
        t = self.timer
        if t is not None:
            t.cancel()
            self.timer = None
        rl = self.rl
        if rl is not None:
            self.rl = None
            if rl.timer is not None:
                rl.timer.cancel()
                rl.timer = None
            rl.buf = bytearray()
        if self.active:
            self.active = False
            self.cfg.active_faults.value -= 1
        self.headers = None
        self.callbacks = None


def _per_route(msg: Any, path: str) -> _PerRoute:
    notices: list[str] = []
    return _PerRoute(_compile(msg, path, notices), notices)


def _factory(cfg: Any, ctx: Any, path: str) -> FaultConfig:
    notices: list[str] = []
    tpath = f"{path}.typed_config"
    if cfg is None:
        from envoy.extensions.filters.http.fault.v3.fault_pb2 import HTTPFault

        cfg = HTTPFault()
    fault = _compile(cfg, tpath, notices)
    for n in notices:
        ctx.notice(n)
    scope = ctx.stats.scope(f"{ctx.http_stat_prefix}fault.")
    return FaultConfig(fault, scope, not cfg.disable_downstream_cluster_stats)


registry.register(
    "http",
    [NAME, "envoy.fault"],
    ["type.googleapis.com/" + TYPE],
    _factory,
    per_route=_per_route,
    per_route_types=["type.googleapis.com/" + TYPE],
)
