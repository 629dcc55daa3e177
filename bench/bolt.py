"""The ``bolt`` scenario: SOFARPC Bolt v1 through moorline's ``rpc_proxy``, against the same
load sent straight to the server.

Per run: a Bolt echo server (``serve``: uvloop, answers each request frame with a response
frame carrying the same 1 KiB content) and the load generator (``load``: ``CONNECTIONS``
connections, each with one request in flight, 1 KiB of content per request) run on the load
core; moorline on the proxy core. ``direct`` sends the load to the server itself (no proxy), so
``moorline ÷ direct`` is what the hop costs in throughput.

The frames are built here with ``struct`` from the Bolt v1 layout (22-byte request head, 20-byte
response head, class name, header block, content); the load generator and the server read only
the lengths and the request id. The load generator counts a response whose status is not 0 as
an error.

Metrics: req/s, p50 / p99 latency (per request, from a sample of every request), CPU µs per
request of the proxy (moorline's utime + stime over the measured load), errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import struct
import sys
import time
from typing import Any

from bench.children import Child, cpu_seconds, read_line, spawn
from bench.proxies import REPO_ROOT, Lab, StartError, wait_moorline_ready, wait_port
from moorline.testing.procs import free_port

CONNECTIONS = 100
CONTENT = 1024
SERVICE = b"com.alipay.test.EchoService:1.0"
REQ_CLASS = b"com.alipay.sofa.rpc.core.request.SofaRequest"
RESP_CLASS = b"com.alipay.sofa.rpc.core.response.SofaResponse"
_REQ_HEAD = struct.Struct(
    ">BBHBIBIHHI"
)  # proto type cmdcode ver2 id codec timeout classLen headerLen contentLen
_RESP_HEAD = struct.Struct(
    ">BBHBIBHHHI"
)  # proto type cmdcode ver2 id codec status classLen headerLen contentLen


def _header_block(pairs: list[tuple[bytes, bytes]]) -> bytes:
    return b"".join(struct.pack(">I", len(k)) + k + struct.pack(">I", len(v)) + v for k, v in pairs)


def request_frame(request_id: int, content: bytes) -> bytes:
    hdr = _header_block([(b"service", SERVICE), (b"sofa_head_method_name", b"echo")])
    head = _REQ_HEAD.pack(1, 1, 1, 1, request_id, 1, 3000, len(REQ_CLASS), len(hdr), len(content))
    return head + REQ_CLASS + hdr + content


def response_frame(request_id: int, content: bytes, status: int = 0) -> bytes:
    head = _RESP_HEAD.pack(1, 0, 2, 1, request_id, 1, status, len(RESP_CLASS), 0, len(content))
    return head + RESP_CLASS + content


def _frame_len(buf: bytearray | bytes, pos: int) -> int:
    """Length of the Bolt v1 frame at ``pos`` (0: head incomplete)."""
    avail = len(buf) - pos
    if avail < 1:
        return 0
    kind = buf[pos + 1] if avail > 1 else 1
    if kind in (1, 2):  # request / oneway: 22-byte head
        if avail < 22:
            return 0
        cl, hl, bl = struct.unpack_from(">HHI", buf, pos + 14)
        return 22 + cl + hl + bl
    if avail < 20:
        return 0
    cl, hl, bl = struct.unpack_from(">HHI", buf, pos + 12)
    return 20 + cl + hl + bl


# -- the echo server ----------------------------------------------------------------------------


class _ServerConn(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = bytearray()
        self.t: Any = None

    def connection_made(self, transport: Any) -> None:
        self.t = transport

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos, out = 0, []
        while True:
            n = _frame_len(buf, pos)
            if not n or pos + n > len(buf):
                break
            _, kind, cmd, _, rid, _, _, cl, hl, bl = _REQ_HEAD.unpack_from(buf, pos)
            if cmd == 0:  # heartbeat: an ack with the same id
                out.append(_RESP_HEAD.pack(1, 0, 0, 1, rid, 1, 0, 0, 0, 0))
            elif kind == 1:
                start = pos + 22 + cl + hl
                out.append(response_frame(rid, bytes(buf[start : start + bl])))
            pos += n
        del buf[:pos]
        if out:
            self.t.write(b"".join(out))


async def _serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(_ServerConn, "127.0.0.1", port, backlog=1024)
    print(f"READY port={srv.sockets[0].getsockname()[1]}", flush=True)
    await asyncio.Event().wait()


# -- the load generator -------------------------------------------------------------------------


class _LoadConn(asyncio.Protocol):
    def __init__(self, stats: dict[str, Any], content: bytes, stop_at: list[float]) -> None:
        self.stats = stats
        self.content = content
        self.stop_at = stop_at
        self.buf = bytearray()
        self.rid = 0
        self.sent_at = 0.0
        self.t: Any = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: Any) -> None:
        self.t = transport
        self._send()

    def _send(self) -> None:
        self.rid += 1
        self.sent_at = time.perf_counter()
        self.t.write(request_frame(self.rid, self.content))

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        n = _frame_len(buf, 0)
        if not n or n > len(buf):
            return
        _, _, _, _, rid, _, status, _, _, _ = _RESP_HEAD.unpack_from(buf, 0)
        del buf[:n]
        now = time.perf_counter()
        st = self.stats
        if status != 0 or rid != self.rid:
            st["errors"] += 1
        elif st["measuring"]:
            st["requests"] += 1
            if st["requests"] % 8 == 0:
                st["lat_us"].append(int((now - self.sent_at) * 1e6))
        if now >= self.stop_at[0]:
            self.t.close()
            return
        self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if time.perf_counter() < self.stop_at[0]:
            self.stats["errors"] += 1
        if not self.done.done():
            self.done.set_result(None)


async def _load(port: int, connections: int, warmup: float, duration: float, size: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    stats: dict[str, Any] = {"requests": 0, "errors": 0, "lat_us": [], "measuring": False}
    content = bytes(i % 251 for i in range(size))
    stop_at = [time.perf_counter() + warmup + duration + 60]
    conns = []
    for _ in range(connections):
        _, p = await loop.create_connection(lambda: _LoadConn(stats, content, stop_at), "127.0.0.1", port)
        conns.append(p)
    await asyncio.sleep(warmup)
    stats["measuring"] = True
    # The parent reads CPU counters around this line and the DONE line.
    print("MEASURING", flush=True)
    t0 = time.perf_counter()
    stop_at[0] = t0 + duration
    await asyncio.gather(*(c.done for c in conns))
    elapsed = time.perf_counter() - t0
    lat = sorted(stats["lat_us"])

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(len(lat) * p))] / 1000.0 if lat else 0.0

    return {
        "requests": stats["requests"],
        "errors": stats["errors"],
        "rps": stats["requests"] / elapsed,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
    }


# -- one run for the harness --------------------------------------------------------------------


def moorline_config(port: int, admin: int, upstream_port: int) -> str:
    value = {
        "stat_prefix": "bolt",
        "protocol": "bolt",
        "routes": [
            {"match": {"service": {"prefix": ""}}, "route": {"cluster": "bolt_server", "timeout": "10s"}}
        ],
    }
    doc = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "bolt",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "moorline.filters.network.rpc_proxy",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/xds.type.v3.TypedStruct",
                                        "type_url": "type.googleapis.com/moorline.filters.network.rpc_proxy.v1.RpcProxy",
                                        "value": value,
                                    },
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "bolt_server",
                    "connect_timeout": "1s",
                    "type": "STATIC",
                    "circuit_breakers": {
                        "thresholds": [{"max_requests": 100000, "max_pending_requests": 100000}]
                    },
                    "load_assignment": {
                        "cluster_name": "bolt_server",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {
                                                    "address": "127.0.0.1",
                                                    "port_value": upstream_port,
                                                }
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                }
            ],
        },
    }
    return json.dumps(doc, indent=1)


def _start_server(lab: Lab) -> tuple[Child, int]:
    argv = [sys.executable, "-m", "bench.bolt", "serve"]
    child = spawn(
        "bolt-server",
        argv,
        lab.subdir("bolt-server"),
        cpus=lab.load_cpus,
        env={"PYTHONPATH": str(REPO_ROOT)},
        pipes=True,
    )
    line = read_line(child, 20)
    if line is None or not line.startswith("READY port="):
        child.stop(signal.SIGKILL, 1)
        raise StartError(f"bolt server did not report READY ({line!r}): {child.stderr_tail()}")
    return child, int(line.split("=", 1)[1])


def run_once(lab: Lab, variant: str, duration: int) -> dict[str, Any]:
    server, sport = _start_server(lab)
    proxy: Child | None = None
    try:
        target = sport
        if variant == "moorline":
            port, admin = free_port(), free_port()
            d = lab.subdir("moorline-bolt")
            cfg = d / "moorline.json"
            cfg.write_text(moorline_config(port, admin, sport))
            argv = [sys.executable, "-m", "moorline", "run", "-c", str(cfg), "--log-level", "warning"]
            proxy = spawn("moorline", argv, d, cpus=lab.proxy_cpus, env={"PYTHONPATH": str(REPO_ROOT)})
            wait_moorline_ready(admin, proxy)
            wait_port(port, proxy)
            target = port
        argv = [
            sys.executable,
            "-m",
            "bench.bolt",
            "load",
            "--port",
            str(target),
            "--connections",
            str(CONNECTIONS),
            "--duration",
            str(duration),
        ]
        loader = spawn(
            "bolt-load",
            argv,
            lab.subdir("bolt-load"),
            cpus=lab.load_cpus,
            env={"PYTHONPATH": str(REPO_ROOT)},
            pipes=True,
        )
        try:
            line = read_line(loader, 60)
            if line != "MEASURING":
                raise StartError(f"bolt load generator: {line!r} {loader.stderr_tail()}")
            watched = proxy if proxy is not None else server
            cpu0 = cpu_seconds(watched.pids())
            line = read_line(loader, duration + 60)
            cpu1 = cpu_seconds(watched.pids())
        finally:
            loader.stop(signal.SIGTERM, 5)
        if not line:
            raise StartError(f"bolt load generator gave no result: {loader.stderr_tail()}")
        res = json.loads(line)
        res["ok"] = res["requests"] > 0
        res["cpu_us_per_req"] = (cpu1 - cpu0) * 1e6 / res["requests"] if res["requests"] else 0.0
        res["cpu_of"] = "moorline" if proxy is not None else "server"
        return res
    finally:
        if proxy is not None:
            proxy.stop(signal.SIGTERM, 5)
        server.stop(signal.SIGKILL, 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bolt")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, default=0)
    ld = sub.add_parser("load")
    ld.add_argument("--port", type=int, required=True)
    ld.add_argument("--connections", type=int, default=CONNECTIONS)
    ld.add_argument("--duration", type=float, default=5.0)
    ld.add_argument("--warmup", type=float, default=1.0)
    ld.add_argument("--size", type=int, default=CONTENT)
    a = ap.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if a.cmd == "serve":
        asyncio.run(_serve(a.port))
        return 0
    res = asyncio.run(_load(a.port, a.connections, a.warmup, a.duration, a.size))
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
