"""The Dubbo test server against a real third-party client (PyPI ``dubbo-ssl-python``) and raw
sockets: echo and the other methods, attachments, error statuses and the codec's local replies
as that client reads them, delays, dying connections, heartbeats, one-way requests, garbage."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator

import pytest
from dubbo_ssl.client import DubboClient
from dubbo_ssl.common.exceptions import DubboRequestTimeoutException, DubboResponseException

from moorline.protocol.xprotocol.api import FrameKind, FrameReader, Reason
from moorline.protocol.xprotocol.dubbo import CODEC, request
from moorline.protocol.xprotocol.hessian2 import Hessian2Reader, encode
from moorline.testing.dubbo_server import DubboTestServer

SERVICE = "com.example.EchoService"


@pytest.fixture
def srv() -> Iterator[DubboTestServer]:
    s = DubboTestServer(server_id="s1").start()
    try:
        yield s
    finally:
        s.stop()


def client(srv: DubboTestServer) -> DubboClient:
    return DubboClient(SERVICE, "grp", version="2.0.0", host=f"127.0.0.1:{srv.port}")


def read_frame(sock: socket.socket) -> bytes:
    reader = FrameReader(CODEC)
    while True:
        data = sock.recv(65536)
        assert data, "connection closed before a whole frame"
        frames = reader.feed(data)
        if frames:
            return frames[0]


def test_echo_and_friends(srv: DubboTestServer) -> None:
    c = client(srv)
    assert c.call("echo", ["héllo"], timeout=10) == "héllo"
    assert c.call("echo", [12345], timeout=10) == 12345
    assert c.call("echo", ["x" * 20000], timeout=10) == "x" * 20000
    assert c.call("echo", timeout=10) is None
    assert c.call("whoami", timeout=10) == "s1"
    got = c.call("attachments", context={"tenant": "t1"}, timeout=10)
    assert got["tenant"] == "t1" and got["group"] == "grp" and got["version"] == "2.0.0"
    call = srv.requests[0]
    assert (call.service, call.method, call.version, call.args) == (SERVICE, "echo", "2.0.0", ["héllo"])
    assert call.attachments["interface"] == SERVICE
    assert len(srv.requests) == 6
    assert srv.connections_total == 1  # one connection, multiplexed by request id


def test_error_status(srv: DubboTestServer) -> None:
    with pytest.raises(DubboResponseException, match="boom"):
        client(srv).call("fail", ["boom"], timeout=10)


@pytest.mark.parametrize(
    ("reason", "status_name"),
    [
        (Reason.NO_ROUTE, "SERVICE_NOT_FOUND"),
        (Reason.NO_HEALTHY_UPSTREAM, "SERVICE_NOT_FOUND"),
        (Reason.OVERFLOW, "BAD_REQUEST"),
        (Reason.TIMEOUT, "SERVER_TIMEOUT"),
        (Reason.CODEC_ERROR, "BAD_REQUEST"),
        (Reason.UPSTREAM_RESET, "SERVER_ERROR"),
    ],
)
def test_local_replies_as_a_real_client_reads_them(
    srv: DubboTestServer, reason: Reason, status_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    srv.reply_with = (reason, f"moorline: {reason.value}")
    with caplog.at_level(logging.ERROR, logger="dubbo_ssl"), pytest.raises(DubboResponseException) as e:
        client(srv).call("echo", ["x"], timeout=10)
    assert f"moorline: {reason.value}" in str(e.value)
    # The client logs the status by name from its table: every status we send is in it.
    assert any(status_name == r.getMessage() for r in caplog.records)


def test_delay_times_the_client_out(srv: DubboTestServer) -> None:
    # The answer would come long after the test ends (stop() drops it with the connection):
    # this client cannot cope with an answer arriving after it gave up.
    srv.delay = 60.0
    with pytest.raises(DubboRequestTimeoutException):
        client(srv).call("echo", ["late"], timeout=0.5)
    assert [r.method for r in srv.requests] == ["echo"]


def test_die_resets_the_connection_and_the_client_reconnects(srv: DubboTestServer) -> None:
    srv.die = True
    with pytest.raises(DubboRequestTimeoutException):
        client(srv).call("echo", ["lost"], timeout=1)
    assert client(srv).call("echo", ["again"], timeout=10) == "again"
    assert srv.connections_total == 2


def test_sleep_method_answers_later_on_the_same_connection(srv: DubboTestServer) -> None:
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        body = encode("2.0.2", SERVICE, "", "sleep", "I", 200, {})
        s.sendall(request(1, body) + request(2, encode("2.0.2", SERVICE, "", "echo", "I", 7, {})))
        first, second = CODEC.decode(read_frame(s)), CODEC.decode(read_frame(s))
    # The sleeping request is answered after the quick one: ids, not order, pair them.
    assert (first.request_id, second.request_id) == (2, 1)
    r = Hessian2Reader(first.body)
    assert (r.read(), r.read()) == (1, 7)


def test_heartbeat_and_oneway_over_a_raw_socket(srv: DubboTestServer) -> None:
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        s.sendall(CODEC.heartbeat_request(77))
        hb = CODEC.decode(read_frame(s))
        assert (hb.kind, hb.request_id, hb.status) == (FrameKind.HEARTBEAT_RESPONSE, 77, 20)
        oneway = request(5, encode("2.0.2", SERVICE, "", "echo", "I", 1, {}), two_way=False)
        s.sendall(oneway + request(6, encode("2.0.2", SERVICE, "", "echo", "I", 2, {})))
        resp = CODEC.decode(read_frame(s))
        assert resp.request_id == 6  # the one-way request got no answer
    assert srv.heartbeats == [77]
    assert [(r.request_id, r.oneway) for r in srv.requests] == [(5, True), (6, False)]


def test_garbage_closes_the_connection(srv: DubboTestServer) -> None:
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\n\r\n")
        assert s.recv(100) == b""


def test_die_drops_the_rest_of_the_connection(srv: DubboTestServer) -> None:
    srv.die = True
    two = b"".join(request(i, encode("2.0.2", SERVICE, "", "echo", "I", i, {})) for i in (1, 2))
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        s.sendall(two)
        with pytest.raises(ConnectionResetError):
            while s.recv(100):
                pass
    # The second request, behind the fatal one in the same read, was never taken.
    assert [r.request_id for r in srv.requests] == [1]
