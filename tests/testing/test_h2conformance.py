"""The conformance suite's byte builders: HPACK integers and strings against RFC 7541's
examples and the ``hpack`` decoder, frame headers against ``hyperframe``."""

from __future__ import annotations

import pytest
from hpack import Decoder
from hpack.exceptions import HPACKDecodingError
from hyperframe.frame import Frame, PingFrame

from moorline.testing import h2conformance as conf


def test_hpack_integers_match_rfc7541_c1() -> None:
    assert conf.hpack_int(10, 5) == b"\x0a"
    assert conf.hpack_int(1337, 5) == b"\x1f\x9a\x0a"
    assert conf.hpack_int(42, 8) == b"\x2a"


def test_huffman_strings_decode_and_the_broken_forms_do_not() -> None:
    good = conf.base_block() + conf.literal(b"x-test", b"conformance", "without", huffman=True)
    assert (b"x-test", b"conformance") in Decoder().decode(good, raw=True)
    for bad in (
        conf.huffman_bits(b"test", extra_pad_bytes=1),
        conf.huffman_bits(b"test", pad_with_ones=False),
        conf.huffman_bits(b"test", eos=True),
    ):
        block = conf.base_block() + b"\x00" + conf.hpack_str(b"x-test") + conf.hpack_raw_str(bad)
        with pytest.raises(HPACKDecodingError):
            Decoder().decode(block, raw=True)


def test_base_block_is_a_get_request() -> None:
    got = Decoder().decode(conf.base_block(b"h"), raw=True)
    assert got == [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"h")]


def test_raw_frame_header_parses_like_hyperframe() -> None:
    raw = conf.raw_frame(conf.PING, conf.ACK, 0, b"12345678")
    f, n = Frame.parse_frame_header(memoryview(raw[:9]))
    assert isinstance(f, PingFrame) and n == 8 and "ACK" in f.flags
    assert conf.raw_frame(conf.DATA, 0, 3, b"", length=5)[:3] == b"\x00\x00\x05"


def test_case_ids_are_unique_and_sections_named() -> None:
    ids = [c.id for c in conf.CASES]
    assert len(ids) == len(set(ids))
    assert all(c.section.startswith(("RFC 9113", "RFC 7541")) for c in conf.CASES)
