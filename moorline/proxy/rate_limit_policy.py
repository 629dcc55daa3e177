"""Compiled route and virtual host ``rate_limits`` (``envoy.config.route.v3.RateLimit``): the
descriptors a global rate limit filter sends to the rate limit service.

Each entry has a ``stage`` and a list of actions; every action appends one ``(key, value)``
pair to the entry's descriptor, in order. An action that cannot produce its pair (a missing
header, a header matcher that does not give the expected answer, no IP peer) drops the whole
descriptor, except ``request_headers`` with ``skip_if_absent``, which only leaves its pair out.
An entry whose descriptor ends up empty sends nothing. Compiled once with the route table
(``RouteTable.compile``); the request path reads no proto.
"""

from __future__ import annotations

from typing import Any

from moorline.config.errors import ConfigError
from moorline.config.matchers import _b
from moorline.protocol.headers import RequestHeaders

# Action kinds (the first item of a compiled action tuple).
A_SOURCE_CLUSTER = 0
A_DESTINATION_CLUSTER = 1
A_REQUEST_HEADERS = 2  # (kind, header name, descriptor key, skip_if_absent)
A_REMOTE_ADDRESS = 3
A_GENERIC_KEY = 4  # (kind, key, value)
A_HEADER_VALUE_MATCH = 5  # (kind, key, value, expect_match, matchers)

MAX_STAGE = 10

Descriptor = tuple[tuple[str, str], ...]


class Facts:
    """What the actions read about one request (filled by the filter, read only here)."""

    __slots__ = ("cluster", "local_cluster", "remote_ip")

    def __init__(self, cluster: str | None, remote_ip: str | None, local_cluster: str) -> None:
        self.cluster = cluster
        self.remote_ip = remote_ip
        self.local_cluster = local_cluster


class RateLimitEntry:
    """One compiled ``RateLimit``: its stage, its disable key and its actions."""

    __slots__ = ("actions", "disable_key", "stage")

    def __init__(self, stage: int, disable_key: str, actions: tuple[tuple[Any, ...], ...]) -> None:
        self.stage = stage
        self.disable_key = disable_key
        self.actions = actions

    def descriptor(self, headers: RequestHeaders, facts: Facts) -> Descriptor | None:
        out: list[tuple[str, str]] = []
        for a in self.actions:
            kind = a[0]
            if kind == A_REQUEST_HEADERS:
                v = headers.get(a[1])
                if v is None:
                    if a[3]:
                        continue
                    return None
                out.append((a[2], v.decode("latin-1")))
            elif kind == A_GENERIC_KEY:
                out.append((a[1], a[2]))
            elif kind == A_HEADER_VALUE_MATCH:
                method, authority, path = headers.method, headers.authority, headers.path
                ok = all(m.match(headers, method, authority, path) for m in a[4])
                if ok != a[3]:
                    return None
                out.append((a[1], a[2]))
            elif kind == A_REMOTE_ADDRESS:
                if facts.remote_ip is None:
                    return None
                out.append(("remote_address", facts.remote_ip))
            elif kind == A_DESTINATION_CLUSTER:
                if facts.cluster is None:
                    return None
                out.append(("destination_cluster", facts.cluster))
            else:  # A_SOURCE_CLUSTER
                out.append(("source_cluster", facts.local_cluster))
        return tuple(out) if out else None


def descriptors(
    entries: tuple[RateLimitEntry, ...], stage: int, headers: RequestHeaders, facts: Facts
) -> list[Descriptor]:
    """The descriptors of the entries of ``stage``, in config order."""
    out = []
    for e in entries:
        if e.stage != stage:
            continue
        d = e.descriptor(headers, facts)
        if d is not None:
            out.append(d)
    return out


def compile_rate_limits(
    protos: Any, path: str, notes: list[str], header_matcher: Any
) -> tuple[RateLimitEntry, ...]:
    """Compile a repeated ``RateLimit`` field. ``header_matcher`` is ``route_table.HeaderMatcher``
    (passed in: the route table imports this module)."""
    out = []
    for i, rl in enumerate(protos):
        p = f"{path}[{i}]"
        stage = int(rl.stage.value) if rl.HasField("stage") else 0
        if stage > MAX_STAGE:
            raise ConfigError(f"{p}.stage", f"must be at most {MAX_STAGE}")
        if not len(rl.actions):
            raise ConfigError(f"{p}.actions", "at least one action is required")
        if rl.disable_key:
            notes.append(f"{p}.disable_key: no runtime; the rate limit is always enabled")
        if rl.HasField("limit"):
            notes.append(f"{p}.limit: dynamic metadata overrides are not produced; ignored")
        if rl.HasField("hits_addend"):
            notes.append(f"{p}.hits_addend: ignored; each request counts once")
        if rl.apply_on_stream_done:
            raise ConfigError(f"{p}.apply_on_stream_done", "rate limiting at stream end is not supported")
        actions = tuple(_action(a, f"{p}.actions[{j}]", header_matcher) for j, a in enumerate(rl.actions))
        out.append(RateLimitEntry(stage, rl.disable_key, actions))
    return tuple(out)


def _action(a: Any, p: str, header_matcher: Any) -> tuple[Any, ...]:
    kind = a.WhichOneof("action_specifier")
    if kind == "source_cluster":
        return (A_SOURCE_CLUSTER,)
    if kind == "destination_cluster":
        return (A_DESTINATION_CLUSTER,)
    if kind == "remote_address":
        return (A_REMOTE_ADDRESS,)
    if kind == "request_headers":
        rh = a.request_headers
        if not rh.header_name:
            raise ConfigError(f"{p}.request_headers.header_name", "header_name is required")
        if not rh.descriptor_key:
            raise ConfigError(f"{p}.request_headers.descriptor_key", "descriptor_key is required")
        return (A_REQUEST_HEADERS, _b(rh.header_name).lower(), rh.descriptor_key, bool(rh.skip_if_absent))
    if kind == "generic_key":
        g = a.generic_key
        if not g.descriptor_value:
            raise ConfigError(f"{p}.generic_key.descriptor_value", "descriptor_value is required")
        return (A_GENERIC_KEY, g.descriptor_key or "generic_key", g.descriptor_value)
    if kind == "header_value_match":
        h = a.header_value_match
        if not h.descriptor_value:
            raise ConfigError(f"{p}.header_value_match.descriptor_value", "descriptor_value is required")
        if not len(h.headers):
            raise ConfigError(f"{p}.header_value_match.headers", "at least one header matcher is required")
        matchers = tuple(
            header_matcher.compile(m, f"{p}.header_value_match.headers[{k}]") for k, m in enumerate(h.headers)
        )
        expect = h.expect_match.value if h.HasField("expect_match") else True
        return (
            A_HEADER_VALUE_MATCH,
            h.descriptor_key or "header_match",
            h.descriptor_value,
            expect,
            matchers,
        )
    if kind is None:
        raise ConfigError(p, "an action is required")
    raise ConfigError(f"{p}.{kind}", f"rate limit action {kind!r} is not supported")
