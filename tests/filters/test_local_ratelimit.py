"""The local rate limit filters in memory: the token bucket against a fake clock, the config
checks and notices, and the HTTP filter through the real connection manager on a virtual loop
(moorline.testing.pair), whose clock the test advances."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2 as http_pb2
from envoy.extensions.filters.network.local_ratelimit.v3 import local_rate_limit_pb2 as net_pb2

from moorline.config import loader
from moorline.config.context import BuildContext
from moorline.config.errors import ConfigError
from moorline.filters.http import local_ratelimit as http_rl
from moorline.filters.token_bucket import BucketSpec, TokenBucket
from moorline.net.conn_info import ConnInfo
from moorline.observability.stats import Store
from moorline.testing.pair import Pair, bootstrap_yaml

HTTP_TYPE = "type.googleapis.com/" + http_rl.TYPE
ALL = {"default_value": {"numerator": 100}, "runtime_key": "rl"}


# ------------------------------------------------------------------------------ token bucket


def test_bucket_starts_full_and_refills_per_whole_interval() -> None:
    b = TokenBucket(BucketSpec(max_tokens=3, tokens_per_fill=2, fill_interval=1.0), now=100.0)
    assert [b.consume(100.0) for _ in range(4)] == [True, True, True, False]
    assert b.reset_seconds(100.2) == 1
    assert not b.consume(100.99)  # no partial fills
    assert b.remaining(101.0) == 2
    assert b.remaining(105.5) == 3  # capped at max_tokens, however long it was idle
    # the fill schedule stays on its grid: 105.5 -> next fill at 106
    b.consume(105.5)
    b.consume(105.5)
    b.consume(105.5)
    assert b.remaining(105.9) == 0 and b.remaining(106.0) == 2


def _parse(d: dict[str, Any], cls: Any) -> Any:
    return loader.parse_message(d, cls, "typed_config")


def _limit(**d: Any) -> Any:
    notes: list[str] = []
    lim = http_rl.compile_limit(
        _parse({"stat_prefix": "rl", **d}, http_pb2.LocalRateLimit),
        "f",
        lambda p, why: notes.append(f"{p}: {why}; ignored"),
    )
    return lim, notes


def test_config_checks_and_defaults() -> None:
    lim, notes = _limit(token_bucket={"max_tokens": 2, "fill_interval": "1s"})
    assert (lim.enabled, lim.enforced, lim.status) == (0.0, 0.0, 429)  # Envoy: unset is 0 %
    assert lim.spec.tokens_per_fill == 1 and not notes
    lim, _ = _limit(status={"code": 302})
    assert lim.status == 429  # below 400: 429
    with pytest.raises(ConfigError, match="fill_interval"):
        _limit(token_bucket={"max_tokens": 2, "fill_interval": "0.01s"})
    with pytest.raises(ConfigError, match="max_tokens"):
        _limit(token_bucket={"max_tokens": 0, "fill_interval": "1s"})
    with pytest.raises(ConfigError, match="stat_prefix"):
        http_rl.compile_limit(_parse({}, http_pb2.LocalRateLimit), "f", lambda p, w: None)
    lim, notes = _limit(
        descriptors=[
            {
                "entries": [{"key": "k", "value": "v"}],
                "token_bucket": {"max_tokens": 1, "fill_interval": "1s"},
            },
            {
                "entries": [{"key": "k", "value": ""}],
                "token_bucket": {"max_tokens": 1, "fill_interval": "1s"},
            },
        ],
        stage=1,
    )
    assert list(lim.descriptors) == [(("k", "v"),)] and lim.stage == 1
    assert notes == [
        "f.descriptors[1].entries: an entry without a value (a dynamic descriptor) is not implemented; ignored"
    ]
    with pytest.raises(ConfigError, match=r"descriptors\[0\]\.token_bucket"):
        _limit(descriptors=[{"entries": [{"key": "k", "value": "v"}]}])
    with pytest.raises(ConfigError, match=r"descriptors\[1\]\.entries: duplicate"):
        one = {
            "entries": [{"key": "k", "value": "v"}],
            "token_bucket": {"max_tokens": 1, "fill_interval": "1s"},
        }
        _limit(descriptors=[one, one])
    with pytest.raises(ConfigError, match="not accepted per route"):
        http_rl._per_route(
            _parse(
                {
                    "stat_prefix": "r",
                    "rate_limits": [{"actions": [{"generic_key": {"descriptor_value": "x"}}]}],
                },
                http_pb2.LocalRateLimit,
            ),
            "route",
        )


# ------------------------------------------------------------------------------ through the HCM


def _rl(**d: Any) -> dict[str, Any]:
    return {"name": http_rl.NAME, "typed_config": {"@type": HTTP_TYPE, "stat_prefix": "rl", **d}}


def _direct(prefix: str = "/", **extra: Any) -> dict[str, Any]:
    return {
        "match": {"prefix": prefix},
        "direct_response": {"status": 200, "body": {"inline_string": "ok"}},
        **extra,
    }


def _bucket(n: int, interval: str = "10s") -> dict[str, Any]:
    return {"max_tokens": n, "tokens_per_fill": n, "fill_interval": interval}


def test_burst_over_max_tokens_is_429_with_headers_then_refills() -> None:
    f = _rl(
        token_bucket=_bucket(2),
        filter_enabled=ALL,
        filter_enforced=ALL,
        response_headers_to_add=[{"header": {"key": "x-limited", "value": "yes"}}],
        enable_x_ratelimit_headers="DRAFT_VERSION_03",
    )
    p = Pair(bootstrap_yaml(routes=[_direct()], http_filters=[f]))
    d = p.connect()
    for left in (1, 0):
        d.request("GET", "/x")
        r = d.response()
        assert r.status == 200
        assert (
            r.header("x-ratelimit-limit") == b"2" and r.header("x-ratelimit-remaining") == str(left).encode()
        )
        assert r.header("x-limited") is None
    d.request("GET", "/x")
    r = d.response()
    assert r.status == 429 and r.body == b"local_rate_limited"
    assert r.header("x-limited") == b"yes"
    assert r.header("x-ratelimit-remaining") == b"0" and r.header("x-ratelimit-reset") == b"10"
    assert p.access_log.entries[-1].response_code_details == "local_rate_limited"
    assert (p.stat("rl.http_local_rate_limit.enabled"), p.stat("rl.http_local_rate_limit.ok")) == (3, 2)
    assert (
        p.stat("rl.http_local_rate_limit.rate_limited") == 1
        and p.stat("rl.http_local_rate_limit.enforced") == 1
    )
    p.advance(10.0)
    d.request("GET", "/x")
    assert d.response().status == 200


def test_descriptors_select_their_own_bucket() -> None:
    f = _rl(
        token_bucket=_bucket(5),
        filter_enabled=ALL,
        filter_enforced=ALL,
        enable_x_ratelimit_headers="DRAFT_VERSION_03",
        descriptors=[
            {
                "entries": [{"key": "client", "value": "small"}],
                "token_bucket": _bucket(1),
            },
            {
                "entries": [{"key": "client", "value": "mid"}, {"key": "generic_key", "value": "g"}],
                "token_bucket": _bucket(2),
            },
        ],
    )
    vh = {
        "name": "vh",
        "domains": ["*"],
        "routes": [_direct()],
        "rate_limits": [
            {"actions": [{"request_headers": {"header_name": "x-client", "descriptor_key": "client"}}]},
            {
                "actions": [
                    {"request_headers": {"header_name": "x-client", "descriptor_key": "client"}},
                    {"generic_key": {"descriptor_value": "g"}},
                ]
            },
            # another stage: never consulted by this stage-0 filter
            {
                "stage": 1,
                "actions": [{"generic_key": {"descriptor_key": "client", "descriptor_value": "small"}}],
            },
        ],
    }
    p = Pair(bootstrap_yaml(virtual_hosts=[vh], http_filters=[f]))
    d = p.connect()

    def get(client: str | None) -> tuple[int, bytes | None]:
        d.request("GET", "/x", headers=[("x-client", client)] if client else [])
        r = d.response()
        return r.status, r.header("x-ratelimit-limit")

    assert [get("small") for _ in range(2)] == [(200, b"1"), (429, b"1")]
    # the first descriptor (client=mid) matches nothing; the second (client, generic_key) does
    assert [get("mid") for _ in range(3)] == [(200, b"2"), (200, b"2"), (429, b"2")]
    # no configured match, no header at all: the default bucket, untouched by the others
    assert [get("other") for _ in range(2)] + [get(None)] == [(200, b"5")] * 3
    assert p.stat("rl.http_local_rate_limit.rate_limited") == 2


def test_not_enforced_only_counts_and_adds_request_headers() -> None:
    f = _rl(
        token_bucket=_bucket(1),
        filter_enabled=ALL,
        request_headers_to_add_when_not_enforced=[{"header": {"key": "x-would-limit", "value": "1"}}],
    )
    p = Pair(bootstrap_yaml(routes=[_direct()], http_filters=[f]))
    d = p.connect()
    for _ in range(3):
        d.request("GET", "/x")
        assert d.response().status == 200
    assert p.stat("rl.http_local_rate_limit.rate_limited") == 2
    assert p.stat("rl.http_local_rate_limit.enforced") == 0


def test_unset_filter_enabled_does_nothing() -> None:
    p = Pair(
        bootstrap_yaml(routes=[_direct()], http_filters=[_rl(token_bucket=_bucket(1), filter_enforced=ALL)])
    )
    d = p.connect()
    for _ in range(3):
        d.request("GET", "/x")
        assert d.response().status == 200
    assert p.stat("rl.http_local_rate_limit.enabled") == 0


def test_per_route_config_replaces_the_filters() -> None:
    route_cfg = {
        "@type": HTTP_TYPE,
        "stat_prefix": "tight",
        "token_bucket": _bucket(1),
        "filter_enabled": ALL,
        "filter_enforced": ALL,
    }
    routes = [_direct("/tight", typed_per_filter_config={http_rl.NAME: route_cfg}), _direct()]
    p = Pair(bootstrap_yaml(routes=routes, http_filters=[_rl()]))  # no bucket of its own
    d = p.connect()
    statuses = []
    for path in ("/tight", "/tight", "/other", "/other"):
        d.request("GET", path)
        statuses.append(d.response().status)
    assert statuses == [200, 429, 200, 200]
    assert p.stat("tight.http_local_rate_limit.rate_limited") == 1
    assert p.stat("rl.http_local_rate_limit.enabled") == 0


def test_per_downstream_connection_buckets() -> None:
    f = _rl(
        token_bucket=_bucket(1),
        filter_enabled=ALL,
        filter_enforced=ALL,
        local_rate_limit_per_downstream_connection=True,
    )
    p = Pair(bootstrap_yaml(routes=[_direct()], http_filters=[f]))
    a, b = p.connect(), p.connect()
    a.request("GET", "/x")
    assert a.response().status == 200
    a.request("GET", "/x")
    assert a.response().status == 429
    b.request("GET", "/x")
    assert b.response().status == 200  # its own bucket


def test_per_connection_buckets_are_bounded() -> None:
    """A connection living through many route table updates meets a new compiled limit each
    time: its bucket map stays bounded (the oldest go)."""
    info = ConnInfo(("10.0.0.1", 80), ("10.0.0.2", 5000), "l")
    spec = BucketSpec(1, 1, 1.0)
    limits = [http_rl._Limit() for _ in range(100)]
    first = http_rl.conn_bucket(info, limits[0], spec, 0.0)
    assert http_rl.conn_bucket(info, limits[0], spec, 0.0) is first  # the same bucket again
    for lim in limits:
        http_rl.conn_bucket(info, lim, spec, 0.0)
    assert info.filter_state is not None and len(info.filter_state) == http_rl.MAX_CONN_BUCKETS
    assert limits[-1] in info.filter_state and limits[0] not in info.filter_state


def test_network_filter_config_checks() -> None:
    from moorline.filters.network import local_ratelimit as net_rl

    ctx = BuildContext(Store())
    with pytest.raises(ConfigError, match="stat_prefix"):
        net_rl._factory(_parse({"token_bucket": _bucket(1)}, net_pb2.LocalRateLimit), ctx, "f")
    with pytest.raises(ConfigError, match="token_bucket"):
        net_rl._factory(_parse({"stat_prefix": "n"}, net_pb2.LocalRateLimit), ctx, "f")
    now = [0.0]
    flt = net_rl._factory(
        _parse({"stat_prefix": "n", "token_bucket": _bucket(2, "1s")}, net_pb2.LocalRateLimit), ctx, "f"
    )
    flt.clock = lambda: now[0]
    assert [flt.on_new_connection(None) for _ in range(3)] == [True, True, False]
    assert ctx.stats.get("n.local_rate_limit.rate_limited").value == 1  # type: ignore[union-attr]
    now[0] = 1.0
    assert flt.on_new_connection(None)
