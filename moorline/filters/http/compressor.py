"""``envoy.filters.http.compressor``: compress response bodies (and, when configured, request
bodies) with a compression library: ``envoy.compression.gzip.compressor`` (zlib),
``envoy.compression.brotli.compressor`` (PyPI ``brotli`` or ``brotlicffi``) and
``envoy.compression.zstd.compressor`` (PyPI ``zstandard``).

Response side, per Envoy's documented rules: compress only when the filter is enabled (on the
route too: ``CompressorPerRoute``), the response is not bodiless (HEAD, 1xx, 204, 304, headers
only), its Content-Length (if any) is at least ``min_content_length`` (default 30), its
Content-Type is in the list (Envoy's default list when empty), it has no Content-Encoding, no
``Cache-Control: no-transform``, no compressing Transfer-Encoding, no ETag when
``disable_on_etag_header``, its status is not in ``uncompressible_response_codes``, and the
request's Accept-Encoding chooses this filter's encoding. Several compressor filters in one
chain make one choice between them (``_choose``): the highest q-value wins; at equal q-values
the one listed first in Accept-Encoding wins unless a filter says ``choose_first``; ``*`` picks
the first configured filter; ``identity`` or ``q=0`` rule encodings out.

Compressing removes Content-Length, sets Content-Encoding, turns a strong ETag weak (a weak one
is kept) and streams the body through the compressor one chunk at a time, flushing after each
chunk so streamed responses (server-sent events) keep flowing; the last chunk, or the trailers,
end the compressed stream. ``Vary: Accept-Encoding`` is added to every response that could have
been compressed, whether or not this request accepted it.

Memory: a compressor object exists only for a stream that compresses (made in the headers hook,
dropped when the body ends or the stream is destroyed). Its state is bounded by the library
settings: zlib about ``2**(window_bits+2) + 2**(memory_level+9)`` bytes (32 KiB by default),
brotli about ``3 * 2**window_bits`` (768 KiB at the default 18), zstd by its level's window.
Nothing is buffered across chunks: each chunk's compressed bytes go on at once.

Stats (Envoy's layout) under ``http.<stat_prefix>.compressor.<library name>.<library prefix>.``
(library prefixes ``gzip.``, ``brotli.``, ``zstd.``): ``response.`` (or no direction prefix when
only the deprecated top-level fields configure responses) ``compressed``, ``not_compressed``,
``total_uncompressed_bytes``, ``total_compressed_bytes``, ``content_length_too_small``; the
response-only ``no_accept_header``, ``header_identity``, ``header_compressor_used``,
``header_compressor_overshadowed``, ``header_wildcard``, ``header_not_valid``,
``not_compressed_etag`` directly under the library prefix; ``request.*`` the common five.
"""

from __future__ import annotations

import zlib
from typing import Any

from moorline.config import registry
from moorline.config.errors import ConfigError
from moorline.config.loader import OpaqueAny, unpack_any
from moorline.protocol.headers import HeaderMap
from moorline.proxy.filter import CONTINUE, HttpFilter

NAME = "envoy.filters.http.compressor"
TYPE = "envoy.extensions.filters.http.compressor.v3.Compressor"
PER_ROUTE_TYPE = "envoy.extensions.filters.http.compressor.v3.CompressorPerRoute"

GZIP_NAME = "envoy.compression.gzip.compressor"
GZIP_TYPE = "envoy.extensions.compression.gzip.compressor.v3.Gzip"
BROTLI_NAME = "envoy.compression.brotli.compressor"
BROTLI_TYPE = "envoy.extensions.compression.brotli.compressor.v3.Brotli"
ZSTD_NAME = "envoy.compression.zstd.compressor"
ZSTD_TYPE = "envoy.extensions.compression.zstd.compressor.v3.Zstd"

LIBRARY_CATEGORY = "compressor_library"

DEFAULT_MIN_CONTENT_LENGTH = 30
# Envoy's default list, used when content_type is empty.
DEFAULT_CONTENT_TYPES = frozenset(
    (
        "text/html",
        "text/plain",
        "text/css",
        "application/javascript",
        "application/x-javascript",
        "text/javascript",
        "text/x-javascript",
        "text/ecmascript",
        "text/js",
        "text/jscript",
        "text/x-js",
        "application/ecmascript",
        "application/x-json",
        "application/xml",
        "application/json",
        "image/svg+xml",
        "text/xml",
        "application/xhtml+xml",
        "application/grpc-web",
        "application/grpc-web+proto",
    )
)
# Transfer codings that mean the body is compressed already.
_COMPRESSING_TE = frozenset((b"gzip", b"br", b"deflate", b"compress", b"zstd"))
_NO_BODY_STATUS = frozenset((204, 304))


# -- compression libraries -------------------------------------------------------------------------


class Library:
    """A compiled compression library: ``encoding`` (the Content-Encoding token), ``stat_prefix``
    (``"gzip."``), and ``make()`` returning a fresh stream compressor with ``chunk(data)`` (the
    compressed bytes of ``data``, flushed so the peer can decode them now) and ``finish(data)``
    (the rest of the stream, ended)."""

    __slots__ = ("encoding", "make", "stat_prefix")

    def __init__(self, encoding: str, stat_prefix: str, make: Any) -> None:
        self.encoding = encoding
        self.stat_prefix = stat_prefix
        self.make = make


class _Zlib:
    __slots__ = ("c",)

    def __init__(self, level: int, wbits: int, mem: int, strategy: int) -> None:
        self.c = zlib.compressobj(level, zlib.DEFLATED, wbits, mem, strategy)

    def chunk(self, data: bytes) -> bytes:
        c = self.c
        return c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)

    def finish(self, data: bytes) -> bytes:
        c = self.c
        return c.compress(data) + c.flush(zlib.Z_FINISH)


class _Brotli:
    __slots__ = ("c",)

    def __init__(self, mod: Any, mode: int, quality: int, lgwin: int, lgblock: int) -> None:
        self.c = mod.Compressor(mode=mode, quality=quality, lgwin=lgwin, lgblock=lgblock)

    def chunk(self, data: bytes) -> bytes:
        c = self.c
        return c.process(data) + c.flush()

    def finish(self, data: bytes) -> bytes:
        c = self.c
        return c.process(data) + c.finish()


class _Zstd:
    __slots__ = ("c", "mod")

    def __init__(self, mod: Any, cctx: Any) -> None:
        self.mod = mod
        self.c = cctx.compressobj()

    def chunk(self, data: bytes) -> bytes:
        c = self.c
        return c.compress(data) + c.flush(self.mod.COMPRESSOBJ_FLUSH_BLOCK)

    def finish(self, data: bytes) -> bytes:
        c = self.c
        return c.compress(data) + c.flush(self.mod.COMPRESSOBJ_FLUSH_FINISH)


def _uint(msg: Any, field: str, default: int, lo: int, hi: int, path: str) -> int:
    if not msg.HasField(field):
        return default
    v = int(getattr(msg, field).value)
    if not lo <= v <= hi:
        raise ConfigError(f"{path}.{field}", f"must be between {lo} and {hi}")
    return v


def _chunk_size(msg: Any, ctx: Any, path: str) -> None:
    if msg.HasField("chunk_size"):
        _uint(msg, "chunk_size", 4096, 4096, 65536, path)
        ctx.notice(
            f"{path}.chunk_size: Envoy's output buffer size; each chunk's compressed bytes are "
            "passed on whole here; ignored"
        )


def _gzip(msg: Any, ctx: Any, path: str) -> Library:
    mem = _uint(msg, "memory_level", 5, 1, 9, path)
    wbits = _uint(msg, "window_bits", 12, 9, 15, path)
    level = int(msg.compression_level)
    if level == 0:  # DEFAULT_COMPRESSION
        level = zlib.Z_DEFAULT_COMPRESSION
    strategy = {
        0: zlib.Z_DEFAULT_STRATEGY,
        1: zlib.Z_FILTERED,
        2: zlib.Z_HUFFMAN_ONLY,
        3: zlib.Z_RLE,
        4: zlib.Z_FIXED,
    }.get(int(msg.compression_strategy))
    if strategy is None:
        raise ConfigError(f"{path}.compression_strategy", "unknown compression strategy")
    _chunk_size(msg, ctx, path)
    gz_bits = wbits + 16  # a gzip wrapper, not a bare zlib stream
    return Library("gzip", "gzip.", lambda: _Zlib(level, gz_bits, mem, strategy))


def _brotli(msg: Any, ctx: Any, path: str) -> Library:
    try:
        import brotli as mod
    except ImportError:
        try:
            import brotlicffi as mod
        except ImportError:
            raise ConfigError(path, "brotli needs the Python package 'brotli' or 'brotlicffi'") from None
    quality = _uint(msg, "quality", 3, 0, 11, path)
    lgwin = _uint(msg, "window_bits", 18, 10, 24, path)
    lgblock = _uint(msg, "input_block_bits", 24, 16, 24, path)
    mode = {0: mod.MODE_GENERIC, 1: mod.MODE_GENERIC, 2: mod.MODE_TEXT, 3: mod.MODE_FONT}.get(
        int(msg.encoder_mode)
    )
    if mode is None:
        raise ConfigError(f"{path}.encoder_mode", "unknown encoder mode")
    if msg.disable_literal_context_modeling:
        ctx.notice(
            f"{path}.disable_literal_context_modeling: the Python brotli binding cannot set it; ignored"
        )
    _chunk_size(msg, ctx, path)
    return Library("br", "brotli.", lambda: _Brotli(mod, mode, quality, lgwin, lgblock))


def _zstd(msg: Any, ctx: Any, path: str) -> Library:
    try:
        import zstandard as mod
    except ImportError:
        raise ConfigError(path, "zstd needs the Python package 'zstandard'") from None
    level = _uint(msg, "compression_level", 3, 0, 22, path) or 3  # 0: zstd's default, 3
    strategy = int(msg.strategy)
    if not 0 <= strategy <= 9:
        raise ConfigError(f"{path}.strategy", "unknown strategy")
    if msg.HasField("dictionary"):
        ctx.notice(f"{path}.dictionary: zstd dictionaries are not supported; compressed without one")
    _chunk_size(msg, ctx, path)
    if strategy:
        # DEFAULT (0) leaves the strategy to the level; FAST..BTULTRA2 are zstd's 1..9.
        params = mod.ZstdCompressionParameters.from_level(
            level, strategy=strategy, write_checksum=bool(msg.enable_checksum)
        )
        cctx = mod.ZstdCompressor(compression_params=params)
    else:
        cctx = mod.ZstdCompressor(level=level, write_checksum=bool(msg.enable_checksum))
    # One ZstdCompressor context per library: compressobj() objects made from it are
    # independent streams, so it is shared read-only.
    return Library("zstd", "zstd.", lambda: _Zstd(mod, cctx))


def compile_library(tec: Any, ctx: Any, path: str) -> tuple[str, Library]:
    """A ``TypedExtensionConfig`` naming a compression library -> (its name, the library)."""
    if not tec.HasField("typed_config"):
        raise ConfigError(f"{path}.typed_config", "typed_config is required")
    if not tec.name:
        raise ConfigError(f"{path}.name", "name is required")
    tpath = f"{path}.typed_config"
    type_url = tec.typed_config.type_url
    ext = registry.require(LIBRARY_CATEGORY, tec.name, type_url, tpath)
    msg = unpack_any(tec.typed_config, tpath)
    if isinstance(msg, OpaqueAny):
        raise ConfigError(tpath, f"unknown compression library type {type_url!r}")
    lib: Library = ext.factory(msg, ctx, tpath)
    return tec.name, lib


# -- the filter's compiled config ----------------------------------------------------------------


def _counters(scope: Any, names: tuple[str, ...]) -> tuple[Any, ...]:
    return tuple(scope.counter(n) for n in names)


_COMMON = (
    "compressed",
    "not_compressed",
    "total_uncompressed_bytes",
    "total_compressed_bytes",
    "content_length_too_small",
)
_RESPONSE = (
    "no_accept_header",
    "header_identity",
    "header_compressor_used",
    "header_compressor_overshadowed",
    "header_wildcard",
    "header_not_valid",
    "not_compressed_etag",
)


class _Direction:
    """One direction's common config and stats."""

    __slots__ = (
        "compressed",
        "content_length_too_small",
        "enabled",
        "min_length",
        "not_compressed",
        "total_compressed",
        "total_uncompressed",
        "types",
    )

    def __init__(self, enabled: bool, min_length: int, types: frozenset[str], scope: Any) -> None:
        self.enabled = enabled
        self.min_length = min_length
        self.types = types
        (
            self.compressed,
            self.not_compressed,
            self.total_uncompressed,
            self.total_compressed,
            self.content_length_too_small,
        ) = _counters(scope, _COMMON)

    def length_ok(self, headers: HeaderMap) -> bool:
        cl = headers.get(b"content-length")
        if cl is None:
            return True
        try:
            ok = int(cl) >= self.min_length
        except ValueError:
            ok = False
        if not ok:
            self.content_length_too_small.inc()
        return ok

    def type_ok(self, headers: HeaderMap) -> bool:
        ct = headers.get(b"content-type")
        if ct is None:
            return True
        return _media_type(ct) in self.types


def _media_type(ct: bytes) -> str:
    return ct.split(b";", 1)[0].strip().lower().decode("latin-1")


class _ResponseStats:
    __slots__ = _RESPONSE

    def __init__(self, scope: Any) -> None:
        (
            self.no_accept_header,
            self.header_identity,
            self.header_compressor_used,
            self.header_compressor_overshadowed,
            self.header_wildcard,
            self.header_not_valid,
            self.not_compressed_etag,
        ) = _counters(scope, _RESPONSE)


class Config:
    """One configured compressor filter, compiled."""

    __slots__ = (
        "choose_first",
        "encoding",
        "etag_off",
        "group",
        "lib",
        "name",
        "remove_ae",
        "req",
        "resp",
        "rstats",
        "uncompressible",
    )

    def __init__(
        self,
        lib: Library,
        resp: _Direction,
        req: _Direction | None,
        etag_off: bool,
        remove_ae: bool,
        choose_first: bool,
        uncompressible: frozenset[int],
        rstats: _ResponseStats,
        group: list[Config],
        name: str,
    ) -> None:
        self.lib = lib
        self.encoding = lib.encoding
        self.resp = resp
        self.req = req  # None: request compression off
        self.etag_off = etag_off
        self.remove_ae = remove_ae
        self.choose_first = choose_first
        self.uncompressible = uncompressible
        self.rstats = rstats
        self.group = group  # every compressor filter of this http_filters list, in order
        self.name = name  # the filter's name: its typed_per_filter_config key


class _PerRoute:
    """A compiled ``CompressorPerRoute``: ``enabled`` / ``remove_ae`` (None: the filter's),
    ``lib`` (None: the filter's library)."""

    __slots__ = ("enabled", "lib", "remove_ae")

    def __init__(self, enabled: bool | None, remove_ae: bool | None, lib: Library | None) -> None:
        self.enabled = enabled
        self.remove_ae = remove_ae
        self.lib = lib


def _flag(flag: Any, path: str, ctx: Any) -> bool:
    """A RuntimeFeatureFlag: moorline has no runtime, so its default_value decides."""
    if flag.runtime_key:
        ctx.notice(f"{path}.runtime_key: no runtime; default_value used")
    return bool(flag.default_value.value) if flag.HasField("default_value") else True


def _common(cc: Any, legacy: Any, scope: Any, ctx: Any, path: str, default_on: bool) -> _Direction:
    """A direction from a CommonDirectionConfig, or from the deprecated top-level fields."""
    src = cc if cc is not None else legacy
    enabled = default_on
    min_len = DEFAULT_MIN_CONTENT_LENGTH
    types: list[str] = []
    if src is not None:
        if cc is not None:
            if cc.HasField("enabled"):
                enabled = _flag(cc.enabled, f"{path}.enabled", ctx)
            if cc.HasField("min_content_length") and cc.min_content_length.value > 0:
                min_len = int(cc.min_content_length.value)
            types = list(cc.content_type)
        else:
            if legacy.HasField("runtime_enabled"):
                enabled = _flag(legacy.runtime_enabled, f"{path}.runtime_enabled", ctx)
            if legacy.HasField("content_length") and legacy.content_length.value > 0:
                min_len = int(legacy.content_length.value)
            types = list(legacy.content_type)
    tset = frozenset(t.strip().lower() for t in types) if types else DEFAULT_CONTENT_TYPES
    return _Direction(enabled, min_len, tset, scope)


def _factory(cfg: Any, ctx: Any, path: str) -> Any:
    if cfg is None:
        raise ConfigError(f"{path}.typed_config", "typed_config is required")
    tpath = f"{path}.typed_config"
    if not cfg.HasField("compressor_library"):
        raise ConfigError(f"{tpath}.compressor_library", "compressor_library is required")
    lib_name, lib = compile_library(cfg.compressor_library, ctx, f"{tpath}.compressor_library")
    prefix = ctx.http_stat_prefix
    base = ctx.stats.scope(f"{prefix}compressor.{lib_name}.{lib.stat_prefix}")
    has_resp = cfg.HasField("response_direction_config")
    legacy_used = any(
        (
            cfg.HasField("content_length"),
            len(cfg.content_type) > 0,
            cfg.disable_on_etag_header,
            cfg.remove_accept_encoding_header,
            cfg.HasField("runtime_enabled"),
        )
    )
    uncompressible: frozenset[int] = frozenset()
    if has_resp:
        rdc = cfg.response_direction_config
        rpath = f"{tpath}.response_direction_config"
        if legacy_used:
            ctx.notice(
                f"{tpath}: the deprecated content_length / content_type / disable_on_etag_header / "
                "remove_accept_encoding_header / runtime_enabled are overridden by "
                "response_direction_config; ignored"
            )
        resp = _common(
            rdc.common_config if rdc.HasField("common_config") else None,
            None,
            base.scope("response."),
            ctx,
            f"{rpath}.common_config",
            True,
        )
        etag_off = bool(rdc.disable_on_etag_header)
        remove_ae = bool(rdc.remove_accept_encoding_header)
        for i, code in enumerate(rdc.uncompressible_response_codes):
            if not 100 <= code <= 599:
                raise ConfigError(f"{rpath}.uncompressible_response_codes[{i}]", "not an HTTP status")
        uncompressible = frozenset(int(c) for c in rdc.uncompressible_response_codes)
        if rdc.status_header_enabled:
            ctx.notice(f"{rpath}.status_header_enabled: the compression status header is not added; ignored")
    else:
        resp = _common(None, cfg, base, ctx, tpath, True)
        etag_off = bool(cfg.disable_on_etag_header)
        remove_ae = bool(cfg.remove_accept_encoding_header)
    req: _Direction | None = None
    if cfg.HasField("request_direction_config"):
        qdc = cfg.request_direction_config
        req = _common(
            qdc.common_config if qdc.HasField("common_config") else None,
            None,
            base.scope("request."),
            ctx,
            f"{tpath}.request_direction_config.common_config",
            True,
        )
        if not req.enabled:
            req = None
    # The filters of one http_filters list find each other here (Envoy keeps the list in the
    # stream's filter state): the group is complete once the list is compiled.
    state = ctx.http_chain_state
    group: list[Config] = state.setdefault("compressors", []) if state is not None else []
    c = Config(
        lib,
        resp,
        req,
        etag_off,
        remove_ae,
        bool(cfg.choose_first),
        uncompressible,
        _ResponseStats(base),
        group,
        ctx.http_filter_name or NAME,
    )
    group.append(c)
    return lambda stream: CompressorFilter(c)


def _per_route(msg: Any, path: str) -> _PerRoute:
    which = msg.WhichOneof("override")
    if which == "disabled":
        if not msg.disabled:
            raise ConfigError(f"{path}.disabled", "must be true when set")
        return _PerRoute(False, None, None)
    if which != "overrides":
        raise ConfigError(path, "one of disabled or overrides is required")
    ov = msg.overrides
    enabled = remove_ae = None
    if ov.HasField("response_direction_config"):
        enabled = True  # an empty response_direction_config enables compression, as in Envoy
        rd = ov.response_direction_config
        if rd.HasField("remove_accept_encoding_header"):
            remove_ae = bool(rd.remove_accept_encoding_header.value)
    lib = None
    if ov.HasField("compressor_library"):
        # No build context on this path: library notices (chunk_size, ...) are dropped, the
        # settings that matter are checked the same way.
        _, lib = compile_library(ov.compressor_library, _Quiet(), f"{path}.overrides.compressor_library")
    return _PerRoute(enabled, remove_ae, lib)


class _Quiet:
    __slots__ = ()

    def notice(self, msg: str, path: str | None = None) -> None:
        pass


# -- Accept-Encoding -------------------------------------------------------------------------------

_USED, _OVERSHADOWED, _IDENTITY, _WILDCARD, _NOT_VALID = range(5)


def _parse_accept(value: bytes) -> list[tuple[str, float]]:
    """``gzip;q=0.5, br`` -> [("gzip", 0.5), ("br", 1.0)]; tokens with an unreadable q-value are
    skipped (Envoy does the same)."""
    out = []
    for tok in value.split(b","):
        tok = tok.strip()
        if not tok:
            continue
        name, _, params = tok.partition(b";")
        q = 1.0
        ok = True
        for p in params.split(b";"):
            k, eq, v = p.partition(b"=")
            if eq and k.strip().lower() == b"q":
                try:
                    q = float(v.strip())
                except ValueError:
                    ok = False
                if q != q or q < 0:  # NaN or negative
                    ok = False
        if ok:
            out.append((name.strip().lower().decode("latin-1"), q))
    return out


def _choose(accept: bytes, media: str | None, encodings: list[tuple[str, bool]]) -> tuple[str, int]:
    """The encoding one response gets: (encoding or "identity", which header stat applies).
    ``encodings`` are the chain's compressors in config order as (encoding, choose_first), those
    whose content types exclude ``media`` already left out."""
    allowed: dict[str, tuple[int, bool]] = {}
    for i, (enc, first) in enumerate(encodings):
        allowed.setdefault(enc, (i, first))
    pairs = _parse_accept(accept)
    for enc, q in pairs:
        if q == 0:
            allowed.pop(enc, None)
    if not pairs or not allowed:
        return "identity", _NOT_VALID
    best, best_q = "identity", 0.0
    for enc, q in pairs:
        if enc in allowed or enc in ("identity", "*"):
            if q > best_q or (q == best_q and q > 0 and enc in allowed and allowed[enc][1]):
                best, best_q = enc, q
    if best_q == 0:
        return "identity", _NOT_VALID
    if best == "identity":
        return "identity", _IDENTITY
    if best == "*":
        return min(allowed.items(), key=lambda kv: kv[1][0])[0], _WILDCARD
    return best, _USED


# -- the filter -------------------------------------------------------------------------------------


class CompressorFilter(HttpFilter):
    __slots__ = ("accept", "cfg", "head", "pr", "qc", "rc")

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.accept: bytes | None = None
        self.head = False
        self.pr: _PerRoute | None = None
        self.rc: Any = None  # the response's stream compressor, only while compressing
        self.qc: Any = None  # the request's

    # -- request
    def decode_headers(self, headers: Any, end_stream: bool) -> int:
        cfg = self.cfg
        cb = self.callbacks
        ae = headers.get_all(b"accept-encoding")
        if ae:
            self.accept = b",".join(ae)
        self.head = headers.method == b"HEAD"
        pr = self.pr = cb.route_config(cfg.name) if cb is not None else None
        if self._enabled(pr) and (
            pr.remove_ae if pr is not None and pr.remove_ae is not None else cfg.remove_ae
        ):
            headers.remove(b"accept-encoding")
        req = cfg.req
        if req is None:
            return CONTINUE
        if (
            not end_stream
            and b"upgrade" not in headers
            and headers.method != b"CONNECT"
            and req.length_ok(headers)
            and req.type_ok(headers)
            and b"content-encoding" not in headers
            and _te_ok(headers, cfg.encoding)
        ):
            lib = pr.lib if pr is not None and pr.lib is not None else cfg.lib
            headers.remove(b"content-length")
            headers.set(b"content-encoding", lib.encoding.encode())
            req.compressed.inc()
            self.qc = lib.make()
        else:
            req.not_compressed.inc()
        return CONTINUE

    def decode_data(self, data: bytes, end_stream: bool) -> int:
        qc = self.qc
        if qc is None or (not data and not end_stream):
            return CONTINUE
        req = self.cfg.req
        assert req is not None and self.callbacks is not None
        out = qc.finish(data) if end_stream else qc.chunk(data)
        if end_stream:
            self.qc = None
        req.total_uncompressed.inc(len(data))
        req.total_compressed.inc(len(out))
        self.callbacks.set_decoded_data(out)
        return CONTINUE

    def decode_trailers(self, trailers: HeaderMap) -> int:
        qc = self.qc
        if qc is not None:
            self.qc = None
            out = qc.finish(b"")
            assert self.cfg.req is not None and self.callbacks is not None
            self.cfg.req.total_compressed.inc(len(out))
            self.callbacks.set_decoded_data(out)
        return CONTINUE

    # -- response
    def _enabled(self, pr: _PerRoute | None) -> bool:
        if pr is not None and pr.enabled is not None:
            return pr.enabled
        return self.cfg.resp.enabled

    def encode_headers(self, headers: Any, end_stream: bool) -> int:
        cfg = self.cfg
        resp = cfg.resp
        pr = self.pr
        status = headers.status
        # Bodiless answers are "end of stream" whatever the framing says.
        bodiless = end_stream or self.head or status < 200 or status in _NO_BODY_STATUS
        big_enough = self._enabled(pr) and resp.length_ok(headers)
        compressible = (
            big_enough
            and status >= 200  # an interim answer is no representation to vary
            and status not in cfg.uncompressible
            and resp.type_ok(headers)
            and not _no_transform(headers)
            and self._etag_ok(headers)
            and b"content-encoding" not in headers
        )
        lib = pr.lib if pr is not None and pr.lib is not None else cfg.lib
        if (
            not bodiless
            and big_enough
            and self._accepts(headers, lib.encoding)
            and compressible
            and _te_ok(headers, lib.encoding)
        ):
            etag = headers.get(b"etag")
            if etag is not None and not etag[:2].lower() == b"w/":
                headers.set(b"etag", b"W/" + etag)
            headers.remove(b"content-length")
            headers.set(b"content-encoding", lib.encoding.encode())
            resp.compressed.inc()
            self.rc = lib.make()
        else:
            resp.not_compressed.inc()
        if compressible:
            _add_vary(headers)
        return CONTINUE

    def _etag_ok(self, headers: Any) -> bool:
        if self.cfg.etag_off and b"etag" in headers:
            self.cfg.rstats.not_compressed_etag.inc()
            return False
        return True

    def _accepts(self, headers: Any, encoding: str) -> bool:
        st = self.cfg.rstats
        accept = self.accept
        if accept is None:
            st.no_accept_header.inc()
            return False
        ct = headers.get(b"content-type")
        media = _media_type(ct) if ct is not None else None
        cb = self.callbacks
        encs = []
        for c in self.cfg.group:
            if media is not None and media not in c.resp.types:
                continue
            enc = c.encoding
            if c is not self.cfg and cb is not None:
                other = cb.route_config(c.name)
                if other is not None and other.lib is not None:
                    enc = other.lib.encoding
            elif c is self.cfg:
                enc = encoding
            encs.append((enc, c.choose_first))
        chosen, stat = _choose(accept, media, encs)
        used = chosen == encoding
        if stat == _USED:
            (st.header_compressor_used if used else st.header_compressor_overshadowed).inc()
        elif stat == _IDENTITY:
            st.header_identity.inc()
        elif stat == _WILDCARD:
            st.header_wildcard.inc()
        else:
            st.header_not_valid.inc()
        return used

    def encode_data(self, data: bytes, end_stream: bool) -> int:
        rc = self.rc
        if rc is None or (not data and not end_stream):
            return CONTINUE
        resp = self.cfg.resp
        if end_stream:
            self.rc = None
            out = rc.finish(data)
        else:
            out = rc.chunk(data)
        resp.total_uncompressed.inc(len(data))
        resp.total_compressed.inc(len(out))
        assert self.callbacks is not None
        self.callbacks.set_encoded_data(out)
        return CONTINUE

    def encode_trailers(self, trailers: HeaderMap) -> int:
        rc = self.rc
        if rc is not None:
            # Trailers end the body: the compressed stream's last block goes before them.
            self.rc = None
            out = rc.finish(b"")
            self.cfg.resp.total_compressed.inc(len(out))
            assert self.callbacks is not None
            self.callbacks.set_encoded_data(out)
        return CONTINUE

    def on_destroy(self) -> None:
        self.rc = self.qc = None


def _no_transform(headers: Any) -> bool:
    for v in headers.get_all(b"cache-control"):
        for tok in v.split(b","):
            if tok.strip().lower() == b"no-transform":
                return True
    return False


def _te_ok(headers: Any, encoding: str) -> bool:
    te = headers.get(b"transfer-encoding")
    if te is None:
        return True
    own = encoding.encode()
    for tok in te.split(b","):
        t = tok.strip().lower()
        if t in _COMPRESSING_TE or t == own:
            return False
    return True


def _add_vary(headers: Any) -> None:
    vals = headers.get_all(b"vary")
    if not vals:
        headers.set(b"vary", b"Accept-Encoding")
        return
    joined = b", ".join(vals)
    for tok in joined.split(b","):
        if tok.strip().lower() in (b"accept-encoding", b"*"):
            return
    headers.set(b"vary", joined + b", Accept-Encoding")


registry.register(LIBRARY_CATEGORY, [GZIP_NAME], ["type.googleapis.com/" + GZIP_TYPE], _gzip)
registry.register(LIBRARY_CATEGORY, [BROTLI_NAME], ["type.googleapis.com/" + BROTLI_TYPE], _brotli)
registry.register(LIBRARY_CATEGORY, [ZSTD_NAME], ["type.googleapis.com/" + ZSTD_TYPE], _zstd)
registry.register(
    "http",
    [NAME],
    ["type.googleapis.com/" + TYPE],
    _factory,
    per_route=_per_route,
    per_route_types=["type.googleapis.com/" + PER_ROUTE_TYPE],
)
