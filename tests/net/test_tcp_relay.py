"""tcp_relay: both backends (splice, userspace copy) over real loopback sockets on uvloop.

Layout of every test: client <-> [a  relay  b] <-> server, where (client, a) and (b, server) are
two real TCP connections. The endpoints run in threads with blocking sockets; the relay runs on
the uvloop loop in the main thread.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from moorline.net import tcp_relay
from moorline.net.tcp_relay import CLOSE_DONE, CLOSE_IDLE, CLOSE_RESET, Relay, relay

MODES = [pytest.param(True, id="splice"), pytest.param(False, id="copy")]


def run(coro_fn: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
        return r.run(coro_fn())


def tcp_pair(bufsize: int | None = None) -> tuple[socket.socket, socket.socket]:
    """A connected (client, server) pair over loopback; small kernel buffers when asked."""
    lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if bufsize:
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bufsize)
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bufsize)
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if bufsize:
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bufsize)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bufsize)
    c.connect(lst.getsockname())
    s, _ = lst.accept()
    lst.close()
    return c, s


class Ends:
    """client <-> a | relay | b <-> server."""

    def __init__(self, bufsize: int | None = None) -> None:
        self.client, self.a = tcp_pair(bufsize)
        self.b, self.server = tcp_pair(bufsize)

    def close(self) -> None:
        for s in (self.client, self.server):
            s.close()


def start_relay(ends: Ends, use_splice: bool, **kw: Any) -> tuple[Relay, asyncio.Future[tuple[int, int]]]:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[tuple[int, int]] = loop.create_future()

    def on_close(ab: int, ba: int) -> None:
        assert not done.done(), "on_close called twice"
        done.set_result((ab, ba))

    kw.setdefault("buffer_limit", 1024 * 1024)
    kw.setdefault("idle_timeout", None)
    r = relay(loop, ends.a, ends.b, use_splice=use_splice, on_close=on_close, **kw)
    if use_splice:
        assert r.uses_splice
    else:
        assert not r.uses_splice
    return r, done


def thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def body() -> None:
        try:
            out["result"] = fn()
        except BaseException as e:
            out["error"] = e

    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t, out


async def join(t: threading.Thread, out: dict[str, Any], timeout: float = 20.0) -> Any:
    await asyncio.get_running_loop().run_in_executor(None, t.join, timeout)
    assert not t.is_alive(), "endpoint thread hung"
    if "error" in out:
        raise out["error"]
    return out.get("result")


async def arecv(sock: socket.socket, n: int) -> bytes:
    """recv off the loop thread (the relay needs the loop to run meanwhile)."""
    sock.settimeout(10)
    return await asyncio.get_running_loop().run_in_executor(None, sock.recv, n)


def send_all_then_shut(sock: socket.socket, data: bytes, chunk: int = 256 * 1024) -> str:
    view = memoryview(data)
    for i in range(0, len(data), chunk):
        sock.sendall(view[i : i + chunk])
    sock.shutdown(socket.SHUT_WR)
    return hashlib.sha256(data).hexdigest()


def recv_until_eof(sock: socket.socket) -> tuple[int, str]:
    h = hashlib.sha256()
    n = 0
    while True:
        d = sock.recv(256 * 1024)
        if not d:
            return n, h.hexdigest()
        n += len(d)
        h.update(d)


@pytest.mark.parametrize("use_splice", MODES)
def test_50mb_each_way_concurrently(use_splice: bool) -> None:
    size = 50 * 1024 * 1024
    up_data = os.urandom(size)
    down_data = os.urandom(size)

    async def main() -> None:
        ends = Ends()
        try:
            r, done = start_relay(ends, use_splice)
            threads = [
                thread(lambda: send_all_then_shut(ends.client, up_data)),
                thread(lambda: recv_until_eof(ends.server)),
                thread(lambda: send_all_then_shut(ends.server, down_data)),
                thread(lambda: recv_until_eof(ends.client)),
            ]
            sent_up = await join(*threads[0])
            got_up = await join(*threads[1])
            sent_down = await join(*threads[2])
            got_down = await join(*threads[3])
            assert got_up == (size, sent_up)
            assert got_down == (size, sent_down)
            ab, ba = await asyncio.wait_for(done, 10)
            assert (ab, ba) == (size, size)
            assert r.close_reason == CLOSE_DONE
            assert r.buffered == 0
            assert r.peak_buffered <= r.buffer_bound
        finally:
            ends.close()

    run(main)


@pytest.mark.parametrize("use_splice", MODES)
def test_half_close_keeps_other_direction(use_splice: bool) -> None:
    reply = os.urandom(3 * 1024 * 1024)

    async def main() -> None:
        ends = Ends()
        try:
            r, done = start_relay(ends, use_splice)
            ends.client.sendall(b"request")
            ends.client.shutdown(socket.SHUT_WR)

            def server() -> bytes:
                got = b""
                while True:
                    d = ends.server.recv(65536)
                    if not d:
                        break
                    got += d
                # The client's EOF arrived; the server still answers afterwards.
                ends.server.sendall(reply)
                ends.server.shutdown(socket.SHUT_WR)
                return got

            ts, outs = thread(server)
            tc, outc = thread(lambda: recv_until_eof(ends.client))
            assert await join(ts, outs) == b"request"
            assert await join(tc, outc) == (len(reply), hashlib.sha256(reply).hexdigest())
            assert await asyncio.wait_for(done, 10) == (7, len(reply))
            assert r.close_reason == CLOSE_DONE
        finally:
            ends.close()

    run(main)


@pytest.mark.parametrize("use_splice", MODES)
def test_slow_reader_is_bounded(use_splice: bool) -> None:
    limit = 64 * 1024
    size = 8 * 1024 * 1024
    data = os.urandom(size)

    async def main() -> None:
        ends = Ends(bufsize=32 * 1024)
        try:
            r, done = start_relay(ends, use_splice, buffer_limit=limit)
            progress = {"sent": 0}

            def sender() -> str:
                view = memoryview(data)
                for i in range(0, size, 16384):
                    ends.client.sendall(view[i : i + 16384])
                    progress["sent"] = i + 16384
                ends.client.shutdown(socket.SHUT_WR)
                return hashlib.sha256(data).hexdigest()

            ts, outs = thread(sender)
            # The server does not read: wait until the sender stops making progress.
            last, stable = -1, 0
            deadline = time.monotonic() + 10
            while stable < 5 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                assert r.buffered <= 2 * r.buffer_bound
                if progress["sent"] == last:
                    stable += 1
                else:
                    last, stable = progress["sent"], 0
            assert progress["sent"] < size, "sender was never held back"
            assert r.bytes_a_to_b < size
            assert 0 < r.peak_buffered <= r.buffer_bound
            assert r.buffer_bound <= (limit if not use_splice else max(limit, 4096))
            # Now read: everything arrives intact.
            tr, outr = thread(lambda: recv_until_eof(ends.server))
            sent = await join(ts, outs)
            assert await join(tr, outr) == (size, sent)
            ends.server.shutdown(socket.SHUT_WR)
            assert await asyncio.wait_for(done, 10) == (size, 0)
            assert r.peak_buffered <= r.buffer_bound
        finally:
            ends.close()

    run(main)


@pytest.mark.parametrize("use_splice", MODES)
def test_reset_closes_other_side(use_splice: bool) -> None:
    async def main() -> None:
        ends = Ends()
        try:
            r, done = start_relay(ends, use_splice)
            ends.client.sendall(b"ping")
            assert await arecv(ends.server, 4) == b"ping"
            # RST from the server side.
            ends.server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            ends.server.close()
            await asyncio.wait_for(done, 10)
            assert r.close_reason == CLOSE_RESET
            assert r.closed
            ends.client.settimeout(5)
            try:
                assert ends.client.recv(10) == b""
            except ConnectionResetError:
                pass
        finally:
            ends.close()

    run(main)


@pytest.mark.parametrize("use_splice", MODES)
def test_idle_timeout_closes(use_splice: bool) -> None:
    async def main() -> None:
        ends = Ends()
        try:
            r, done = start_relay(ends, use_splice, idle_timeout=1.0)
            # Activity re-arms the timer (lazily): ping for longer than the timeout.
            for _ in range(15):
                ends.client.sendall(b"x")
                await asyncio.sleep(0.1)
                assert not r.closed
            assert await asyncio.wait_for(done, 10) == (15, 0)
            assert r.close_reason == CLOSE_IDLE
            ends.client.settimeout(5)
            assert ends.client.recv(10) == b""
            got = b""
            ends.server.settimeout(5)
            while len(got) < 15:
                d = ends.server.recv(100)
                if not d:
                    break
                got += d
            assert got == b"x" * 15
        finally:
            ends.close()

    run(main)


def test_close_by_owner_reports_once() -> None:
    async def main() -> None:
        ends = Ends()
        try:
            r, done = start_relay(ends, True)
            ends.client.sendall(b"abc")
            assert await arecv(ends.server, 3) == b"abc"
            r.close()
            r.close()
            assert done.result() == (3, 0)
            assert r.close_reason == "local"
            assert ends.server.recv(3) == b""
        finally:
            ends.close()

    run(main)


def test_splice_refused_falls_back_to_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*a: Any, **k: Any) -> int:
        raise OSError(errno.EINVAL, "splice refused")

    monkeypatch.setattr(tcp_relay.os, "splice", refuse)
    monkeypatch.setattr(tcp_relay, "_splice_broken", False)
    data = os.urandom(2 * 1024 * 1024)

    async def main() -> None:
        ends = Ends()
        try:
            r, done = start_relay(ends, True)
            tr, outr = thread(lambda: recv_until_eof(ends.server))
            sent = send_all_then_shut(ends.client, data)
            assert await join(tr, outr) == (len(data), sent)
            ends.server.shutdown(socket.SHUT_WR)
            await asyncio.wait_for(done, 10)
            assert not r.uses_splice
            assert tcp_relay._splice_broken
            assert not tcp_relay.splice_supported()
        finally:
            ends.close()

    run(main)


def test_counters_follow_bytes_and_pipes_do_not_leak() -> None:
    from moorline.observability.stats import Counter

    async def one() -> tuple[int, int]:
        ends = Ends()
        up, down = Counter("up"), Counter("down")
        try:
            _r, done = start_relay(ends, True, counters_a_to_b=(up,), counters_b_to_a=(down,))
            ends.client.sendall(b"12345")
            ends.client.shutdown(socket.SHUT_WR)
            assert await arecv(ends.server, 10) == b"12345"
            ends.server.sendall(b"ab")
            ends.server.shutdown(socket.SHUT_WR)
            await asyncio.wait_for(done, 10)
            return up.value, down.value
        finally:
            ends.close()

    async def main() -> None:
        assert await one() == (5, 2)
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(10):
            assert await one() == (5, 2)
        assert len(os.listdir("/proc/self/fd")) <= before

    run(main)
