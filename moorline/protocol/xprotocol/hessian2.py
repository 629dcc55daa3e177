"""A small Hessian 2.0 reader and writer, enough for Dubbo's request prefix and attachments.

Sans-IO and bounded: ``Hessian2Reader(buf)`` reads values from a ``bytes``/``memoryview`` it
never copies as a whole; nesting deeper than ``MAX_DEPTH`` and every malformed or truncated
input raise ``CodecError`` (and nothing else). Every value read consumes at least one byte, and
a length or count is checked against the bytes left before anything is built, so reading is
linear in the input and never allocates more than the input's size.

What it reads (the Hessian 2.0 grammar, the value kinds Dubbo bodies carry): null, boolean,
int and long (all compact forms), double (all compact forms), date, string (compact, medium,
chunked ``R``/``S``), binary (compact, medium, chunked ``A``/``B``), lists (typed or not, fixed
or variable length), maps (``H`` untyped, ``M`` typed), class definitions ``C`` and objects
``O``/``0x60``-``0x6f`` (returned as ``{field: value}`` dicts), and references ``Q`` (returned
as :class:`Ref`, never resolved: the reader keeps no object table). Types (``[int``, a class
name, or a reference to an earlier type) are read and dropped.

Strings: Hessian counts UTF-16 code units and writes each as (modified) UTF-8; a supplementary
character written as one 4-byte sequence counts as two units, a surrogate pair written as two
3-byte sequences is joined back.

The writer (:func:`encode`) covers what tests and local replies need: None, bool, int, float,
str, bytes, list/tuple, dict (untyped ``H`` map), and :class:`Obj` (a typed object with its
class definition written once per :class:`Hessian2Writer`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from moorline.protocol.xprotocol.api import CodecError

MAX_DEPTH = 64  # nesting of lists, maps and objects

_U16 = struct.Struct(">H")
_I32 = struct.Struct(">i")
_I64 = struct.Struct(">q")
_F64 = struct.Struct(">d")


@dataclass(frozen=True, slots=True)
class Ref:
    """A back reference (``Q``) to the n-th list, map or object of the stream."""

    index: int


@dataclass(slots=True)
class Obj:
    """A typed object to write: Java class name and its fields in order."""

    cls: str
    fields: dict[str, Any] = field(default_factory=dict)


def _utf8_units(view: memoryview, pos: int, units: int) -> tuple[int, int]:
    """Byte length of ``units`` UTF-16 code units written as UTF-8 from ``pos``; (end, units
    actually covered, which may exceed ``units`` by one for a trailing 4-byte sequence)."""
    end = len(view)
    got = 0
    while got < units:
        if pos >= end:
            raise CodecError("hessian2: string truncated")
        b = view[pos]
        if b < 0x80:
            pos += 1
            got += 1
        elif 0xC0 <= b < 0xE0:
            pos += 2
            got += 1
        elif 0xE0 <= b < 0xF0:
            pos += 3
            got += 1
        elif 0xF0 <= b < 0xF8:
            pos += 4
            got += 2
        else:
            raise CodecError("hessian2: bad UTF-8 in string")
    if pos > end:
        raise CodecError("hessian2: string truncated")
    return pos, got


def _decode_text(data: bytes) -> str:
    if data.isascii():
        return data.decode("ascii")
    try:
        text = data.decode("utf-8", "surrogatepass")
        # Java writes supplementary characters as two 3-byte surrogates: join them.
        return text.encode("utf-16", "surrogatepass").decode("utf-16")
    except UnicodeError as e:
        raise CodecError("hessian2: bad UTF-8 in string") from e


class Hessian2Reader:
    """Reads Hessian 2.0 values from ``buf`` starting at ``pos``; ``pos`` is where the next
    value starts. Class definitions seen so far are kept (their field counts), as the stream
    requires; their number is bounded by the input size."""

    __slots__ = ("buf", "classes", "pos", "view")

    def __init__(self, buf: bytes | memoryview, pos: int = 0) -> None:
        self.buf = buf
        self.view = memoryview(buf)
        self.pos = pos
        self.classes: list[tuple[str, list[str]]] = []

    @property
    def at_end(self) -> bool:
        return self.pos >= len(self.view)

    def _byte(self) -> int:
        pos = self.pos
        if pos >= len(self.view):
            raise CodecError("hessian2: truncated")
        self.pos = pos + 1
        return self.view[pos]

    def _take(self, n: int) -> memoryview:
        pos = self.pos
        if n < 0 or pos + n > len(self.view):
            raise CodecError("hessian2: truncated")
        self.pos = pos + n
        return self.view[pos : pos + n]

    def _count(self, n: int) -> int:
        """A list length or field count: each element takes a byte at least."""
        if n < 0 or n > len(self.view) - self.pos:
            raise CodecError("hessian2: length beyond the input")
        return n

    def peek(self) -> int:
        if self.pos >= len(self.view):
            raise CodecError("hessian2: truncated")
        return self.view[self.pos]

    # -- scalars -------------------------------------------------------------------------

    def read_int(self) -> int:
        """An ``int`` (any compact form); other values are an error."""
        b = self._byte()
        v = self._int_tail(b)
        if v is None:
            raise CodecError(f"hessian2: expected int, got 0x{b:02x}")
        return v

    def _int_tail(self, b: int) -> int | None:
        if 0x80 <= b <= 0xBF:
            return b - 0x90
        if 0xC0 <= b <= 0xCF:
            return ((b - 0xC8) << 8) | self._byte()
        if 0xD0 <= b <= 0xD7:
            t = self._take(2)
            return ((b - 0xD4) << 16) | (t[0] << 8) | t[1]
        if b == 0x49:  # I
            return int(_I32.unpack(self._take(4))[0])
        return None

    def read_string(self) -> str:
        """A string (any form, chunks joined); ``null`` reads as ``""``."""
        b = self._byte()
        if b == 0x4E:
            return ""
        s = self._string_tail(b)
        if s is None:
            raise CodecError(f"hessian2: expected string, got 0x{b:02x}")
        return s

    def _string_tail(self, b: int) -> str | None:
        parts: list[bytes] = []
        while True:
            final = True
            if b <= 0x1F:
                units = b
            elif 0x30 <= b <= 0x33:
                units = ((b - 0x30) << 8) | self._byte()
            elif b in (0x52, 0x53):  # R: non-final chunk, S: final
                units = _U16.unpack(self._take(2))[0]
                final = b == 0x53
            else:
                if parts:
                    raise CodecError(f"hessian2: bad string chunk 0x{b:02x}")
                return None
            start = self.pos
            # Fast path: all ASCII, one byte per unit (checked in C, not walked in Python).
            data = bytes(self.view[start : start + units])
            if len(data) != units or not data.isascii():
                end, _ = _utf8_units(self.view, start, units)
                data = bytes(self.view[start:end])
            parts.append(data)
            self.pos = start + len(data)
            if final:
                return _decode_text(b"".join(parts))
            b = self._byte()

    def _binary_tail(self, b: int) -> bytes:
        parts: list[bytes] = []
        while True:
            final = True
            if 0x20 <= b <= 0x2F:
                n = b - 0x20
            elif 0x34 <= b <= 0x37:
                n = ((b - 0x34) << 8) | self._byte()
            elif b in (0x41, 0x42):  # A: non-final chunk, B: final
                n = _U16.unpack(self._take(2))[0]
                final = b == 0x42
            else:
                raise CodecError(f"hessian2: bad binary chunk 0x{b:02x}")
            parts.append(bytes(self._take(n)))
            if final:
                return b"".join(parts)
            b = self._byte()

    def _type(self) -> None:
        """A type: a string (a name) or an int (a reference to an earlier type)."""
        b = self._byte()
        if self._string_tail(b) is None and self._int_tail(b) is None:
            raise CodecError(f"hessian2: bad type 0x{b:02x}")

    # -- any value -------------------------------------------------------------------------

    def read(self, depth: int = 0) -> Any:
        """The next value, whatever its kind."""
        if depth > MAX_DEPTH:
            raise CodecError("hessian2: nested too deep")
        b = self._byte()
        while b == 0x43:  # C: a class definition, then the value that follows
            name = self.read_string()
            n = self._count(self.read_int())
            self.classes.append((name, [self.read_string() for _ in range(n)]))
            b = self._byte()
        v = self._int_tail(b)
        if v is not None:
            return v
        if b == 0x4E:
            return None
        if b == 0x54:
            return True
        if b == 0x46:
            return False
        if b <= 0x1F or 0x30 <= b <= 0x33 or b in (0x52, 0x53):
            return self._string_tail(b)
        if 0x20 <= b <= 0x2F or 0x34 <= b <= 0x37 or b in (0x41, 0x42):
            return self._binary_tail(b)
        if 0xD8 <= b <= 0xEF:
            return b - 0xE0
        if 0xF0 <= b <= 0xFF:
            return ((b - 0xF8) << 8) | self._byte()
        if 0x38 <= b <= 0x3F:
            t = self._take(2)
            return ((b - 0x3C) << 16) | (t[0] << 8) | t[1]
        if b == 0x59:  # long as int32
            return int(_I32.unpack(self._take(4))[0])
        if b == 0x4C:  # L
            return int(_I64.unpack(self._take(8))[0])
        if b == 0x5B:
            return 0.0
        if b == 0x5C:
            return 1.0
        if b == 0x5D:
            return float(struct.unpack(">b", self._take(1))[0])
        if b == 0x5E:
            return float(struct.unpack(">h", self._take(2))[0])
        if b == 0x5F:  # millis as int32
            return _I32.unpack(self._take(4))[0] / 1000.0
        if b == 0x44:  # D
            return float(_F64.unpack(self._take(8))[0])
        if b == 0x4A:  # date, ms since the epoch
            return int(_I64.unpack(self._take(8))[0])
        if b == 0x4B:  # date, minutes since the epoch
            return int(_I32.unpack(self._take(4))[0]) * 60000
        if b == 0x51:  # Q: reference
            return Ref(self.read_int())
        if b == 0x48:  # H: untyped map
            return self._map_body(depth)
        if b == 0x4D:  # M: typed map
            self._type()
            return self._map_body(depth)
        if 0x70 <= b <= 0x77:  # fixed typed list, short
            self._type()
            return self._list_n(b - 0x70, depth)
        if 0x78 <= b <= 0x7F:  # fixed untyped list, short
            return self._list_n(b - 0x78, depth)
        if b == 0x55:  # U: variable typed list
            self._type()
            return self._list_z(depth)
        if b == 0x56:  # V: fixed typed list
            self._type()
            return self._list_n(self.read_int(), depth)
        if b == 0x57:  # W: variable untyped list
            return self._list_z(depth)
        if b == 0x58:  # X: fixed untyped list
            return self._list_n(self.read_int(), depth)
        if b == 0x4F:  # O: object, class by index
            return self._object(self.read_int(), depth)
        if 0x60 <= b <= 0x6F:
            return self._object(b - 0x60, depth)
        raise CodecError(f"hessian2: unknown tag 0x{b:02x}")

    def skip(self) -> None:
        """Skip the next value."""
        self.read()

    def _list_n(self, n: int, depth: int) -> list[Any]:
        n = self._count(n)
        return [self.read(depth + 1) for _ in range(n)]

    def _list_z(self, depth: int) -> list[Any]:
        out = []
        while self.peek() != 0x5A:  # Z
            out.append(self.read(depth + 1))
        self.pos += 1
        return out

    def _map_body(self, depth: int) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        while self.peek() != 0x5A:
            k = self.read(depth + 1)
            v = self.read(depth + 1)
            try:
                out[k] = v
            except TypeError:  # an unhashable key (a list or map as key): kept out
                pass
        self.pos += 1
        return out

    def _object(self, index: int, depth: int) -> dict[str, Any]:
        if not 0 <= index < len(self.classes):
            raise CodecError("hessian2: object of an undefined class")
        _, names = self.classes[index]
        return {name: self.read(depth + 1) for name in names}


# -- writer ------------------------------------------------------------------------------


def _utf16_units(s: str) -> int:
    return len(s) + sum(1 for c in s if ord(c) > 0xFFFF)


def encode_string(s: str) -> bytes:
    """A Hessian 2.0 string (chunked beyond 65535 UTF-16 units)."""
    out = bytearray()
    while True:
        # Chunks split on characters; a chunk of at most 32767 characters is at most 65534 units.
        chunk, s = (s[:32767], s[32767:]) if _utf16_units(s) > 0xFFFF else (s, "")
        units = _utf16_units(chunk)
        data = chunk.encode("utf-8", "surrogatepass")
        if s:
            out += b"R" + _U16.pack(units)
        elif units <= 0x1F:
            out.append(units)
        elif units <= 0x3FF:
            out += bytes((0x30 + (units >> 8), units & 0xFF))
        else:
            out += b"S" + _U16.pack(units)
        out += data
        if not s:
            return bytes(out)


def encode_int(v: int) -> bytes:
    if -0x10 <= v <= 0x2F:
        return bytes((v + 0x90,))
    if -0x800 <= v <= 0x7FF:
        return bytes((0xC8 + (v >> 8), v & 0xFF))
    if -0x40000 <= v <= 0x3FFFF:
        return bytes((0xD4 + (v >> 16), (v >> 8) & 0xFF, v & 0xFF))
    return b"I" + _I32.pack(v)


def encode_long(v: int) -> bytes:
    if -0x08 <= v <= 0x0F:
        return bytes((v + 0xE0,))
    if -0x800 <= v <= 0x7FF:
        return bytes((0xF8 + (v >> 8), v & 0xFF))
    if -0x40000 <= v <= 0x3FFFF:
        return bytes((0x3C + (v >> 16), (v >> 8) & 0xFF, v & 0xFF))
    if -(2**31) <= v < 2**31:
        return b"Y" + _I32.pack(v)
    return b"L" + _I64.pack(v)


def encode_binary(v: bytes) -> bytes:
    out = bytearray()
    while len(v) > 0xFFFF:
        out += b"A" + _U16.pack(0xFFFF) + v[:0xFFFF]
        v = v[0xFFFF:]
    n = len(v)
    if n <= 0x0F:
        out.append(0x20 + n)
    elif n <= 0x3FF:
        out += bytes((0x34 + (n >> 8), n & 0xFF))
    else:
        out += b"B" + _U16.pack(n)
    out += v
    return bytes(out)


class Hessian2Writer:
    """Writes values into one stream (class definitions are written once per writer)."""

    __slots__ = ("classes", "out")

    def __init__(self) -> None:
        self.out = bytearray()
        self.classes: dict[tuple[str, tuple[str, ...]], int] = {}

    def write(self, v: Any) -> Hessian2Writer:
        out = self.out
        if v is None:
            out.append(0x4E)
        elif v is True:
            out.append(0x54)
        elif v is False:
            out.append(0x46)
        elif isinstance(v, int):
            out += encode_int(v) if -(2**31) <= v < 2**31 else encode_long(v)
        elif isinstance(v, float):
            out += b"D" + _F64.pack(v)
        elif isinstance(v, str):
            out += encode_string(v)
        elif isinstance(v, bytes | bytearray):
            out += encode_binary(bytes(v))
        elif isinstance(v, list | tuple):
            n = len(v)
            out += bytes((0x78 + n,)) if n <= 7 else b"X" + encode_int(n)
            for item in v:
                self.write(item)
        elif isinstance(v, dict):
            out.append(0x48)
            for k, item in v.items():
                self.write(k)
                self.write(item)
            out.append(0x5A)
        elif isinstance(v, Obj):
            key = (v.cls, tuple(v.fields))
            index = self.classes.get(key)
            if index is None:
                index = self.classes[key] = len(self.classes)
                out.append(0x43)
                out += encode_string(v.cls) + encode_int(len(v.fields))
                for name in v.fields:
                    out += encode_string(name)
            out += bytes((0x60 + index,)) if index <= 0x0F else b"O" + encode_int(index)
            for item in v.fields.values():
                self.write(item)
        else:
            raise TypeError(f"hessian2: cannot write {type(v).__name__}")
        return self

    def getvalue(self) -> bytes:
        return bytes(self.out)


def encode(*values: Any) -> bytes:
    """Values written one after another into one stream."""
    w = Hessian2Writer()
    for v in values:
        w.write(v)
    return w.getvalue()
