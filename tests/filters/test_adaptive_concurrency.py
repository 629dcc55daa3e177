"""The adaptive concurrency filter (moorline/filters/http/adaptive_concurrency.py): the gradient
controller on a fake clock, and the filter on real streams through the in-memory pair."""

from __future__ import annotations

from typing import Any

import pytest

from moorline.config.errors import ConfigError
from moorline.config.loader import load_bootstrap
from moorline.filters.http.adaptive_concurrency import MAX_SAMPLES, GradientController
from moorline.observability.stats import Store
from moorline.server import Server
from moorline.testing.pair import Pair, RecordingAccessLog, bootstrap_yaml

TYPE = "type.googleapis.com/envoy.extensions.filters.http.adaptive_concurrency.v3.AdaptiveConcurrency"
GC = "http.ingress.adaptive_concurrency.gradient_controller."


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _ctl(clock: Clock, store: Store, **kw: Any) -> GradientController:
    args: dict[str, Any] = dict(
        update_interval=1.0, min_rtt_interval=30.0, request_count=4, jitter=0.0, min_concurrency=2, buffer=0.0
    )
    args.update(kw)
    return GradientController(scope=store.scope("p."), clock=clock, rng=lambda: 0.5, **args)


def _run(ctl: GradientController, n: int, rtt: float) -> int:
    """``n`` requests one after another, each taking ``rtt``; returns how many were admitted."""
    ok = 0
    for _ in range(n):
        if ctl.try_acquire():
            ok += 1
            ctl.sample(rtt)
            ctl.release()
    return ok


def test_min_rtt_window_then_the_limit_grows_while_latency_holds() -> None:
    clock, store = Clock(), Store()
    ctl = _ctl(clock, store, max_limit=50)
    assert ctl.limit == 2 and ctl.measuring
    _run(ctl, 4, 0.010)  # the first window: 4 samples at 10 ms
    assert not ctl.measuring and ctl.min_rtt == pytest.approx(0.010)
    assert store.get("p.adaptive_concurrency.gradient_controller.min_rtt_msecs").value == 10
    limits = []
    for _ in range(5):
        _run(ctl, 3, 0.010)
        clock.now += 1.0
        ctl.try_acquire()
        ctl.release()
        limits.append(ctl.limit)
    # Latency at min_rtt: gradient 1, the limit grows by its square root each interval.
    assert limits == sorted(limits) and limits[-1] > limits[0] > 2
    assert store.get("p.adaptive_concurrency.gradient_controller.gradient").value == 100
    assert store.get("p.adaptive_concurrency.gradient_controller.concurrency_limit").value == ctl.limit


def test_latency_growth_shrinks_the_limit_to_its_floor_and_max_caps_it() -> None:
    clock, store = Clock(), Store()
    ctl = _ctl(clock, store, max_limit=6)
    _run(ctl, 4, 0.010)
    for _ in range(10):
        _run(ctl, 2, 0.010)
        clock.now += 1.0
        _run(ctl, 1, 0.010)
    assert ctl.limit == 6  # capped
    for _ in range(10):
        _run(ctl, 2, 0.100)  # ten times min_rtt: gradient clamps at 0.5
        clock.now += 1.0
        _run(ctl, 1, 0.100)
    assert ctl.limit <= 4
    assert store.get("p.adaptive_concurrency.gradient_controller.gradient").value == 50
    assert store.get("p.adaptive_concurrency.gradient_controller.sample_rtt_msecs").value == 100


def test_over_the_limit_is_blocked_and_counted() -> None:
    clock, store = Clock(), Store()
    ctl = _ctl(clock, store)
    assert ctl.try_acquire() and ctl.try_acquire()
    assert not ctl.try_acquire()
    assert store.get("p.adaptive_concurrency.gradient_controller.rq_blocked").value == 1
    ctl.release()
    assert ctl.try_acquire()


def test_min_rtt_is_measured_again_after_the_interval_with_jitter() -> None:
    clock, store = Clock(), Store()
    ctl = _ctl(clock, store, jitter=0.2)  # rng 0.5: 30 s * 1.1
    _run(ctl, 4, 0.010)
    assert ctl.next_min_rtt == pytest.approx(clock.now + 33.0)
    clock.now += 33.0
    ctl.try_acquire()
    ctl.release()
    assert ctl.measuring and ctl.limit == 2
    _run(ctl, 4, 0.020)
    assert not ctl.measuring and ctl.min_rtt == pytest.approx(0.020)


def test_fixed_min_rtt_never_measures() -> None:
    clock, store = Clock(), Store()
    ctl = _ctl(clock, store, fixed_min_rtt=0.05)
    assert not ctl.measuring
    for _ in range(3):
        _run(ctl, 2, 0.05)
        clock.now += 1.0
        _run(ctl, 1, 0.05)
    assert ctl.limit > 2 and ctl.min_rtt == 0.05


def test_samples_are_bounded() -> None:
    clock, store = Clock(), Store()
    ctl = _ctl(clock, store, fixed_min_rtt=0.05)
    for _ in range(MAX_SAMPLES + 10):
        ctl.sample(0.01)
    assert len(ctl.samples) == MAX_SAMPLES


def _filter(**gcc: Any) -> dict[str, Any]:
    g: dict[str, Any] = {
        "concurrency_limit_params": {"max_concurrency_limit": 10, "concurrency_update_interval": "0.1s"},
        "min_rtt_calc_params": {"request_count": 5, "min_concurrency": 1},
    }
    g.update(gcc)
    return {
        "name": "envoy.filters.http.adaptive_concurrency",
        "typed_config": {"@type": TYPE, "gradient_controller_config": g},
    }


def test_filter_answers_503_over_the_limit_and_frees_the_slot_at_stream_end() -> None:
    with Pair(bootstrap_yaml(http_filters=[_filter()])) as pair:
        log = RecordingAccessLog()
        pair.hcm.access_logs.append(log)
        c1 = pair.connect()
        c1.send(b"GET /a HTTP/1.1\r\nhost: a\r\n\r\n")
        up = pair.upstream.accept()
        assert up.request().target == b"/a"
        c2 = pair.connect()
        c2.send(b"GET /b HTTP/1.1\r\nhost: a\r\n\r\n")
        r = c2.response()
        assert r.status == 503 and r.body == b"reached concurrency limit"
        assert log.entries[-1].response_code_details == "reached_concurrency_limit"
        assert pair.stats.get(GC + "rq_blocked").value == 1
        assert not pair.upstream.pending  # the blocked one never went upstream
        up.respond(200, body=b"ok")
        assert c1.response().status == 200
        c2.send(b"GET /c HTTP/1.1\r\nhost: a\r\n\r\n")
        up2 = pair.upstream.accept() if pair.upstream.pending else up
        assert up2.request().target == b"/c"


def test_filter_slot_is_freed_when_the_client_goes_away() -> None:
    with Pair(bootstrap_yaml(http_filters=[_filter()])) as pair:
        c1 = pair.connect()
        c1.send(b"GET /a HTTP/1.1\r\nhost: a\r\n\r\n")
        pair.upstream.accept().request()
        c1.transport.peer_reset()
        pair.loop.run_ready()
        c2 = pair.connect()
        c2.send(b"GET /b HTTP/1.1\r\nhost: a\r\n\r\n")
        assert pair.stats.get(GC + "rq_blocked").value == 0


@pytest.mark.parametrize(
    ("gcc", "field"),
    [
        ({"concurrency_limit_params": {"max_concurrency_limit": 10}}, "concurrency_update_interval"),
        ({"min_rtt_calc_params": {"request_count": 0}}, "request_count"),
        ({"sample_aggregate_percentile": {"value": 150}}, "sample_aggregate_percentile"),
    ],
)
def test_bad_config_names_the_field(gcc: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as e:
        Server(load_bootstrap(yaml_text=bootstrap_yaml(http_filters=[_filter(**gcc)])), "t")
    assert field in e.value.path


def test_disabled_filter_is_left_out_of_the_chain() -> None:
    f = _filter()
    f["typed_config"]["enabled"] = {"default_value": False, "runtime_key": "ac.enabled"}
    with Pair(bootstrap_yaml(http_filters=[f])) as pair:
        assert pair.hcm.filter_factories == []
        assert any("enabled.runtime_key" in n for n in pair.server.ctx.notices)
