"""Circuit breakers compiled and read in memory: the open / remaining gauges read the cluster's
live counts, a retry budget replaces max_retries, and a removed cluster is not kept alive by
its gauges."""

from __future__ import annotations

import gc
import importlib.util
from pathlib import Path
from typing import Any

import pytest

from moorline.config.errors import ConfigError
from moorline.observability.stats import Store

# The cluster builders of test_cluster.py, loaded by path (tests/ is not a package).
_spec = importlib.util.spec_from_file_location("cluster_builders", Path(__file__).parent / "test_cluster.py")
assert _spec is not None and _spec.loader is not None
_builders = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_builders)
build, ep, static = _builders.build, _builders.ep, _builders.static


def _cb(**th: Any) -> dict[str, Any]:
    return {"circuit_breakers": {"thresholds": [th]}}


def test_open_and_remaining_gauges_follow_live_counts() -> None:
    store = Store()
    c = build(
        static("c1", ep("10.0.0.1", 80), **_cb(max_requests=2, max_pending_requests=1, track_remaining=True)),
        store,
    )
    g = {
        n: store.get(f"cluster.c1.circuit_breakers.default.{n}")
        for n in (
            "rq_open",
            "remaining_rq",
            "rq_pending_open",
            "remaining_pending",
            "cx_open",
            "remaining_cx",
            "remaining_retries",
        )
    }
    assert all(v is not None for v in g.values())
    assert g["rq_open"].value == 0 and g["remaining_rq"].value == 2  # type: ignore[union-attr]
    c.stats.upstream_rq_active.value = 2
    assert g["rq_open"].value == 1 and g["remaining_rq"].value == 0  # type: ignore[union-attr]
    c.stats.upstream_rq_pending_active.value = 1
    assert g["rq_pending_open"].value == 1 and g["remaining_pending"].value == 0  # type: ignore[union-attr]
    assert g["remaining_cx"].value == 1024 and g["cx_open"].value == 0  # type: ignore[union-attr]
    c.active_retries = 3
    assert g["remaining_retries"].value == 0  # type: ignore[union-attr]
    assert store.get("cluster.c1.circuit_breakers.default.rq_retry_open").value == 1  # type: ignore[union-attr]


def test_remaining_gauges_only_with_track_remaining() -> None:
    store = Store()
    build(static("c1", ep("10.0.0.1", 80), **_cb(max_requests=2)), store)
    assert store.get("cluster.c1.circuit_breakers.default.rq_open") is not None
    assert store.get("cluster.c1.circuit_breakers.default.remaining_rq") is None


def test_gauges_do_not_keep_a_removed_cluster_alive() -> None:
    store = Store()
    c = build(static("c1", ep("10.0.0.1", 80), **_cb(max_requests=1, track_remaining=True)), store)
    c.stats.upstream_rq_active.value = 1
    g = store.get("cluster.c1.circuit_breakers.default.rq_open")
    assert g is not None and g.value == 1
    del c
    gc.collect()
    assert g.value == 0
    # A rebuilt cluster of the same name takes the gauge over.
    c2 = build(static("c1", ep("10.0.0.1", 80), **_cb(max_requests=5, track_remaining=True)), store)
    assert (
        store.get("cluster.c1.circuit_breakers.default.remaining_rq").value
        == 5 - c2.stats.upstream_rq_active.value
    )  # type: ignore[union-attr]


def test_retry_budget_replaces_max_retries() -> None:
    c = build(
        static(
            "c1",
            ep("10.0.0.1", 80),
            **_cb(
                max_retries=50, retry_budget={"budget_percent": {"value": 25.0}, "min_retry_concurrency": 2}
            ),
        )
    )
    assert c.retries_limit() == 2  # nothing active: the minimum concurrency
    c.stats.upstream_rq_active.value = 16
    c.stats.upstream_rq_pending_active.value = 4
    assert c.retries_limit() == 5  # 25 % of 20
    d = build(static("c1", ep("10.0.0.1", 80), **_cb(retry_budget={})))
    d.stats.upstream_rq_active.value = 100
    assert d.retries_limit() == 20  # defaults: 20 %, minimum 3
    assert build(static("c1", ep("10.0.0.1", 80), **_cb(max_retries=7))).retries_limit() == 7


def test_retry_budget_percent_out_of_range() -> None:
    with pytest.raises(ConfigError) as e:
        build(static("c1", ep("10.0.0.1", 80), **_cb(retry_budget={"budget_percent": {"value": 150.0}})))
    assert "retry_budget.budget_percent" in str(e.value)


def test_high_priority_thresholds_have_their_own_counts_and_gauges() -> None:
    store = Store()
    c = build(
        static(
            "c1",
            ep("10.0.0.1", 80),
            circuit_breakers={
                "thresholds": [
                    {"max_requests": 2},
                    {
                        "priority": "HIGH",
                        "max_requests": 5,
                        "max_retries": 1,
                        "max_connections": 9,
                        "track_remaining": True,
                    },
                    {"priority": "HIGH", "max_requests": 77},  # a later one of the same priority
                ]
            },
        ),
        store,
    )
    assert (c.max_requests, c.high.max_requests, c.high.max_retries) == (2, 5, 1)
    assert (c.max_connections, c.high.max_connections, c.high.max_pending_requests) == (1024, 9, 1024)
    assert not c.notices

    def g(name: str) -> int:
        s = store.get(f"cluster.c1.circuit_breakers.{name}")
        assert s is not None, name
        return s.value  # type: ignore[union-attr]

    assert g("high.remaining_rq") == 5 and g("high.rq_open") == 0
    assert g("high.remaining_cx") == 9 and g("high.remaining_pending") == 1024
    # Connections and pending slots of HIGH requests: in the cluster's gauges, not DEFAULT's.
    c.stats.upstream_cx_active.value = 9
    c.high.cx_active = 9
    c.stats.upstream_rq_pending_active.value = 3
    c.high.pending_active = 3
    assert g("high.cx_open") == 1 and g("high.remaining_cx") == 0
    assert g("default.cx_open") == 0 and g("default.rq_pending_open") == 0
    assert g("high.rq_pending_open") == 0 and g("high.remaining_pending") == 1021
    # Four HIGH requests in flight: counted in the cluster's gauge, not against DEFAULT's limit.
    c.stats.upstream_rq_active.value = 4
    c.high.rq_active = 4
    assert g("default.rq_open") == 0 and g("high.remaining_rq") == 1
    c.stats.upstream_rq_active.value = 6  # plus two DEFAULT ones
    assert g("default.rq_open") == 1
    c.high.rq_active = 5
    c.stats.upstream_rq_active.value = 7
    assert g("high.rq_open") == 1 and g("high.remaining_rq") == 0
    c.high.active_retries = 1
    assert g("high.rq_retry_open") == 1 and g("high.remaining_retries") == 0
    assert g("default.rq_retry_open") == 0


def test_high_priority_retry_budget_counts_high_requests() -> None:
    c = build(
        static(
            "c1",
            ep("10.0.0.1", 80),
            circuit_breakers={
                "thresholds": [
                    {
                        "priority": "HIGH",
                        "retry_budget": {"budget_percent": {"value": 50.0}, "min_retry_concurrency": 1},
                    }
                ]
            },
        )
    )
    assert c.high.retries_limit() == 1
    c.high.rq_active = 10
    c.stats.upstream_rq_active.value = 10
    assert c.high.retries_limit() == 5
    c.high.pending_active = 4
    c.stats.upstream_rq_pending_active.value = 4
    assert c.high.retries_limit() == 7  # half of the ten active and four pending
    assert c.retries_limit() == 3  # DEFAULT keeps max_retries; the HIGH requests are not its share
