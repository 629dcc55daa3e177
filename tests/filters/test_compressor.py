"""envoy.filters.http.compressor (moorline/filters/http/compressor.py) driven in memory through
the real connection manager (moorline.testing.pair): which responses get compressed, the
headers it rewrites, Accept-Encoding negotiation between several compressor filters, per-route
config, request compression, stats, and that compressor state lives only as long as a stream
that compresses."""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import brotli
import pytest
import zstandard

from moorline.config.errors import ConfigError
from moorline.testing.pair import Pair, bootstrap_yaml

T = "type.googleapis.com/envoy.extensions."
BODY = b"".join(b"line %d of a body that compresses well\n" % i for i in range(400))


def lib(kind: str = "gzip", name: str | None = None, **fields: Any) -> dict[str, Any]:
    msg = {"gzip": "Gzip", "brotli": "Brotli", "zstd": "Zstd"}[kind]
    return {
        "name": name or kind,
        "typed_config": {"@type": f"{T}compression.{kind}.compressor.v3.{msg}", **fields},
    }


def comp(
    library: dict[str, Any] | None = None, name: str = "envoy.filters.http.compressor", **cfg: Any
) -> dict[str, Any]:
    return {
        "name": name,
        "typed_config": {
            "@type": f"{T}filters.http.compressor.v3.Compressor",
            "compressor_library": library or lib(),
            **cfg,
        },
    }


@pytest.fixture
def make() -> Iterator[Any]:
    pairs: list[Pair] = []

    def make_pair(filters: list[dict[str, Any]], **kw: Any) -> Pair:
        p = Pair(bootstrap_yaml(http_filters=filters, **kw))
        pairs.append(p)
        return p

    yield make_pair
    for p in pairs:
        p.close()


def exchange(
    pair: Pair,
    req_headers: str = "accept-encoding: gzip\r\n",
    resp_head: bytes = b"content-type: text/plain\r\n",
    body: bytes = BODY,
    status: bytes = b"200 OK",
    method: bytes = b"GET",
) -> Any:
    c = pair.connect()
    c.send(method + b" / HTTP/1.1\r\nhost: a\r\n" + req_headers.encode() + b"\r\n")
    up = up_for(pair)
    up.request()
    up.send(b"HTTP/1.1 " + status + b"\r\n" + resp_head + b"content-length: %d\r\n\r\n" % len(body) + body)
    return c.response()


def up_for(pair: Pair) -> Any:
    """The upstream connection that got the newest request: a new one, or a kept-alive one."""
    if pair.upstream.pending:
        return pair.upstream.accept()
    for u in pair.upstream.connections:
        if u.has_request():
            return u
    raise AssertionError("no upstream connection has a request")


def stats(pair: Pair, part: str = "compressor") -> dict[str, int]:
    return {s.name: s.value for s in pair.stats if part in s.name and getattr(s, "value", 0)}


# -- what gets compressed ------------------------------------------------------------------------


def test_gzip_compresses_a_big_body_and_rewrites_the_headers(make: Any) -> None:
    pair = make([comp()])
    r = exchange(pair)
    assert r.status == 200
    assert r.header("content-encoding") == b"gzip"
    assert r.header("content-length") is None and r.header("transfer-encoding") == b"chunked"
    assert r.header("vary") == b"Accept-Encoding"
    assert gzip.decompress(r.body) == BODY
    st = stats(pair)
    p = "http.ingress.compressor.gzip.gzip."
    assert st[p + "compressed"] == 1 and st[p + "header_compressor_used"] == 1
    assert st[p + "total_uncompressed_bytes"] == len(BODY)
    assert st[p + "total_compressed_bytes"] == len(r.body) < len(BODY)
    pair.assert_settled()


@pytest.mark.parametrize(
    ("kind", "token", "decode"),
    [
        ("brotli", "br", brotli.decompress),
        ("zstd", "zstd", lambda b: zstandard.ZstdDecompressor().decompressobj().decompress(b)),
    ],
)
def test_brotli_and_zstd(make: Any, kind: str, token: str, decode: Any) -> None:
    pair = make([comp(lib(kind))])
    r = exchange(pair, f"accept-encoding: {token}\r\n")
    assert r.header("content-encoding") == token.encode()
    assert decode(r.body) == BODY
    assert stats(pair)[f"http.ingress.compressor.{kind}.{kind}.compressed"] == 1


def test_each_chunk_is_flushed_and_trailers_end_the_stream(make: Any) -> None:
    sse = {"common_config": {"content_type": ["text/event-stream"]}}
    pair = make([comp(response_direction_config=sse)])
    c = pair.connect()
    c.send(b"GET / HTTP/1.1\r\nhost: a\r\naccept-encoding: gzip\r\n\r\n")
    up = up_for(pair)
    up.request()
    up.send(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
    up.send(b"d\r\ndata: first\n\n\r\n")
    # The first event decodes from what reached the client, before the upstream sent more.
    head, _, rest = c.data.partition(b"\r\n\r\n")
    assert b"content-encoding: gzip" in head
    size, _, chunk = rest.partition(b"\r\n")
    assert zlib.decompressobj(31).decompress(chunk[: int(size, 16)]) == b"data: first\n\n"
    up.send(b"e\r\ndata: second\n\n\r\n0\r\nx-t: 1\r\n\r\n")
    r = c.response()
    assert r.trailer("x-t") == b"1"
    assert gzip.decompress(r.body) == b"data: first\n\ndata: second\n\n"
    pair.assert_settled()


def test_text_event_stream_is_not_in_the_default_list(make: Any) -> None:
    pair = make([comp()])
    r = exchange(pair, resp_head=b"content-type: text/event-stream\r\n")
    assert r.header("content-encoding") is None and r.body == BODY


@pytest.mark.parametrize(
    ("resp_head", "body", "stat"),
    [
        (b"content-type: text/plain\r\n", b"x" * 29, "content_length_too_small"),
        (b"content-type: image/png\r\n", BODY, None),
        (b"content-type: text/plain\r\ncontent-encoding: gzip\r\n", BODY, None),
        (b"content-type: text/plain\r\ncache-control: max-age=1, No-Transform\r\n", BODY, None),
    ],
    ids=["too-short", "content-type", "already-encoded", "no-transform"],
)
def test_responses_left_alone(make: Any, resp_head: bytes, body: bytes, stat: str | None) -> None:
    pair = make([comp()])
    r = exchange(pair, resp_head=resp_head, body=body)
    assert r.body == body
    assert r.header("content-length") == str(len(body)).encode()
    assert r.header("content-encoding") in (None, b"gzip") and r.header("vary") is None
    st = stats(pair)
    assert st["http.ingress.compressor.gzip.gzip.not_compressed"] == 1
    if stat:
        assert st[f"http.ingress.compressor.gzip.gzip.{stat}"] == 1


def test_exactly_min_content_length_is_compressed(make: Any) -> None:
    pair = make([comp(response_direction_config={"common_config": {"min_content_length": 100}})])
    assert exchange(pair, body=b"y" * 99).header("content-encoding") is None
    r = exchange(pair, body=b"y" * 100)
    assert r.header("content-encoding") == b"gzip" and gzip.decompress(r.body) == b"y" * 100


def test_head_and_bodiless_statuses_are_not_compressed(make: Any) -> None:
    pair = make([comp()])
    c = pair.connect()
    c.send(b"HEAD / HTTP/1.1\r\nhost: a\r\naccept-encoding: gzip\r\n\r\n")
    up = up_for(pair)
    up.request()
    up.send(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 5000\r\n\r\n")
    r = c.response(head=True)
    assert r.header("content-encoding") is None and r.header("content-length") == b"5000"
    for code in (b"204 No Content", b"304 Not Modified"):
        c = pair.connect()
        c.send(b"GET / HTTP/1.1\r\nhost: a\r\naccept-encoding: gzip\r\n\r\n")
        up = up_for(pair)
        up.request()
        up.send(b"HTTP/1.1 " + code + b"\r\ncontent-type: text/plain\r\n\r\n")
        r = c.response()
        assert r.header("content-encoding") is None
    assert "http.ingress.compressor.gzip.gzip.compressed" not in stats(pair)


def test_strong_etag_turns_weak_and_weak_is_kept(make: Any) -> None:
    pair = make([comp()])
    r = exchange(pair, resp_head=b'content-type: text/plain\r\netag: "abc"\r\n')
    assert r.header("etag") == b'W/"abc"' and r.header("content-encoding") == b"gzip"
    r = exchange(pair, resp_head=b'content-type: text/plain\r\netag: W/"abc"\r\n')
    assert r.header("etag") == b'W/"abc"' and r.header("content-encoding") == b"gzip"


def test_disable_on_etag_header_leaves_the_response_alone(make: Any) -> None:
    pair = make([comp(response_direction_config={"disable_on_etag_header": True})])
    r = exchange(pair, resp_head=b'content-type: text/plain\r\netag: "abc"\r\n')
    assert r.header("etag") == b'"abc"' and r.header("content-encoding") is None and r.body == BODY
    assert stats(pair)["http.ingress.compressor.gzip.gzip.not_compressed_etag"] == 1
    # The response-direction stats move under "response." once response_direction_config is set.
    assert stats(pair)["http.ingress.compressor.gzip.gzip.response.not_compressed"] == 1


def test_vary_is_appended_and_added_even_without_accept_encoding(make: Any) -> None:
    pair = make([comp()])
    r = exchange(pair, resp_head=b"content-type: text/plain\r\nvary: Origin\r\n")
    assert r.header("vary") == b"Origin, Accept-Encoding"
    r = exchange(pair, req_headers="", resp_head=b"content-type: text/plain\r\nvary: accept-encoding\r\n")
    assert r.header("vary") == b"accept-encoding" and r.header("content-encoding") is None
    r = exchange(pair, req_headers="")
    assert r.header("vary") == b"Accept-Encoding" and r.body == BODY
    assert stats(pair)["http.ingress.compressor.gzip.gzip.no_accept_header"] == 2


def test_enabled_flag_default_value_off_and_runtime_key_announced(make: Any) -> None:
    off = {"common_config": {"enabled": {"default_value": False, "runtime_key": "k"}}}
    pair = make([comp(response_direction_config=off)])
    r = exchange(pair)
    assert r.header("content-encoding") is None and r.header("vary") is None and r.body == BODY
    assert any(n.path.endswith("enabled.runtime_key") for n in pair.server.ctx.notices)


# -- negotiation ---------------------------------------------------------------------------------


def three(**first: Any) -> list[dict[str, Any]]:
    """Istio's order: brotli, zstd, gzip."""
    return [
        comp(lib("brotli", "b"), "c.br", **first),
        comp(lib("zstd", "z"), "c.zstd"),
        comp(lib("gzip", "g"), "c.gzip"),
    ]


@pytest.mark.parametrize(
    ("accept", "want"),
    [
        ("gzip, br, zstd", b"gzip"),  # equal q: the first listed by the client
        ("zstd, br", b"zstd"),
        ("gzip;q=0.5, br;q=0.8, zstd;q=0.1", b"br"),
        ("*", b"br"),  # wildcard: the first configured
        ("gzip;q=0, *", b"br"),
        ("br;q=0, *;q=0.5", b"zstd"),
        ("identity", None),
        ("deflate", None),
        ("gzip;q=0, br;q=0, zstd;q=0", None),
        ("identity;q=0.9, gzip;q=0.5", None),
        ("GZIP;Q=0.9, br;q=0.4", b"gzip"),
        ("gzip;q=abc, zstd", b"zstd"),  # an unreadable q-value drops that token
    ],
)
def test_accept_encoding_chooses_one_filter(make: Any, accept: str, want: bytes | None) -> None:
    pair = make(three())
    r = exchange(pair, f"accept-encoding: {accept}\r\n")
    assert r.header("content-encoding") == want
    dec = {b"gzip": gzip.decompress, b"br": brotli.decompress}
    if want in dec:
        assert dec[want](r.body) == BODY
    elif want is None:
        assert r.body == BODY
    st = stats(pair)
    assert sum(v for k, v in st.items() if k.endswith(".compressed")) == (0 if want is None else 1)


def test_negotiation_stats(make: Any) -> None:
    pair = make(three())
    exchange(pair, "accept-encoding: gzip\r\n")
    exchange(pair, "accept-encoding: *\r\n")
    exchange(pair, "accept-encoding: identity\r\n")
    exchange(pair, "accept-encoding: deflate\r\n")
    st = stats(pair)
    g, b = "http.ingress.compressor.g.gzip.", "http.ingress.compressor.b.brotli."
    assert st[g + "header_compressor_used"] == 1 and st[b + "header_compressor_overshadowed"] == 1
    assert st[b + "header_wildcard"] == 1 and st[g + "header_wildcard"] == 1
    assert st[g + "header_identity"] == 1 and st[g + "header_not_valid"] == 1
    assert (
        st[b + "compressed"] == 1 and st[g + "compressed"] == 1
    )  # no response_direction_config: no "response."


def test_choose_first_wins_ties(make: Any) -> None:
    pair = make(three(choose_first=True))
    assert exchange(pair, "accept-encoding: gzip, br\r\n").header("content-encoding") == b"br"


def test_a_filter_whose_types_exclude_the_response_steps_aside(make: Any) -> None:
    only_html = {"common_config": {"content_type": ["text/html"]}}
    pair = make([comp(lib("brotli"), "c.br", response_direction_config=only_html), comp(lib("gzip"), "c.gz")])
    r = exchange(pair, "accept-encoding: br, gzip\r\n")
    assert r.header("content-encoding") == b"gzip" and gzip.decompress(r.body) == BODY


def test_remove_accept_encoding_header(make: Any) -> None:
    pair = make([comp(response_direction_config={"remove_accept_encoding_header": True})])
    c = pair.connect()
    c.send(b"GET / HTTP/1.1\r\nhost: a\r\naccept-encoding: gzip\r\n\r\n")
    up = up_for(pair)
    assert up.request().header("accept-encoding") is None
    up.send(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n" % len(BODY) + BODY)
    assert gzip.decompress(c.response().body) == BODY


# -- per route ------------------------------------------------------------------------------------


def test_per_route_disabled_and_library_override(make: Any) -> None:
    pr = f"{T}filters.http.compressor.v3.CompressorPerRoute"
    routes = [
        {
            "match": {"prefix": "/off"},
            "route": {"cluster": "be"},
            "typed_per_filter_config": {"envoy.filters.http.compressor": {"@type": pr, "disabled": True}},
        },
        {
            "match": {"prefix": "/br"},
            "route": {"cluster": "be"},
            "typed_per_filter_config": {
                "envoy.filters.http.compressor": {
                    "@type": pr,
                    "overrides": {"compressor_library": lib("brotli")},
                }
            },
        },
        {"match": {"prefix": "/"}, "route": {"cluster": "be"}},
    ]
    pair = make([comp()], routes=routes)
    for path, want in ((b"/off", None), (b"/br", b"br"), (b"/x", b"gzip")):
        c = pair.connect()
        c.send(b"GET " + path + b" HTTP/1.1\r\nhost: a\r\naccept-encoding: br, gzip\r\n\r\n")
        up = up_for(pair)
        up.request()
        up.send(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n" % len(BODY) + BODY
        )
        r = c.response()
        assert r.header("content-encoding") == want, path
        if want == b"br":
            assert brotli.decompress(r.body) == BODY
        elif want is None:
            assert r.body == BODY


def test_per_route_overrides_enable_a_disabled_filter(make: Any) -> None:
    pr = f"{T}filters.http.compressor.v3.CompressorPerRoute"
    routes = [
        {
            "match": {"prefix": "/on"},
            "route": {"cluster": "be"},
            "typed_per_filter_config": {
                "envoy.filters.http.compressor": {"@type": pr, "overrides": {"response_direction_config": {}}}
            },
        },
        {"match": {"prefix": "/"}, "route": {"cluster": "be"}},
    ]
    off = {"common_config": {"enabled": {"default_value": False}}}
    pair = make([comp(response_direction_config=off)], routes=routes)
    for path, want in ((b"/on", b"gzip"), (b"/x", None)):
        c = pair.connect()
        c.send(b"GET " + path + b" HTTP/1.1\r\nhost: a\r\naccept-encoding: gzip\r\n\r\n")
        up = up_for(pair)
        up.request()
        up.send(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n" % len(BODY) + BODY
        )
        assert c.response().header("content-encoding") == want


# -- request direction ---------------------------------------------------------------------------


def test_request_compression(make: Any) -> None:
    pair = make([comp(request_direction_config={})])
    c = pair.connect()
    c.send(
        b"POST / HTTP/1.1\r\nhost: a\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
        % len(BODY)
    )
    up = up_for(pair)
    c.send(BODY)
    req = up.request()
    assert req.header("content-encoding") == b"gzip" and req.header("content-length") is None
    assert gzip.decompress(req.body) == BODY
    up.send(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert c.response().status == 204
    st = stats(pair)
    assert st["http.ingress.compressor.gzip.gzip.request.compressed"] == 1
    assert st["http.ingress.compressor.gzip.gzip.request.total_uncompressed_bytes"] == len(BODY)


def test_request_compression_ends_before_request_trailers(make: Any) -> None:
    pair = make([comp(request_direction_config={})])
    c = pair.connect()
    c.send(
        b"POST / HTTP/1.1\r\nhost: a\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n"
        + b"%x\r\n%s\r\n" % (len(BODY), BODY)
        + b"0\r\nx-t: 1\r\n\r\n"
    )
    up = up_for(pair)
    req = up.request()
    assert req.header("content-encoding") == b"gzip" and req.trailer("x-t") == b"1"
    assert gzip.decompress(req.body) == BODY
    up.send(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert c.response().status == 204
    pair.assert_settled()


def test_request_compression_is_off_by_default_and_skips_encoded_bodies(make: Any) -> None:
    for filters, extra in (
        ([comp()], b""),
        ([comp(request_direction_config={})], b"content-encoding: br\r\n"),
    ):
        pair = make(filters)
        c = pair.connect()
        c.send(
            b"POST / HTTP/1.1\r\nhost: a\r\ncontent-type: text/plain\r\n"
            + extra
            + b"content-length: %d\r\n\r\n" % len(BODY)
            + BODY
        )
        up = up_for(pair)
        req = up.request()
        assert req.body == BODY and req.header("content-length") == str(len(BODY)).encode()


# -- state and bounds ----------------------------------------------------------------------------


def instances(pair: Pair) -> list[Any]:
    made: list[Any] = []
    orig = pair.hcm.filter_factories[0]

    def make(stream: Any) -> Any:
        f = orig(stream)
        made.append(f)
        return f

    pair.hcm.filter_factories[0] = make
    return made


def test_compressor_objects_exist_only_for_streams_that_compress(make: Any) -> None:
    pair = make([comp()])
    made = instances(pair)
    c = pair.connect()
    c.send(b"GET / HTTP/1.1\r\nhost: a\r\naccept-encoding: gzip\r\n\r\n")
    up = up_for(pair)
    up.request()
    up.send(b"HTTP/1.1 200 OK\r\ncontent-type: image/png\r\ncontent-length: 4000\r\n\r\n" + b"p" * 100)
    assert made[-1].rc is None  # not compressing: nothing allocated
    up.send(b"p" * 3900)
    c.response()
    c = pair.connect()
    c.send(b"GET / HTTP/1.1\r\nhost: a\r\naccept-encoding: gzip\r\n\r\n")
    up = up_for(pair)
    up.request()
    up.send(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 4000\r\n\r\n" + b"t" * 100)
    f = made[-1]
    assert f.rc is not None  # compressing, mid-body
    up.reset()  # the upstream dies mid-body: the stream is reset and destroyed
    assert f.rc is None
    pair.assert_settled()


def test_compressed_output_is_passed_on_per_chunk_not_accumulated(make: Any) -> None:
    """A large streamed body: each upstream chunk yields its compressed bytes at once (the
    filter holds nothing between chunks; the chain buffers nothing)."""
    pair = make([comp()])
    c = pair.connect()
    c.send(b"GET / HTTP/1.1\r\nhost: a\r\naccept-encoding: gzip\r\n\r\n")
    up = up_for(pair)
    up.request()
    up.send(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n")
    d = zlib.decompressobj(31)
    got = b""
    seen = 0
    for i in range(50):
        piece = (b"%04d" % i) * 2000
        up.send(b"%x\r\n%s\r\n" % (len(piece), piece))
        data = c.data
        new, seen = data[seen:], len(data)
        if i == 0:
            new = new.partition(b"\r\n\r\n")[2]
        while new:
            size, _, new = new.partition(b"\r\n")
            n = int(size, 16)
            got += d.decompress(new[:n])
            new = new[n + 2 :]
        assert got.endswith(piece)  # everything sent so far is decodable now
    up.send(b"0\r\n\r\n")
    assert c.response().status == 200
    pair.assert_settled()


# -- config --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filt", "field"),
    [
        (comp(lib("gzip", window_bits=16)), "compressor_library.typed_config.window_bits"),
        (comp(lib("gzip", memory_level=0)), "compressor_library.typed_config.memory_level"),
        (comp(lib("brotli", quality=12)), "compressor_library.typed_config.quality"),
        (comp(lib("brotli", window_bits=9)), "compressor_library.typed_config.window_bits"),
        (comp(lib("zstd", compression_level=23)), "compressor_library.typed_config.compression_level"),
        (
            comp({"name": "x", "typed_config": {"@type": f"{T}filters.http.buffer.v3.Buffer"}}),
            "compressor_library.typed_config",
        ),
        (comp({"typed_config": lib()["typed_config"]}), "compressor_library.name"),
    ],
)
def test_bad_config_names_the_field(filt: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as ei:
        Pair(bootstrap_yaml(http_filters=[filt]))
    assert ei.value.path.endswith(field), ei.value


def test_missing_library_is_an_error() -> None:
    f = {"name": "c", "typed_config": {"@type": f"{T}filters.http.compressor.v3.Compressor"}}
    with pytest.raises(ConfigError) as ei:
        Pair(bootstrap_yaml(http_filters=[f]))
    assert ei.value.path.endswith("typed_config.compressor_library")


def test_library_settings_apply(make: Any) -> None:
    pair = make(
        [
            comp(
                lib(
                    "gzip",
                    memory_level=9,
                    window_bits=15,
                    compression_level="BEST_COMPRESSION",
                    compression_strategy="FILTERED",
                    chunk_size=8192,
                )
            )
        ]
    )
    r = exchange(pair)
    assert gzip.decompress(r.body) == BODY
    assert r.body[:3] == b"\x1f\x8b\x08" and r.body[8] == 2  # gzip header: XFL 2 = best compression
    pair2 = make(
        [comp(lib("zstd", compression_level=19, enable_checksum=True, strategy="BTULTRA"))], stat_prefix="z"
    )
    r = exchange(pair2, "accept-encoding: zstd\r\n")
    fp = zstandard.get_frame_parameters(r.body)
    assert fp.has_checksum
    assert zstandard.ZstdDecompressor().decompressobj().decompress(r.body) == BODY
    pair3 = make([comp(lib("brotli", quality=11, window_bits=24, input_block_bits=16, encoder_mode="TEXT"))])
    assert brotli.decompress(exchange(pair3, "accept-encoding: br\r\n").body) == BODY


# -- Istio's bootstrap ---------------------------------------------------------------------------

ISTIO = Path("/work/shared/fixtures/istio")


def istio_filters() -> list[dict[str, Any]]:
    doc = json.loads((ISTIO / "bootstrap_default_golden.json").read_text())
    for lst in doc["static_resources"]["listeners"]:
        hcm = lst["filter_chains"][0]["filters"][0]["typed_config"]
        fl = hcm["http_filters"]
        if any("compressor" in f["name"] for f in fl):
            assert hcm["stat_prefix"] == "stats"
            return [f for f in fl if "compressor" in f["name"]]
    raise AssertionError("no compressor in Istio's bootstrap")


@pytest.mark.skipif(not ISTIO.is_dir(), reason="the shared fixtures checkout is absent")
def test_istio_prometheus_compressors_as_configured(make: Any) -> None:
    pair = make(istio_filters(), stat_prefix="stats")
    metrics = b"".join(b'istio_requests_total{code="%d"} %d\n' % (i, i * 7) for i in range(300))
    for accept, want, dec in (
        ("br", b"br", brotli.decompress),
        ("zstd", b"zstd", lambda b: zstandard.ZstdDecompressor().decompressobj().decompress(b)),
        ("gzip", b"gzip", gzip.decompress),
        ("*", b"br", brotli.decompress),
    ):
        r = exchange(
            pair, f"accept-encoding: {accept}\r\n", b"content-type: text/plain; version=0.0.4\r\n", metrics
        )
        assert r.header("content-encoding") == want
        assert dec(r.body) == metrics
    st = stats(pair)
    assert st["http.stats.compressor.stats_brotli.brotli.response.compressed"] == 2
    assert st["http.stats.compressor.stats_zstd.zstd.response.compressed"] == 1
    assert st["http.stats.compressor.stats_gzip.gzip.response.compressed"] == 1
    # application/json is not in Istio's list: left alone.
    r = exchange(pair, "accept-encoding: gzip\r\n", b"content-type: application/json\r\n")
    assert r.header("content-encoding") is None and r.body == BODY
