"""The RBAC policy engine (moorline/filters/rbac_engine.py) and the HTTP and network RBAC filters,
in memory: Istio's real AuthorizationPolicy output from a sidecar config dump, every permission
and principal shape, the config errors and notices, and the HTTP filter through the real
connection manager (moorline.testing.pair)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from envoy.config.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as net_rbac_pb2

from moorline.config import loader
from moorline.config.context import BuildContext
from moorline.config.errors import ConfigError
from moorline.filters.http import rbac as http_rbac
from moorline.filters.network import rbac as net_rbac
from moorline.filters.rbac_engine import Engine, Facts, denied_details
from moorline.net.conn_info import ConnInfo
from moorline.observability.stats import Store
from moorline.protocol.headers import RequestHeaders
from moorline.testing.fixtures import FIXTURES
from moorline.testing.pair import Pair, bootstrap_yaml

DUMP = FIXTURES / "istio" / "sidecar_configdump_authz.json"
HTTP_TYPE = "type.googleapis.com/" + http_rbac.TYPE
NET_TYPE = "type.googleapis.com/" + net_rbac.TYPE
SLEEP = "spiffe://cluster.local/ns/default/sa/sleep"


# ------------------------------------------------------------------------------ the config dump


def _rbac_filters() -> list[tuple[str, dict[str, Any]]]:
    """Every RBAC filter of the dump's listeners: (JSON path, the filter as written)."""
    doc = json.loads(DUMP.read_text())
    out: list[tuple[str, dict[str, Any]]] = []

    def walk(o: Any, path: str) -> None:
        if isinstance(o, dict):
            if o.get("name") in (http_rbac.NAME, net_rbac.NAME):
                out.append((path, o))
                return
            for k, v in o.items():
                walk(v, f"{path}.{k}")
        elif isinstance(o, list):
            for i, v in enumerate(o):
                walk(v, f"{path}[{i}]")

    walk(doc["configs"], "configs")
    return out


def dump_config(name: str, *, shadow: bool = False) -> dict[str, Any]:
    """The first RBAC typed_config of filter ``name`` in the dump (with or without shadow_rules)."""
    for _, f in _rbac_filters():
        tc = f["typed_config"]
        if f["name"] == name and ("shadow_rules" in tc) == shadow:
            return tc
    raise AssertionError(f"no {name} (shadow={shadow}) in {DUMP}")


def parse(tc: dict[str, Any], cls: Any) -> Any:
    return loader.parse_message({k: v for k, v in tc.items() if k != "@type"}, cls, "typed_config")


def ctx() -> BuildContext:
    return BuildContext(Store())


def conn(
    remote: tuple[str, int] = ("10.1.0.1", 50000),
    local: tuple[str, int] = ("10.0.0.1", 8080),
    sans: list[tuple[str, str]] | None = None,
    subject: tuple[Any, ...] = ((("commonName", "client"),),),
    sni: str | None = None,
) -> ConnInfo:
    info = ConnInfo(local, remote, "l")
    if sans is not None:
        info.peer_certificate = {"subject": subject, "subjectAltName": tuple(sans)}
        info.tls = object()
    info.server_name = sni
    return info


def req(method: str = "GET", path: str = "/", headers: list[tuple[str, str]] | None = None) -> RequestHeaders:
    return RequestHeaders(
        method.encode(), path.encode(), b"svc", b"http", [(k.encode(), v.encode()) for k, v in headers or []]
    )


def engine(rules: dict[str, Any], http: bool = True, notices: list[str] | None = None) -> Engine:
    msg = loader.parse_message(rules, rbac_pb2.RBAC, "rules")
    sink = notices if notices is not None else []
    return Engine.compile(msg, "rules", lambda p, m: sink.append(f"{p}: {m}"), http=http)


def allow(permission: dict[str, Any], principal: dict[str, Any] | None = None, **kw: Any) -> Engine:
    return engine(
        {
            "action": "ALLOW",
            "policies": {"p": {"permissions": [permission], "principals": [principal or {"any": True}]}},
        },
        **kw,
    )


def test_every_rbac_config_in_the_dump_compiles() -> None:
    found = _rbac_filters()
    assert len(found) == 13
    for path, f in found:
        c = ctx()
        tc = f["typed_config"]
        if f["name"] == http_rbac.NAME:
            assert tc["@type"] == HTTP_TYPE
            make = http_rbac._factory(parse(tc, http_rbac_pb2.RBAC), c, path, stat_prefix="http.inbound.")
            assert callable(make)
        else:
            assert tc["@type"] == NET_TYPE
            assert isinstance(net_rbac._factory(parse(tc, net_rbac_pb2.RBAC), c, path), net_rbac.NetworkRbac)
        # The JWT-claims metadata matchers Istio writes are announced, never silently dropped.
        for n in c.notices:
            assert n.path.startswith(path) and "never matches" in n.message


def test_istio_allow_policy_needs_peer_identity_method_path_and_jwt_claims() -> None:
    """ns[default]-policy[httpbin]: (GET /info* or POST /data) from sleep (or any ns/test
    identity) with a Google-issued JWT. moorline has no JWT authentication, so the claims
    (dynamic metadata) are never present: Envoy with no jwt_authn filter denies as well."""
    msg = parse(dump_config(http_rbac.NAME), http_rbac_pb2.RBAC)
    eng = Engine.compile(msg.rules, "rules", lambda p, m: None, http=True)
    assert [p.name for p in eng.policies] == ["ns[default]-policy[httpbin]-rule[0]"]
    pol = eng.policies[0]
    sleep = conn(sans=[("URI", SLEEP)])
    test_ns = conn(sans=[("URI", "spiffe://cluster.local/ns/test/sa/x")])
    other = conn(sans=[("URI", "spiffe://cluster.local/ns/prod/sa/x")])

    def perm(f: Facts) -> bool:
        return any(p.match(f) for p in pol.permissions)

    assert perm(Facts(sleep, req("GET", "/info")))
    assert perm(Facts(sleep, req("GET", "/info/more?x=1")))
    assert perm(Facts(sleep, req("POST", "/data")))
    assert perm(Facts(sleep, req("POST", "/data?q")))  # the query is not part of url_path
    assert not perm(Facts(sleep, req("GET", "/data")))
    assert not perm(Facts(sleep, req("POST", "/data/x")))
    assert not perm(Facts(sleep, req("PUT", "/info")))
    # The peer-principal half of each principal (filter state io.istio.peer_principal).
    for principal, ok in ((sleep, True), (test_ns, True), (other, False), (conn(), False)):
        facts = Facts(principal, req("GET", "/info"))
        peer_half = [p.items[0] for p in pol.principals]  # and_ids[0] = or_ids(filter_state)
        assert any(m.match(facts) for m in peer_half) is ok
    # Whole policy: the JWT half never matches, so everything is denied, naming no policy.
    assert eng.evaluate(Facts(sleep, req("GET", "/info"))) == (False, None)


def test_istio_shadow_deny_policy_never_matches_without_jwt_claims() -> None:
    msg = parse(dump_config(http_rbac.NAME, shadow=True), http_rbac_pb2.RBAC)
    assert not msg.HasField("rules")
    eng = Engine.compile(msg.shadow_rules, "shadow_rules", lambda p, m: None, http=True)
    assert eng.evaluate(Facts(conn(sans=[("URI", SLEEP)]), req("GET", "/info"))) == (True, None)


def test_istio_network_rbac_with_empty_rules_refuses_every_connection() -> None:
    c = ctx()
    f = net_rbac._factory(parse(dump_config(net_rbac.NAME), net_rbac_pb2.RBAC), c, "f")
    assert not f.on_new_connection(conn())
    assert not f.on_new_connection(conn(sans=[("URI", SLEEP)]))
    assert c.stats.get("tcp.rbac.denied").value == 2  # type: ignore[union-attr]
    assert c.stats.get("tcp.rbac.allowed").value == 0  # type: ignore[union-attr]
    # Istio's dry-run prefix names the (absent) shadow counters.
    assert c.stats.get("tcp.rbac.istio_dry_run_allow_shadow_allowed") is not None


# ------------------------------------------------------------------------------ policy shapes


def test_action_allow_deny_log_and_policy_order() -> None:
    rules = {
        "policies": {
            "b-admin": {
                "permissions": [{"url_path": {"path": {"prefix": "/admin"}}}],
                "principals": [{"any": True}],
            },
            "a-all": {"permissions": [{"any": True}], "principals": [{"any": True}]},
        }
    }
    f = Facts(conn(), req("GET", "/admin"))
    # Policies are tried in name order: "a-all" is the one reported.
    assert engine({"action": "ALLOW", **rules}).evaluate(f) == (True, "a-all")
    assert engine({"action": "DENY", **rules}).evaluate(f) == (False, "a-all")
    notes: list[str] = []
    assert engine({"action": "LOG", **rules}, notices=notes).evaluate(f) == (True, "a-all")
    assert any("LOG" in n for n in notes)
    # No policies: ALLOW refuses everything, DENY lets everything through.
    assert engine({"action": "ALLOW"}).evaluate(f) == (False, None)
    assert engine({"action": "DENY"}).evaluate(f) == (True, None)


def test_permission_needs_matching_principal_too() -> None:
    eng = allow({"any": True}, {"direct_remote_ip": {"address_prefix": "10.1.0.0", "prefix_len": 16}})
    assert eng.evaluate(Facts(conn(remote=("10.1.2.3", 1)), req()))[0]
    assert not eng.evaluate(Facts(conn(remote=("10.2.0.1", 1)), req()))[0]


@pytest.mark.parametrize("field", ["source_ip", "direct_remote_ip", "remote_ip"])
def test_source_address_principals(field: str) -> None:
    eng = allow({"any": True}, {field: {"address_prefix": "192.168.7.0", "prefix_len": 24}})
    assert eng.evaluate(Facts(conn(remote=("192.168.7.200", 1))))[0]
    assert eng.evaluate(Facts(conn(remote=("::ffff:192.168.7.1", 1))))[0]  # v4-mapped
    assert not eng.evaluate(Facts(conn(remote=("192.168.8.1", 1))))[0]
    assert not eng.evaluate(Facts(conn(remote=("2001:db8::1", 1))))[0]
    single = allow({"any": True}, {field: {"address_prefix": "2001:db8::1"}})  # no prefix_len: one host
    assert single.evaluate(Facts(conn(remote=("2001:db8::1", 1))))[0]
    assert not single.evaluate(Facts(conn(remote=("2001:db8::2", 1))))[0]


def test_destination_ip_port_and_range() -> None:
    f = Facts(conn(local=("10.0.0.9", 8080)))
    assert allow({"destination_ip": {"address_prefix": "10.0.0.0", "prefix_len": 8}}).evaluate(f)[0]
    assert not allow({"destination_ip": {"address_prefix": "10.0.1.0", "prefix_len": 24}}).evaluate(f)[0]
    assert allow({"destination_port": 8080}).evaluate(f)[0]
    assert not allow({"destination_port": 8081}).evaluate(f)[0]
    assert allow({"destination_port_range": {"start": 8000, "end": 8081}}).evaluate(f)[0]
    assert not allow({"destination_port_range": {"start": 8000, "end": 8080}}).evaluate(f)[0]  # end exclusive
    # A Unix pipe has no address or port: nothing matches.
    pipe = Facts(ConnInfo("/tmp/s", "", "l"))
    assert not allow({"destination_port": 8080}).evaluate(pipe)[0]
    assert not allow({"any": True}, {"source_ip": {"address_prefix": "0.0.0.0", "prefix_len": 0}}).evaluate(
        pipe
    )[0]


def test_requested_server_name() -> None:
    eng = allow({"requested_server_name": {"suffix": ".example.com"}})
    assert eng.evaluate(Facts(conn(sni="api.example.com")))[0]
    assert not eng.evaluate(Facts(conn(sni="api.example.org")))[0]
    assert not eng.evaluate(Facts(conn()))[0]


def test_and_or_not_rules_and_ids() -> None:
    perm = {
        "and_rules": {
            "rules": [
                {
                    "or_rules": {
                        "rules": [
                            {"header": {"name": ":method", "exact_match": "GET"}},
                            {"destination_port": 1},
                        ]
                    }
                },
                {"not_rule": {"url_path": {"path": {"prefix": "/private"}}}},
            ]
        }
    }
    prin = {
        "or_ids": {
            "ids": [{"not_id": {"any": True}}, {"and_ids": {"ids": [{"any": True}, {"authenticated": {}}]}}]
        }
    }
    eng = allow(perm, prin)
    tls = conn(sans=[("URI", SLEEP)])
    assert eng.evaluate(Facts(tls, req("GET", "/public")))[0]
    assert not eng.evaluate(Facts(tls, req("GET", "/private/x")))[0]
    assert not eng.evaluate(Facts(tls, req("POST", "/public")))[0]
    assert not eng.evaluate(Facts(conn(), req("GET", "/public")))[0]  # no certificate


def test_header_permission_and_principal() -> None:
    eng = allow(
        {"header": {"name": "x-tenant", "string_match": {"exact": "blue"}}},
        {"header": {"name": "user-agent", "present_match": True}},
    )
    assert eng.evaluate(Facts(conn(), req(headers=[("x-tenant", "blue"), ("user-agent", "c")])))[0]
    assert not eng.evaluate(Facts(conn(), req(headers=[("x-tenant", "red"), ("user-agent", "c")])))[0]
    assert not eng.evaluate(Facts(conn(), req(headers=[("x-tenant", "blue")])))[0]
    # Several values are joined with "," before matching, as Envoy does.
    joined = allow({"header": {"name": "x-a", "string_match": {"exact": "1,2"}}})
    assert joined.evaluate(Facts(conn(), req(headers=[("x-a", "1"), ("x-a", "2")])))[0]


def test_url_path_ignores_query_and_fragment() -> None:
    eng = allow({"url_path": {"path": {"exact": "/a/b"}}})
    assert eng.evaluate(Facts(conn(), req(path="/a/b?c=d")))[0]
    assert eng.evaluate(Facts(conn(), req(path="/a/b#frag")))[0]
    assert not eng.evaluate(Facts(conn(), req(path="/a/b/c")))[0]
    ic = allow({"url_path": {"path": {"prefix": "/API", "ignore_case": True}}})
    assert ic.evaluate(Facts(conn(), req(path="/api/v1")))[0]


def test_authenticated_principal_uri_dns_then_subject() -> None:
    by_uri = allow({"any": True}, {"authenticated": {"principal_name": {"exact": SLEEP}}})
    assert by_uri.evaluate(Facts(conn(sans=[("DNS", "x.local"), ("URI", SLEEP)])))[0]
    assert not by_uri.evaluate(Facts(conn(sans=[("URI", SLEEP + "2")])))[0]
    assert not by_uri.evaluate(Facts(conn()))[0]  # plain TCP: never authenticated
    by_dns = allow({"any": True}, {"authenticated": {"principal_name": {"suffix": ".svc.local"}}})
    assert by_dns.evaluate(Facts(conn(sans=[("DNS", "a.svc.local")])))[0]
    subject = ((("countryName", "US"),), (("organizationName", "Acme"),), (("commonName", "bob"),))
    by_subject = allow({"any": True}, {"authenticated": {"principal_name": {"exact": "CN=bob,O=Acme,C=US"}}})
    assert by_subject.evaluate(Facts(conn(sans=[], subject=subject)))[0]
    # No principal_name: any TLS connection, with or without a client certificate (Envoy).
    any_tls = allow({"any": True}, {"authenticated": {}})
    assert any_tls.evaluate(Facts(conn(sans=[])))[0]
    no_cert = conn()
    no_cert.tls = object()
    assert any_tls.evaluate(Facts(no_cert))[0]
    assert not any_tls.evaluate(Facts(conn()))[0]  # plain TCP


def test_metadata_and_unknown_filter_state_never_match_with_a_notice() -> None:
    notes: list[str] = []
    md = {"filter": "istio_authn", "path": [{"key": "k"}], "value": {"string_match": {"exact": "v"}}}
    assert not allow({"metadata": md}, notices=notes).evaluate(Facts(conn()))[0]
    assert allow({"metadata": {**md, "invert": True}}, notices=notes).evaluate(Facts(conn()))[0]
    fs = {"filter_state": {"key": "some.other.key", "string_match": {"exact": "v"}}}
    assert not allow({"any": True}, fs, notices=notes).evaluate(Facts(conn(sans=[("URI", "v")])))[0]
    assert len(notes) == 3
    assert notes[0].startswith("rules.policies['p'].permissions[0].metadata: ")
    assert "some.other.key" in notes[2]


def test_network_filter_header_and_path_rules_see_no_request() -> None:
    notes: list[str] = []
    eng = allow({"url_path": {"path": {"prefix": "/"}}}, http=False, notices=notes)
    assert not eng.evaluate(Facts(conn()))[0]
    absent = allow({"header": {"name": "x", "present_match": False}}, http=False, notices=notes)
    assert absent.evaluate(Facts(conn()))[0]  # a missing header, as in Envoy
    assert len(notes) == 2 and all("network filter" in n for n in notes)


def test_denied_details() -> None:
    assert denied_details(None) == "rbac_access_denied_matched_policy[none]"
    assert denied_details("deny all") == "rbac_access_denied_matched_policy[deny_all]"
    assert denied_details("a\tb  c") == "rbac_access_denied_matched_policy[a_b__c]"


@pytest.mark.parametrize(
    ("rules", "path"),
    [
        (
            {"policies": {"p": {"permissions": [{"any": True}], "principals": [{"any": True}], "condition": {"ident_expr": {"name": "x"}}}}},
            "rules.policies['p'].condition",
        ),
        ({"policies": {"p": {"permissions": [{"any": True}], "principals": []}}}, "rules.policies['p'].principals"),
        ({"policies": {"p": {"permissions": [], "principals": [{"any": True}]}}}, "rules.policies['p'].permissions"),
        ({"policies": {"p": {"permissions": [{"any": False}], "principals": [{"any": True}]}}}, "rules.policies['p'].permissions[0].any"),
        ({"policies": {"p": {"permissions": [{"and_rules": {"rules": []}}], "principals": [{"any": True}]}}}, "rules.policies['p'].permissions[0].and_rules.rules"),
        (
            {"policies": {"p": {"permissions": [{"uri_template": {"name": "t"}}], "principals": [{"any": True}]}}},
            "rules.policies['p'].permissions[0].uri_template",
        ),
        (
            {"policies": {"p": {"permissions": [{"matcher": {"name": "m"}}], "principals": [{"any": True}]}}},
            "rules.policies['p'].permissions[0].matcher",
        ),
        (
            {"policies": {"p": {"permissions": [{"any": True}], "principals": [{"custom": {"name": "c"}}]}}},
            "rules.policies['p'].principals[0].custom",
        ),
        (
            {"policies": {"p": {"permissions": [{"any": True}], "principals": [{"remote_ip": {"address_prefix": "10.0.0.300"}}]}}},
            "rules.policies['p'].principals[0].remote_ip.address_prefix",
        ),
        (
            {"policies": {"p": {"permissions": [{"destination_ip": {"address_prefix": "10.0.0.0", "prefix_len": 33}}], "principals": [{"any": True}]}}},
            "rules.policies['p'].permissions[0].destination_ip.prefix_len",
        ),
        (
            {"policies": {"p": {"permissions": [{"destination_port_range": {"start": 9, "end": 2}}], "principals": [{"any": True}]}}},
            "rules.policies['p'].permissions[0].destination_port_range",
        ),
        ({"policies": {"p": {"permissions": [{}], "principals": [{"any": True}]}}}, "rules.policies['p'].permissions[0]"),
    ],
)  # fmt: skip
def test_config_errors_name_the_field(rules: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError) as ei:
        engine(rules)
    assert ei.value.path == path


def test_filter_level_config_errors_and_notices() -> None:
    with pytest.raises(ConfigError) as ei:
        http_rbac._factory(parse({"matcher": {"matcher_list": {}}}, http_rbac_pb2.RBAC), ctx(), "f")
    assert ei.value.path == "f.typed_config.matcher"
    with pytest.raises(ConfigError) as ei:
        net_rbac._factory(parse({"rules": {}}, net_rbac_pb2.RBAC), ctx(), "f")
    assert ei.value.path == "f.typed_config.stat_prefix"
    c = ctx()
    net_rbac._factory(
        parse({"stat_prefix": "x", "enforcement_type": "CONTINUOUS", "delay_deny": "1s"}, net_rbac_pb2.RBAC),
        c,
        "f",
    )
    assert {n.path for n in c.notices} == {"f.typed_config.enforcement_type", "f.typed_config.delay_deny"}
    c = ctx()
    http_rbac._factory(parse({"track_per_rule_stats": True}, http_rbac_pb2.RBAC), c, "f")
    assert [n.path for n in c.notices] == ["f.typed_config.track_per_rule_stats"]
    # Per route, what would be a notice is refused (the route table has no notice channel here).
    per_route = loader.parse_message(
        {"rbac": {"rules": {"action": "LOG"}}}, http_rbac_pb2.RBACPerRoute, "tpfc"
    )
    with pytest.raises(ConfigError) as ei:
        http_rbac._per_route(per_route, "tpfc")
    assert ei.value.path == "tpfc.rbac.rules.action"


def test_network_filter_stats_shadow_and_rules() -> None:
    c = ctx()
    cfg = parse(
        {
            "stat_prefix": "inbound",
            "shadow_rules_stat_prefix": "dry_",
            "rules": {"action": "DENY", "policies": {"no-10": {"permissions": [{"any": True}], "principals": [{"source_ip": {"address_prefix": "10.0.0.0", "prefix_len": 8}}]}}},
            "shadow_rules": {"policies": {"only-sleep": {"permissions": [{"any": True}], "principals": [{"authenticated": {"principal_name": {"exact": SLEEP}}}]}}},
        },
        net_rbac_pb2.RBAC,
    )  # fmt: skip
    f = net_rbac._factory(cfg, c, "f")
    assert f.on_new_connection(conn(remote=("192.0.2.1", 1), sans=[("URI", SLEEP)]))
    assert not f.on_new_connection(conn(remote=("10.9.9.9", 1)))

    def stat(name: str) -> int:
        s = c.stats.get(f"inbound.rbac.{name}")
        assert s is not None, name
        return int(s.value)

    assert (stat("allowed"), stat("denied")) == (1, 1)
    assert (stat("dry_shadow_allowed"), stat("dry_shadow_denied")) == (1, 1)


def test_connection_filters_run_in_order_and_stop_at_the_first_refusal() -> None:
    calls: list[str] = []

    class F:
        terminal = False

        def __init__(self, name: str, ok: bool) -> None:
            self.name = name
            self.ok = ok

        def on_new_connection(self, info: Any) -> bool:
            calls.append(self.name)
            return self.ok

    info = conn()
    assert info.admit()  # no filters
    info.filters = (F("a", True), F("b", False), F("c", True))
    assert not info.admit()
    assert calls == ["a", "b"]


# ------------------------------------------------------------------------------ through the HCM


def _pair(http_rbac_configs: list[dict[str, Any]], routes: list[dict[str, Any]] | None = None) -> Pair:
    filters = [{"name": http_rbac.NAME, "typed_config": tc} for tc in http_rbac_configs]
    return Pair(bootstrap_yaml(routes=routes, http_filters=filters))


def _policy(perm: dict[str, Any], prin: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"permissions": [perm], "principals": [prin or {"any": True}]}


def test_http_filter_denies_with_403_and_details_before_the_upstream() -> None:
    tc = {
        "@type": HTTP_TYPE,
        "rules": {
            "action": "DENY",
            "policies": {"no debug": _policy({"header": {"name": "x-debug", "present_match": True}})},
        },
    }
    p = _pair([tc])
    d = p.connect()
    d.request("GET", "/x", headers=[("x-debug", "1")])
    r = d.response()
    assert r.status == 403
    assert r.body == b"RBAC: access denied"
    assert not p.upstream.attempts  # never reached the upstream
    assert p.access_log.entries[-1].response_code_details == "rbac_access_denied_matched_policy[no_debug]"
    assert p.http("rbac.denied") == 1 and p.http("rbac.allowed") == 0
    d.request("GET", "/x")
    assert len(p.upstream.attempts) == 1  # allowed: the router asks the pool for a connection
    assert p.http("rbac.allowed") == 1


def test_http_filter_fixture_policies_deny_and_count_shadow() -> None:
    """The dump's two HTTP RBAC filters as Istio wrote them: the ALLOW rules deny (no JWT claims),
    the ext-authz shadow rules are counted under their own prefix and never enforced."""
    p = _pair([dump_config(http_rbac.NAME, shadow=True), dump_config(http_rbac.NAME)])
    d = p.connect()
    d.info.peer_certificate = {"subjectAltName": (("URI", SLEEP),)}
    d.request("GET", "/info")
    r = d.response()
    assert r.status == 403 and r.body == b"RBAC: access denied"
    assert p.access_log.entries[-1].response_code_details == "rbac_access_denied_matched_policy[none]"
    assert p.http("rbac.denied") == 1
    assert p.http("rbac.istio_ext_authz_shadow_allowed") == 1
    assert p.http("rbac.istio_ext_authz_shadow_denied") == 0


def test_http_filter_per_route_override_and_disable() -> None:
    deny_all = {"@type": HTTP_TYPE, "rules": {"action": "ALLOW"}}
    per_route_type = "type.googleapis.com/" + http_rbac.PER_ROUTE_TYPE
    routes = [
        {
            "match": {"prefix": "/open"},
            "route": {"cluster": "be"},
            "typed_per_filter_config": {http_rbac.NAME: {"@type": per_route_type}},
        },
        {
            "match": {"prefix": "/get-only"},
            "route": {"cluster": "be"},
            "typed_per_filter_config": {
                http_rbac.NAME: {
                    "@type": per_route_type,
                    "rbac": {
                        "rules": {
                            "policies": {
                                "get": _policy({"header": {"name": ":method", "exact_match": "GET"}})
                            }
                        }
                    },
                }
            },
        },
        {"match": {"prefix": "/"}, "route": {"cluster": "be"}},
    ]
    p = _pair([deny_all], routes)
    d = p.connect()
    d.request("GET", "/closed")
    assert d.response().status == 403
    d.request("POST", "/get-only", body=b"x")
    assert d.response().status == 403
    assert p.http("rbac.denied") == 2
    d2 = p.connect()
    d2.request("GET", "/open")
    assert len(p.upstream.attempts) == 1  # the filter is off on this route: nothing counted
    assert p.http("rbac.allowed") == 0
    d3 = p.connect()
    d3.request("GET", "/get-only")
    assert len(p.upstream.attempts) == 2
    assert p.http("rbac.allowed") == 1


def test_http_denial_with_a_body_keeps_the_connection_in_step() -> None:
    """A denied POST's body is never taken for a request of its own: the denial closes the
    connection (``connection: close``), and nothing sent after it reaches the upstream."""
    tc = {
        "@type": HTTP_TYPE,
        "rules": {"policies": {"get": _policy({"header": {"name": ":method", "exact_match": "GET"}})}},
    }
    p = _pair([tc])
    d = p.connect()
    d.request("POST", "/x", body=b"GET /smuggled HTTP/1.1\r\nhost: a\r\n\r\n")
    r = d.response()
    assert r.status == 403 and r.header("connection") == b"close"
    d.request("GET", "/next")
    assert d.responses() == []
    assert not p.upstream.attempts
    assert p.http("downstream_rq_total") == 1
    assert (p.http("rbac.denied"), p.http("rbac.allowed")) == (1, 0)
