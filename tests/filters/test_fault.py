"""envoy.filters.http.fault (moorline/filters/http/fault.py) driven in memory: the real server
built by moorline.testing.pair, a virtual clock, the filter's seeded random source."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest

from moorline.config.errors import ConfigError
from moorline.filters.http.fault import MAX_DOWNSTREAM_CLUSTERS, FaultConfig
from moorline.testing.pair import Pair, bootstrap_yaml, build_request

FAULT_TYPE = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"


def fault(**cfg: Any) -> dict[str, Any]:
    return {"name": "envoy.filters.http.fault", "typed_config": {"@type": FAULT_TYPE, **cfg}}


def pct(n: int, den: str = "HUNDRED") -> dict[str, Any]:
    return {"numerator": n, "denominator": den}


ABORT_503 = {"http_status": 503, "percentage": pct(100)}
DELAY_2S = {"fixed_delay": "2s", "percentage": pct(100)}


@pytest.fixture
def make() -> Iterator[Any]:
    pairs: list[Pair] = []

    def make_pair(**kw: Any) -> Pair:
        p = Pair(bootstrap_yaml(**kw))
        pairs.append(p)
        return p

    yield make_pair
    for p in pairs:
        p.close()


def config_of(pair: Pair) -> FaultConfig:
    cfg = pair.hcm._all_filter_factories[0]
    assert isinstance(cfg, FaultConfig)
    return cfg


def get(c: Any, target: str = "/", headers: list[tuple[str, str]] | None = None, **kw: Any) -> None:
    c.send(build_request("GET", target, headers or [], **kw))


def answer(pair: Pair, status: int = 200) -> bool:
    """Answer the one upstream request waiting (on a live connection, or a new one)."""
    for u in pair.upstream.connections:
        if not u.closed and u.has_request():
            u.request()
            u.respond(status)
            return True
    if pair.upstream.pending:
        u = pair.upstream.accept()
        u.request()
        u.respond(status)
        return True
    return False


# -- cost when idle ---------------------------------------------------------------------------


def test_empty_fault_builds_no_filter_chain(make: Any) -> None:
    pair = make(http_filters=[fault()])
    # Istio's default: nothing at filter level, no route asks for a fault -> not in the chain.
    assert pair.hcm.filter_factories == []
    c = pair.connect()
    get(c)
    up = pair.upstream.accept()
    up.respond(200, body=b"ok")
    assert c.response().status == 200
    assert pair.access_log.entries[0].response_flags == []


def test_empty_fault_is_in_the_chain_when_a_route_has_a_per_route_fault(make: Any) -> None:
    routes = [
        {
            "match": {"prefix": "/a"},
            "route": {"cluster": "be"},
            "typed_per_filter_config": {
                "envoy.filters.http.fault": {
                    "@type": FAULT_TYPE,
                    "abort": {"http_status": 418, "percentage": pct(100)},
                }
            },
        },
        {"match": {"prefix": "/"}, "route": {"cluster": "be"}},
    ]
    pair = make(http_filters=[fault()], routes=routes)
    assert len(pair.hcm.filter_factories) == 1
    c = pair.connect()
    get(c, "/a")
    r = c.response()
    assert r.status == 418 and r.body == b"fault filter abort"
    get(c, "/b")
    up = pair.upstream.accept()
    up.respond(200)
    assert c.responses()[-1].status == 200
    assert pair.http("fault.aborts_injected") == 1


def test_chain_follows_route_updates(make: Any) -> None:
    from moorline.proxy.route_table import RouteTable

    pair = make(http_filters=[fault()])
    assert pair.hcm.filter_factories == []
    from envoy.config.route.v3.route_pb2 import RouteConfiguration
    from google.protobuf import json_format

    rc = json_format.ParseDict(
        {
            "virtual_hosts": [
                {
                    "name": "v",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "be"}}],
                    "typed_per_filter_config": {
                        "envoy.filters.http.fault": {"@type": FAULT_TYPE, "abort": ABORT_503}
                    },
                }
            ]
        },
        RouteConfiguration(),
    )
    pair.hcm.route_provider.update(RouteTable.compile(rc, "rc"))
    assert len(pair.hcm.filter_factories) == 1
    c = pair.connect()
    get(c)
    assert c.response().status == 503


# -- abort ------------------------------------------------------------------------------------


def test_abort_answers_with_status_flag_details_and_stats(make: Any) -> None:
    pair = make(http_filters=[fault(abort=ABORT_503)])
    c = pair.connect()
    get(c)
    r = c.response()
    assert r.status == 503 and r.body == b"fault filter abort"
    assert pair.upstream.attempts == []
    info = pair.access_log.entries[0]
    assert info.response_flags == ["FI"]
    assert info.response_code_details == "fault_filter_abort"
    assert pair.http("fault.aborts_injected") == 1
    assert pair.http("fault.active_faults") == 0
    assert pair.http("fault.delays_injected") == 0
    pair.assert_settled()


def test_grpc_abort_is_trailers_only_with_the_configured_status(make: Any) -> None:
    pair = make(http_filters=[fault(abort={"grpc_status": 14, "percentage": pct(100)})])
    h = pair.connect_h2()
    sid = h.request("POST", "/pkg.Svc/M", headers=[("content-type", "application/grpc"), ("te", "trailers")])
    r = h.response(sid)
    assert r.status == 200
    assert r.header("grpc-status") == b"14"
    assert r.header("content-type") == b"application/grpc"
    assert r.ended and r.body == b""
    assert pair.access_log.entries[0].response_flags == ["FI"]


def test_grpc_status_abort_for_a_plain_http_request_is_200(make: Any) -> None:
    pair = make(http_filters=[fault(abort={"grpc_status": 5, "percentage": pct(100)})])
    c = pair.connect()
    get(c)
    r = c.response()
    assert r.status == 200 and r.body == b"fault filter abort"


def test_header_abort(make: Any) -> None:
    pair = make(http_filters=[fault(abort={"header_abort": {}, "percentage": pct(100)})])
    c = pair.connect()
    get(c, headers=[("x-envoy-fault-abort-request", "429")])
    assert c.response().status == 429
    # Out of range, or absent: no abort.
    for hdrs in ([("x-envoy-fault-abort-request", "700")], [], [("x-envoy-fault-abort-request", "x")]):
        get(c, headers=hdrs)
        assert answer(pair)
        assert c.responses()[-1].status == 200
    # The percentage header lowers the chance (0 here).
    get(c, headers=[("x-envoy-fault-abort-request", "503"), ("x-envoy-fault-abort-request-percentage", "0")])
    assert answer(pair)
    assert c.responses()[-1].status == 200
    assert pair.http("fault.aborts_injected") == 1


def test_header_grpc_abort(make: Any) -> None:
    pair = make(http_filters=[fault(abort={"header_abort": {}, "percentage": pct(100)})])
    h = pair.connect_h2()
    sid = h.request(
        "POST",
        "/pkg.Svc/M",
        headers=[("content-type", "application/grpc"), ("x-envoy-fault-abort-grpc-request", "7")],
    )
    r = h.response(sid)
    assert r.status == 200 and r.header("grpc-status") == b"7"


def test_header_percentage_is_capped_by_the_configured_one(make: Any) -> None:
    pair = make(http_filters=[fault(abort={"header_abort": {}, "percentage": pct(0)})])
    c = pair.connect()
    get(
        c, headers=[("x-envoy-fault-abort-request", "503"), ("x-envoy-fault-abort-request-percentage", "100")]
    )
    pair.upstream.accept().respond(200)
    assert c.response().status == 200


# -- percentages ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num", "den", "modulus"),
    [(50, "HUNDRED", 100), (2500, "TEN_THOUSAND", 10_000), (300_000, "MILLION", 1_000_000)],
)
def test_percentage_draws_come_from_the_seeded_config_rng(
    make: Any, num: int, den: str, modulus: int
) -> None:
    pair = make(http_filters=[fault(abort={"http_status": 503, "percentage": pct(num, den)})])
    config_of(pair).rng.seed(1234)
    twin = random.Random(1234)
    expected = [twin.randrange(modulus) < num for _ in range(40)]
    c = pair.connect()
    got = []
    for _ in range(40):
        get(c)
        answered = answer(pair)
        got.append(c.response().status == 503)
        assert answered != got[-1]
    assert got == expected
    assert True in got and False in got
    assert pair.http("fault.aborts_injected") == sum(expected)


def test_zero_and_full_percentages_draw_nothing(make: Any) -> None:
    pair = make(http_filters=[fault(abort={"http_status": 503, "percentage": pct(200)})])
    cfg = config_of(pair)
    cfg.rng.seed(5)
    state = cfg.rng.getstate()
    c = pair.connect()
    for _ in range(3):
        get(c)
    assert [r.status for r in c.responses()] == [503, 503, 503]
    assert cfg.rng.getstate() == state


def test_unset_percentage_is_zero(make: Any) -> None:
    pair = make(http_filters=[fault(abort={"http_status": 503})])
    c = pair.connect()
    get(c)
    pair.upstream.accept().respond(200)
    assert c.response().status == 200


# -- delay ------------------------------------------------------------------------------------


def test_fixed_delay_holds_the_request_then_forwards_it(make: Any) -> None:
    pair = make(http_filters=[fault(delay=DELAY_2S)])
    c = pair.connect()
    c.send(build_request("POST", "/", [], body=b"hello"))
    assert pair.upstream.attempts == []
    assert pair.http("fault.active_faults") == 1
    pair.advance(1.9)
    assert pair.upstream.attempts == []
    pair.advance(0.2)
    up = pair.upstream.accept()
    assert up.request().body == b"hello"
    up.respond(200, body=b"ok")
    assert c.response().status == 200
    info = pair.access_log.entries[0]
    assert info.response_flags == ["DI"]
    assert pair.http("fault.delays_injected") == 1
    assert pair.http("fault.active_faults") == 0
    pair.assert_settled()


def test_body_sent_during_the_delay_is_held_and_forwarded(make: Any) -> None:
    pair = make(http_filters=[fault(delay=DELAY_2S)])
    c = pair.connect()
    c.send(b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n")
    pair.advance(1.0)
    c.send(b"3\r\ndef\r\n0\r\n\r\n")
    assert pair.upstream.attempts == []
    pair.advance(1.1)
    up = pair.upstream.accept()
    assert up.request().body == b"abcdef"


def test_delay_then_abort(make: Any) -> None:
    pair = make(http_filters=[fault(delay=DELAY_2S, abort=ABORT_503)])
    c = pair.connect()
    get(c)
    assert c.responses() == []
    pair.advance(2.1)
    assert c.response().status == 503
    assert pair.access_log.entries[0].response_flags == ["DI", "FI"]
    assert pair.http("fault.active_faults") == 0
    assert pair.upstream.attempts == []


def test_header_delay(make: Any) -> None:
    pair = make(http_filters=[fault(delay={"header_delay": {}, "percentage": pct(100)})])
    c = pair.connect()
    get(c, headers=[("x-envoy-fault-delay-request", "500")])
    assert pair.upstream.attempts == []
    pair.advance(0.6)
    assert answer(pair)
    assert c.response().status == 200
    # Without the header, or with a 0 % percentage header: no delay.
    for hdrs in (
        [],
        [("x-envoy-fault-delay-request", "500"), ("x-envoy-fault-delay-request-percentage", "0")],
    ):
        get(c, headers=hdrs)
        assert answer(pair)  # no time passed: it was not delayed
        assert c.response().status == 200
    assert pair.http("fault.delays_injected") == 1


def test_reset_during_delay_cancels_the_timer(make: Any) -> None:
    pair = make(http_filters=[fault(delay={"fixed_delay": "100s", "percentage": pct(100)})])
    c = pair.connect()
    get(c)
    due = pair.now + 100
    assert any(abs(t - due) < 0.01 for t in pair.loop.pending_timers())
    c.reset()
    assert not any(abs(t - due) < 0.01 for t in pair.loop.pending_timers())
    assert pair.http("fault.active_faults") == 0
    pair.advance(200)
    assert pair.upstream.attempts == []
    info = pair.access_log.entries[0]
    assert info.response_flags == ["DI", "DC"]
    pair.assert_settled()


def test_h2_stream_reset_during_delay(make: Any) -> None:
    pair = make(http_filters=[fault(delay={"fixed_delay": "100s", "percentage": pct(100)})])
    h = pair.connect_h2()
    sid = h.request("GET", "/")
    assert pair.http("fault.active_faults") == 1
    h.reset(sid)
    assert pair.http("fault.active_faults") == 0
    pair.advance(200)
    assert pair.upstream.attempts == []
    pair.assert_settled()


def test_body_over_the_buffer_limit_during_a_delay_gets_413_and_frees_the_fault(make: Any) -> None:
    pair = make(http_filters=[fault(delay={"fixed_delay": "100s", "percentage": pct(100)})])
    c = pair.connect(buffer_limit=16)
    c.send(build_request("POST", "/", [], body=b"x" * 100))
    assert c.response().status == 413
    assert pair.http("fault.active_faults") == 0
    assert not any(t > pair.now + 50 for t in pair.loop.pending_timers())
    pair.advance(200)
    assert pair.upstream.attempts == []
    pair.assert_settled()


def test_oversized_numeric_headers_are_not_numbers(make: Any) -> None:
    pair = make(
        http_filters=[
            fault(
                delay={"header_delay": {}, "percentage": pct(100)},
                abort={"header_abort": {}, "percentage": pct(100)},
            )
        ]
    )
    c = pair.connect()
    huge = "9" * 5000  # int() of this raises ValueError past Python's digit limit
    get(c, headers=[("x-envoy-fault-delay-request", huge), ("x-envoy-fault-abort-request", huge)])
    assert answer(pair)
    assert c.response().status == 200
    assert pair.http("fault.delays_injected") == 0 and pair.http("fault.aborts_injected") == 0


def test_delay_does_not_use_up_the_route_timeout(make: Any) -> None:
    # Envoy's router arms the route timeout when it has the whole request, i.e. after the fault
    # filter let it go: a 2 s delay in front of a 1 s route timeout still leaves 1 s upstream.
    routes = [{"match": {"prefix": "/"}, "route": {"cluster": "be", "timeout": "1s"}}]
    pair = make(http_filters=[fault(delay=DELAY_2S)], routes=routes)
    c = pair.connect()
    get(c)
    pair.advance(2.05)
    up = pair.upstream.accept()
    assert up.has_request()
    pair.advance(0.9)
    assert c.responses() == []
    pair.advance(0.2)
    assert c.response().status == 504
    assert pair.access_log.entries[0].response_flags == ["DI", "UT"]


# -- matching and limits ----------------------------------------------------------------------


def test_headers_nodes_and_upstream_cluster_restrict_faults(make: Any) -> None:
    clusters = {"be": [("10.0.0.1", 80)], "other": [("10.0.0.2", 80)]}
    routes = [
        {"match": {"prefix": "/other"}, "route": {"cluster": "other"}},
        {"match": {"prefix": "/"}, "route": {"cluster": "be"}},
    ]
    f = fault(
        abort=ABORT_503,
        upstream_cluster="be",
        downstream_nodes=["node-a"],
        headers=[{"name": "x-fault", "present_match": True}],
    )
    pair = make(http_filters=[f], routes=routes, clusters=clusters)
    c = pair.connect()
    node = ("x-envoy-downstream-service-node", "node-a")
    get(c, "/x", [node, ("x-fault", "1")])
    assert c.response().status == 503
    cases = [
        ("/x", [node]),
        ("/x", [("x-fault", "1")]),
        ("/x", [("x-envoy-downstream-service-node", "b"), ("x-fault", "1")]),
        ("/other", [node, ("x-fault", "1")]),
    ]
    for target, hdrs in cases:
        get(c, target, hdrs)
        assert answer(pair), (target, hdrs)
        assert c.response().status == 200
    assert pair.http("fault.aborts_injected") == 1


def test_max_active_faults(make: Any) -> None:
    pair = make(
        http_filters=[
            fault(
                delay={"header_delay": {}, "percentage": pct(100)},
                abort={"header_abort": {}, "percentage": pct(100)},
                max_active_faults=1,
            )
        ]
    )
    c1 = pair.connect()
    get(c1, headers=[("x-envoy-fault-delay-request", "10000")])
    assert pair.http("fault.active_faults") == 1
    c2 = pair.connect(remote=("10.1.0.2", 50000))
    get(c2, headers=[("x-envoy-fault-abort-request", "500")])
    # Over the limit: no fault, the request goes through.
    assert answer(pair)
    assert c2.response().status == 200
    assert pair.http("fault.faults_overflow") == 1
    assert pair.http("fault.aborts_injected") == 0
    pair.advance(10.1)
    # The first one's fault ended with its delay's stream: the next abort is injected.
    assert answer(pair)
    assert c1.response().status == 200
    assert pair.http("fault.active_faults") == 0
    get(c2, headers=[("x-envoy-fault-abort-request", "500")])
    assert c2.responses()[-1].status == 500


def test_downstream_cluster_stats_are_bounded(make: Any) -> None:
    pair = make(http_filters=[fault(abort=ABORT_503)])
    c = pair.connect()
    get(c, headers=[("x-envoy-downstream-service-cluster", "web")])
    assert pair.http("fault.web.aborts_injected") == 1
    cfg = config_of(pair)
    for i in range(MAX_DOWNSTREAM_CLUSTERS + 5):
        get(c, headers=[("x-envoy-downstream-service-cluster", f"c{i}")])
    assert len(cfg._ds) == MAX_DOWNSTREAM_CLUSTERS
    assert pair.http("fault.aborts_injected") == MAX_DOWNSTREAM_CLUSTERS + 6


def test_downstream_cluster_stats_can_be_disabled(make: Any) -> None:
    pair = make(http_filters=[fault(abort=ABORT_503, disable_downstream_cluster_stats=True)])
    c = pair.connect()
    get(c, headers=[("x-envoy-downstream-service-cluster", "web")])
    assert c.response().status == 503
    assert pair.stats.get("http.ingress.fault.web.aborts_injected") is None


def test_per_route_fault_replaces_the_filters(make: Any) -> None:
    routes = [
        {
            "match": {"prefix": "/calm"},
            "route": {"cluster": "be"},
            "typed_per_filter_config": {"envoy.filters.http.fault": {"@type": FAULT_TYPE}},
        },
        {"match": {"prefix": "/"}, "route": {"cluster": "be"}},
    ]
    pair = make(http_filters=[fault(abort=ABORT_503)], routes=routes)
    c = pair.connect()
    get(c, "/calm")
    pair.upstream.accept().respond(200)
    assert c.response().status == 200
    get(c, "/x")
    assert c.responses()[-1].status == 503


# -- config -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cfg", "field"),
    [
        ({"abort": {"http_status": 100}}, "abort.http_status"),
        ({"abort": {"percentage": pct(1)}}, "abort"),
        ({"delay": {"fixed_delay": "0s"}}, "delay.fixed_delay"),
        ({"delay": {"percentage": pct(1)}}, "delay"),
    ],
)
def test_bad_config_names_the_field(cfg: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as e:
        Pair(bootstrap_yaml(http_filters=[fault(**cfg)])).close()
    assert e.value.path.endswith("typed_config." + field), e.value.path


def test_runtime_keys_are_announced(make: Any) -> None:
    pair = make(
        http_filters=[
            fault(
                abort=ABORT_503,
                response_rate_limit={"fixed_limit": {"limit_kbps": 1}, "percentage": pct(100)},
                abort_percent_runtime="x",
            )
        ]
    )
    notices = [str(n) for n in pair.server.ctx.notices]
    assert not any("response_rate_limit" in n for n in notices), notices
    assert any("abort_percent_runtime" in n for n in notices), notices


# -- response rate limit ----------------------------------------------------------------------


def rl(kbps: int | None = None, n: int = 100) -> dict[str, Any]:
    lim: dict[str, Any] = {"fixed_limit": {"limit_kbps": kbps}} if kbps else {"header_limit": {}}
    return {**lim, "percentage": pct(n)}


def body_of(c: Any) -> bytes:
    """The body bytes the client got so far (HTTP/1.1, content-length framing)."""
    raw = c.data
    return raw[raw.index(b"\r\n\r\n") + 4 :] if b"\r\n\r\n" in raw else b""


def test_response_body_is_released_at_the_rate(make: Any) -> None:
    pair = make(http_filters=[fault(response_rate_limit=rl(kbps=16))])  # 16 KiB/s: 1 KiB a slice
    c = pair.connect()
    get(c)
    assert pair.http("fault.response_rl_injected") == 1
    assert pair.http("fault.active_faults") == 1
    up = pair.upstream.accept()
    up.request()
    body = bytes(range(256)) * 32  # 8 KiB
    up.respond(200, body=body)
    # The headers and the first slice go at once (on the next loop turn).
    assert c.data.startswith(b"HTTP/1.1 200")
    assert body_of(c) == body[:1024]
    pair.advance(0.0626)
    assert body_of(c) == body[:2048]
    pair.advance(0.2)
    assert len(body_of(c)) < len(body)
    pair.advance(1.0)
    assert c.response().body == body
    assert pair.http("fault.active_faults") == 0
    assert not any(t <= pair.now + 0.07 for t in pair.loop.pending_timers())  # no release tick left
    pair.assert_settled()


def test_header_limit_and_its_percentage(make: Any) -> None:
    pair = make(http_filters=[fault(response_rate_limit=rl())])
    c = pair.connect()
    # No header, a 0 header, or a 0 % percentage header: no limit.
    for hdrs in (
        [],
        [("x-envoy-fault-throttle-response", "0")],
        [("x-envoy-fault-throttle-response", "1"), ("x-envoy-fault-throttle-response-percentage", "0")],
    ):
        get(c, headers=hdrs)
        up = pair.upstream.connections[0] if pair.upstream.connections else pair.upstream.accept()
        up.request()
        up.respond(200, body=b"x" * 5000)
        assert c.responses()[-1].body == b"x" * 5000  # no time passed
    assert pair.http("fault.response_rl_injected") == 0
    get(c, headers=[("x-envoy-fault-throttle-response", "1")])  # 1 KiB/s: 64 bytes a slice
    up = pair.upstream.connections[0]
    up.request()
    c.read()
    up.respond(200, body=b"y" * 200)
    assert c.read().endswith(b"\r\n\r\n" + b"y" * 64)
    pair.advance(1.0)
    assert c.responses()[-1].body == b"y" * 200
    assert pair.http("fault.response_rl_injected") == 1


def test_rate_limit_percentage_samples(make: Any) -> None:
    pair = make(http_filters=[fault(response_rate_limit=rl(kbps=1, n=0))])
    c = pair.connect()
    get(c)
    assert answer(pair)
    assert c.response().status == 200
    assert pair.http("fault.response_rl_injected") == 0
    assert pair.http("fault.active_faults") == 0


def test_fast_upstream_is_paused_above_the_buffer_limit_and_resumed(make: Any) -> None:
    pair = make(
        http_filters=[fault(response_rate_limit=rl(kbps=64))],  # 4 KiB a slice
        listener_extra={"per_connection_buffer_limit_bytes": 16384},
    )
    c = pair.connect()
    get(c)
    up = pair.upstream.accept()
    up.request()
    body = bytes(range(251)) * 400  # ~98 KiB
    up.send(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body))
    up.send(body[:20000])
    assert not up.reading  # above the 16 KiB limit: the upstream is paused
    pair.advance(0.07)
    assert not up.reading
    pair.advance(0.2)  # released down to half the limit: reading again
    assert up.reading
    up.send(body[20000:60000])
    assert not up.reading
    pair.advance(1.0)
    assert up.reading
    up.send(body[60000:])  # the response is complete: the connection goes back to the pool
    pair.advance(3.0)
    assert c.response().body == body
    pair.assert_settled()


def test_downstream_write_resume_does_not_unpause_a_throttled_upstream(make: Any) -> None:
    pair = make(
        http_filters=[fault(response_rate_limit=rl(kbps=1))],
        listener_extra={"per_connection_buffer_limit_bytes": 1024},
    )
    c = pair.connect()
    get(c)
    up = pair.upstream.accept()
    up.request()
    up.send(b"HTTP/1.1 200 OK\r\ncontent-length: 4000\r\n\r\n" + b"z" * 2000)
    assert not up.reading
    c.block_writes()
    c.unblock_writes()
    assert not up.reading  # the filter still keeps more than its limit


def test_throttle_below_its_low_mark_does_not_unpause_a_write_paused_downstream(make: Any) -> None:
    pair = make(
        http_filters=[fault(response_rate_limit=rl(kbps=1))],  # 64 bytes a slice
        listener_extra={"per_connection_buffer_limit_bytes": 1024},
    )
    c = pair.connect()
    get(c)
    up = pair.upstream.accept()
    up.request()
    up.send(b"HTTP/1.1 200 OK\r\ncontent-length: 4000\r\n\r\n" + b"w" * 1100)
    assert not up.reading
    c.block_writes()  # the client stops reading
    pair.advance(10.0)  # the filter is down to its low mark (512 bytes) and below
    assert not up.reading  # still paused: the client is
    c.unblock_writes()
    assert up.reading
    up.send(b"w" * 2900)
    pair.advance(70.0)
    assert c.response().body == b"w" * 4000
    pair.assert_settled()


def test_trailers_wait_until_the_body_is_released(make: Any) -> None:
    pair = make(http_filters=[fault(response_rate_limit=rl(kbps=1))])
    h = pair.connect_h2()
    sid = h.request("GET", "/")
    up = pair.upstream.accept()
    up.request()
    up.respond(200, body=b"t" * 300, chunked=True, trailers=[("x-t", "1")])
    h.poll()
    r = h.response(sid)
    assert r.status == 200
    assert r.trailer("x-t") is None
    assert bytes(r.body) == b"t" * 64
    pair.advance(1.0)
    h.poll()
    assert bytes(r.body) == b"t" * 300
    assert r.trailer("x-t") == b"1"
    assert r.ended
    pair.assert_settled()


def test_reset_while_throttled_cancels_the_timer(make: Any) -> None:
    pair = make(http_filters=[fault(response_rate_limit=rl(kbps=1))])
    c = pair.connect()
    get(c)
    up = pair.upstream.accept()
    up.request()
    up.respond(200, body=b"r" * 5000)
    assert pair.http("fault.active_faults") == 1
    assert any(t <= pair.now + 0.1 for t in pair.loop.pending_timers())
    c.reset()
    assert not any(t <= pair.now + 0.1 for t in pair.loop.pending_timers())  # pin: no timer left
    assert pair.http("fault.active_faults") == 0
    pair.advance(10)
    pair.assert_settled()


def test_rate_limit_counts_against_max_active_faults(make: Any) -> None:
    pair = make(http_filters=[fault(response_rate_limit=rl(kbps=1), max_active_faults=1)])
    c1, c2 = pair.connect(), pair.connect()
    get(c1)
    get(c2)
    assert pair.http("fault.response_rl_injected") == 1
    assert pair.http("fault.faults_overflow") == 1
    assert pair.http("fault.active_faults") == 1


def test_per_route_rate_limit(make: Any) -> None:
    routes = [
        {
            "match": {"prefix": "/slow"},
            "route": {"cluster": "be"},
            "typed_per_filter_config": {
                "envoy.filters.http.fault": {"@type": FAULT_TYPE, "response_rate_limit": rl(kbps=1)}
            },
        },
        {"match": {"prefix": "/"}, "route": {"cluster": "be"}},
    ]
    pair = make(http_filters=[fault()], routes=routes)
    c = pair.connect()
    get(c, "/fast")
    assert answer(pair)
    get(c, "/slow")
    assert pair.http("fault.response_rl_injected") == 1
    up = pair.upstream.connections[0]
    up.request()
    c.read()
    up.respond(200, body=b"s" * 1000)
    assert c.read().endswith(b"\r\n\r\n" + b"s" * 64)
    pair.advance(20)
    assert c.responses()[-1].body == b"s" * 1000


@pytest.mark.parametrize(
    ("cfg", "field"),
    [
        ({"fixed_limit": {"limit_kbps": 0}}, "response_rate_limit.fixed_limit.limit_kbps"),
        ({"percentage": pct(1)}, "response_rate_limit"),
    ],
)
def test_bad_rate_limit_names_the_field(cfg: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as e:
        Pair(bootstrap_yaml(http_filters=[fault(response_rate_limit=cfg)])).close()
    assert e.value.path.endswith("typed_config." + field), e.value.path
