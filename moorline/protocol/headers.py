"""Header map shared by every HTTP codec and filter.

Headers are kept as a list of ``[name, value]`` pairs of ``bytes`` in arrival
order; names are lower-case (HTTP/1.1 codecs lower-case on parse, HTTP/2
requires it). Lookups are linear: typical requests carry 5-20 headers, where a
scan beats building a dict per request.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from collections.abc import Set as AbstractSet


class HeaderMap:
    __slots__ = ("_h",)

    def __init__(self, pairs: Iterable[tuple[bytes, bytes]] | None = None) -> None:
        self._h: list[tuple[bytes, bytes]] = list(pairs) if pairs is not None else []

    @classmethod
    def wrap(cls, pairs: list[tuple[bytes, bytes]]) -> HeaderMap:
        """Adopt ``pairs`` without copying (names must already be lower-case)."""
        m = cls.__new__(cls)
        m._h = pairs
        return m

    def get(self, name: bytes, default: bytes | None = None) -> bytes | None:
        for k, v in self._h:
            if k == name:
                return v
        return default

    def get_all(self, name: bytes) -> list[bytes]:
        if name[:1] == b":":  # a pseudo-header of RequestHeaders / ResponseHeaders (see get)
            v = self.get(name)
            return [v] if v is not None else []
        return [v for k, v in self._h if k == name]

    def __contains__(self, name: object) -> bool:
        for k, _ in self._h:
            if k == name:
                return True
        return False

    def add(self, name: bytes, value: bytes) -> None:
        self._h.append((name, value))

    def set(self, name: bytes, value: bytes) -> None:
        """Replace every value of ``name`` by one value (kept at the first position)."""
        h = self._h
        for i, (k, _) in enumerate(h):
            if k == name:
                h[i] = (name, value)
                if len(h) > i + 1:
                    h[i + 1 :] = [p for p in h[i + 1 :] if p[0] != name]
                return
        h.append((name, value))

    def set_default(self, name: bytes, value: bytes) -> bytes:
        v = self.get(name)
        if v is None:
            self._h.append((name, value))
            return value
        return v

    def remove(self, name: bytes) -> bool:
        h = self._h
        n = len(h)
        h[:] = [p for p in h if p[0] != name]
        return len(h) != n

    def remove_many(self, names: AbstractSet[bytes]) -> None:
        self._h[:] = [p for p in self._h if p[0] not in names]

    def items(self) -> list[tuple[bytes, bytes]]:
        return self._h

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        return iter(self._h)

    def __len__(self) -> int:
        return len(self._h)

    def byte_size(self) -> int:
        return sum(len(k) + len(v) for k, v in self._h)

    def copy(self) -> HeaderMap:
        return HeaderMap.wrap(list(self._h))

    def __repr__(self) -> str:
        return f"HeaderMap({self._h!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HeaderMap) and self._h == other._h


# -- the codec-neutral request and response header types ---------------------------------------
# Every codec (HTTP/1.1, HTTP/2, later Bolt/Dubbo/HTTP/3) produces these and every consumer (the
# connection manager, filters, the router, access logs) reads them. Pseudo-headers are typed
# attributes, never entries of the list: a filter that inserts a header anywhere cannot move
# the path. ``get(b":path")`` and friends still answer, for header matchers and access-log
# commands that name a pseudo-header.

_REQ_PSEUDO = {b":method": "method", b":scheme": "scheme", b":authority": "authority", b":path": "path"}


class RequestHeaders(HeaderMap):
    """Request headers: ``method``, ``scheme``, ``authority``, ``path`` (bytes; ``authority``
    and ``path`` may be empty, e.g. ``CONNECT`` has no path) and the regular headers."""

    __slots__ = ("authority", "method", "path", "scheme")

    # The codec that built these headers has already checked ``method`` (a token) and ``path``
    # (visible ASCII) as the connection manager would (llhttp does, for HTTP/1.1); the
    # connection manager then checks only the authority.
    line_checked = False

    def __init__(
        self,
        method: bytes = b"GET",
        path: bytes = b"/",
        authority: bytes = b"",
        scheme: bytes = b"http",
        pairs: Iterable[tuple[bytes, bytes]] | None = None,
    ) -> None:
        self._h = list(pairs) if pairs is not None else []
        self.method = method
        self.path = path
        self.authority = authority
        self.scheme = scheme

    @classmethod
    def make(
        cls, method: bytes, path: bytes, authority: bytes, scheme: bytes, pairs: list[tuple[bytes, bytes]]
    ) -> RequestHeaders:
        """Adopt ``pairs`` without copying (the codecs' fast constructor)."""
        m = cls.__new__(cls)
        m._h = pairs
        m.method = method
        m.path = path
        m.authority = authority
        m.scheme = scheme
        return m

    def get(self, name: bytes, default: bytes | None = None) -> bytes | None:
        if name[:1] == b":":
            attr = _REQ_PSEUDO.get(name)
            return getattr(self, attr) if attr is not None else default
        for k, v in self._h:
            if k == name:
                return v
        return default

    def __contains__(self, name: object) -> bool:
        if isinstance(name, bytes) and name[:1] == b":":
            return name in _REQ_PSEUDO
        return HeaderMap.__contains__(self, name)

    def set(self, name: bytes, value: bytes) -> None:
        attr = _REQ_PSEUDO.get(name) if name[:1] == b":" else None
        if attr is not None:
            setattr(self, attr, value)
        else:
            HeaderMap.set(self, name, value)

    def pseudo(self) -> list[tuple[bytes, bytes]]:
        """The pseudo-headers in HTTP/2's order (empty ``:authority`` / ``:path`` left out)."""
        out = [(b":method", self.method), (b":scheme", self.scheme)]
        if self.authority:
            out.append((b":authority", self.authority))
        if self.path:
            out.append((b":path", self.path))
        return out

    def copy(self) -> RequestHeaders:
        return RequestHeaders.make(self.method, self.path, self.authority, self.scheme, list(self._h))

    def __repr__(self) -> str:
        return (
            f"RequestHeaders({self.method!r} {self.scheme!r}://{self.authority!r}{self.path!r}, {self._h!r})"
        )

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, RequestHeaders)
            and self._h == other._h
            and (self.method, self.path, self.authority, self.scheme)
            == (other.method, other.path, other.authority, other.scheme)
        )

    __hash__ = None  # type: ignore[assignment]


class ResponseHeaders(HeaderMap):
    """Response headers: ``status`` (int) and the regular headers."""

    __slots__ = ("status",)

    def __init__(self, status: int = 200, pairs: Iterable[tuple[bytes, bytes]] | None = None) -> None:
        self._h = list(pairs) if pairs is not None else []
        self.status = status

    @classmethod
    def make(cls, status: int, pairs: list[tuple[bytes, bytes]]) -> ResponseHeaders:
        """Adopt ``pairs`` without copying."""
        m = cls.__new__(cls)
        m._h = pairs
        m.status = status
        return m

    def get(self, name: bytes, default: bytes | None = None) -> bytes | None:
        if name[:1] == b":":
            return str(self.status).encode() if name == b":status" else default
        for k, v in self._h:
            if k == name:
                return v
        return default

    def __contains__(self, name: object) -> bool:
        if name == b":status":
            return True
        return HeaderMap.__contains__(self, name)

    def copy(self) -> ResponseHeaders:
        return ResponseHeaders.make(self.status, list(self._h))

    def __repr__(self) -> str:
        return f"ResponseHeaders({self.status}, {self._h!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ResponseHeaders) and self.status == other.status and self._h == other._h

    __hash__ = None  # type: ignore[assignment]
