"""Compiled route tables: Envoy v3 ``RouteConfiguration`` -> fast runtime objects.

``RouteTable.compile(rc, path)`` reads the proto once; ``RouteTable.match`` (the hot path) only
touches plain Python objects: one dict lookup for the virtual host (cached per authority), then a
scan of that host's routes where each route carries a small precomputed path test (``startswith``,
``==``, a compiled regex) and, only when configured, header / query / gRPC conditions.

Envoy behaviour mirrored here (and where we differ, said so):

- Virtual host selection: exact domain, then the longest ``*suffix`` wildcard, then the longest
  ``prefix*`` wildcard, then ``*``; case-insensitive; a wildcard must cover at least one
  character. Domains may carry a port. When no non-``*`` domain matches the authority as received
  and it carries a port, the lookup is retried with the port stripped (so ``a.com:80`` matches a
  domain ``a.com:80`` exactly, else ``a.com``) before falling back to ``*``. Envoy itself only
  strips when ``strip_matching_host_port`` / ``strip_any_host_port`` is set on the HCM; the retry
  makes Istio-style configs (which list ``svc`` and ``svc:port``) and plain ones both work.
  ``ignore_port_in_host_matching: true`` strips the port before any lookup, as in Envoy.
- Routes are tried in order; the first match wins. Paths match without the query string and
  fragment. ``runtime_fraction`` is treated as always matching (no runtime here).
- Header mutations are evaluated level by level (remove, then add, per level), route first, then
  virtual host, then route configuration: Envoy's default
  (``most_specific_header_mutations_wins: false``), where a later level's overwrite wins. With
  ``most_specific_header_mutations_wins: true`` the order is reversed (route wins). A weighted
  cluster entry's own mutations always run first. Header values are literal: Envoy's ``%%``
  escape becomes ``%``; any other ``%COMMAND%`` is kept literally and listed in
  ``RouteTable.notices``.
- Regexes: Envoy uses RE2; here Python ``re`` on bytes patterns. To keep configs portable we
  reject what RE2 rejects and ``re`` would accept (lookaround, backreferences) and translate RE2's
  ``\\z`` and ``(?<name>...)``. Remaining differences: ``re`` matches bytes, so ``.`` is one byte
  (RE2: one UTF-8 character) and ``(?i)`` folds ASCII only; RE2's program-size limits are not
  enforced. Substitutions use RE2 syntax (``\\1``, ``\\0`` whole match, ``\\\\``).

Unsupported features that would change routing (``filter_action``, ``non_forwarding_action``,
cluster specifier plugins, ``path_match_policy``, TLS / metadata / filter-state matchers, ``vhds``,
...) are a ``ConfigError`` naming the field; features that only some other component consumes
are ignored with a line in ``RouteTable.notices``.
"""

from __future__ import annotations

import bisect
import os
import random
import re
from collections.abc import Iterable
from typing import Any, NamedTuple

from envoy.extensions.retry.priority.previous_priorities.v3 import (
    previous_priorities_config_pb2,  # also registers the type for config parsing
)

from moorline.config.errors import ConfigError
from moorline.config.matchers import StringMatcher, _b, _Regex, compile_regex
from moorline.protocol.headers import HeaderMap
from moorline.proxy.rate_limit_policy import RateLimitEntry, compile_rate_limits
from moorline.proxy.shadow import MirrorPolicy

# Route kinds.
ROUTE = 0
REDIRECT = 1
DIRECT_RESPONSE = 2

# Header append actions: the values of envoy.config.core.v3.HeaderValueOption.HeaderAppendAction.
APPEND_IF_EXISTS_OR_ADD = 0
ADD_IF_ABSENT = 1
OVERWRITE_IF_EXISTS_OR_ADD = 2
OVERWRITE_IF_EXISTS = 3

# retry_on bit flags.
RETRY_5XX = 1 << 0
RETRY_GATEWAY_ERROR = 1 << 1
RETRY_RESET = 1 << 2
RETRY_CONNECT_FAILURE = 1 << 3
RETRY_RETRIABLE_4XX = 1 << 4
RETRY_REFUSED_STREAM = 1 << 5
RETRY_RETRIABLE_STATUS_CODES = 1 << 6
RETRY_RESET_BEFORE_REQUEST = 1 << 7
RETRY_HTTP3_POST_CONNECT_FAILURE = 1 << 8
RETRY_ENVOY_RATELIMITED = 1 << 9
RETRY_RETRIABLE_HEADERS = 1 << 10
RETRY_CANCELLED = 1 << 16
RETRY_DEADLINE_EXCEEDED = 1 << 17
RETRY_RESOURCE_EXHAUSTED = 1 << 18
RETRY_UNAVAILABLE = 1 << 19
RETRY_INTERNAL = 1 << 20

RETRY_ON_TOKENS: dict[str, int] = {
    "5xx": RETRY_5XX,
    "gateway-error": RETRY_GATEWAY_ERROR,
    "reset": RETRY_RESET,
    "connect-failure": RETRY_CONNECT_FAILURE,
    "retriable-4xx": RETRY_RETRIABLE_4XX,
    "refused-stream": RETRY_REFUSED_STREAM,
    "retriable-status-codes": RETRY_RETRIABLE_STATUS_CODES,
    "reset-before-request": RETRY_RESET_BEFORE_REQUEST,
    "http3-post-connect-failure": RETRY_HTTP3_POST_CONNECT_FAILURE,
    "envoy-ratelimited": RETRY_ENVOY_RATELIMITED,
    "retriable-headers": RETRY_RETRIABLE_HEADERS,
    "cancelled": RETRY_CANCELLED,
    "deadline-exceeded": RETRY_DEADLINE_EXCEEDED,
    "resource-exhausted": RETRY_RESOURCE_EXHAUSTED,
    "unavailable": RETRY_UNAVAILABLE,
    "internal": RETRY_INTERNAL,
}
# gRPC status code retried by each gRPC retry_on flag.
_GRPC_RETRY_CODES = (
    (RETRY_CANCELLED, 1),
    (RETRY_DEADLINE_EXCEEDED, 4),
    (RETRY_RESOURCE_EXHAUSTED, 8),
    (RETRY_INTERNAL, 13),
    (RETRY_UNAVAILABLE, 14),
)

DEFAULT_ROUTE_TIMEOUT = 15.0
DEFAULT_MAX_DIRECT_RESPONSE_BODY = 4096
# Authorities remembered by the virtual-host cache; the cache is cleared when it reaches this size,
# so random Host values from a peer cost lookups, never unbounded memory.
VHOST_CACHE_MAX = 1024

_REDIRECT_CODES = {0: 301, 1: 302, 2: 303, 3: 307, 4: 308}
_PREVIOUS_HOSTS = ("envoy.retry_host_predicates.previous_hosts",)
_PREVIOUS_HOSTS_TYPE = "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
_PREVIOUS_PRIORITIES = "envoy.retry_priorities.previous_priorities"
_PREVIOUS_PRIORITIES_TYPE = "envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig"
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_INT_RE = re.compile(rb"\s*[+-]?[0-9]+\s*")
_PATH_PARAMS_RE = re.compile(rb";[^/]*")


# --------------------------------------------------------------------------- helpers


def strip_port(authority: bytes) -> bytes:
    """``authority`` without a trailing ``:port`` (numeric); IPv6 literals keep their brackets.

    Mirrors Envoy's ``HeaderUtility::getPortStart``: the last ``:`` starts a port only if it comes
    after any ``]`` and is followed by digits.
    """
    i = authority.rfind(b":")
    if i < 0:
        return authority
    if authority.rfind(b"]") > i:
        return authority
    port = authority[i + 1 :]
    if not port or not port.isdigit():
        return authority
    return authority[:i]


def _split_path(path: bytes) -> bytes:
    """The path without query string and fragment."""
    q = path.find(b"?")
    if q >= 0:
        path = path[:q]
    f = path.find(b"#")
    if f >= 0:
        path = path[:f]
    return path


class RegexRewrite:
    """``RegexMatchAndSubstitute``: replace every match; RE2 substitution syntax."""

    __slots__ = ("pattern", "template")

    def __init__(self, pattern: re.Pattern[bytes], template: bytes) -> None:
        self.pattern = pattern
        self.template = template

    @classmethod
    def compile(cls, proto: Any, path: str) -> RegexRewrite:
        if not proto.HasField("pattern"):
            raise ConfigError(f"{path}.pattern", "pattern is required")
        pat = compile_regex(proto.pattern, f"{path}.pattern")
        return cls(pat, _re2_template(proto.substitution, pat.groups, f"{path}.substitution"))

    def apply(self, value: bytes) -> bytes:
        return self.pattern.sub(self.template, value)


def _re2_template(sub: str, groups: int, path: str) -> bytes:
    """RE2 rewrite string -> Python ``re.sub`` template (``\\N`` -> ``\\g<N>``, literals escaped)."""
    out: list[str] = []
    i, n = 0, len(sub)
    while i < n:
        c = sub[i]
        if c == "\\":
            if i + 1 >= n:
                raise ConfigError(path, "trailing backslash in substitution")
            nxt = sub[i + 1]
            if nxt.isdigit():
                g = int(nxt)
                if g > groups:
                    raise ConfigError(path, f"substitution refers to group {g}, pattern has {groups}")
                out.append(f"\\g<{g}>")
            elif nxt == "\\":
                out.append("\\\\")
            else:
                raise ConfigError(path, f"invalid escape \\{nxt} in substitution")
            i += 2
            continue
        out.append(c)
        i += 1
    return _b("".join(out))


# --------------------------------------------------------------------------- header matchers

_SRC_HEADER, _SRC_METHOD, _SRC_AUTHORITY, _SRC_PATH = 0, 1, 2, 3
_PSEUDO_SOURCES = {b":method": _SRC_METHOD, b":authority": _SRC_AUTHORITY, b":path": _SRC_PATH}
_HM_PRESENT, _HM_STRING, _HM_RANGE = 0, 1, 2


class HeaderMatcher:
    """Compiled ``envoy.config.route.v3.HeaderMatcher``.

    Several values of one header are joined with ``,`` before matching (Envoy). ``:method``,
    ``:authority`` and ``:path`` (with query) come from the arguments, other names from
    ``headers``. A missing header matches only a ``present_match`` (with its ``invert_match``),
    unless ``treat_missing_header_as_empty``, which matches the value ``b""``.
    """

    __slots__ = (
        "_kind",
        "_matcher",
        "_present",
        "_range",
        "_src",
        "invert",
        "name",
        "treat_missing_as_empty",
    )

    def __init__(self) -> None:
        self.name = b""
        self._src = _SRC_HEADER
        self._kind = _HM_PRESENT
        self._matcher: StringMatcher | None = None
        self._present = True
        self._range = (0, 0)
        self.invert = False
        self.treat_missing_as_empty = False

    @classmethod
    def compile(cls, proto: Any, path: str) -> HeaderMatcher:
        m = cls()
        if not proto.name:
            raise ConfigError(f"{path}.name", "header name is required")
        m.name = _b(proto.name).lower()
        m._src = _PSEUDO_SOURCES.get(m.name, _SRC_HEADER)
        m.invert = proto.invert_match
        m.treat_missing_as_empty = proto.treat_missing_header_as_empty
        kind = proto.WhichOneof("header_match_specifier")
        if kind is None:
            # Envoy: no specifier means "header is present".
            m._kind, m._present = _HM_PRESENT, True
        elif kind == "present_match":
            m._kind, m._present = _HM_PRESENT, proto.present_match
        elif kind == "range_match":
            r = proto.range_match
            m._kind, m._range = _HM_RANGE, (int(r.start), int(r.end))
        elif kind == "string_match":
            m._kind = _HM_STRING
            m._matcher = StringMatcher.compile(proto.string_match, f"{path}.string_match")
        elif kind == "safe_regex_match":
            m._kind = _HM_STRING
            m._matcher = _Regex(compile_regex(proto.safe_regex_match, f"{path}.safe_regex_match"))
        elif kind in ("exact_match", "prefix_match", "suffix_match", "contains_match"):
            m._kind = _HM_STRING
            m._matcher = StringMatcher.legacy(kind[: -len("_match")], getattr(proto, kind), f"{path}.{kind}")
        else:
            raise ConfigError(f"{path}.{kind}", f"header matcher {kind!r} is not supported")
        return m

    def match(self, headers: HeaderMap, method: bytes, authority: bytes, path: bytes) -> bool:
        src = self._src
        value: bytes | None
        if src == _SRC_HEADER:
            name = self.name
            value = None
            many: list[bytes] | None = None
            for k, v in headers.items():
                if k == name:
                    if value is None:
                        value = v
                    elif many is None:
                        many = [value, v]
                    else:
                        many.append(v)
            if many is not None:
                value = b",".join(many)
        elif src == _SRC_METHOD:
            value = method or None
        elif src == _SRC_AUTHORITY:
            value = authority or None
        else:
            value = path or None
        if self._kind == _HM_PRESENT:
            return ((value is not None) == self._present) != self.invert
        if value is None:
            if not self.treat_missing_as_empty:
                return False
            value = b""
        if self._kind == _HM_STRING:
            ok = self._matcher.match(value)  # type: ignore[union-attr]
        else:
            ok = False
            if _INT_RE.fullmatch(value):
                n = int(value)
                ok = _INT64_MIN <= n <= _INT64_MAX and self._range[0] <= n < self._range[1]
        return ok != self.invert


class QueryParameterMatcher:
    """Compiled ``QueryParameterMatcher``: the first value of the parameter (not percent-decoded,
    as Envoy's route matching) must match; no specifier or ``present_match`` means present."""

    __slots__ = ("matcher", "name")

    def __init__(self, name: bytes, matcher: StringMatcher | None) -> None:
        self.name = name
        self.matcher = matcher

    @classmethod
    def compile(cls, proto: Any, path: str) -> QueryParameterMatcher:
        if not proto.name:
            raise ConfigError(f"{path}.name", "query parameter name is required")
        matcher = None
        if proto.WhichOneof("query_parameter_match_specifier") == "string_match":
            matcher = StringMatcher.compile(proto.string_match, f"{path}.string_match")
        return cls(_b(proto.name), matcher)

    def match(self, params: dict[bytes, bytes]) -> bool:
        v = params.get(self.name)
        if v is None:
            return False
        return self.matcher is None or self.matcher.match(v)


def parse_query(path: bytes) -> dict[bytes, bytes]:
    """First value of each query parameter of ``path`` (raw, not percent-decoded)."""
    q = path.find(b"?")
    out: dict[bytes, bytes] = {}
    if q < 0:
        return out
    qs = path[q + 1 :]
    f = qs.find(b"#")
    if f >= 0:
        qs = qs[:f]
    for part in qs.split(b"&"):
        if not part:
            continue
        k, eq, v = part.partition(b"=")
        if k not in out:
            out[k] = v if eq else b""
    return out


# --------------------------------------------------------------------------- header mutations


class HeaderAppend(NamedTuple):
    name: bytes
    value: bytes
    action: int
    keep_empty_value: bool


# One level of mutations (weighted cluster entry, route, virtual host or route config):
# removals first, then additions.
_Level = tuple[frozenset[bytes], tuple[HeaderAppend, ...]]


def _modifiable(name: bytes) -> bool:
    return not name.startswith(b":") and name != b"host"


def _literal_value(raw: bytes, path: str, notices: list[str]) -> bytes:
    """Envoy header values are substitution formats; only literals are supported here."""
    if b"%" not in raw:
        return raw
    out = bytearray()
    i, n = 0, len(raw)
    command = False
    while i < n:
        c = raw[i]
        if c == 0x25 and i + 1 < n and raw[i + 1] == 0x25:
            out.append(0x25)
            i += 2
            continue
        if c == 0x25:
            command = True
        out.append(c)
        i += 1
    if command:
        notices.append(f"{path}: format command in header value kept literally: {raw.decode('latin-1')!r}")
    return bytes(out)


def _compile_level(
    adds: Iterable[Any], removes: Iterable[str], path: str, notices: list[str], *, prefix: str
) -> _Level:
    rm: set[bytes] = set()
    for j, name in enumerate(removes):
        n = _b(name).lower()
        if not n:
            raise ConfigError(f"{path}.{prefix}_headers_to_remove[{j}]", "header name is required")
        if not _modifiable(n):
            raise ConfigError(f"{path}.{prefix}_headers_to_remove[{j}]", f"header {name!r} cannot be removed")
        rm.add(n)
    out: list[HeaderAppend] = []
    for j, hvo in enumerate(adds):
        p = f"{path}.{prefix}_headers_to_add[{j}]"
        key = _b(hvo.header.key).lower()
        if not key:
            raise ConfigError(f"{p}.header.key", "header name is required")
        if not _modifiable(key):
            raise ConfigError(f"{p}.header.key", f"header {hvo.header.key!r} cannot be modified")
        if hvo.HasField("append"):
            if hvo.append_action != APPEND_IF_EXISTS_OR_ADD:
                raise ConfigError(f"{p}.append", "append and append_action are mutually exclusive")
            action = APPEND_IF_EXISTS_OR_ADD if hvo.append.value else OVERWRITE_IF_EXISTS_OR_ADD
        else:
            action = int(hvo.append_action)
        raw = hvo.header.raw_value if hvo.header.raw_value else _b(hvo.header.value)
        value = _literal_value(raw, f"{p}.header.value", notices)
        if not value and not hvo.keep_empty_value:
            # Envoy skips an empty value unless keep_empty_value; with literal values that is
            # known now.
            continue
        out.append(HeaderAppend(key, value, action, hvo.keep_empty_value))
    return frozenset(rm), tuple(out)


def _apply_levels(levels: tuple[_Level, ...], headers: HeaderMap) -> None:
    for remove, adds in levels:
        if remove:
            headers.remove_many(remove)
        if not adds:
            continue
        # Envoy decides every entry of a level against the headers as they were before the level's
        # additions, then applies overwrites, then appends.
        overwrite: list[HeaderAppend] = []
        append: list[HeaderAppend] = []
        for ha in adds:
            a = ha.action
            if a == APPEND_IF_EXISTS_OR_ADD:
                append.append(ha)
            elif a == OVERWRITE_IF_EXISTS_OR_ADD:
                overwrite.append(ha)
            elif a == ADD_IF_ABSENT:
                if ha.name not in headers:
                    append.append(ha)
            elif ha.name in headers:  # OVERWRITE_IF_EXISTS
                overwrite.append(ha)
        for ha in overwrite:
            headers.set(ha.name, ha.value)
        for ha in append:
            headers.add(ha.name, ha.value)


def _flatten(levels: tuple[_Level, ...]) -> tuple[frozenset[bytes], tuple[HeaderAppend, ...]]:
    rm: set[bytes] = set()
    adds: list[HeaderAppend] = []
    for r, a in levels:
        rm |= r
        adds.extend(a)
    return frozenset(rm), tuple(adds)


def _tpfc(m: Any) -> dict[str, Any]:
    return {k: v for k, v in m.typed_per_filter_config.items()}


def _compile_filter_configs(levels: list[dict[str, Any]], path: str, notes: list[str]) -> dict[str, Any]:
    """``typed_per_filter_config`` of the route configuration, virtual host and route (least
    specific first), each entry compiled once by its filter's per-route factory; the request path
    reads the result. The most specific level wins, or, for a filter with ``per_route_merge``,
    the levels are folded field by field."""
    from moorline.config import registry
    from moorline.config.loader import OpaqueAny, unpack_any

    out: dict[str, Any] = {}
    names = list(dict.fromkeys(name for lv in levels for name in lv))
    for name in names:
        fpath = f"{path}.typed_per_filter_config[{name!r}]"
        present = [lv[name] for lv in levels if name in lv]
        any_msg = present[-1]
        ext = registry.lookup_per_route(any_msg.type_url) if any_msg.type_url else None
        if ext is None or ext.per_route is None:
            notes.append(
                f"{fpath}: per-route config {any_msg.type_url or '(empty)'} is not supported; ignored"
            )
            continue
        merge = ext.per_route_merge
        compiled: Any = None
        for m in present if merge is not None else [any_msg]:
            if registry.lookup_per_route(m.type_url) is not ext:
                continue  # a less specific level of another type: the most specific one decides
            msg = unpack_any(m, fpath)
            if isinstance(msg, OpaqueAny):
                notes.append(f"{fpath}: per-route config {m.type_url} is not supported; ignored")
                compiled = None
                break
            one = ext.per_route(msg, fpath)
            # A per-route compiler announces what it accepted but does not act on.
            notes.extend(getattr(one, "notices", ()))
            compiled = one if compiled is None or merge is None else merge(compiled, one)
        if compiled is not None:
            out[name] = compiled
    return out


LEGACY_CORS_TYPE = "type.googleapis.com/envoy.config.route.v3.CorsPolicy"


def _legacy_cors(r: Any, vh: VirtualHost, action_cors: Any, rp: str) -> None:
    """The deprecated ``cors`` of the virtual host and the route action, for the CORS filter when
    no ``typed_per_filter_config`` gives it a policy (the filter registers this type too; the
    route's fields override its virtual host's)."""
    from moorline.config import registry

    protos = [(vh.cors, vh.cors_path), (action_cors, f"{rp}.route.cors")]
    protos = [(p, path) for p, path in protos if p is not None]
    if not protos:
        return
    ext = registry.lookup_per_route(LEGACY_CORS_TYPE)
    if ext is None or ext.per_route is None:
        return
    if ext.names[0] in r.filter_configs:
        return  # a typed per-filter policy is set: Envoy uses it instead of the legacy field
    compiled: Any = None
    for proto, path in protos:
        one = ext.per_route(proto, path)
        compiled = (
            one if compiled is None or ext.per_route_merge is None else ext.per_route_merge(compiled, one)
        )
    r.filter_configs = {**r.filter_configs, ext.names[0]: compiled}


def _dur(msg: Any, field: str) -> float | None:
    if msg.HasField(field):
        d = getattr(msg, field)
        return d.seconds + d.nanos / 1e9
    return None


# --------------------------------------------------------------------------- retry policy


class RetryPolicy:
    """Compiled ``envoy.config.route.v3.RetryPolicy``."""

    __slots__ = (
        "_grpc_codes",
        "base_interval",
        "host_selection_retry_max_attempts",
        "max_interval",
        "num_retries",
        "per_try_idle_timeout",
        "per_try_timeout",
        "rate_limited_max_interval",
        "reset_headers",
        "retriable_headers",
        "retriable_request_headers",
        "retriable_status_codes",
        "retry_host_predicate_previous_hosts",
        "retry_on",
        "retry_priority_update_frequency",
    )

    def __init__(self) -> None:
        self.retry_on = 0
        self.num_retries = 1
        self.per_try_timeout: float | None = None
        self.per_try_idle_timeout: float | None = None
        self.base_interval = 0.025
        self.max_interval = 0.25
        self.retriable_status_codes: frozenset[int] = frozenset()
        self.retry_host_predicate_previous_hosts = False
        self.host_selection_retry_max_attempts = 1
        self.retriable_headers: tuple[HeaderMatcher, ...] = ()
        self.retriable_request_headers: tuple[HeaderMatcher, ...] = ()
        self._grpc_codes: frozenset[int] = frozenset()
        # rate_limited_retry_back_off: (lower-cased header name, is UNIX_TIMESTAMP), in order
        self.reset_headers: tuple[tuple[bytes, bool], ...] = ()
        self.rate_limited_max_interval = 300.0
        # previous_priorities: every this many attempts, the tried priorities are avoided (0: off)
        self.retry_priority_update_frequency = 0

    @staticmethod
    def parse_retry_on(value: str, path: str) -> int:
        """Envoy's comma-separated ``retry_on`` -> flags; an unknown token is an error at ``path``."""
        bits = 0
        for tok in value.split(","):
            tok = tok.strip()
            if not tok:
                continue
            bit = RETRY_ON_TOKENS.get(tok)
            if bit is None:
                raise ConfigError(path, f"unknown retry_on value {tok!r}")
            bits |= bit
        return bits

    @classmethod
    def compile(cls, proto: Any, path: str, notices: list[str] | None = None) -> RetryPolicy:
        notes = notices if notices is not None else []
        rp = cls()
        rp.retry_on = cls.parse_retry_on(proto.retry_on, f"{path}.retry_on")
        if proto.HasField("num_retries"):
            rp.num_retries = int(proto.num_retries.value)
        rp.per_try_timeout = _dur(proto, "per_try_timeout")
        rp.per_try_idle_timeout = _dur(proto, "per_try_idle_timeout")
        if proto.HasField("retry_back_off"):
            bo = proto.retry_back_off
            p = f"{path}.retry_back_off"
            base = _dur(bo, "base_interval")
            if base is None or base <= 0:
                raise ConfigError(f"{p}.base_interval", "base_interval is required and must be > 0")
            mx = _dur(bo, "max_interval")
            if mx is None:
                mx = base * 10
            elif mx <= 0:
                raise ConfigError(f"{p}.max_interval", "max_interval must be > 0")
            elif mx < base:
                raise ConfigError(f"{p}.max_interval", "max_interval must be >= base_interval")
            rp.base_interval, rp.max_interval = base, mx
        for j, code in enumerate(proto.retriable_status_codes):
            if not 100 <= code <= 599:
                raise ConfigError(f"{path}.retriable_status_codes[{j}]", f"status {code} out of range")
        rp.retriable_status_codes = frozenset(int(c) for c in proto.retriable_status_codes)
        for j, pred in enumerate(proto.retry_host_predicate):
            type_url = pred.typed_config.type_url if pred.HasField("typed_config") else ""
            if pred.name in _PREVIOUS_HOSTS or type_url.endswith(_PREVIOUS_HOSTS_TYPE):
                rp.retry_host_predicate_previous_hosts = True
            else:
                notes.append(f"{path}.retry_host_predicate[{j}]: predicate {pred.name or type_url!r} ignored")
        if proto.HasField("retry_priority"):
            rp.retry_priority_update_frequency = _previous_priorities(
                proto.retry_priority, f"{path}.retry_priority"
            )
        if proto.HasField("rate_limited_retry_back_off"):
            rl = proto.rate_limited_retry_back_off
            p = f"{path}.rate_limited_retry_back_off"
            if not len(rl.reset_headers):
                raise ConfigError(f"{p}.reset_headers", "at least one reset header is required")
            out = []
            for j, rh in enumerate(rl.reset_headers):
                if not rh.name:
                    raise ConfigError(f"{p}.reset_headers[{j}].name", "name is required")
                out.append((rh.name.lower().encode(), int(rh.format) == _RESET_UNIX_TIMESTAMP))
            rp.reset_headers = tuple(out)
            mx = _dur(rl, "max_interval")
            if mx is not None:
                if mx < 0.001:
                    raise ConfigError(f"{p}.max_interval", "must be at least 1ms")
                rp.rate_limited_max_interval = mx
        if len(proto.retry_options_predicates):
            notes.append(f"{path}.retry_options_predicates: ignored")
        rp.host_selection_retry_max_attempts = max(1, int(proto.host_selection_retry_max_attempts))
        rp.retriable_headers = tuple(
            HeaderMatcher.compile(h, f"{path}.retriable_headers[{j}]")
            for j, h in enumerate(proto.retriable_headers)
        )
        rp.retriable_request_headers = tuple(
            HeaderMatcher.compile(h, f"{path}.retriable_request_headers[{j}]")
            for j, h in enumerate(proto.retriable_request_headers)
        )
        rp._grpc_codes = frozenset(code for bit, code in _GRPC_RETRY_CODES if rp.retry_on & bit)
        return rp

    def backoff(self, attempt: int, rand: float) -> float:
        """Delay (s) before retry ``attempt`` (0 for the first retry); ``rand`` uniform in [0, 1).

        Envoy's ``JitteredExponentialBackOffStrategy``: the n-th call draws uniformly from
        ``[0, min(base * 2**n, max))`` (Envoy in whole milliseconds, here in float seconds).
        """
        cap = self.max_interval
        if attempt < 62:
            cap = min(self.base_interval * (1 << max(attempt, 0)), cap)
        return rand * cap

    def reset_delay(self, headers: HeaderMap, wall_now: float) -> float | None:
        """``rate_limited_retry_back_off``: seconds until the first reset header (in config
        order) that parses and is within ``max_interval`` says the limit resets; ``None`` when
        none does (the ordinary back-off applies). SECONDS takes whole seconds or, for
        ``Retry-After``, an HTTP date; UNIX_TIMESTAMP whole seconds since the epoch."""
        for name, unix in self.reset_headers:
            raw = headers.get(name)
            if raw is None:
                continue
            delay = _reset_interval(raw.strip(), unix, wall_now)
            if delay is not None and delay <= self.rate_limited_max_interval:
                return delay
        return None

    def should_retry_status(self, status: int, grpc_status: int | None = None) -> bool:
        """Does a response with HTTP ``status`` (and ``grpc-status`` from headers or trailers) call
        for a retry under ``retry_on``? Connection-level conditions are the router's business."""
        ro = self.retry_on
        if ro & RETRY_5XX and 500 <= status < 600:
            return True
        if ro & RETRY_GATEWAY_ERROR and status in (502, 503, 504):
            return True
        if ro & RETRY_RETRIABLE_4XX and status == 409:
            return True
        if ro & RETRY_RETRIABLE_STATUS_CODES and status in self.retriable_status_codes:
            return True
        return grpc_status is not None and grpc_status in self._grpc_codes

    def should_retry_headers(self, response_headers: HeaderMap) -> bool:
        """``retriable-headers``: any of ``retriable_headers`` matches the response."""
        if not self.retry_on & RETRY_RETRIABLE_HEADERS:
            return False
        return any(m.match(response_headers, b"", b"", b"") for m in self.retriable_headers)


_RESET_UNIX_TIMESTAMP = 1


def _previous_priorities(msg: Any, path: str) -> int:
    """``retry_priority``: only ``previous_priorities``; its ``update_frequency`` (> 0)."""
    tc = msg.typed_config if msg.HasField("typed_config") else None
    if not (
        msg.name == _PREVIOUS_PRIORITIES
        or (tc is not None and tc.type_url.endswith(_PREVIOUS_PRIORITIES_TYPE))
    ):
        raise ConfigError(
            path, f"retry priority {msg.name or (tc.type_url if tc else '')!r} is not supported"
        )
    cfg = previous_priorities_config_pb2.PreviousPrioritiesConfig()
    if tc is None or not tc.Unpack(cfg):
        raise ConfigError(f"{path}.typed_config", f"a {_PREVIOUS_PRIORITIES_TYPE} is required")
    if cfg.update_frequency <= 0:
        raise ConfigError(f"{path}.typed_config.update_frequency", "must be greater than 0")
    return int(cfg.update_frequency)


_MAX_RESET_LEN = 64  # longer header values are not looked at (an HTTP date is 29 bytes)


def _reset_interval(raw: bytes, unix: bool, wall_now: float) -> float | None:
    if not raw or len(raw) > _MAX_RESET_LEN:
        return None
    if raw.isdigit():
        n = int(raw)
        return max(0.0, n - wall_now) if unix else float(n)
    if unix:
        return None
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(raw.decode("latin-1")).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return max(0.0, when - wall_now)


# --------------------------------------------------------------------------- weighted clusters


class ClusterEntry:
    """One ``WeightedCluster.ClusterWeight``."""

    __slots__ = (
        "cluster_header",
        "host_rewrite",
        "name",
        "request_levels",
        "response_levels",
        "typed_per_filter_config",
        "weight",
    )

    def __init__(self) -> None:
        self.name: str | None = None
        self.cluster_header: bytes | None = None
        self.weight = 0
        self.host_rewrite: bytes | None = None
        self.request_levels: tuple[_Level, ...] = ()
        self.response_levels: tuple[_Level, ...] = ()
        self.typed_per_filter_config: dict[str, Any] = {}


class WeightedClusters:
    """``WeightedCluster``: the total is the sum of the weights (Envoy ignores the deprecated
    ``total_weight``; runtime keys are ignored too). ``header_name`` takes the random value from a
    request header when it holds an unsigned integer."""

    __slots__ = ("_ends", "by_name", "entries", "header_name", "total_weight", "weights")

    def __init__(self, entries: list[ClusterEntry], header_name: bytes | None) -> None:
        self.entries = entries
        self.weights = tuple(e.weight for e in entries)
        ends = []
        acc = 0
        for w in self.weights:
            acc += w
            ends.append(acc)
        self._ends = ends
        self.total_weight = acc
        self.header_name = header_name
        self.by_name: dict[str, ClusterEntry] = {}
        for e in entries:
            if e.name is not None:
                self.by_name.setdefault(e.name, e)

    def pick_entry(self, rand: int) -> ClusterEntry:
        return self.entries[bisect.bisect_right(self._ends, rand % self.total_weight)]

    def pick(self, rand: int, headers: HeaderMap | None = None) -> str | None:
        """Cluster for the non-negative random integer ``rand`` (Envoy: ``rand % total_weight``)."""
        e = self.pick_entry(rand)
        if e.name is not None:
            return e.name
        if headers is None:
            return None
        v = headers.get(e.cluster_header)  # type: ignore[arg-type]
        return v.decode("latin-1") if v else None


# --------------------------------------------------------------------------- routes


_PK_PREFIX, _PK_IPREFIX, _PK_EXACT, _PK_IEXACT, _PK_REGEX, _PK_SEP, _PK_ISEP, _PK_CONNECT, _PK_RUN = range(9)

# Consecutive regex routes at least this many long are tried with one combined regex first.
REGEX_RUN_MIN = 4


class _RegexRun:
    """Consecutive regex routes of a virtual host, compiled into one alternation: one C call
    finds the first route whose regex matches the path (the alternatives are tried in order,
    and a ``fullmatch`` backtracks into the next one), instead of one call per route. A run
    whose regexes do not compile as one (inline global flags, clashing group names) is not
    made; back-references, which a combined pattern would renumber, are refused at load (RE2
    syntax)."""

    __slots__ = ("_extra", "_pk", "groups", "re", "routes")

    def __init__(self, routes: list[Any], combined: re.Pattern[bytes], groups: dict[int, int]) -> None:
        self._pk = _PK_RUN
        self._extra = False
        self.routes = tuple(routes)
        self.re = combined
        self.groups = groups  # the combined pattern's group index of each route -> its position

    def first(
        self, m: re.Match[bytes], p: bytes, headers: Any, method: bytes, authority: bytes, path: bytes
    ) -> Any:
        """The first route of the run, from the combined match on, that matches entirely."""
        qcache: list[Any] | None = None
        routes = self.routes
        for i in range(self.groups[m.lastindex or 0], len(routes)):
            r = routes[i]
            if r._pat.fullmatch(p) is None:
                continue
            if r._extra:
                if qcache is None:
                    qcache = [None]
                if not r._matches_extra(headers, method, authority, path, qcache):
                    continue
            return r
        return None


def _regex_run(routes: list[Any]) -> _RegexRun | None:
    parts: list[bytes] = []
    groups: dict[int, int] = {}
    flags = routes[0]._pat.flags
    index = 1
    for i, r in enumerate(routes):
        pat = r._pat
        if pat.flags != flags:
            return None
        parts.append(b"(" + pat.pattern + b")")
        groups[index] = i
        index += 1 + pat.groups
    try:
        combined = re.compile(b"|".join(parts), flags)
    except (re.error, OverflowError, RecursionError):
        return None
    return _RegexRun(routes, combined, groups)


def _with_regex_runs(routes: list[Any]) -> tuple[Any, ...]:
    """``routes`` for matching, with each long enough run of regex routes made a _RegexRun."""
    out: list[Any] = []
    run: list[Any] = []
    for r in [*routes, None]:
        if r is not None and r._pk == _PK_REGEX:
            run.append(r)
            continue
        if run:
            combined = _regex_run(run) if len(run) >= REGEX_RUN_MIN else None
            if combined is not None:
                out.append(combined)
            else:
                out.extend(run)
            run = []
        if r is not None:
            out.append(r)
    return tuple(out)


_RW_NONE, _RW_PREFIX_LEN, _RW_WHOLE, _RW_REGEX = range(4)


class Route:
    """A compiled route: match data (private) and the precomputed action (public)."""

    __slots__ = (
        "_connect",
        "_extra",
        "_grpc",
        "_headers",
        "_pat",
        "_pk",
        "_plen",
        "_query",
        "_req_levels",
        "_resp_levels",
        "_rw_kind",
        "_rw_prefix",
        "_rw_regex",
        "auto_host_rewrite",
        "cluster",
        "cluster_header",
        "cluster_not_found_response_code",
        "connect_terminate",
        "direct_body",
        "direct_status",
        "filter_configs",
        "grpc_timeout_offset",
        "high",
        "host_redirect",
        "host_rewrite",
        "host_rewrite_header",
        "https_redirect",
        "idle_timeout",
        "include_vh_rate_limits",
        "kind",
        "max_grpc_timeout",
        "max_stream_duration",
        "mirrors",
        "name",
        "path_redirect",
        "plain",
        "port_redirect",
        "proto",
        "rate_limits",
        "redirect_code",
        "request_headers_to_add",
        "request_headers_to_remove",
        "response_headers_to_add",
        "response_headers_to_remove",
        "retry",
        "scheme_redirect",
        "strip_query",
        "timeout",
        "typed_per_filter_config",
        "upgrade_configs",
        "vhost",
        "weighted",
    )

    def __init__(self, vhost: VirtualHost) -> None:
        self.vhost = vhost
        self.name = ""
        self.kind = ROUTE
        self.proto: Any = None  # the source proto, for cold-path readers only
        # match
        self._pk = _PK_PREFIX
        self._pat: Any = b""
        self._plen = 0
        self._connect = False
        self._extra = False
        self._headers: tuple[HeaderMatcher, ...] = ()
        self._query: tuple[QueryParameterMatcher, ...] = ()
        self._grpc = False
        # route action
        self.cluster: str | None = None
        self.cluster_header: bytes | None = None
        self.weighted: WeightedClusters | None = None
        self.cluster_not_found_response_code = 503
        self.timeout = DEFAULT_ROUTE_TIMEOUT
        self.idle_timeout: float | None = None
        self.max_stream_duration: float | None = None
        self.max_grpc_timeout: float | None = None
        self.mirrors: tuple[MirrorPolicy, ...] | None = None  # None: no mirroring (no cost)
        self.grpc_timeout_offset: float | None = None
        self.retry: RetryPolicy | None = None
        # RouteAction.priority HIGH: the cluster's HIGH circuit-breaker thresholds apply
        self.high = False
        self._rw_kind = _RW_NONE
        self._rw_prefix = b""
        self._rw_regex: RegexRewrite | None = None
        self.host_rewrite: bytes | None = None
        self.auto_host_rewrite = False
        self.host_rewrite_header: bytes | None = None
        self.plain: bool | None = None  # see is_plain()
        self.upgrade_configs: dict[bytes, bool] = {}
        # upgrade_configs CONNECT with connect_config: CONNECT ends here, its payload goes to the
        # host over TCP (stream.tcp_upstream) instead of a CONNECT request being forwarded
        self.connect_terminate = False
        # header mutations
        self._req_levels: tuple[_Level, ...] = ()
        self._resp_levels: tuple[_Level, ...] = ()
        self.request_headers_to_add: tuple[HeaderAppend, ...] = ()
        self.request_headers_to_remove: frozenset[bytes] = frozenset()
        self.response_headers_to_add: tuple[HeaderAppend, ...] = ()
        self.response_headers_to_remove: frozenset[bytes] = frozenset()
        # direct response
        self.direct_status = 0
        self.direct_body = b""
        # redirect
        self.redirect_code = 301
        self.scheme_redirect: bytes | None = None
        self.https_redirect = False
        self.host_redirect: bytes | None = None
        self.port_redirect = b""
        self.path_redirect: bytes | None = None
        self.strip_query = False
        self.filter_configs: dict[str, Any] = {}  # compiled typed_per_filter_config
        self.typed_per_filter_config: dict[str, Any] = {}
        self.rate_limits: tuple[RateLimitEntry, ...] = ()  # route action rate_limits
        self.include_vh_rate_limits = False

    def __repr__(self) -> str:
        return f"Route(name={self.name!r}, vhost={self.vhost.name!r}, kind={self.kind})"

    # -- matching (called by RouteTable.match with the path already split) --

    def _matches_extra(
        self, headers: HeaderMap, method: bytes, authority: bytes, path: bytes, qcache: list[Any]
    ) -> bool:
        if self._connect and method != b"CONNECT":
            return False
        if self._grpc:
            ct = headers.get(b"content-type")
            if ct is None or not ct.startswith(b"application/grpc"):
                return False
            # Envoy: exactly application/grpc or application/grpc+proto / ;params (not grpc-web).
            if len(ct) > 16 and ct[16] not in (0x2B, 0x3B):
                return False
        for hm in self._headers:
            if not hm.match(headers, method, authority, path):
                return False
        if self._query:
            params = qcache[0]
            if params is None:
                params = qcache[0] = parse_query(path)
            for qm in self._query:
                if not qm.match(params):
                    return False
        return True

    # -- actions --

    def is_plain(self) -> bool:
        """A route to one fixed cluster that edits nothing (no rewrite, no header mutation at
        any level): the router's fast path skips the edit steps. Computed once."""
        p = self.plain
        if p is None:
            p = self.plain = (
                self.cluster is not None
                and self.weighted is None
                and self._rw_kind == _RW_NONE
                and self.host_rewrite is None
                and self.host_rewrite_header is None
                and not self.auto_host_rewrite
                and not self._req_levels
                and not self._resp_levels
                and self.mirrors is None
            )
        return p

    def pick_cluster(self, headers: HeaderMap) -> str | None:
        """The upstream cluster name, or None (no cluster header / empty pick): Envoy answers
        ``cluster_not_found_response_code``."""
        if self.cluster is not None:
            return self.cluster
        if self.cluster_header is not None:
            v = headers.get(self.cluster_header)
            return v.decode("latin-1") if v else None
        w = self.weighted
        if w is None:
            return None
        rand = None
        if w.header_name is not None:
            hv = headers.get(w.header_name)
            if hv is not None and hv.isdigit():
                rand = int(hv)
        if rand is None:
            rand = random.getrandbits(63)
        return w.pick(rand, headers)

    def rewrite_path(self, path: bytes) -> bytes | None:
        """The upstream ``:path`` after ``prefix_rewrite`` / ``regex_rewrite`` (query kept), or
        None when the route rewrites nothing. ``path`` is the raw request path the route matched."""
        k = self._rw_kind
        if k == _RW_NONE:
            return None
        if k == _RW_PREFIX_LEN:
            return self._rw_prefix + path[self._plen :]
        q = path.find(b"?")
        f = path.find(b"#")
        if q < 0 or 0 <= f < q:
            q = f
        just, rest = (path, b"") if q < 0 else (path[:q], path[q:])
        if k == _RW_WHOLE:
            return self._rw_prefix + rest
        return self._rw_regex.apply(just) + rest  # type: ignore[union-attr]

    def host_rewrite_for(self, cluster: str | None) -> bytes | None:
        """``host_rewrite_literal`` of the picked weighted cluster entry, else of the route."""
        w = self.weighted
        if w is not None and cluster is not None:
            e = w.by_name.get(cluster)
            if e is not None and e.host_rewrite is not None:
                return e.host_rewrite
        return self.host_rewrite

    def apply_request_headers(self, headers: HeaderMap, cluster: str | None = None) -> None:
        """Apply request header mutations (literal values only; see the module docstring). Pass the
        picked ``cluster`` to include a weighted cluster entry's own mutations (applied first)."""
        w = self.weighted
        if w is not None and cluster is not None:
            e = w.by_name.get(cluster)
            if e is not None and e.request_levels:
                _apply_levels(e.request_levels, headers)
        if self._req_levels:
            _apply_levels(self._req_levels, headers)

    def apply_response_headers(self, headers: HeaderMap, cluster: str | None = None) -> None:
        """Apply response header mutations (literal values only)."""
        w = self.weighted
        if w is not None and cluster is not None:
            e = w.by_name.get(cluster)
            if e is not None and e.response_levels:
                _apply_levels(e.response_levels, headers)
        if self._resp_levels:
            _apply_levels(self._resp_levels, headers)

    def redirect_location(self, scheme: bytes, authority: bytes, path: bytes) -> tuple[int, bytes]:
        """(status, Location) for a REDIRECT route, as Envoy's ``Http::Utility::newUri``.

        ``scheme`` is the request's scheme (x-forwarded-proto), ``authority`` its Host, ``path``
        its raw ``:path``.
        """
        new_scheme = self.scheme_redirect or scheme
        port = self.port_redirect
        if self.host_redirect is not None:
            host = self.host_redirect
        else:
            host = _redirect_host(authority, new_scheme, port, scheme)
        pr = self.path_redirect
        keep_query = False
        if pr is not None:
            if b"?" in pr:
                # The path_redirect's own query wins and is never stripped.
                new_path = pr
                keep_query = True
            else:
                q = path.find(b"?")
                new_path = pr + path[q:] if q >= 0 else pr
        else:
            rw = self.rewrite_path(path)
            new_path = path if rw is None else rw
        if not new_path.startswith(b"/"):
            new_path = b"/" + new_path
        if self.strip_query and not keep_query:
            q = new_path.find(b"?")
            if q >= 0:
                new_path = new_path[:q]
        return self.redirect_code, b"%s://%s%s%s" % (new_scheme, host, port, new_path)


def _redirect_host(authority: bytes, new_scheme: bytes, new_port: bytes, request_scheme: bytes) -> bytes:
    """Envoy's ``processRequestHost``: drop the request's port when a new port is set, or when the
    scheme changes and the port was the old scheme's default."""
    if not authority:
        return authority
    if authority[:1] == b"[":
        end = authority.rfind(b"]:")
        end = end + 1 if end >= 0 else -1
    else:
        end = authority.rfind(b":")
    if end < 0:
        return authority
    req_port = authority[end:]
    remove = bool(new_port)
    if new_scheme != request_scheme:
        remove |= request_scheme == b"https" and req_port == b":443"
        remove |= request_scheme == b"http" and req_port == b":80"
    return authority[:end] if remove else authority


# --------------------------------------------------------------------------- virtual hosts


class VirtualHost:
    """A compiled ``VirtualHost``."""

    __slots__ = (
        "_routes",
        "cors",
        "cors_path",
        "domains",
        "include_attempt_count_in_response",
        "include_request_attempt_count",
        "mirrors",
        "name",
        "per_request_buffer_limit_bytes",
        "rate_limits",
        "request_levels",
        "require_tls",
        "response_levels",
        "retry",
        "routes",
        "typed_per_filter_config",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.cors: Any = None  # the deprecated ``cors`` proto, compiled per route (_legacy_cors)
        self.cors_path = ""
        self.domains: tuple[str, ...] = ()
        self.routes: list[Route] = []
        self.rate_limits: tuple[RateLimitEntry, ...] = ()
        self._routes: tuple[Any, ...] = ()  # routes as matched: Route, or a _RegexRun of several
        self.require_tls = 0  # 0 NONE, 1 EXTERNAL_ONLY, 2 ALL
        self.retry: RetryPolicy | None = None
        self.request_levels: _Level = (frozenset(), ())
        self.response_levels: _Level = (frozenset(), ())
        self.typed_per_filter_config: dict[str, Any] = {}
        self.include_request_attempt_count = False
        self.include_attempt_count_in_response = False
        self.per_request_buffer_limit_bytes: int | None = None
        # request_mirror_policies for its routes without their own: this virtual host's, else the
        # route configuration's (None: no mirroring)
        self.mirrors: tuple[MirrorPolicy, ...] | None = None

    def __repr__(self) -> str:
        return f"VirtualHost({self.name!r})"


_MISS = object()


class RouteTable:
    """A compiled ``RouteConfiguration``; see the module docstring."""

    __slots__ = (
        "_cache",
        "_default",
        "_exact",
        "_ignore_params",
        "_ignore_port",
        "_only_default",
        "_prefixes",
        "_suffixes",
        "internal_only_headers",
        "mirrors",
        "name",
        "notices",
        "request_levels",
        "response_levels",
        "typed_per_filter_config",
        "vhost_header",
        "virtual_hosts",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.virtual_hosts: list[VirtualHost] = []
        self.notices: list[str] = []
        self.internal_only_headers: frozenset[bytes] = frozenset()
        self.mirrors: tuple[MirrorPolicy, ...] | None = None  # the configuration-level policies
        self.vhost_header: bytes | None = None
        self.typed_per_filter_config: dict[str, Any] = {}
        self.request_levels: _Level = (frozenset(), ())
        self.response_levels: _Level = (frozenset(), ())
        self._exact: dict[bytes, VirtualHost] = {}
        # (length, {suffix_or_prefix: vhost}), longest first.
        self._suffixes: list[tuple[int, dict[bytes, VirtualHost]]] = []
        self._prefixes: list[tuple[int, dict[bytes, VirtualHost]]] = []
        self._default: VirtualHost | None = None
        self._only_default = False
        self._ignore_port = False
        self._ignore_params = False
        self._cache: dict[bytes, VirtualHost | None] = {}

    # -- hot path --

    def match(self, authority: bytes, path: bytes, method: bytes, headers: HeaderMap) -> Route | None:
        """The first route of the selected virtual host that matches, or None (Envoy: 404 NR)."""
        if self._only_default:
            vh = self._default
        else:
            vh = self._cache.get(authority, _MISS)  # type: ignore[arg-type]
            if vh is _MISS:
                vh = self.find_virtual_host(authority)
                cache = self._cache
                if len(cache) >= VHOST_CACHE_MAX:
                    cache.clear()
                cache[authority] = vh
        if vh is None:
            return None
        p = path
        q = p.find(b"?")
        if q >= 0:
            p = p[:q]
        if b"#" in p:
            p = p[: p.find(b"#")]
        if self._ignore_params and b";" in p:
            p = _PATH_PARAMS_RE.sub(b"", p)
        lower: bytes | None = None
        qcache: list[Any] | None = None
        for r in vh._routes:
            k = r._pk
            if k == _PK_PREFIX:
                if not p.startswith(r._pat):
                    continue
            elif k == _PK_EXACT:
                if p != r._pat:
                    continue
            elif k == _PK_IPREFIX:
                if lower is None:
                    lower = p.lower()
                if not lower.startswith(r._pat):
                    continue
            elif k == _PK_IEXACT:
                if lower is None:
                    lower = p.lower()
                if lower != r._pat:
                    continue
            elif k == _PK_REGEX:
                if r._pat.fullmatch(p) is None:
                    continue
            elif k == _PK_RUN:
                m = r.re.fullmatch(p)
                if m is None:
                    continue
                found = r.first(m, p, headers, method, authority, path)
                if found is None:
                    continue
                return found  # type: ignore[no-any-return]
            elif k == _PK_SEP or k == _PK_ISEP:
                if k == _PK_ISEP:
                    if lower is None:
                        lower = p.lower()
                    s = lower
                else:
                    s = p
                if not s.startswith(r._pat) or (len(s) > r._plen and s[r._plen] != 0x2F):
                    continue
            # _PK_CONNECT has no path test; _matches_extra checks the method.
            if r._extra:
                if qcache is None:
                    qcache = [None]  # parsed query parameters, shared by the routes tried
                if not r._matches_extra(headers, method, authority, path, qcache):
                    continue
            return r
        return None

    def find_virtual_host(self, authority: bytes) -> VirtualHost | None:
        """Virtual host for ``authority`` (uncached); see the module docstring for the order."""
        if self._only_default:
            return self._default
        host = authority.lower()
        if self._ignore_port:
            host = strip_port(host)
            vh = self._lookup(host)
        else:
            vh = self._lookup(host)
            if vh is None:
                bare = strip_port(host)
                if len(bare) != len(host):
                    vh = self._lookup(bare)
        return vh if vh is not None else self._default

    def _lookup(self, host: bytes) -> VirtualHost | None:
        vh = self._exact.get(host)
        if vh is not None:
            return vh
        n = len(host)
        for ln, table in self._suffixes:
            if ln < n:
                vh = table.get(host[n - ln :])
                if vh is not None:
                    return vh
        for ln, table in self._prefixes:
            if ln < n:
                vh = table.get(host[:ln])
                if vh is not None:
                    return vh
        return None

    # -- compilation --

    @classmethod
    def compile(cls, rc: Any, path: str = "route_config") -> RouteTable:
        t = cls(rc.name)
        notes = t.notices
        if rc.HasField("vhds"):
            raise ConfigError(f"{path}.vhds", "VHDS is not supported")
        if len(rc.cluster_specifier_plugins):
            raise ConfigError(
                f"{path}.cluster_specifier_plugins[0]", "cluster specifier plugins are not supported"
            )
        t.mirrors = _compile_mirrors(rc.request_mirror_policies, f"{path}.request_mirror_policies", notes)
        t._ignore_port = rc.ignore_port_in_host_matching
        t._ignore_params = rc.ignore_path_parameters_in_path_matching
        t.vhost_header = _b(rc.vhost_header).lower() if rc.vhost_header else None
        t.internal_only_headers = frozenset(_b(h).lower() for h in rc.internal_only_headers)
        t.typed_per_filter_config = _tpfc(rc)
        t.request_levels = _compile_level(
            rc.request_headers_to_add, rc.request_headers_to_remove, path, notes, prefix="request"
        )
        t.response_levels = _compile_level(
            rc.response_headers_to_add, rc.response_headers_to_remove, path, notes, prefix="response"
        )
        max_body = DEFAULT_MAX_DIRECT_RESPONSE_BODY
        if rc.HasField("max_direct_response_body_size_bytes"):
            max_body = int(rc.max_direct_response_body_size_bytes.value)
        most_specific_wins = rc.most_specific_header_mutations_wins

        seen: dict[bytes, str] = {}
        suffixes: dict[int, dict[bytes, VirtualHost]] = {}
        prefixes: dict[int, dict[bytes, VirtualHost]] = {}
        for i, vproto in enumerate(rc.virtual_hosts):
            vp = f"{path}.virtual_hosts[{i}]"
            vh = _compile_vhost(vproto, vp, t, notes, max_body, most_specific_wins)
            t.virtual_hosts.append(vh)
            for j, d in enumerate(vproto.domains):
                dp = f"{vp}.domains[{j}]"
                dom = _b(d).lower()
                if dom in seen:
                    if dom == b"*":
                        raise ConfigError(
                            dp, f"only a single wildcard domain is permitted (also in {seen[dom]!r})"
                        )
                    raise ConfigError(dp, f"duplicate domain {d!r} (also in virtual host {seen[dom]!r})")
                seen[dom] = vh.name
                if dom == b"*":
                    t._default = vh
                elif dom.startswith(b"*"):
                    suffixes.setdefault(len(dom) - 1, {})[dom[1:]] = vh
                elif dom.endswith(b"*"):
                    prefixes.setdefault(len(dom) - 1, {})[dom[:-1]] = vh
                else:
                    t._exact[dom] = vh
        t._suffixes = sorted(suffixes.items(), key=lambda kv: -kv[0])
        t._prefixes = sorted(prefixes.items(), key=lambda kv: -kv[0])
        t._only_default = not t._exact and not t._suffixes and not t._prefixes
        return t


def _compile_vhost(
    vproto: Any, vp: str, table: RouteTable, notes: list[str], max_body: int, most_specific_wins: bool
) -> VirtualHost:
    if not vproto.name:
        raise ConfigError(f"{vp}.name", "virtual host name is required")
    if not len(vproto.domains):
        raise ConfigError(f"{vp}.domains", "at least one domain is required")
    if vproto.HasField("matcher"):
        raise ConfigError(f"{vp}.matcher", "the matcher tree API is not supported; use routes")
    if vproto.HasField("retry_policy_typed_config"):
        raise ConfigError(f"{vp}.retry_policy_typed_config", "typed retry policies are not supported")
    vh = VirtualHost(vproto.name)
    vh.domains = tuple(vproto.domains)
    vh.require_tls = int(vproto.require_tls)
    vh.include_request_attempt_count = vproto.include_request_attempt_count
    vh.include_attempt_count_in_response = vproto.include_attempt_count_in_response
    if vproto.HasField("per_request_buffer_limit_bytes"):
        vh.per_request_buffer_limit_bytes = int(vproto.per_request_buffer_limit_bytes.value)
    vh.typed_per_filter_config = _tpfc(vproto)
    vh.rate_limits = compile_rate_limits(vproto.rate_limits, f"{vp}.rate_limits", notes, HeaderMatcher)
    if len(vproto.virtual_clusters):
        notes.append(f"{vp}.virtual_clusters: ignored")
    # The most specific non-empty list wins whole (Envoy does not merge the levels).
    vh.mirrors = (
        _compile_mirrors(vproto.request_mirror_policies, f"{vp}.request_mirror_policies", notes)
        if len(vproto.request_mirror_policies)
        else table.mirrors
    )
    if vproto.HasField("hedge_policy"):
        notes.append(f"{vp}.hedge_policy: ignored")
    if vproto.HasField("cors"):
        vh.cors, vh.cors_path = vproto.cors, f"{vp}.cors"  # see _legacy_cors
    if vproto.HasField("retry_policy"):
        vh.retry = RetryPolicy.compile(vproto.retry_policy, f"{vp}.retry_policy", notes)
    vh.request_levels = _compile_level(
        vproto.request_headers_to_add, vproto.request_headers_to_remove, vp, notes, prefix="request"
    )
    vh.response_levels = _compile_level(
        vproto.response_headers_to_add, vproto.response_headers_to_remove, vp, notes, prefix="response"
    )
    for k, rproto in enumerate(vproto.routes):
        rp = f"{vp}.routes[{k}]"
        vh.routes.append(_compile_route(rproto, rp, vh, table, notes, max_body, most_specific_wins))
    vh._routes = _with_regex_runs(vh.routes)
    return vh


def _compile_route(
    rproto: Any,
    rp: str,
    vh: VirtualHost,
    table: RouteTable,
    notes: list[str],
    max_body: int,
    most_specific_wins: bool,
) -> Route:
    r = Route(vh)
    r.name = rproto.name
    r.proto = rproto
    if not rproto.HasField("match"):
        raise ConfigError(f"{rp}.match", "match is required")
    _compile_match(r, rproto.match, f"{rp}.match", notes)

    # Header mutations: one level per scope, in Envoy's evaluation order.
    route_req = _compile_level(
        rproto.request_headers_to_add, rproto.request_headers_to_remove, rp, notes, prefix="request"
    )
    route_resp = _compile_level(
        rproto.response_headers_to_add, rproto.response_headers_to_remove, rp, notes, prefix="response"
    )
    req_levels = [route_req, vh.request_levels, table.request_levels]
    resp_levels = [route_resp, vh.response_levels, table.response_levels]
    if most_specific_wins:
        req_levels.reverse()
        resp_levels.reverse()
    r._req_levels = tuple(lv for lv in req_levels if lv[0] or lv[1])
    r._resp_levels = tuple(lv for lv in resp_levels if lv[0] or lv[1])
    r.request_headers_to_remove, r.request_headers_to_add = _flatten(r._req_levels)
    r.response_headers_to_remove, r.response_headers_to_add = _flatten(r._resp_levels)

    merged = dict(table.typed_per_filter_config)
    merged.update(vh.typed_per_filter_config)
    merged.update(_tpfc(rproto))
    r.typed_per_filter_config = merged
    r.filter_configs = (
        _compile_filter_configs(
            [table.typed_per_filter_config, vh.typed_per_filter_config, _tpfc(rproto)], rp, notes
        )
        if merged
        else {}
    )

    action = rproto.WhichOneof("action")
    if action == "route":
        r.kind = ROUTE
        _compile_route_action(r, rproto.route, f"{rp}.route", vh, notes, most_specific_wins)
    elif action == "redirect":
        r.kind = REDIRECT
        _compile_redirect(r, rproto.redirect, f"{rp}.redirect", notes)
    elif action == "direct_response":
        r.kind = DIRECT_RESPONSE
        _compile_direct(r, rproto.direct_response, f"{rp}.direct_response", notes, max_body)
    elif action is None:
        raise ConfigError(rp, "one of route, redirect, direct_response is required")
    else:
        raise ConfigError(f"{rp}.{action}", f"route action {action!r} is not supported")
    if action == "route":
        _legacy_cors(r, vh, rproto.route.cors if rproto.route.HasField("cors") else None, rp)
    return r


def _compile_match(r: Route, m: Any, mp: str, notes: list[str]) -> None:
    cs = m.case_sensitive.value if m.HasField("case_sensitive") else True
    spec = m.WhichOneof("path_specifier")
    if spec == "prefix":
        pat = _b(m.prefix)
        r._pk, r._pat = (_PK_PREFIX, pat) if cs else (_PK_IPREFIX, pat.lower())
        r._plen = len(pat)
    elif spec == "path":
        pat = _b(m.path)
        r._pk, r._pat = (_PK_EXACT, pat) if cs else (_PK_IEXACT, pat.lower())
        r._plen = len(pat)
    elif spec == "safe_regex":
        r._pk, r._pat = _PK_REGEX, compile_regex(m.safe_regex, f"{mp}.safe_regex")
    elif spec == "path_separated_prefix":
        pat = _b(m.path_separated_prefix)
        if not pat or pat.endswith(b"/") or b"?" in pat or b"#" in pat:
            raise ConfigError(
                f"{mp}.path_separated_prefix", "must be non-empty and contain no '?', '#' nor a trailing '/'"
            )
        r._pk, r._pat = (_PK_SEP, pat) if cs else (_PK_ISEP, pat.lower())
        r._plen = len(pat)
    elif spec == "connect_matcher":
        r._pk, r._connect = _PK_CONNECT, True
    elif spec is None:
        raise ConfigError(
            mp, "one of prefix, path, safe_regex, path_separated_prefix, connect_matcher is required"
        )
    else:
        raise ConfigError(f"{mp}.{spec}", f"path specifier {spec!r} is not supported")
    if m.HasField("tls_context"):
        raise ConfigError(f"{mp}.tls_context", "TLS context matching is not supported")
    for fname in ("dynamic_metadata", "filter_state"):
        if len(getattr(m, fname)):
            raise ConfigError(f"{mp}.{fname}[0]", f"{fname} matching is not supported")
    if m.HasField("runtime_fraction"):
        notes.append(f"{mp}.runtime_fraction: no runtime; the route always matches")
    r._headers = tuple(HeaderMatcher.compile(h, f"{mp}.headers[{j}]") for j, h in enumerate(m.headers))
    r._query = tuple(
        QueryParameterMatcher.compile(q, f"{mp}.query_parameters[{j}]")
        for j, q in enumerate(m.query_parameters)
    )
    r._grpc = m.HasField("grpc")
    r._extra = bool(r._headers or r._query or r._grpc or r._connect)


def _set_prefix_rewrite(r: Route, prefix_rewrite: str) -> None:
    r._rw_prefix = _b(prefix_rewrite)
    # Envoy replaces the matched part: the prefix for prefix-like routes, else the whole path.
    r._rw_kind = _RW_PREFIX_LEN if r._pk in (_PK_PREFIX, _PK_IPREFIX, _PK_SEP, _PK_ISEP) else _RW_WHOLE


def _compile_route_action(
    r: Route, a: Any, ap: str, vh: VirtualHost, notes: list[str], most_specific_wins: bool
) -> None:
    spec = a.WhichOneof("cluster_specifier")
    if spec == "cluster":
        if not a.cluster:
            raise ConfigError(f"{ap}.cluster", "cluster name is required")
        r.cluster = a.cluster
    elif spec == "cluster_header":
        h = _b(a.cluster_header).lower()
        if not h or h.startswith(b":"):
            raise ConfigError(f"{ap}.cluster_header", "a regular header name is required")
        r.cluster_header = h
    elif spec == "weighted_clusters":
        r.weighted = _compile_weighted(a.weighted_clusters, f"{ap}.weighted_clusters", notes)
    elif spec is None:
        raise ConfigError(ap, "one of cluster, cluster_header, weighted_clusters is required")
    else:
        raise ConfigError(f"{ap}.{spec}", f"cluster specifier {spec!r} is not supported")
    r.cluster_not_found_response_code = {0: 503, 1: 404, 2: 500}.get(
        int(a.cluster_not_found_response_code), 503
    )
    r.high = a.priority != 0  # RoutingPriority: DEFAULT 0, HIGH 1

    if a.prefix_rewrite and a.HasField("regex_rewrite"):
        raise ConfigError(f"{ap}.regex_rewrite", "only one of prefix_rewrite and regex_rewrite may be set")
    for fname in ("path_rewrite_policy",):
        if a.HasField(fname):
            raise ConfigError(f"{ap}.{fname}", f"{fname} is not supported")
    if a.path_rewrite:
        raise ConfigError(f"{ap}.path_rewrite", "path_rewrite formatters are not supported")
    if a.prefix_rewrite:
        _set_prefix_rewrite(r, a.prefix_rewrite)
    elif a.HasField("regex_rewrite"):
        r._rw_kind = _RW_REGEX
        r._rw_regex = RegexRewrite.compile(a.regex_rewrite, f"{ap}.regex_rewrite")

    hr = a.WhichOneof("host_rewrite_specifier")
    if hr == "host_rewrite_literal":
        r.host_rewrite = _b(a.host_rewrite_literal)
    elif hr == "auto_host_rewrite":
        r.auto_host_rewrite = a.auto_host_rewrite.value
    elif hr == "host_rewrite_header":
        r.host_rewrite_header = _b(a.host_rewrite_header).lower()
    elif hr is not None:
        raise ConfigError(f"{ap}.{hr}", f"{hr} is not supported")

    t = _dur(a, "timeout")
    r.timeout = DEFAULT_ROUTE_TIMEOUT if t is None else t
    r.idle_timeout = _dur(a, "idle_timeout")
    if a.HasField("max_stream_duration"):
        msd = a.max_stream_duration
        r.max_stream_duration = _dur(msd, "max_stream_duration")
        r.max_grpc_timeout = _dur(msd, "grpc_timeout_header_max")
        r.grpc_timeout_offset = _dur(msd, "grpc_timeout_header_offset")
    if r.max_grpc_timeout is None:
        r.max_grpc_timeout = _dur(a, "max_grpc_timeout")
    if r.grpc_timeout_offset is None:
        r.grpc_timeout_offset = _dur(a, "grpc_timeout_offset")

    if a.HasField("retry_policy_typed_config"):
        raise ConfigError(f"{ap}.retry_policy_typed_config", "typed retry policies are not supported")
    if a.HasField("retry_policy"):
        r.retry = RetryPolicy.compile(a.retry_policy, f"{ap}.retry_policy", notes)
    else:
        r.retry = vh.retry

    for j, u in enumerate(a.upgrade_configs):
        if not u.upgrade_type:
            raise ConfigError(f"{ap}.upgrade_configs[{j}].upgrade_type", "upgrade_type is required")
        kind = _b(u.upgrade_type).lower()
        enabled = u.enabled.value if u.HasField("enabled") else True
        r.upgrade_configs[kind] = enabled
        if u.HasField("connect_config"):
            up = f"{ap}.upgrade_configs[{j}].connect_config"
            if kind != b"connect":
                raise ConfigError(up, "connect_config is only valid for upgrade_type CONNECT")
            r.connect_terminate = enabled
            cc = u.connect_config
            if cc.HasField("proxy_protocol_config"):
                notes.append(f"{up}.proxy_protocol_config: ignored (no PROXY header is sent upstream)")
            if cc.allow_post:
                notes.append(f"{up}.allow_post: ignored (only CONNECT is terminated)")

    r.rate_limits = compile_rate_limits(a.rate_limits, f"{ap}.rate_limits", notes, HeaderMatcher)
    r.include_vh_rate_limits = bool(a.include_vh_rate_limits.value)
    r.mirrors = (
        _compile_mirrors(a.request_mirror_policies, f"{ap}.request_mirror_policies", notes)
        if len(a.request_mirror_policies)
        else vh.mirrors
    )
    for fname in ("hedge_policy", "internal_redirect_policy", "early_data_policy"):
        if a.HasField(fname):
            notes.append(f"{ap}.{fname}: ignored")


def _compile_mirrors(protos: Any, path: str, notes: list[str]) -> tuple[MirrorPolicy, ...] | None:
    """``request_mirror_policies`` of one level; None when none is left (0 % ones compile to
    nothing). A level with policies replaces the less specific levels' whole, even when all of
    its own are 0 %."""
    out = []
    for j, mp in enumerate(protos):
        m = MirrorPolicy.compile(mp, f"{path}[{j}]", notes)
        if m is not None:
            out.append(m)
    return tuple(out) or None


def _compile_weighted(wc: Any, wp: str, notes: list[str]) -> WeightedClusters:
    if not len(wc.clusters):
        raise ConfigError(f"{wp}.clusters", "at least one cluster is required")
    if wc.runtime_key_prefix:
        notes.append(f"{wp}.runtime_key_prefix: no runtime; static weights used")
    if wc.WhichOneof("random_value_specifier") == "use_hash_policy" and wc.use_hash_policy.value:
        notes.append(f"{wp}.use_hash_policy: ignored; a random value is used")
    entries: list[ClusterEntry] = []
    for j, cw in enumerate(wc.clusters):
        cp = f"{wp}.clusters[{j}]"
        e = ClusterEntry()
        if cw.name and cw.cluster_header:
            raise ConfigError(cp, "only one of name and cluster_header may be set")
        if cw.name:
            e.name = cw.name
        elif cw.cluster_header:
            e.cluster_header = _b(cw.cluster_header).lower()
        else:
            raise ConfigError(f"{cp}.name", "cluster name or cluster_header is required")
        e.weight = int(cw.weight.value) if cw.HasField("weight") else 0
        if cw.host_rewrite_literal:
            e.host_rewrite = _b(cw.host_rewrite_literal)
        req = _compile_level(
            cw.request_headers_to_add, cw.request_headers_to_remove, cp, notes, prefix="request"
        )
        resp = _compile_level(
            cw.response_headers_to_add, cw.response_headers_to_remove, cp, notes, prefix="response"
        )
        e.request_levels = (req,) if req[0] or req[1] else ()
        e.response_levels = (resp,) if resp[0] or resp[1] else ()
        e.typed_per_filter_config = _tpfc(cw)
        entries.append(e)
    total = sum(e.weight for e in entries)
    if total <= 0:
        raise ConfigError(f"{wp}.clusters", "sum of weights must be greater than 0")
    if total > 0xFFFFFFFF:
        raise ConfigError(f"{wp}.clusters", "sum of weights exceeds 4294967295")
    header = _b(wc.header_name).lower() if wc.header_name else None
    return WeightedClusters(entries, header)


def _compile_redirect(r: Route, rd: Any, rdp: str, notes: list[str]) -> None:
    code = _REDIRECT_CODES.get(int(rd.response_code))
    if code is None:
        raise ConfigError(f"{rdp}.response_code", f"unknown response code {rd.response_code}")
    r.redirect_code = code
    r.direct_status = code
    scheme = rd.WhichOneof("scheme_rewrite_specifier")
    if scheme == "https_redirect" and rd.https_redirect:
        r.https_redirect = True
        r.scheme_redirect = b"https"
    elif scheme == "scheme_redirect" and rd.scheme_redirect:
        r.scheme_redirect = _b(rd.scheme_redirect).lower()
    if rd.host_redirect:
        r.host_redirect = _b(rd.host_redirect)
    if rd.port_redirect:
        if rd.port_redirect > 65535:
            raise ConfigError(f"{rdp}.port_redirect", f"port {rd.port_redirect} out of range")
        r.port_redirect = b":%d" % rd.port_redirect
    pspec = rd.WhichOneof("path_rewrite_specifier")
    if pspec == "path_redirect":
        r.path_redirect = _b(rd.path_redirect)
    elif pspec == "prefix_rewrite":
        _set_prefix_rewrite(r, rd.prefix_rewrite)
    elif pspec == "regex_rewrite":
        r._rw_kind = _RW_REGEX
        r._rw_regex = RegexRewrite.compile(rd.regex_rewrite, f"{rdp}.regex_rewrite")
    r.strip_query = rd.strip_query


def _compile_direct(r: Route, dr: Any, dp: str, notes: list[str], max_body: int) -> None:
    if not 200 <= dr.status < 600:
        raise ConfigError(f"{dp}.status", f"status {dr.status} must be in [200, 600)")
    r.direct_status = int(dr.status)
    if dr.HasField("body"):
        r.direct_body = _read_data_source(dr.body, f"{dp}.body")
        if len(r.direct_body) > max_body:
            raise ConfigError(
                f"{dp}.body",
                f"body is {len(r.direct_body)} bytes, more than max_direct_response_body_size_bytes {max_body}",
            )
    if dr.HasField("body_format"):
        notes.append(f"{dp}.body_format: ignored; the body is sent as configured")


def _read_data_source(ds: Any, path: str) -> bytes:
    kind = ds.WhichOneof("specifier")
    if kind == "inline_string":
        return _b(ds.inline_string)
    if kind == "inline_bytes":
        return bytes(ds.inline_bytes)
    if kind == "filename":
        try:
            with open(ds.filename, "rb") as f:
                return f.read()
        except OSError as e:
            raise ConfigError(f"{path}.filename", f"cannot read {ds.filename!r}: {e.strerror}") from None
    if kind == "environment_variable":
        v = os.environ.get(ds.environment_variable)
        if v is None:
            raise ConfigError(
                f"{path}.environment_variable", f"environment variable {ds.environment_variable!r} is not set"
            )
        return _b(v)
    if kind is None:
        return b""
    raise ConfigError(f"{path}.{kind}", f"data source {kind!r} is not supported")


__all__ = [
    "ADD_IF_ABSENT",
    "APPEND_IF_EXISTS_OR_ADD",
    "DIRECT_RESPONSE",
    "OVERWRITE_IF_EXISTS",
    "OVERWRITE_IF_EXISTS_OR_ADD",
    "REDIRECT",
    "ROUTE",
    "ClusterEntry",
    "HeaderAppend",
    "HeaderMatcher",
    "QueryParameterMatcher",
    "RegexRewrite",
    "RetryPolicy",
    "Route",
    "RouteTable",
    "StringMatcher",
    "VirtualHost",
    "WeightedClusters",
    "compile_regex",
    "parse_query",
    "strip_port",
]
