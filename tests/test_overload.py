"""The overload manager (moorline/overload.py): monitors, triggers and actions driven by hand
(``refresh()`` with monitors whose reading the test sets), and their effect on real requests
through the in-memory pair."""

from __future__ import annotations

import json
from typing import Any

import pytest

from moorline import overload as om
from moorline.config.errors import ConfigError
from moorline.config.loader import load_bootstrap
from moorline.server import Server
from moorline.testing.pair import Pair, RecordingAccessLog, bootstrap_yaml

HEAP = {
    "name": om.FIXED_HEAP,
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.resource_monitors.fixed_heap.v3.FixedHeapConfig",
        "max_heap_size_bytes": 1000,
    },
}


def _cx(n: int, name: str = om.DOWNSTREAM_CX) -> dict[str, Any]:
    return {
        "name": name,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3."
            "DownstreamConnectionsConfig",
            "max_active_downstream_connections": n,
        },
    }


def _config(overload: dict[str, Any] | None, extra: dict[str, Any] | None = None, **kw: Any) -> str:
    doc = json.loads(bootstrap_yaml(**kw))
    if overload is not None:
        doc["overload_manager"] = overload
    doc.update(extra or {})
    return json.dumps(doc)


def _action(name: str, trigger: dict[str, Any], monitor: str = om.FIXED_HEAP, **extra: Any) -> dict[str, Any]:
    return {"name": name, "triggers": [{"name": monitor, **trigger}], **extra}


def _set_heap(pair: Pair, pressure: float) -> None:
    pair.server.overload.monitors[om.FIXED_HEAP].read = lambda: pressure
    pair.server.overload.refresh()


def _get(pair: Pair) -> Any:
    c = pair.connect()
    c.send(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
    return c


def test_trigger_scale() -> None:
    t = om._Trigger("m", 0.5, 0.9)
    assert [t.scale(p) for p in (0.1, 0.5, 0.7, 0.9, 1.2)] == [0.0, 0.0, pytest.approx(0.5), 1.0, 1.0]
    th = om._Trigger("m", 0.8, 0.8)
    assert (th.scale(0.79), th.scale(0.8)) == (0.0, 1.0)


def test_not_configured_costs_nothing() -> None:
    with Pair(bootstrap_yaml()) as pair:
        assert pair.server.overload is None
        assert pair.hcm.overload is None
        assert pair.listener._ol is None


def test_stop_accepting_requests_answers_503_ol_and_recovers() -> None:
    ov = {
        "refresh_interval": "0.1s",
        "resource_monitors": [HEAP],
        "actions": [_action(om.STOP_REQUESTS, {"threshold": {"value": 0.95}})],
    }
    with Pair(_config(ov)) as pair:
        log = RecordingAccessLog()
        pair.hcm.access_logs.append(log)
        _set_heap(pair, 0.96)
        assert pair.stats.get(f"overload.{om.FIXED_HEAP}.pressure").value == 96
        assert pair.stats.get(f"overload.{om.STOP_REQUESTS}.active").value == 1
        c = _get(pair)
        r = c.response()
        assert r.status == 503 and r.body == b"envoy overloaded"
        assert log.entries[-1].response_flags == ["OL"]
        assert log.entries[-1].response_code_details == "overload"
        assert pair.stats.get("http.ingress.downstream_rq_overload_close").value == 1
        assert not pair.upstream.attempts  # nothing went upstream

        _set_heap(pair, 0.5)
        assert pair.stats.get(f"overload.{om.STOP_REQUESTS}.active").value == 0
        c = _get(pair)
        up = pair.upstream.accept()
        up.request()
        up.respond(200, body=b"ok")
        assert c.response().status == 200


def test_disable_keepalive_closes_the_connection() -> None:
    ov = {
        "resource_monitors": [HEAP],
        "actions": [_action(om.DISABLE_KEEPALIVE, {"threshold": {"value": 0.8}})],
    }
    with Pair(_config(ov)) as pair:
        _set_heap(pair, 0.9)
        c = _get(pair)
        up = pair.upstream.accept()
        up.request()
        up.respond(200, body=b"ok")
        r = c.response()
        assert r.status == 200 and r.header("connection") == b"close"
        _set_heap(pair, 0.1)
        c = _get(pair)
        up = pair.upstream.accept() if pair.upstream.pending else up  # the pool may reuse it
        up.request()
        up.respond(200, body=b"ok")
        assert c.response().header("connection") is None


def _answer(pair: Pair, body: bytes) -> None:
    """Answer the oldest upstream request waiting (on a live connection, or a new one)."""
    while pair.upstream.pending:
        pair.upstream.accept()
    for u in pair.upstream.connections:
        if not u.closed and u.has_request():
            u.request()
            u.respond(200, body=body)
            return
    raise AssertionError("no upstream request waiting")


def test_disable_keepalive_drains_an_http2_connection_after_its_response() -> None:
    import h2.events

    ov = {
        "resource_monitors": [HEAP],
        "actions": [_action(om.DISABLE_KEEPALIVE, {"threshold": {"value": 0.8}})],
    }
    with Pair(_config(ov)) as pair:
        h = pair.connect_h2()
        s1 = h.request("GET", "/one")
        up = pair.upstream.accept()
        up.request()
        # Two streams in flight; the action fires while the second one's request arrives.
        _set_heap(pair, 0.9)
        s3 = h.request("GET", "/two")
        _set_heap(pair, 0.1)
        up.respond(200, body=b"one")  # the first stream was not marked: no GOAWAY
        h.poll()
        assert h.response(s1).ended
        assert not [e for e in h.events if isinstance(e, h2.events.ConnectionTerminated)]
        _answer(pair, b"two")
        h.poll()
        r = h.response(s3)
        assert r.status == 200 and r.body == b"two" and r.ended
        gone = [e for e in h.events if isinstance(e, h2.events.ConnectionTerminated)]
        assert len(gone) == 1 and gone[0].error_code == 0 and gone[0].last_stream_id == s3
        assert pair.stats.get("http.ingress.downstream_cx_overload_disable_keepalive").value == 1
        assert pair.downstreams[-1].closed
        pair.assert_settled()


def _frames(raw: bytes) -> list[Any]:
    """HTTP/2 frames in ``raw`` (whole frames only). The ``h2`` client refuses every frame after
    a GOAWAY, so what follows one is read with ``hyperframe``."""
    from hyperframe.frame import Frame

    out, i = [], 0
    while len(raw) - i >= 9:
        f, n = Frame.parse_frame_header(memoryview(raw[i : i + 9]))
        f.parse_body(memoryview(raw[i + 9 : i + 9 + n]))
        out.append(f)
        i += 9 + n
    return out


def test_disable_keepalive_http2_goaway_lets_in_flight_streams_finish() -> None:
    from hyperframe.frame import DataFrame, GoAwayFrame

    ov = {
        "resource_monitors": [HEAP],
        "actions": [_action(om.DISABLE_KEEPALIVE, {"threshold": {"value": 0.8}})],
    }
    with Pair(_config(ov)) as pair:
        h = pair.connect_h2()
        down = pair.downstreams[-1]
        _set_heap(pair, 0.9)
        s1 = h.request("GET", "/one")  # marked: the connection drains after its response
        _set_heap(pair, 0.1)
        s3 = h.request("GET", "/two")  # in flight when the GOAWAY goes
        _answer(pair, b"one")
        frames = _frames(down.read())  # not through h: it would stop at the GOAWAY
        goaway = [f for f in frames if isinstance(f, GoAwayFrame)]
        assert len(goaway) == 1 and goaway[0].last_stream_id == s3 and goaway[0].error_code == 0
        data1 = [f for f in frames if isinstance(f, DataFrame) and f.stream_id == s1]
        assert b"".join(f.data for f in data1) == b"one" and "END_STREAM" in data1[-1].flags
        assert frames.index(goaway[0]) > frames.index(data1[-1])  # after the response's last frame
        assert not down.closed  # /two is still in flight
        _answer(pair, b"two")
        data3 = [f for f in _frames(down.read()) if isinstance(f, DataFrame) and f.stream_id == s3]
        assert b"".join(f.data for f in data3) == b"two" and "END_STREAM" in data3[-1].flags
        assert down.closed
        assert pair.stats.get("http.ingress.downstream_cx_overload_disable_keepalive").value == 1
        pair.assert_settled()


def test_reduce_timeouts_scales_the_idle_timeout() -> None:
    ov = {
        "resource_monitors": [HEAP],
        "actions": [
            _action(
                om.REDUCE_TIMEOUTS,
                {"scaled": {"scaling_threshold": 0.5, "saturation_threshold": 0.9}},
                typed_config={
                    "@type": "type.googleapis.com/envoy.config.overload.v3.ScaleTimersOverloadActionConfig",
                    "timer_scale_factors": [
                        {"timer": "HTTP_DOWNSTREAM_CONNECTION_IDLE", "min_timeout": "10s"}
                    ],
                },
            )
        ],
    }
    hcm_extra = {"common_http_protocol_options": {"idle_timeout": "110s"}}
    with Pair(_config(ov, hcm_extra=hcm_extra)) as pair:
        assert pair.hcm.idle_timeout == 110.0
        _set_heap(pair, 0.7)
        assert pair.hcm.idle_timeout == pytest.approx(60.0)
        assert pair.stats.get(f"overload.{om.REDUCE_TIMEOUTS}.scale_percent").value == 50
        assert pair.stats.get(f"overload.{om.REDUCE_TIMEOUTS}.active").value == 0
        _set_heap(pair, 1.0)
        assert pair.hcm.idle_timeout == pytest.approx(10.0)
        assert pair.stats.get(f"overload.{om.REDUCE_TIMEOUTS}.active").value == 1

        # A connection manager compiled while the action is on (an LDS update) is scaled too.
        class Late:
            idle_timeout = 210.0

        late = Late()
        pair.server.overload.state.register_hcm(late)
        pair.server.overload.refresh()
        assert late.idle_timeout == pytest.approx(10.0)
        _set_heap(pair, 0.0)
        assert pair.hcm.idle_timeout == pytest.approx(110.0)
        assert late.idle_timeout == pytest.approx(210.0)


def test_shrink_heap_collects_once_per_activation(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(om.gc, "collect", lambda *a: calls.append(1) or 0)
    ov = {"resource_monitors": [HEAP], "actions": [_action(om.SHRINK_HEAP, {"threshold": {"value": 0.9}})]}
    with Pair(_config(ov)) as pair:
        _set_heap(pair, 0.95)
        _set_heap(pair, 0.97)
        assert calls == [1]
        _set_heap(pair, 0.1)
        _set_heap(pair, 0.95)
        assert calls == [1, 1]


def test_a_failing_monitor_keeps_its_last_pressure() -> None:
    ov = {"resource_monitors": [HEAP], "actions": [_action(om.STOP_REQUESTS, {"threshold": {"value": 0.9}})]}
    with Pair(_config(ov)) as pair:
        _set_heap(pair, 0.95)

        def broken() -> float:
            raise OSError("gone")

        pair.server.overload.monitors[om.FIXED_HEAP].read = broken
        pair.server.overload.refresh()
        assert pair.stats.get(f"overload.{om.FIXED_HEAP}.failed_updates").value == 1
        assert pair.server.overload.state.stop_requests


def test_downstream_connections_monitor_and_runtime_key() -> None:
    ov = {"resource_monitors": [_cx(3, om.GLOBAL_CX)]}
    with Pair(_config(ov)) as pair:
        st = pair.server.overload.state
        assert st.cx_max == 3
        st.cx_active = 3
        pair.server.overload.refresh()
        assert pair.stats.get(f"overload.{om.GLOBAL_CX}.pressure").value == 100
    rt = {"layered_runtime": {"layers": [{"name": "s", "static_layer": {om.RUNTIME_CX_KEY: 7}}]}}
    with Pair(_config(None, rt)) as pair:
        assert pair.server.overload.state.cx_max == 7
        assert any(
            n.startswith("layered_runtime:") and om.RUNTIME_CX_KEY in n for n in pair.server.ctx.notices
        )
    # The monitor wins over the runtime key, and says so.
    with Pair(_config({"resource_monitors": [_cx(2)]}, rt)) as pair:
        assert pair.server.overload.state.cx_max == 2
        assert any(om.RUNTIME_CX_KEY in n and "overridden" in n for n in pair.server.ctx.notices)


@pytest.mark.parametrize(
    ("ov", "field"),
    [
        ({"resource_monitors": [{"name": "envoy.resource_monitors.nope"}]}, "resource_monitors[0].name"),
        (
            {
                "resource_monitors": [
                    {**HEAP, "typed_config": {**HEAP["typed_config"], "max_heap_size_bytes": 0}}
                ]
            },
            "max_heap_size_bytes",
        ),
        ({"resource_monitors": [HEAP, HEAP]}, "resource_monitors[1].name"),
        (
            {
                "resource_monitors": [HEAP],
                "actions": [_action(om.STOP_REQUESTS, {"threshold": {"value": 1}}, "x")],
            },
            "actions[0].triggers[0].name",
        ),
        (
            {
                "resource_monitors": [HEAP],
                "actions": [
                    _action(
                        om.STOP_REQUESTS, {"scaled": {"scaling_threshold": 0.9, "saturation_threshold": 0.5}}
                    )
                ],
            },
            "actions[0].triggers[0].scaled",
        ),
    ],
)
def test_bad_config_names_the_field(ov: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as e:
        Server(load_bootstrap(yaml_text=_config(ov)), "t")
    assert field in e.value.path


def test_unknown_action_and_unread_fields_are_noticed() -> None:
    ov = {
        "resource_monitors": [HEAP],
        "actions": [
            _action("envoy.overload_actions.reset_high_memory_stream", {"threshold": {"value": 0.9}})
        ],
        "loadshed_points": [{"name": "envoy.load_shed_points.tcp_listener_accept", "triggers": []}],
    }
    s = Server(load_bootstrap(yaml_text=_config(ov)), "t")
    notices = [str(n) for n in s.ctx.notices]
    assert any(n.startswith("overload_manager.actions[0].name:") for n in notices)
    assert any(n.startswith("overload_manager.loadshed_points:") for n in notices)
    assert not any("overload manager is not implemented" in n for n in notices)


def test_the_timer_keeps_ticking_after_a_failed_refresh(monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeLoop:
        def __init__(self) -> None:
            self.calls: list[float] = []

        def call_later(self, delay: float, fn: Any) -> Any:
            self.calls.append(delay)
            return type("H", (), {"cancel": lambda self: None})()

    ov = {"refresh_interval": "0.5s", "resource_monitors": [HEAP]}
    s = Server(load_bootstrap(yaml_text=_config(ov)), "t")
    mgr = s.overload
    loop = FakeLoop()
    mgr.start(loop)
    assert loop.calls == [0.5]

    def boom() -> None:
        raise RuntimeError("x")

    monkeypatch.setattr(mgr, "refresh", boom)
    mgr._tick()
    assert loop.calls == [0.5, 0.5]
    mgr.stop()
    assert mgr._timer is None
