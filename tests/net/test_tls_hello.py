"""Sans-IO ClientHello parser: real hellos from OpenSSL, fragmentation, garbage, bounds."""

from __future__ import annotations

import ssl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moorline.filters.listener.http_inspector import HttpInspector
from moorline.net.conn_info import ConnInfo
from moorline.observability.stats import Store
from moorline.protocol.tls_hello import NEED_MORE, NOT_TLS, TLS, TOO_LARGE, parse_client_hello


def hello(sni: str | None, alpn: list[str] | None = None) -> bytes:
    c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    c.check_hostname = False
    c.verify_mode = ssl.CERT_NONE
    if alpn:
        c.set_alpn_protocols(alpn)
    i, o = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = c.wrap_bio(i, o, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return o.read()


def test_real_hello_sni_and_alpn() -> None:
    assert parse_client_hello(hello("Foo.Example.COM", ["h2", "http/1.1"])) == (
        TLS,
        "foo.example.com",
        ["h2", "http/1.1"],
    )
    assert parse_client_hello(hello(None)) == (TLS, None, [])


def test_every_prefix_needs_more() -> None:
    data = hello("a.example.com", ["h2"])
    for n in range(len(data)):
        assert parse_client_hello(data[:n])[0] == NEED_MORE, n
    # Trailing bytes (the client sent more) do not matter.
    assert parse_client_hello(data + b"\x17\x03\x03")[0] == TLS


def refragment(data: bytes, size: int) -> bytes:
    """Split the handshake message of one record into records of ``size`` bytes."""
    body = data[5:]
    out = b""
    for i in range(0, len(body), size):
        part = body[i : i + size]
        out += data[:3] + len(part).to_bytes(2, "big") + part
    return out


@pytest.mark.parametrize("size", [1, 7, 100])
def test_hello_across_records(size: int) -> None:
    data = refragment(hello("x.example.com", ["http/1.1"]), size)
    assert parse_client_hello(data) == (TLS, "x.example.com", ["http/1.1"])
    assert parse_client_hello(data[:-1])[0] == NEED_MORE


def test_not_tls_and_malformed() -> None:
    assert parse_client_hello(b"GET / HTTP/1.1\r\n")[0] == NOT_TLS
    assert parse_client_hello(b"\x16\x02\x00")[0] == NOT_TLS  # major version 2
    assert parse_client_hello(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00")[0] == NOT_TLS  # ServerHello
    data = bytearray(hello("a.example.com"))
    data[5 + 4 + 2 + 32] = 0xFF  # session id length beyond the message
    assert parse_client_hello(bytes(data))[0] == NOT_TLS


def test_too_large() -> None:
    # A ClientHello claiming 100 KiB.
    data = b"\x16\x03\x01\x40\x00" + b"\x01" + (100 * 1024).to_bytes(3, "big") + b"\x03\x03"
    assert parse_client_hello(data)[0] == TOO_LARGE


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_never_raises(data: bytes) -> None:
    status, _sni, _alpn = parse_client_hello(data)
    assert status in (NEED_MORE, NOT_TLS, TLS, TOO_LARGE)
    status, _, _ = parse_client_hello(b"\x16\x03\x01" + data)
    assert status in (NEED_MORE, NOT_TLS, TLS, TOO_LARGE)


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=0, max_value=400), st.integers(min_value=0, max_value=255))
def test_fuzz_mutated_real_hello(pos: int, byte: int) -> None:
    data = bytearray(hello("m.example.com", ["h2"]))
    if pos < len(data):
        data[pos] = byte
    assert parse_client_hello(bytes(data))[0] in (NEED_MORE, NOT_TLS, TLS, TOO_LARGE)


class _Ctx:
    stats = Store()


def test_http_inspector_unit() -> None:
    hi = HttpInspector(_Ctx())
    info = ConnInfo(("127.0.0.1", 1), ("127.0.0.1", 2), "l")
    assert hi.on_data(b"PRI * HTTP/2", info) is False
    assert hi.on_data(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", info) is True and info.alpn == ["h2c"]
    info.alpn = None
    assert hi.on_data(b"POST /a", info) is False
    assert hi.on_data(b"POST /a HTTP/1.0\r\n", info) is True and info.alpn == ["http/1.0"]
    info.alpn = None
    assert hi.on_data(b"\x16\x03\x01", info) is True and info.alpn is None
    info.transport_protocol = "tls"
    assert hi.on_data(b"GET / HTTP/1.1\r\n", info) is True and info.alpn is None


# --- fragmented and corrupted hellos from OpenSSL --------------------------------------------------


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
