"""Load balancers over small fake hosts: distributions (seeded, generous bounds), exclude, EDF."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from moorline.upstream import lb


class H:
    """What a balancer reads from a host: weight and active_rq (hash/eq by identity)."""

    __slots__ = ("active_rq", "name", "weight")

    def __init__(self, name: str, weight: int = 1, active_rq: int = 0) -> None:
        self.name = name
        self.weight = weight
        self.active_rq = active_rq

    def __repr__(self) -> str:
        return self.name


def hosts(*weights: int) -> list[H]:
    return [H(f"h{i}", w) for i, w in enumerate(weights)]


def picks(balancer: lb.LoadBalancer, n: int, exclude: set[H] | None = None) -> Counter[H]:
    return Counter(balancer.pick(exclude) for _ in range(n))  # type: ignore[misc]


@pytest.mark.parametrize("policy", lb.POLICIES)
def test_empty_host_list_gives_none(policy: str) -> None:
    assert lb.build(policy, [], random.Random(1)).pick() is None
    assert lb.build(policy, [], random.Random(1)).pick({H("x")}) is None


def test_round_robin_equal_weights_cycles_in_order() -> None:
    hs = hosts(1, 1, 1)
    b = lb.build("ROUND_ROBIN", hs, random.Random(7))  # type: ignore[arg-type]
    seq = [b.pick() for _ in range(9)]
    start = hs.index(seq[0])  # type: ignore[arg-type]
    assert seq == [hs[(start + k) % 3] for k in range(9)]


def test_round_robin_weighted_exact_per_cycle_and_interleaved() -> None:
    hs = hosts(1, 2, 3)
    b = lb.build("ROUND_ROBIN", hs, random.Random(3))  # type: ignore[arg-type]
    c = picks(b, 600)
    assert [c[h] for h in hs] == [100, 200, 300]
    # EDF spreads picks: the heaviest host never gets 3 consecutive picks out of a 1:2:3 cycle.
    seq = [b.pick() for _ in range(60)]
    assert not any(seq[i] is seq[i + 1] is seq[i + 2] for i in range(58))


def test_edf_cycle_counts_are_exact() -> None:
    hs = hosts(4, 6, 10)  # gcd 2 -> cycle of 10
    cyc = lb.edf_cycle(hs)  # type: ignore[arg-type]
    assert len(cyc) == 10
    assert Counter(cyc) == {hs[0]: 2, hs[1]: 3, hs[2]: 5}


def test_round_robin_large_cycle_uses_live_edf() -> None:
    hs = hosts(10007, 20011)  # coprime: cycle 30018 > MAX_SCHEDULE
    b = lb.build("ROUND_ROBIN", hs, random.Random(5))  # type: ignore[arg-type]
    assert isinstance(b, lb.RoundRobinLB) and b._heap is not None
    c = picks(b, 3000)
    assert 950 <= c[hs[0]] <= 1050


def test_round_robin_exclude_skips_tried_hosts() -> None:
    hs = hosts(1, 1, 1)
    b = lb.build("ROUND_ROBIN", hs, random.Random(1))  # type: ignore[arg-type]
    for _ in range(10):
        assert b.pick({hs[0], hs[1]}) is hs[2]
    # Every host excluded: a host is still returned (a retry to a tried host beats none).
    assert b.pick(set(hs)) in hs


def test_random_equal_weights_distribution() -> None:
    hs = hosts(1, 1, 1)
    c = picks(lb.build("RANDOM", hs, random.Random(11)), 3000)  # type: ignore[arg-type]
    assert all(800 <= c[h] <= 1200 for h in hs), c


def test_random_weighted_distribution() -> None:
    hs = hosts(1, 3)
    c = picks(lb.build("RANDOM", hs, random.Random(12)), 4000)  # type: ignore[arg-type]
    assert 0.70 <= c[hs[1]] / 4000 <= 0.80, c


def test_random_weighted_large_cycle_uses_cumulative_weights() -> None:
    hs = hosts(10007, 30011)
    b = lb.build("RANDOM", hs, random.Random(13))  # type: ignore[arg-type]
    assert isinstance(b, lb.RandomLB) and b._cum is not None
    c = picks(b, 4000)
    assert 0.70 <= c[hs[1]] / 4000 <= 0.80, c


def test_random_exclude_weighted_among_remaining() -> None:
    hs = hosts(1, 1, 4)
    b = lb.build("RANDOM", hs, random.Random(14))  # type: ignore[arg-type]
    c = picks(b, 2000, {hs[0]})
    assert c[hs[0]] == 0
    assert 0.72 <= c[hs[2]] / 2000 <= 0.88, c
    assert picks(b, 50, set(hs)).total() == 50  # all excluded: still answers


def test_least_request_prefers_idle_host() -> None:
    hs = hosts(1, 1)
    hs[0].active_rq = 5
    c = picks(lb.build("LEAST_REQUEST", hs, random.Random(21)), 2000)  # type: ignore[arg-type]
    # Power of two choices with replacement: the idle host wins 3/4 of picks.
    assert 0.68 <= c[hs[1]] / 2000 <= 0.82, c


def test_least_request_choice_count_sharpens_preference() -> None:
    hs = hosts(1, 1, 1)
    hs[0].active_rq = hs[1].active_rq = 3
    c2 = picks(lb.build("LEAST_REQUEST", hs, random.Random(22)), 3000)  # type: ignore[arg-type]
    c5 = picks(lb.build("LEAST_REQUEST", hs, random.Random(22), choice_count=5), 3000)  # type: ignore[arg-type]
    assert 0.48 <= c2[hs[2]] / 3000 <= 0.63  # 1 - (2/3)^2 = 0.56
    assert 0.82 <= c5[hs[2]] / 3000 <= 0.92  # 1 - (2/3)^5 = 0.87


def test_least_request_exclude() -> None:
    hs = hosts(1, 1, 1)
    b = lb.build("LEAST_REQUEST", hs, random.Random(23))  # type: ignore[arg-type]
    assert set(picks(b, 200, {hs[0]})) == {hs[1], hs[2]}
    assert b.pick(set(hs)) in hs


def test_least_request_weighted_follows_weights_when_idle() -> None:
    hs = hosts(1, 3)
    c = picks(lb.build("LEAST_REQUEST", hs, random.Random(24)), 4000)  # type: ignore[arg-type]
    assert 0.70 <= c[hs[1]] / 4000 <= 0.80, c


def test_least_request_weighted_active_requests_shift_load() -> None:
    hs = hosts(1, 3)
    hs[1].active_rq = 9  # effective weight 3 / 10 = 0.3 against 1 / 1
    c = picks(lb.build("LEAST_REQUEST", hs, random.Random(25)), 4000)  # type: ignore[arg-type]
    assert c[hs[0]] > 2.5 * c[hs[1]], c
    # Bias 0 ignores outstanding requests: plain weights again.
    c0 = picks(lb.build("LEAST_REQUEST", hs, random.Random(25), active_request_bias=0.0), 4000)  # type: ignore[arg-type]
    assert 0.70 <= c0[hs[1]] / 4000 <= 0.80, c0


def test_least_request_weighted_exclude() -> None:
    hs = hosts(1, 2, 3)
    b = lb.build("LEAST_REQUEST", hs, random.Random(26))  # type: ignore[arg-type]
    assert hs[2] not in picks(b, 300, {hs[2]})


def test_unknown_policy_rejected() -> None:
    with pytest.raises(ValueError):
        lb.build("MAGLEV", hosts(1), random.Random(1))  # type: ignore[arg-type]


def test_priority_lb_pick_excluding_moves_the_load_to_the_next_level() -> None:
    rng = random.Random(1)
    p0, p1 = hosts(1, 1), hosts(1)
    levels = [lb.RoundRobinLB(p0, rng), lb.RoundRobinLB(p1, rng)]  # type: ignore[arg-type]
    counts = [(2, 2), (1, 1)]
    loads = lb.priority_loads(counts, 140)
    assert loads == [100.0, 0.0]
    plb = lb.PriorityLB(levels, loads, rng, [0, 5], counts, 140)
    assert all(plb.pick() in p0 for _ in range(20))
    assert all(plb.pick_excluding({0}) in p1 for _ in range(20))  # priority 0 avoided
    assert plb.pick_excluding({7}) in p0  # an unknown priority changes nothing
    assert plb.pick_excluding({0, 5}) in p0  # every level tried: the ordinary pick
    assert all(plb.pick() in p0 for _ in range(5))  # one pick only: the loads are unchanged
