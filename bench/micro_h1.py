"""Python cost of one proxied HTTP/1.1 request, without the kernel.

Drives the real connection manager, router, pool and codecs with in-memory transports: the
downstream connection receives a request, the router writes it to a pooled upstream connection,
the upstream connection receives a response and the client side gets it. What remains is the
Python work per request, the part a change to the request path can move. It measures the
process's CPU time, not wall time, so other load on the machine disturbs it less. Run:

    python -m bench.micro_h1 [N]
"""

from __future__ import annotations

import asyncio
import gc
import sys
import time
from typing import Any

from moorline.config.loader import load_bootstrap
from moorline.net.conn_info import ConnInfo
from moorline.stream.http1_client import Http1ClientConnection, pool_for

CONFIG = """
static_resources:
  listeners:
  - name: l
    address: {socket_address: {address: 127.0.0.1, port_value: 0}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: "/"}
                route: {cluster: be}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: be
    type: STATIC
    load_assignment:
      cluster_name: be
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 9}}}
"""

# The same, with protection configured (``MOORLINE_MICRO_CONFIG=protected``): outlier detection
# and circuit breakers on the cluster, and a local rate limit (a bucket that never runs dry) in
# front of the router: what these cost per request.
CONFIG_PROTECTED = CONFIG.replace(
    """          http_filters:
          - name: envoy.filters.http.router""",
    """          http_filters:
          - name: envoy.filters.http.local_ratelimit
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
              stat_prefix: rl
              token_bucket: {max_tokens: 1000000000, tokens_per_fill: 1000000000, fill_interval: 1s}
              filter_enabled: {default_value: {numerator: 100, denominator: HUNDRED}}
              filter_enforced: {default_value: {numerator: 100, denominator: HUNDRED}}
          - name: envoy.filters.http.router""",
).replace(
    """    type: STATIC
    load_assignment:""",
    """    type: STATIC
    outlier_detection: {consecutive_5xx: 5, interval: 10s}
    circuit_breakers:
      thresholds: [{max_connections: 1024, max_pending_requests: 1024, max_requests: 1024, max_retries: 3}]
    load_assignment:""",
)

REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:10000\r\n\r\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Fri, 27 Nov 2026 12:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 13\r\nConnection: keep-alive\r\n\r\nhello, world\n"
)


class MemTransport:
    def __init__(self) -> None:
        self.out: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def writelines(self, data: Any) -> None:
        self.out.extend(data)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def run(n: int) -> float:
    import uvloop

    from moorline.server import Server

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    import os

    text = CONFIG_PROTECTED if os.environ.get("MOORLINE_MICRO_CONFIG") == "protected" else CONFIG
    server = Server(load_bootstrap(yaml_text=text), "bench")
    chain = server.listeners[0].selector.chains[0]
    hcm = chain.terminal
    cluster = server.cluster_manager.get("be")
    assert cluster is not None
    host = cluster.hosts[0]
    pool = pool_for(host, loop)
    up = Http1ClientConnection(pool)
    up_t = MemTransport()
    up.connection_made(up_t)
    pool.total += 1
    cluster.stats.upstream_cx_active.value += 1
    pool.idle.append(up)

    from moorline.stream.http1_server import Http1ServerConnection

    info = ConnInfo(("127.0.0.1", 10000), ("127.0.0.1", 40000), "l")
    down = Http1ServerConnection(hcm, info)
    down_t = MemTransport()
    down.connection_made(down_t)
    gc.collect()
    gc.freeze()
    gc.set_threshold(20000, 50, 100)

    def one() -> None:
        down.data_received(REQUEST)
        up.data_received(RESPONSE)

    async def measure() -> float:
        # Inside the running loop, as in the server (filters read the loop's clock).
        for _ in range(200):
            one()
        assert b"hello, world" in down_t.out[-1] or b"hello, world" in b"".join(down_t.out[-3:]), down_t.out[
            -3:
        ]
        t0 = time.process_time()
        for _ in range(n):
            one()
            if len(down_t.out) > 1000:
                down_t.out.clear()
                up_t.out.clear()
        return time.process_time() - t0

    dt = loop.run_until_complete(measure())
    loop.close()
    return dt / n * 1e6


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    runs = sorted(run(n) for _ in range(3))
    print(f"python cost per proxied request: median {runs[1]:.1f} us (min {runs[0]:.1f}, max {runs[2]:.1f})")


if __name__ == "__main__":
    main()
