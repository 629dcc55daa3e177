"""Route table: compiling Envoy v3 RouteConfigurations and matching requests."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import yaml
from envoy.config.route.v3 import route_pb2
from google.protobuf.json_format import ParseDict
from hypothesis import given
from hypothesis import strategies as st

from moorline.config.errors import ConfigError
from moorline.protocol.headers import HeaderMap
from moorline.proxy.route_table import (
    ADD_IF_ABSENT,
    APPEND_IF_EXISTS_OR_ADD,
    DIRECT_RESPONSE,
    OVERWRITE_IF_EXISTS,
    OVERWRITE_IF_EXISTS_OR_ADD,
    REDIRECT,
    RETRY_5XX,
    RETRY_CANCELLED,
    RETRY_CONNECT_FAILURE,
    RETRY_GATEWAY_ERROR,
    RETRY_REFUSED_STREAM,
    RETRY_RETRIABLE_STATUS_CODES,
    RETRY_UNAVAILABLE,
    ROUTE,
    HeaderMatcher,
    RetryPolicy,
    RouteTable,
    StringMatcher,
    parse_query,
    strip_port,
)


def rc_proto(cfg: str | dict) -> route_pb2.RouteConfiguration:
    d = yaml.safe_load(cfg) if isinstance(cfg, str) else cfg
    return ParseDict(d, route_pb2.RouteConfiguration())


def compile_rc(cfg: str | dict) -> RouteTable:
    return RouteTable.compile(rc_proto(cfg))


def one_vhost(routes: str, extra: str = "") -> RouteTable:
    """A table with one '*' virtual host holding ``routes`` (YAML list, indented by 4)."""
    return compile_rc(
        f"""
name: t
{extra}
virtual_hosts:
- name: vh
  domains: ["*"]
  routes:
{routes}
"""
    )


def m(t: RouteTable, path: bytes, authority: bytes = b"x", method: bytes = b"GET", headers=()) -> str | None:
    r = t.match(authority, path, method, HeaderMap(list(headers)))
    return None if r is None else r.name


def config_error(cfg: str | dict) -> ConfigError:
    with pytest.raises(ConfigError) as ei:
        compile_rc(cfg)
    return ei.value


# --------------------------------------------------------------------------- virtual hosts

DOMAINS = """
name: domains
virtual_hosts:
- name: exact
  domains: ["www.example.com", "a.com:8080"]
  routes: [{match: {prefix: "/"}, name: exact, route: {cluster: c_exact}}]
- name: short_suffix
  domains: ["*.com"]
  routes: [{match: {prefix: "/"}, name: short_suffix, route: {cluster: c1}}]
- name: long_suffix
  domains: ["*.example.com"]
  routes: [{match: {prefix: "/"}, name: long_suffix, route: {cluster: c2}}]
- name: prefix
  domains: ["api.*", "api.internal.*"]
  routes: [{match: {prefix: "/"}, name: prefix, route: {cluster: c3}}]
- name: long_prefix
  domains: ["api.internal.x*"]
  routes: [{match: {prefix: "/"}, name: long_prefix, route: {cluster: c4}}]
- name: bare
  domains: ["a.com"]
  routes: [{match: {prefix: "/"}, name: bare, route: {cluster: c5}}]
- name: default
  domains: ["*"]
  routes: [{match: {prefix: "/"}, name: default, route: {cluster: c6}}]
"""


@pytest.mark.parametrize(
    ("authority", "vhost"),
    [
        (b"www.example.com", "exact"),
        (b"WWW.Example.COM", "exact"),  # case-insensitive
        (b"foo.example.com", "long_suffix"),  # longest suffix wins
        (b"foo.bar.com", "short_suffix"),
        (b"example.com", "short_suffix"),  # "*.example.com" needs at least one char before
        (b"api.internal.xyz", "long_prefix"),  # suffix wildcards before prefix, longest prefix first
        (b"api.internal.net", "prefix"),
        (b"api.net", "prefix"),
        (b"api.com", "short_suffix"),  # suffix wildcards are tried before prefix wildcards
        (b"other.org", "default"),
        (b"a.com", "bare"),
        (b"a.com:8080", "exact"),  # the port is part of the exact domain
        (b"a.com:80", "bare"),  # no domain with the port: retried without it
        (b"www.example.com:443", "exact"),
        (b"other.org:80", "default"),
        (b"", "default"),
    ],
)
def test_virtual_host_selection(authority: bytes, vhost: str) -> None:
    t = compile_rc(DOMAINS)
    r = t.match(authority, b"/", b"GET", HeaderMap())
    assert r is not None and r.vhost.name == vhost
    # Second lookup goes through the cache and must agree.
    assert t.match(authority, b"/", b"GET", HeaderMap()).vhost.name == vhost


def test_no_default_vhost_no_match() -> None:
    t = compile_rc(
        """
virtual_hosts:
- name: a
  domains: ["a.com"]
  routes: [{match: {prefix: "/"}, route: {cluster: c}}]
"""
    )
    assert t.match(b"b.com", b"/", b"GET", HeaderMap()) is None
    assert t.match(b"a.com", b"/", b"GET", HeaderMap()) is not None


def test_ignore_port_in_host_matching() -> None:
    t = compile_rc(
        """
ignore_port_in_host_matching: true
virtual_hosts:
- name: a
  domains: ["a.com"]
  routes: [{match: {prefix: "/"}, route: {cluster: c}}]
- name: ported
  domains: ["b.com:80"]
  routes: [{match: {prefix: "/"}, route: {cluster: c}}]
"""
    )
    assert t.find_virtual_host(b"a.com:9999").name == "a"
    # Envoy strips first, so a domain with a port never matches.
    assert t.find_virtual_host(b"b.com:80") is None


def test_vhost_cache_is_bounded() -> None:
    t = compile_rc(DOMAINS)
    for i in range(3000):
        t.match(b"h%d.org" % i, b"/", b"GET", HeaderMap())
    assert len(t._cache) <= 1024


@pytest.mark.parametrize(
    ("authority", "stripped"),
    [
        (b"a.com:80", b"a.com"),
        (b"a.com", b"a.com"),
        (b"[::1]:8080", b"[::1]"),
        (b"[::1]", b"[::1]"),
        (b"a.com:", b"a.com:"),
        (b"a.com:http", b"a.com:http"),
        (b"1.2.3.4:5", b"1.2.3.4"),
    ],
)
def test_strip_port(authority: bytes, stripped: bytes) -> None:
    assert strip_port(authority) == stripped


def test_duplicate_domain_error_path() -> None:
    e = config_error(
        """
virtual_hosts:
- name: a
  domains: ["a.com"]
  routes: []
- name: b
  domains: ["x.com", "A.com"]
  routes: []
"""
    )
    assert e.path == "route_config.virtual_hosts[1].domains[1]"
    assert "duplicate" in e.message


def test_second_wildcard_domain_error_path() -> None:
    e = config_error(
        """
virtual_hosts:
- {name: a, domains: ["*"], routes: []}
- {name: b, domains: ["b.com", "*"], routes: []}
"""
    )
    assert e.path == "route_config.virtual_hosts[1].domains[1]"
    assert "single wildcard" in e.message


def test_vhost_requires_domains_and_name() -> None:
    assert (
        config_error("virtual_hosts: [{name: a, routes: []}]").path == "route_config.virtual_hosts[0].domains"
    )
    assert config_error("virtual_hosts: [{domains: ['*']}]").path == "route_config.virtual_hosts[0].name"


def test_compile_path_prefix_is_used() -> None:
    with pytest.raises(ConfigError) as ei:
        RouteTable.compile(rc_proto("virtual_hosts: [{domains: ['*']}]"), "listeners[0].rc")
    assert ei.value.path == "listeners[0].rc.virtual_hosts[0].name"


# --------------------------------------------------------------------------- path matching


PATHS = """
  - {name: exact, match: {path: "/exact"}, route: {cluster: c}}
  - {name: iexact, match: {path: "/IExact", case_sensitive: false}, route: {cluster: c}}
  - {name: regex, match: {safe_regex: {regex: "/re/[0-9]+"}}, route: {cluster: c}}
  - {name: sep, match: {path_separated_prefix: "/api"}, route: {cluster: c}}
  - {name: isep, match: {path_separated_prefix: "/Up", case_sensitive: false}, route: {cluster: c}}
  - {name: iprefix, match: {prefix: "/CASE", case_sensitive: false}, route: {cluster: c}}
  - {name: prefix, match: {prefix: "/p"}, route: {cluster: c}}
"""


@pytest.mark.parametrize(
    ("path", "name"),
    [
        (b"/exact", "exact"),
        (b"/exact?x=1", "exact"),  # query ignored for matching
        (b"/exact#frag", "exact"),
        (b"/exact/", None),
        (b"/Exact", None),  # case-sensitive by default
        (b"/iexact", "iexact"),
        (b"/IEXACT?q", "iexact"),
        (b"/re/123", "regex"),
        (b"/re/123?x=y", "regex"),  # regex runs on the path without query
        (b"/re/123a", None),  # full match, not search
        (b"/api", "sep"),
        (b"/api/v1", "sep"),
        (b"/api?x", "sep"),
        (b"/apiv1", None),
        (b"/up/x", "isep"),
        (b"/UP", "isep"),
        (b"/case/x", "iprefix"),
        (b"/CaSe", "iprefix"),
        (b"/p", "prefix"),
        (b"/pqr", "prefix"),
        (b"/P", None),
        (b"/nothing", None),
    ],
)
def test_path_specifiers(path: bytes, name: str | None) -> None:
    assert m(one_vhost(PATHS), path) == name


def test_first_match_wins() -> None:
    t = one_vhost(
        """
  - {name: a, match: {prefix: "/a"}, route: {cluster: c}}
  - {name: ab, match: {prefix: "/ab"}, route: {cluster: c}}
  - {name: all, match: {prefix: ""}, route: {cluster: c}}
"""
    )
    assert m(t, b"/abc") == "a"
    assert m(t, b"/zzz") == "all"


def test_connect_matcher() -> None:
    t = one_vhost(
        """
  - {name: connect, match: {connect_matcher: {}}, route: {cluster: c}}
  - {name: other, match: {prefix: "/"}, route: {cluster: c}}
"""
    )
    assert m(t, b"", method=b"CONNECT") == "connect"
    assert m(t, b"/", method=b"GET") == "other"


def test_path_params_ignored_when_configured() -> None:
    t = one_vhost(
        '  - {name: a, match: {path: "/a/b"}, route: {cluster: c}}',
        "ignore_path_parameters_in_path_matching: true",
    )
    assert m(t, b"/a;x=1/b;y") == "a"
    assert m(one_vhost('  - {name: a, match: {path: "/a/b"}, route: {cluster: c}}'), b"/a;x=1/b") is None


def test_runtime_fraction_always_matches_and_is_noted() -> None:
    t = one_vhost(
        """
  - name: r
    match:
      prefix: "/"
      runtime_fraction: {default_value: {numerator: 0}, runtime_key: k}
    route: {cluster: c}
"""
    )
    assert m(t, b"/") == "r"
    assert any("runtime_fraction" in n for n in t.notices)


# --------------------------------------------------------------------------- header matchers


def hm(cfg: str) -> HeaderMatcher:
    from envoy.config.route.v3 import route_components_pb2

    return HeaderMatcher.compile(ParseDict(yaml.safe_load(cfg), route_components_pb2.HeaderMatcher()), "h")


def hmatch(matcher: HeaderMatcher, headers=(), method=b"GET", authority=b"a.com", path=b"/p?q=1") -> bool:
    return matcher.match(HeaderMap(list(headers)), method, authority, path)


@pytest.mark.parametrize(
    ("cfg", "headers", "expected"),
    [
        ("{name: x, string_match: {exact: abc}}", [(b"x", b"abc")], True),
        ("{name: x, string_match: {exact: abc}}", [(b"x", b"ABC")], False),
        ("{name: x, string_match: {exact: abc, ignore_case: true}}", [(b"x", b"ABC")], True),
        ("{name: x, string_match: {prefix: ab}}", [(b"x", b"abc")], True),
        ("{name: x, string_match: {prefix: AB, ignore_case: true}}", [(b"x", b"abc")], True),
        ("{name: x, string_match: {suffix: bc}}", [(b"x", b"abc")], True),
        ("{name: x, string_match: {suffix: BC, ignore_case: true}}", [(b"x", b"aBc")], True),
        ("{name: x, string_match: {suffix: zz}}", [(b"x", b"abc")], False),
        ("{name: x, string_match: {contains: b}}", [(b"x", b"abc")], True),
        ("{name: x, string_match: {contains: B, ignore_case: true}}", [(b"x", b"abc")], True),
        ("{name: x, string_match: {safe_regex: {regex: 'a.c'}}}", [(b"x", b"abc")], True),
        ("{name: x, string_match: {safe_regex: {regex: 'a'}}}", [(b"x", b"abc")], False),  # full match
        ("{name: x, exact_match: abc}", [(b"x", b"abc")], True),
        ("{name: x, exact_match: ''}", [(b"x", b"anything")], True),  # Envoy: empty exact = any
        ("{name: x, prefix_match: ab}", [(b"x", b"abc")], True),
        ("{name: x, suffix_match: bc}", [(b"x", b"abc")], True),
        ("{name: x, contains_match: zz}", [(b"x", b"abc")], False),
        ("{name: x, safe_regex_match: {regex: '[a-c]+'}}", [(b"x", b"abc")], True),
        ("{name: X-Up, exact_match: v}", [(b"x-up", b"v")], True),  # names are lower-cased
        # several values are joined with ','
        ("{name: x, exact_match: 'a,b'}", [(b"x", b"a"), (b"y", b"z"), (b"x", b"b")], True),
        # range [start, end)
        ("{name: n, range_match: {start: 1, end: 10}}", [(b"n", b"1")], True),
        ("{name: n, range_match: {start: 1, end: 10}}", [(b"n", b"10")], False),
        ("{name: n, range_match: {start: -10, end: 0}}", [(b"n", b"-1")], True),
        ("{name: n, range_match: {start: 1, end: 10}}", [(b"n", b"5x")], False),
        ("{name: n, range_match: {start: 1, end: 10}}", [(b"n", b"1_0")], False),
        # present / absent
        ("{name: x, present_match: true}", [(b"x", b"")], True),
        ("{name: x, present_match: true}", [], False),
        ("{name: x, present_match: false}", [], True),
        ("{name: x, present_match: false}", [(b"x", b"1")], False),
        ("{name: x}", [(b"x", b"1")], True),  # no specifier: presence
        ("{name: x}", [], False),
        # invert
        ("{name: x, exact_match: a, invert_match: true}", [(b"x", b"b")], True),
        ("{name: x, exact_match: a, invert_match: true}", [(b"x", b"a")], False),
        ("{name: x, exact_match: a, invert_match: true}", [], False),  # missing: ignored, no match
        ("{name: x, present_match: true, invert_match: true}", [], True),
        ("{name: x, present_match: true, invert_match: true}", [(b"x", b"1")], False),
        # treat_missing_header_as_empty
        (
            "{name: n, range_match: {start: 0, end: 10}, invert_match: true, treat_missing_header_as_empty: true}",
            [],
            True,
        ),
        ("{name: x, string_match: {exact: ''}, treat_missing_header_as_empty: true}", [], True),
        ("{name: x, string_match: {exact: ''}}", [], False),
    ],
)
def test_header_matcher(cfg: str, headers, expected: bool) -> None:
    assert hmatch(hm(cfg), headers) is expected


@pytest.mark.parametrize(
    ("cfg", "expected"),
    [
        ("{name: ':method', exact_match: POST}", True),
        ("{name: ':method', exact_match: GET}", False),
        ("{name: ':authority', string_match: {suffix: '.com'}}", True),
        ("{name: ':path', string_match: {exact: '/p?q=1'}}", True),  # :path includes the query
        ("{name: ':path', string_match: {prefix: '/p'}}", True),
    ],
)
def test_header_matcher_pseudo_headers(cfg: str, expected: bool) -> None:
    assert hmatch(hm(cfg), method=b"POST") is expected


def test_route_header_and_query_conditions() -> None:
    t = one_vhost(
        """
  - name: both
    match:
      prefix: "/"
      headers: [{name: x-v, string_match: {exact: "2"}}, {name: ":method", exact_match: POST}]
      query_parameters: [{name: debug, present_match: true}, {name: u, string_match: {prefix: "ad"}}]
    route: {cluster: c}
  - name: q_present
    match: {prefix: "/", query_parameters: [{name: flag}]}
    route: {cluster: c}
  - name: fallback
    match: {prefix: "/"}
    route: {cluster: c}
"""
    )
    h = [(b"x-v", b"2")]
    assert m(t, b"/?debug&u=admin", method=b"POST", headers=h) == "both"
    assert m(t, b"/?debug&u=admin", method=b"GET", headers=h) == "fallback"
    assert m(t, b"/?debug&u=user", method=b"POST", headers=h) == "fallback"
    assert m(t, b"/?u=admin", method=b"POST", headers=h) == "fallback"
    assert m(t, b"/?debug&u=admin", method=b"POST") == "fallback"
    assert m(t, b"/x?flag=", method=b"GET") == "q_present"
    assert m(t, b"/x?flagx=1", method=b"GET") == "fallback"


def test_parse_query_first_value_raw() -> None:
    assert parse_query(b"/p?a=1&a=2&b&c=%20x&=e#frag=1") == {b"a": b"1", b"b": b"", b"c": b"%20x", b"": b"e"}
    assert parse_query(b"/p") == {}


def test_grpc_match() -> None:
    t = one_vhost(
        """
  - {name: grpc, match: {prefix: "/", grpc: {}}, route: {cluster: c}}
  - {name: http, match: {prefix: "/"}, route: {cluster: c}}
"""
    )
    for ct, name in [
        (b"application/grpc", "grpc"),
        (b"application/grpc+proto", "grpc"),
        (b"application/grpc;x=y", "grpc"),
        (b"application/grpc-web", "http"),
        (b"application/json", "http"),
    ]:
        assert m(t, b"/svc/M", headers=[(b"content-type", ct)]) == name, ct
    assert m(t, b"/svc/M") == "http"


# --------------------------------------------------------------------------- string matcher API


def sm(cfg: str) -> StringMatcher:
    from envoy.type.matcher.v3 import string_pb2

    return StringMatcher.compile(ParseDict(yaml.safe_load(cfg), string_pb2.StringMatcher()), "sm")


def test_string_matcher_api() -> None:
    assert sm("{exact: ''}").match(b"")
    assert not sm("{exact: ''}").match(b"a")
    assert sm("{prefix: 'ab', ignore_case: true}").match(b"ABC")
    assert sm("{safe_regex: {regex: '\\d+\\z'}}").match(b"123")  # RE2 \z translated
    assert not sm("{safe_regex: {regex: '1\\n?\\z'}}").match(b"1\n\n")


@pytest.mark.parametrize(
    ("cfg", "path"),
    [
        ("{prefix: ''}", "sm.prefix"),
        ("{suffix: ''}", "sm.suffix"),
        ("{contains: ''}", "sm.contains"),
        ("{ignore_case: true}", "sm"),
        ("{safe_regex: {regex: '('}}", "sm.safe_regex.regex"),
        ("{safe_regex: {regex: 'a(?=b)'}}", "sm.safe_regex.regex"),
        ("{safe_regex: {regex: '(a)\\1'}}", "sm.safe_regex.regex"),
        ("{safe_regex: {regex: ''}}", "sm.safe_regex.regex"),
    ],
)
def test_string_matcher_errors(cfg: str, path: str) -> None:
    with pytest.raises(ConfigError) as ei:
        sm(cfg)
    assert ei.value.path == path


def test_re2_named_group_and_class_brackets() -> None:
    assert sm("{safe_regex: {regex: '(?<x>[]a]+)'}}").match(b"]a]")
    # '(?=' inside a character class is not a lookahead
    assert sm("{safe_regex: {regex: '[(?=]+'}}").match(b"(?=")


# --------------------------------------------------------------------------- route actions


def test_route_action_fields_and_defaults() -> None:
    t = one_vhost(
        """
  - name: full
    match: {prefix: "/full"}
    route:
      cluster: backend
      timeout: 2.5s
      idle_timeout: 30s
      max_stream_duration: {max_stream_duration: 60s, grpc_timeout_header_max: 0s}
      host_rewrite_literal: up.internal
      upgrade_configs: [{upgrade_type: WebSocket}, {upgrade_type: CONNECT, enabled: false}]
  - name: legacy_grpc
    match: {prefix: "/legacy"}
    route: {cluster: c, max_grpc_timeout: 3s, auto_host_rewrite: true}
  - name: defaults
    match: {prefix: "/"}
    route: {cluster_header: X-Cluster, host_rewrite_header: X-Host}
"""
    )
    r = t.match(b"a", b"/full", b"GET", HeaderMap())
    assert r.kind == ROUTE and r.cluster == "backend" and r.pick_cluster(HeaderMap()) == "backend"
    assert r.timeout == 2.5 and r.idle_timeout == 30.0
    assert r.max_stream_duration == 60.0 and r.max_grpc_timeout == 0.0
    assert r.host_rewrite == b"up.internal" and not r.auto_host_rewrite
    assert r.upgrade_configs == {b"websocket": True, b"connect": False}
    assert r.rewrite_path(b"/full") is None
    assert r.retry is None
    r = t.match(b"a", b"/legacy", b"GET", HeaderMap())
    assert r.max_grpc_timeout == 3.0 and r.auto_host_rewrite
    r = t.match(b"a", b"/x", b"GET", HeaderMap())
    assert r.timeout == 15.0 and r.idle_timeout is None and r.max_grpc_timeout is None
    assert r.cluster_header == b"x-cluster" and r.host_rewrite_header == b"x-host"
    assert r.pick_cluster(HeaderMap([(b"x-cluster", b"dyn")])) == "dyn"
    assert r.pick_cluster(HeaderMap()) is None


def test_zero_timeout_means_none() -> None:
    r = one_vhost('  - {match: {prefix: "/"}, route: {cluster: c, timeout: 0s}}').match(
        b"a", b"/", b"GET", HeaderMap()
    )
    assert r.timeout == 0.0


@pytest.mark.parametrize(
    ("match", "rewrite", "path", "expected"),
    [
        ('{prefix: "/api/"}', '{prefix_rewrite: "/"}', b"/api/users?x=1", b"/users?x=1"),
        ('{prefix: "/API", case_sensitive: false}', '{prefix_rewrite: "/v2"}', b"/api/x", b"/v2/x"),
        ('{path_separated_prefix: "/old"}', '{prefix_rewrite: "/new"}', b"/old/a?b", b"/new/a?b"),
        ('{path: "/exact"}', '{prefix_rewrite: "/other"}', b"/exact?q=1", b"/other?q=1"),
        ('{safe_regex: {regex: "/r/.*"}}', '{prefix_rewrite: "/s"}', b"/r/abc?q", b"/s?q"),
        (
            '{prefix: "/"}',
            '{regex_rewrite: {pattern: {regex: "^/service/([^/]+)(/.*)$"}, substitution: "\\\\2/instance/\\\\1"}}',
            b"/service/foo/v1/api?x=/service/a/b",
            b"/v1/api/instance/foo?x=/service/a/b",
        ),
        (
            '{prefix: "/"}',
            '{regex_rewrite: {pattern: {regex: "o"}, substitution: "0"}}',
            b"/foo/boo?o=o",
            b"/f00/b00?o=o",
        ),
        (
            '{prefix: "/"}',
            '{regex_rewrite: {pattern: {regex: "^/(.*)$"}, substitution: "/x\\\\0"}}',
            b"/a",
            b"/x/a",
        ),
    ],
)
def test_path_rewrites(match: str, rewrite: str, path: bytes, expected: bytes) -> None:
    rw = yaml.safe_load(rewrite)
    t = compile_rc(
        {
            "virtual_hosts": [
                {
                    "name": "v",
                    "domains": ["*"],
                    "routes": [{"match": yaml.safe_load(match), "route": {"cluster": "c", **rw}}],
                }
            ]
        }
    )
    r = t.match(b"a", path, b"GET", HeaderMap())
    assert r is not None
    assert r.rewrite_path(path) == expected


def test_weighted_clusters_distribution() -> None:
    t = one_vhost(
        """
  - match: {prefix: "/"}
    route:
      weighted_clusters:
        total_weight: 1000
        clusters:
        - {name: a, weight: 10}
        - {name: zero, weight: 0}
        - {name: b, weight: 30}
        - {name: c, weight: 60}
"""
    )
    r = t.match(b"a", b"/", b"GET", HeaderMap())
    w = r.weighted
    assert w.total_weight == 100 and w.weights == (10, 0, 30, 60)
    assert [w.pick(i) for i in (0, 9, 10, 39, 40, 99, 100)] == ["a", "a", "b", "b", "c", "c", "a"]
    random.seed(1234)
    counts = Counter(r.pick_cluster(HeaderMap()) for _ in range(20000))
    assert counts["zero"] == 0
    assert abs(counts["a"] / 20000 - 0.10) < 0.02
    assert abs(counts["b"] / 20000 - 0.30) < 0.03
    assert abs(counts["c"] / 20000 - 0.60) < 0.03


def test_weighted_cluster_header_and_entry_mutations() -> None:
    t = one_vhost(
        """
  - match: {prefix: "/"}
    request_headers_to_add: [{header: {key: x-level, value: route}, append_action: OVERWRITE_IF_EXISTS_OR_ADD}]
    route:
      weighted_clusters:
        header_name: x-rand
        clusters:
        - name: a
          weight: 1
          host_rewrite_literal: a.internal
          request_headers_to_add: [{header: {key: x-level, value: entry}}]
          response_headers_to_add: [{header: {key: x-from, value: a}}]
        - {cluster_header: x-dyn, weight: 1}
"""
    )
    r = t.match(b"a", b"/", b"GET", HeaderMap())
    assert r.pick_cluster(HeaderMap([(b"x-rand", b"2")])) == "a"
    assert r.pick_cluster(HeaderMap([(b"x-rand", b"3"), (b"x-dyn", b"zz")])) == "zz"
    assert r.host_rewrite_for("a") == b"a.internal" and r.host_rewrite_for(None) is None
    h = HeaderMap()
    r.apply_request_headers(h, "a")
    # entry first (adds), then the route level overwrites
    assert h.get_all(b"x-level") == [b"route"]
    resp = HeaderMap()
    r.apply_response_headers(resp, "a")
    assert resp.get(b"x-from") == b"a"


def test_weighted_cluster_zero_sum_error() -> None:
    e = config_error(
        """
virtual_hosts:
- name: v
  domains: ["*"]
  routes:
  - match: {prefix: "/"}
    route: {weighted_clusters: {clusters: [{name: a, weight: 0}]}}
"""
    )
    assert e.path == "route_config.virtual_hosts[0].routes[0].route.weighted_clusters.clusters"


# --------------------------------------------------------------------------- header mutations


MUTATIONS = """
name: m
request_headers_to_add:
- {header: {key: x-level, value: config}, append_action: OVERWRITE_IF_EXISTS_OR_ADD}
- {header: {key: x-config, value: "1"}}
request_headers_to_remove: [x-remove-by-config]
response_headers_to_add:
- {header: {key: x-resp, value: config}, append: false}
virtual_hosts:
- name: v
  domains: ["*"]
  request_headers_to_add:
  - {header: {key: x-level, value: vhost}, append_action: OVERWRITE_IF_EXISTS_OR_ADD}
  - {header: {key: x-vhost-only, value: "v"}}
  response_headers_to_add:
  - {header: {key: x-resp, value: vhost}, append: false}
  routes:
  - match: {prefix: "/"}
    request_headers_to_add:
    - {header: {key: x-level, value: route}, append_action: OVERWRITE_IF_EXISTS_OR_ADD}
    - {header: {key: x-append, value: two}}
    - {header: {key: x-absent, value: new}, append_action: ADD_IF_ABSENT}
    - {header: {key: x-present, value: new}, append_action: ADD_IF_ABSENT}
    - {header: {key: x-only-if, value: new}, append_action: OVERWRITE_IF_EXISTS}
    - {header: {key: x-only-if-2, value: new}, append_action: OVERWRITE_IF_EXISTS}
    - {header: {key: x-empty, value: ""}}
    - {header: {key: x-keep-empty, value: ""}, keep_empty_value: true}
    - {header: {key: x-legacy, value: "l"}, append: false}
    - {header: {key: x-pct, value: "100%% literal"}}
    - {header: {key: x-fmt, value: "%DOWNSTREAM_REMOTE_ADDRESS%"}}
    - {header: {key: X-Upper, raw_value: "cmF3"}}
    request_headers_to_remove: [x-drop, X-Drop-Too]
    response_headers_to_add:
    - {header: {key: x-resp, value: route}, append: false}
    response_headers_to_remove: [server]
    route: {cluster: c}
"""


def test_request_header_mutations_envoy_default_order() -> None:
    t = compile_rc(MUTATIONS)
    r = t.match(b"a", b"/", b"GET", HeaderMap())
    h = HeaderMap(
        [
            (b"x-append", b"one"),
            (b"x-present", b"old"),
            (b"x-only-if", b"old"),
            (b"x-legacy", b"old"),
            (b"x-drop", b"1"),
            (b"x-drop-too", b"1"),
            (b"x-remove-by-config", b"1"),
        ]
    )
    r.apply_request_headers(h)
    # default: route, then vhost, then config -- the last overwrite (config) wins
    assert h.get_all(b"x-level") == [b"config"]
    assert h.get_all(b"x-append") == [b"one", b"two"]
    assert h.get_all(b"x-absent") == [b"new"]
    assert h.get_all(b"x-present") == [b"old"]
    assert h.get_all(b"x-only-if") == [b"new"]
    assert h.get(b"x-only-if-2") is None
    assert b"x-empty" not in h
    assert h.get_all(b"x-keep-empty") == [b""]
    assert h.get_all(b"x-legacy") == [b"l"]
    assert h.get(b"x-pct") == b"100% literal"
    assert h.get(b"x-fmt") == b"%DOWNSTREAM_REMOTE_ADDRESS%"
    assert h.get(b"x-upper") == b"raw"
    assert h.get(b"x-vhost-only") == b"v" and h.get(b"x-config") == b"1"
    for gone in (b"x-drop", b"x-drop-too", b"x-remove-by-config"):
        assert gone not in h
    assert any("x-fmt" not in n and "DOWNSTREAM_REMOTE_ADDRESS" in n for n in t.notices)
    assert r.request_headers_to_remove == {b"x-drop", b"x-drop-too", b"x-remove-by-config"}
    assert r.request_headers_to_add[0].name == b"x-level" and r.request_headers_to_add[0].value == b"route"
    actions = {ha.name: ha.action for ha in r.request_headers_to_add if ha.value != b"config"}
    assert actions[b"x-append"] == APPEND_IF_EXISTS_OR_ADD
    assert actions[b"x-absent"] == ADD_IF_ABSENT
    assert actions[b"x-only-if"] == OVERWRITE_IF_EXISTS
    assert actions[b"x-legacy"] == OVERWRITE_IF_EXISTS_OR_ADD


def test_response_header_mutations_and_most_specific_wins() -> None:
    r = compile_rc(MUTATIONS).match(b"a", b"/", b"GET", HeaderMap())
    h = HeaderMap([(b"server", b"up"), (b"x-resp", b"upstream")])
    r.apply_response_headers(h)
    assert h.get_all(b"x-resp") == [b"config"] and b"server" not in h
    assert r.response_headers_to_remove == {b"server"}

    d = yaml.safe_load(MUTATIONS)
    d["most_specific_header_mutations_wins"] = True
    r = compile_rc(d).match(b"a", b"/", b"GET", HeaderMap())
    h = HeaderMap([(b"x-resp", b"upstream")])
    r.apply_response_headers(h)
    assert h.get_all(b"x-resp") == [b"route"]
    req = HeaderMap()
    r.apply_request_headers(req)
    assert req.get_all(b"x-level") == [b"route"]


def test_removal_per_level_order() -> None:
    # Envoy evaluates remove-then-add per level: a header added by the route and removed by the
    # virtual host (evaluated after the route by default) is gone.
    t = compile_rc(
        """
virtual_hosts:
- name: v
  domains: ["*"]
  request_headers_to_remove: [x-a]
  routes:
  - match: {prefix: "/"}
    request_headers_to_add: [{header: {key: x-a, value: "1"}}]
    route: {cluster: c}
"""
    )
    h = HeaderMap()
    t.match(b"a", b"/", b"GET", HeaderMap()).apply_request_headers(h)
    assert b"x-a" not in h


@pytest.mark.parametrize(
    ("field", "entry", "suffix"),
    [
        (
            "request_headers_to_add",
            {"header": {"key": ":path", "value": "x"}},
            "request_headers_to_add[0].header.key",
        ),
        (
            "request_headers_to_add",
            {"header": {"key": "Host", "value": "x"}},
            "request_headers_to_add[0].header.key",
        ),
        ("request_headers_to_remove", ":authority", "request_headers_to_remove[0]"),
        (
            "response_headers_to_add",
            {"header": {"key": "x", "value": "y"}, "append": True, "append_action": "ADD_IF_ABSENT"},
            "response_headers_to_add[0].append",
        ),
    ],
)
def test_header_mutation_errors(field: str, entry, suffix: str) -> None:
    e = config_error(
        {
            "virtual_hosts": [
                {
                    "name": "v",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "c"}, field: [entry]}],
                }
            ]
        }
    )
    assert e.path == f"route_config.virtual_hosts[0].routes[0].{suffix}"


# --------------------------------------------------------------------------- direct responses and redirects


def test_direct_response(tmp_path) -> None:
    body = tmp_path / "body.txt"
    body.write_bytes(b"from file")
    t = one_vhost(
        f"""
  - {{name: inline, match: {{path: "/i"}}, direct_response: {{status: 200, body: {{inline_string: "ok"}}}}}}
  - {{name: bytes, match: {{path: "/b"}}, direct_response: {{status: 418, body: {{inline_bytes: "AAE="}}}}}}
  - {{name: file, match: {{path: "/f"}}, direct_response: {{status: 503, body: {{filename: "{body}"}}}}}}
  - {{name: empty, match: {{path: "/e"}}, direct_response: {{status: 204}}}}
"""
    )

    def get(p: bytes):
        r = t.match(b"a", p, b"GET", HeaderMap())
        assert r.kind == DIRECT_RESPONSE
        return r.direct_status, r.direct_body

    assert get(b"/i") == (200, b"ok")
    assert get(b"/b") == (418, b"\x00\x01")
    assert get(b"/f") == (503, b"from file")
    assert get(b"/e") == (204, b"")


def test_direct_response_errors(tmp_path) -> None:
    missing = tmp_path / "nope"
    e = config_error(
        f"""
virtual_hosts:
- name: v
  domains: ["*"]
  routes:
  - {{match: {{prefix: "/"}}, direct_response: {{status: 200}}}}
  - {{match: {{prefix: "/"}}, direct_response: {{status: 200, body: {{filename: "{missing}"}}}}}}
"""
    )
    assert e.path == "route_config.virtual_hosts[0].routes[1].direct_response.body.filename"
    e = config_error(
        """
max_direct_response_body_size_bytes: 3
virtual_hosts:
- name: v
  domains: ["*"]
  routes:
  - {match: {prefix: "/"}, direct_response: {status: 200, body: {inline_string: "four"}}}
"""
    )
    assert e.path == "route_config.virtual_hosts[0].routes[0].direct_response.body"
    e = config_error(
        """
virtual_hosts:
- {name: v, domains: ["*"], routes: [{match: {prefix: "/"}, direct_response: {status: 99}}]}
"""
    )
    assert e.path == "route_config.virtual_hosts[0].routes[0].direct_response.status"


REDIRECTS = """
  - {name: https, match: {prefix: "/https"}, redirect: {https_redirect: true}}
  - {name: strip, match: {prefix: "/strip"}, redirect: {path_redirect: "/new", strip_query: true, response_code: FOUND}}
  - {name: pathq, match: {prefix: "/pathq"}, redirect: {path_redirect: "/n?a=1", strip_query: true}}
  - {name: pathkeep, match: {prefix: "/pathkeep"}, redirect: {path_redirect: "rel"}}
  - {name: port, match: {prefix: "/port"}, redirect: {port_redirect: 8443, response_code: TEMPORARY_REDIRECT}}
  - name: hostport
    match: {prefix: "/hostport"}
    redirect: {host_redirect: "other.com", port_redirect: 81, scheme_redirect: "HTTPS", response_code: PERMANENT_REDIRECT}
  - {name: prefix, match: {prefix: "/old/"}, redirect: {prefix_rewrite: "/new/", response_code: SEE_OTHER}}
  - name: regex
    match: {prefix: "/r/"}
    redirect: {regex_rewrite: {pattern: {regex: "^/r/(.*)$"}, substitution: "/s/\\\\1"}, strip_query: true}
"""


@pytest.mark.parametrize(
    ("scheme", "authority", "path", "expected"),
    [
        (b"http", b"a.com", b"/https/x?q=1", (301, b"https://a.com/https/x?q=1")),
        (
            b"http",
            b"a.com:80",
            b"/https",
            (301, b"https://a.com/https"),
        ),  # default port of old scheme dropped
        (b"http", b"a.com:8080", b"/https", (301, b"https://a.com:8080/https")),
        (b"https", b"a.com:443", b"/https", (301, b"https://a.com:443/https")),  # same scheme: kept
        (b"http", b"[::1]:80", b"/https", (301, b"https://[::1]/https")),
        (b"http", b"a.com", b"/strip?x=1", (302, b"http://a.com/new")),
        (b"http", b"a.com", b"/pathq?x=1", (301, b"http://a.com/n?a=1")),  # path_redirect's query wins
        (
            b"http",
            b"a.com",
            b"/pathkeep?x=1",
            (301, b"http://a.com/rel?x=1"),
        ),  # request query kept, '/' added
        (b"http", b"a.com:9000", b"/port", (307, b"http://a.com:8443/port")),
        (b"http", b"a.com", b"/hostport?z", (308, b"https://other.com:81/hostport?z")),
        (b"http", b"a.com", b"/old/p?k=v", (303, b"http://a.com/new/p?k=v")),
        (b"https", b"a.com", b"/r/a/b?k=v", (301, b"https://a.com/s/a/b")),
    ],
)
def test_redirects(scheme: bytes, authority: bytes, path: bytes, expected) -> None:
    r = one_vhost(REDIRECTS).match(authority, path, b"GET", HeaderMap())
    assert r.kind == REDIRECT
    assert r.redirect_location(scheme, authority, path) == expected


# --------------------------------------------------------------------------- retry policy


def retry_table(policy: str, vhost_policy: str = "") -> RouteTable:
    vp = f"retry_policy: {vhost_policy}" if vhost_policy else ""
    return compile_rc(
        f"""
virtual_hosts:
- name: v
  domains: ["*"]
  {vp}
  routes:
  - {{name: own, match: {{prefix: "/own"}}, route: {{cluster: c, retry_policy: {policy}}}}}
  - {{name: inherit, match: {{prefix: "/"}}, route: {{cluster: c}}}}
"""
    )


def test_retry_policy_fields_and_vhost_fallback() -> None:
    t = retry_table(
        """{retry_on: "5xx, connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
            num_retries: 3, per_try_timeout: 0.5s, per_try_idle_timeout: 1s,
            retry_back_off: {base_interval: 0.1s, max_interval: 0.3s},
            retriable_status_codes: [418],
            retry_host_predicate: [{name: envoy.retry_host_predicates.previous_hosts}],
            host_selection_retry_max_attempts: 5}""",
        '{retry_on: "gateway-error"}',
    )
    rp = t.match(b"a", b"/own", b"GET", HeaderMap()).retry
    assert rp.retry_on == (
        RETRY_5XX
        | RETRY_CONNECT_FAILURE
        | RETRY_REFUSED_STREAM
        | RETRY_UNAVAILABLE
        | RETRY_CANCELLED
        | RETRY_RETRIABLE_STATUS_CODES
    )
    assert rp.num_retries == 3 and rp.per_try_timeout == 0.5 and rp.per_try_idle_timeout == 1.0
    assert rp.base_interval == 0.1 and rp.max_interval == 0.3
    assert rp.retriable_status_codes == {418}
    assert rp.retry_host_predicate_previous_hosts and rp.host_selection_retry_max_attempts == 5
    inherited = t.match(b"a", b"/x", b"GET", HeaderMap()).retry
    assert inherited.retry_on == RETRY_GATEWAY_ERROR
    assert inherited.num_retries == 1 and inherited.base_interval == 0.025
    assert inherited.max_interval == pytest.approx(0.25)
    assert not inherited.retry_host_predicate_previous_hosts and inherited.per_try_timeout is None


@pytest.mark.parametrize(
    ("retry_on", "status", "grpc", "expected"),
    [
        ("5xx", 500, None, True),
        ("5xx", 599, None, True),
        ("5xx", 404, None, False),
        ("gateway-error", 502, None, True),
        ("gateway-error", 504, None, True),
        ("gateway-error", 500, None, False),
        ("retriable-4xx", 409, None, True),
        ("retriable-4xx", 404, None, False),
        ("retriable-status-codes", 418, None, True),
        ("retriable-status-codes", 419, None, False),
        ("connect-failure", 503, None, False),
        ("cancelled", 200, 1, True),
        ("deadline-exceeded", 200, 4, True),
        ("resource-exhausted", 200, 8, True),
        ("internal", 200, 13, True),
        ("unavailable", 200, 14, True),
        ("unavailable", 200, 13, False),
        ("unavailable", 200, None, False),
    ],
)
def test_should_retry_status(retry_on: str, status: int, grpc: int | None, expected: bool) -> None:
    rp = retry_table(f'{{retry_on: "{retry_on}", retriable_status_codes: [418]}}').match(
        b"a", b"/own", b"GET", HeaderMap()
    )
    assert rp.retry.should_retry_status(status, grpc) is expected


def test_retriable_headers() -> None:
    rp = retry_table(
        '{retry_on: "retriable-headers", retriable_headers: [{name: x-retry, exact_match: "yes"}]}'
    )
    r = rp.match(b"a", b"/own", b"GET", HeaderMap()).retry
    assert r.should_retry_headers(HeaderMap([(b"x-retry", b"yes")]))
    assert not r.should_retry_headers(HeaderMap([(b"x-retry", b"no")]))


def test_retry_on_unknown_token_error_path() -> None:
    with pytest.raises(ConfigError) as ei:
        retry_table('{retry_on: "5xx,bogus"}')
    assert ei.value.path == "route_config.virtual_hosts[0].routes[0].route.retry_policy.retry_on"
    assert "bogus" in ei.value.message
    with pytest.raises(ConfigError) as ei:
        retry_table('{retry_on: "5xx"}', '{retry_on: "nope"}')
    assert ei.value.path == "route_config.virtual_hosts[0].retry_policy.retry_on"


def test_retry_backoff_validation() -> None:
    with pytest.raises(ConfigError) as ei:
        retry_table('{retry_on: "5xx", retry_back_off: {base_interval: 1s, max_interval: 0.5s}}')
    assert (
        ei.value.path
        == "route_config.virtual_hosts[0].routes[0].route.retry_policy.retry_back_off.max_interval"
    )
    with pytest.raises(ConfigError) as ei:
        retry_table('{retry_on: "5xx", retry_back_off: {max_interval: 0.5s}}')
    assert ei.value.path.endswith("retry_back_off.base_interval")


def test_rate_limited_reset_headers() -> None:
    rp = (
        retry_table(
            '{retry_on: "5xx", rate_limited_retry_back_off: {reset_headers: [{name: Retry-After},'
            " {name: X-RateLimit-Reset, format: UNIX_TIMESTAMP}], max_interval: 100s}}"
        )
        .match(b"a", b"/own", b"GET", HeaderMap())
        .retry
    )
    assert rp.reset_headers == ((b"retry-after", False), (b"x-ratelimit-reset", True))
    now = 1_700_000_000.0

    def delay(*h: tuple[bytes, bytes]) -> float | None:
        return rp.reset_delay(HeaderMap(list(h)), now)

    assert delay((b"retry-after", b"7")) == 7.0
    assert delay((b"retry-after", b" 3 ")) == 3.0
    # an HTTP date, 30 s ahead (Tue, 14 Nov 2023 22:13:50 GMT is now + 30)
    assert delay((b"retry-after", b"Tue, 14 Nov 2023 22:13:50 GMT")) == pytest.approx(30.0)
    assert delay((b"retry-after", b"Tue, 14 Nov 2023 22:00:00 GMT")) == 0.0  # in the past
    # the first header fails (garbage, too long, over max_interval): the next one is tried
    assert delay((b"retry-after", b"soon"), (b"x-ratelimit-reset", b"1700000012")) == 12.0
    assert delay((b"retry-after", b"9" * 100), (b"x-ratelimit-reset", b"1700000001")) == 1.0
    assert delay((b"retry-after", b"101")) is None
    assert delay((b"x-ratelimit-reset", b"Tue, 14 Nov 2023 22:13:50 GMT")) is None  # not seconds
    assert delay((b"x-ratelimit-reset", b"1699999999")) == 0.0
    assert delay() is None
    with pytest.raises(ConfigError) as ei:
        retry_table('{retry_on: "5xx", rate_limited_retry_back_off: {}}')
    assert ei.value.path.endswith("rate_limited_retry_back_off.reset_headers")
    assert RetryPolicy().rate_limited_max_interval == 300.0  # Envoy's default


def test_backoff_is_exponential_and_capped() -> None:
    rp = RetryPolicy()
    rp.base_interval, rp.max_interval = 0.025, 0.25
    almost_one = 0.999999
    caps = [rp.backoff(n, almost_one) for n in range(6)]
    assert caps[0] == pytest.approx(0.025 * almost_one)
    assert caps[1] == pytest.approx(0.05 * almost_one)
    assert caps[3] == pytest.approx(0.2 * almost_one)
    assert caps[4] == pytest.approx(0.25 * almost_one) and caps[5] == caps[4]
    assert rp.backoff(2, 0.0) == 0.0


@given(
    base_ms=st.integers(min_value=1, max_value=5000),
    factor=st.integers(min_value=1, max_value=100),
    attempt=st.integers(min_value=0, max_value=10_000),
    rand=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
)
def test_backoff_within_bounds(base_ms: int, factor: int, attempt: int, rand: float) -> None:
    rp = RetryPolicy()
    rp.base_interval = base_ms / 1000
    rp.max_interval = rp.base_interval * factor
    d = rp.backoff(attempt, rand)
    assert 0.0 <= d <= rp.max_interval
    assert d <= rp.base_interval * (2 ** min(attempt, 60))


# --------------------------------------------------------------------------- errors with field paths


@pytest.mark.parametrize(
    ("route", "suffix"),
    [
        ({"match": {"safe_regex": {"regex": "("}}, "route": {"cluster": "c"}}, "match.safe_regex.regex"),
        (
            {
                "match": {"prefix": "/", "headers": [{"name": "x", "safe_regex_match": {"regex": "[a"}}]},
                "route": {"cluster": "c"},
            },
            "match.headers[0].safe_regex_match.regex",
        ),
        (
            {
                "match": {
                    "prefix": "/",
                    "query_parameters": [{"name": "q", "string_match": {"safe_regex": {"regex": "*"}}}],
                },
                "route": {"cluster": "c"},
            },
            "match.query_parameters[0].string_match.safe_regex.regex",
        ),
        ({"match": {"prefix": "/"}, "filter_action": {}}, "filter_action"),
        ({"match": {"prefix": "/"}, "non_forwarding_action": {}}, "non_forwarding_action"),
        ({"match": {"prefix": "/"}}, ""),
        ({"route": {"cluster": "c"}}, "match"),
        ({"match": {"prefix": "/"}, "route": {}}, "route"),
        (
            {"match": {"prefix": "/"}, "route": {"cluster_specifier_plugin": "p"}},
            "route.cluster_specifier_plugin",
        ),
        (
            {"match": {"path_separated_prefix": "/a/"}, "route": {"cluster": "c"}},
            "match.path_separated_prefix",
        ),
        (
            {"match": {"prefix": "/", "tls_context": {"presented": True}}, "route": {"cluster": "c"}},
            "match.tls_context",
        ),
        (
            {
                "match": {"prefix": "/"},
                "route": {
                    "cluster": "c",
                    "prefix_rewrite": "/x",
                    "regex_rewrite": {"pattern": {"regex": "a"}, "substitution": "b"},
                },
            },
            "route.regex_rewrite",
        ),
        (
            {
                "match": {"prefix": "/"},
                "route": {
                    "cluster": "c",
                    "regex_rewrite": {"pattern": {"regex": "(a)"}, "substitution": "\\2"},
                },
            },
            "route.regex_rewrite.substitution",
        ),
        (
            {
                "match": {"prefix": "/"},
                "route": {
                    "cluster": "c",
                    "regex_rewrite": {"pattern": {"regex": "(?<=a)b"}, "substitution": "c"},
                },
            },
            "route.regex_rewrite.pattern.regex",
        ),
        (
            {
                "match": {"prefix": "/"},
                "route": {"cluster": "c", "retry_policy": {"retriable_status_codes": [1000]}},
            },
            "route.retry_policy.retriable_status_codes[0]",
        ),
    ],
)
def test_route_errors_name_the_field(route: dict, suffix: str) -> None:
    e = config_error(
        {
            "virtual_hosts": [
                {"name": "v0", "domains": ["a"], "routes": []},
                {
                    "name": "v",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "c"}}] * 3 + [route],
                },
            ]
        }
    )
    base = "route_config.virtual_hosts[1].routes[3]"
    assert e.path == (f"{base}.{suffix}" if suffix else base)


def test_typed_per_filter_config_most_specific_wins() -> None:
    any_a = {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": "config"}
    any_b = {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": "route"}
    t = compile_rc(
        {
            "typed_per_filter_config": {"f1": any_a, "f2": any_a},
            "virtual_hosts": [
                {
                    "name": "v",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"prefix": "/"},
                            "route": {"cluster": "c"},
                            "typed_per_filter_config": {"f1": any_b},
                        }
                    ],
                }
            ],
        }
    )
    r = t.match(b"a", b"/", b"GET", HeaderMap())
    from google.protobuf import wrappers_pb2

    def val(a) -> str:
        s = wrappers_pb2.StringValue()
        a.Unpack(s)
        return s.value

    assert val(r.typed_per_filter_config["f1"]) == "route"
    assert val(r.typed_per_filter_config["f2"]) == "config"


# -- runs of regex routes (one combined regex) ----------------------------------------------------

_RUN_REGEXES = [
    "/api/v[0-9]+/users",
    "/api/v1/.*",
    "/(a|b)+/c",
    "/static/[^/]+\\.css",
    "/x(?P<id>[0-9]{2})",
    "/x[0-9]{2}",
    ".*/health",
    "/api/v2/(users|groups)/[0-9]+",
    "/(?:cat|dog)s?",
    "/e",
]


def _run_table(regexes: list[str], header_on: set[int]) -> dict:
    routes = []
    for i, rx in enumerate(regexes):
        match: dict = {"safe_regex": {"regex": rx}}
        if i in header_on:
            match["headers"] = [{"name": "x-v", "string_match": {"exact": "1"}}]
        routes.append({"name": f"r{i}", "match": match, "route": {"cluster": "c"}})
    routes.append({"name": "last", "match": {"prefix": "/"}, "route": {"cluster": "c"}})
    return {"name": "t", "virtual_hosts": [{"name": "vh", "domains": ["*"], "routes": routes}]}


@given(
    st.lists(st.sampled_from(_RUN_REGEXES), min_size=1, max_size=10),
    st.sets(st.integers(0, 9)),
    st.lists(
        st.sampled_from(
            [
                b"/api/v1/users",
                b"/api/v12/users",
                b"/abab/c",
                b"/static/a.css",
                b"/x12",
                b"/x1",
                b"/q/health",
                b"/api/v2/users/7",
                b"/cats",
                b"/dog",
                b"/e",
                b"/nothing",
                b"/api/v1/",
                b"/x99?y=1",
            ]
        ),
        min_size=1,
        max_size=8,
    ),
    st.booleans(),
)
def test_regex_runs_pick_the_same_route_as_one_by_one(
    regexes: list[str], header_on: set[int], paths: list[bytes], with_header: bool
) -> None:
    import moorline.proxy.route_table as rt

    cfg = _run_table(regexes, header_on)
    combined = compile_rc(cfg)
    old = rt.REGEX_RUN_MIN
    rt.REGEX_RUN_MIN = 10**9
    try:
        single = compile_rc(cfg)
    finally:
        rt.REGEX_RUN_MIN = old
    if len(regexes) >= old and regexes.count("/x(?P<id>[0-9]{2})") < 2:  # (a name used twice: no run)
        assert any(isinstance(r, rt._RegexRun) for r in combined._default._routes)
    hdrs = [(b"x-v", b"1")] if with_header else []
    for p in paths:
        assert m(combined, p, headers=hdrs) == m(single, p, headers=hdrs), p


def test_regex_runs_are_not_made_where_combining_would_change_meaning() -> None:
    import moorline.proxy.route_table as rt

    # A pattern that only compiles at the start of an expression (an inline global flag) cannot
    # be combined: those routes stay single, and still match.
    cfg = _run_table(["/a", "(?i)/B", "/c", "/d", "/e"], set())
    t = compile_rc(cfg)
    assert not any(isinstance(r, rt._RegexRun) for r in t._default._routes)
    assert m(t, b"/b") == "r1" and m(t, b"/d") == "r3" and m(t, b"/zzz") == "last"
    # Back-references never reach here (RE2 syntax: a config error), so renumbering is moot.
    with pytest.raises(ConfigError):
        compile_rc(_run_table(["/(a)\\1"], set()))


def test_retry_priority_previous_priorities() -> None:
    t = "type.googleapis.com/envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig"
    rp = (
        retry_table(
            '{retry_on: "5xx", retry_priority: {name: envoy.retry_priorities.previous_priorities,'
            f' typed_config: {{"@type": "{t}", update_frequency: 2}}}}}}'
        )
        .match(b"a", b"/own", b"GET", HeaderMap())
        .retry
    )
    assert rp.retry_priority_update_frequency == 2
    with pytest.raises(ConfigError, match="update_frequency"):
        retry_table(f'{{retry_on: "5xx", retry_priority: {{name: x, typed_config: {{"@type": "{t}"}}}}}}')
    with pytest.raises(ConfigError, match="not supported"):
        retry_table('{retry_on: "5xx", retry_priority: {name: other}}')
