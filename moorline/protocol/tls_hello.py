"""Sans-IO TLS ClientHello reader: SNI and ALPN without terminating TLS.

``parse_client_hello(data)`` looks at the first bytes a client sent (the listener peeks them
without consuming) and says whether they are a TLS ClientHello, and if so which server name
(``server_name`` extension, RFC 6066) and which ALPN protocols (RFC 7301) the client asked for.
It never raises on peer input: malformed bytes are ``NOT_TLS``.

The ClientHello may span several TLS records (large key shares); fragments of consecutive
handshake records are joined. Bound: at most ``MAX_CLIENT_HELLO`` (64 KiB) bytes are ever looked
at; a hello that does not fit is ``TOO_LARGE`` (Envoy's ``client_hello_too_large``).
"""

from __future__ import annotations

NEED_MORE = "need_more"  # a TLS record header was seen, the hello is not complete yet
TLS = "tls"  # a complete ClientHello was parsed
NOT_TLS = "not_tls"  # not TLS, or malformed TLS
TOO_LARGE = "too_large"  # TLS, but the hello is larger than MAX_CLIENT_HELLO

MAX_CLIENT_HELLO = 64 * 1024

_CT_HANDSHAKE = 0x16
_HS_CLIENT_HELLO = 0x01
_EXT_SERVER_NAME = 0x0000
_EXT_ALPN = 0x0010
_MAX_RECORD = 16384 + 2048  # TLSPlaintext.length bound (plus slack for TLS 1.2 compressed/encrypted)


class _Malformed(Exception):
    pass


def parse_client_hello(data: bytes) -> tuple[str, str | None, list[str]]:
    """``(status, sni, alpn)``: status is ``NEED_MORE``, ``TLS``, ``NOT_TLS`` or ``TOO_LARGE``.

    ``sni`` (lower-cased, without a trailing dot) and ``alpn`` are only meaningful with ``TLS``.
    """
    data = bytes(data[: MAX_CLIENT_HELLO + 5])
    if not data:
        return NEED_MORE, None, []
    if data[0] != _CT_HANDSHAKE:
        return NOT_TLS, None, []
    # Join handshake fragments from consecutive records.
    hs = bytearray()
    pos = 0
    need: int | None = None  # total handshake message length incl. its 4-byte header
    while True:
        if len(data) - pos < 5:
            # A partial record header: check what we can see of it before asking for more.
            if len(data) - pos >= 2 and data[pos + 1] != 3:
                return NOT_TLS, None, []
            return _more(pos)
        ctype, major, _minor = data[pos], data[pos + 1], data[pos + 2]
        rlen = int.from_bytes(data[pos + 3 : pos + 5], "big")
        if ctype != _CT_HANDSHAKE or major != 3 or rlen == 0 or rlen > _MAX_RECORD:
            return NOT_TLS, None, []
        body = data[pos + 5 : pos + 5 + rlen]
        hs += body
        if need is None and len(hs) >= 4:
            if hs[0] != _HS_CLIENT_HELLO:
                return NOT_TLS, None, []
            need = 4 + int.from_bytes(hs[1:4], "big")
            if need > MAX_CLIENT_HELLO:
                return TOO_LARGE, None, []
        if len(body) < rlen:
            return _more(pos + 5 + rlen)
        pos += 5 + rlen
        if need is not None and len(hs) >= need:
            break
    try:
        sni, alpn = _parse_hello_body(memoryview(bytes(hs[4:need])))
    except _Malformed:
        return NOT_TLS, None, []
    return TLS, sni, alpn


def _more(seen: int) -> tuple[str, str | None, list[str]]:
    if seen >= MAX_CLIENT_HELLO:
        return TOO_LARGE, None, []
    return NEED_MORE, None, []


class _Reader:
    __slots__ = ("buf", "pos")

    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.pos = 0

    def take(self, n: int) -> memoryview:
        end = self.pos + n
        if end > len(self.buf):
            raise _Malformed
        v = self.buf[self.pos : end]
        self.pos = end
        return v

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def vec8(self) -> memoryview:
        return self.take(self.u8())

    def vec16(self) -> memoryview:
        return self.take(self.u16())

    def done(self) -> bool:
        return self.pos >= len(self.buf)


def _parse_hello_body(body: memoryview) -> tuple[str | None, list[str]]:
    r = _Reader(body)
    if r.u8() != 3:  # legacy_version major
        raise _Malformed
    r.take(1 + 32)  # minor + random
    r.vec8()  # legacy_session_id
    if r.u16() % 2:  # cipher_suites length must be even
        raise _Malformed
    r.pos -= 2
    r.vec16()
    r.vec8()  # legacy_compression_methods
    sni: str | None = None
    alpn: list[str] = []
    if r.done():
        return sni, alpn  # SSLv3-style hello without extensions
    exts = _Reader(r.vec16())
    if not r.done():
        raise _Malformed  # the extensions must end exactly where the hello ends
    while not exts.done():
        etype = exts.u16()
        edata = _Reader(exts.vec16())
        if etype == _EXT_SERVER_NAME and sni is None:
            names = _Reader(edata.vec16())
            while not names.done():
                ntype = names.u8()
                name = names.vec16()
                if ntype == 0 and sni is None:
                    try:
                        sni = bytes(name).decode("ascii").lower().rstrip(".") or None
                    except UnicodeDecodeError:
                        raise _Malformed from None
        elif etype == _EXT_ALPN and not alpn:
            protos = _Reader(edata.vec16())
            while not protos.done():
                p = protos.vec8()
                if not p:
                    raise _Malformed
                alpn.append(bytes(p).decode("latin-1"))
    return sni, alpn
