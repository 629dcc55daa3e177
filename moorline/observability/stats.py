"""Stats store: counters, gauges and histograms as plain slots.

The hot path does ``counter.value += 1`` on an object it looked up once at
configuration time; names are only touched at scrape time, when
``moorline.observability.render`` turns the store into Envoy text or
Prometheus exposition format.

Names follow Envoy's (``cluster.<name>.upstream_rq_total``); tags are
extracted from the name at render time, as Envoy's default tag extractors do.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator

# Envoy's default histogram bucket bounds (milliseconds for time histograms).
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.5,
    1,
    5,
    10,
    25,
    50,
    100,
    250,
    500,
    1000,
    2500,
    5000,
    10000,
    30000,
    60000,
    300000,
    600000,
    1800000,
    3600000,
)


class Counter:
    """Monotonic counter. Hot path: ``c.value += n``."""

    __slots__ = ("name", "value")
    kind = "counter"

    def __init__(self, name: str) -> None:
        self.name = name
        self.value = 0

    def inc(self, n: int = 1) -> None:
        self.value += n


class Gauge:
    """Gauge. Hot path: ``g.value += 1`` / ``g.value -= 1``."""

    __slots__ = ("name", "value")
    kind = "gauge"

    def __init__(self, name: str) -> None:
        self.name = name
        self.value = 0

    def inc(self, n: int = 1) -> None:
        self.value += n

    def dec(self, n: int = 1) -> None:
        self.value -= n

    def set(self, v: int) -> None:
        self.value = v


class StateGauge(Gauge):
    """A gauge whose 0 is a value, not "unused" (``server.state`` is 0 when LIVE): it is always
    listed under ``/stats?usedonly``, as Envoy lists a gauge that was ever set."""

    __slots__ = ()


class DerivedGauge(Gauge):
    """A gauge computed when read (``fn()``), for values the hot path already keeps elsewhere
    (a circuit breaker's remaining capacity is its limit minus a live count): nothing is
    updated per request. Writes are ignored."""

    __slots__ = ("fn",)

    def __init__(self, name: str, fn: Callable[[], int]) -> None:
        self.name = name
        self.fn = fn

    @property  # type: ignore[override]
    def value(self) -> int:
        return self.fn()

    @value.setter
    def value(self, v: int) -> None:
        pass


class Histogram:
    """Cumulative histogram with fixed bucket bounds.

    ``counts[i]`` counts samples ``<= buckets[i]``-but-greater-than-previous;
    the last slot counts samples above every bound. Memory is bounded by the
    number of buckets, not by the number of samples.
    """

    __slots__ = ("buckets", "count", "counts", "name", "sum")
    kind = "histogram"

    def __init__(self, name: str, buckets: tuple[float, ...] = DEFAULT_BUCKETS) -> None:
        self.name = name
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def record(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[int]:
        out = []
        total = 0
        for c in self.counts[:-1]:
            total += c
            out.append(total)
        return out

    def quantile(self, q: float) -> float | None:
        """Approximate quantile (upper bound of the bucket that holds it)."""
        if not self.count:
            return None
        target = q * self.count
        total = 0
        for bound, c in zip(self.buckets, self.counts, strict=False):
            total += c
            if total >= target:
                return float(bound)
        return float(self.buckets[-1])


Stat = Counter | Gauge | Histogram


class Store:
    """All stats of one server. Get-or-create by full name."""

    def __init__(self) -> None:
        self._stats: dict[str, Stat] = {}

    def counter(self, name: str) -> Counter:
        s = self._stats.get(name)
        if s is None:
            s = self._stats[name] = Counter(name)
        assert isinstance(s, Counter), name
        return s

    def gauge(self, name: str) -> Gauge:
        s = self._stats.get(name)
        if s is None:
            s = self._stats[name] = Gauge(name)
        assert isinstance(s, Gauge), name
        return s

    def state_gauge(self, name: str) -> Gauge:
        """A ``StateGauge`` (listed by ``usedonly`` even at 0); get-or-create like ``gauge``."""
        s = self._stats.get(name)
        if s is None:
            s = self._stats[name] = StateGauge(name)
        assert isinstance(s, Gauge), name
        return s

    def derived_gauge(self, name: str, fn: Callable[[], int]) -> Gauge:
        """A ``DerivedGauge`` reading ``fn``; one already there (or a plain gauge of that name)
        is replaced, so the newest owner of the name (a cluster rebuilt by CDS) reports."""
        s = self._stats.get(name)
        if isinstance(s, DerivedGauge):
            s.fn = fn
            return s
        assert s is None or isinstance(s, Gauge), name
        g = self._stats[name] = DerivedGauge(name, fn)
        return g

    def histogram(self, name: str) -> Histogram:
        s = self._stats.get(name)
        if s is None:
            s = self._stats[name] = Histogram(name)
        assert isinstance(s, Histogram), name
        return s

    def scope(self, prefix: str) -> Scope:
        return Scope(self, prefix)

    def get(self, name: str) -> Stat | None:
        return self._stats.get(name)

    def __iter__(self) -> Iterator[Stat]:
        return iter(sorted(self._stats.values(), key=lambda s: s.name))

    def __len__(self) -> int:
        return len(self._stats)


class Scope:
    """A name prefix over a store: ``scope('cluster.foo.').counter('upstream_rq_total')``."""

    __slots__ = ("prefix", "store")

    def __init__(self, store: Store, prefix: str) -> None:
        if prefix and not prefix.endswith("."):
            prefix += "."
        self.store = store
        self.prefix = prefix

    def counter(self, name: str) -> Counter:
        return self.store.counter(self.prefix + name)

    def gauge(self, name: str) -> Gauge:
        return self.store.gauge(self.prefix + name)

    def state_gauge(self, name: str) -> Gauge:
        return self.store.state_gauge(self.prefix + name)

    def derived_gauge(self, name: str, fn: Callable[[], int]) -> Gauge:
        return self.store.derived_gauge(self.prefix + name, fn)

    def histogram(self, name: str) -> Histogram:
        return self.store.histogram(self.prefix + name)

    def scope(self, prefix: str) -> Scope:
        return Scope(self.store, self.prefix + prefix)


def listener_stat_prefix(host: str, port: int | None, stat_prefix: str = "") -> str:
    """Envoy's stats scope for a listener: ``listener.<address>.``.

    The address is ``ip:port`` with every ``:`` made ``_`` (``listener.127.0.0.1_10000.``,
    ``listener.[__1]_10000.``), or the listener's ``stat_prefix`` when it has one; the
    Prometheus renderer's ``envoy_listener_address`` tag expects exactly this form.
    """
    if stat_prefix:
        return f"listener.{stat_prefix}."
    if port is None:  # pipe: the path stands for the address
        return f"listener.{host.replace(':', '_')}."
    addr = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"listener.{addr.replace(':', '_')}."
