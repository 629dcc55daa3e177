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


# -- locality weighted load balancing -------------------------------------------------------------


def test_effective_locality_weight_scales_by_overprovisioned_availability() -> None:
    assert lb.effective_locality_weight(3, 4, 4, 140) == 3.0
    # Half the hosts healthy, overprovisioning 140: min(1, 1.4 * 0.5) = 0.7 of the weight.
    assert lb.effective_locality_weight(2, 1, 2, 140) == pytest.approx(1.4)
    assert lb.effective_locality_weight(1, 3, 4, 140) == 1.0  # 1.05 capped at 1
    assert lb.effective_locality_weight(1, 1, 2, 100) == 0.5
    assert lb.effective_locality_weight(0, 4, 4, 140) == 0.0  # no weight: no traffic
    assert lb.effective_locality_weight(5, 0, 4, 140) == 0.0  # no healthy host


def _localities(*weights: float, seed: int = 1) -> tuple[lb.LocalityLB, list[list[H]]]:
    groups = [[H(f"l{i}h{j}") for j in range(2)] for i in range(len(weights))]
    rng = random.Random(seed)
    entries = [(w, lb.build("ROUND_ROBIN", g, rng)) for w, g in zip(weights, groups, strict=True)]  # type: ignore[arg-type]
    return lb.LocalityLB(entries, rng), groups


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_locality_lb_edf_split_is_exact_and_smooth(seed: int) -> None:
    b, (a, z) = _localities(1, 3, seed=seed)
    seq = [b.pick() for _ in range(4000)]
    in_a = sum(1 for h in seq if h in a)
    # EDF: deterministic; the random start shifts the schedule by less than one turn per locality.
    assert abs(in_a - 1000) <= 1
    assert sum(1 for h in seq if h in z) == 4000 - in_a
    # Smooth: the weight-1 locality comes every 4th pick, never two in a row, and locality 3 never
    # gets more than 3 in a row.
    flags = [h in a for h in seq]
    assert not any(flags[i] and flags[i + 1] for i in range(3999))
    assert not any(not any(flags[i : i + 4]) for i in range(3996))
    # Inside a locality its own balancer (round robin here) spreads over its hosts.
    assert Counter(h for h in seq if h in a).keys() == set(a)


def test_locality_lb_fractional_weights_and_zero_weight() -> None:
    b, (a, z, none) = _localities(0.7, 1.0, 0.0)
    assert b.weights == [0.7, 1.0]
    c = Counter(b.pick() for _ in range(1700))  # type: ignore[misc]
    assert abs(sum(c[h] for h in a) - 700) <= 2
    assert abs(sum(c[h] for h in z) - 1000) <= 2
    assert not any(c[h] for h in none)


def test_locality_lb_exclude_moves_to_another_locality() -> None:
    b, (a, z) = _localities(1, 1000)
    # Every host of the heavy locality was tried: the retry goes to the other locality.
    assert all(b.pick(set(z)) in a for _ in range(20))
    # Everything tried: some host rather than none.
    assert b.pick(set(a) | set(z)) in a + z
    assert lb.LocalityLB([], random.Random(1)).pick() is None


# Through a compiled cluster: weights from LocalityLbEndpoints, health, priorities, EDS updates.


def _cluster(localities: list[dict], weighted: bool = True, policy: dict | None = None, **extra: object):  # type: ignore[no-untyped-def]
    from envoy.config.cluster.v3 import cluster_pb2
    from google.protobuf import json_format

    from moorline.observability.stats import Store
    from moorline.upstream.cluster import compile_cluster

    la: dict = {"cluster_name": "c", "endpoints": localities}
    if policy:
        la["policy"] = policy
    d: dict = {"name": "c", "type": "STATIC", "load_assignment": la, **extra}
    if weighted:
        d.setdefault("common_lb_config", {})["locality_weighted_lb_config"] = {}
    return compile_cluster(json_format.ParseDict(d, cluster_pb2.Cluster()), Store(), rng=random.Random(5))


def _loc(
    zone: str, *addrs: str, weight: int | None = None, priority: int = 0, down: tuple[str, ...] = ()
) -> dict:
    lle: dict = {
        "locality": {"region": "r", "zone": zone},
        "priority": priority,
        "lb_endpoints": [
            {
                "endpoint": {"address": {"socket_address": {"address": a, "port_value": 80}}},
                **({"health_status": "UNHEALTHY"} if a in down else {}),
            }
            for a in addrs
        ],
    }
    if weight is not None:
        lle["load_balancing_weight"] = weight
    return lle


def _split(c, n: int = 4000) -> Counter[str]:  # type: ignore[no-untyped-def]
    return Counter(c.choose_host().locality[1] for _ in range(n))


def test_cluster_locality_weights_1_to_3() -> None:
    c = _cluster([_loc("a", "10.0.0.1", weight=1), _loc("b", "10.0.1.1", "10.0.1.2", weight=3)])
    assert c.locality_weighted
    s = _split(c)
    assert abs(s["a"] - 1000) <= 1 and s["a"] + s["b"] == 4000
    # Host weights still count inside the locality; both hosts of b take turns.
    assert {c.choose_host().address for _ in range(8)} == {"10.0.0.1", "10.0.1.1", "10.0.1.2"}  # type: ignore[union-attr]


def test_cluster_without_locality_weighted_config_ignores_locality_weights() -> None:
    c = _cluster([_loc("a", "10.0.0.1", weight=1), _loc("b", "10.0.1.1", weight=3)], weighted=False)
    assert not c.locality_weighted
    assert isinstance(c._lb, lb.RoundRobinLB)  # today's balancer, untouched
    s = _split(c)
    assert s["a"] == s["b"] == 2000


def test_cluster_half_unhealthy_locality_is_scaled_by_overprovisioning() -> None:
    # a: 2 hosts, 1 unhealthy -> 1 * min(1, 1.4 * 0.5) = 0.7; b: weight 1, all healthy.
    c = _cluster(
        [_loc("a", "10.0.0.1", "10.0.0.2", weight=1, down=("10.0.0.2",)), _loc("b", "10.0.1.1", weight=1)]
    )
    assert isinstance(c._lb, lb.LocalityLB)
    assert sorted(c._lb.weights) == [pytest.approx(0.7), 1.0]
    s = _split(c, 1700)
    assert abs(s["a"] - 700) <= 2
    assert {c.choose_host().address for _ in range(50)} == {"10.0.0.1", "10.0.1.1"}  # type: ignore[union-attr]
    # Overprovisioning 200: 2 * 0.5 = 1, no scaling.
    c = _cluster(
        [_loc("a", "10.0.0.1", "10.0.0.2", weight=1, down=("10.0.0.2",)), _loc("b", "10.0.1.1", weight=1)],
        policy={"overprovisioning_factor": 200},
    )
    assert c._lb.weights == [1.0, 1.0]  # type: ignore[union-attr]


def test_cluster_locality_without_weight_gets_no_traffic() -> None:
    c = _cluster([_loc("a", "10.0.0.1"), _loc("b", "10.0.1.1", weight=2)])
    assert set(_split(c, 200)) == {"b"}
    # No locality has a weight: nothing to schedule, the level is balanced over its hosts (Envoy).
    c = _cluster([_loc("a", "10.0.0.1"), _loc("b", "10.0.1.1")])
    assert _split(c, 200) == Counter({"a": 100, "b": 100})


def test_locality_weight_zero_is_a_config_error() -> None:
    from moorline.config.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        _cluster([_loc("a", "10.0.0.1", weight=0)])
    assert e.value.path == "load_assignment.endpoints[0].load_balancing_weight"


def test_cluster_all_unhealthy_locality_then_level_fails_over_then_panics() -> None:
    # The weighted locality has no healthy host: the other takes everything.
    c = _cluster(
        [_loc("a", "10.0.0.1", weight=9, down=("10.0.0.1",)), _loc("b", "10.0.1.1", "10.0.1.2", weight=1)]
    )
    assert set(_split(c, 100)) == {"b"}
    # Priority 0 all down: priority 1 (locality weighted too) takes the load.
    c = _cluster(
        [
            _loc("a", "10.0.0.1", weight=1, down=("10.0.0.1",)),
            _loc("x", "10.1.0.1", weight=1, priority=1),
            _loc("y", "10.1.1.1", weight=3, priority=1),
        ]
    )
    s = _split(c, 400)
    assert abs(s["x"] - 100) <= 2 and s["x"] + s["y"] == 400
    # Under the panic threshold: the level balances all of its hosts, localities ignored (Envoy).
    c = _cluster(
        [
            _loc("a", "10.0.0.1", "10.0.0.2", weight=1, down=("10.0.0.1", "10.0.0.2")),
            _loc("b", "10.0.1.1", weight=100, down=("10.0.1.1",)),
        ]
    )
    before = c.stats.lb_healthy_panic.value
    assert {c.choose_host().address for _ in range(30)} == {"10.0.0.1", "10.0.0.2", "10.0.1.1"}  # type: ignore[union-attr]
    assert c.stats.lb_healthy_panic.value == before + 30


def test_cluster_health_change_and_eds_update_rebuild_the_locality_schedule() -> None:
    from envoy.config.endpoint.v3 import endpoint_pb2
    from google.protobuf import json_format

    c = _cluster([_loc("a", "10.0.0.1", weight=1), _loc("b", "10.0.1.1", weight=1)])
    assert _split(c, 400) == Counter({"a": 200, "b": 200})
    # Outlier ejection (or a failed health check) of b's only host: a takes all.
    hb = next(h for h in c.hosts if h.locality[1] == "b")
    hb.outlier_ejected = True
    c.health_changed()
    assert set(_split(c, 100)) == {"a"}
    hb.outlier_ejected = False
    c.health_changed()
    # An EDS update with new weights: the host objects stay, the schedule follows the weights.
    cla = json_format.ParseDict(
        {
            "cluster_name": "c",
            "endpoints": [_loc("a", "10.0.0.1", weight=1), _loc("b", "10.0.1.1", weight=4)],
        },
        endpoint_pb2.ClusterLoadAssignment(),
    )
    kept = list(c.hosts)
    c.update_load_assignment(cla)
    assert c.hosts == kept and [h.locality_weight for h in c.hosts] == [1, 4]
    s = _split(c, 500)
    assert abs(s["a"] - 100) <= 1
    # The config dump shows the locality weights it balances by.
    view = c.load_assignment_view()
    assert [(e.locality.zone, e.load_balancing_weight.value) for e in view.endpoints] == [("a", 1), ("b", 4)]


def test_policy_extension_locality_lb_config_and_zone_aware_notice() -> None:
    from envoy.extensions.load_balancing_policies.round_robin.v3 import round_robin_pb2  # noqa: F401

    rr = "type.googleapis.com/envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin"
    pol = {
        "policies": [
            {
                "typed_extension_config": {
                    "name": "rr",
                    "typed_config": {"@type": rr, "locality_lb_config": {"locality_weighted_lb_config": {}}},
                }
            }
        ]
    }
    locs = [_loc("a", "10.0.0.1", weight=1), _loc("b", "10.0.1.1", weight=3)]
    c = _cluster(locs, weighted=False, load_balancing_policy=pol)
    assert c.locality_weighted and abs(_split(c)["a"] - 1000) <= 1
    za = {
        "typed_extension_config": {
            "name": "rr",
            "typed_config": {"@type": rr, "locality_lb_config": {"zone_aware_lb_config": {}}},
        }
    }
    c = _cluster(locs, weighted=False, load_balancing_policy={"policies": [za]})
    assert not c.locality_weighted
    assert any(
        n.startswith(
            "load_balancing_policy.policies[0].typed_extension_config.typed_config.locality_lb_config.zone_aware_lb_config:"
        )
        and "local_cluster_name" in n
        for n in c.notices
    )
    c = _cluster(locs, weighted=False, common_lb_config={"zone_aware_lb_config": {"min_cluster_size": 3}})
    assert not c.locality_weighted
    assert any(
        n.startswith("common_lb_config.zone_aware_lb_config: zone-aware routing is not implemented")
        for n in c.notices
    )


def test_original_dst_with_locality_weighting_is_a_notice() -> None:
    from envoy.config.cluster.v3 import cluster_pb2
    from google.protobuf import json_format

    from moorline.observability.stats import Store
    from moorline.upstream.cluster import compile_cluster

    d = {
        "name": "od",
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "common_lb_config": {"locality_weighted_lb_config": {}},
    }
    c = compile_cluster(json_format.ParseDict(d, cluster_pb2.Cluster()), Store())
    assert any(n.startswith("common_lb_config.locality_weighted_lb_config: ORIGINAL_DST") for n in c.notices)
