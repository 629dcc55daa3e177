"""Filter chain compilation and Envoy's most-specific-wins selection (no sockets)."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2  # noqa: F401  (registers the type for json_format)
from google.protobuf import json_format

from moorline.config import registry
from moorline.config.context import BuildContext
from moorline.config.errors import ConfigError
from moorline.config.loader import parse_message
from moorline.net.filter_chain import (
    FilterChain,
    FilterChainMatch,
    FilterChainSelector,
    compile_filter_chains,
    parse_ip,
)
from moorline.observability.stats import Store


class Terminal:
    terminal = True

    def __init__(self, path: str) -> None:
        self.path = path

    def on_accept(self, sock: Any, info: Any) -> None:  # pragma: no cover - not used here
        sock.close()


class NonTerminal:
    """A ``moorline.net.api.ConnectionFilter`` that lets every connection through."""

    terminal = False

    def __init__(self, path: str) -> None:
        self.path = path

    def on_new_connection(self, info: Any) -> bool:
        return True


class Hookless:
    terminal = False


registry.register("network", ["test.fc.terminal"], [], lambda cfg, ctx, path: Terminal(path))
registry.register("network", ["test.fc.nonterminal"], [], lambda cfg, ctx, path: NonTerminal(path))
registry.register("network", ["test.fc.hookless"], [], lambda cfg, ctx, path: Hookless())

T = [{"name": "test.fc.terminal"}]


def ctx() -> BuildContext:
    return BuildContext(stats=Store())


def compile_(
    chains: list[dict[str, Any]], default: dict[str, Any] | None = None, c: BuildContext | None = None
) -> FilterChainSelector:
    d: dict[str, Any] = {
        "name": "l",
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": 0}},
        "filter_chains": chains,
    }
    if default is not None:
        d["default_filter_chain"] = default
    proto = json_format.ParseDict(d, listener_pb2.Listener())
    return compile_filter_chains(proto, c or ctx(), "listeners[0]")


def chain(name: str, **match: Any) -> dict[str, Any]:
    c: dict[str, Any] = {"name": name, "filters": T}
    if match:
        c["filter_chain_match"] = match
    return c


def cidr(p: str) -> dict[str, Any]:
    a, n = p.split("/")
    return {"address_prefix": a, "prefix_len": int(n)}


def pick(
    sel: FilterChainSelector,
    dst: str = "10.0.0.1",
    dport: int = 80,
    src: str = "192.168.1.1",
    sport: int = 5555,
    **kw: Any,
) -> str | None:
    fc = sel.select(dst, dport, src, sport, **kw)
    return None if fc is None else fc.name


def test_empty_match_matches_everything_and_terminal_built() -> None:
    sel = compile_([chain("all")])
    fc = sel.select("1.2.3.4", 1, "5.6.7.8", 2)
    assert fc is not None and fc.name == "all"
    assert isinstance(fc.terminal, Terminal)
    assert fc.terminal.path == "listeners[0].filter_chains[0].filters[0]"
    assert sel.select(None, None, None, None) is fc  # pipes too


def test_destination_port_exact_beats_any() -> None:
    sel = compile_([chain("any"), chain("p80", destination_port=80)])
    assert pick(sel, dport=80) == "p80"
    assert pick(sel, dport=81) == "any"


def test_destination_port_mismatch_without_fallback_is_no_match() -> None:
    sel = compile_([chain("p80", destination_port=80)])
    assert pick(sel, dport=81) is None
    sel = compile_([chain("p80", destination_port=80)], default={"name": "dflt", "filters": T})
    assert pick(sel, dport=81) == "dflt"


def test_destination_prefix_longest_wins() -> None:
    sel = compile_(
        [
            chain("any"),
            chain("slash8", prefix_ranges=[cidr("10.0.0.0/8")]),
            chain("slash24", prefix_ranges=[cidr("10.1.2.0/24"), cidr("172.16.0.0/12")]),
            chain("zero", prefix_ranges=[cidr("0.0.0.0/0")]),
        ]
    )
    assert pick(sel, dst="10.1.2.3") == "slash24"
    assert pick(sel, dst="10.9.9.9") == "slash8"
    assert pick(sel, dst="172.20.0.1") == "slash24"
    assert pick(sel, dst="8.8.8.8") == "zero"  # an explicit /0 beats "no ranges"
    assert pick(sel, dst="::1") == "any"
    assert pick(sel, dst="::ffff:10.1.2.3") == "slash24"  # IPv4-mapped on a dual-stack socket


def test_port_level_decides_before_prefix_and_no_backtracking() -> None:
    # Envoy picks the port-80 group first; its chains' prefixes then fail and the
    # prefix-only chain of the "any port" group is NOT considered.
    sel = compile_(
        [
            chain("p80-net10", destination_port=80, prefix_ranges=[cidr("10.0.0.0/8")]),
            chain("anyport-net192", prefix_ranges=[cidr("192.168.0.0/16")]),
        ]
    )
    assert pick(sel, dst="10.0.0.1", dport=80) == "p80-net10"
    assert pick(sel, dst="192.168.0.1", dport=80) is None
    assert pick(sel, dst="192.168.0.1", dport=81) == "anyport-net192"


def test_server_names_exact_then_longest_wildcard_then_none() -> None:
    sel = compile_(
        [
            chain("none"),
            chain("exact", server_names=["www.example.com"]),
            chain("wild", server_names=["*.example.com"]),
            chain("wild2", server_names=["*.b.example.com"]),
        ]
    )
    assert pick(sel, server_name="www.example.com") == "exact"
    assert pick(sel, server_name="WWW.Example.com") == "exact"
    assert pick(sel, server_name="a.example.com") == "wild"
    assert pick(sel, server_name="a.b.example.com") == "wild2"
    assert pick(sel, server_name="other.org") == "none"
    assert pick(sel) == "none"


def test_transport_and_alpn() -> None:
    sel = compile_(
        [
            chain("tls", transport_protocol="tls"),
            chain("raw", transport_protocol="raw_buffer"),
            chain("raw-h2", transport_protocol="raw_buffer", application_protocols=["h2c"]),
        ]
    )
    assert pick(sel) == "raw"
    assert pick(sel, transport="tls") == "tls"
    assert pick(sel, alpn=["http/1.1", "h2c"]) == "raw-h2"
    assert pick(sel, alpn=["http/1.1"]) == "raw"


def test_source_type_prefix_and_ports() -> None:
    sel = compile_(
        [
            chain("local", source_type="SAME_IP_OR_LOOPBACK"),
            chain("external", source_type="EXTERNAL"),
        ]
    )
    assert pick(sel, src="127.0.0.5") == "local"
    assert pick(sel, src="10.0.0.1", dst="10.0.0.1") == "local"
    assert pick(sel, src="10.0.0.2", dst="10.0.0.1") == "external"

    sel = compile_(
        [
            chain("any"),
            chain("src16", source_prefix_ranges=[cidr("192.168.0.0/16")]),
            chain("src32", source_prefix_ranges=[cidr("192.168.1.1/32")]),
            chain("src32-port", source_prefix_ranges=[cidr("192.168.1.1/32")], source_ports=[1234]),
        ]
    )
    assert pick(sel, src="192.168.1.1", sport=1234) == "src32-port"
    assert pick(sel, src="192.168.1.1", sport=1) == "src32"
    assert pick(sel, src="192.168.7.7") == "src16"
    assert pick(sel, src="10.0.0.1") == "any"


def test_duplicate_matches_rejected_with_path() -> None:
    with pytest.raises(ConfigError) as ei:
        compile_([chain("a", destination_port=80), chain("b", destination_port=80)])
    assert ei.value.path == "listeners[0].filter_chains[1].filter_chain_match"
    assert "same matching rules" in ei.value.message
    # Overlap in one element of a list is a duplicate too (Envoy checks every combination).
    with pytest.raises(ConfigError):
        compile_(
            [
                chain("a", prefix_ranges=[cidr("10.0.0.0/8"), cidr("11.0.0.0/8")]),
                chain("b", prefix_ranges=[cidr("10.1.0.0/8")]),  # normalizes to 10.0.0.0/8
            ]
        )
    with pytest.raises(ConfigError):
        compile_([chain("a"), chain("b")])
    compile_([chain("a", destination_port=80), chain("b", destination_port=81)])


def test_filter_list_rules() -> None:
    c = ctx()
    sel = compile_(
        [
            {
                "name": "x",
                "filters": [
                    {"name": "istio.stats"},
                    {"name": "test.fc.nonterminal"},
                    {"name": "test.fc.terminal"},
                ],
            }
        ],
        c=c,
    )
    fc = sel.chains[0]
    assert [type(f).__name__ for f in fc.filters] == ["NonTerminal"]
    assert any("istio.stats" in n and "filters[0]" in n for n in c.notices)

    with pytest.raises(ConfigError) as ei:
        compile_([{"filters": [{"name": "nope.unknown"}, {"name": "test.fc.terminal"}]}])
    assert ei.value.path == "listeners[0].filter_chains[0].filters[0]"
    with pytest.raises(ConfigError) as ei:
        compile_([{"filters": [{"name": "test.fc.nonterminal"}]}])
    assert ei.value.path == "listeners[0].filter_chains[0].filters[0]"
    assert "terminal" in ei.value.message
    with pytest.raises(ConfigError) as ei:
        compile_([{"filters": [{"name": "test.fc.terminal"}, {"name": "test.fc.terminal"}]}])
    assert ei.value.path == "listeners[0].filter_chains[0].filters[0]"
    with pytest.raises(ConfigError) as ei:
        compile_([{"filters": [{"name": "test.fc.nonterminal"}, {"name": "istio.stats"}]}])
    assert ei.value.path == "listeners[0].filter_chains[0].filters[1]"
    assert "terminal" in ei.value.message
    # A non-terminal filter must be a ConnectionFilter (net/api.py): it has to decide something.
    with pytest.raises(ConfigError) as ei:
        compile_([{"filters": [{"name": "test.fc.hookless"}, {"name": "test.fc.terminal"}]}])
    assert ei.value.path == "listeners[0].filter_chains[0].filters[0]"
    assert "on_new_connection" in ei.value.message


def test_tls_transport_socket_rejected_raw_buffer_accepted() -> None:
    with pytest.raises(ConfigError) as ei:
        compile_(
            [
                {
                    "filters": T,
                    "transport_socket": {
                        "name": "envoy.transport_sockets.tls",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
                        },
                    },
                }
            ]
        )
    assert ei.value.path.startswith("listeners[0].filter_chains[0].transport_socket")
    assert "TLS" in ei.value.message
    compile_([{"filters": T, "transport_socket": {"name": "envoy.transport_sockets.raw_buffer"}}])


def test_no_chains_is_an_error_and_bad_cidr_has_path() -> None:
    with pytest.raises(ConfigError) as ei:
        compile_([])
    assert ei.value.path == "listeners[0].filter_chains"
    with pytest.raises(ConfigError) as ei:
        compile_([chain("a", prefix_ranges=[cidr("10.0.0.300/8")])])
    assert ei.value.path == "listeners[0].filter_chains[0].filter_chain_match.prefix_ranges[0]"
    # Only a default chain is fine.
    sel = compile_([], default={"filters": T})
    assert pick(sel) == "default_filter_chain"


def test_parse_ip() -> None:
    assert parse_ip("127.0.0.1") == (4, 0x7F000001)
    assert parse_ip("::ffff:127.0.0.1") == (4, 0x7F000001)
    assert parse_ip("::1") == (6, 1)
    assert parse_ip("fe80::1%lo") == (6, (0xFE80 << 112) | 1)
    assert parse_ip("") is None
    assert parse_ip("not-an-ip") is None


# --- selection by SNI, checked against Envoy ------------------------------------------------------


class _T:
    terminal = True

    def on_accept(self, sock: Any, info: Any) -> None:  # pragma: no cover - never called here
        raise AssertionError


def _selector(names_per_chain: list[list[str]]) -> FilterChainSelector:
    from envoy.config.listener.v3 import listener_components_pb2

    chains = []
    for i, names in enumerate(names_per_chain):
        fcm = parse_message({"server_names": names}, listener_components_pb2.FilterChainMatch)
        chains.append(FilterChain(f"c{i}", FilterChainMatch(fcm, "m"), _T(), [], i))
    return FilterChainSelector(chains, None)


def _pick(sel: FilterChainSelector, sni: str | None) -> str | None:
    fc = sel.select("127.0.0.1", 443, "127.0.0.1", 5555, sni, "tls", None)
    return fc.name if fc is not None else None


def test_sni_chain_selection_case_exact_and_wildcard_like_envoy() -> None:
    sel = _selector([["*.example.com"], ["www.example.com"], ["*.b.example.com"]])
    assert _pick(sel, "WWW.Example.COM") == "c1"  # exact beats wildcard, case-insensitive
    assert _pick(sel, "x.example.com") == "c0"
    # Envoy's filter_chain_match wildcards are suffix matches of any depth ("*.example.com"
    # serves a.b.example.com when nothing more specific exists): tried as *.b.example.com,
    # then *.example.com, then *.com. (Only certificate SAN wildcards are one label deep.)
    assert _pick(sel, "a.b.example.com") == "c2"
    assert _pick(sel, "a.c.example.com") == "c0"
    assert _pick(sel, "example.com") is None  # the apex is not covered by *.example.com
    assert _pick(sel, None) is None


def test_chain_hands_its_connection_filters_to_the_terminal() -> None:
    """``FilterChain.on_accept`` puts the chain's non-terminal filters on ``info.filters`` (a
    tuple; empty for a chain without any) for the terminal to ask through ``info.admit()``."""
    from moorline.net.conn_info import ConnInfo

    seen: list[tuple[Any, ...]] = []

    class Spy:
        terminal = True

        def on_accept(self, sock: Any, info: Any) -> None:
            seen.append(info.filters)

    sel = compile_(
        [
            {"name": "with", "filters": [{"name": "test.fc.nonterminal"}, *T]},
            {"name": "without", "filters": T, "filter_chain_match": {"destination_port": 9}},
        ]
    )
    for fc in sel.chains:
        fc.terminal = Spy()
        fc.on_accept(None, ConnInfo(("10.0.0.1", 1), ("10.0.0.2", 2), "l"))  # type: ignore[arg-type]
    assert [type(f).__name__ for f in seen[0]] == ["NonTerminal"]
    assert seen[1] == ()
