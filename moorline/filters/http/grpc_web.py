"""``envoy.filters.http.grpc_web``: bridges gRPC-Web clients (browsers) to gRPC servers, as
Envoy's gRPC-Web filter does it (grpc/grpc ``doc/PROTOCOL-WEB.md``).

The filter config (``envoy.extensions.filters.http.grpc_web.v3.GrpcWeb``) has no fields.

Request (decoding), only for a request with a ``:path`` whose content-type is exactly one of
``application/grpc-web``, ``application/grpc-web+proto``, ``application/grpc-web-text`` or
``application/grpc-web-text+proto``; any other request passes untouched:

- content-type becomes ``application/grpc`` (Envoy sets the bare type whatever the suffix),
  ``te: trailers`` is set, ``grpc-accept-encoding: identity,deflate,gzip`` is added when
  absent, content-length is removed (it measured the HTTP/1.1 body);
- a ``-text`` body is base64: it is decoded as it streams, whole 4-byte groups at a time (each
  group may end in padding, so separately encoded messages can follow one another); at most 3
  bytes wait for the next chunk. A body whose length is not a multiple of 4 at its end, or that
  is not base64, gets 400 ``Bad gRPC-web request, invalid base64 data.`` (details
  ``grpc_base_64_decode_failed_bad_size`` / ``grpc_base_64_decode_failed``).
- ``x-grpc-web`` and ``x-user-agent`` (what browser clients send in place of the User-Agent
  they may not set) pass upstream untouched, as in Envoy; they matter to CORS ``allow_headers``.

Response (encoding), for those requests only:

- content-type becomes ``application/grpc-web-text+proto`` when the request's ``Accept`` is
  ``application/grpc-web-text`` (or ``+proto``), else ``application/grpc-web+proto`` (Envoy
  picks the text form by ``Accept``, not by the request's content-type); content-length is
  removed.
- A gRPC answer (200 with a gRPC content-type, or headers-only with ``grpc-status``: a
  trailers-only answer, which goes on as headers) or a 200 gRPC-Web one keeps its body; its
  trailers become the last body frame: flag ``0x80``, a 4-byte big-endian length, then
  ``name:value\\r\\n`` per trailer (lower-case names), and no trailers are sent. In text mode
  every frame is base64-encoded on its own (padding at frame ends, as the spec's servers flush
  messages): encoding in 3-byte multiples within a frame yields those bytes while holding at most
  4 unencoded bytes (a partial frame header, or the 1-2 bytes of a frame that do not fill a
  3-byte group).
- Any other answer (an HTTP error from the router such as 503 ``no healthy upstream``, a
  non-gRPC upstream) is not gRPC to the browser: the headers wait, the body (at most
  ``MAX_PLAINTEXT`` bytes kept, the rest dropped) becomes a percent-encoded ``grpc-message``,
  ``grpc-status`` is mapped from the HTTP status (Envoy's ``httpToGrpcStatus``) and
  ``content-length: 0``; the HTTP status itself is kept, as in Envoy. A headers-only answer of
  this kind goes on as it is (only its content-type changes), as in Envoy.

Stats (Envoy's gRPC context, protocol ``grpc-web``): ``cluster.<upstream cluster>.grpc-web.
<service>.<method>.<grpc-status>``, ``.success`` / ``.failure`` and ``.total`` for every
grpc-status seen in the response headers or trailers of a request whose path is
``/<service>/<method>`` and that reached a cluster. At most ``MAX_METHOD_STATS`` (cluster,
service, method) sets per filter config (the path is the client's choice); others are not
counted. Status names are the one- or two-digit values; any other value counts as ``other``.

Bounds: request text mode keeps at most 3 bytes; response text mode at most 4; a transformed
non-gRPC answer at most ``MAX_PLAINTEXT`` bytes of body. Nothing else is buffered: binary bodies
pass chunk by chunk. A listener without the filter never builds it; with it, a request that is
not gRPC-Web costs one content-type lookup per stream and a flag check per hook.
"""

from __future__ import annotations

import binascii
from typing import Any

from moorline.config import registry
from moorline.protocol.grpc import grpc_status_for_http, percent_encode
from moorline.protocol.headers import HeaderMap, RequestHeaders, ResponseHeaders
from moorline.proxy.filter import CONTINUE, STOP_ITERATION, STOP_ITERATION_NO_BUFFER, HttpFilter

NAME = "envoy.filters.http.grpc_web"
TYPE = "envoy.extensions.filters.http.grpc_web.v3.GrpcWeb"

MAX_PLAINTEXT = 16384  # Envoy's MAX_BUFFERED_PLAINTEXT_LENGTH: body kept for a grpc-message
MAX_METHOD_STATS = 1000  # (cluster, service, method) stat sets per filter config

TRAILER_FLAG = 0x80

GRPC_WEB = b"application/grpc-web"
GRPC_WEB_PROTO = b"application/grpc-web+proto"
GRPC_WEB_TEXT = b"application/grpc-web-text"
GRPC_WEB_TEXT_PROTO = b"application/grpc-web-text+proto"
_REQUEST_TYPES = frozenset((GRPC_WEB, GRPC_WEB_PROTO, GRPC_WEB_TEXT, GRPC_WEB_TEXT_PROTO))
_TEXT_TYPES = frozenset((GRPC_WEB_TEXT, GRPC_WEB_TEXT_PROTO))
_GRPC_ACCEPT_ENCODING = b"identity,deflate,gzip"
BAD_BASE64 = b"Bad gRPC-web request, invalid base64 data."


def b64decode_groups(s: bytes) -> bytes | None:
    """Decode whole 4-byte base64 groups, each of which may end in padding (several padded
    segments back to back). None when it is not base64."""
    a2b = binascii.a2b_base64
    try:
        i = s.find(b"=")
        if i < 0:
            return a2b(s, strict_mode=True)
        out = []
        start = 0
        while i >= 0:
            end = (i // 4 + 1) * 4
            out.append(a2b(s[start:end], strict_mode=True))
            start = end
            i = s.find(b"=", start)
        if start < len(s):
            out.append(a2b(s[start:], strict_mode=True))
        return b"".join(out)
    except binascii.Error:
        return None


def trailer_frame(trailers: HeaderMap) -> bytes:
    """The gRPC-Web trailers frame: flag 0x80, big-endian length, ``name:value\\r\\n`` lines."""
    block = b"".join(k.lower() + b":" + v + b"\r\n" for k, v in trailers)
    return bytes((TRAILER_FLAG,)) + len(block).to_bytes(4, "big") + block


class TextEncoder:
    """Base64 of a stream of gRPC frames, each frame encoded on its own (padding only at frame
    ends), fed in arbitrary chunks. Holds at most 4 bytes between chunks."""

    __slots__ = ("left", "pend")

    def __init__(self) -> None:
        self.pend = b""  # bytes not encoded yet: a partial frame header or < 3 bytes of a frame
        self.left = 0  # bytes of the current frame (pend included) still to encode; 0: at a header

    def feed(self, data: bytes) -> bytes:
        b2a = binascii.b2a_base64
        buf = self.pend + data if self.pend else data
        out = []
        pos = 0
        n = len(buf)
        left = self.left
        while pos < n:
            if left == 0:
                if n - pos < 5:
                    break
                left = 5 + int.from_bytes(buf[pos + 1 : pos + 5], "big")
            take = n - pos
            if take >= left:
                out.append(b2a(buf[pos : pos + left], newline=False))
                pos += left
                left = 0
                continue
            k = take - take % 3
            if k:
                out.append(b2a(buf[pos : pos + k], newline=False))
                pos += k
                left -= k
            break
        self.pend = buf[pos:]
        self.left = left
        return b"".join(out)

    def flush(self) -> bytes:
        """What is left of a frame the upstream cut short, encoded as it is."""
        p = self.pend
        self.pend = b""
        self.left = 0
        return binascii.b2a_base64(p, newline=False) if p else b""


class GrpcWebConfig:
    """One configured filter: the per-method stat sets (bounded)."""

    __slots__ = ("_stats", "store")

    def __init__(self, store: Any) -> None:
        self.store = store
        self._stats: dict[tuple[str, bytes], dict[bytes, Any]] = {}

    def charge(self, cluster: str, path: bytes, status: bytes) -> None:
        key = (cluster, path)
        s = self._stats.get(key)
        if s is None:
            if len(self._stats) >= MAX_METHOD_STATS:
                return
            svc, _, method = path[1:].partition(b"/")
            sc = self.store.scope(
                f"cluster.{cluster}.grpc-web.{svc.decode('latin-1')}.{method.decode('latin-1')}."
            )
            s = self._stats[key] = {b"": sc}
        name = status if len(status) <= 2 and status.isdigit() else b"other"
        c = s.get(name)
        if c is None:
            c = s[name] = s[b""].counter(name.decode())
        c.value += 1
        outcome = b"success" if status == b"0" else b"failure"
        for n in (outcome, b"total"):
            c = s.get(n)
            if c is None:
                c = s[n] = s[b""].counter(n.decode())
            c.value += 1


# Filter states: not a gRPC-Web request; binary or text response; a non-gRPC answer being
# turned into grpc-status / grpc-message.
_OFF, _ON, _TRANSFORM = 0, 1, 2


class GrpcWebFilter(HttpFilter):
    __slots__ = ("body", "cfg", "dec_pend", "enc", "held", "path", "state", "text_req")

    def __init__(self, cfg: GrpcWebConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.state = _OFF
        self.text_req = False
        self.dec_pend = b""  # < 4 base64 bytes waiting for the rest of their group
        self.enc: TextEncoder | None = None  # set when the client asked for a text response
        self.path: bytes | None = None  # /service/method, for stats
        self.held: ResponseHeaders | None = None  # a non-gRPC answer's headers, while held
        self.body: bytearray | None = None  # its body, at most MAX_PLAINTEXT bytes

    # -- request
    def decode_headers(self, headers: RequestHeaders, end_stream: bool) -> int:
        ct = headers.get(b"content-type")
        if ct not in _REQUEST_TYPES or not headers.path:
            return CONTINUE
        self.state = _ON
        headers.remove(b"content-length")
        p = headers.path
        # Envoy resolves service and method only for a two-segment path.
        if p[:1] == b"/" and p.count(b"/") == 2 and b"//" not in p and not p.endswith(b"/"):
            self.path = p
        self.text_req = ct in _TEXT_TYPES
        headers.set(b"content-type", b"application/grpc")
        if headers.get(b"accept") in _TEXT_TYPES:
            self.enc = TextEncoder()
        headers.set(b"te", b"trailers")
        if b"grpc-accept-encoding" not in headers:
            headers.add(b"grpc-accept-encoding", _GRPC_ACCEPT_ENCODING)
        assert self.callbacks is not None
        self.callbacks.bridge_to_grpc()  # grpc-timeout, outlier detection by grpc-status
        return CONTINUE

    def decode_data(self, data: bytes, end_stream: bool) -> int:
        if not self.text_req:
            return CONTINUE
        pend = self.dec_pend
        buf = pend + data if pend else data
        n = len(buf)
        if end_stream:
            if n == 0:
                return CONTINUE
            if n % 4:
                return self._bad_base64("grpc_base_64_decode_failed_bad_size")
        elif n < 4:
            self.dec_pend = buf
            return STOP_ITERATION_NO_BUFFER
        cut = n - n % 4
        out = b64decode_groups(buf[:cut])
        if out is None:
            return self._bad_base64("grpc_base_64_decode_failed")
        self.dec_pend = buf[cut:]
        assert self.callbacks is not None
        self.callbacks.set_decoded_data(out)
        return CONTINUE

    def decode_trailers(self, trailers: HeaderMap) -> int:
        if self.text_req and self.dec_pend:
            # A group the body never completed: the same answer as at the body's end.
            self._bad_base64("grpc_base_64_decode_failed_bad_size")
            return STOP_ITERATION
        return CONTINUE

    def _bad_base64(self, details: str) -> int:
        self.text_req = False
        self.dec_pend = b""
        assert self.callbacks is not None
        self.callbacks.send_local_reply(400, BAD_BASE64, None, details)
        return STOP_ITERATION_NO_BUFFER

    # -- response
    def encode_headers(self, headers: ResponseHeaders, end_stream: bool) -> int:
        if self.state == _OFF:
            return CONTINUE
        if self.path is not None:
            self._charge(headers)
        ct = headers.get(b"content-type")
        if end_stream:
            grpc = b"grpc-status" in headers
        else:
            grpc = headers.status == 200 and ct is not None and _is_grpc_or_web(ct)
        headers.remove(b"content-length")
        headers.set(b"content-type", GRPC_WEB_TEXT_PROTO if self.enc is not None else GRPC_WEB_PROTO)
        if end_stream or grpc:
            return CONTINUE
        self.state = _TRANSFORM
        self.held = headers
        self.enc = None  # the answer becomes headers only: nothing to encode
        return STOP_ITERATION

    def encode_data(self, data: bytes, end_stream: bool) -> int:
        st = self.state
        if st == _OFF:
            return CONTINUE
        cb = self.callbacks
        assert cb is not None
        if st == _TRANSFORM:
            body = self._keep(data)
            if not end_stream:
                return STOP_ITERATION_NO_BUFFER
            self._transform(body)
            cb.set_encoded_data(b"")
            return CONTINUE
        enc = self.enc
        if enc is None:
            return CONTINUE
        out = enc.feed(data)
        if end_stream:
            out += enc.flush()
        elif not out:
            return STOP_ITERATION_NO_BUFFER
        cb.set_encoded_data(out)
        return CONTINUE

    def encode_trailers(self, trailers: HeaderMap) -> int:
        st = self.state
        if st == _OFF:
            return CONTINUE
        if self.path is not None:
            self._charge(trailers)
        if st == _TRANSFORM:
            self._transform(self._keep(b""))
            return CONTINUE
        frame = trailer_frame(trailers)
        enc = self.enc
        if enc is not None:
            frame = enc.flush() + binascii.b2a_base64(frame, newline=False)
        # The trailers travel in the body now; the codecs end the body without a trailer
        # section (HTTP/2: an empty DATA frame with END_STREAM).
        trailers.remove_many({k for k, _ in trailers})
        assert self.callbacks is not None
        self.callbacks.set_encoded_data(frame)
        return CONTINUE

    def _keep(self, data: bytes) -> bytearray:
        body = self.body
        if body is None:
            body = self.body = bytearray()
        room = MAX_PLAINTEXT - len(body)
        if room > 0 and data:
            body += data[:room]
        return body

    def _transform(self, body: bytearray) -> None:
        h = self.held
        assert h is not None
        self.state = _ON
        self.held = None
        self.body = None
        h.set(b"grpc-message", percent_encode(bytes(body)))
        h.set(b"grpc-status", grpc_status_for_http(h.status))
        h.set(b"content-length", b"0")

    def _charge(self, headers: HeaderMap) -> None:
        gs = headers.get(b"grpc-status")
        if gs is None:
            return
        assert self.callbacks is not None
        cluster = self.callbacks.stream_info.upstream_cluster
        if cluster is not None and self.path is not None:
            self.cfg.charge(cluster, self.path, gs)


def _is_grpc_or_web(ct: bytes) -> bool:
    """A gRPC content-type (``application/grpc``, ``+suffix`` or ``;params``: Envoy's
    hasGrpcContentType), or a proto-encoded gRPC-Web one (parameters ignored, case-insensitive)."""
    if ct.startswith(b"application/grpc") and ct[16:17] in b"+;":
        return True
    base = ct.split(b";", 1)[0].rstrip().lower()
    return base == GRPC_WEB or base == GRPC_WEB_PROTO


def _factory(cfg: Any, ctx: Any, path: str) -> Any:
    conf = GrpcWebConfig(ctx.stats)

    def make(stream: Any) -> GrpcWebFilter:
        return GrpcWebFilter(conf)

    return make


registry.register("http", [NAME, "envoy.grpc_web"], ["type.googleapis.com/" + TYPE], _factory)
