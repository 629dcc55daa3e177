"""The two HTTP/1.1 parser backends agree: the compiled one (``_http1c``, llhttp called directly)
and the pure-Python reference (``http1.PyRequestParser`` / ``PyResponseParser`` on httptools).

Both are fed the same bytes, split the same way, and must report the same events, the same
errors (status and detail) and the same leftover bytes. The inputs are valid and hostile
messages, and mutations of them (bytes flipped, inserted, deleted), so the error paths are
compared as much as the happy ones. The rest of the codec tests run against whichever backend
is active; CI runs them once per backend (``MOORLINE_PURE_PYTHON=1``)."""

from __future__ import annotations

import os
import random
from typing import Any

import pytest

from moorline.protocol import http1
from moorline.protocol.headers import HeaderMap
from moorline.protocol.http1 import (
    DROP_HEADER,
    REJECT_REQUEST,
    HttpProtocolError,
    Limits,
    PyRequestParser,
    PyResponseParser,
)

if os.environ.get("MOORLINE_REQUIRE_NATIVE") and not http1.NATIVE:
    raise RuntimeError("MOORLINE_REQUIRE_NATIVE is set but moorline.protocol._http1c is not built")

try:
    from moorline.protocol import _http1c  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - the build is part of make test; this says why it failed
    _http1c = None

needs_native = pytest.mark.skipif(
    _http1c is None and not os.environ.get("MOORLINE_REQUIRE_NATIVE"),
    reason="compiled parsers not built (scripts/build-native.py)",
)


class Rec:
    """Records every event as plain data; bodies are merged across pieces."""

    def __init__(self) -> None:
        self.ev: list[tuple[Any, ...]] = []

    def on_request_head(self, h: Any) -> None:
        self.ev.append(
            (
                "head",
                type(h).__name__,
                h.method,
                h.target,
                h.path,
                h.authority,
                h.scheme,
                h.version,
                list(h.headers),
                h.keep_alive,
                h.content_length,
                h.chunked,
                h.upgrade,
                h.expect_continue,
                h.header_bytes,
            )
        )

    def on_response_head(self, h: Any) -> None:
        self.ev.append(
            (
                "rhead",
                type(h).__name__,
                h.status,
                h.version,
                list(h.headers),
                h.keep_alive,
                h.content_length,
                h.chunked,
                h.upgrade,
                h.header_bytes,
            )
        )

    def on_body(self, b: bytes) -> None:
        assert type(b) is bytes
        if self.ev and self.ev[-1][0] == "body":
            self.ev[-1] = ("body", self.ev[-1][1] + b)
        else:
            self.ev.append(("body", b))

    def on_message_complete(self, trailers: HeaderMap | None) -> None:
        self.ev.append(("done", None if trailers is None else list(trailers)))


def _run(parser_cls: Any, pieces: list[bytes], limits: Limits | None, method: bytes | None) -> list[Any]:
    rec = Rec()
    p = parser_cls(rec, limits)
    out: list[Any] = []
    for piece in pieces:
        if method is not None and not p.message_open:
            p.expect(method)
        try:
            left = p.feed(piece)
        except HttpProtocolError as e:
            out.append(("error", e.status_hint, e.detail))
            break
        if left is not None:
            out.append(("left", left))
    else:
        if method is not None:
            try:
                p.feed_eof()
            except HttpProtocolError as e:
                out.append(("eof-error", e.status_hint, e.detail))
        else:
            out.append(("pending", p.head_pending))
    return rec.ev + out


def _split(data: bytes, rnd: random.Random) -> list[bytes]:
    if len(data) < 2 or rnd.random() < 0.3:
        return [data]
    cuts = sorted(rnd.sample(range(1, len(data)), min(len(data) - 1, rnd.randint(1, 6))))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def _mutate(data: bytes, rnd: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rnd.randint(1, 3)):
        if not b:
            break
        i = rnd.randrange(len(b))
        op = rnd.random()
        if op < 0.4:
            b[i] = rnd.choice(b" \t\r\n:;,_-/0aAzZ\x00\x7f\xff") if rnd.random() < 0.7 else rnd.randrange(256)
        elif op < 0.7:
            b.insert(i, rnd.choice(b" \r\n:0\t"))
        else:
            del b[i]
    return bytes(b)


REQUESTS = [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /x?y=1 HTTP/1.1\r\nHost: a.example:8080\r\nUser-Agent: t\r\nAccept: */*\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nX-T: v \r\n\r\n",
    b"PUT /p HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nhi",
    b"GET / HTTP/1.0\r\n\r\n",
    b"GET http://b.example/abs HTTP/1.1\r\nHost: a\r\n\r\n",
    b"CONNECT b.example:443 HTTP/1.1\r\nHost: b.example:443\r\n\r\nTUNNEL",
    b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nframes",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
    b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: h2c\r\nContent-Length: 3\r\n\r\nabc"
    b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: h2c\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3\r\nabc\r\n0\r\n\r\nGET /n HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\nx",
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX_Under: 1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
    b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",
    b"GET /\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nEmpty:\r\nSpaces:   \r\nTab: v\t\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\nPOST /3 HTTP/1.1\r\nHost: a\r\n"
    b"Content-Length: 2\r\n\r\nok",
    b"GET /" + b"u" * 300 + b" HTTP/1.1\r\nHost: a\r\nX: " + b"v" * 300 + b"\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"H%d: v\r\n" % i for i in range(12)) + b"\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"DELETE /d HTTP/1.1\r\nHOST: Mixed.Case\r\nCONTENT-LENGTH: 0\r\n\r\n",
]

RESPONSES = [
    (b"GET", b"HTTP/1.1 200 OK\r\nServer: s\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\nhello"),
    (b"GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nGrpc-Status: 0\r\n\r\n"),
    (b"GET", b"HTTP/1.0 200 OK\r\nContent-Type: t\r\n\r\nread until close"),
    (b"GET", b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n"),
    (b"GET", b"HTTP/1.1 204 No Content\r\nContent-Length: 3\r\n\r\n"),
    (b"GET", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
    (b"GET", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nframes"),
    (
        b"HEAD",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx",
    ),
    (b"CONNECT", b"HTTP/1.1 200 Connection Established\r\n\r\ntunnel bytes"),
    (b"CONNECT", b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nno"),
    (b"GET", b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n"),
    (
        b"GET",
        b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5\r\nProxy-Connection: x\r\nConnection: close\r\n\r\nbody",
    ),
    (b"GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
    (b"GET", b"HTTP/2 200\r\n\r\n"),
    (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"),
    (
        b"GET",
        b"HTTP/1.1 200 OK\r\n"
        + b"".join(b"H%d: v\r\n" % i for i in range(12))
        + b"Content-Length: 0\r\n\r\n",
    ),
]

TIGHT = Limits(max_header_bytes=256, max_headers=8)
UNDERSCORES = Limits(headers_with_underscores=REJECT_REQUEST)


@needs_native
@pytest.mark.parametrize("seed", range(8))
def test_request_backends_agree_on_valid_hostile_and_mutated_input(seed: int) -> None:
    rnd = random.Random(seed)
    compared = 0
    for base in REQUESTS:
        for limits in (None, TIGHT, UNDERSCORES):
            for variant in range(12):
                data = base if variant == 0 else _mutate(base, rnd)
                pieces = _split(data, rnd)
                py = _run(PyRequestParser, pieces, limits, None)
                c = _run(_http1c.RequestParser, pieces, limits, None)
                assert c == py, (data, pieces, limits)
                compared += 1
    assert compared == len(REQUESTS) * 3 * 12


@needs_native
@pytest.mark.parametrize("seed", range(8))
def test_response_backends_agree_on_valid_hostile_and_mutated_input(seed: int) -> None:
    rnd = random.Random(1000 + seed)
    for method, base in RESPONSES:
        for limits in (None, TIGHT):
            for variant in range(12):
                data = base if variant == 0 else _mutate(base, rnd)
                pieces = _split(data, rnd)
                py = _run(PyResponseParser, pieces, limits, method)
                c = _run(_http1c.ResponseParser, pieces, limits, method)
                assert c == py, (method, data, pieces, limits)


@needs_native
def test_request_backends_agree_byte_by_byte_and_on_release() -> None:
    # Every request fed one byte per call, then the whole stream again after a release.
    for base in REQUESTS:
        pieces = [base[i : i + 1] for i in range(len(base))]
        assert _run(_http1c.RequestParser, pieces, None, None) == _run(PyRequestParser, pieces, None, None)
    for cls in (PyRequestParser, _http1c.RequestParser):
        rec = Rec()
        p = cls(rec)
        p.feed(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n")
        assert p.release() and p.released
        p.feed(b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
        assert not p.released
        assert [e[3] for e in rec.ev if e[0] == "head"] == [b"/1", b"/2"]


@needs_native
def test_a_target_bug_surfaces_as_itself_in_both_backends() -> None:
    class Boom(Rec):
        def on_request_head(self, h: Any) -> None:
            raise KeyError("target bug")

    for cls in (PyRequestParser, _http1c.RequestParser):
        p = cls(Boom())
        with pytest.raises(KeyError):
            p.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        with pytest.raises(HttpProtocolError) as e:  # and the parser stays dead
            p.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert e.value.status_hint == 500


def test_the_active_backend_is_the_compiled_one_when_built() -> None:
    assert http1.NATIVE == (_http1c is not None and not os.environ.get("MOORLINE_PURE_PYTHON"))


FIELD_NAMES = [
    b"content-length",
    b"transfer-encoding",
    b"upgrade",
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"date",
    b"server",
    b"content-type",
    b"x-request-id",
    b"x",
    b"upgradeX",
    b"dates",
    b"",
]


def _random_fields(rnd: random.Random) -> list[tuple[bytes, bytes]]:
    n = rnd.choice([0, 1, 2, 5, 8, 63, 64, 65, 130])
    return [(rnd.choice(FIELD_NAMES), rnd.randbytes(rnd.randint(0, 12))) for _ in range(n)]


# -- review: target bugs after an h2c offer, re-entrant feeds, a seeded differential run -------

H2C_THEN_NEXT = [
    # (an h2c offer with a chunked body, then a pipelined request, all in one feed)
    b"POST / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: h2c\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3\r\nabc\r\n0\r\n\r\nGET /n HTTP/1.1\r\nHost: a\r\n\r\n",
    # (the same with a Content-Length body)
    b"POST / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: h2c\r\nContent-Length: 3\r\n\r\nabc"
    b"GET /n HTTP/1.1\r\nHost: a\r\n\r\n",
]


@needs_native
@pytest.mark.parametrize("cls", [PyRequestParser, "native"])
@pytest.mark.parametrize("data", H2C_THEN_NEXT)
@pytest.mark.parametrize("nth", [1, 2, 3, 4, 5])
def test_a_target_bug_after_an_h2c_offer_surfaces_as_itself(cls: Any, data: bytes, nth: int) -> None:
    # The events after an h2c offer are parsed while the pure parser handles llhttp's upgrade
    # stop: a target's exception there must still come out as itself (it used to come out as
    # httptools' HttpParserUpgrade), and leave the parser dead.
    class Boom(Rec):
        n = 0

        def _tick(self) -> None:
            self.n += 1
            if self.n == nth:
                raise LookupError(nth)

        def on_request_head(self, h: Any) -> None:
            super().on_request_head(h)
            self._tick()

        def on_body(self, b: bytes) -> None:
            super().on_body(b)
            self._tick()

        def on_message_complete(self, trailers: HeaderMap | None) -> None:
            super().on_message_complete(trailers)
            self._tick()

    p = (_http1c.RequestParser if cls == "native" else cls)(Boom())
    with pytest.raises(LookupError):
        p.feed(data)
    with pytest.raises(HttpProtocolError) as e:
        p.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert e.value.status_hint == 500


def _reentrant_target(inner: bytes) -> Any:
    class Reenter(Rec):
        parser: Any = None
        inner_error: BaseException | None = None

        def on_message_complete(self, trailers: HeaderMap | None) -> None:
            super().on_message_complete(trailers)
            if self.inner_error is None:
                try:
                    self.parser.feed(inner)
                except BaseException as e:  # recorded for the test
                    self.inner_error = e

    return Reenter()


@needs_native
@pytest.mark.parametrize("cls", [PyRequestParser, "native"])
def test_a_feed_from_inside_a_callback_is_refused(cls: Any) -> None:
    # A target that feeds the parser from one of its callbacks re-enters llhttp in the middle of
    # llhttp_execute: the inner call leaves llhttp's span pointer inside *its* buffer, and the
    # outer call then hands on_url (outer end - inner start) bytes: a negative size (SystemError)
    # or a read of unrelated heap memory into the request target. Refused instead, before any
    # state changes; the outer parse goes on.
    t = _reentrant_target(b"GET /inner")
    p = (_http1c.RequestParser if cls == "native" else cls)(t)
    t.parser = p
    assert p.feed(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n") is None
    assert isinstance(t.inner_error, RuntimeError)
    p.feed(b"GET /b HTTP/1.1\r\nHost: a\r\n\r\n")
    assert [e[3] for e in t.ev if e[0] == "head"] == [b"/a", b"/b"]


@needs_native
@pytest.mark.parametrize("cls", [PyResponseParser, "native"])
def test_a_response_feed_from_inside_a_callback_is_refused(cls: Any) -> None:
    t = _reentrant_target(b"HTTP/1.1 200 OK\r\nConte")
    p = (_http1c.ResponseParser if cls == "native" else cls)(t)
    t.parser = p
    assert p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok") is None
    assert isinstance(t.inner_error, RuntimeError)
    p.feed(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert [e[2] for e in t.ev if e[0] == "rhead"] == [200, 204]


@needs_native
@pytest.mark.parametrize("cls", [PyResponseParser, "native"])
def test_a_target_bug_ending_a_head_answer_leaves_the_parser_dead(cls: Any) -> None:
    # The end of an answer to HEAD is reported by the parser itself, outside llhttp: a target's
    # exception there comes out as itself and leaves the parser dead, like one inside llhttp.
    class Boom(Rec):
        def on_message_complete(self, trailers: HeaderMap | None) -> None:
            raise LookupError("target bug")

    p = (_http1c.ResponseParser if cls == "native" else cls)(Boom())
    p.expect(b"HEAD")
    with pytest.raises(LookupError):
        p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
    with pytest.raises(HttpProtocolError) as e:
        p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert e.value.status_hint == 500


# -- a seeded differential run over generated traffic ---------------------------------------
# Mostly well-formed messages (so that heads, bodies, trailers, h2c offers, upgrades, HEAD and
# CONNECT answers and pipelining are reached), some hostile or mutated, cut anywhere (one byte
# per feed included), under every kind of limit; besides the events, each feed's leftover,
# head_pending / message_open, random release() calls and the error a dead parser repeats are
# compared.

ALL_LIMITS = [
    None,
    TIGHT,
    UNDERSCORES,
    Limits(headers_with_underscores=DROP_HEADER),
    Limits(max_header_bytes=40, max_headers=2),
    Limits(max_header_bytes=0, max_headers=0, headers_with_underscores=DROP_HEADER),  # raw bound 4 KiB
    Limits(max_header_bytes=100, max_headers=3, headers_with_underscores=REJECT_REQUEST),
]
_OWS = (b"", b" ", b"  ", b"\t", b" \t ")
_NAMES = (b"X-A", b"Accept", b"x_u", b"Cookie", b"Keep-Alive", b"Connection", b"TE", b"Upgrade")
_VALUES = (b"v", b"1, 2", b"", b"close", b"keep-alive", b"trailers", b"h2c", b"100-continue", b"a b")


def _gen_headers(rnd: random.Random, request: bool) -> bytes:
    host = request and rnd.random() < 0.97
    lines = [b"Host: " + rnd.choice((b"a", b"a.example:8080", b""))] if host else []
    framing = rnd.random()
    if framing < 0.3:
        lines.append(b"Content-Length: " + rnd.choice((b"0", b"3", b"5") * 4 + (b"-1", b"1 2", b"007")))
    elif framing < 0.55:
        lines.append(b"Transfer-Encoding: " + rnd.choice((b"chunked",) * 10 + (b"gzip", b"gzip, chunked")))
    if rnd.random() < 0.2:
        lines += [b"Connection: Upgrade", b"Upgrade: " + rnd.choice((b"h2c", b"websocket", b"H2C"))]
    if request and rnd.random() < 0.03:
        lines.append(b"Host: b")
    if rnd.random() < 0.1:
        lines.append(b"Expect: " + rnd.choice((b"100-continue", b"100-Continue", b"x")))
    for _ in range(rnd.choice((0, 1, 2, 3, 5, 8, 10))):
        name = rnd.choice(_NAMES) if rnd.random() < 0.99 else b"N" * rnd.choice((60, 300))
        value = rnd.choice(_VALUES) if rnd.random() < 0.97 else b"z" * rnd.choice((30, 120, 5000))
        lines.append(name + b":" + rnd.choice(_OWS) + value + rnd.choice(_OWS))
    rnd.shuffle(lines)
    return b"".join(line + b"\r\n" for line in lines)


def _gen_body(rnd: random.Random, headers: bytes) -> bytes:
    h = headers.lower()
    if b"transfer-encoding: chunked" in h or rnd.random() < 0.02:
        out = b""
        for _ in range(rnd.randint(0, 3)):
            n = rnd.choice((1, 5, 20, 300))
            ext = rnd.choice((b"", b";e=1", b" ;e"))
            out += b"%x%s\r\n%s\r\n" % (n, ext, bytes(rnd.randrange(256) for _ in range(n)))
        trailers = _gen_headers(rnd, False) if rnd.random() < 0.4 else b""
        return out + b"0\r\n" + trailers + b"\r\n"
    if b"content-length: 3" in h:
        return b"abc"
    if b"content-length: 5" in h:
        return b"hello"
    return b"" if rnd.random() < 0.95 else b"extra"


_METHODS = (b"GET", b"POST", b"PUT", b"HEAD", b"DELETE", b"CONNECT", b"OPTIONS") * 3 + (b"PRI", b"GETT")
_TARGETS = (b"/", b"/x?y=1", b"*", b"http://b/abs", b"/" + b"p" * 30, b"/" + b"p" * 100)


def _gen_request(rnd: random.Random) -> bytes:
    method = rnd.choice(_METHODS)
    if method == b"CONNECT" and rnd.random() < 0.8:
        target = b"a.example:443"
    else:
        target = rnd.choice(_TARGETS) if rnd.random() < 0.97 else b"/" + b"p" * 5000
    version = rnd.choice((b" HTTP/1.1",) * 16 + (b" HTTP/1.0",) * 3 + (b" HTTP/2.0", b" HTTP/0.9", b""))
    headers = _gen_headers(rnd, True)
    return method + b" " + target + version + b"\r\n" + headers + b"\r\n" + _gen_body(rnd, headers)


def _gen_response(rnd: random.Random) -> bytes:
    status = rnd.choice((100, 101, 103, 200, 200, 200, 201, 204, 304, 404, 500, 999))
    headers = _gen_headers(rnd, False)
    if status == 101 and rnd.random() < 0.8:
        headers = b"Upgrade: websocket\r\nConnection: Upgrade\r\n" + headers
    bodiless = (status < 200 or status in (204, 304)) and rnd.random() < 0.9
    body = b"" if bodiless else _gen_body(rnd, headers)
    version = rnd.choice((b"HTTP/1.1",) * 16 + (b"HTTP/1.0",) * 3 + (b"HTTP/2",))
    reason = rnd.choice((b" OK", b"", b" Some Reason"))
    return b"%s %d%s\r\n%s\r\n%s" % (version, status, reason, headers, body)


def _pieces(data: bytes, rnd: random.Random) -> list[bytes]:
    r = rnd.random()
    if len(data) < 2 or r < 0.2:
        return [data]
    if r < 0.35:
        return [data[i : i + 1] for i in range(len(data))]
    if r < 0.45:
        k = rnd.randint(2, 5)
        return [data[i : i + k] for i in range(0, len(data), k)]
    out = _split(data, rnd)
    if r < 0.55:  # an empty feed somewhere
        out.insert(rnd.randrange(len(out) + 1), b"")
    return out


def _run_traced(
    cls: Any, pieces: list[bytes], limits: Limits | None, methods: list[bytes] | None, releases: list[bool]
) -> list[Any]:
    rec = Rec()
    p = cls(rec, limits)
    out: list[Any] = []
    for i, piece in enumerate(pieces):
        if methods is not None and not p.message_open:
            p.expect(methods[i % len(methods)])
        try:
            out.append(("left", p.feed(piece)))
        except HttpProtocolError as e:
            out.append(("error", e.status_hint, e.detail))
            with pytest.raises(HttpProtocolError) as again:
                p.feed(b"GET / HTTP/1.1\r\n\r\n")
            assert again.value is e  # a dead parser repeats its error
            break
        if methods is not None:
            out.append(("open", p.message_open))
        else:
            out.append(("pending", p.head_pending))
            if releases[i]:
                out.append(("release", p.release(), p.released))
    else:
        if methods is not None:
            try:
                p.feed_eof()
            except HttpProtocolError as e:
                out.append(("eof-error", e.status_hint, e.detail))
    return rec.ev + out


@needs_native
@pytest.mark.parametrize("seed", range(4))
def test_field_encoders_agree(seed: int) -> None:
    rnd = random.Random(seed)
    for _ in range(400):
        fields = _random_fields(rnd)
        method = rnd.choice([b"GET", b"POST", b"CONNECT", b"HEAD"])
        path = rnd.choice([b"/", b"/a/b?c=d", b"", b"h.example:443"])
        authority = rnd.choice([b"", b"h.example", b"h.example:8080"])
        body = rnd.random() < 0.5
        assert _http1c.encode_request_head_fields(method, path, authority, fields, body) == (
            http1.py_encode_request_head_fields(method, path, authority, fields, body)
        )
        keep = rnd.random() < 0.5
        assert _http1c.encode_response_fields(fields, keep) == http1.py_encode_response_fields(fields, keep)


@needs_native
def test_field_encoders_take_pairs_of_bytes_only() -> None:
    as_lists: Any = [[b"a", b"1"], (b"b", b"2")]
    for enc in (_http1c.encode_response_fields, http1.py_encode_response_fields):
        assert enc(as_lists, True) == (b"a: 1\r\nb: 2\r\n", 0)
        bad: Any = [(b"a", "text")]
        with pytest.raises(TypeError):
            enc(bad, True)


@needs_native
@pytest.mark.parametrize("seed", range(4))
def test_backends_agree_on_generated_traffic(seed: int) -> None:
    rnd = random.Random(7000 + seed)
    for i in range(3000):
        response = i % 2 == 1
        gen = _gen_response if response else _gen_request
        data = b"".join(gen(rnd) for _ in range(rnd.choice((1, 1, 2, 3))))
        if rnd.random() < 0.3:
            data = _mutate(data, rnd)
        pieces = _pieces(data, rnd)
        limits = rnd.choice(ALL_LIMITS) if rnd.random() < 0.5 else None
        releases = [rnd.random() < 0.3 for _ in pieces]
        methods = (
            [rnd.choice((b"GET", b"GET", b"HEAD", b"CONNECT", b"POST")) for _ in range(3)]
            if response
            else None
        )
        py = _run_traced(PyResponseParser if response else PyRequestParser, pieces, limits, methods, releases)
        c = _run_traced(
            _http1c.ResponseParser if response else _http1c.RequestParser, pieces, limits, methods, releases
        )
        assert c == py, (data, pieces, limits, methods)


def _bulk(rnd: random.Random, response: bool) -> bytes:
    """Many messages with bodies and heads of a few KiB: fed in big pieces, they exercise the
    raw bound's piecewise feeding (``_feed_bounded``) across heads, bodies and trailers."""
    parts = []
    for _ in range(rnd.randint(5, 30)):
        if rnd.random() < 0.5:
            n = rnd.choice((0, 10, 3000, 5000))
            framing, body = b"Content-Length: %d\r\n" % n, b"b" * n
        else:
            sizes = [rnd.choice((5, 3000, 4600)) for _ in range(rnd.randint(0, 3))]
            trailer = b"T_u: " + b"t" * rnd.choice((5, 150, 5000)) + b"\r\n" if rnd.random() < 0.3 else b""
            framing = b"Transfer-Encoding: chunked\r\n"
            body = b"".join(b"%x\r\n" % k + b"c" * k + b"\r\n" for k in sizes) + b"0\r\n" + trailer + b"\r\n"
        pad = b"X: " + b"x" * rnd.choice((1, 30, 180)) + b"\r\n"
        if response:
            parts.append(b"HTTP/1.1 200 OK\r\n" + framing + pad + b"\r\n" + body)
        else:
            if rnd.random() < 0.1:
                framing = b"Connection: Upgrade\r\nUpgrade: h2c\r\n" + framing
            parts.append(
                b"POST /"
                + b"p" * rnd.choice((1, 30, 150))
                + b" HTTP/1.1\r\nHost: a\r\n"
                + framing
                + pad
                + b"\r\n"
                + body
            )
    data = b"".join(parts)
    return _mutate(data, rnd) if rnd.random() < 0.2 else data


@needs_native
def test_backends_agree_on_bulk_traffic_past_the_raw_bound() -> None:
    rnd = random.Random(77)
    bounds = [Limits(max_header_bytes=200, max_headers=10), Limits(600, 20, DROP_HEADER), Limits(1, 1)]
    for i in range(300):
        response = i % 2 == 1
        data = _bulk(rnd, response)
        pieces, at = [], 0
        while at < len(data):
            k = rnd.choice((1, 7, 100, 4000, 5000, 20000, 100000))
            pieces.append(data[at : at + k])
            at += k
        limits = rnd.choice(bounds)
        releases = [rnd.random() < 0.3 for _ in pieces]
        methods = [rnd.choice((b"GET", b"GET", b"HEAD"))] if response else None
        py = _run_traced(PyResponseParser if response else PyRequestParser, pieces, limits, methods, releases)
        c = _run_traced(
            _http1c.ResponseParser if response else _http1c.RequestParser, pieces, limits, methods, releases
        )
        assert c == py, (len(data), [len(x) for x in pieces], limits)


@needs_native
def test_backends_agree_on_target_bugs_at_every_event() -> None:
    # The target raises at its n-th event: both backends let that exception out at the same
    # point, after the same events, and are dead afterwards.
    class Boom(Rec):
        def __init__(self, nth: int) -> None:
            super().__init__()
            self.nth = nth

        def _tick(self) -> None:
            self.nth -= 1
            if self.nth == 0:
                raise LookupError("target bug")

        def on_request_head(self, h: Any) -> None:
            super().on_request_head(h)
            self._tick()

        def on_response_head(self, h: Any) -> None:
            super().on_response_head(h)
            self._tick()

        def on_body(self, b: bytes) -> None:
            super().on_body(b)
            self._tick()

        def on_message_complete(self, trailers: HeaderMap | None) -> None:
            super().on_message_complete(trailers)
            self._tick()

    def run(cls: Any, pieces: list[bytes], nth: int, method: bytes | None) -> list[Any]:
        rec = Boom(nth)
        p = cls(rec)
        out: list[Any] = []
        for piece in pieces:
            if method is not None and not p.message_open:
                p.expect(method)
            try:
                out.append(("left", p.feed(piece)))
            except HttpProtocolError as e:
                out.append(("error", e.status_hint, e.detail))
            except LookupError:
                out.append(("target bug",))
        return rec.ev + out

    rnd = random.Random(99)
    cases: list[tuple[bytes, bytes | None]] = [(r, None) for r in REQUESTS] + [(r, m) for m, r in RESPONSES]
    for _ in range(150):
        cases.append((_gen_request(rnd), None))
        cases.append((_gen_response(rnd), rnd.choice((b"GET", b"HEAD", b"CONNECT"))))
    for data, method in cases:
        pieces = _pieces(data, rnd)
        for nth in range(1, 7):
            if method is None:
                py = run(PyRequestParser, pieces, nth, None)
                c = run(_http1c.RequestParser, pieces, nth, None)
            else:
                py = run(PyResponseParser, pieces, nth, method)
                c = run(_http1c.ResponseParser, pieces, nth, method)
            assert c == py, (data, pieces, nth, method)


@needs_native
@pytest.mark.parametrize("cls", [PyRequestParser, "native"])
def test_a_target_bug_surfaces_as_itself_when_fed_inside_an_except_block(cls: Any) -> None:
    # httptools hands the target's exception on as its error's __context__, and Python replaces
    # that with the exception being handled: the pure parser used to re-raise the caller's own
    # (handled) exception instead of the target's.
    class Boom(Rec):
        def on_request_head(self, h: Any) -> None:
            raise KeyError("target bug")

    p = (_http1c.RequestParser if cls == "native" else cls)(Boom())
    try:
        raise ValueError("the caller's own, being handled")
    except ValueError:
        with pytest.raises(KeyError):
            p.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    with pytest.raises(HttpProtocolError) as e:
        p.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert e.value.status_hint == 500


def test_a_target_without_a_callback_fails_when_it_is_needed_in_both_backends() -> None:
    class HeadOnly:
        def __init__(self) -> None:
            self.heads: list[Any] = []

        def on_request_head(self, h: Any) -> None:
            self.heads.append(h)

    classes = [PyRequestParser] + ([_http1c.RequestParser] if _http1c is not None else [])
    for cls in classes:
        t = HeadOnly()
        p = cls(t)
        with pytest.raises(AttributeError):  # no on_message_complete: the target's bug, surfaced
            p.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert len(t.heads) == 1
