"""The Redis backend of the test rate limit service (moorline/testing/rls_server.py): its config
(envoyproxy/ratelimit's descriptor trees), the tree walk, and the fixed-window counting in a real
redis-server (moorline/testing/procs.py ``start_redis``), driven directly and over gRPC."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from moorline.config.errors import ConfigError
from moorline.testing.procs import RedisProc, redis_ping, start_redis
from moorline.testing.rls_server import (
    UNLIMITED_REMAINING,
    BackendUnavailable,
    BadRequest,
    RedisLimiter,
    RlsServer,
    cache_key,
    compile_config,
    find_rule,
)

OK = rls_pb2.RateLimitResponse.OK
OVER = rls_pb2.RateLimitResponse.OVER_LIMIT
HOUR_START = 1_800_000_000 - 1_800_000_000 % 3600  # a window start, pinned (no wall clock)

CONFIG = """
domain: edge
descriptors:
  - key: client
    rate_limit: {unit: hour, requests_per_unit: 2, name: per-client}
  - key: client
    value: vip
    rate_limit: {unlimited: true}
  - key: client
    value: beta-*
    rate_limit: {unit: MINUTE, requests_per_unit: 1}
  - key: client
    value: shadow
    shadow_mode: true
    rate_limit: {unit: hour, requests_per_unit: 1}
  - key: remote_address
    descriptors:
      - key: path
        value: /login
        rate_limit: {unit: second, requests_per_unit: 3}
---
domain: other
descriptors:
  - key: client
    rate_limit: {unit: day, requests_per_unit: 1}
"""


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _req(*descs: list[tuple[str, str]], domain: str = "edge", hits: int = 0) -> Any:
    r = rls_pb2.RateLimitRequest(domain=domain, hits_addend=hits)
    for entries in descs:
        d = r.descriptors.add()
        for k, v in entries:
            d.entries.add(key=k, value=v)
    return r


@pytest.fixture
def rds(tmp_path: Path) -> Iterator[RedisProc]:
    p = start_redis(tmp_path)
    yield p
    p.stop(signal.SIGTERM, 5)


@pytest.fixture
def clock() -> Clock:
    return Clock(HOUR_START + 10)


@pytest.fixture
def limiter(rds: RedisProc, clock: Clock) -> Iterator[RedisLimiter]:
    lim = RedisLimiter(CONFIG, rds.port, clock=clock)
    yield lim
    lim.close()


# -- config and the tree walk (no Redis)


@pytest.mark.parametrize(
    ("doc", "path"),
    [
        (
            {
                "domain": "d",
                "descriptors": [{"key": "k", "rate_limit": {"unit": "week", "requests_per_unit": 1}}],
            },
            "d.descriptors[0].rate_limit.unit",
        ),
        (
            {
                "domain": "d",
                "descriptors": [{"key": "k", "rate_limit": {"unit": "hour", "requests_per_unit": -1}}],
            },
            "d.descriptors[0].rate_limit.requests_per_unit",
        ),
        (
            {"domain": "d", "descriptors": [{"key": "k", "rate_limit": {"unlimited": True, "unit": "hour"}}]},
            "d.descriptors[0].rate_limit.unit",
        ),
        ({"domain": "d", "descriptors": [{"key": "k"}, {"key": "k"}]}, "d.descriptors[1].key"),
        (
            {"domain": "d", "descriptors": [{"key": "k", "value": "v"}, {"key": "k", "value": "v"}]},
            "d.descriptors[1].value",
        ),
        ({"domain": "d", "descriptors": [{"value": "v"}]}, "d.descriptors[0].key"),
        (
            {"domain": "d", "descriptors": [{"key": "k", "descriptors": [{"key": "j", "ratelimit": {}}]}]},
            "d.descriptors[0].descriptors[0].ratelimit",
        ),
        (
            {"domain": "d", "descriptors": [{"key": "k", "rate_limit": {"unit": "hour", "replaces": []}}]},
            "d.descriptors[0].rate_limit.replaces",
        ),
        ({"descriptors": []}, "[0].domain"),
    ],
)
def test_bad_config_names_the_field(doc: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError) as ei:
        compile_config(doc)
    assert ei.value.path == path


def test_duplicate_domain_is_refused() -> None:
    with pytest.raises(ConfigError, match="duplicate domain"):
        compile_config([{"domain": "d"}, {"domain": "d"}])


def test_tree_walk_prefers_value_then_prefix_then_key() -> None:
    domains = compile_config(CONFIG)
    any_client = find_rule(domains, "edge", [("client", "x")])
    assert any_client is not None and any_client.requests_per_unit == 2 and any_client.name == "per-client"
    vip = find_rule(domains, "edge", [("client", "vip")])
    assert vip is not None and vip.unlimited
    beta = find_rule(domains, "edge", [("client", "beta-7")])
    assert beta is not None and beta.unit_seconds == 60
    login = find_rule(domains, "edge", [("remote_address", "10.0.0.1"), ("path", "/login")])
    assert login is not None and login.unit_seconds == 1 and login.requests_per_unit == 3
    # a node without rate_limit, an entry the tree does not know, a descriptor longer than the
    # tree, another domain's tree, an unknown domain: no limit
    assert find_rule(domains, "edge", [("remote_address", "10.0.0.1")]) is None
    assert find_rule(domains, "edge", [("remote_address", "10.0.0.1"), ("path", "/other")]) is None
    assert find_rule(domains, "edge", [("client", "x"), ("path", "/login")]) is None
    assert find_rule(domains, "edge", [("user", "x")]) is None
    other = find_rule(domains, "other", [("client", "x")])
    assert other is not None and other.unit_seconds == 86400
    assert find_rule(domains, "nope", [("client", "x")]) is None


def test_cache_key_is_domain_entries_and_window_start() -> None:
    assert cache_key("edge", [("a", "1"), ("b", "2")], 3600) == "edge_a_1_b_2_3600"


# -- counting in Redis


def test_over_limit_after_n_in_the_window(limiter: RedisLimiter, rds: RedisProc) -> None:
    codes = []
    for _ in range(3):
        r = limiter.decide(_req([("client", "a")]))
        codes.append((r.overall_code, r.statuses[0].limit_remaining))
    assert codes == [(OK, 1), (OK, 0), (OVER, 0)]
    st = limiter.decide(_req([("client", "a")])).statuses[0]
    assert st.current_limit.requests_per_unit == 2
    assert st.current_limit.unit == rls_pb2.RateLimitResponse.RateLimit.HOUR
    assert st.current_limit.name == "per-client"
    assert st.duration_until_reset.seconds == 3590
    # the counter, under envoyproxy/ratelimit's key, expires with its window
    c = redis.Redis(port=rds.port)
    key = f"edge_client_a_{HOUR_START}"
    assert int(c.get(key) or 0) == 4
    assert 0 < int(c.ttl(key)) <= 3600
    # another value counts apart
    assert limiter.decide(_req([("client", "b")])).overall_code == OK
    c.close()


def test_next_window_starts_a_new_counter(limiter: RedisLimiter, clock: Clock) -> None:
    for _ in range(2):
        limiter.decide(_req([("client", "w")]))
    assert limiter.decide(_req([("client", "w")])).overall_code == OVER
    clock.now = HOUR_START + 3600
    r = limiter.decide(_req([("client", "w")]))
    assert r.overall_code == OK and r.statuses[0].limit_remaining == 1
    assert r.statuses[0].duration_until_reset.seconds == 3600


def test_second_window_follows_the_clock(limiter: RedisLimiter, clock: Clock) -> None:
    d = [("remote_address", "1.2.3.4"), ("path", "/login")]
    assert [limiter.decide(_req(d)).overall_code for _ in range(4)] == [OK, OK, OK, OVER]
    clock.now += 1
    assert limiter.decide(_req(d)).overall_code == OK


def test_hits_addend_request_and_descriptor(limiter: RedisLimiter) -> None:
    r = limiter.decide(_req([("client", "h")], hits=2))
    assert r.overall_code == OK and r.statuses[0].limit_remaining == 0
    req = _req([("client", "h2")], hits=5)
    req.descriptors[0].hits_addend.value = 1  # the descriptor's own addend wins
    assert limiter.decide(req).statuses[0].limit_remaining == 1
    assert limiter.decide(_req([("client", "h3")], hits=3)).overall_code == OVER


def test_overall_is_over_when_any_descriptor_is(limiter: RedisLimiter) -> None:
    limiter.decide(_req([("client", "beta-1")]))
    r = limiter.decide(_req([("client", "z")], [("client", "beta-1")], [("user", "nobody")]))
    assert r.overall_code == OVER
    assert [s.code for s in r.statuses] == [OK, OVER, OK]
    assert not r.statuses[2].HasField("current_limit")


def test_unlimited_and_unknown_touch_no_counter(limiter: RedisLimiter, rds: RedisProc) -> None:
    for _ in range(5):
        r = limiter.decide(_req([("client", "vip")], [("user", "x")]))
        assert r.overall_code == OK
        assert r.statuses[0].limit_remaining == UNLIMITED_REMAINING
    c = redis.Redis(port=rds.port)
    assert c.dbsize() == 0
    c.close()


def test_shadow_mode_counts_but_allows(limiter: RedisLimiter, rds: RedisProc) -> None:
    rs = [limiter.decide(_req([("client", "shadow")])) for _ in range(3)]
    assert [r.overall_code for r in rs] == [OK, OK, OK]
    assert rs[-1].statuses[0].limit_remaining == 0
    c = redis.Redis(port=rds.port)
    assert int(c.get(f"edge_client_shadow_{HOUR_START}") or 0) == 3
    c.close()


def test_two_limiters_on_one_redis_share_the_counter(
    limiter: RedisLimiter, rds: RedisProc, clock: Clock
) -> None:
    other = RedisLimiter(CONFIG, rds.port, clock=clock)
    try:
        assert limiter.decide(_req([("client", "s")])).overall_code == OK
        assert other.decide(_req([("client", "s")])).overall_code == OK
        assert limiter.decide(_req([("client", "s")])).overall_code == OVER
    finally:
        other.close()


def test_redis_gone_then_back(tmp_path: Path, clock: Clock) -> None:
    p = start_redis(tmp_path)
    lim = RedisLimiter(CONFIG, p.port, clock=clock, timeout=0.5)
    try:
        assert lim.decide(_req([("client", "r")])).overall_code == OK
        p.stop(signal.SIGKILL, 5)
        with pytest.raises(BackendUnavailable):
            lim.decide(_req([("client", "r")]))
        # a descriptor that needs no counter is still answered without Redis
        assert lim.decide(_req([("user", "x")])).overall_code == OK
        p = start_redis(tmp_path, port=p.port)
        # the pooled connection the old server closed is replaced; the counters started empty
        assert [lim.decide(_req([("client", "r")])).overall_code for _ in range(3)] == [OK, OK, OVER]
    finally:
        lim.close()
        p.stop(signal.SIGTERM, 5)
    assert not redis_ping("127.0.0.1", p.port)


# -- over gRPC


def _call(port: int, req: Any) -> Any:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return rls_pb2_grpc.RateLimitServiceStub(ch).ShouldRateLimit(req, timeout=5)


def test_grpc_unavailable_while_redis_is_down(tmp_path: Path, clock: Clock) -> None:
    p = start_redis(tmp_path)
    with RlsServer(backend=RedisLimiter(CONFIG, p.port, clock=clock, timeout=0.5)) as srv:
        srv.request_headers = [("x-checked", "1")]
        ok = _call(srv.port, _req([("client", "g")]))
        assert ok.overall_code == OK and [(h.key, h.value) for h in ok.request_headers_to_add] == [
            ("x-checked", "1")
        ]
        p.stop(signal.SIGKILL, 5)
        with pytest.raises(grpc.RpcError) as ei:
            _call(srv.port, _req([("client", "g")]))
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError) as ei:
            _call(srv.port, _req())
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert srv.requests[:2] == [("edge", [[("client", "g")]]), ("edge", [[("client", "g")]])]


def test_limit_override_replaces_the_rule(limiter: RedisLimiter) -> None:
    req = _req([("user", "o")])  # no configured rule: the override alone limits it
    req.descriptors[0].limit.requests_per_unit = 1
    req.descriptors[0].limit.unit = rls_pb2.RateLimitResponse.RateLimit.MINUTE
    r = limiter.decide(req)
    assert r.overall_code == OK and r.statuses[0].current_limit.requests_per_unit == 1
    assert r.statuses[0].duration_until_reset.seconds == 50
    assert limiter.decide(req).overall_code == OVER
    req.descriptors[0].limit.unit = rls_pb2.RateLimitResponse.RateLimit.YEAR
    with pytest.raises(BadRequest):
        limiter.decide(req)


def test_hung_redis_times_out_and_the_pool_does_not_desync(tmp_path: Path, clock: Clock) -> None:
    """A Redis that stops answering (SIGSTOP) fails the call within the socket timeout; the
    connection that timed out is dropped, so a late reply is never read as the next call's."""
    p = start_redis(tmp_path)
    lim = RedisLimiter(CONFIG, p.port, clock=clock, timeout=0.3)
    c = redis.Redis(port=p.port)
    try:
        assert lim.decide(_req([("client", "t")])).statuses[0].limit_remaining == 1
        p.send_signal(signal.SIGSTOP)
        with pytest.raises(BackendUnavailable):
            lim.decide(_req([("client", "t")]))
        p.send_signal(signal.SIGCONT)
        r = lim.decide(_req([("client", "u")], [("client", "t")]))
        # every status matches the counter Redis holds (the timed-out INCRBY may or may not have
        # been applied: the server read it before the client gave up)
        for st, key in zip(r.statuses, ("u", "t"), strict=True):
            held = int(c.get(f"edge_client_{key}_{HOUR_START}") or 0)
            assert st.limit_remaining == max(2 - held, 0)
        assert r.statuses[0].limit_remaining == 1
    finally:
        p.send_signal(signal.SIGCONT)
        c.close()
        lim.close()
        p.stop(signal.SIGTERM, 5)
