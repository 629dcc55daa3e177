"""Tests of the SOFARPC peers (moorline.testing.sofa; tests/rpc/node/server.js and client.js):
sofa-rpc-node's client against its own server, directly, no moorline in between. They prove the
peers the Bolt end-to-end tests rely on behave as those tests assume, and they pin real frames
as the Bolt codec's fixtures (tests/protocol/xprotocol/fixtures/bolt_sofa_node.json).

MOORLINE_WRITE_FIXTURES=1 rewrites that file from a fresh capture instead of comparing with it."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from moorline.testing import sofa
from moorline.testing.procs import PeerMissingError, wait_until
from moorline.testing.sofa import SofaServerProc, call, run_sofa_client, run_sofa_client_doc

FIXTURES = Path(__file__).resolve().parents[1] / "protocol" / "xprotocol" / "fixtures" / "bolt_sofa_node.json"
MIB = 1024 * 1024


@pytest.fixture
def server(tmp_path: Path) -> Iterator[SofaServerProc]:
    proc = sofa.start_sofa_server(0, tmp_path)
    try:
        yield proc
    finally:
        proc.stop(signal.SIGTERM, 5)


def test_unary_echo(server: SofaServerProc) -> None:
    results = run_sofa_client(
        server.port, {"steps": [call("echo", {"string": "hello"}, count=3, concurrency=2)]}
    )
    assert [(r["ok"], r.get("value"), r["size"], r["string_match"]) for r in results] == [
        (True, "hello", 5, True)
    ] * 3


def test_distinct_calls_each_get_their_own_reply(server: SofaServerProc) -> None:
    step = call("echo", {"string": "a"}, count=6, concurrency=3) | {"distinct": True}
    raw = {
        "kind": "raw_call",
        "method": "echo",
        "args": [{"string": "r"}],
        "count": 4,
        "concurrency": 4,
        "distinct": True,
    }
    results = run_sofa_client(server.port, {"steps": [step, raw]})
    assert [r["value"] for r in results] == [f"a#{i}" for i in range(6)] + [f"r#{i}" for i in range(4)]
    assert all(r["string_match"] for r in results)


def test_echo_bytes_1mib_both_ways(server: SofaServerProc) -> None:
    steps = [
        call("echoBytes", {"bytes": MIB}),
        {"kind": "raw_call", "method": "echoBytes", "args": [{"bytes": MIB}]},
    ]
    results = run_sofa_client(server.port, {"steps": steps})
    assert [(r["ok"], r["size"], r.get("bytes_match")) for r in results] == [(True, MIB, True)] * 2


def test_timeout_is_the_clients_and_the_connection_stays_usable(server: SofaServerProc) -> None:
    steps = [call("sleep", {"int": 2000}, timeout_ms=300), call("echo", {"string": "after"})]
    slow, after = run_sofa_client(server.port, {"steps": steps})
    assert (slow["ok"], slow["error"], slow["code"]) == (False, "RpcResponseTimeoutError", "03")
    # The late reply to the timed-out call is dropped by id; the next call gets its own answer.
    assert (after["ok"], after.get("value")) == (True, "after")


def test_die_mid_request_is_an_error_not_a_hang(server: SofaServerProc) -> None:
    results = run_sofa_client(server.port, {"steps": [call("die", timeout_ms=10000)]}, timeout=30)
    assert len(results) == 1
    assert results[0]["ok"] is False
    # The socket closed: the error comes from the close, well before the 10 s call timeout.
    assert results[0]["error"] == "RpcSocketCloseError"
    assert server.wait(5) == 3


def test_oneway_and_heartbeat(server: SofaServerProc) -> None:
    steps = [
        {"kind": "oneway", "method": "note", "args": [{"string": "n"}], "count": 3},
        {"kind": "heartbeat", "count": 2},
        {"kind": "raw_call", "method": "notes"},
    ]
    doc = run_sofa_client_doc(server.port, {"steps": steps, "settle_ms": 300})
    results = doc["results"]
    assert [(r["kind"], r["ok"]) for r in results] == [("oneway", True)] * 3 + [("heartbeat", True)] * 2 + [
        ("raw_call", True)
    ]
    assert results[-1]["value"] == 3
    # A quirk of the real server the proxy must live with: sofa-rpc-node answers oneway requests
    # too (a response frame per oneway id), so a proxy has to drop responses nobody waits for.
    assert doc["unsolicited"] == 3


def test_server_exception_for_unknown_method(server: SofaServerProc) -> None:
    (r,) = run_sofa_client(server.port, {"steps": [call("nosuch")]})
    assert r["ok"] is False
    assert "Can not find method" in r["message"]


def test_load_step_counts_calls(server: SofaServerProc) -> None:
    out = sofa.sofa_load(server.port, payload_bytes=1024, connections=3, concurrency=2, seconds=0.5)
    assert out["kind"] == "load"
    assert out["errors"] == 0 and out["first_error"] is None
    assert out["calls"] > 0 and out["qps"] > 0


def test_a_missing_npm_install_fails_with_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sofa, "NODE_DIR", tmp_path)
    with pytest.raises(PeerMissingError, match="npm ci"):
        sofa.start_sofa_server(0, tmp_path)
    with pytest.raises(PeerMissingError, match="install-deps"):
        run_sofa_client(1, {"steps": []})


def test_a_client_that_hangs_is_reported(tmp_path: Path) -> None:
    # A listener that accepts and never answers: the client's own timeout is longer than ours.
    with socket.create_server(("127.0.0.1", 0)) as ls:
        port = ls.getsockname()[1]
        with pytest.raises(AssertionError, match="hung"):
            run_sofa_client(port, {"steps": [call("echo", {"string": "x"}, timeout_ms=60000)]}, timeout=3)


# --- real frames, captured between the two peers ------------------------------------------------

_REQ = struct.Struct(">BBHBIBiHHI")  # proto type cmdcode ver2 id codec timeout classLen headerLen contentLen
_RSP = struct.Struct(">BBHBIBHHHI")  # proto type cmdcode ver2 id codec status classLen headerLen contentLen


def split_bolt_v1(data: bytes) -> list[bytes]:
    """Cut a Bolt v1 byte stream into frames (by the header's lengths; test-side, independent of
    moorline's codec). Leftover bytes fail the test: a capture must end on a frame boundary."""
    frames = []
    pos = 0
    while pos < len(data):
        assert data[pos] == 0x01, f"not Bolt v1 at {pos}: {data[pos : pos + 4].hex()}"
        if data[pos + 1] == 0x00:
            *_, cls, hdr, content = _RSP.unpack_from(data, pos)
            size = _RSP.size + cls + hdr + content
        else:
            *_, cls, hdr, content = _REQ.unpack_from(data, pos)
            size = _REQ.size + cls + hdr + content
        assert pos + size <= len(data), "capture ends inside a frame"
        frames.append(data[pos : pos + size])
        pos += size
    return frames


def describe(frame: bytes) -> dict[str, Any]:
    if frame[1] == 0x00:
        _proto, typ, cmd, _ver2, rid, codec, status, cls, hdr, content = _RSP.unpack_from(frame)
        out: dict[str, Any] = {
            "type": typ,
            "cmdcode": cmd,
            "request_id": rid,
            "codec": codec,
            "status": status,
        }
        body = frame[_RSP.size :]
    else:
        _proto, typ, cmd, _ver2, rid, codec, timeout, cls, hdr, content = _REQ.unpack_from(frame)
        out = {"type": typ, "cmdcode": cmd, "request_id": rid, "codec": codec, "timeout_ms": timeout}
        body = frame[_REQ.size :]
    out.update(class_len=cls, header_len=hdr, content_len=content)
    out["class_name"] = body[:cls].decode()
    headers = {}
    block = body[cls : cls + hdr]
    p = 0
    while p < len(block):
        (kl,) = struct.unpack_from(">I", block, p)
        key = block[p + 4 : p + 4 + kl].decode()
        p += 4 + kl
        (vl,) = struct.unpack_from(">I", block, p)
        headers[key] = block[p + 4 : p + 4 + vl].decode()
        p += 4 + vl
    out["headers"] = headers
    return out


def capture(port: int) -> list[dict[str, Any]]:
    """One connection of sofa-rpc-node's RpcClient and one raw sofa-bolt-node connection through
    a recording relay; the frames of both, named. Requests in the order sent, then each one's
    response (paired by request id: the server may answer in another order)."""
    named: list[dict[str, Any]] = []
    with sofa.RecordingRelay(port) as relay:
        run_sofa_client(relay.port, {"steps": [call("echo", {"string": "hello"})]})
        raw_steps = [
            {"kind": "raw_call", "method": "echo", "args": [{"string": "hello"}]},
            {"kind": "heartbeat"},
            {"kind": "oneway", "method": "note", "args": [{"string": "x"}]},
            {"kind": "raw_call", "method": "nosuch"},
        ]
        run_sofa_client_doc(relay.port, {"steps": raw_steps, "settle_ms": 300})
        assert relay.connections == 2
        names = [
            [("rpc_client_echo_request", "rpc_client_echo_response")],
            [
                ("echo_request", "echo_response"),
                ("heartbeat_request", "heartbeat_ack"),
                ("oneway_request", "oneway_unsolicited_response"),
                ("unknown_method_request", "server_exception_response"),
            ],
        ]
        for conn, pairs in enumerate(names):
            requests = split_bolt_v1(relay.client_bytes(conn))
            assert len(requests) == len(pairs), [f[:22].hex() for f in requests]
            # The answer to the oneway request may trail the client's exit: wait for all of them.
            wait_until(
                lambda conn=conn, n=len(pairs): len(split_bolt_v1(relay.server_bytes(conn))) == n,
                f"{len(pairs)} responses on connection {conn}",
                timeout=10,
                ignore=(AssertionError,),
            )
            responses = {describe(f)["request_id"]: f for f in split_bolt_v1(relay.server_bytes(conn))}
            for (req_name, _), frame in zip(pairs, requests, strict=True):
                named.append(
                    {
                        "name": req_name,
                        "direction": "client_to_server",
                        "header": describe(frame),
                        "hex": frame.hex(),
                    }
                )
            for (_, rsp_name), req in zip(pairs, requests, strict=True):
                frame = responses[describe(req)["request_id"]]
                named.append(
                    {
                        "name": rsp_name,
                        "direction": "server_to_client",
                        "header": describe(frame),
                        "hex": frame.hex(),
                    }
                )
    return named


# Frames that carry a server-side stack trace (file paths of this checkout) differ per machine.
_MACHINE_DEPENDENT = {"server_exception_response"}


def test_real_frames_match_the_fixtures(server: SofaServerProc) -> None:
    frames = capture(server.port)
    by_name = {f["name"]: f for f in frames}
    # What the captured frames say, independent of the fixture file.
    assert by_name["echo_request"]["header"]["headers"] == {"service": "com.alipay.test.HelloService:1.0"}
    assert by_name["echo_request"]["header"]["class_name"] == "com.alipay.sofa.rpc.core.request.SofaRequest"
    assert (
        by_name["heartbeat_request"]["header"]["cmdcode"],
        by_name["heartbeat_ack"]["header"]["cmdcode"],
    ) == (0, 0)
    assert by_name["oneway_request"]["header"]["type"] == 2
    assert (
        by_name["oneway_unsolicited_response"]["header"]["request_id"]
        == by_name["oneway_request"]["header"]["request_id"]
    )
    assert by_name["server_exception_response"]["header"]["status"] == 2
    assert by_name["echo_response"]["header"]["status"] == 0
    doc = {
        "about": (
            "Real Bolt v1 frames between sofa-rpc-node 2.10.0 / sofa-bolt-node 2.0.1 peers "
            "(tests/rpc/node), captured by tests/testing/test_sofa.py through a recording relay; "
            "MOORLINE_WRITE_FIXTURES=1 rewrites this file. 'header' is decoded by the test, not by "
            "moorline's codec. server_exception_response carries a stack trace with the capturing "
            "machine's paths."
        ),
        "frames": frames,
    }
    if os.environ.get("MOORLINE_WRITE_FIXTURES") == "1":
        FIXTURES.parent.mkdir(parents=True, exist_ok=True)
        FIXTURES.write_text(json.dumps(doc, indent=1) + "\n")
    stored = json.loads(FIXTURES.read_text())
    assert [f["name"] for f in stored["frames"]] == [f["name"] for f in frames]
    for old, new in zip(stored["frames"], frames, strict=True):
        if old["name"] in _MACHINE_DEPENDENT:
            assert old["header"]["status"] == new["header"]["status"]
            continue
        assert old["hex"] == new["hex"], f"{old['name']} differs from the fixture"
        assert old["header"] == describe(bytes.fromhex(old["hex"]))


def test_rpc_proxy_listener_is_valid_envoy_config() -> None:
    import xds.type.v3.typed_struct_pb2
    import yaml
    from envoy.config.bootstrap.v3 import bootstrap_pb2
    from google.protobuf import json_format

    from moorline.testing.procs import bootstrap, cluster

    text = bootstrap(
        [sofa.rpc_proxy_listener("rpc", 46001, cluster_name="hello")], [cluster("hello", [46002])]
    )
    msg = bootstrap_pb2.Bootstrap()
    json_format.ParseDict(yaml.safe_load(text), msg)
    (flt,) = msg.static_resources.listeners[0].filter_chains[0].filters
    assert flt.name == "moorline.filters.network.rpc_proxy"
    ts = xds.type.v3.typed_struct_pb2.TypedStruct()
    assert flt.typed_config.Unpack(ts)
    assert ts.type_url == "type.googleapis.com/moorline.filters.network.rpc_proxy.v1.RpcProxy"
    value = json_format.MessageToDict(ts.value)
    assert value == {
        "stat_prefix": "rpc",
        "protocol": "bolt",
        "routes": [{"match": {}, "route": {"cluster": "hello"}}],
    }
    with pytest.raises(ValueError):
        sofa.rpc_proxy_listener("rpc", 46001)
