"""Review of the L4/TLS path, unit level: SAN matching, SNI chain selection, ClientHello parsing.

A test marked ``xfail(strict=True, reason="finding N: ...")`` shows a bug that is still there
(numbers as in tests/e2e/test_review_l4_tls.py); remove the marker together with the fix. The
other tests pin behaviour that was checked against Envoy and found right.
"""

from __future__ import annotations

import ssl
import sys
from pathlib import Path
from typing import Any

import pytest
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2

sys.path.insert(0, str(Path(__file__).parent))
from test_tls_certs import Pki

from moorline.config.context import BuildContext
from moorline.config.errors import ConfigError
from moorline.config.loader import parse_message
from moorline.config.matchers import StringMatcher
from moorline.net.filter_chain import FilterChain, FilterChainMatch, FilterChainSelector
from moorline.net.tls import SanMatcher, compile_downstream
from moorline.observability.stats import Store
from moorline.protocol.tls_hello import NEED_MORE, NOT_TLS, TLS, parse_client_hello

# --- SAN matching (mTLS) -------------------------------------------------------------------------


def _matcher(san_type: str | None, **sm: Any) -> SanMatcher:
    from envoy.type.matcher.v3 import string_pb2

    return SanMatcher(san_type, StringMatcher.compile(parse_message(sm, string_pb2.StringMatcher), "m"))


def test_san_any_of_several_uri_sans_matches_like_envoy() -> None:
    # Envoy accepts a certificate when any of its SANs matches any matcher.
    m = _matcher("URI", exact="spiffe://good")
    assert m.matches([("URI", "spiffe://bad"), ("URI", "spiffe://good")])
    assert not m.matches([("URI", "spiffe://bad"), ("URI", "spiffe://good/extra")])


def test_san_type_is_enforced() -> None:
    # A DNS SAN spelled like the wanted URI must not pass a URI matcher.
    m = _matcher("URI", exact="spiffe://good")
    assert not m.matches([("DNS", "spiffe://good"), ("email", "spiffe://good")])


def test_san_wildcard_in_certificate_covers_one_label_only() -> None:
    m_one = _matcher("DNS", exact="a.example.com")
    m_two = _matcher("DNS", exact="a.b.example.com")
    m_apex = _matcher("DNS", exact="example.com")
    sans = [("DNS", "*.example.com")]
    assert m_one.matches(sans)
    assert not m_two.matches(sans)
    assert not m_apex.matches(sans)


def test_san_check_ignores_common_name() -> None:
    # No SANs at all: the CN is never consulted (Envoy does not fall back to it either).
    m = _matcher("DNS", exact="client.example.com")
    assert not m.matches([])


def _dtls(d: dict[str, Any]) -> Any:
    return parse_message(d, tls_pb2.DownstreamTlsContext)


def test_downstream_san_matchers_without_trusted_ca_are_rejected(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    cert, key = pki.issue("srv", "srv", ["DNS:srv.example.com"])
    proto = _dtls(
        {
            "common_tls_context": {
                "tls_certificates": [
                    {"certificate_chain": {"filename": str(cert)}, "private_key": {"filename": str(key)}}
                ],
                "validation_context": {
                    "match_typed_subject_alt_names": [
                        {"san_type": "URI", "matcher": {"exact": "spiffe://only-this-client"}}
                    ]
                },
            }
        }
    )
    ctx = BuildContext(stats=Store())
    with pytest.raises(ConfigError) as ei:
        tls = compile_downstream(proto, ctx, "tls")
        # What happens today: no client certificate is even requested, so the SAN matcher
        # can never run and every client is admitted.
        assert tls.server_context.verify_mode == ssl.CERT_NONE
    assert "trusted_ca" in ei.value.path or "trusted" in str(ei.value)


# --- filter chain selection by SNI ---------------------------------------------------------------


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


# --- ClientHello parsing -------------------------------------------------------------------------


def _client_hello(sni: str, alpn: list[str] | None = None) -> bytes:
    ctx = ssl.create_default_context()
    if alpn:
        ctx.set_alpn_protocols(alpn)
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def _refragment(hello: bytes, size: int) -> bytes:
    body = hello[5 : 5 + int.from_bytes(hello[3:5], "big")]
    out = bytearray()
    for k in range(0, len(body), size):
        frag = body[k : k + size]
        out += bytes([0x16, 3, 1]) + len(frag).to_bytes(2, "big") + frag
    return bytes(out)


@pytest.mark.parametrize("size", [1, 3, 4, 5, 97])
def test_fragmented_client_hello_every_prefix_needs_more_then_parses(size: int) -> None:
    data = _refragment(_client_hello("One.Example.com", ["h2", "http/1.1"]), size)
    for k in range(1, len(data)):
        assert parse_client_hello(data[:k])[0] == NEED_MORE, k
    assert parse_client_hello(data) == (TLS, "one.example.com", ["h2", "http/1.1"])


def test_malformed_client_hello_is_not_tls_never_raises() -> None:
    good = _client_hello("one.example.com")
    # Corrupt every byte position in turn: the parser must answer, never raise, and never
    # report an SNI that is not in the bytes.
    for i in range(5, len(good)):
        bad = bytearray(good)
        bad[i] ^= 0xFF
        status, sni, _ = parse_client_hello(bytes(bad))
        assert status in (NEED_MORE, NOT_TLS, TLS, "too_large")
        if status == TLS:
            assert sni is None or sni.encode() in bytes(bad).lower()
