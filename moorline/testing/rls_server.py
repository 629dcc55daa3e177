"""A test rate limit service: ``envoy.service.ratelimit.v3.RateLimitService`` over grpcio.

Counters are fixed windows kept in memory, one per (domain, descriptor): a descriptor's limit is
the first rule whose entries are all in the descriptor (a rule value ``None`` matches any value
of its key, each value then counting apart, as envoyproxy/ratelimit does for a key without a
value). The answer is ``OVER_LIMIT`` when any descriptor is over. The server runs in a daemon
thread (grpcio's own thread pool), so a synchronous test drives it directly.

    srv = RlsServer(limits=[Limit({"client": None}, 2)]).start()
    ... srv.port ... srv.requests ... srv.slow = 1.0 ... srv.fail = True ... srv.stop()

``slow`` (seconds) delays every answer; ``fail`` answers ``UNAVAILABLE``; ``requests`` records
each request as ``(domain, [[(key, value), ...], ...])`` (at most ``MAX_RECORDED``).

With ``backend=RedisLimiter(config, redis_port)`` the decision is envoyproxy/ratelimit's instead,
counted in a real Redis so that several services (and several proxies) share the counters:

    cfg = {"domain": "edge", "descriptors": [
        {"key": "client", "rate_limit": {"unit": "hour", "requests_per_unit": 2}}]}
    srv = RlsServer(backend=RedisLimiter(cfg, redis.port)).start()

The config is that service's YAML (one document per domain, as a dict, a list of them, or YAML
text): a tree of descriptors (``key``, optional ``value``, nested ``descriptors``,
``rate_limit: {unit, requests_per_unit, name, unlimited}``, ``shadow_mode``). A request
descriptor walks the tree entry by entry, at each level taking the node with its key and value,
else a node whose value ends in ``*`` and prefixes it, else the node with its key and no value;
the limit is the last node's ``rate_limit``. Windows are fixed, aligned on the unit (second,
minute, hour, day) from the clock passed in (``time.time`` by default). The counter key is
``<domain>_<key>_<value>_..._<window start>``: one ``INCRBY hits`` + ``EXPIRE <unit>`` per limited
descriptor (a descriptor's ``limit`` override replaces its rule), all in one pipeline per
request. Over the limit: ``OVER_LIMIT`` with ``limit_remaining`` 0 (``shadow_mode``: counted,
but answered ``OK``). Redis unreachable or failing: the call ends ``UNAVAILABLE``, so the proxy's
``failure_mode_deny`` decides. ``detailed_metric`` is accepted; this service keeps no stats.
"""

from __future__ import annotations

import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import redis
import yaml
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from redis.backoff import NoBackoff
from redis.retry import Retry

from moorline.config.errors import ConfigError

MAX_RECORDED = 10000


@dataclass
class Limit:
    entries: dict[str, str | None]  # key -> value (None: any value, each counted apart)
    requests_per_unit: int
    unit: int = 1  # RateLimitResponse.RateLimit.Unit: 1 SECOND, 2 MINUTE, 3 HOUR, 4 DAY
    window: float = 3600.0  # the counter window in seconds (long: tests must not race it)
    name: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)  # response_headers_to_add


class RlsServer:
    def __init__(
        self,
        limits: list[Limit] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        backend: RedisLimiter | None = None,
    ) -> None:
        self.limits = list(limits or [])
        self.backend = backend  # None: the in-memory counters of ``limits``
        self.host = host
        self.port = port
        self.slow = 0.0
        self.fail = False
        self.request_headers: list[tuple[str, str]] = []  # request_headers_to_add on OK
        self.requests: list[tuple[str, list[list[tuple[str, str]]]]] = []
        self._counts: dict[tuple[Any, ...], tuple[float, int]] = {}
        self._lock = threading.Lock()
        self._server: Any = None

    # -- lifecycle
    def start(self) -> RlsServer:
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        rls_pb2_grpc.add_RateLimitServiceServicer_to_server(_Servicer(self), self._server)
        self.port = self._server.add_insecure_port(f"{self.host}:{self.port}")
        self._server.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(0)
            self._server = None
        if self.backend is not None:
            self.backend.close()

    def __enter__(self) -> RlsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()
            self._counts.clear()

    # -- the decision
    def _limit_for(self, entries: list[tuple[str, str]]) -> Limit | None:
        have = dict(entries)
        for lim in self.limits:
            if len(lim.entries) != len(have):
                continue
            if all(k in have and (v is None or have[k] == v) for k, v in lim.entries.items()):
                return lim
        return None

    def decide(self, req: Any) -> Any:
        descs = [[(e.key, e.value) for e in d.entries] for d in req.descriptors]
        if self.backend is not None:
            with self._lock:
                if len(self.requests) < MAX_RECORDED:
                    self.requests.append((req.domain, descs))
            resp = self.backend.decide(req)  # outside the lock: Redis round trips run in parallel
            if resp.overall_code == rls_pb2.RateLimitResponse.OK:
                for k, v in self.request_headers:
                    resp.request_headers_to_add.add(key=k, value=v)
            return resp
        hits = req.hits_addend or 1
        resp = rls_pb2.RateLimitResponse(overall_code=rls_pb2.RateLimitResponse.OK)
        now = time.monotonic()
        with self._lock:
            if len(self.requests) < MAX_RECORDED:
                self.requests.append((req.domain, descs))
            for entries in descs:
                st = resp.statuses.add(code=rls_pb2.RateLimitResponse.OK)
                lim = self._limit_for(entries)
                if lim is None:
                    continue
                key = (req.domain, tuple(entries))
                start, n = self._counts.get(key, (now, 0))
                if now - start >= lim.window:
                    start, n = now, 0
                n += hits
                self._counts[key] = (start, n)
                st.current_limit.requests_per_unit = lim.requests_per_unit
                st.current_limit.unit = lim.unit  # type: ignore[assignment]
                st.current_limit.name = lim.name
                st.limit_remaining = max(lim.requests_per_unit - n, 0)
                st.duration_until_reset.seconds = max(int(lim.window - (now - start)), 0)
                if n > lim.requests_per_unit:
                    st.code = rls_pb2.RateLimitResponse.OVER_LIMIT
                    resp.overall_code = rls_pb2.RateLimitResponse.OVER_LIMIT
                for k, v in lim.headers:
                    resp.response_headers_to_add.add(key=k, value=v)
        if resp.overall_code == rls_pb2.RateLimitResponse.OK:
            for k, v in self.request_headers:
                resp.request_headers_to_add.add(key=k, value=v)
        return resp


class _Servicer(rls_pb2_grpc.RateLimitServiceServicer):
    def __init__(self, srv: RlsServer) -> None:
        self.srv = srv

    def ShouldRateLimit(self, request: Any, context: Any) -> Any:
        srv = self.srv
        if srv.slow:
            time.sleep(srv.slow)
        if srv.fail:
            with srv._lock:
                if len(srv.requests) < MAX_RECORDED:
                    srv.requests.append((request.domain, []))
            context.abort(grpc.StatusCode.UNAVAILABLE, "test rate limit service failing")
        try:
            return srv.decide(request)
        except BackendUnavailable as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"redis: {exc}")
        except BadRequest as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))


# ---------------------------------------------------------------------------------------------
# envoyproxy/ratelimit's decision, counted in Redis
# ---------------------------------------------------------------------------------------------

_Code = rls_pb2.RateLimitResponse
# unit name -> (seconds, RateLimitResponse.RateLimit.Unit)
UNITS: dict[str, tuple[int, int]] = {
    "second": (1, rls_pb2.RateLimitResponse.RateLimit.SECOND),
    "minute": (60, rls_pb2.RateLimitResponse.RateLimit.MINUTE),
    "hour": (3600, rls_pb2.RateLimitResponse.RateLimit.HOUR),
    "day": (86400, rls_pb2.RateLimitResponse.RateLimit.DAY),
}
UNLIMITED_REMAINING = 2**32 - 1  # what envoyproxy/ratelimit reports for an ``unlimited`` rule
_DOMAIN_FIELDS = frozenset(("domain", "descriptors"))
_DESCRIPTOR_FIELDS = frozenset(
    ("key", "value", "rate_limit", "descriptors", "shadow_mode", "detailed_metric")
)
_RATE_LIMIT_FIELDS = frozenset(("unit", "requests_per_unit", "unlimited", "name"))


class BackendUnavailable(Exception):
    """Redis could not be reached or failed the pipeline: the RPC ends ``UNAVAILABLE``."""


class BadRequest(Exception):
    """A request envoyproxy/ratelimit refuses (no domain, no descriptor): ``INVALID_ARGUMENT``."""


@dataclass(frozen=True)
class Rule:
    """One compiled ``rate_limit`` (with its node's ``shadow_mode``)."""

    requests_per_unit: int
    unit_seconds: int
    unit: int  # RateLimitResponse.RateLimit.Unit
    name: str = ""
    unlimited: bool = False
    shadow_mode: bool = False


@dataclass
class _Node:
    rule: Rule | None = None
    exact: dict[tuple[str, str], _Node] = field(default_factory=dict)  # (key, value)
    prefixed: list[tuple[str, str, _Node]] = field(default_factory=list)  # (key, value prefix, node)
    any_value: dict[str, _Node] = field(default_factory=dict)  # key without a value


def _fields(doc: Any, allowed: frozenset[str], path: str) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise ConfigError(path, f"expected a mapping, got {type(doc).__name__}")
    for name in doc:
        if name not in allowed:
            raise ConfigError(f"{path}.{name}" if path else str(name), "unknown field")
    return doc


def _compile_rule(doc: Any, shadow: bool, path: str) -> Rule:
    d = _fields(doc, _RATE_LIMIT_FIELDS, path)
    name = str(d.get("name") or "")
    if d.get("unlimited"):
        if "unit" in d:
            raise ConfigError(f"{path}.unit", "an unlimited rate_limit has no unit")
        return Rule(
            0, 0, rls_pb2.RateLimitResponse.RateLimit.UNKNOWN, name, unlimited=True, shadow_mode=shadow
        )
    unit = str(d.get("unit", "")).lower()
    if unit not in UNITS:
        raise ConfigError(f"{path}.unit", f"{d.get('unit')!r} is not one of {', '.join(UNITS)}")
    rpu = d.get("requests_per_unit", 0)
    if isinstance(rpu, bool) or not isinstance(rpu, int) or rpu < 0:
        raise ConfigError(f"{path}.requests_per_unit", f"{rpu!r} is not a count")
    seconds, enum = UNITS[unit]
    return Rule(rpu, seconds, enum, name, shadow_mode=shadow)


def _compile_level(docs: Any, node: _Node, path: str) -> None:
    if docs is None:
        return
    if not isinstance(docs, list):
        raise ConfigError(path, "expected a list of descriptors")
    for i, doc in enumerate(docs):
        here = f"{path}[{i}]"
        d = _fields(doc, _DESCRIPTOR_FIELDS, here)
        key = d.get("key")
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{here}.key", "a descriptor needs a key")
        value = d.get("value")
        child = _Node()
        if "rate_limit" in d:
            child.rule = _compile_rule(d["rate_limit"], bool(d.get("shadow_mode")), f"{here}.rate_limit")
        _compile_level(d.get("descriptors"), child, f"{here}.descriptors")
        if value is None or value == "":
            if key in node.any_value:
                raise ConfigError(f"{here}.key", f"duplicate descriptor {key!r}")
            node.any_value[key] = child
            continue
        value = str(value)
        if (key, value) in node.exact:
            raise ConfigError(f"{here}.value", f"duplicate descriptor {key}={value}")
        node.exact[(key, value)] = child
        if value.endswith("*"):
            node.prefixed.append((key, value[:-1], child))


def compile_config(config: Any) -> dict[str, _Node]:
    """envoyproxy/ratelimit config documents -> domain -> descriptor tree. ``config`` is one
    document (a dict), a list of them, or YAML text (one or more ``---`` documents). A bad field
    raises :class:`ConfigError` naming its path (``edge.descriptors[0].rate_limit.unit``)."""
    if isinstance(config, str):
        config = [d for d in yaml.safe_load_all(config) if d is not None]
    docs = config if isinstance(config, list) else [config]
    domains: dict[str, _Node] = {}
    for i, doc in enumerate(docs):
        d = _fields(doc, _DOMAIN_FIELDS, f"[{i}]")
        domain = d.get("domain")
        if not isinstance(domain, str) or not domain:
            raise ConfigError(f"[{i}].domain", "a config needs a domain")
        if domain in domains:
            raise ConfigError(f"[{i}].domain", f"duplicate domain {domain!r}")
        root = _Node()
        _compile_level(d.get("descriptors"), root, f"{domain}.descriptors")
        domains[domain] = root
    return domains


def find_rule(domains: dict[str, _Node], domain: str, entries: list[tuple[str, str]]) -> Rule | None:
    """The rule a request descriptor reaches, or None (no such domain, an entry the tree does
    not know, or a last node without ``rate_limit``)."""
    node = domains.get(domain)
    for key, value in entries:
        if node is None:
            return None
        nxt = node.exact.get((key, value))
        if nxt is None:
            for k, prefix, cand in node.prefixed:
                if k == key and value.startswith(prefix):
                    nxt = cand
                    break
        if nxt is None:
            nxt = node.any_value.get(key)
        node = nxt
    return node.rule if node is not None and entries else None


_UNIT_SECONDS = {enum: seconds for seconds, enum in UNITS.values()}


def _override(limit: Any) -> Rule:
    seconds = _UNIT_SECONDS.get(limit.unit)
    if seconds is None:
        raise BadRequest(f"limit override unit {limit.unit} is not one of {', '.join(UNITS)}")
    return Rule(limit.requests_per_unit, seconds, limit.unit)


def cache_key(domain: str, entries: list[tuple[str, str]], window_start: int) -> str:
    """The Redis key of one descriptor's counter in the window starting at ``window_start``."""
    return domain + "_" + "".join(f"{k}_{v}_" for k, v in entries) + str(window_start)


class RedisLimiter:
    """envoyproxy/ratelimit's fixed-window decision with its counters in Redis at
    ``host:port``. Thread-safe (redis-py's connection pool), so grpcio's worker threads share one.
    ``clock`` returns Unix seconds: windows start at multiples of the unit, so a test that pins
    the clock knows its window (and ``duration_until_reset``) exactly."""

    def __init__(
        self,
        config: Any,
        port: int,
        host: str = "127.0.0.1",
        clock: Any = time.time,
        timeout: float = 1.0,
    ) -> None:
        self.domains = compile_config(config)
        self.clock = clock
        # No retry: a pipeline retried after a lost reply would count its hits twice. A pooled
        # connection the server closed (a restart) is noticed and replaced when it is taken.
        self.redis = redis.Redis(
            host=host,
            port=port,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            max_connections=16,  # bounds the sockets; grpcio's pool has 8 workers
        )

    def close(self) -> None:
        self.redis.close()

    def decide(self, req: Any) -> Any:
        if not req.domain:
            raise BadRequest("rate limit domain must not be empty")
        if not req.descriptors:
            raise BadRequest("rate limit descriptor list must not be empty")
        now = int(self.clock())
        default_hits = req.hits_addend or 1
        resp = rls_pb2.RateLimitResponse(overall_code=_Code.OK)
        counted: list[tuple[Any, Rule]] = []  # (status, rule), in pipeline order
        pipe = self.redis.pipeline(transaction=False)
        for d in req.descriptors:
            entries = [(e.key, e.value) for e in d.entries]
            st = resp.statuses.add(code=_Code.OK)
            rule = find_rule(self.domains, req.domain, entries)
            if d.HasField("limit"):  # the proxy's own limit replaces the config's, matched or not
                rule = _override(d.limit)
            if rule is None:
                continue
            if rule.unlimited:
                st.limit_remaining = UNLIMITED_REMAINING
                continue
            hits = d.hits_addend.value if d.HasField("hits_addend") else default_hits
            window = now - now % rule.unit_seconds
            key = cache_key(req.domain, entries, window)
            pipe.incrby(key, hits)
            pipe.expire(key, rule.unit_seconds)
            counted.append((st, rule))
        if not counted:
            return resp
        try:
            results = pipe.execute()
        except redis.RedisError as exc:
            raise BackendUnavailable(str(exc) or type(exc).__name__) from None
        finally:
            pipe.reset()
        for i, (st, rule) in enumerate(counted):
            after = int(results[2 * i])
            st.current_limit.requests_per_unit = rule.requests_per_unit
            st.current_limit.unit = rule.unit  # type: ignore[assignment]
            st.current_limit.name = rule.name
            st.duration_until_reset.seconds = rule.unit_seconds - now % rule.unit_seconds
            if after > rule.requests_per_unit:
                st.limit_remaining = 0
                if not rule.shadow_mode:
                    st.code = _Code.OVER_LIMIT
                    resp.overall_code = _Code.OVER_LIMIT
            else:
                st.limit_remaining = rule.requests_per_unit - after
        return resp
