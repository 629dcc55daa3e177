"""Outlier detection (passive health checking): Envoy's ``Cluster.outlier_detection``.

``compile_outlier(proto, cluster)`` validates the ``OutlierDetection`` proto (``ConfigError``
paths relative to the cluster) and returns an ``OutlierDetector`` that the cluster keeps in
``cluster.outlier`` (``None`` when not configured: the router and tcp_proxy then skip every
call, so an unconfigured cluster pays one attribute test per result).

Inputs, per host:

- ``put_http(host, status)``: an upstream response (external origin).
- ``put_result(host, kind)``: a locally seen result: ``CONNECT_FAILED`` (connect failure or
  reset), ``TIMEOUT``, ``CONNECT_SUCCESS`` (the router's pool handed a connection) and
  ``CONNECT_SUCCESS_FINAL`` (tcp_proxy: the connection is the whole result). Without
  ``split_external_local_origin_errors`` these map to HTTP codes as Envoy does (503, 504,
  ignored, 200); with it they feed the local-origin counters instead.

Consecutive counters eject at once (``consecutive_5xx``, ``consecutive_gateway_failure`` for
502/503/504, ``consecutive_local_origin_failure``); success-rate and failure-percentage ejection
run every ``interval`` over the requests of the interval just ended (``evaluate(now)``, which
also returns hosts whose ejection time passed). An ejection lasts ``base_ejection_time`` times
the host's ejection multiplier (raised by each ejection, lowered by one for each
``base_ejection_time`` the host then stays in), capped by ``max(max_ejection_time,
base_ejection_time)``, plus a jitter drawn at ejection in ``[0, max_ejection_time_jitter)``.
``max_ejection_percent`` caps the share of ejected hosts as Envoy does: a host is ejected while
the share already ejected is below it (so the first one always goes, and the share may end one
host past it); with 0 only ``always_eject_one_host`` lets one go. ``enforcing_*`` percentages are
drawn from the detector's own ``random.Random`` (seedable: ``rng=``).

The clock is passed in (``clock()``, the loop's time in the process); ``start(loop)`` runs the
interval timer, ``stop()`` cancels it. Ejection sets ``host.outlier_ejected`` (independent of
EDS and active health) and calls ``cluster.health_changed()``. Events go to an optional
``EventLog`` (the bootstrap's ``cluster_manager.outlier_detection.event_log_path``) as Envoy's
``OutlierDetectionEvent`` JSON lines.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from moorline.config.errors import ConfigError
from moorline.config.util import opt_duration_s, opt_uint
from moorline.observability.stats import Counter, Gauge

if TYPE_CHECKING:
    from moorline.upstream.cluster import Cluster, Host

# put_result kinds
CONNECT_FAILED = 0
TIMEOUT = 1
CONNECT_SUCCESS = 2
CONNECT_SUCCESS_FINAL = 3

# Ejection types: (Envoy's event type name, stats suffix)
CONSECUTIVE_5XX = ("CONSECUTIVE_5XX", "consecutive_5xx")
CONSECUTIVE_GATEWAY_FAILURE = ("CONSECUTIVE_GATEWAY_FAILURE", "consecutive_gateway_failure")
CONSECUTIVE_LOCAL_ORIGIN_FAILURE = ("CONSECUTIVE_LOCAL_ORIGIN_FAILURE", "consecutive_local_origin_failure")
SUCCESS_RATE = ("SUCCESS_RATE", "success_rate")
SUCCESS_RATE_LOCAL_ORIGIN = ("SUCCESS_RATE_LOCAL_ORIGIN", "local_origin_success_rate")
FAILURE_PERCENTAGE = ("FAILURE_PERCENTAGE", "failure_percentage")
FAILURE_PERCENTAGE_LOCAL_ORIGIN = ("FAILURE_PERCENTAGE_LOCAL_ORIGIN", "failure_percentage_local_origin")
TYPES = (
    CONSECUTIVE_5XX,
    CONSECUTIVE_GATEWAY_FAILURE,
    CONSECUTIVE_LOCAL_ORIGIN_FAILURE,
    SUCCESS_RATE,
    SUCCESS_RATE_LOCAL_ORIGIN,
    FAILURE_PERCENTAGE,
    FAILURE_PERCENTAGE_LOCAL_ORIGIN,
)
_GATEWAY = frozenset((502, 503, 504))
# A gRPC answer's grpc-status as the HTTP status outlier detection sees (Envoy's
# grpcToHttpStatus): UNAVAILABLE counts as a 503 gateway failure, INTERNAL as a 500, and so on.
_GRPC_AS_HTTP = (200, 499, 500, 400, 504, 404, 409, 403, 429, 400, 409, 400, 501, 500, 503, 500, 401)


def http_status_for_grpc(code: int) -> int:
    """The HTTP status a gRPC status code stands for (500 for codes outside 0..16)."""
    return _GRPC_AS_HTTP[code] if 0 <= code < len(_GRPC_AS_HTTP) else 500


_LOCAL_AS_HTTP = {CONNECT_FAILED: 503, TIMEOUT: 504, CONNECT_SUCCESS_FINAL: 200}


class OutlierConfig:
    """The compiled ``OutlierDetection`` fields, with Envoy's defaults."""

    __slots__ = (
        "always_eject_one_host",
        "base_ejection_time",
        "consecutive_5xx",
        "consecutive_gateway_failure",
        "consecutive_local_origin_failure",
        "enforcing",
        "failure_percentage_minimum_hosts",
        "failure_percentage_request_volume",
        "failure_percentage_threshold",
        "interval",
        "max_ejection_percent",
        "max_ejection_time",
        "max_ejection_time_jitter",
        "split",
        "success_rate_minimum_hosts",
        "success_rate_request_volume",
        "success_rate_stdev_factor",
        "uneject_on_health_check",
    )

    def __init__(self) -> None:
        self.consecutive_5xx = 5
        self.consecutive_gateway_failure = 5
        self.consecutive_local_origin_failure = 5
        self.interval = 10.0
        self.base_ejection_time = 30.0
        self.max_ejection_time = 300.0
        self.max_ejection_time_jitter = 0.0
        self.max_ejection_percent = 10
        self.always_eject_one_host = False
        self.split = False
        self.success_rate_minimum_hosts = 5
        self.success_rate_request_volume = 100
        self.success_rate_stdev_factor = 1900
        self.failure_percentage_threshold = 85
        self.failure_percentage_minimum_hosts = 5
        self.failure_percentage_request_volume = 50
        self.uneject_on_health_check = True
        # stats suffix -> enforcing percentage
        self.enforcing: dict[str, int] = {
            "consecutive_5xx": 100,
            "consecutive_gateway_failure": 0,
            "consecutive_local_origin_failure": 100,
            "success_rate": 100,
            "local_origin_success_rate": 100,
            "failure_percentage": 0,
            "failure_percentage_local_origin": 0,
        }


def compile_config(proto: Any, path: str = "outlier_detection") -> OutlierConfig:
    cfg = OutlierConfig()
    for field in (
        "consecutive_5xx",
        "consecutive_gateway_failure",
        "consecutive_local_origin_failure",
        "success_rate_minimum_hosts",
        "success_rate_request_volume",
        "success_rate_stdev_factor",
        "failure_percentage_minimum_hosts",
        "failure_percentage_request_volume",
    ):
        v = opt_uint(proto, field)
        if v is not None:
            setattr(cfg, field, v)
    for field in ("max_ejection_percent", "failure_percentage_threshold"):
        v = opt_uint(proto, field)
        if v is not None:
            if v > 100:
                raise ConfigError(f"{path}.{field}", "must be at most 100")
            setattr(cfg, field, v)
    for name in cfg.enforcing:
        field = f"enforcing_{name}"
        v = opt_uint(proto, field)
        if v is not None:
            if v > 100:
                raise ConfigError(f"{path}.{field}", "must be at most 100")
            cfg.enforcing[name] = v
    for field in ("interval", "base_ejection_time", "max_ejection_time", "max_ejection_time_jitter"):
        d = opt_duration_s(proto, field)
        if d is not None:
            if field == "interval" and d <= 0:
                raise ConfigError(f"{path}.interval", "must be greater than 0")
            setattr(cfg, field, d)
    cfg.split = bool(proto.split_external_local_origin_errors)
    cfg.always_eject_one_host = bool(proto.always_eject_one_host.value)
    if proto.HasField("successful_active_health_check_uneject_host"):
        cfg.uneject_on_health_check = bool(proto.successful_active_health_check_uneject_host.value)
    return cfg


class OutlierStats:
    """``cluster.<name>.outlier_detection.*``: Envoy's names."""

    __slots__ = (
        "detected",
        "ejections_active",
        "ejections_consecutive_5xx",
        "ejections_enforced_total",
        "ejections_overflow",
        "ejections_total",
        "enforced",
    )

    def __init__(self, scope: Any) -> None:
        p = "outlier_detection."
        self.ejections_active: Gauge = scope.gauge(p + "ejections_active")
        self.ejections_total: Counter = scope.counter(p + "ejections_total")
        self.ejections_enforced_total: Counter = scope.counter(p + "ejections_enforced_total")
        self.ejections_overflow: Counter = scope.counter(p + "ejections_overflow")
        self.ejections_consecutive_5xx: Counter = scope.counter(p + "ejections_consecutive_5xx")
        self.enforced: dict[str, Counter] = {}
        self.detected: dict[str, Counter] = {}
        for _, s in TYPES:
            self.enforced[s] = scope.counter(f"{p}ejections_enforced_{s}")
            self.detected[s] = scope.counter(f"{p}ejections_detected_{s}")


class _Monitor:
    """One host's counters. ``*_cur`` counts the running interval, ``*_last`` the one before
    (what the periodic success-rate and failure-percentage checks read)."""

    __slots__ = (
        "c5xx",
        "cgw",
        "clocal",
        "eject_until",
        "ejected_at",
        "ext_cur",
        "ext_last",
        "loc_cur",
        "loc_last",
        "multiplier",
        "num_ejections",
        "unejected_at",
    )

    def __init__(self) -> None:
        self.c5xx = 0
        self.cgw = 0
        self.clocal = 0
        self.ext_cur = [0, 0]  # [total, success]
        self.ext_last = (0, 0)
        self.loc_cur = [0, 0]
        self.loc_last = (0, 0)
        self.multiplier = 0
        self.num_ejections = 0
        self.ejected_at: float | None = None
        self.eject_until = 0.0
        self.unejected_at: float | None = None


class EventLog:
    """Envoy's outlier event log: one ``OutlierDetectionEvent`` JSON object per line, appended
    to ``path`` (opened once; each line flushed as written, events are rare)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._f = open(path, "a", encoding="utf-8")  # kept open: it lives with the server

    def write(self, event: dict[str, Any]) -> None:
        try:
            self._f.write(json.dumps(event, separators=(",", ":")) + "\n")
            self._f.flush()
        except (OSError, ValueError):
            pass  # a full disk or a closed log must not break request handling

    def close(self) -> None:
        self._f.close()


class OutlierDetector:
    """See the module docstring."""

    def __init__(
        self,
        cluster: Cluster,
        config: OutlierConfig,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        event_log: EventLog | None = None,
    ) -> None:
        self.cluster = cluster
        self.config = config
        self.clock = clock
        self.rng = rng or random.Random()
        self.event_log = event_log
        self.stats = OutlierStats(cluster.stats.scope)
        self.monitors: dict[Host, _Monitor] = {}
        self.active = 0  # hosts this detector holds ejected (its share of the shared gauge)
        self._timer: asyncio.TimerHandle | None = None
        self._last_action: dict[Host, float] = {}

    # -- inputs (hot path when configured) ------------------------------------------------------

    def _monitor(self, host: Host) -> _Monitor | None:
        m = self.monitors.get(host)
        if m is None:
            if host.removed or host.cluster is not self.cluster:
                return None
            m = self.monitors[host] = _Monitor()
        return m

    def put_http(self, host: Host, status: int) -> None:
        m = self._monitor(host)
        if m is None:
            return
        cur = m.ext_cur
        cur[0] += 1
        cfg = self.config
        if status >= 500:
            if status in _GATEWAY:
                m.cgw += 1
                if m.cgw == cfg.consecutive_gateway_failure:
                    self._consecutive(host, m, CONSECUTIVE_GATEWAY_FAILURE)
            else:
                m.cgw = 0
            m.c5xx += 1
            if m.c5xx == cfg.consecutive_5xx:
                self._consecutive(host, m, CONSECUTIVE_5XX)
        else:
            cur[1] += 1
            m.c5xx = 0
            m.cgw = 0

    def put_result(self, host: Host, kind: int) -> None:
        if not self.config.split:
            code = _LOCAL_AS_HTTP.get(kind)
            if code is not None:
                self.put_http(host, code)
            return
        m = self._monitor(host)
        if m is None:
            return
        cur = m.loc_cur
        cur[0] += 1
        if kind in (CONNECT_SUCCESS, CONNECT_SUCCESS_FINAL):
            cur[1] += 1
            m.clocal = 0
            return
        m.clocal += 1
        if m.clocal == self.config.consecutive_local_origin_failure:
            self._consecutive(host, m, CONSECUTIVE_LOCAL_ORIGIN_FAILURE)

    def on_health_check_success(self, host: Host) -> None:
        """An active health check passed: with ``successful_active_health_check_uneject_host``
        (the default) an ejected host comes back now."""
        m = self.monitors.get(host)
        if m is not None and self.config.uneject_on_health_check and host.outlier_ejected:
            self._uneject(host, m, self.clock())

    # -- decisions ------------------------------------------------------------------------------

    def _consecutive(self, host: Host, m: _Monitor, etype: tuple[str, str]) -> None:
        if not host.outlier_ejected:
            self.stats.detected[etype[1]].value += 1
            self._eject(host, m, etype, self.clock(), {})
        # The streak that caused the decision starts over (Envoy resets it after the event).
        if etype is CONSECUTIVE_5XX:
            m.c5xx = 0
        elif etype is CONSECUTIVE_GATEWAY_FAILURE:
            m.cgw = 0
        else:
            m.clocal = 0

    def _enforce(self, etype: tuple[str, str]) -> bool:
        pct = self.config.enforcing[etype[1]]
        return pct >= 100 or (pct > 0 and self.rng.randrange(100) < pct)

    def _eject(
        self, host: Host, m: _Monitor, etype: tuple[str, str], now: float, detail: dict[str, Any]
    ) -> None:
        st = self.stats
        n = len(self.cluster.hosts) or 1
        # Envoy's rule: eject while the share already ejected is below the maximum, so the first
        # host always goes (unless the maximum is 0 and always_eject_one_host is off) and the
        # last ejection may take the share one host past the maximum.
        allowed = 100.0 * self.active < self.config.max_ejection_percent * n or (
            self.active == 0 and self.config.always_eject_one_host
        )
        if not allowed:
            st.ejections_overflow.value += 1
            return
        st.ejections_total.value += 1
        if etype is CONSECUTIVE_5XX:
            st.ejections_consecutive_5xx.value += 1
        if not self._enforce(etype):
            self._log(host, m, etype, "EJECT", now, False, detail)
            return
        cfg = self.config
        base = cfg.base_ejection_time
        cap = max(cfg.max_ejection_time, base)
        # Raise the multiplier only while the ejection is still below its cap (as Envoy's
        # backoff), so that staying healthy brings a capped host back down in a few steps.
        if base * m.multiplier < cap:
            m.multiplier += 1
        duration = min(base * m.multiplier, cap)
        if cfg.max_ejection_time_jitter > 0:
            duration += self.rng.random() * cfg.max_ejection_time_jitter
        m.num_ejections += 1
        m.ejected_at = now
        m.eject_until = now + duration
        self.active += 1
        st.ejections_active.value += 1
        st.ejections_enforced_total.value += 1
        st.enforced[etype[1]].value += 1
        host.outlier_ejected = True
        self._log(host, m, etype, "EJECT", now, True, detail)
        self.cluster.health_changed()

    def _uneject(self, host: Host, m: _Monitor, now: float) -> None:
        host.outlier_ejected = False
        # Results of requests that were still in flight while it was out do not count against
        # the readmitted host: it starts a fresh streak.
        m.c5xx = m.cgw = m.clocal = 0
        m.ejected_at = None
        m.unejected_at = now
        self.active -= 1
        self.stats.ejections_active.value -= 1
        self._log(host, m, None, "UNEJECT", now, True, {})
        self.cluster.health_changed()

    def evaluate(self, now: float | None = None) -> None:
        """One interval: return hosts whose time is up, then the periodic ejections over the
        counts of the interval that just ended."""
        if now is None:
            now = self.clock()
        base = self.config.base_ejection_time
        for host, m in list(self.monitors.items()):
            if host.outlier_ejected:
                if now >= m.eject_until:
                    self._uneject(host, m, now)
            elif m.multiplier and m.unejected_at is not None and now - m.unejected_at >= base:
                # Back in service for a base ejection time: the next ejection is shorter again.
                m.multiplier -= 1
                m.unejected_at = now
            m.ext_last = (m.ext_cur[0], m.ext_cur[1])
            m.ext_cur[0] = m.ext_cur[1] = 0
            m.loc_last = (m.loc_cur[0], m.loc_cur[1])
            m.loc_cur[0] = m.loc_cur[1] = 0
        self._periodic(now, local=False)
        if self.config.split:
            self._periodic(now, local=True)

    def _periodic(self, now: float, local: bool) -> None:
        cfg = self.config
        sr_type, fp_type = (
            (SUCCESS_RATE_LOCAL_ORIGIN, FAILURE_PERCENTAGE_LOCAL_ORIGIN)
            if local
            else (
                SUCCESS_RATE,
                FAILURE_PERCENTAGE,
            )
        )
        sr_hosts: list[tuple[Host, _Monitor, float]] = []
        fp_hosts: list[tuple[Host, _Monitor, float]] = []
        for host, m in self.monitors.items():
            if host.outlier_ejected:
                continue
            total, ok = m.loc_last if local else m.ext_last
            if not total:
                continue
            rate = 100.0 * ok / total
            if total >= cfg.success_rate_request_volume:
                sr_hosts.append((host, m, rate))
            if total >= cfg.failure_percentage_request_volume:
                fp_hosts.append((host, m, rate))
        if sr_hosts and len(sr_hosts) >= cfg.success_rate_minimum_hosts:
            rates = [r for _, _, r in sr_hosts]
            mean = sum(rates) / len(rates)
            stdev = math.sqrt(sum((r - mean) ** 2 for r in rates) / len(rates))
            threshold = mean - stdev * (cfg.success_rate_stdev_factor / 1000.0)
            for host, m, rate in sr_hosts:
                if rate < threshold and not host.outlier_ejected:
                    self.stats.detected[sr_type[1]].value += 1
                    detail = {
                        "host_success_rate": int(rate),
                        "cluster_average_success_rate": int(mean),
                        "cluster_success_rate_ejection_threshold": int(threshold),
                    }
                    self._eject(host, m, sr_type, now, detail)
        if fp_hosts and len(fp_hosts) >= cfg.failure_percentage_minimum_hosts:
            for host, m, rate in fp_hosts:
                if 100.0 - rate > cfg.failure_percentage_threshold and not host.outlier_ejected:
                    self.stats.detected[fp_type[1]].value += 1
                    self._eject(host, m, fp_type, now, {"host_success_rate": int(rate)})

    # -- membership and lifetime ----------------------------------------------------------------

    def on_membership_change(self) -> None:
        """Hosts that left the cluster: forget them (an ejected one no longer counts)."""
        for h in self.cluster.last_removed:
            m = self.monitors.pop(h, None)
            self._last_action.pop(h, None)
            if m is not None and h.outlier_ejected:
                h.outlier_ejected = False
                self.active -= 1
                self.stats.ejections_active.value -= 1
        for h in self.cluster.hosts:
            self._monitor(h)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is None:
            self.clock = loop.time
            self._timer = loop.call_later(self.config.interval, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            self.evaluate(loop.time())
        finally:
            self._timer = loop.call_later(self.config.interval, self._tick, loop)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def close(self) -> None:
        """The cluster was retired: stop, and take this snapshot's ejections off the gauge (the
        stats are shared by name with the replacing cluster)."""
        self.stop()
        self.stats.ejections_active.value -= self.active
        self.active = 0
        self.monitors.clear()  # late results of requests still on it find no monitor
        self._last_action.clear()

    # -- event log ------------------------------------------------------------------------------

    def _log(
        self,
        host: Host,
        m: _Monitor,
        etype: tuple[str, str] | None,
        action: str,
        now: float,
        enforced: bool,
        detail: dict[str, Any],
    ) -> None:
        log = self.event_log
        if log is None:
            return
        ev: dict[str, Any] = {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z",
            "cluster_name": self.cluster.name,
            "upstream_url": host.addr_str,
            "action": action,
            "num_ejections": m.num_ejections,
            "enforced": enforced,
        }
        last = self._last_action.get(host)
        if last is not None:
            ev["secs_since_last_action"] = str(int(now - last))
        self._last_action[host] = now
        if etype is not None:
            ev["type"] = etype[0]
            if etype in (SUCCESS_RATE, SUCCESS_RATE_LOCAL_ORIGIN):
                ev["eject_success_rate_event"] = detail
            elif etype in (FAILURE_PERCENTAGE, FAILURE_PERCENTAGE_LOCAL_ORIGIN):
                ev["eject_failure_percentage_event"] = detail
            else:
                ev["eject_consecutive_event"] = {}
        log.write(ev)


def compile_outlier(proto: Any, cluster: Cluster, rng: random.Random | None = None) -> OutlierDetector:
    """``Cluster.outlier_detection`` -> a detector for ``cluster`` (notices go to the cluster)."""
    cfg = compile_config(proto.outlier_detection)
    od = proto.outlier_detection
    if od.monitors:
        cluster.notice("outlier_detection.monitors: custom outlier monitors are not supported; ignored")
    if od.HasField("successful_active_health_check_uneject_host") and not proto.health_checks:
        cluster.notice(
            "outlier_detection.successful_active_health_check_uneject_host: the cluster has no "
            "health_checks; ignored"
        )
    det = OutlierDetector(cluster, cfg, rng=rng)
    cluster.on_membership_change.append(det.on_membership_change)
    for h in cluster.hosts:
        det._monitor(h)
    return det
