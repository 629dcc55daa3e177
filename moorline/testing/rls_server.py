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
"""

from __future__ import annotations

import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

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
    def __init__(self, limits: list[Limit] | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.limits = list(limits or [])
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
        return srv.decide(request)
