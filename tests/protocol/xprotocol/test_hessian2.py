"""The Hessian 2.0 reader and writer: the spec's own byte examples, round trips of generated
values, truncation and garbage (only ``CodecError``), and the nesting bound."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moorline.protocol.xprotocol.api import CodecError
from moorline.protocol.xprotocol.hessian2 import (
    MAX_DEPTH,
    Hessian2Reader,
    Obj,
    Ref,
    encode,
    encode_binary,
    encode_int,
    encode_long,
    encode_string,
)

# (bytes, value) pairs written after the examples in the Hessian 2.0 serialization spec.
FIXTURES = [
    ("4e", None),
    ("54", True),
    ("46", False),
    ("90", 0),
    ("80", -16),
    ("bf", 47),
    ("c800", 0),
    ("c000", -2048),
    ("cfff", 2047),
    ("d40000", 0),
    ("d00000", -262144),
    ("d7ffff", 262143),
    ("4900000000", 0),
    ("497fffffff", 2**31 - 1),
    ("4980000000", -(2**31)),
    ("e0", 0),
    ("d8", -8),
    ("ef", 15),
    ("f800", 0),
    ("f000", -2048),
    ("ffff", 2047),
    ("3c0000", 0),
    ("380000", -262144),
    ("3fffff", 262143),
    ("5900000000", 0),
    ("597fffffff", 2**31 - 1),
    ("4c0000000100000000", 2**32),
    ("5b", 0.0),
    ("5c", 1.0),
    ("5d80", -128.0),
    ("5e8000", -32768.0),
    ("5f00002ee0", 12.0),
    ("444028800000000000", 12.25),
    ("4a000000d04b9284b8", 894621091000),
    ("4b00e3838f", 894621060000),
    ("00", ""),
    ("0568656c6c6f", "hello"),
    ("01c383", "\u00c3"),
    ("530005" + "68656c6c6f", "hello"),
    ("520003" + "68656c" + "02" + "6c6f", "hello"),  # chunked: R then a compact final chunk
    ("02eda0bdedb880", "\U0001f600"),  # a surrogate pair written as two 3-byte sequences
    ("02f09f9880", "\U0001f600"),  # the same character as one 4-byte sequence
    ("20", b""),
    ("23010203", b"\x01\x02\x03"),
    ("420003010203", b"\x01\x02\x03"),
    ("410002aabb" + "21cc", b"\xaa\xbb\xcc"),
    ("56045b696e74929091", [0, 1]),  # V '[int' len 2
    ("72045b696e749091", [0, 1]),  # compact fixed typed list
    ("7a9091", [0, 1]),  # compact fixed untyped list
    ("5890", []),
    ("55045b696e7490915a", [0, 1]),  # U: variable typed
    ("5790915a", [0, 1]),  # W: variable untyped
    ("489103666565a003666965" + "5a", {1: "fee", 16: "fie"}),
    ("4d07636f6d2e436172" + "0161" + "91" + "5a", {"a": 1}),  # typed map
    ("4d90" + "5a", {}),  # typed map, type by reference
    (
        "430b6578616d706c652e436172"
        + "92"
        + "05636f6c6f72"
        + "056d6f64656c"
        + "60"
        + "03726564"
        + "08636f727665747465",
        {"color": "red", "model": "corvette"},
    ),
    ("5190", Ref(0)),
]


@pytest.mark.parametrize(("hexbytes", "value"), FIXTURES)
def test_spec_examples_read(hexbytes: str, value: object) -> None:
    data = bytes.fromhex(hexbytes)
    r = Hessian2Reader(data)
    assert r.read() == value
    assert r.at_end


def test_objects_share_their_class_definition() -> None:
    data = encode(Obj("x.P", {"a": 1, "b": "s"}), Obj("x.P", {"a": 2, "b": "t"}))
    assert data.count(b"x.P") == 1
    r = Hessian2Reader(data)
    assert [r.read(), r.read()] == [{"a": 1, "b": "s"}, {"a": 2, "b": "t"}]
    # Object by explicit index ('O' + int) refers to the same definition.
    r = Hessian2Reader(data + b"\x4f\x90\x93\x01z")
    r.read(), r.read()
    assert r.read() == {"a": 3, "b": "z"}


@pytest.mark.parametrize(
    ("v", "hexbytes"),
    [
        (0, "90"),
        (-16, "80"),
        (47, "bf"),
        (2047, "cfff"),
        (-2048, "c000"),
        (262143, "d7ffff"),
        (2**31 - 1, "497fffffff"),
    ],
)
def test_int_writer_uses_the_compact_forms(v: int, hexbytes: str) -> None:
    assert encode_int(v).hex() == hexbytes


@pytest.mark.parametrize(
    ("v", "hexbytes"),
    [
        (0, "e0"),
        (-8, "d8"),
        (15, "ef"),
        (2047, "ffff"),
        (262143, "3fffff"),
        (2**31 - 1, "597fffffff"),
        (2**40, "4c0000010000000000"),
    ],
)
def test_long_writer_uses_the_compact_forms(v: int, hexbytes: str) -> None:
    assert encode_long(v).hex() == hexbytes
    assert Hessian2Reader(encode_long(v)).read() == v


def test_long_strings_and_binaries_are_chunked() -> None:
    s = "é" * 70000
    data = encode_string(s)
    assert data[0] == 0x52  # R: a non-final chunk first
    assert Hessian2Reader(data).read_string() == s
    b = bytes(range(256)) * 300
    data = encode_binary(b)
    assert data[0] == 0x41
    assert Hessian2Reader(data).read() == b


def test_read_string_takes_null_as_empty_and_refuses_other_kinds() -> None:
    assert Hessian2Reader(b"N").read_string() == ""
    with pytest.raises(CodecError):
        Hessian2Reader(b"\x90").read_string()
    with pytest.raises(CodecError):
        Hessian2Reader(b"\x05hel").read_string()  # fewer bytes than announced


def test_nesting_is_bounded() -> None:
    deep = b"\x79" * (MAX_DEPTH + 5) + b"N"  # lists of one list of one list ...
    with pytest.raises(CodecError, match="deep"):
        Hessian2Reader(deep).read()
    ok = b"\x79" * (MAX_DEPTH - 1) + b"N"
    assert Hessian2Reader(ok).read() is not None


def test_many_class_definitions_in_a_row_do_not_recurse() -> None:
    one = bytes.fromhex("0141") + b"\x90"  # C 'A' with no fields
    data = b"".join(b"C" + one for _ in range(5000)) + b"\x60"
    assert Hessian2Reader(data).read() == {}


@pytest.mark.parametrize(
    "hexbytes",
    [
        "58" + "d7ffff",  # a fixed list longer than the input
        "43" + "0141" + "d7ffff",  # a class with more fields than the input
        "60",  # an object of an undefined class
        "4f95",  # the same, by explicit index
        "01ff",  # bad UTF-8
        "01c3",  # truncated UTF-8
        "52000161" + "90",  # a string chunk followed by a non-string
        "41000161" + "90",  # a binary chunk followed by a non-binary
        "48",  # a map without its end
        "5790",  # a variable list without its end
        "40",  # reserved tag
        "45",
        "",
    ],
)
def test_bad_bytes_are_codec_errors(hexbytes: str) -> None:
    with pytest.raises(CodecError):
        Hessian2Reader(bytes.fromhex(hexbytes)).read()


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=40),
    st.binary(max_size=40),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=10),
        st.dictionaries(st.one_of(st.text(max_size=8), st.integers(-1000, 1000)), inner, max_size=5),
        st.builds(
            Obj,
            st.sampled_from(["a.B", "c.D"]),
            st.dictionaries(st.sampled_from(["x", "y", "z"]), inner, max_size=3),
        ),
    ),
    max_leaves=20,
)


def _norm(v: object) -> object:
    if isinstance(v, Obj):
        return {k: _norm(x) for k, x in v.fields.items()}
    if isinstance(v, list | tuple):
        return [_norm(x) for x in v]
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items()}
    if isinstance(v, float) and math.isinf(v):
        return v
    return v


@settings(max_examples=300, deadline=None)
@given(st.lists(values, min_size=1, max_size=4))
def test_round_trip(vs: list[object]) -> None:
    data = encode(*vs)
    r = Hessian2Reader(data)
    assert [r.read() for _ in vs] == [_norm(v) for v in vs]
    assert r.at_end


@settings(max_examples=200, deadline=None)
@given(values, st.data())
def test_truncated_values_are_codec_errors(v: object, data: st.DataObject) -> None:
    enc = encode(v)
    cut = data.draw(st.integers(0, len(enc) - 1))
    with pytest.raises(CodecError):
        Hessian2Reader(enc[:cut]).read()


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64))
def test_garbage_raises_only_codec_errors(data: bytes) -> None:
    r = Hessian2Reader(data)
    try:
        while not r.at_end:
            r.read()
    except CodecError:
        pass
