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
