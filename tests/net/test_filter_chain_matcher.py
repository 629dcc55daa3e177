"""``Listener.filter_chain_matcher`` (Envoy's unified matcher API): compiled selection in memory,
Istio's real listeners from config dumps, and one end-to-end run with curl against moorline."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from envoy.config.listener.v3 import listener_pb2

from moorline.config import registry
from moorline.config.context import BuildContext
from moorline.config.errors import ConfigError
from moorline.config.loader import parse_message
from moorline.net import filter_chain as fc_mod
from moorline.net.filter_chain import FilterChainMatcherSelector, FilterChainSelector, compile_filter_chains
from moorline.observability.stats import Store
from moorline.testing.procs import bootstrap, free_port, start_moorline

FIXTURES = Path("/work/shared/fixtures/istio")
NET = "type.googleapis.com/envoy.extensions.matching.common_inputs.network.v3."
SV = "type.googleapis.com/google.protobuf.StringValue"
IP_TRIE = "type.googleapis.com/xds.type.matcher.v3.IPMatcher"
IP_INPUT_MATCHER = "type.googleapis.com/envoy.extensions.matching.input_matchers.ip.v3.Ip"


class Terminal:
    terminal = True

    def on_accept(self, sock: Any, info: Any) -> None:  # pragma: no cover - not used here
        sock.close()


registry.register("network", ["test.fcm.terminal"], [], lambda cfg, ctx, path: Terminal())
T = [{"name": "test.fcm.terminal"}]


# --- helpers -----------------------------------------------------------------------------------


def act(name: str) -> dict[str, Any]:
    return {"action": {"name": name, "typed_config": {"@type": SV, "value": name}}}


def inp(kind: str) -> dict[str, Any]:
    return {"name": kind, "typed_config": {"@type": NET + kind}}


def sub(matcher: dict[str, Any]) -> dict[str, Any]:
    return {"matcher": matcher}


def exact(kind: str, table: dict[str, Any], on_no_match: Any = None) -> dict[str, Any]:
    m: dict[str, Any] = {"matcher_tree": {"input": inp(kind), "exact_match_map": {"map": table}}}
    if on_no_match is not None:
        m["on_no_match"] = on_no_match
    return m


def prefix(kind: str, table: dict[str, Any], on_no_match: Any = None) -> dict[str, Any]:
    m: dict[str, Any] = {"matcher_tree": {"input": inp(kind), "prefix_match_map": {"map": table}}}
    if on_no_match is not None:
        m["on_no_match"] = on_no_match
    return m


def cidr(p: str) -> dict[str, Any]:
    a, n = p.split("/")
    return {"address_prefix": a, "prefix_len": int(n)}


def ip_tree(kind: str, ranges: list[tuple[list[str], Any, bool]], on_no_match: Any = None) -> dict[str, Any]:
    rms = [{"ranges": [cidr(r) for r in rs], "on_match": om, "exclusive": ex} for rs, om, ex in ranges]
    m: dict[str, Any] = {
        "matcher_tree": {
            "input": inp(kind),
            "custom_match": {"name": "ip", "typed_config": {"@type": IP_TRIE, "range_matchers": rms}},
        }
    }
    if on_no_match is not None:
        m["on_no_match"] = on_no_match
    return m


def single(kind: str, **matcher: Any) -> dict[str, Any]:
    return {"single_predicate": {"input": inp(kind), **matcher}}


def in_cidrs(kind: str, *ranges: str) -> dict[str, Any]:
    cm = {"name": "ip", "typed_config": {"@type": IP_INPUT_MATCHER, "cidr_ranges": [cidr(r) for r in ranges]}}
    return single(kind, custom_match=cm)


def mlist(items: list[tuple[dict[str, Any], Any]], on_no_match: Any = None) -> dict[str, Any]:
    m: dict[str, Any] = {"matcher_list": {"matchers": [{"predicate": p, "on_match": om} for p, om in items]}}
    if on_no_match is not None:
        m["on_no_match"] = on_no_match
    return m


def compile_m(
    matcher: dict[str, Any],
    names: tuple[str, ...] = ("a", "b", "c", "d"),
    default: bool = False,
    c: BuildContext | None = None,
    chains: list[dict[str, Any]] | None = None,
) -> FilterChainSelector:
    d: dict[str, Any] = {
        "name": "l",
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": 0}},
        "filter_chains": chains if chains is not None else [{"name": n, "filters": T} for n in names],
        "filter_chain_matcher": matcher,
    }
    if default:
        d["default_filter_chain"] = {"name": "dflt", "filters": T}
    proto = parse_message(d, listener_pb2.Listener, "listeners[0]")
    return compile_filter_chains(proto, c or BuildContext(stats=Store()), "listeners[0]")


def pick(
    sel: FilterChainSelector,
    dst: str | None = "10.0.0.1",
    dport: int | None = 80,
    src: str | None = "192.168.1.1",
    sport: int | None = 5555,
    sni: str | None = None,
    transport: str = "raw_buffer",
    alpn: list[str] | None = None,
) -> str | None:
    fc = sel.select(dst, dport, src, sport, sni, transport, alpn)
    return None if fc is None else fc.name


def config_error(matcher: dict[str, Any], **kw: Any) -> ConfigError:
    with pytest.raises(ConfigError) as ei:
        compile_m(matcher, **kw)
    return ei.value


# --- Istio's listeners from real config dumps ---------------------------------------------------


def _dump_listener(fixture: str, name: str) -> dict[str, Any]:
    doc = json.loads((FIXTURES / fixture).read_text())
    for cfg in doc["configs"]:
        for dl in cfg.get("dynamic_listeners", ()):
            lst = dl.get("active_state", {}).get("listener", {})
            if lst.get("name") == name and "filter_chain_matcher" in lst:
                return lst
    raise AssertionError(f"{name} with a filter_chain_matcher not in {fixture}")


def _with_test_chains(lst: dict[str, Any]) -> dict[str, Any]:
    """The dump's listener with its matcher and chain names as they are; each chain's filters
    become a test terminal (the real ones need RDS and Istio's filters, not under test here)."""
    out = {
        k: v for k, v in lst.items() if k not in ("filter_chains", "internal_listener", "listener_filters")
    }
    out["address"] = {"socket_address": {"address": "127.0.0.1", "port_value": 0}}
    out["filter_chains"] = [
        {"name": c["name"], "filter_chain_match": c.get("filter_chain_match", {}), "filters": T}
        for c in lst["filter_chains"]
    ]
    return out


def test_istio_main_internal_listener_from_the_full_dump() -> None:
    lst = _dump_listener("sidecar_config_dump_full.json", "main_internal")
    proto = parse_message(_with_test_chains(lst), listener_pb2.Listener, "listeners[0]")
    sel = compile_filter_chains(proto, BuildContext(stats=Store()), "listeners[0]")
    assert isinstance(sel, FilterChainMatcherSelector)
    vip = "10.104.171.68"
    # destination IP (IP trie) -> destination port (exact map)
    assert pick(sel, vip, 8000) == "inbound-vip|8000||httpbin.default.svc.cluster.local-http"
    assert pick(sel, vip, 8100) == "inbound-vip|8100||httpbin.default.svc.cluster.local-http"
    assert pick(sel, vip, 8080) is None  # no such port, no on_no_match, no default chain
    pod = "192.168.195.248"
    # destination IP -> ALPN as Envoy renders it ('h2c'), on_no_match -> the TCP chain
    assert pick(sel, pod, 9080, alpn=["h2c"]) == "direct-http"
    assert pick(sel, pod, 9080, alpn=["http/1.1"]) == "direct-http"
    assert pick(sel, pod, 9080, alpn=["h2", "http/1.1"]) == "direct-tcp"
    assert pick(sel, pod, 9080) == "direct-tcp"
    assert pick(sel, "10.104.171.69", 8000) is None
    assert pick(sel, None, None, None, None) is None  # a pipe: no IP at all


def test_istio_dump_with_actions_naming_missing_chains_loads_and_closes_those_connections() -> None:
    # This dump's main_internal keeps only one of the chains its matcher names: as in Envoy, the
    # listener loads (with a notice per missing name) and a connection matching such an action
    # is closed rather than given the default chain.
    lst = _dump_listener("sidecar_configdump_compare.json", "main_internal")
    proto = parse_message(_with_test_chains(lst), listener_pb2.Listener, "listeners[0]")
    ctx = BuildContext(stats=Store())
    sel = compile_filter_chains(proto, ctx, "listeners[0]")
    missing = [n for n in ctx.notices if "no filter chain named" in n]
    assert missing and any("inbound-vip|80||sleep.default.svc.cluster.local-http" in n for n in missing)
    assert missing[0].path.endswith(".action.typed_config.value")
    assert all("connections matching it are closed" in n for n in missing)
    assert sel.chains  # (it compiled)


def _virtual_inbound() -> dict[str, Any]:
    """The shape of Istio's virtualInbound matcher: port first, then TLS + ALPN, then plaintext."""
    by_transport = exact(
        "TransportProtocolInput",
        {
            "tls": sub(
                prefix(
                    "ApplicationProtocolInput",
                    {"'istio-peer-exchange'": act("mtls-peer"), "'istio'": act("mtls")},
                    on_no_match=act("tls-passthrough"),
                )
            ),
            "raw_buffer": act("plaintext"),
        },
    )
    return exact(
        "DestinationPortInput",
        {
            "8080": sub(
                mlist([(in_cidrs("SourceIPInput", "10.0.0.0/8"), act("port8080-mesh"))], act("port8080"))
            )
        },
        on_no_match=sub(by_transport),
    )


def test_virtual_inbound_shaped_matcher() -> None:
    names = ("port8080-mesh", "port8080", "mtls-peer", "mtls", "tls-passthrough", "plaintext")
    sel = compile_m(_virtual_inbound(), names)
    assert pick(sel, dport=8080, src="10.1.2.3") == "port8080-mesh"
    assert pick(sel, dport=8080, src="192.168.0.1") == "port8080"
    peer = ["istio-peer-exchange", "istio"]
    assert pick(sel, dport=9080, transport="tls", alpn=peer) == "mtls-peer"
    assert pick(sel, dport=9080, transport="tls", alpn=["istio", "h2"]) == "mtls"
    assert pick(sel, dport=9080, transport="tls", alpn=["h2"]) == "tls-passthrough"
    assert pick(sel, dport=9080, transport="tls") == "tls-passthrough"
    assert pick(sel, dport=9080) == "plaintext"


# --- inputs -------------------------------------------------------------------------------------


def test_every_network_input() -> None:
    def one(kind: str, key: str, **conn: Any) -> tuple[str | None, str | None]:
        sel = compile_m(exact(kind, {key: act("a")}, on_no_match=act("b")))
        return pick(sel, **conn), pick(sel)

    assert one("DestinationIPInput", "10.9.9.9", dst="10.9.9.9") == ("a", "b")
    assert one("DestinationIPInput", "fe80::1", dst="fe80::1%eth0") == ("a", "b")  # scope id dropped
    assert one("DestinationPortInput", "8443", dport=8443) == ("a", "b")
    assert one("SourceIPInput", "172.16.0.5", src="172.16.0.5") == ("a", "b")
    assert one("SourcePortInput", "40000", sport=40000) == ("a", "b")
    assert one("DirectSourceIPInput", "172.16.0.6", src="172.16.0.6") == ("a", "b")
    assert one("ServerNameInput", "api.example.com", sni="api.example.com") == ("a", "b")
    assert one("TransportProtocolInput", "tls", transport="tls") == ("a", "b")
    assert one("TransportProtocolInput", "raw_buffer") == ("a", "a")
    # ALPN: every offered protocol, quoted, comma separated, in the client's order
    assert one("ApplicationProtocolInput", "'h2','http/1.1'", alpn=["h2", "http/1.1"]) == ("a", "b")
    assert one("ApplicationProtocolInput", "'http/1.1','h2'", alpn=["h2", "http/1.1"]) == ("b", "b")
    # SourceTypeInput: "local" for loopback or same IP, no value otherwise
    src_type = compile_m(exact("SourceTypeInput", {"local": act("a")}, on_no_match=act("b")))
    assert pick(src_type, src="127.0.0.9") == "a"
    assert pick(src_type, src="::1", dst="::1") == "a"
    assert pick(src_type, src="10.0.0.1", dst="10.0.0.1") == "a"
    assert pick(src_type, src="10.0.0.2", dst="10.0.0.1") == "b"
    assert pick(src_type, None, None, None, None) == "a"  # a pipe is local
    # No value is not the empty string: the predicate on "" does not hold for an external source.
    empty = compile_m(mlist([(single("SourceTypeInput", value_match={"exact": ""}), act("a"))], act("b")))
    assert pick(empty, src="10.0.0.2") == "b"


def test_inputs_without_a_value_take_on_no_match() -> None:
    sel = compile_m(exact("ServerNameInput", {"x": act("a")}, on_no_match=act("b")))
    assert pick(sel, sni=None) == "b"
    assert pick(sel, sni="") == "b"
    port = compile_m(exact("DestinationPortInput", {"80": act("a")}, on_no_match=act("b")))
    assert pick(port, None, None, None, None) == "b"


def test_filter_state_input_is_announced_and_never_matches() -> None:
    c = BuildContext(stats=Store())
    fs = {"name": "fs", "typed_config": {"@type": NET + "FilterStateInput", "key": "k"}}
    m = {"matcher_tree": {"input": fs, "exact_match_map": {"map": {"v": act("a")}}}, "on_no_match": act("b")}
    sel = compile_m(m, c=c)
    assert pick(sel) == "b"
    assert any(
        n.startswith("listeners[0].filter_chain_matcher.matcher_tree.input: FilterStateInput")
        for n in c.notices
    ), c.notices
    lst = compile_m(
        mlist([({"single_predicate": {"input": fs, "value_match": {"prefix": "v"}}}, act("a"))], act("c"))
    )
    assert pick(lst) == "c"


# --- trees ----------------------------------------------------------------------------------------


def test_exact_map_nested_miss_falls_to_its_on_no_match() -> None:
    m = exact(
        "DestinationPortInput",
        {"443": sub(exact("ServerNameInput", {"a.example": act("a")}))},
        on_no_match=act("b"),
    )
    sel = compile_m(m)
    assert pick(sel, dport=443, sni="a.example") == "a"
    assert pick(sel, dport=443, sni="z.example") == "b"  # nested miss: the parent's on_no_match
    assert pick(sel, dport=80) == "b"
    no_fallback = compile_m(exact("DestinationPortInput", {"443": act("a")}))
    assert pick(no_fallback, dport=80) is None
    assert pick(compile_m(exact("DestinationPortInput", {"443": act("a")}), default=True), dport=80) == "dflt"


def test_prefix_map_longest_first_then_shorter_then_on_no_match() -> None:
    m = prefix(
        "ServerNameInput",
        {
            "api.": sub(exact("DestinationPortInput", {"443": act("a")})),
            "api.v2.": sub(exact("DestinationPortInput", {"8443": act("b")})),
            "": act("c"),
        },
        on_no_match=act("d"),
    )
    sel = compile_m(m)
    assert pick(sel, sni="api.v2.example", dport=8443) == "b"  # longest
    assert pick(sel, sni="api.v2.example", dport=443) == "a"  # longest's nested miss -> "api."
    assert pick(sel, sni="api.x", dport=80) == "c"  # both miss -> the empty prefix
    assert pick(sel, sni="web", dport=80) == "c"
    assert pick(sel, sni="api.", dport=443) == "a"  # a value equal to a prefix matches it
    assert pick(sel) == "d"  # no SNI: no value, on_no_match
    short = compile_m(prefix("ServerNameInput", {"api.v2.": act("b")}, on_no_match=act("d")))
    assert pick(short, sni="api.v") == "d"  # shorter than every prefix


def test_ip_trie_longest_prefix_exclusive_and_fallback() -> None:
    port_443 = sub(exact("DestinationPortInput", {"443": act("a")}))
    m = ip_tree(
        "DestinationIPInput",
        [
            (["10.1.2.0/24"], port_443, False),
            (["10.0.0.0/8"], act("b"), False),
            (["10.1.0.0/16"], act("c"), True),  # exclusive: not used when a /24 contains the address
            (["2001:db8::/32"], act("d"), False),
        ],
        on_no_match=act("dflt-nomatch"),
    )
    sel = compile_m(m, names=("a", "b", "c", "d", "dflt-nomatch"))
    assert pick(sel, dst="10.1.2.3", dport=443) == "a"
    assert pick(sel, dst="10.1.2.3", dport=80) == "b"  # /24 nested miss; /16 exclusive skipped; /8
    assert pick(sel, dst="10.1.3.3", dport=80) == "c"  # /16 is the most specific here
    assert pick(sel, dst="10.200.0.1") == "b"
    assert pick(sel, dst="::ffff:10.200.0.1") == "b"  # dual-stack listener: IPv4-mapped
    assert pick(sel, dst="2001:db8::5") == "d"
    assert pick(sel, dst="2001:db9::5") == "dflt-nomatch"
    assert pick(sel, dst="11.0.0.1") == "dflt-nomatch"
    assert pick(sel, None, None, None, None) == "dflt-nomatch"


def test_ip_trie_one_range_matcher_with_several_ranges_is_tried_once(monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[int | None] = []

    def counting_port(c: Any) -> str | None:
        reads.append(c.dst_port)
        return None if c.dst_port is None else str(c.dst_port)

    # Every input read is a node visit: count the nested matcher's reads.
    monkeypatch.setitem(fc_mod._INPUTS, "DestinationPortInput", counting_port)
    nested = sub(exact("DestinationPortInput", {"443": act("a")}))
    m = ip_tree(
        "SourceIPInput", [(["10.1.0.0/16", "10.0.0.0/8"], nested, False), (["0.0.0.0/0"], act("b"), False)]
    )
    sel = compile_m(m)
    assert pick(sel, src="10.1.1.1", dport=443) == "a"
    assert pick(sel, src="10.1.1.1", dport=80) == "b"
    assert reads == [443, 80]  # the /16 and the /8 are one range matcher: evaluated once
    assert pick(sel, src="8.8.8.8", dport=443) == "b"
    assert reads == [443, 80]


# --- lists and predicates -------------------------------------------------------------------------


def test_matcher_list_first_match_wins_and_boolean_predicates() -> None:
    is_tls = single("TransportProtocolInput", value_match={"exact": "tls"})
    sni_api = single("ServerNameInput", value_match={"prefix": "api."})
    from_mesh = in_cidrs("SourceIPInput", "10.0.0.0/8", "fd00::/8")
    m = mlist(
        [
            ({"and_matcher": {"predicate": [is_tls, sni_api]}}, act("a")),
            ({"or_matcher": {"predicate": [sni_api, from_mesh]}}, act("b")),
            ({"not_matcher": single("ServerNameInput", value_match={"safe_regex": {"regex": r".*\.internal"}})}, act("c")),
        ],
        on_no_match=act("d"),
    )  # fmt: skip
    sel = compile_m(m)
    assert pick(sel, transport="tls", sni="api.x") == "a"
    assert pick(sel, sni="api.x") == "b"  # not TLS: the and fails, the or holds
    assert pick(sel, src="10.3.3.3", sni="db.internal") == "b"
    assert pick(sel, src="fd00::7", sni="db.internal") == "b"
    assert pick(sel, src="192.168.0.1", sni="db.internal") == "d"
    assert pick(sel, src="192.168.0.1", sni="web") == "c"
    assert pick(sel, src="192.168.0.1") == "c"  # no SNI: the regex predicate is false, its negation true


def test_matcher_list_nested_miss_goes_on_to_the_next_entry() -> None:
    tls = single("TransportProtocolInput", value_match={"exact": "tls"})
    m = mlist(
        [
            (tls, sub(exact("ServerNameInput", {"a.example": act("a")}))),
            (tls, act("b")),
        ],
        on_no_match=sub(mlist([(single("DestinationPortInput", value_match={"exact": "80"}), act("c"))])),
    )
    sel = compile_m(m)
    assert pick(sel, transport="tls", sni="a.example") == "a"
    assert pick(sel, transport="tls", sni="other") == "b"
    assert pick(sel, dport=80) == "c"  # nested on_no_match matcher
    assert pick(sel, dport=81) is None


def test_keep_matching_is_skipped_and_on_no_match_only_matcher() -> None:
    skip = {**act("a"), "keep_matching": True}
    sel = compile_m(exact("DestinationPortInput", {"80": skip}, on_no_match=act("b")))
    assert pick(sel, dport=80) == "b"
    only = compile_m({"on_no_match": act("c")})
    assert pick(only) == "c"
    assert pick(compile_m({"on_no_match": skip}, default=True)) == "dflt"


def test_filter_chain_match_is_ignored_with_a_matcher() -> None:
    # Identical (and unmatched) filter_chain_match on both chains: no duplicate error, no effect.
    fcm = {"destination_port": 9999, "server_names": ["never.example"]}
    chains = [{"name": n, "filter_chain_match": fcm, "filters": T} for n in ("a", "b")]
    sel = compile_m(exact("DestinationPortInput", {"80": act("b")}, act("a")), chains=chains)
    assert pick(sel, dport=80) == "b"
    assert pick(sel, dport=9999, sni="never.example") == "a"
    assert all(c.match.is_empty() for c in sel.chains)


# --- configuration errors ---------------------------------------------------------------------


def test_bad_action_names_and_types() -> None:
    # A name the listener has no chain of: a notice, and matching connections are closed (not
    # given the default chain), as Envoy does.
    ctx = BuildContext(stats=Store())
    sel = compile_m(exact("DestinationPortInput", {"80": act("nope")}, act("a")), c=ctx, default=True)
    (n,) = [x for x in ctx.notices if "'nope'" in x]
    assert n.path == (
        'listeners[0].filter_chain_matcher.matcher_tree.exact_match_map.map["80"].action.typed_config.value'
    )
    assert pick(sel, dport=80) is None and pick(sel, dport=81) == "a"
    ctx = BuildContext(stats=Store())
    sel = compile_m({"on_no_match": act("dflt")}, default=True, c=ctx)  # the default chain is not a target
    assert any(
        x.path == "listeners[0].filter_chain_matcher.on_no_match.action.typed_config.value"
        for x in ctx.notices
    )
    assert pick(sel) is None
    bad_type = {
        "action": {
            "name": "x",
            "typed_config": {"@type": "type.googleapis.com/google.protobuf.UInt32Value", "value": 5},
        }
    }
    e = config_error({"on_no_match": bad_type})
    assert e.path == "listeners[0].filter_chain_matcher.on_no_match.action.typed_config"
    assert "StringValue" in str(e)
    e = config_error({"on_no_match": {}})
    assert e.path == "listeners[0].filter_chain_matcher.on_no_match"


def test_chain_names_are_required_and_unique() -> None:
    e = config_error({"on_no_match": act("a")}, chains=[{"name": "a", "filters": T}, {"filters": T}])
    assert e.path == "listeners[0].filter_chains[1].name"
    e = config_error(
        {"on_no_match": act("a")}, chains=[{"name": "a", "filters": T}, {"name": "a", "filters": T}]
    )
    assert e.path == "listeners[0].filter_chains[1].name"
    assert "twice" in str(e)


def test_structural_errors_have_field_paths() -> None:
    root = "listeners[0].filter_chain_matcher"
    bad_input = {
        "matcher_tree": {
            "input": {"name": "h", "typed_config": {"@type": SV, "value": "x"}},
            "exact_match_map": {"map": {"x": act("a")}},
        }
    }
    assert config_error(bad_input).path == f"{root}.matcher_tree.input.typed_config"
    no_input = {"matcher_tree": {"exact_match_map": {"map": {"x": act("a")}}}}
    assert config_error(no_input).path == f"{root}.matcher_tree.input"
    empty_map = {"matcher_tree": {"input": inp("ServerNameInput"), "exact_match_map": {"map": {}}}}
    assert config_error(empty_map).path == f"{root}.matcher_tree.exact_match_map.map"
    no_tree = {"matcher_tree": {"input": inp("ServerNameInput")}}
    assert config_error(no_tree).path == f"{root}.matcher_tree"
    other_custom = {
        "matcher_tree": {
            "input": inp("ServerNameInput"),
            "custom_match": {"name": "x", "typed_config": {"@type": SV, "value": "x"}},
        }
    }
    assert config_error(other_custom).path == f"{root}.matcher_tree.custom_match.typed_config"
    bad_cidr = ip_tree("DestinationIPInput", [(["10.0.0.0/40"], act("a"), False)])
    assert config_error(bad_cidr).path == (
        f"{root}.matcher_tree.custom_match.typed_config.range_matchers[0].ranges[0]"
    )
    one_or = mlist(
        [({"or_matcher": {"predicate": [single("ServerNameInput", value_match={"exact": "x"})]}}, act("a"))]
    )
    assert config_error(one_or).path == f"{root}.matcher_list.matchers[0].predicate.or_matcher.predicate"
    empty_prefix = mlist([(single("ServerNameInput", value_match={"prefix": ""}), act("a"))])
    assert config_error(empty_prefix).path == (
        f"{root}.matcher_list.matchers[0].predicate.single_predicate.value_match.prefix"
    )
    assert config_error({"matcher_list": {"matchers": []}}).path == f"{root}.matcher_list.matchers"
    no_pred = {"matcher_list": {"matchers": [{"on_match": act("a")}]}}
    assert config_error(no_pred).path == f"{root}.matcher_list.matchers[0].predicate"
    no_ranges = {"name": "ip", "typed_config": {"@type": IP_INPUT_MATCHER}}
    lst = mlist([(single("SourceIPInput", custom_match=no_ranges), act("a"))])
    assert config_error(lst).path == (
        f"{root}.matcher_list.matchers[0].predicate.single_predicate.custom_match.typed_config.cidr_ranges"
    )


# --- end to end ---------------------------------------------------------------------------------

_spec = importlib.util.spec_from_file_location("tls_certs", Path(__file__).parent / "test_tls_certs.py")
assert _spec is not None and _spec.loader is not None
_certs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_certs)

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
DTLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"


def _body_chain(name: str, cert: tuple[Path, Path] | None = None) -> dict[str, Any]:
    hcm = {
        "@type": HCM,
        "stat_prefix": name,
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [
                        {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": f"chain {name}"}}}
                    ],
                }
            ]
        },
        "http_filters": [
            {"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
        ],
    }  # fmt: skip
    chain: dict[str, Any] = {
        "name": name,
        "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}],
    }
    if cert is not None:
        chain["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": DTLS,
                "common_tls_context": {
                    "tls_certificates": [
                        {
                            "certificate_chain": {"filename": str(cert[0])},
                            "private_key": {"filename": str(cert[1])},
                        }
                    ]
                },
            },
        }
    return chain


def _curl(url: str, *args: str) -> tuple[int, str]:
    curl = shutil.which("curl")
    assert curl is not None, "curl is needed"
    r = subprocess.run(
        [curl, "-sS", "--max-time", "10", "-o", "-", "-w", "\n%{http_code}", *args, url],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    body, _, code = r.stdout.rpartition("\n")
    return int(code or 0), body


@pytest.mark.e2e
def test_e2e_matcher_routes_curl_by_destination_port_and_sni(tmp_path: Path) -> None:
    pki = _certs.Pki(tmp_path / "pki")
    cert_a = pki.issue("a", "a", ["DNS:a.example"])
    cert_b = pki.issue("b", "b", ["DNS:b.example"])
    p1, p2 = free_port(), free_port()
    by_sni = exact(
        "ServerNameInput",
        {"a.example": act("tls-a"), "b.example": act("tls-b")},
        on_no_match=sub(exact("TransportProtocolInput", {"raw_buffer": act("plain")})),
    )
    matcher = exact("DestinationPortInput", {str(p1): sub(by_sni), str(p2): act("second-port")})
    chains = [
        _body_chain("tls-a", cert_a),
        _body_chain("tls-b", cert_b),
        _body_chain("plain"),
        _body_chain("second-port"),
    ]
    listeners = [
        {
            "name": f"l{i}",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "listener_filters": [{"name": "envoy.filters.listener.tls_inspector"}],
            "filter_chains": chains,
            "filter_chain_matcher": matcher,
        }
        for i, port in enumerate((p1, p2))
    ]
    proc = start_moorline(bootstrap(listeners, []), tmp_path)
    try:
        ca = str(pki.ca_cert)
        for name in ("a", "b"):
            host = f"{name}.example"
            got = _curl(f"https://{host}:{p1}/", "--cacert", ca, "--resolve", f"{host}:{p1}:127.0.0.1")
            assert got == (200, f"chain tls-{name}")
        assert _curl(f"http://127.0.0.1:{p1}/") == (200, "chain plain")
        assert _curl(f"http://127.0.0.1:{p2}/") == (200, "chain second-port")
        # TLS with an SNI the matcher does not know: no chain, the connection is closed.
        code, _ = _curl(f"https://c.example:{p1}/", "--cacert", ca, "--resolve", f"c.example:{p1}:127.0.0.1")
        assert code == 0
        stats = proc.stats()
        assert int(stats[f"listener.127.0.0.1_{p1}.no_filter_chain_match"]) == 1
        assert int(stats[f"listener.127.0.0.1_{p1}.downstream_cx_total"]) == 3
        assert int(stats[f"listener.127.0.0.1_{p2}.downstream_cx_total"]) == 1
    finally:
        proc.stop()
