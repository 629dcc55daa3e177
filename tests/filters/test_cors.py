"""``envoy.filters.http.cors`` driven in memory (``moorline.testing.pair``): the real server,
connection manager, filter manager and router, with the test as client and upstream."""

from __future__ import annotations

from typing import Any

import pytest

from moorline.config.errors import ConfigError
from moorline.filters.http import cors
from moorline.testing.pair import Pair, bootstrap_yaml

CORS_FILTER = {
    "name": "envoy.filters.http.cors",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"},
}
POLICY_TYPE = "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy"
FULL = {
    "allow_origin_string_match": [{"exact": "https://app.example"}, {"suffix": ".trusted.example"}],
    "allow_methods": "GET, PUT",
    "allow_headers": "x-a, x-b",
    "expose_headers": "x-up",
    "max_age": "600",
    "allow_credentials": True,
    "allow_private_network_access": True,
}


def _typed(policy: dict[str, Any]) -> dict[str, Any]:
    return {"envoy.filters.http.cors": {"@type": POLICY_TYPE, **policy}}


def _pair(
    route_policy: dict[str, Any] | None = None,
    vh_policy: dict[str, Any] | None = None,
    legacy_route: dict[str, Any] | None = None,
    legacy_vh: dict[str, Any] | None = None,
    extra_routes: list[dict[str, Any]] | None = None,
    filters: list[dict[str, Any]] | None = None,
) -> Pair:
    route: dict[str, Any] = {"match": {"prefix": "/"}, "route": {"cluster": "be"}}
    if route_policy is not None:
        route["typed_per_filter_config"] = _typed(route_policy)
    if legacy_route is not None:
        route["route"]["cors"] = legacy_route
    vh: dict[str, Any] = {"name": "vh", "domains": ["*"], "routes": [*(extra_routes or []), route]}
    if vh_policy is not None:
        vh["typed_per_filter_config"] = _typed(vh_policy)
    if legacy_vh is not None:
        vh["cors"] = legacy_vh
    return Pair(
        bootstrap_yaml(virtual_hosts=[vh], http_filters=filters if filters is not None else [CORS_FILTER])
    )


def _preflight(origin: str = "https://app.example", **extra: str) -> list[tuple[str, str]]:
    return [("origin", origin), ("access-control-request-method", "PUT"), *extra.items()]


def _forward(pair: Pair, client: Any, method: str = "GET", headers: Any = (), status: int = 200) -> Any:
    client.request(method, "/x", headers=headers)
    up = pair.upstream.accept() if not pair.upstream.connections else pair.upstream.connections[-1]
    req = up.request()
    up.respond(status, headers=[("x-up", "1")], body=b"ok")
    return req, client.response()


def test_preflight_is_answered_here_with_the_allow_headers() -> None:
    with _pair(route_policy=FULL) as pair:
        client = pair.connect()
        client.request(
            "OPTIONS", "/x", headers=_preflight(**{"access-control-request-private-network": "true"})
        )
        r = client.response()
        assert r.status == 200 and r.body == b""
        assert r.header("access-control-allow-origin") == b"https://app.example"
        assert r.header("access-control-allow-credentials") == b"true"
        assert r.header("access-control-allow-methods") == b"GET, PUT"
        assert r.header("access-control-allow-headers") == b"x-a, x-b"
        assert r.header("access-control-max-age") == b"600"
        assert r.header("access-control-allow-private-network") == b"true"
        assert r.header("access-control-expose-headers") is None
        assert pair.upstream.attempts == []  # nothing went upstream
        assert pair.stats.counter("http.ingress.cors.origin_valid").value == 1
        # without the private-network request header, no private-network answer
        client.request("OPTIONS", "/x", headers=_preflight("https://a.trusted.example"))
        r = client.response()
        assert r.header("access-control-allow-origin") == b"https://a.trusted.example"
        assert r.header("access-control-allow-private-network") is None


def test_simple_request_gets_origin_credentials_and_expose_headers() -> None:
    with _pair(route_policy=FULL) as pair:
        client = pair.connect()
        req, r = _forward(pair, client, headers=[("origin", "https://app.example")])
        assert req.header("origin") == b"https://app.example"  # the request goes on untouched
        assert r.status == 200 and r.body == b"ok"
        assert r.header("access-control-allow-origin") == b"https://app.example"
        assert r.header("access-control-allow-credentials") == b"true"
        assert r.header("access-control-expose-headers") == b"x-up"
        assert r.header("access-control-allow-methods") is None  # preflight-only headers
        # An OPTIONS without Access-Control-Request-Method is not a preflight: forwarded.
        _, r = _forward(pair, client, "OPTIONS", headers=[("origin", "https://app.example")])
        assert r.body == b"ok" and r.header("access-control-allow-origin") == b"https://app.example"
        # no Origin: not a CORS request at all
        _, r = _forward(pair, client)
        assert r.header("access-control-allow-origin") is None
        assert pair.stats.counter("http.ingress.cors.origin_valid").value == 2
        assert pair.stats.counter("http.ingress.cors.origin_invalid").value == 0


def test_disallowed_origin_gets_no_headers_and_its_preflight_goes_upstream() -> None:
    with _pair(route_policy=FULL) as pair:
        client = pair.connect()
        _, r = _forward(pair, client, headers=[("origin", "https://evil.example")])
        assert r.header("access-control-allow-origin") is None
        req, r = _forward(pair, client, "OPTIONS", headers=_preflight("https://evil.example"))
        assert req.method == b"OPTIONS" and r.body == b"ok"  # forward_not_matching_preflights: default true
        assert r.header("access-control-allow-origin") is None
        assert pair.stats.counter("http.ingress.cors.origin_invalid").value == 2


def test_not_forwarding_non_matching_preflights() -> None:
    with _pair(route_policy={**FULL, "forward_not_matching_preflights": False}) as pair:
        client = pair.connect()
        client.request("OPTIONS", "/x", headers=_preflight("https://evil.example"))
        r = client.response()
        assert r.status == 200 and r.header("access-control-allow-origin") is None
        assert pair.upstream.attempts == []


def test_star_matcher_allows_every_origin_and_no_credentials_by_default() -> None:
    with _pair(route_policy={"allow_origin_string_match": [{"exact": "*"}]}) as pair:
        client = pair.connect()
        _, r = _forward(pair, client, headers=[("origin", "https://anything.example")])
        assert r.header("access-control-allow-origin") == b"https://anything.example"
        assert r.header("access-control-allow-credentials") is None
        client.request("OPTIONS", "/x", headers=_preflight("https://x.example"))
        r = client.response()
        assert r.header("access-control-allow-origin") == b"https://x.example"
        assert r.header("access-control-allow-methods") is None and r.header("access-control-max-age") is None


def test_shadow_mode_counts_and_enforces_nothing() -> None:
    policy = {
        **FULL,
        "filter_enabled": {"default_value": {"numerator": 0}},
        "shadow_enabled": {"default_value": {"numerator": 100}},
    }
    with _pair(route_policy=policy) as pair:
        client = pair.connect()
        req, r = _forward(pair, client, "OPTIONS", headers=_preflight())
        assert req.method == b"OPTIONS" and r.header("access-control-allow-origin") is None
        _, r = _forward(pair, client, headers=[("origin", "https://evil.example")])
        assert pair.stats.counter("http.ingress.cors.origin_valid").value == 1
        assert pair.stats.counter("http.ingress.cors.origin_invalid").value == 1


def test_filter_disabled_without_shadow_does_nothing() -> None:
    policy = {**FULL, "filter_enabled": {"default_value": {"numerator": 0, "denominator": "TEN_THOUSAND"}}}
    with _pair(route_policy=policy) as pair:
        client = pair.connect()
        req, r = _forward(pair, client, "OPTIONS", headers=_preflight())
        assert req.method == b"OPTIONS" and r.header("access-control-allow-origin") is None
        assert pair.stats.counter("http.ingress.cors.origin_valid").value == 0


def test_route_fields_fall_back_to_the_virtual_host() -> None:
    """Per-filter policies on the virtual host and the route fold field by field: the route's
    origins and methods, the virtual host's headers and max age."""
    vh = {
        "allow_origin_string_match": [{"exact": "https://vh.example"}],
        "allow_headers": "x-vh",
        "max_age": "5",
    }
    route = {"allow_origin_string_match": [{"exact": "https://route.example"}], "allow_methods": "POST"}
    with _pair(route_policy=route, vh_policy=vh) as pair:
        client = pair.connect()
        client.request("OPTIONS", "/x", headers=_preflight("https://route.example"))
        r = client.response()
        assert r.header("access-control-allow-origin") == b"https://route.example"
        assert (r.header("access-control-allow-methods"), r.header("access-control-allow-headers")) == (
            b"POST",
            b"x-vh",
        )
        assert r.header("access-control-max-age") == b"5"
        _, r = _forward(pair, client, headers=[("origin", "https://vh.example")])
        assert r.header("access-control-allow-origin") is None  # the route's origins replace the host's


def test_legacy_cors_fields_on_route_and_virtual_host() -> None:
    """The deprecated ``cors`` of the route action and the virtual host serve the filter when no
    typed per-filter policy is set (route over virtual host), and no longer make a notice."""
    legacy_vh = {"allow_origin_string_match": [{"prefix": "https://legacy"}], "allow_methods": "GET"}
    legacy_route = {"allow_methods": "DELETE", "expose_headers": "x-up"}
    with _pair(legacy_route=legacy_route, legacy_vh=legacy_vh) as pair:
        assert not [n for n in pair.server.ctx.notices if "cors" in n]
        client = pair.connect()
        client.request("OPTIONS", "/x", headers=_preflight("https://legacy.example"))
        r = client.response()
        assert r.header("access-control-allow-origin") == b"https://legacy.example"
        assert r.header("access-control-allow-methods") == b"DELETE"
        _, r = _forward(pair, client, headers=[("origin", "https://legacy.example")])
        assert r.header("access-control-expose-headers") == b"x-up"
    # A typed policy wins over the legacy field.
    with _pair(
        route_policy={"allow_origin_string_match": [{"exact": "https://typed.example"}]}, legacy_vh=legacy_vh
    ) as pair:
        client = pair.connect()
        _, r = _forward(pair, client, headers=[("origin", "https://legacy.example")])
        assert r.header("access-control-allow-origin") is None


def test_redirect_and_direct_response_routes_bypass_cors() -> None:
    extra = [
        {
            "match": {"path": "/direct"},
            "direct_response": {"status": 204},
            "typed_per_filter_config": _typed(FULL),
        },
        {
            "match": {"path": "/moved"},
            "redirect": {"path_redirect": "/x"},
            "typed_per_filter_config": _typed(FULL),
        },
    ]
    with _pair(route_policy=FULL, extra_routes=extra) as pair:
        client = pair.connect()
        for path, status in (("/direct", 204), ("/moved", 301)):
            client.request("OPTIONS", path, headers=_preflight())
            r = client.response()
            assert r.status == status and r.header("access-control-allow-origin") is None
        assert pair.stats.counter("http.ingress.cors.origin_valid").value == 0


def test_no_policy_means_no_filter_manager() -> None:
    """Istio puts the CORS filter in every listener; a route without a policy must cost
    nothing: with no policy in the route table the filter is not in the chain at all, and with
    one, a stream on another route takes the router's fast path (no filter manager is made)."""
    with _pair() as pair:
        assert pair.hcm.filter_factories == [] and pair.hcm.route_gates is None
        client = pair.connect()
        _, r = _forward(pair, client, headers=[("origin", "https://app.example")])
        assert r.header("access-control-allow-origin") is None
    plain = {"match": {"prefix": "/plain"}, "route": {"cluster": "be"}}
    with _pair(route_policy=FULL, extra_routes=[plain]) as pair:
        assert pair.hcm.route_gates == frozenset({"envoy.filters.http.cors"})
        client = pair.connect()
        client.request("GET", "/plain", headers=[("origin", "https://app.example")])
        stream = next(iter(pair.hcm.runtime)).stream
        assert stream is not None and stream.fm is None
        up = pair.upstream.accept()
        up.request()
        up.respond(200, body=b"ok")
        assert client.response().header("access-control-allow-origin") is None
        client.request("GET", "/x", headers=[("origin", "https://app.example")])
        stream = next(iter(pair.hcm.runtime)).stream
        assert stream is not None and stream.fm is not None
        up.request()
        up.respond(200, body=b"ok")
        assert client.response().header("access-control-allow-origin") == b"https://app.example"
    # Another filter that is not route-gated: the filter manager runs as before.
    buffer = {
        "name": "envoy.filters.http.buffer",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
            "max_request_bytes": 10,
        },
    }
    with _pair(route_policy=FULL, filters=[CORS_FILTER, buffer]) as pair:
        assert len(pair.hcm.filter_factories) == 2 and pair.hcm.route_gates is None


def test_bad_policies_are_config_errors() -> None:
    with pytest.raises(ConfigError) as e:
        _pair(route_policy={"allow_origin_string_match": [{"safe_regex": {"regex": "("}}]})
    assert "allow_origin_string_match[0]" in e.value.path
    with pytest.raises(ConfigError) as e:
        _pair(route_policy={"allow_headers": "x-a\r\nx-evil: 1"})
    assert e.value.path.endswith("allow_headers")


def test_merge_prefers_the_more_specific_level() -> None:
    less = cors.CorsPolicy(allow_methods=b"GET", allow_credentials=True, enabled=0.5, max_age=b"1")
    more = cors.CorsPolicy(allow_methods=b"PUT", allow_credentials=None, shadow=1.0)
    m = cors._merge(less, more)
    assert (m.allow_methods, m.allow_credentials, m.max_age) == (b"PUT", True, b"1")
    assert (m.enabled, m.shadow) == (None, 1.0)  # enablement: the most specific policy's only
