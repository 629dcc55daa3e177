"""Compiled Envoy string matchers and RE2-compatible regexes, shared by routing, access-log
filters, RBAC-style checks and TLS SAN matching. No I/O; may be imported from any layer.

Envoy uses RE2; patterns are translated for Python ``re`` (bytes patterns) or rejected where RE2
would reject them (lookaround, backreferences). ``.`` matches one byte rather than one UTF-8
character, and ``(?i)`` folds ASCII only.
"""

from __future__ import annotations

import re
from typing import Any

from moorline.config.errors import ConfigError


def _b(s: str) -> bytes:
    return s.encode("utf-8")


def _translate_re2(pattern: str, path: str) -> str:
    """Make an RE2 pattern mean the same to Python ``re``, or reject what RE2 would reject."""
    out: list[str] = []
    i, n = 0, len(pattern)
    in_class = False
    while i < n:
        c = pattern[i]
        if c == "\\" and i + 1 < n:
            nxt = pattern[i + 1]
            if not in_class:
                if nxt == "z":
                    out.append("\\Z")
                    i += 2
                    continue
                if nxt in "123456789":
                    raise ConfigError(path, "backreferences are not supported (RE2 syntax)")
            out.append(pattern[i : i + 2])
            i += 2
            continue
        if in_class:
            if c == "]":
                in_class = False
            out.append(c)
            i += 1
            continue
        if c == "[":
            in_class = True
            out.append(c)
            i += 1
            # A ']' right after '[' or '[^' is a literal member, not the end of the class.
            if i < n and pattern[i] == "^":
                out.append("^")
                i += 1
            if i < n and pattern[i] == "]":
                out.append("]")
                i += 1
            continue
        if c == "(" and pattern.startswith("(?", i):
            rest = pattern[i + 2 : i + 4]
            if rest[:1] in ("=", "!") or rest in ("<=", "<!"):
                raise ConfigError(path, "lookaround assertions are not supported (RE2 syntax)")
            if pattern.startswith("(?P=", i):
                raise ConfigError(path, "backreferences are not supported (RE2 syntax)")
            if rest[:1] == "<":
                out.append("(?P<")
                i += 3
                continue
        out.append(c)
        i += 1
    return "".join(out)


def compile_regex(rm: Any, path: str) -> re.Pattern[bytes]:
    """``envoy.type.matcher.v3.RegexMatcher`` -> compiled bytes pattern; errors at ``path.regex``."""
    p = f"{path}.regex"
    if not rm.regex:
        raise ConfigError(p, "regex is required")
    src = _translate_re2(rm.regex, p)
    try:
        return re.compile(_b(src))
    except re.error as e:
        raise ConfigError(p, f"invalid regex {rm.regex!r}: {e}") from None


# --------------------------------------------------------------------------- string matchers


class StringMatcher:
    """Compiled ``envoy.type.matcher.v3.StringMatcher``; ``match(value)`` on bytes.

    ``ignore_case`` folds ASCII only (as Envoy); it has no effect on ``safe_regex``.
    """

    __slots__ = ("pattern",)

    def __init__(self, pattern: Any) -> None:
        self.pattern = pattern

    def match(self, value: bytes) -> bool:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.pattern!r})"

    @staticmethod
    def compile(sm: Any, path: str) -> StringMatcher:
        kind = sm.WhichOneof("match_pattern")
        ic = sm.ignore_case
        if kind == "exact":
            return _IExact(_b(sm.exact).lower()) if ic else _Exact(_b(sm.exact))
        if kind in ("prefix", "suffix", "contains"):
            v = _b(getattr(sm, kind))
            if not v:
                raise ConfigError(f"{path}.{kind}", f"{kind} must not be empty")
            if kind == "prefix":
                return _IPrefix(v.lower()) if ic else _Prefix(v)
            if kind == "suffix":
                return _ISuffix(v.lower()) if ic else _Suffix(v)
            return _IContains(v.lower()) if ic else _Contains(v)
        if kind == "safe_regex":
            return _Regex(compile_regex(sm.safe_regex, f"{path}.safe_regex"))
        if kind is None:
            raise ConfigError(path, "one of exact, prefix, suffix, contains, safe_regex is required")
        raise ConfigError(f"{path}.{kind}", f"string matcher {kind!r} is not supported")

    @staticmethod
    def legacy(kind: str, value: str, path: str) -> StringMatcher:
        """Case-sensitive matcher for the legacy HeaderMatcher ``*_match`` string fields."""
        v = _b(value)
        if kind == "exact":
            # Envoy: an empty exact_match matches any value of a present header.
            return _Any(b"") if not v else _Exact(v)
        if not v:
            raise ConfigError(path, f"{kind}_match must not be empty")
        return {"prefix": _Prefix, "suffix": _Suffix, "contains": _Contains}[kind](v)


class _Any(StringMatcher):
    __slots__ = ()

    def match(self, value: bytes) -> bool:
        return True


class _Exact(StringMatcher):
    __slots__ = ()

    def match(self, value: bytes) -> bool:
        return value == self.pattern


class _IExact(StringMatcher):
    __slots__ = ()

    def match(self, value: bytes) -> bool:
        return value.lower() == self.pattern


class _Prefix(StringMatcher):
    __slots__ = ()

    def match(self, value: bytes) -> bool:
        return value.startswith(self.pattern)


class _IPrefix(StringMatcher):
    __slots__ = ()

    def match(self, value: bytes) -> bool:
        return value.lower().startswith(self.pattern)


class _Suffix(StringMatcher):
    __slots__ = ()

    def match(self, value: bytes) -> bool:
        return value.endswith(self.pattern)


class _ISuffix(StringMatcher):
    __slots__ = ()

    def match(self, value: bytes) -> bool:
        return value.lower().endswith(self.pattern)


class _Contains(StringMatcher):
    __slots__ = ()

    def match(self, value: bytes) -> bool:
        return self.pattern in value


class _IContains(StringMatcher):
    __slots__ = ()

    def match(self, value: bytes) -> bool:
        return self.pattern in value.lower()


class _Regex(StringMatcher):
    __slots__ = ()

    def match(self, value: bytes) -> bool:
        return self.pattern.fullmatch(value) is not None
