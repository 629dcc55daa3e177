"""Bolt end to end through moorline's rpc_proxy with real SOFARPC peers (sofa-rpc-node client and
server, moorline.testing.sofa): unary, oneway, heartbeat, 1 MiB, timeout, two clients sharing
one upstream connection with overlapping request ids, and an upstream dying mid-request.

Pending (the .pending suffix keeps pytest from collecting it) until the bolt codec and the
rpc_proxy land; written against the issue 10 schema (stat_prefix, protocol, routes, stats under
rpc_proxy.<stat_prefix>.)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from moorline.testing import sofa
from moorline.testing.procs import MoorlineProc, bootstrap, cluster, free_port, wait_until
from moorline.testing.sofa import SofaServerProc, call, run_sofa_client, run_sofa_client_doc

pytestmark = pytest.mark.e2e

SERVICE = f"{sofa.SERVICE}:{sofa.VERSION}"
MIB = 1024 * 1024


@pytest.fixture
def server(tmp_path: Path) -> Iterator[SofaServerProc]:
    proc = sofa.start_sofa_server(0, tmp_path)
    try:
        yield proc
    finally:
        proc.stop(signal.SIGTERM, 5)


def start_proxy(
    moorline: Callable[..., MoorlineProc], upstream_port: int, route_extra: dict[str, Any] | None = None
) -> tuple[MoorlineProc, int]:
    port = free_port()
    routes = [
        {"match": {"service": {"exact": SERVICE}}, "route": {"cluster": "hello", **(route_extra or {})}}
    ]
    config = bootstrap([sofa.rpc_proxy_listener("bolt", port, routes)], [cluster("hello", [upstream_port])])
    return moorline(config), port


def test_unary_through_moorline(moorline: Callable[..., MoorlineProc], server: SofaServerProc) -> None:
    proxy, port = start_proxy(moorline, server.port)
    results = run_sofa_client(port, {"steps": [call("echo", {"string": "hello"}, count=5, concurrency=2)]})
    assert [(r["ok"], r.get("value")) for r in results] == [(True, "hello")] * 5
    assert proxy.stat("rpc_proxy.rpc.request") == 5
    assert proxy.stat("rpc_proxy.rpc.response_success") == 5
    assert proxy.stat("cluster.hello.upstream_rq_total") == 5


def test_oneway_reaches_the_server(moorline: Callable[..., MoorlineProc], server: SofaServerProc) -> None:
    _, port = start_proxy(moorline, server.port)
    steps = [
        {"kind": "oneway", "method": "note", "args": [{"string": "n"}], "count": 3},
        {"kind": "raw_call", "method": "notes"},
    ]
    doc = run_sofa_client_doc(port, {"steps": steps, "settle_ms": 300})
    assert [r["ok"] for r in doc["results"]] == [True] * 4
    assert doc["results"][-1]["value"] == 3
    # sofa-rpc-node's server answers oneway requests too; moorline tracks no oneway, so those
    # answers (under the rewritten ids) must not reach the client.
    assert doc["unsolicited"] == 0


def test_heartbeat_answered_locally(moorline: Callable[..., MoorlineProc], server: SofaServerProc) -> None:
    proxy, port = start_proxy(moorline, server.port)
    results = run_sofa_client(port, {"steps": [{"kind": "heartbeat", "count": 3}]})
    assert [r["ok"] for r in results] == [True] * 3
    assert proxy.stat("rpc_proxy.rpc.heartbeat") == 3
    assert proxy.stat("cluster.hello.upstream_rq_total") == 0


def test_one_mib_both_ways(moorline: Callable[..., MoorlineProc], server: SofaServerProc) -> None:
    _, port = start_proxy(moorline, server.port)
    steps = [
        call("echoBytes", {"bytes": MIB}, count=2, concurrency=2),
        {"kind": "raw_call", "method": "echoBytes", "args": [{"bytes": MIB}]},
    ]
    results = run_sofa_client(port, {"steps": steps})
    assert [(r["ok"], r["size"], r.get("bytes_match")) for r in results] == [(True, MIB, True)] * 3


def test_route_timeout_is_a_local_reply(
    moorline: Callable[..., MoorlineProc], server: SofaServerProc
) -> None:
    proxy, port = start_proxy(moorline, server.port, {"timeout": "0.5s"})
    # The client would wait 10 s; moorline's 0.5 s route timeout answers first.
    steps = [call("sleep", {"int": 3000}, timeout_ms=10000), call("echo", {"string": "after"})]
    slow, after = run_sofa_client(port, {"steps": steps}, timeout=30)
    assert slow["ok"] is False
    assert slow["error"] != "RpcResponseTimeoutError", slow
    assert (after["ok"], after.get("value")) == (True, "after")
    assert proxy.stat("rpc_proxy.rpc.request_timeout") == 1
    assert proxy.stat("rpc_proxy.rpc.local_reply.timeout") == 1


def test_two_clients_overlapping_ids_share_one_upstream_connection(
    moorline: Callable[..., MoorlineProc], server: SofaServerProc
) -> None:
    proxy, port = start_proxy(moorline, server.port)
    # Every client process numbers its requests from 1: the two overlap id for id, and only
    # moorline's rewriting keeps their replies apart on the shared upstream connection.
    out: dict[str, list[dict[str, Any]]] = {}

    def client(tag: str) -> None:
        step = call("echo", {"string": tag}, count=40, concurrency=8) | {"distinct": True}
        out[tag] = run_sofa_client(port, {"steps": [step]})

    threads = [threading.Thread(target=client, args=(tag,)) for tag in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(out) == ["a", "b"]
    for tag, results in out.items():
        assert [r.get("value") for r in results] == [f"{tag}#{i}" for i in range(40)]
    assert proxy.stat("cluster.hello.upstream_cx_total") == 1
    assert proxy.stat("rpc_proxy.rpc.request") == 80
    wait_until(lambda: proxy.stat("rpc_proxy.rpc.cx_active") == 0, "downstream connections closed")


def test_upstream_dying_mid_request_is_an_error_frame(
    moorline: Callable[..., MoorlineProc], server: SofaServerProc
) -> None:
    proxy, port = start_proxy(moorline, server.port)
    steps = [call("die", timeout_ms=10000), call("echo", {"string": "after"}, timeout_ms=5000)]
    died, after = run_sofa_client(port, {"steps": steps}, timeout=30)
    assert server.wait(5) == 3
    # moorline answers with a Bolt error frame: the client's connection to moorline stays up, so
    # the error is a response error, not the socket closing (nor the client's own timeout).
    assert died["ok"] is False
    assert died["error"] not in ("RpcSocketCloseError", "RpcResponseTimeoutError"), died
    # The upstream is gone: the next request gets an error too, promptly.
    assert after["ok"] is False
    assert after["error"] not in ("RpcSocketCloseError", "RpcResponseTimeoutError"), after
    # Reason.UPSTREAM_RESET covers both: the connection died mid-request, then connect failure.
    assert proxy.stat("rpc_proxy.rpc.local_reply.upstream_reset") == 2
