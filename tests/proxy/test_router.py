"""The router (moorline/proxy/router.py): retries, backoff, timeouts, upgrades, driven in memory
with moorline.testing.pair. The test plays every upstream host: it accepts, refuses or ignores
each connection attempt and answers byte by byte; the virtual clock makes backoff and timeouts
exact (the router's jitter is pinned by replacing its ``random`` source).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from moorline.proxy import router as router_mod
from moorline.testing.pair import Pair, bootstrap_yaml
from moorline.testing.procs import cluster

H1 = ("10.0.0.1", 80)
H2 = ("10.0.0.2", 80)


class HalfRandom:
    """Pins the backoff jitter: every draw is 0.5 of the cap."""

    @staticmethod
    def random() -> float:
        return 0.5


@pytest.fixture(autouse=True)
def pinned_jitter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(router_mod, "random", HalfRandom)


@pytest.fixture
def make() -> Iterator[Any]:
    pairs: list[Pair] = []

    def make_pair(
        retry: dict[str, Any] | None = None,
        route: dict[str, Any] | None = None,
        name: str = "be",
        cluster_extra: dict[str, Any] | None = None,
        hcm_extra: dict[str, Any] | None = None,
        hosts: list[tuple[str, int]] | None = None,
    ) -> Pair:
        action: dict[str, Any] = {"cluster": name}
        if retry is not None:
            action["retry_policy"] = retry
        action.update(route or {})
        p = Pair(
            bootstrap_yaml(
                routes=[{"match": {"prefix": "/"}, "route": action}],
                clusters=[cluster(name, hosts or [H1, H2], **(cluster_extra or {}))],
                hcm_extra=hcm_extra,
            )
        )
        pairs.append(p)
        return p

    yield make_pair
    for p in pairs:
        p.close()


RETRY_5XX = {"retry_on": "5xx", "num_retries": 2, "retry_back_off": {"base_interval": "0.1s"}}


def other(address: tuple[str, int]) -> tuple[str, int]:
    return H2 if address == H1 else H1


def post(pair: Pair, body: bytes = b"abc") -> Any:
    c = pair.connect()
    c.send(b"POST /p HTTP/1.1\r\nhost: a\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
    return c


# -- retries -------------------------------------------------------------------------------------


def test_5xx_is_retried_after_backoff_on_another_host_with_the_same_request(make: Any) -> None:
    pair = make(retry=RETRY_5XX)
    c = post(pair)
    up1 = pair.upstream.accept()
    first = up1.request()
    up1.respond(503, body=b"busy")
    assert c.data == b""  # a retriable answer does not reach the client
    pair.advance(0.049)  # backoff: 0.5 x base_interval (0.1 s)
    assert pair.upstream.pending == []
    pair.advance(0.002)
    up2 = pair.upstream.accept(other(up1.address))  # round robin moves on
    second = up2.request()
    assert second.body == b"abc"
    assert second.header("x-request-id") == first.header("x-request-id")
    up2.respond(200, body=b"done")
    r = c.response()
    assert r.status == 200 and r.body == b"done"
    assert pair.cluster_stat("be", "upstream_rq_retry") == 1
    assert pair.cluster_stat("be", "upstream_rq_retry_success") == 1
    assert pair.cluster_stat("be", "upstream_rq_total") == 2
    assert pair.access_log.entries[0].attempt_count == 2
    assert pair.access_log.entries[0].upstream_host == f"{up2.address[0]}:80"
    pair.assert_settled()


RATE_LIMITED = {
    "retry_on": "retriable-status-codes",
    "retriable_status_codes": [429],
    "num_retries": 2,
    "rate_limited_retry_back_off": {
        "reset_headers": [{"name": "retry-after"}, {"name": "x-ratelimit-reset", "format": "UNIX_TIMESTAMP"}],
        "max_interval": "10s",
    },
}


def test_rate_limited_backoff_follows_retry_after(make: Any) -> None:
    pair = make(retry=RATE_LIMITED)
    c = post(pair)
    up = pair.upstream.accept()
    up.request()
    up.respond(429, headers=[("retry-after", "2")])
    pair.advance(2.49)  # 2 s, jittered up by half of the pinned 0.5: 2.5 s
    assert pair.upstream.pending == []
    pair.advance(0.02)
    up = pair.upstream.accept()
    up.request()
    # over max_interval: the header is skipped; no other header: the ordinary back-off
    # (base 25 ms, the second retry's cap 50 ms, pinned half: 25 ms)
    up.respond(429, headers=[("retry-after", "60")])
    pair.advance(0.026)
    up = pair.upstream.accept()
    up.request()
    up.respond(200)
    assert c.response().status == 200
    assert pair.cluster_stat("be", "upstream_rq_retry") == 2
    assert pair.cluster_stat("be", "upstream_rq_retry_backoff_ratelimited") == 1
    pair.assert_settled()


def test_rate_limited_backoff_is_only_for_retriable_responses(make: Any) -> None:
    pair = make(retry=RATE_LIMITED)
    c = post(pair)
    up = pair.upstream.accept()
    up.request()
    up.respond(503, headers=[("retry-after", "1")])  # not retriable under this retry_on
    assert c.response().status == 503
    assert pair.cluster_stat("be", "upstream_rq_retry") == 0
    pair.assert_settled()


def test_retriable_headers_retry(make: Any) -> None:
    pair = make(
        retry={
            "retry_on": "retriable-headers",
            "retriable_headers": [{"name": "x-try-again", "string_match": {"exact": "yes"}}],
        }
    )
    c = post(pair)
    up = pair.upstream.accept()
    up.request()
    up.respond(200, headers=[("x-try-again", "yes")])
    pair.advance(0.03)
    up = pair.upstream.accept()
    up.request()
    up.respond(200, body=b"second")
    assert c.response().body == b"second"
    assert pair.cluster_stat("be", "upstream_rq_retry") == 1
    pair.assert_settled()


def test_backoff_grows_exponentially(make: Any) -> None:
    pair = make(
        retry={
            "retry_on": "5xx",
            "num_retries": 3,
            "retry_back_off": {"base_interval": "0.1s", "max_interval": "1s"},
        }
    )
    c = post(pair)
    t0 = pair.now
    times = []
    for _ in range(3):
        up = pair.upstream.accept()
        times.append(round(pair.now - t0, 3))
        up.request()
        up.respond(503)
        t0 = pair.now
        while not pair.upstream.pending:
            pair.advance(0.001)
    up = pair.upstream.accept()
    times.append(round(pair.now - t0, 3))
    up.request()
    up.respond(200)
    assert c.response().status == 200
    # first attempt at once; then 0.5 x 0.1, 0.5 x 0.2, 0.5 x 0.4 (jitter pinned at 0.5)
    assert times == [0.0, 0.05, 0.1, 0.2]
    pair.assert_settled()


def test_retries_exhausted_forward_the_last_answer(make: Any) -> None:
    pair = make(retry=RETRY_5XX)
    c = post(pair)
    for i in range(3):
        pair.advance(0.2)
        up = pair.upstream.accept()
        up.request()
        up.respond(503, body=b"busy %d" % i)
    r = c.response()
    assert r.status == 503 and r.body == b"busy 2"
    assert pair.cluster_stat("be", "upstream_rq_retry") == 2
    assert pair.access_log.entries[0].attempt_count == 3
    pair.assert_settled()


def test_retries_exhausted_are_counted_and_flagged(make: Any) -> None:
    pair = make(retry=RETRY_5XX)
    c = post(pair)
    for _ in range(3):
        pair.advance(0.2)
        up = pair.upstream.accept()
        up.request()
        up.respond(503)
    assert c.response().status == 503
    assert pair.cluster_stat("be", "upstream_rq_retry_limit_exceeded") == 1
    assert "URX" in pair.access_log.entries[0].response_flags


def test_5xx_without_a_retry_policy_is_forwarded(make: Any) -> None:
    pair = make()
    c = post(pair)
    up = pair.upstream.accept()
    up.request()
    up.respond(500, body=b"boom")
    assert c.response().body == b"boom"
    assert pair.cluster_stat("be", "upstream_rq_retry") == 0
    pair.assert_settled()


def test_upstream_reset_before_response_is_retried(make: Any) -> None:
    pair = make(retry={"retry_on": "reset", "num_retries": 1})
    c = post(pair)
    up1 = pair.upstream.accept()
    up1.request()
    up1.reset()
    pair.advance(0.1)
    up2 = pair.upstream.accept(other(up1.address))
    assert up2.request().body == b"abc"
    up2.respond(200)
    assert c.response().status == 200
    assert pair.cluster_stat("be", "upstream_rq_retry") == 1
    pair.assert_settled()


def test_upstream_reset_after_response_started_is_not_retried(make: Any) -> None:
    pair = make(retry={"retry_on": "reset", "num_retries": 1})
    c = post(pair)
    up = pair.upstream.accept()
    up.request()
    up.send(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
    up.reset()
    pair.advance(1)
    assert pair.upstream.pending == []
    assert c.aborted
    assert pair.access_log.entries[0].response_flags == ["UR"]
    pair.assert_settled()


def test_upstream_reset_without_policy_is_503_uc(make: Any) -> None:
    pair = make()
    c = post(pair)
    up = pair.upstream.accept()
    up.request()
    up.close()
    r = c.response()
    assert r.status == 503
    assert (
        r.body
        == b"upstream connect error or disconnect/reset before headers. reset reason: connection termination"
    )
    assert pair.access_log.entries[0].response_flags == ["UC"]
    pair.assert_settled()


def test_connect_failure_is_retried(make: Any) -> None:
    pair = make(retry={"retry_on": "connect-failure", "num_retries": 1})
    c = post(pair)
    first = pair.upstream.attempt()
    first.refuse()
    assert pair.cluster_stat("be", "upstream_cx_connect_fail") == 1
    pair.advance(0.1)
    up = pair.upstream.accept(other(first.address))
    assert up.request().body == b"abc"
    up.respond(200)
    assert c.response().status == 200
    assert pair.cluster_stat("be", "upstream_rq_retry") == 1
    pair.assert_settled()


def test_connect_failure_without_policy_is_503_uf(make: Any) -> None:
    pair = make()
    c = post(pair)
    pair.upstream.refuse()
    r = c.response()
    assert r.status == 503
    assert r.body.startswith(
        b"upstream connect error or disconnect/reset before headers. reset reason: connection failure"
    )
    assert b"transport failure reason: delayed connect error: 111" in r.body
    assert pair.access_log.entries[0].response_flags == ["UF"]
    pair.assert_settled()


def test_connect_timeout_fails_the_request(make: Any) -> None:
    pair = make(cluster_extra={"connect_timeout": "0.5s"})
    c = post(pair)
    attempt = pair.upstream.attempt()
    pair.advance(0.4)
    assert c.data == b""
    pair.advance(0.2)
    assert attempt.cancelled
    assert c.response().status == 503
    assert pair.cluster_stat("be", "upstream_cx_connect_timeout") == 1
    pair.assert_settled()


def test_retriable_status_codes(make: Any) -> None:
    pair = make(
        retry={"retry_on": "retriable-status-codes", "retriable_status_codes": [409], "num_retries": 1}
    )
    c = post(pair)
    up = pair.upstream.accept()
    up.request()
    up.respond(409)
    pair.advance(0.1)
    up2 = pair.upstream.accept()
    up2.request()
    up2.respond(404, body=b"nope")  # not in the list: forwarded
    r = c.response()
    assert r.status == 404 and r.body == b"nope"
    assert pair.cluster_stat("be", "upstream_rq_retry") == 1
    pair.assert_settled()


def test_request_body_over_the_buffer_limit_is_not_retried(make: Any) -> None:
    pair = make(retry=RETRY_5XX)
    pair.listener.buffer_limit = 8
    c = post(pair, b"0123456789abcdef")
    up = pair.upstream.accept()
    assert up.request().body == b"0123456789abcdef"
    up.respond(503, body=b"busy")
    assert c.response().body == b"busy"  # the body was not kept, so it cannot be sent again
    pair.advance(1)
    assert pair.upstream.pending == []
    pair.assert_settled()


# -- resets during backoff -----------------------------------------------------------------------


def test_downstream_reset_during_backoff_cancels_the_retry(make: Any) -> None:
    pair = make(retry=RETRY_5XX)
    c = post(pair)
    up = pair.upstream.accept()
    up.request()
    up.respond(503)
    c.reset()
    pair.advance(1)
    assert pair.upstream.pending == [] and len(pair.upstream.attempts) == 1
    assert pair.http("downstream_rq_rx_reset") == 1
    pair.assert_settled()


def test_downstream_reset_during_backoff_gives_the_retry_slot_back(make: Any) -> None:
    # One retry at a time on this cluster (circuit breaker max_retries: 1); its own cluster
    # name, since the leaked slot outlives the pair while the counter is module state.
    pair = make(
        retry=RETRY_5XX,
        name="leaky_backoff",
        cluster_extra={"circuit_breakers": {"thresholds": [{"max_retries": 1}]}},
    )
    c = post(pair)
    up = pair.upstream.accept()
    up.request()
    up.respond(503)
    c.reset()  # while the retry waits for its backoff
    pair.advance(1)
    assert pair.upstream.pending == []
    c2 = post(pair)
    up2 = pair.upstream.accept()
    up2.request()
    up2.respond(503)
    assert c2.data == b""  # retried, not answered
    assert pair.cluster_stat("leaky_backoff", "upstream_rq_retry_overflow") == 0
    pair.advance(0.1)
    assert pair.upstream.pending


def test_route_timeout_during_backoff_answers_504_and_frees_the_slot(make: Any) -> None:
    pair = make(
        retry={"retry_on": "5xx", "num_retries": 3, "retry_back_off": {"base_interval": "2s"}},
        route={"timeout": "0.5s"},
        name="timeout_backoff",
        cluster_extra={"circuit_breakers": {"thresholds": [{"max_retries": 1}]}},
    )
    for _ in range(2):
        c = post(pair)
        up = pair.upstream.accept() if pair.upstream.pending else pair.upstream.connections[-1]
        up.request()
        up.respond(503)
        pair.advance(0.6)  # the route timeout fires inside the 1 s backoff
        assert c.response().status == 504
    assert pair.cluster_stat("timeout_backoff", "upstream_rq_retry") == 2
    assert pair.cluster_stat("timeout_backoff", "upstream_rq_retry_overflow") == 0
    pair.assert_settled()


# -- timeouts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("timeout", ["0.5s", "15s"])  # a timer of its own / the connection's lazy check
def test_route_timeout_is_504(make: Any, timeout: str) -> None:
    seconds = float(timeout[:-1])
    pair = make(route={"timeout": timeout})
    c = post(pair)
    up = pair.upstream.accept()
    up.request()
    pair.advance(seconds * 0.9)
    assert c.data == b""
    pair.advance(seconds * 0.2)
    r = c.response()
    assert r.status == 504 and r.body == b"upstream request timeout"
    assert up.aborted
    info = pair.access_log.entries[0]
    assert info.response_flags == ["UT"] and info.response_code_details == "upstream_response_timeout"
    assert pair.cluster_stat("be", "upstream_rq_timeout") == 1
    pair.assert_settled()


def test_route_timeout_starts_when_the_request_is_complete(make: Any) -> None:
    pair = make(route={"timeout": "1s"})
    c = pair.connect()
    c.send(b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 2\r\n\r\na")
    up = pair.upstream.accept()
    pair.advance(5)  # the body is still arriving
    assert c.data == b""
    c.send(b"b")
    assert up.request().body == b"ab"
    pair.advance(0.9)
    assert c.data == b""
    pair.advance(0.2)
    assert c.response().status == 504
    pair.assert_settled()


def test_route_timeout_zero_disables_it(make: Any) -> None:
    pair = make(route={"timeout": "0s"})
    c = post(pair)
    up = pair.upstream.accept()
    up.request()
    pair.advance(200)  # past the default route timeout (15 s), short of the stream idle timeout
    assert c.data == b""
    up.respond(200)
    assert c.response().status == 200


def test_per_try_timeout_moves_to_the_next_host(make: Any) -> None:
    pair = make(
        retry={
            "retry_on": "5xx",
            "num_retries": 1,
            "per_try_timeout": "1s",
            "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts"}],
        }
    )
    c = post(pair)
    up1 = pair.upstream.accept()
    up1.request()
    pair.advance(1.01)
    assert up1.aborted  # no hedging: the first try is abandoned, not raced
    assert pair.cluster_stat("be", "upstream_rq_per_try_timeout") == 1
    assert pair.cluster_stat("be", "upstream_rq_active") == 0
    pair.advance(0.05)
    up2 = pair.upstream.accept(other(up1.address))
    assert up2.request().body == b"abc"
    assert pair.cluster_stat("be", "upstream_rq_active") == 1
    up2.respond(200, body=b"second")
    assert c.response().body == b"second"
    pair.assert_settled()


def test_per_try_timeout_without_retries_left_is_504(make: Any) -> None:
    pair = make(retry={"retry_on": "5xx", "num_retries": 0, "per_try_timeout": "1s"})
    c = post(pair)
    up = pair.upstream.accept()
    up.request()
    pair.advance(1.1)
    r = c.response()
    assert r.status == 504
    assert pair.access_log.entries[0].response_code_details == "upstream_per_try_timeout"
    pair.assert_settled()


def test_hedging_is_off_even_when_configured() -> None:
    cfg = bootstrap_yaml(
        virtual_hosts=[
            {
                "name": "v",
                "domains": ["*"],
                "hedge_policy": {"hedge_on_per_try_timeout": True, "initial_requests": 2},
                "routes": [
                    {
                        "match": {"prefix": "/"},
                        "route": {
                            "cluster": "be",
                            "retry_policy": {"retry_on": "5xx", "num_retries": 1, "per_try_timeout": "1s"},
                        },
                    }
                ],
            }
        ],
        clusters={"be": [H1, H2]},
    )
    with Pair(cfg) as pair:
        assert any("hedge_policy" in n for n in pair.server.ctx.notices), pair.server.ctx.notices
        c = post(pair)
        assert len(pair.upstream.attempts) == 1  # initial_requests: 2 is not acted on
        up1 = pair.upstream.accept()
        up1.request()
        pair.advance(1.05)
        assert up1.aborted  # the timed-out try is abandoned, not raced
        up2 = pair.upstream.accept()
        up2.request()
        assert pair.cluster_stat("be", "upstream_rq_active") == 1  # one try in flight at a time
        up2.respond(200)
        assert c.response().status == 200
        assert len(pair.upstream.attempts) == 2
        pair.assert_settled()


# -- HTTP/2 upstream: refused streams ------------------------------------------------------------


H2_CLUSTER = {"http2_protocol_options": {}}


def get(pair: Pair) -> Any:
    c = pair.connect()
    c.send(b"GET /g HTTP/1.1\r\nhost: a\r\n\r\n")
    return c


def test_refused_stream_is_retried_once_without_a_policy(make: Any) -> None:
    pair = make(cluster_extra=H2_CLUSTER, hosts=[H1])
    c = get(pair)
    h2 = pair.upstream.accept().h2()
    first = h2.request()
    assert first.ended
    h2.reset(first.sid, 7)  # REFUSED_STREAM: never processed, safe to send again
    second = h2.request()
    assert second.sid != first.sid and second.header(":path") == b"/g"
    h2.respond(second.sid, 200, body=b"ok")
    r = c.response()
    assert r.status == 200 and r.body == b"ok"
    assert pair.cluster_stat("be", "upstream_rq_retry") == 1
    pair.assert_settled()


def test_refused_stream_with_a_body_is_retried_under_a_policy(make: Any) -> None:
    pair = make(retry={"retry_on": "refused-stream", "num_retries": 1}, cluster_extra=H2_CLUSTER, hosts=[H1])
    c = post(pair)
    h2 = pair.upstream.accept().h2()
    h2.reset(h2.request().sid, 7)
    pair.advance(0.1)
    second = h2.request()
    assert second.body == b"abc"
    h2.respond(second.sid, 200)
    assert c.response().status == 200
    pair.assert_settled()


def test_refused_stream_twice_is_503(make: Any) -> None:
    pair = make(cluster_extra=H2_CLUSTER, hosts=[H1])
    c = get(pair)
    h2 = pair.upstream.accept().h2()
    h2.reset(h2.request().sid, 7)
    h2.reset(h2.request().sid, 7)
    r = c.response()
    assert r.status == 503
    assert len(h2.requests) == 2
    pair.assert_settled()


@pytest.mark.parametrize("cluster_extra", [{}, H2_CLUSTER], ids=["h1", "h2"])
def test_upstream_reset_before_the_connect_callback_is_503(make: Any, cluster_extra: dict[str, Any]) -> None:
    # The peer resets the new connection in the loop iteration of the connect: the pool must
    # not hand the dead connection to the request (the client then waited forever).
    pair = make(cluster_extra=cluster_extra, hosts=[H1])
    c = get(pair)
    pair.upstream.attempt().accept_and_reset()
    r = c.response()
    assert r.status == 503
    assert pair.cluster_stat("be", "upstream_cx_active") == 0
    pair.assert_settled()


def test_h2_upstream_response_with_trailers(make: Any) -> None:
    pair = make(cluster_extra=H2_CLUSTER, hosts=[H1])
    c = post(pair)
    h2 = pair.upstream.accept().h2()
    req = h2.request()
    assert req.header(":path") == b"/p" and req.header(":authority") == b"a"
    h2.respond(req.sid, 200, body=b"data", trailers=[("x-t", "1")])
    r = c.response()
    assert r.body == b"data" and r.trailer("x-t") == b"1"
    pair.assert_settled()


def test_use_downstream_protocol_cluster_serves_http11(make: Any) -> None:
    pair = make(cluster_extra={"protocol_selection": "USE_DOWNSTREAM_PROTOCOL"}, hosts=[H1])
    c = post(pair)
    up = pair.upstream.accept()
    assert up.request().version == b"HTTP/1.1"
    up.respond(200)
    assert c.response().status == 200


# -- upgrades ------------------------------------------------------------------------------------


WS_REQUEST = b"GET /ws HTTP/1.1\r\nhost: a\r\nconnection: upgrade\r\nupgrade: websocket\r\nsec-websocket-key: k\r\n\r\n"
WS_HCM = {"upgrade_configs": [{"upgrade_type": "websocket"}]}


def open_ws(pair: Pair) -> tuple[Any, Any]:
    c = pair.connect()
    c.send(WS_REQUEST + b"early")
    up = pair.upstream.accept()
    req = up.request()
    assert req.header("upgrade") == b"websocket" and req.header("connection") == b"upgrade"
    assert req.header("transfer-encoding") is None  # bytes before the 101 are not chunk-framed
    assert up.tunnel_data() == b""  # ... and wait for the 101 (Envoy holds them too)
    up.send(b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\nhello")
    r = c.response()
    assert r.status == 101
    assert c.tunnel_data() == b"hello"
    assert up.tunnel_data() == b"early"  # raw, once the upgrade is accepted
    return c, up


@pytest.mark.parametrize("first", ["client", "upstream"])
def test_websocket_tunnel_ended_both_ways_releases_the_request(make: Any, first: str) -> None:
    pair = make(hcm_extra=WS_HCM)
    c, up = open_ws(pair)
    c.send(b"ping")
    assert up.tunnel_data() == b"earlyping"
    up.send(b"pong")
    assert c.tunnel_data() == b"hellopong"
    assert pair.http("downstream_rq_active") == 1
    assert pair.cluster_stat("be", "upstream_rq_active") == 1
    if first == "client":
        c.eof()
        assert up.transport.eof_written  # the half-close is relayed
        assert pair.http("downstream_rq_active") == 1
        up.eof()
    else:
        up.eof()
        assert c.transport.eof_written
        assert pair.http("downstream_rq_active") == 1
        c.eof()
    assert pair.http("downstream_rq_active") == 0
    assert pair.cluster_stat("be", "upstream_rq_active") == 0
    assert pair.cluster_stat("be", "upstream_cx_active") == 0
    assert up.closed  # a tunnel's connection is never reused
    assert pair.http("downstream_cx_upgrades_total") == 1
    assert pair.access_log.entries[0].response_code == 101
    pair.assert_settled()


def test_websocket_tunnel_ended_both_ways_releases_the_connection(make: Any) -> None:
    pair = make(hcm_extra=WS_HCM)
    c, up = open_ws(pair)
    c.eof()
    up.eof()
    assert c.closed
    assert pair.http("downstream_cx_active") == 0


def test_websocket_many_sessions_do_not_exhaust_max_requests(make: Any) -> None:
    pair = make(hcm_extra=WS_HCM, cluster_extra={"circuit_breakers": {"thresholds": [{"max_requests": 2}]}})
    for _ in range(4):
        c, up = open_ws(pair)
        c.eof()
        up.eof()
    assert pair.cluster_stat("be", "upstream_rq_pending_overflow") == 0
    pair.assert_settled()


def test_websocket_upstream_reset_ends_the_session(make: Any) -> None:
    pair = make(hcm_extra=WS_HCM)
    c, up = open_ws(pair)
    up.reset()
    assert c.aborted
    pair.assert_settled()


def test_upgrade_on_a_route_without_upgrades_is_403(make: Any) -> None:
    pair = make()
    c = pair.connect()
    c.send(WS_REQUEST)
    r = c.response()
    assert r.status == 403
    assert pair.upstream.attempts == []
    assert pair.http("downstream_rq_ws_on_non_ws_route") == 1
    pair.assert_settled()


def test_upstream_101_without_an_upgrade_request_is_502(make: Any) -> None:
    pair = make()
    c = post(pair)
    up = pair.upstream.accept()
    up.request()
    up.send(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n")
    r = c.response()
    assert r.status == 502
    assert pair.access_log.entries[0].response_flags == ["UPE"]
    pair.assert_settled()


# -- circuit breakers ------------------------------------------------------------------------------


def test_max_pending_requests_overflow_is_503_uo(make: Any) -> None:
    pair = make(
        hosts=[H1],
        cluster_extra={
            "circuit_breakers": {"thresholds": [{"max_connections": 1, "max_pending_requests": 2}]}
        },
    )
    c1 = post(pair)  # queued while the only connection opens
    c2 = post(pair)  # queued behind it
    c3 = post(pair)  # beyond the queue
    r = c3.response()
    assert r.status == 503 and r.body.endswith(b"overflow")
    assert pair.access_log.entries[-1].response_flags == ["UO"]
    up = pair.upstream.accept()
    up.request()
    up.respond(200)
    assert c1.response().status == 200
    up.request()
    up.respond(200)
    assert c2.response().status == 200
    pair.assert_settled()


def test_cancelled_pending_request_leaves_the_queue(make: Any) -> None:
    pair = make(hosts=[H1], cluster_extra={"circuit_breakers": {"thresholds": [{"max_connections": 1}]}})
    c1 = post(pair)
    c2 = post(pair)
    assert pair.cluster_stat("be", "upstream_rq_pending_active") == 2
    c2.reset()
    assert pair.cluster_stat("be", "upstream_rq_pending_active") == 1
    assert pair.cluster_stat("be", "upstream_rq_cancelled") == 1
    up = pair.upstream.accept()
    up.request()
    up.respond(200)
    assert c1.response().status == 200
    assert not up.has_request()  # the cancelled request never went out
    pair.assert_settled()
