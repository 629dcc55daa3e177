"""Outlier detection driven in memory: a real compiled cluster, a fake clock, seeded draws."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from google.protobuf import json_format

from moorline.config.errors import ConfigError
from moorline.observability.stats import Store
from moorline.upstream import outlier as od
from moorline.upstream.cluster import Cluster, Host, compile_cluster


def _cluster(n: int, outlier: dict[str, Any], store: Store | None = None, **extra: Any) -> Cluster:
    d: dict[str, Any] = {
        "name": "svc",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": "svc",
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {"socket_address": {"address": "10.0.0.1", "port_value": 80 + i}}
                            }
                        }
                        for i in range(n)
                    ]
                }
            ],
        },
        "outlier_detection": outlier,
        **extra,
    }
    return compile_cluster(
        json_format.ParseDict(d, cluster_pb2.Cluster()), store or Store(), rng=random.Random(1)
    )


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _det(c: Cluster) -> tuple[od.OutlierDetector, Clock]:
    d = c.outlier
    assert isinstance(d, od.OutlierDetector)
    clk = Clock()
    d.clock = clk
    return d, clk


def _stat(c: Cluster, name: str) -> int:
    return c.stats.scope.store.counter(f"cluster.svc.outlier_detection.{name}").value  # type: ignore[no-any-return]


def _gauge(c: Cluster, name: str) -> int:
    return c.stats.scope.store.gauge(f"cluster.svc.outlier_detection.{name}").value  # type: ignore[no-any-return]


def _picks(c: Cluster, n: int = 30) -> set[Host]:
    out = set()
    for _ in range(n):
        h = c.choose_host()
        assert h is not None
        out.add(h)
    return out


def test_no_outlier_detection_leaves_cluster_outlier_none() -> None:
    d = {"name": "x", "type": "STATIC", "connect_timeout": "1s"}
    c = compile_cluster(json_format.ParseDict(d, cluster_pb2.Cluster()), Store())
    assert c.outlier is None
    assert not any("outlier" in n for n in c.notices)


def test_consecutive_5xx_ejects_then_returns_after_base_time() -> None:
    c = _cluster(
        3, {"consecutive_5xx": 3, "base_ejection_time": "1s", "interval": "0.5s", "max_ejection_percent": 50}
    )
    d, clk = _det(c)
    bad = c.hosts[0]
    assert not any("outlier" in n for n in c.notices)
    d.put_http(bad, 500)
    d.put_http(bad, 500)
    d.put_http(bad, 200)  # a success breaks the streak
    d.put_http(bad, 500)
    d.put_http(bad, 500)
    assert not bad.outlier_ejected
    d.put_http(bad, 500)
    assert bad.outlier_ejected
    assert bad not in _picks(c)
    assert _stat(c, "ejections_enforced_consecutive_5xx") == 1
    assert _stat(c, "ejections_detected_consecutive_5xx") == 1
    assert _stat(c, "ejections_enforced_total") == 1
    assert _gauge(c, "ejections_active") == 1
    clk.t += 0.5
    d.evaluate(clk.t)
    assert bad.outlier_ejected  # 0.5 s of 1 s
    clk.t += 0.5
    d.evaluate(clk.t)
    assert not bad.outlier_ejected
    assert bad in _picks(c)
    assert _gauge(c, "ejections_active") == 0


def test_ejection_time_grows_with_repeated_ejections_and_is_capped() -> None:
    c = _cluster(2, {"consecutive_5xx": 1, "base_ejection_time": "10s", "max_ejection_time": "25s",
                     "max_ejection_percent": 100})  # fmt: skip
    d, clk = _det(c)
    h = c.hosts[0]
    durations = []
    for _ in range(4):
        d.put_http(h, 503)
        assert h.outlier_ejected
        start = clk.t
        while h.outlier_ejected:
            clk.t += 1
            d.evaluate(clk.t)
        durations.append(clk.t - start)
    assert durations == [10, 20, 25, 25]


def test_multiplier_decreases_while_host_stays_healthy() -> None:
    c = _cluster(2, {"consecutive_5xx": 1, "base_ejection_time": "10s", "max_ejection_percent": 100})
    d, clk = _det(c)
    h = c.hosts[0]
    d.put_http(h, 500)
    clk.t += 10
    d.evaluate(clk.t)
    d.put_http(h, 500)  # second ejection: 20 s
    clk.t += 20
    d.evaluate(clk.t)
    assert not h.outlier_ejected
    for _ in range(2):  # two base times healthy: multiplier back to 0
        clk.t += 10
        d.evaluate(clk.t)
    d.put_http(h, 500)
    start = clk.t
    while h.outlier_ejected:
        clk.t += 1
        d.evaluate(clk.t)
    assert clk.t - start == 10


def test_jitter_is_drawn_from_the_detectors_rng() -> None:
    c = _cluster(2, {"consecutive_5xx": 1, "base_ejection_time": "10s", "max_ejection_time_jitter": "5s",
                     "max_ejection_percent": 100})  # fmt: skip
    d, _ = _det(c)
    d.rng = random.Random(7)
    expect = 10 + random.Random(7).random() * 5
    d.put_http(c.hosts[0], 500)
    m = d.monitors[c.hosts[0]]
    assert m.eject_until - m.ejected_at == pytest.approx(expect)  # type: ignore[operator]


def test_gateway_failure_not_enforced_by_default_but_detected() -> None:
    c = _cluster(3, {"consecutive_5xx": 100, "consecutive_gateway_failure": 2, "max_ejection_percent": 100})
    d, _ = _det(c)
    h = c.hosts[1]
    d.put_http(h, 502)
    d.put_http(h, 504)
    assert not h.outlier_ejected  # enforcing_consecutive_gateway_failure defaults to 0
    assert _stat(c, "ejections_detected_consecutive_gateway_failure") == 1
    assert _stat(c, "ejections_enforced_consecutive_gateway_failure") == 0


def test_gateway_failure_counts_connect_failures_and_resets_without_split() -> None:
    c = _cluster(3, {"consecutive_5xx": 100, "consecutive_gateway_failure": 3,
                     "enforcing_consecutive_gateway_failure": 100, "max_ejection_percent": 100})  # fmt: skip
    d, _ = _det(c)
    h = c.hosts[2]
    d.put_result(h, od.CONNECT_FAILED)  # 503
    d.put_result(h, od.CONNECT_SUCCESS)  # not a final result: ignored
    d.put_result(h, od.TIMEOUT)  # 504
    d.put_http(h, 500)  # 5xx but not a gateway error: breaks the gateway streak
    d.put_result(h, od.CONNECT_FAILED)
    d.put_result(h, od.CONNECT_FAILED)
    assert not h.outlier_ejected
    d.put_result(h, od.CONNECT_FAILED)
    assert h.outlier_ejected
    assert _stat(c, "ejections_enforced_consecutive_gateway_failure") == 1


def test_split_local_origin_errors_count_apart_from_http() -> None:
    c = _cluster(3, {"split_external_local_origin_errors": True, "consecutive_local_origin_failure": 2,
                     "consecutive_5xx": 2, "max_ejection_percent": 100})  # fmt: skip
    d, _ = _det(c)
    a, b = c.hosts[0], c.hosts[1]
    d.put_result(a, od.CONNECT_FAILED)
    d.put_http(a, 503)  # external: does not touch the local streak
    d.put_result(a, od.CONNECT_SUCCESS)  # local success resets the local streak
    d.put_result(a, od.CONNECT_FAILED)
    assert not a.outlier_ejected
    d.put_result(a, od.TIMEOUT)
    assert a.outlier_ejected
    assert _stat(c, "ejections_enforced_consecutive_local_origin_failure") == 1
    # Local results do not reach the 5xx counters in split mode.
    for _ in range(5):
        d.put_result(b, od.CONNECT_SUCCESS)
    d.put_http(b, 500)
    d.put_result(b, od.CONNECT_SUCCESS)
    d.put_http(b, 500)
    assert b.outlier_ejected
    assert _stat(c, "ejections_enforced_consecutive_5xx") == 1


def test_max_ejection_percent_caps_but_one_host_can_always_go() -> None:
    c = _cluster(3, {"consecutive_5xx": 1})  # default 10 %: 1 of 3 is 33 %
    d, _ = _det(c)
    d.put_http(c.hosts[0], 500)
    assert c.hosts[0].outlier_ejected
    d.put_http(c.hosts[1], 500)
    assert not c.hosts[1].outlier_ejected
    assert _stat(c, "ejections_overflow") == 1
    assert _gauge(c, "ejections_active") == 1
    c2 = _cluster(4, {"consecutive_5xx": 1, "max_ejection_percent": 50}, store=Store())
    d2, _ = _det(c2)
    for h in c2.hosts:
        d2.put_http(h, 500)
    assert [h.outlier_ejected for h in c2.hosts] == [True, True, False, False]
    # 0 % ejects nothing, unless always_eject_one_host lets the first one go.
    for always, expect in ((False, 0), (True, 1)):
        c3 = _cluster(
            4, {"consecutive_5xx": 1, "max_ejection_percent": 0, "always_eject_one_host": always}, Store()
        )
        d3, _ = _det(c3)
        for h in c3.hosts:
            d3.put_http(h, 500)
        assert sum(h.outlier_ejected for h in c3.hosts) == expect


def test_enforcing_percentage_uses_seeded_draws() -> None:
    def run(seed: int) -> list[bool]:
        c = _cluster(10, {"consecutive_5xx": 1, "enforcing_consecutive_5xx": 50, "max_ejection_percent": 100})
        d, _ = _det(c)
        d.rng = random.Random(seed)
        for h in c.hosts:
            d.put_http(h, 500)
        assert _stat(c, "ejections_detected_consecutive_5xx") == 10
        assert _stat(c, "ejections_enforced_consecutive_5xx") == sum(h.outlier_ejected for h in c.hosts)
        return [h.outlier_ejected for h in c.hosts]

    r = run(3)
    assert r == run(3)
    assert 0 < sum(r) < 10


def test_success_rate_ejects_the_outlier() -> None:
    c = _cluster(5, {"consecutive_5xx": 1000, "success_rate_request_volume": 10, "success_rate_minimum_hosts": 5,
                     "max_ejection_percent": 100})  # fmt: skip
    d, clk = _det(c)
    for i, h in enumerate(c.hosts):
        for k in range(20):
            d.put_http(h, 500 if (i == 3 and k % 2) or (i != 3 and k == 0) else 200)
    d.evaluate(clk.t)  # ends the interval the counts were taken in
    assert [h.outlier_ejected for h in c.hosts] == [False, False, False, True, False]
    assert _stat(c, "ejections_enforced_success_rate") == 1
    # Too few hosts with enough volume: no success-rate check at all.
    c2 = _cluster(5, {"consecutive_5xx": 1000, "success_rate_request_volume": 10}, store=Store())
    d2, _ = _det(c2)
    for i, h in enumerate(c2.hosts[:4]):
        for _ in range(20):
            d2.put_http(h, 500 if i == 0 else 200)
    d2.evaluate()
    assert not any(h.outlier_ejected for h in c2.hosts)


def test_failure_percentage_needs_enforcing() -> None:
    conf = {"consecutive_5xx": 1000, "failure_percentage_request_volume": 10, "failure_percentage_minimum_hosts": 3,
            "failure_percentage_threshold": 50, "max_ejection_percent": 100}  # fmt: skip
    for enforcing, expect in ((0, False), (100, True)):
        c = _cluster(3, {**conf, "enforcing_failure_percentage": enforcing}, store=Store())
        d, _ = _det(c)
        for i, h in enumerate(c.hosts):
            for k in range(10):
                d.put_http(h, 503 if i == 0 and k < 6 else 200)
        d.evaluate()
        assert c.hosts[0].outlier_ejected is expect
        assert not c.hosts[1].outlier_ejected
        assert _stat(c, "ejections_detected_failure_percentage") == 1


def test_failure_percentage_local_origin() -> None:
    c = _cluster(3, {"split_external_local_origin_errors": True, "consecutive_local_origin_failure": 1000,
                     "failure_percentage_request_volume": 5, "failure_percentage_minimum_hosts": 3,
                     "enforcing_failure_percentage_local_origin": 100, "max_ejection_percent": 100})  # fmt: skip
    d, _ = _det(c)
    for i, h in enumerate(c.hosts):
        for _ in range(10):
            d.put_result(h, od.CONNECT_FAILED if i == 2 else od.CONNECT_SUCCESS)
    d.evaluate()
    assert [h.outlier_ejected for h in c.hosts] == [False, False, True]
    assert _stat(c, "ejections_enforced_failure_percentage_local_origin") == 1


def test_removed_host_is_forgotten_and_gauge_follows() -> None:
    c = _cluster(3, {"consecutive_5xx": 1, "max_ejection_percent": 100})
    d, _ = _det(c)
    gone = c.hosts[0]
    d.put_http(gone, 500)
    assert _gauge(c, "ejections_active") == 1
    c.update_hosts([c.hosts[1], c.hosts[2]])
    assert gone not in d.monitors
    assert _gauge(c, "ejections_active") == 0
    d.put_http(gone, 500)  # a late result for a removed host: nothing kept
    assert gone not in d.monitors


def test_retire_takes_ejections_off_the_shared_gauge() -> None:
    store = Store()
    c = _cluster(3, {"consecutive_5xx": 1}, store=store)
    d, _ = _det(c)
    d.put_http(c.hosts[0], 500)
    assert _gauge(c, "ejections_active") == 1
    c.retire()
    assert _gauge(c, "ejections_active") == 0
    d.put_http(c.hosts[1], 500)  # in-flight request finishing on the retired snapshot
    assert _gauge(c, "ejections_active") == 0


def test_ejection_is_independent_of_eds_health() -> None:
    c = _cluster(3, {"consecutive_5xx": 1, "max_ejection_percent": 100})
    d, clk = _det(c)
    h = c.hosts[0]
    h.healthy = False
    c.health_changed()
    d.put_http(h, 500)
    clk.t += 30
    d.evaluate(clk.t)
    assert not h.outlier_ejected
    assert h not in _picks(c)  # still EDS-unhealthy


def test_health_check_success_unejects() -> None:
    c = _cluster(3, {"consecutive_5xx": 1}, health_checks=[])
    d, _ = _det(c)
    d.put_http(c.hosts[0], 500)
    d.on_health_check_success(c.hosts[0])
    assert not c.hosts[0].outlier_ejected


def test_notices_and_config_errors() -> None:
    c = _cluster(2, {"successful_active_health_check_uneject_host": True})
    assert any(
        n.startswith("outlier_detection.successful_active_health_check_uneject_host") for n in c.notices
    )
    for field in ("max_ejection_percent", "enforcing_consecutive_5xx", "failure_percentage_threshold"):
        with pytest.raises(ConfigError) as e:
            _cluster(2, {field: 101})
        assert e.value.path == f"outlier_detection.{field}"
    with pytest.raises(ConfigError):
        _cluster(2, {"interval": "0s"})


def test_event_log_lines(tmp_path: Path) -> None:
    c = _cluster(3, {"consecutive_5xx": 1, "base_ejection_time": "1s"})
    d, clk = _det(c)
    log = od.EventLog(str(tmp_path / "od.log"))
    d.event_log = log
    d.put_http(c.hosts[1], 500)
    clk.t += 2
    d.evaluate(clk.t)
    log.close()
    lines = [json.loads(x) for x in (tmp_path / "od.log").read_text().splitlines()]
    assert [(x["action"], x.get("type")) for x in lines] == [("EJECT", "CONSECUTIVE_5XX"), ("UNEJECT", None)]
    assert lines[0]["upstream_url"] == c.hosts[1].addr_str
    assert lines[0]["cluster_name"] == "svc" and lines[0]["enforced"] is True
    assert lines[1]["secs_since_last_action"] == "2"
    # The lines are Envoy's OutlierDetectionEvent JSON.
    from envoy.data.cluster.v3 import outlier_detection_event_pb2

    for x in lines:
        json_format.ParseDict(x, outlier_detection_event_pb2.OutlierDetectionEvent())


def test_readmitted_host_starts_a_fresh_streak() -> None:
    c = _cluster(3, {"consecutive_5xx": 3, "base_ejection_time": "1s"})
    d, clk = _det(c)
    h = c.hosts[0]
    for _ in range(3):
        d.put_http(h, 500)
    assert h.outlier_ejected
    d.put_http(h, 500)  # requests that were in flight when it was ejected
    d.put_http(h, 500)
    clk.t += 1
    d.evaluate(clk.t)
    assert not h.outlier_ejected
    d.put_http(h, 500)
    assert not h.outlier_ejected
    assert _stat(c, "ejections_detected_consecutive_5xx") == 1


@pytest.mark.parametrize(
    ("code", "http"),
    [(0, 200), (1, 499), (4, 504), (8, 429), (12, 501), (13, 500), (14, 503), (16, 401), (17, 500)],
)
def test_grpc_status_maps_to_the_http_status_outlier_detection_sees(code: int, http: int) -> None:
    assert od.http_status_for_grpc(code) == http
