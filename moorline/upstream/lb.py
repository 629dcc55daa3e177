"""Load balancers: ROUND_ROBIN (weighted), RANDOM (weighted), LEAST_REQUEST.

A load balancer is an immutable view over one host list; the cluster builds a new one whenever
membership or health changes, so ``pick`` never checks for staleness. ``pick(exclude)`` returns a
host not in ``exclude`` (hosts already tried by a retry) when the list has one, otherwise a host
ignoring ``exclude`` (a retry to the same host beats no retry, as with Envoy's
``host_selection_retry_max_attempts`` running out), and ``None`` only for an empty list.

Costs on the hot path (empty ``exclude``):

- ROUND_ROBIN: O(1). Equal weights walk the host list. Different weights walk a precomputed cycle
  produced by earliest-deadline-first scheduling (host *i* is due every ``1/w_i``), which is what
  Envoy's EDF scheduler produces, spread out like nginx's smooth weighted round robin rather than
  bursts of one host. The cycle has ``sum(w)/gcd(w)`` entries; it is bounded by
  ``MAX_SCHEDULE``, above which the scheduler runs live on a heap (O(log n) per pick).
- RANDOM: O(1). Equal weights index the host list; different weights index the same expanded
  cycle (each host appears ``w_i/gcd`` times), or bisect cumulative weights above the bound.
- LEAST_REQUEST: equal weights: Envoy's power-of-``choice_count``-choices (default 2), sampled
  with replacement, fewest ``active_rq`` wins (first sampled wins a tie). Different weights: EDF
  on a heap where a host's effective weight is ``weight / (active_rq + 1) ** active_request_bias``
  computed when it is (re)scheduled, as Envoy does; O(log n).

Every balancer starts at a random offset (Envoy does too) so that worker processes do not all
send their first requests to the same host.
"""

from __future__ import annotations

import bisect
import heapq
import math
import random
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from moorline.upstream.cluster import Host

# Bound on a precomputed weighted cycle (entries, i.e. references: ~128 KiB at most per balancer).
MAX_SCHEDULE = 16384

POLICIES = ("ROUND_ROBIN", "LEAST_REQUEST", "RANDOM")


class LoadBalancer(Protocol):
    def pick(self, exclude: Collection[Host] | None = None) -> Host | None: ...


def _cycle_length(weights: Sequence[int]) -> tuple[int, int]:
    g = 0
    for w in weights:
        g = math.gcd(g, w)
    return sum(weights) // g, g


def edf_cycle(hosts: Sequence[Host]) -> list[Host]:
    """One full EDF cycle: host *i* appears exactly ``w_i / gcd`` times, interleaved by deadline.

    Float deadlines are exact enough here: the cycle's last deadline is ``1/gcd`` for every host
    (each correctly rounded to the same double), and the first deadline after the cycle exceeds it
    by ``1/w_i``, far more than rounding error, so the first ``L`` pops are exactly the cycle.
    """
    length, _g = _cycle_length([h.weight for h in hosts])
    heap = [(1.0 / h.weight, i, 1) for i, h in enumerate(hosts)]
    heapq.heapify(heap)
    out: list[Host] = []
    for _ in range(length):
        _d, i, k = heapq.heappop(heap)
        out.append(hosts[i])
        heapq.heappush(heap, ((k + 1) / hosts[i].weight, i, k + 1))
    return out


def _first_other(seq: Sequence[Host], start: int, exclude: Collection[Host]) -> Host | None:
    n = len(seq)
    for k in range(n):
        h = seq[(start + k) % n]
        if h not in exclude:
            return h
    return None


class RoundRobinLB:
    __slots__ = ("_heap", "_hosts", "_i", "_n", "_now", "_seq")

    def __init__(self, hosts: Sequence[Host], rng: random.Random) -> None:
        self._hosts = list(hosts)
        self._heap: list[tuple[float, int]] | None = None
        self._now = 0.0
        weights = [h.weight for h in hosts]
        if not hosts or min(weights) == max(weights):
            seq = self._hosts
        elif _cycle_length(weights)[0] <= MAX_SCHEDULE:
            seq = edf_cycle(hosts)
        else:
            seq = self._hosts
            self._heap = [(1.0 / h.weight + rng.random() * 1e-9, i) for i, h in enumerate(hosts)]
            heapq.heapify(self._heap)
        self._seq = seq
        self._n = len(seq)
        self._i = rng.randrange(self._n) if self._n else 0

    def pick(self, exclude: Collection[Host] | None = None) -> Host | None:
        if self._heap is not None:
            return self._pick_heap(exclude)
        n = self._n
        if not n:
            return None
        i = self._i
        self._i = i + 1 if i + 1 < n else 0
        h = self._seq[i]
        if exclude and h in exclude:
            return _first_other(self._seq, i + 1, exclude) or h
        return h

    def _pick_heap(self, exclude: Collection[Host] | None) -> Host | None:
        heap = self._heap
        assert heap is not None
        hosts = self._hosts
        first: Host | None = None
        for _ in range(len(heap)):
            d, i = heapq.heappop(heap)
            heapq.heappush(heap, (d + 1.0 / hosts[i].weight, i))
            h = hosts[i]
            if not exclude or h not in exclude:
                return h
            if first is None:
                first = h
        return first


class RandomLB:
    __slots__ = ("_cum", "_hosts", "_n", "_rand", "_seq", "_total")

    def __init__(self, hosts: Sequence[Host], rng: random.Random) -> None:
        self._hosts = list(hosts)
        self._rand: Callable[[], float] = rng.random
        self._cum: list[int] | None = None
        self._total = 0
        weights = [h.weight for h in hosts]
        if not hosts or min(weights) == max(weights):
            self._seq = self._hosts
        else:
            length, g = _cycle_length(weights)
            if length <= MAX_SCHEDULE:
                self._seq = [h for h in hosts for _ in range(h.weight // g)]
            else:
                self._seq = self._hosts
                acc = 0
                self._cum = []
                for w in weights:
                    acc += w
                    self._cum.append(acc)
                self._total = acc
        self._n = len(self._seq)

    def pick(self, exclude: Collection[Host] | None = None) -> Host | None:
        n = self._n
        if not n:
            return None
        if self._cum is None:
            h = self._seq[int(self._rand() * n)]
        else:
            h = self._hosts[bisect.bisect_right(self._cum, int(self._rand() * self._total))]
        if exclude and h in exclude:
            rest = [x for x in self._hosts if x not in exclude]
            if not rest:
                return h
            # Weighted choice among the remaining hosts (retries only: O(n) is fine here).
            target = self._rand() * sum(x.weight for x in rest)
            for x in rest:
                target -= x.weight
                if target < 0:
                    return x
            return rest[-1]
        return h


class LeastRequestLB:
    __slots__ = ("_bias", "_choices", "_heap", "_hosts", "_n", "_now", "_rand")

    def __init__(
        self,
        hosts: Sequence[Host],
        rng: random.Random,
        choice_count: int = 2,
        active_request_bias: float = 1.0,
    ) -> None:
        self._hosts = list(hosts)
        self._n = len(self._hosts)
        self._rand: Callable[[], float] = rng.random
        self._choices = choice_count
        self._bias = active_request_bias
        self._now = 0.0
        self._heap: list[tuple[float, int]] | None = None
        weights = [h.weight for h in hosts]
        if hosts and min(weights) != max(weights):
            # Random initial offsets within the first period: no startup herd on host 0.
            self._heap = [(rng.random() / h.weight, i) for i, h in enumerate(hosts)]
            heapq.heapify(self._heap)

    def _effective_weight(self, h: Host) -> float:
        if self._bias == 0.0:
            return float(h.weight)
        if self._bias == 1.0:
            return h.weight / (h.active_rq + 1)
        return h.weight / (h.active_rq + 1) ** self._bias

    def pick(self, exclude: Collection[Host] | None = None) -> Host | None:
        n = self._n
        if not n:
            return None
        if self._heap is not None:
            return self._pick_edf(exclude)
        hosts = self._hosts
        if exclude:
            rest = [h for h in hosts if h not in exclude]
            if rest:
                hosts = rest
                n = len(rest)
        rand = self._rand
        best = hosts[int(rand() * n)]
        for _ in range(self._choices - 1):
            h = hosts[int(rand() * n)]
            if h.active_rq < best.active_rq:
                best = h
        return best

    def _pick_edf(self, exclude: Collection[Host] | None) -> Host | None:
        heap = self._heap
        assert heap is not None
        hosts = self._hosts
        first: Host | None = None
        for _ in range(len(heap)):
            d, i = heapq.heappop(heap)
            h = hosts[i]
            # Rescheduled from its own deadline with the weight it has *now* (Envoy recomputes
            # the effective weight when a host is put back into the EDF scheduler).
            self._now = d
            heapq.heappush(heap, (d + 1.0 / self._effective_weight(h), i))
            if not exclude or h not in exclude:
                return h
            if first is None:
                first = h
        return first


DEFAULT_OVERPROVISIONING = 140  # Envoy's overprovisioning_factor default (percent)


def priority_loads(levels: Sequence[tuple[int, int]], overprovisioning: int) -> list[float]:
    """Envoy's priority load: the share of traffic (percent) each priority level takes, from its
    ``(healthy, total)`` host counts. A level's health is its healthy share times the
    overprovisioning factor, capped at 100; level 0 takes its health, each next level what is
    left up to its own health. When the levels' healths add up to less than 100 the loads are
    scaled up to 100 (all zero when no level has a healthy host)."""
    health = [min(100.0, healthy * overprovisioning / total) if total else 0.0 for healthy, total in levels]
    loads: list[float] = []
    left = 100.0
    for h in health:
        take = min(left, h)
        loads.append(take)
        left -= take
    total = sum(health)
    if 0 < total < 100:
        loads = [x * 100 / min(100.0, total) for x in loads]
    return loads


def _cumulative(loads: Sequence[float]) -> list[float]:
    cum = []
    acc = 0.0
    for x in loads:
        acc += x
        cum.append(acc)
    return cum


class PriorityLB:
    """Priority failover over per-level balancers: a draw over ``loads`` picks the level, the
    level's balancer the host (another level is tried if it has nothing outside ``exclude``)."""

    __slots__ = ("_counts", "_cum", "_levels", "_overprovisioning", "_rng", "loads", "priorities")

    def __init__(
        self,
        levels: Sequence[LoadBalancer | None],
        loads: Sequence[float],
        rng: random.Random,
        priorities: Sequence[int] = (),
        counts: Sequence[tuple[int, int]] = (),
        overprovisioning: int = 140,
    ) -> None:
        self._levels = list(levels)
        self.loads = list(loads)
        self._rng = rng
        self._cum = _cumulative(loads)
        # for pick_excluding: each level's priority and (healthy, total) counts
        self.priorities = list(priorities)
        self._counts = list(counts)
        self._overprovisioning = overprovisioning

    def pick(self, exclude: Collection[Host] | None = None) -> Host | None:
        return self._pick(self.loads, self._cum, exclude)

    def pick_excluding(
        self, priorities: Collection[int], exclude: Collection[Host] | None = None
    ) -> Host | None:
        """One pick with the levels of ``priorities`` counted as having no healthy host (the
        priority load recomputed for this pick only, as ``previous_priorities`` asks); when
        that leaves no level with load, the ordinary pick."""
        if not self._counts or not priorities:
            return self.pick(exclude)
        counts = [
            (0, total) if p in priorities else (healthy, total)
            for p, (healthy, total) in zip(self.priorities, self._counts, strict=True)
        ]
        loads = priority_loads(counts, self._overprovisioning)
        if not any(loads):
            return self.pick(exclude)
        return self._pick(loads, _cumulative(loads), exclude)

    def _pick(
        self, loads: Sequence[float], cum: Sequence[float], exclude: Collection[Host] | None
    ) -> Host | None:
        r = self._rng.random() * (cum[-1] if cum else 0.0)
        order = list(range(len(self._levels)))
        for i, c in enumerate(cum):
            if r < c:
                order.insert(0, order.pop(i))
                break
        for i in order:
            lb = self._levels[i]
            if lb is None or (loads[i] <= 0 and i != order[0]):
                continue
            h = lb.pick(exclude)
            if h is not None:
                return h
        return None


def effective_locality_weight(weight: int, healthy: int, total: int, overprovisioning: int) -> float:
    """Envoy's effective locality weight: the locality's ``load_balancing_weight`` scaled by its
    availability, ``healthy / total`` times the overprovisioning factor (percent), capped at 1.
    A locality without a weight (0), or without a healthy host, gets 0: no traffic."""
    if weight <= 0 or healthy <= 0 or total <= 0:
        return 0.0
    return weight * min(1.0, healthy * overprovisioning / (100.0 * total))


class LocalityLB:
    """Locality weighted balancing inside one priority level: an earliest-deadline-first schedule
    picks the locality (locality *i* is due every ``1/w_i``, its *k*-th turn at ``k/w_i``, ties to
    the lower index), then that locality's balancer picks the host. Deterministic and smooth: after
    n picks a locality has had ``n * w_i / sum(w)`` of them give or take fewer than m (the number of
    localities); no locality gets a burst. O(log m) per pick. Entries with a weight of 0 are dropped (no traffic). Like the other
    balancers it starts a random number of turns into the schedule (fewer than m), so worker
    processes do not all begin with the same locality.

    ``exclude``: when the scheduled locality has no host outside it, the other localities are
    asked in turn (a retry prefers another host to the same one); the schedule advances once."""

    __slots__ = ("_heap", "_levels", "weights")

    def __init__(self, entries: Sequence[tuple[float, LoadBalancer]], rng: random.Random) -> None:
        kept = [(w, b) for w, b in entries if w > 0]
        self.weights = [w for w, _b in kept]  # the effective weights, in schedule order
        self._levels = [b for _w, b in kept]
        self._heap: list[tuple[float, int, int]] = [(1.0 / w, i, 1) for i, w in enumerate(self.weights)]
        heapq.heapify(self._heap)
        for _ in range(rng.randrange(len(kept)) if kept else 0):
            self._next()

    def _next(self) -> int:
        heap = self._heap
        _d, i, k = heap[0]
        heapq.heapreplace(heap, ((k + 1) / self.weights[i], i, k + 1))
        return i

    def pick(self, exclude: Collection[Host] | None = None) -> Host | None:
        if not self._heap:
            return None
        i = self._next()
        h = self._levels[i].pick(exclude)
        if h is not None and (not exclude or h not in exclude):
            return h
        first = h
        n = len(self._levels)
        for k in range(1, n):
            other = self._levels[(i + k) % n].pick(exclude)
            if other is not None and not (exclude and other in exclude):
                return other
            if first is None:
                first = other
        return first


def build(
    policy: str,
    hosts: Sequence[Host],
    rng: random.Random,
    choice_count: int = 2,
    active_request_bias: float = 1.0,
) -> LoadBalancer:
    """A balancer for ``policy`` (one of ``POLICIES``) over ``hosts``."""
    if policy == "ROUND_ROBIN":
        return RoundRobinLB(hosts, rng)
    if policy == "RANDOM":
        return RandomLB(hosts, rng)
    if policy == "LEAST_REQUEST":
        return LeastRequestLB(hosts, rng, choice_count, active_request_bias)
    raise ValueError(f"unknown lb policy {policy!r}")
