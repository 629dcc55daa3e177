"""Request mirroring (moorline/proxy/shadow.py and its hooks in the router), driven in memory with
moorline.testing.pair: the test plays the primary host and the mirror host."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from envoy.config.route.v3 import route_pb2
from google.protobuf.json_format import ParseDict

from moorline.config.errors import ConfigError
from moorline.proxy.route_table import Route, RouteTable
from moorline.proxy.shadow import shadow_authority
from moorline.testing.pair import Pair, bootstrap_yaml
from moorline.testing.procs import cluster

PRIMARY = ("10.0.0.1", 80)
MIRROR = ("10.0.0.9", 80)


@pytest.fixture
def make() -> Iterator[Any]:
    pairs: list[Pair] = []

    def make_pair(*policies: dict[str, Any], route: dict[str, Any] | None = None) -> Pair:
        action: dict[str, Any] = {"cluster": "be", "request_mirror_policies": list(policies)}
        action.update(route or {})
        p = Pair(
            bootstrap_yaml(
                routes=[{"match": {"prefix": "/"}, "route": action}],
                clusters=[cluster("be", [PRIMARY]), cluster("shadow", [MIRROR])],
            )
        )
        pairs.append(p)
        return p

    yield make_pair
    for p in pairs:
        p.close()


def post(pair: Pair, body: bytes, **kw: Any) -> Any:
    c = pair.connect(**kw)
    c.send(
        b"POST /p?q=1 HTTP/1.1\r\nhost: example.com:8080\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    )
    return c


def test_shadow_gets_the_same_request_with_host_suffixed(make: Any) -> None:
    pair = make({"cluster": "shadow"})
    c = post(pair, b"hello")
    up = pair.upstream.accept(PRIMARY)
    sh = pair.upstream.accept(MIRROR)
    a, b = up.request(), sh.request()
    assert (b.method, b.target, b.body) == (a.method, a.target, a.body) == (b"POST", b"/p?q=1", b"hello")
    assert a.header("host") == b"example.com:8080"
    assert b.header("host") == b"example.com-shadow:8080"
    assert b.header("x-request-id") == a.header("x-request-id")
    up.respond(200, body=b"primary")
    r = c.response()
    assert r.status == 200 and r.body == b"primary"
    assert pair.cluster_stat("shadow", "upstream_rq_active") == 1  # still waiting for its answer
    seen = c.data
    sh.respond(500, body=b"ignored")
    assert c.data == seen  # nothing of the shadow reaches the client
    assert pair.cluster_stat("shadow", "upstream_rq_total") == 1
    assert pair.cluster_stat("shadow", "upstream_rq_5xx") == 1
    assert pair.cluster_stat("shadow", "upstream_rq_completed") == 1
    assert len(pair.access_log.entries) == 1 and pair.access_log.entries[0].upstream_cluster == "be"
    pair.assert_settled()


def test_suffix_can_be_disabled(make: Any) -> None:
    pair = make({"cluster": "shadow", "disable_shadow_host_suffix_append": True})
    c = post(pair, b"")
    pair.upstream.accept(PRIMARY).respond(204)
    assert c.response().status == 204
    assert pair.upstream.accept(MIRROR).request().header("host") == b"example.com:8080"


def test_mirror_connect_failure_does_not_touch_the_primary(make: Any) -> None:
    pair = make({"cluster": "shadow"})
    c = post(pair, b"x")
    pair.upstream.refuse(MIRROR)
    up = pair.upstream.accept(PRIMARY)
    assert up.request().body == b"x"
    up.respond(200, body=b"ok")
    assert c.response().body == b"ok"
    assert pair.cluster_stat("shadow", "upstream_cx_connect_fail") == 1
    assert pair.cluster_stat("be", "upstream_rq_retry") == 0
    assert len(pair.upstream.attempts) == 2  # the shadow is not retried
    pair.assert_settled()


def test_primary_answers_while_mirror_is_still_connecting(make: Any) -> None:
    pair = make({"cluster": "shadow"})
    c = post(pair, b"abc")
    up = pair.upstream.accept(PRIMARY)
    up.respond(200, body=b"ok")
    assert c.response().body == b"ok"
    sh = pair.upstream.accept(MIRROR)  # the request was complete: the shadow still goes out
    assert sh.request().body == b"abc"
    sh.respond(200)
    pair.assert_settled()


def test_shadow_times_out_with_the_route_timeout(make: Any) -> None:
    pair = make({"cluster": "shadow"}, route={"timeout": "2s"})
    c = post(pair, b"abc")
    pair.upstream.accept(PRIMARY).respond(200)
    assert c.response().status == 200
    sh = pair.upstream.accept(MIRROR)
    pair.advance(2.01)
    assert sh.aborted
    assert pair.cluster_stat("shadow", "upstream_rq_timeout") == 1
    assert pair.cluster_stat("be", "upstream_rq_timeout") == 0
    pair.assert_settled()


def test_zero_fraction_sends_nothing(make: Any) -> None:
    pair = make({"cluster": "shadow", "runtime_fraction": {"default_value": {"numerator": 0}}})
    c = post(pair, b"abc")
    pair.upstream.accept(PRIMARY).respond(200)
    assert c.response().status == 200
    assert [a.address for a in pair.upstream.attempts] == [PRIMARY]
    assert pair.cluster_stat("shadow", "upstream_rq_total") == 0


def test_partial_fraction_samples(make: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from moorline.proxy import shadow as shadow_mod

    draws = iter([0.2, 0.7])  # 50 %: the first is sampled, the second is not

    class Fixed:
        @staticmethod
        def random() -> float:
            return next(draws)

    monkeypatch.setattr(shadow_mod, "random", Fixed)
    pair = make({"cluster": "shadow", "runtime_fraction": {"default_value": {"numerator": 50}}})
    for _ in range(2):
        c = post(pair, b"")
        conns = [x for x in pair.upstream.connections if x.address == PRIMARY]
        (conns[0] if conns else pair.upstream.accept(PRIMARY)).respond(200)
        assert c.next_response() is not None
    assert [a.address for a in pair.upstream.attempts].count(MIRROR) == 1


def test_body_over_the_buffer_limit_abandons_the_shadow_only(make: Any) -> None:
    pair = make({"cluster": "shadow"})
    c = pair.connect(buffer_limit=8)
    c.send(b"POST /p HTTP/1.1\r\nhost: a\r\ncontent-length: 20\r\n\r\n0123")
    up = pair.upstream.accept(PRIMARY)
    sh = pair.upstream.accept(MIRROR)
    c.send(b"456789abcdefghij")
    assert sh.aborted
    assert pair.cluster_stat("shadow", "upstream_rq_tx_reset") == 1
    assert up.request().body == b"0123456789abcdefghij"
    up.respond(200, body=b"ok")
    assert c.response().body == b"ok"
    pair.assert_settled()


def test_shadow_still_sending_is_cancelled_when_the_downstream_goes(make: Any) -> None:
    pair = make({"cluster": "shadow"})
    c = pair.connect()
    c.send(b"POST /p HTTP/1.1\r\nhost: a\r\ncontent-length: 20\r\n\r\n0123")
    pair.upstream.accept(PRIMARY)
    sh = pair.upstream.accept(MIRROR)
    c.reset()
    assert sh.aborted
    pair.assert_settled()


def test_shadow_pending_connection_is_cancelled_when_the_downstream_goes(make: Any) -> None:
    pair = make({"cluster": "shadow"})
    c = pair.connect()
    c.send(b"POST /p HTTP/1.1\r\nhost: a\r\ncontent-length: 20\r\n\r\n0123")
    c.reset()
    assert pair.cluster_stat("shadow", "upstream_rq_cancelled") == 1
    pair.assert_settled()


def test_primary_answer_before_request_end_cancels_a_shadow_still_sending(make: Any) -> None:
    pair = make({"cluster": "shadow"})
    c = pair.connect()
    c.send(b"POST /p HTTP/1.1\r\nhost: a\r\ncontent-length: 20\r\n\r\n0123")
    up = pair.upstream.accept(PRIMARY)
    sh = pair.upstream.accept(MIRROR)
    up.respond(413, body=b"no")
    assert c.response().status == 413
    assert sh.aborted
    pair.assert_settled()


def test_chunked_body_and_trailers_are_mirrored(make: Any) -> None:
    pair = make({"cluster": "shadow"})
    c = pair.connect()
    c.send(b"POST /p HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n")
    up = pair.upstream.accept(PRIMARY)
    sh = pair.upstream.accept(MIRROR)
    c.send(b"2\r\nde\r\n0\r\nx-t: 1\r\n\r\n")
    assert sh.request().body == b"abcde"
    up.respond(200)
    sh.respond(200)
    assert c.response().status == 200
    pair.assert_settled()


def test_cluster_header_picks_the_mirror_and_unknown_is_skipped(make: Any) -> None:
    pair = make({"cluster_header": "x-mirror"})
    c = pair.connect()
    c.send(
        b"GET / HTTP/1.1\r\nhost: a\r\nx-mirror: shadow\r\n\r\nGET / HTTP/1.1\r\nhost: a\r\nx-mirror: nope\r\n\r\n"
    )
    up = pair.upstream.accept(PRIMARY)
    up.respond(200)
    up.respond(200)
    assert len(c.responses()) == 2
    assert [a.address for a in pair.upstream.attempts].count(MIRROR) == 1


def compile_with(policy: dict[str, Any]) -> RouteTable:
    action = {"cluster": "c", "request_mirror_policies": [policy]}
    vh = {"name": "vh", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": action}]}
    return RouteTable.compile(ParseDict({"name": "t", "virtual_hosts": [vh]}, route_pb2.RouteConfiguration()))


def only_route(t: RouteTable) -> Route:
    route: Route = t.virtual_hosts[0].routes[0]
    return route


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({}, "request_mirror_policies[0].cluster"),
        ({"cluster": "a", "cluster_header": "b"}, "request_mirror_policies[0]"),
    ],
)
def test_config_errors(bad: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as e:
        compile_with(bad)
    assert e.value.path.endswith(field)


def test_unsupported_fields_are_noticed_and_the_route_is_not_plain() -> None:
    t = compile_with(
        {
            "cluster": "a",
            "trace_sampled": True,
            "runtime_fraction": {"runtime_key": "k", "default_value": {"numerator": 5}},
        }
    )
    assert any("trace_sampled" in n for n in t.notices)
    assert any("runtime_key" in n for n in t.notices)
    assert not any("ignored" in n and "request_mirror_policies:" in n for n in t.notices)
    r = only_route(t)
    assert r.mirrors is not None and r.mirrors[0].numerator == 5 and not r.is_plain()


def test_a_zero_fraction_policy_costs_nothing() -> None:
    r = only_route(compile_with({"cluster": "a", "runtime_fraction": {"default_value": {"numerator": 0}}}))
    assert r.mirrors is None and r.is_plain()


def test_shadow_authority() -> None:
    assert shadow_authority(b"a") == b"a-shadow"
    assert shadow_authority(b"a:80") == b"a-shadow:80"
    assert shadow_authority(b"[::1]:80") == b"[::1]-shadow:80"
    assert shadow_authority(b"[::1]") == b"[::1]-shadow"


def _levels(rc: Any, vh: Any, route: Any) -> RouteTable:
    """Three virtual hosts: ``a`` (own policies or not), ``b`` without any; routes ``/own`` (own
    policies or not) and ``/none``."""

    def pol(name: str | None) -> dict[str, Any]:
        return {"request_mirror_policies": [{"cluster": name}]} if name else {}

    def routes(own: str | None) -> list[dict[str, Any]]:
        return [
            {"match": {"prefix": "/own"}, "route": {"cluster": "c", **pol(own)}},
            {"match": {"prefix": "/none"}, "route": {"cluster": "c"}},
            {"match": {"prefix": "/r"}, "redirect": {"path_redirect": "/x"}},
        ]

    d = {
        "name": "t",
        **pol(rc),
        "virtual_hosts": [
            {"name": "a", "domains": ["a"], "routes": routes(route), **pol(vh)},
            {"name": "b", "domains": ["*"], "routes": routes(None)},
        ],
    }
    return RouteTable.compile(ParseDict(d, route_pb2.RouteConfiguration()))


def _mirror_of(t: RouteTable, host: str, path: str) -> list[str] | None:
    r = t.match(host.encode(), path.encode(), b"GET", None)
    assert r is not None
    return None if r.mirrors is None else [m.cluster for m in r.mirrors]


def test_mirror_policies_at_each_level_the_most_specific_non_empty_wins_whole() -> None:
    t = _levels("m_rc", "m_vh", "m_route")
    assert not any("request_mirror_policies" in n for n in t.notices)
    assert _mirror_of(t, "a", "/own") == ["m_route"]  # the route's own replace the others
    assert _mirror_of(t, "a", "/none") == ["m_vh"]  # the virtual host's replace the config's
    assert _mirror_of(t, "x", "/none") == ["m_rc"]  # nothing below: the configuration's
    t = _levels("m_rc", None, None)
    assert _mirror_of(t, "a", "/own") == ["m_rc"] and _mirror_of(t, "a", "/none") == ["m_rc"]
    r = t.match(b"a", b"/none", b"GET", None)
    assert r is not None and not r.is_plain()  # inherited mirrors take the router's full path
    redirect = t.match(b"a", b"/r", b"GET", None)
    assert redirect is not None and redirect.mirrors is None
    t = _levels(None, None, None)
    r = t.match(b"a", b"/own", b"GET", None)
    assert r is not None and r.mirrors is None and r.is_plain()  # unset anywhere: no cost


def test_a_zero_fraction_route_policy_still_replaces_the_virtual_host_ones() -> None:
    zero = {"cluster": "z", "runtime_fraction": {"default_value": {"numerator": 0}}}
    vh = {
        "name": "a",
        "domains": ["*"],
        "request_mirror_policies": [{"cluster": "m_vh"}],
        "routes": [
            {"match": {"prefix": "/z"}, "route": {"cluster": "c", "request_mirror_policies": [zero]}},
            {"match": {"prefix": "/"}, "route": {"cluster": "c"}},
        ],
    }
    t = RouteTable.compile(ParseDict({"name": "t", "virtual_hosts": [vh]}, route_pb2.RouteConfiguration()))
    assert _mirror_of(t, "h", "/z") is None
    assert _mirror_of(t, "h", "/") == ["m_vh"]


def test_virtual_host_mirror_policy_errors_name_their_level() -> None:
    vh = {"name": "a", "domains": ["*"], "request_mirror_policies": [{}], "routes": []}
    with pytest.raises(ConfigError) as e:
        RouteTable.compile(ParseDict({"name": "t", "virtual_hosts": [vh]}, route_pb2.RouteConfiguration()))
    assert e.value.path.endswith("virtual_hosts[0].request_mirror_policies[0].cluster")
