"""The overload manager (bootstrap ``overload_manager``): resource monitors, actions, one timer.

The ``Server`` owns one ``OverloadManager`` (only when ``overload_manager`` is configured or the
runtime key ``overload.global_downstream_max_connections`` is set). Every ``refresh_interval``
(default 1 s) one ``loop.call_later`` tick reads each monitor's pressure (0..1), folds each
action's triggers into a scale (0..1, the highest trigger wins) and publishes the result on one
``OverloadState``, which it puts on ``BuildContext.overload`` before anything compiles. The
connection manager and the listeners keep that object (``None`` when nothing is configured, so
an unconfigured server pays nothing) and read plain attributes of it:

- ``request_actions``: the one flag the HTTP connection manager reads per request; true only
  while ``stop_accepting_requests`` or ``disable_http_keepalive`` is active.
- ``stop_requests`` (503, flag ``OL``, details ``overload``), ``keepalive_scale`` (always when
  saturated, else with that probability, the exchange's ``drain_after_response()``: an HTTP/1.1
  response gets ``connection: close``, an HTTP/2 connection drains with GOAWAY once the response
  is out; counted ``downstream_cx_overload_disable_keepalive``).
- ``refuse_connections`` (``stop_accepting_connections``: a new connection is closed at once and
  counted ``downstream_cx_overload_reject``) and ``cx_active`` / ``cx_max`` (the global
  downstream connection limit: listeners count their live connections here and close the ones
  over the limit, counted ``downstream_cx_overflow``).

An action is active when its scale is 1 (saturated): a ``threshold`` trigger saturates at its
value; a ``scaled`` trigger is 0 below ``scaling_threshold``, 1 from ``saturation_threshold``,
linear between. ``reduce_timeouts`` uses the scale itself: each registered connection manager's
idle timeout becomes ``min + (configured - min) * (1 - scale)``. ``shrink_heap`` is
``gc.collect()`` when it becomes active (Python has no allocator to hand pages back through; a
full collection is the nearest thing). Monitors: ``fixed_heap`` measures the process's RSS
(``/proc/self/statm``; the resident set, not only the Python heap) against
``max_heap_size_bytes``; ``downstream_connections`` (alias ``global_downstream_max_connections``)
is the live downstream connection count against ``max_active_downstream_connections``.

Stats: ``overload.<action>.active`` / ``scale_percent``, ``overload.<monitor>.pressure``
(percent), ``overload.<monitor>.failed_updates``.
"""

from __future__ import annotations

import gc
import logging
import os
import random
from collections.abc import Callable
from typing import Any
from weakref import WeakKeyDictionary

from moorline.config.errors import ConfigError
from moorline.config.util import opt_duration_s

FIXED_HEAP = "envoy.resource_monitors.fixed_heap"
DOWNSTREAM_CX = "envoy.resource_monitors.downstream_connections"
GLOBAL_CX = "envoy.resource_monitors.global_downstream_max_connections"
RUNTIME_CX_KEY = "overload.global_downstream_max_connections"

STOP_REQUESTS = "envoy.overload_actions.stop_accepting_requests"
STOP_CONNECTIONS = "envoy.overload_actions.stop_accepting_connections"
DISABLE_KEEPALIVE = "envoy.overload_actions.disable_http_keepalive"
REDUCE_TIMEOUTS = "envoy.overload_actions.reduce_timeouts"
SHRINK_HEAP = "envoy.overload_actions.shrink_heap"
ACTIONS = (STOP_REQUESTS, STOP_CONNECTIONS, DISABLE_KEEPALIVE, REDUCE_TIMEOUTS, SHRINK_HEAP)

log = logging.getLogger(__name__)

_IDLE_TIMER = 1  # ScaleTimersOverloadActionConfig.TimerType.HTTP_DOWNSTREAM_CONNECTION_IDLE


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class OverloadState:
    """What the data path reads (see the module docstring). Written only by the manager's tick,
    except ``cx_active``, which the listeners keep."""

    __slots__ = (
        "cx_active",
        "cx_max",
        "hcms",
        "keepalive_scale",
        "refuse_connections",
        "request_actions",
        "rng",
        "stop_requests",
    )

    def __init__(self) -> None:
        self.request_actions = False
        self.stop_requests = False
        self.keepalive_scale = 0.0
        self.refuse_connections = False
        self.cx_active = 0
        self.cx_max: int | None = None  # None: no global connection limit
        self.rng = random.Random()
        # Connection managers whose idle timeout reduce_timeouts scales, with their configured one.
        self.hcms: WeakKeyDictionary[Any, float] = WeakKeyDictionary()

    def close_keepalive(self) -> bool:
        s = self.keepalive_scale
        return s >= 1.0 or (s > 0.0 and self.rng.random() < s)

    def register_hcm(self, hcm: Any) -> None:
        if hcm.idle_timeout:
            self.hcms[hcm] = hcm.idle_timeout


class _Monitor:
    __slots__ = ("failed", "name", "pressure", "pressure_gauge", "read")

    def __init__(self, name: str, read: Callable[[], float], scope: Any) -> None:
        self.name = name
        self.read = read
        self.pressure_gauge = scope.gauge(f"overload.{name}.pressure")
        self.failed = scope.counter(f"overload.{name}.failed_updates")
        self.pressure = 0.0


class _Trigger:
    __slots__ = ("high", "low", "monitor")

    def __init__(self, monitor: str, low: float, high: float) -> None:
        self.monitor = monitor
        self.low = low  # scale starts rising here
        self.high = high  # saturated from here

    def scale(self, pressure: float) -> float:
        if pressure >= self.high:
            return 1.0
        if pressure < self.low or self.high <= self.low:
            return 0.0
        return (pressure - self.low) / (self.high - self.low)


class _Action:
    __slots__ = ("active_gauge", "min_idle", "min_idle_scale", "name", "scale", "scale_gauge", "triggers")

    def __init__(self, name: str, triggers: list[_Trigger], scope: Any) -> None:
        self.name = name
        self.triggers = triggers
        self.active_gauge = scope.gauge(f"overload.{name}.active")
        self.scale_gauge = scope.gauge(f"overload.{name}.scale_percent")
        self.scale = 0.0
        self.min_idle: float | None = None  # reduce_timeouts: the floor, in seconds ...
        self.min_idle_scale = 0.0  # ... or as a share of the configured timeout


def _runtime_cx_limit(bootstrap: Any) -> int | None:
    """``overload.global_downstream_max_connections`` from the static runtime layers (the last
    layer that sets it wins, as runtime layers override in order)."""
    found: int | None = None
    for layer in bootstrap.layered_runtime.layers:
        if layer.WhichOneof("layer_specifier") != "static_layer":
            continue
        fields = layer.static_layer.fields
        if RUNTIME_CX_KEY in fields:
            v = fields[RUNTIME_CX_KEY]
            kind = v.WhichOneof("kind")
            try:
                if kind == "number_value":
                    found = int(v.number_value)
                elif kind == "string_value":
                    found = int(v.string_value)
                else:
                    raise ValueError
            except ValueError:
                raise ConfigError(
                    f"layered_runtime.static_layer.{RUNTIME_CX_KEY}", "must be a number"
                ) from None
        else:
            # A nested struct {overload: {global_downstream_max_connections: N}} is the same key.
            ov = fields.get("overload")
            if ov is not None and ov.WhichOneof("kind") == "struct_value":
                inner = ov.struct_value.fields.get("global_downstream_max_connections")
                if inner is not None and inner.WhichOneof("kind") == "number_value":
                    found = int(inner.number_value)
    if found is not None and found < 0:
        raise ConfigError(f"layered_runtime.static_layer.{RUNTIME_CX_KEY}", "must not be negative")
    return found


class OverloadManager:
    """Compiled ``overload_manager``. ``compile(bootstrap, ctx)`` returns ``None`` when nothing
    is configured. ``refresh()`` is one tick (tests call it with fake monitors); ``start(loop)``
    / ``stop()`` run it on the loop every ``refresh_interval``."""

    def __init__(
        self, proto: Any, ctx: Any, runtime_cx: int | None, heap: Callable[[], int] = rss_bytes
    ) -> None:
        self.state = OverloadState()
        self.refresh_interval = 1.0
        self.monitors: dict[str, _Monitor] = {}
        self.actions: list[_Action] = []
        self._timer: Any = None
        self._loop: Any = None
        self._heap = heap
        path = "overload_manager"
        if proto is not None:
            self.refresh_interval = opt_duration_s(proto, "refresh_interval", 1.0) or 1.0
            for i, m in enumerate(proto.resource_monitors):
                self._add_monitor(m, f"{path}.resource_monitors[{i}]", ctx)
            for i, a in enumerate(proto.actions):
                self._add_action(a, f"{path}.actions[{i}]", ctx)
            for f in ("loadshed_points", "buffer_factory_config"):
                set_ = bool(getattr(proto, f)) if f == "loadshed_points" else proto.HasField(f)
                if set_:
                    ctx.notice(f"{path}.{f}: not implemented by moorline's overload manager; ignored")
        if runtime_cx is not None:
            if self.state.cx_max is None:
                self.state.cx_max = runtime_cx
            else:
                ctx.notice(
                    f"layered_runtime: {RUNTIME_CX_KEY} is overridden by the downstream connections "
                    "resource monitor; ignored"
                )

    @classmethod
    def compile(cls, bootstrap: Any, ctx: Any) -> OverloadManager | None:
        runtime_cx = _runtime_cx_limit(bootstrap)
        has_om = bootstrap.HasField("overload_manager")
        if not has_om and runtime_cx is None:
            return None
        return cls(bootstrap.overload_manager if has_om else None, ctx, runtime_cx)

    # -- compile ----------------------------------------------------------------------------
    def _add_monitor(self, m: Any, path: str, ctx: Any) -> None:
        from moorline.config.loader import unpack_any

        name = m.name
        if name in self.monitors:
            raise ConfigError(f"{path}.name", f"duplicate resource monitor {name!r}")
        cfg = unpack_any(m.typed_config, f"{path}.typed_config") if m.HasField("typed_config") else None
        if name == FIXED_HEAP:
            limit = int(getattr(cfg, "max_heap_size_bytes", 0) or 0)
            if limit <= 0:
                raise ConfigError(f"{path}.typed_config.max_heap_size_bytes", "must be greater than 0")
            heap = self._heap
            read = lambda: heap() / limit  # noqa: E731
        elif name in (DOWNSTREAM_CX, GLOBAL_CX):
            limit = int(getattr(cfg, "max_active_downstream_connections", 0) or 0)
            if limit <= 0:
                raise ConfigError(
                    f"{path}.typed_config.max_active_downstream_connections", "must be greater than 0"
                )
            if self.state.cx_max is not None:
                raise ConfigError(f"{path}.name", "only one downstream connections monitor may be configured")
            st = self.state
            st.cx_max = limit
            read = lambda: st.cx_active / limit  # noqa: E731
        else:
            raise ConfigError(f"{path}.name", f"unknown resource monitor {name!r}")
        self.monitors[name] = _Monitor(name, read, ctx.stats)

    def _add_action(self, a: Any, path: str, ctx: Any) -> None:
        triggers = []
        for j, t in enumerate(a.triggers):
            tp = f"{path}.triggers[{j}]"
            if t.name not in self.monitors:
                raise ConfigError(f"{tp}.name", f"no resource monitor named {t.name!r}")
            kind = t.WhichOneof("trigger_oneof")
            if kind == "threshold":
                v = t.threshold.value
                triggers.append(_Trigger(t.name, v, v))
            elif kind == "scaled":
                lo, hi = t.scaled.scaling_threshold, t.scaled.saturation_threshold
                if lo > hi:
                    raise ConfigError(
                        f"{tp}.scaled", "scaling_threshold must not exceed saturation_threshold"
                    )
                triggers.append(_Trigger(t.name, lo, hi))
            else:
                raise ConfigError(tp, "one of threshold or scaled is required")
        if a.name not in ACTIONS:
            ctx.notice(f"{path}.name: {a.name!r} is not an overload action moorline takes; ignored")
            return
        act = _Action(a.name, triggers, ctx.stats)
        if a.name == REDUCE_TIMEOUTS:
            self._timer_scales(act, a, path, ctx)
        self.actions.append(act)

    def _timer_scales(self, act: _Action, a: Any, path: str, ctx: Any) -> None:
        from moorline.config.loader import unpack_any

        if not a.HasField("typed_config"):
            raise ConfigError(
                f"{path}.typed_config", "reduce_timeouts needs a ScaleTimersOverloadActionConfig"
            )
        cfg = unpack_any(a.typed_config, f"{path}.typed_config")
        for k, f in enumerate(getattr(cfg, "timer_scale_factors", ())):
            fp = f"{path}.typed_config.timer_scale_factors[{k}]"
            if int(f.timer) != _IDLE_TIMER:
                ctx.notice(f"{fp}.timer: only HTTP_DOWNSTREAM_CONNECTION_IDLE is scaled; ignored")
                continue
            if f.WhichOneof("overload_adjust") == "min_timeout":
                act.min_idle = f.min_timeout.seconds + f.min_timeout.nanos / 1e9
            else:
                act.min_idle_scale = f.min_scale.value / 100.0

    # -- run ----------------------------------------------------------------------------------
    def start(self, loop: Any) -> None:
        self._loop = loop
        self.refresh()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._loop = None

    def _tick(self) -> None:
        self._timer = None
        try:
            self.refresh()
        except Exception:  # the manager must keep ticking whatever one refresh hit
            log.exception("overload manager: refresh failed")
            if self._loop is not None and self._timer is None:
                self._timer = self._loop.call_later(self.refresh_interval, self._tick)

    def refresh(self) -> None:
        for m in self.monitors.values():
            try:
                m.pressure = max(0.0, float(m.read()))
            except Exception:  # a monitor that cannot read keeps its last pressure
                m.failed.value += 1
            m.pressure_gauge.value = round(m.pressure * 100)
        st = self.state
        scales = {}
        for act in self.actions:
            s = max((t.scale(self.monitors[t.monitor].pressure) for t in act.triggers), default=0.0)
            was = act.scale
            act.scale = s
            act.scale_gauge.value = round(s * 100)
            act.active_gauge.value = 1 if s >= 1.0 else 0
            scales[act.name] = s
            if act.name == SHRINK_HEAP and s >= 1.0 and was < 1.0:
                gc.collect()
            elif act.name == REDUCE_TIMEOUTS and (s != was or s > 0.0):
                # Every tick while scaled: a connection manager compiled meanwhile (LDS) joins in.
                self._scale_idle(act, s)
        st.stop_requests = scales.get(STOP_REQUESTS, 0.0) >= 1.0
        st.keepalive_scale = scales.get(DISABLE_KEEPALIVE, 0.0)
        st.refuse_connections = scales.get(STOP_CONNECTIONS, 0.0) >= 1.0
        st.request_actions = st.stop_requests or st.keepalive_scale > 0.0
        if self._loop is not None:
            self._timer = self._loop.call_later(self.refresh_interval, self._tick)

    def _scale_idle(self, act: _Action, scale: float) -> None:
        for hcm, base in list(self.state.hcms.items()):
            lo = act.min_idle if act.min_idle is not None else base * act.min_idle_scale
            lo = min(lo, base)
            hcm.idle_timeout = lo + (base - lo) * (1.0 - scale)
