"""rpc_proxy through a real moorline process (with the test codecs of moorline.testing.xcodecs
added by its launcher) in front of a test upstream server speaking the same codec."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest
import uvloop

from moorline.protocol.xprotocol.api import Reason
from moorline.proxy.rpc_proxy import NAME, TYPE_URL
from moorline.testing import xcodecs
from moorline.testing.procs import bootstrap, cluster, free_port
from moorline.testing.xcodecs import MUX, STATUS_OF

pytestmark = pytest.mark.e2e

WRAP = [sys.executable, "-m", "moorline.testing.xcodecs"]
LOG_FORMAT = "%RPC_PROTOCOL% %RPC_SERVICE% %RPC_METHOD% %RPC_STATUS% %RESPONSE_FLAGS% %UPSTREAM_CLUSTER%\n"


def rpc_listener(port: int, value: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "rpc",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": NAME,
                        "typed_config": {
                            "@type": "type.googleapis.com/xds.type.v3.TypedStruct",
                            "type_url": TYPE_URL,
                            "value": value,
                        },
                    }
                ]
            }
        ],
    }


async def wait_for(pred: Any, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.01)


def test_rpc_proxy_end_to_end(moorline: Any, tmp_path: Path) -> None:
    log_path = tmp_path / "rpc-access.log"

    async def main() -> None:
        up = await xcodecs.serve(MUX, "up")
        port = free_port()
        al = [
            {
                "name": "envoy.access_loggers.file",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                    "path": str(log_path),
                    "log_format": {"text_format_source": {"inline_string": LOG_FORMAT}},
                },
            }
        ]
        value = {
            "stat_prefix": "e2e",
            "protocol": "xmux",
            "routes": [
                {"match": {"service": {"exact": "Hello"}}, "route": {"cluster": "svc", "timeout": "0.2s"}},
            ],
            "access_log": al,
        }
        proc = moorline(bootstrap([rpc_listener(port, value)], [cluster("svc", [up.port])]), wrap=WRAP)
        a = await xcodecs.connect_client(MUX, port)
        b = await xcodecs.connect_client(MUX, port)
        for i in (1, 2, 3):
            a.send(MUX.request(i, service="Hello", method="say", body=b"a%d" % i))
            b.send(MUX.request(i, service="Hello", method="say", body=b"b%d" % i))
        await wait_for(lambda: len(a.frames) == 3 and len(b.frames) == 3)
        for i in (1, 2, 3):
            assert bytes(a.by_id(i).body) == b"up:a%d" % i  # type: ignore[union-attr]
            assert bytes(b.by_id(i).body) == b"up:b%d" % i  # type: ignore[union-attr]
        assert up.connections == 1  # both clients multiplexed on one upstream connection
        # Heartbeat answered by moorline itself; timeout; no route.
        a.send(MUX.heartbeat_request(50))
        a.send(MUX.request(51, service="Hello", method="sleep", body=b"1"))
        a.send(MUX.request(52, service="Other"))
        await wait_for(lambda: len(a.frames) == 6)
        assert a.frames[3].request_id == 50
        assert a.by_id(51).status == STATUS_OF[Reason.TIMEOUT]  # type: ignore[union-attr]
        assert a.by_id(52).status == STATUS_OF[Reason.NO_ROUTE]  # type: ignore[union-attr]
        # The upstream dies with a request in flight: an UPSTREAM_RESET reply, not a hang.
        b.send(MUX.request(60, service="Hello", method="sleep", body=b"0.15"))
        await wait_for(lambda: len(up.received) == 8)
        up.close()
        await wait_for(lambda: b.by_id(60) is not None)
        assert b.by_id(60).status == STATUS_OF[Reason.UPSTREAM_RESET]  # type: ignore[union-attr]
        assert proc.stat("rpc_proxy.e2e.request") == 9
        assert proc.stat("rpc_proxy.e2e.heartbeat") == 1
        assert proc.stat("rpc_proxy.e2e.local_reply.timeout") == 1
        assert proc.stat("rpc_proxy.e2e.local_reply.no_route") == 1
        assert proc.stat("rpc_proxy.e2e.local_reply.upstream_reset") == 1
        assert proc.stat("cluster.svc.upstream_cx_total") == 1
        lines = await asyncio.to_thread(_lines, log_path, 9)
        assert lines.count("xmux Hello say 0 - svc") == 6
        assert "xmux Hello sleep - UT svc" in lines
        assert "xmux Other echo - NR -" in lines
        assert "xmux Hello sleep - UR svc" in lines

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
        r.run(main())


def _lines(path: Path, n: int) -> list[str]:
    import time

    end = time.monotonic() + 5
    while time.monotonic() < end:
        if path.exists():
            lines = path.read_text().splitlines()
            if len(lines) >= n:
                return lines
        time.sleep(0.02)
    raise AssertionError(f"access log has not {n} lines: {path.read_text() if path.exists() else None}")
