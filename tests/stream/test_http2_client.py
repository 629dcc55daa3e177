"""The upstream HTTP/2 pool and connection (``moorline.stream.http2_client``) in memory: the
per-connection stream limit (the peer's SETTINGS unless the cluster sets one, as Envoy) and an
upstream that sends GOAWAY every few requests: the streams above its last stream id are sent
again on a new connection, however often that happens, and no request fails."""

from __future__ import annotations

from typing import Any

import h2.settings

from moorline.protocol.http2 import _KeepOpenStateMachine
from moorline.testing.pair import H2Upstream, Pair, bootstrap_yaml
from moorline.testing.procs import cluster

UP = ("10.0.0.1", 80)


def make(h2opts: dict[str, Any] | None = None) -> Pair:
    c = cluster("be", [UP], http2_protocol_options=h2opts or {})
    return Pair(bootstrap_yaml(clusters=[c]))


def announce(up: H2Upstream, max_streams: int) -> None:
    up.h2.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_streams})
    up._flush()


def gets(pair: Pair, n: int) -> list[Any]:
    out = []
    for i in range(n):
        d = pair.connect(remote=("10.1.0.1", 40000 + i))
        d.send(b"GET /r%d HTTP/1.1\r\nhost: a\r\n\r\n" % i)
        out.append(d)
    return out


def serve_two_then_goaway(pair: Pair, n: int) -> int:
    """Upstream connections that each answer two streams, then GOAWAY with the second as last
    stream id and close (nginx keepalive_requests 2), until ``n`` were answered; returns how
    many were."""
    served = 0
    for _ in range(10):
        up = pair.upstream.attempt().accept().h2()
        up.h2.state_machine = _KeepOpenStateMachine()  # streams go on after its GOAWAY
        up.poll()
        sids = sorted(up.requests)
        if not sids:
            break
        first = sids[:2]
        up.goaway(0, last_stream_id=first[-1])
        for sid in first:
            up.respond(sid, 200, body=b"ok")
            served += 1
        up.conn.close()
        if served == n:
            break
    return served


def test_upstream_streams_follow_the_peers_limit_by_default() -> None:
    # Envoy's default max_concurrent_streams is 2147483647: 150 requests share one connection
    # when the upstream allows 150 (moorline's own downstream default, 100, is not applied).
    with make() as pair:
        clients = gets(pair, 1)
        up = pair.upstream.accept().h2()
        announce(up, 150)
        clients += gets(pair, 149)
        up.poll()
        assert len(up.requests) == 150
        assert len(pair.upstream.attempts) == 1
        for sid in list(up.requests):
            up.respond(sid, 200, body=b"ok")
        assert all(c.response().status == 200 for c in clients)
        pair.assert_settled()


def test_cluster_max_concurrent_streams_caps_each_connection() -> None:
    with make({"max_concurrent_streams": 2}) as pair:
        clients = gets(pair, 5)
        conns = [pair.upstream.accept().h2() for _ in range(3)]
        assert [len(c.requests) for c in conns] == [2, 2, 1]
        for c in conns:
            for sid in list(c.requests):
                c.respond(sid, 200)
        assert all(c.response().status == 200 for c in clients)


def test_goaway_every_few_requests_loses_no_request() -> None:
    # nginx keepalive_requests 2: GOAWAY after two streams, the rest above its last stream id
    # are sent again on the next connection, over and over (more than the single free retry of
    # an RST REFUSED_STREAM), until all are answered.
    with make() as pair:
        clients = gets(pair, 7)
        assert serve_two_then_goaway(pair, 7) == 7
        assert all(c.response().status == 200 for c in clients)
        assert pair.cluster_stat("be", "upstream_cx_total") == 4
        assert pair.cluster_stat("be", "http2.goaway_received") == 4
        assert pair.cluster_stat("be", "upstream_rq_retry") == 5 + 3 + 1
        pair.assert_settled()


def test_goaway_refusals_do_not_count_against_the_host() -> None:
    # A GOAWAY is the upstream draining a connection, not failing: the streams it refused are
    # sent again and are no outlier-detection failures (with consecutive failures of 2, the
    # nine refusals below would otherwise eject the only host).
    c = cluster(
        "be",
        [UP],
        http2_protocol_options={},
        outlier_detection={"consecutive_5xx": 2, "consecutive_gateway_failure": 2, "interval": "10s"},
    )
    with Pair(bootstrap_yaml(clusters=[c])) as pair:
        clients = gets(pair, 7)
        assert serve_two_then_goaway(pair, 7) == 7
        assert all(c.response().status == 200 for c in clients)
        assert pair.cluster_stat("be", "upstream_rq_retry") == 9
        assert pair.cluster_stat("be", "outlier_detection.ejections_enforced_total") == 0
