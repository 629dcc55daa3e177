"""L4 relay: move bytes between two connected non-blocking sockets.

Two implementations behind one interface (``relay()`` returns a ``Relay``):

- **splice**: ``os.splice(socket -> pipe)`` then ``os.splice(pipe -> socket)``; the bytes never
  enter Python. The pipe *is* the buffer of that direction, so its capacity is the bound.
- **copy**: ``recv_into`` a preallocated buffer, ``send`` at once; what the sink does not take goes
  to a pending ``bytearray`` bounded by the connection buffer limit.

Both are driven by ``loop.add_reader`` / ``loop.add_writer`` on the raw fds (no Task per
connection). Per direction:

- read when the source is readable and the buffer has room; after a read, try to write at once;
  if the sink does not take everything, watch the sink for writability;
- backpressure: a full buffer removes the reader, so the kernel's receive buffer and then the
  peer's TCP window stop the sender; the reader comes back when the buffer drains below half
  (or, for a pipe, as soon as the sink took something);
- EOF from the source: flush what is buffered, then ``shutdown(SHUT_WR)`` on the sink. The other
  direction keeps flowing until it ends too; then both sockets are closed;
- a reset or any other socket error on either side closes both (Envoy closes with FIN too).

Bounds: each direction holds at most ``cap`` bytes: the pipe capacity for splice (requested as
``min(buffer_limit, SPLICE_PIPE_MAX)``, at least one page; read back from the kernel), and
``max(buffer_limit, MIN_COPY_BUFFER)`` for the copy path (plus one fixed read buffer of
``min(cap, COPY_CHUNK)`` bytes). ``Relay.peak_buffered`` reports the high-water mark.

Pipes are taken from a small per-size pool when a direction has bytes to move and returned once it
is empty, so an idle connection holds no pipe fds.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import socket
from collections.abc import Callable, Sequence
from typing import Any

SPLICE_PIPE_MAX = 1024 * 1024  # the default /proc/sys/fs/pipe-max-size for unprivileged users
COPY_CHUNK = 64 * 1024  # one recv per wakeup at most this large
MIN_COPY_BUFFER = 4096
PIPE_POOL_MAX = 16  # idle pipes kept per size (<= 16 MiB of pipe quota); beyond that they are closed

_HAVE_SPLICE = hasattr(os, "splice") and hasattr(os, "SPLICE_F_MOVE")
_SPLICE_FLAGS = (os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK) if _HAVE_SPLICE else 0
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
_splice_broken = False  # set when the kernel refused splice once: later relays copy directly

_CLOSED_ERRNOS = (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.ECONNABORTED, errno.ETIMEDOUT)


def splice_supported() -> bool:
    """``os.splice`` exists, the kernel has not refused it, and ``MOORLINE_NO_SPLICE`` is unset."""
    return _HAVE_SPLICE and not _splice_broken and os.environ.get("MOORLINE_NO_SPLICE", "") in ("", "0")


# --- pipe pool -----------------------------------------------------------------------------------

# size requested -> list of (read fd, write fd, capacity); every pooled pipe is empty.
_pipe_pool: dict[int, list[tuple[int, int, int]]] = {}


def _forget_pool_after_fork() -> None:
    # A worker forked after relays ran must not splice into pipes its parent still uses.
    for pipes in _pipe_pool.values():
        for p in pipes:
            _pipe_close(p)
    _pipe_pool.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


def _pipe_acquire(size: int) -> tuple[int, int, int]:
    pool = _pipe_pool.get(size)
    if pool:
        return pool.pop()
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.fcntl(w, _F_SETPIPE_SZ, size)
    except OSError:
        pass  # over the user's pipe quota (EPERM) or the size cap: keep what the kernel gave
    cap = fcntl.fcntl(w, _F_GETPIPE_SZ)
    return r, w, cap


def _pipe_release(size: int, pipe: tuple[int, int, int]) -> None:
    pool = _pipe_pool.setdefault(size, [])
    if len(pool) < PIPE_POOL_MAX:
        pool.append(pipe)
    else:
        os.close(pipe[0])
        os.close(pipe[1])


def _pipe_close(pipe: tuple[int, int, int]) -> None:
    os.close(pipe[0])
    os.close(pipe[1])


# --- one direction -------------------------------------------------------------------------------


class _Pump:
    """One direction of a relay (src -> dst). Subclasses move the bytes."""

    __slots__ = (
        "cap",
        "counters",
        "done",
        "dst",
        "dst_fd",
        "eof",
        "loop",
        "peak",
        "reading",
        "relay",
        "src",
        "src_fd",
        "total",
        "writing",
    )

    def __init__(
        self,
        relay: Relay,
        src: socket.socket,
        dst: socket.socket,
        counters: Sequence[Any],
    ) -> None:
        self.relay = relay
        self.loop = relay.loop
        self.src = src
        self.dst = dst
        self.src_fd = src.fileno()
        self.dst_fd = dst.fileno()
        self.counters = tuple(counters)
        self.total = 0
        self.peak = 0
        self.cap = 0
        self.eof = False
        self.done = False
        self.reading = False
        self.writing = False

    @property
    def pending(self) -> int:
        raise NotImplementedError

    def start(self) -> None:
        self.reading = True
        self.loop.add_reader(self.src_fd, self.on_readable)

    def on_readable(self) -> None:
        raise NotImplementedError

    def on_writable(self) -> None:
        raise NotImplementedError

    def _pause_reading(self) -> None:
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.src_fd)

    def _resume_reading(self) -> None:
        if not self.reading and not self.eof and not self.relay.closed:
            self.reading = True
            self.loop.add_reader(self.src_fd, self.on_readable)

    def _want_write(self) -> None:
        if not self.writing:
            self.writing = True
            self.loop.add_writer(self.dst_fd, self.on_writable)

    def _stop_writing(self) -> None:
        if self.writing:
            self.writing = False
            self.loop.remove_writer(self.dst_fd)

    def _on_eof(self) -> None:
        self.eof = True
        self._pause_reading()
        if not self.pending:
            self._finish()

    def _finish(self) -> None:
        """Source ended and everything was flushed: pass the half-close on."""
        self.done = True
        self._stop_writing()
        try:
            self.dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the sink is gone already; the other direction will notice
        self.relay._pump_done()

    def detach(self) -> None:
        """Stop watching the fds (before they are closed)."""
        self._pause_reading()
        self._stop_writing()


class _CopyPump(_Pump):
    __slots__ = ("buf", "chunk", "low", "rbuf", "rview")

    def __init__(
        self, relay: Relay, src: socket.socket, dst: socket.socket, counters: Sequence[Any], limit: int
    ) -> None:
        super().__init__(relay, src, dst, counters)
        self.cap = max(limit, MIN_COPY_BUFFER)
        self.low = self.cap // 2  # resume reading below this
        self.chunk = min(self.cap, COPY_CHUNK)
        self.rbuf = bytearray(self.chunk)
        self.rview = memoryview(self.rbuf)
        self.buf = bytearray()  # bytes the sink has not taken yet; len <= cap

    @property
    def pending(self) -> int:
        return len(self.buf)

    def on_readable(self) -> None:
        buf = self.buf
        room = self.cap - len(buf)
        try:
            n = self.src.recv_into(self.rview, room if room < self.chunk else self.chunk)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.relay._error(e)
            return
        if n == 0:
            self._on_eof()
            return
        self.total += n
        for c in self.counters:
            c.value += n
        relay = self.relay
        relay.last_activity = self.loop.time()
        if buf:
            # Older bytes are still waiting: keep the order, the writer is already armed.
            buf += self.rview[:n]
        else:
            try:
                sent = self.dst.send(self.rview[:n])
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as e:
                relay._error(e)
                return
            if sent < n:
                buf += self.rview[sent:n]
                self._want_write()
        size = len(buf)
        if size > self.peak:
            self.peak = size
        if size >= self.cap:
            self._pause_reading()

    def on_writable(self) -> None:
        buf = self.buf
        try:
            sent = self.dst.send(buf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.relay._error(e)
            return
        del buf[:sent]  # front deletion of a bytearray is O(1) in CPython
        self.relay.last_activity = self.loop.time()
        if not buf:
            self._stop_writing()
            if self.eof:
                self._finish()
                return
        if not self.reading and len(buf) <= self.low:
            self._resume_reading()


class _SplicePump(_Pump):
    __slots__ = ("pipe", "pipe_size", "queued")

    def __init__(
        self, relay: Relay, src: socket.socket, dst: socket.socket, counters: Sequence[Any], limit: int
    ) -> None:
        super().__init__(relay, src, dst, counters)
        self.pipe_size = max(4096, min(limit, SPLICE_PIPE_MAX))
        self.pipe: tuple[int, int, int] | None = None
        self.cap = self.pipe_size
        self.queued = 0  # bytes sitting in the pipe; <= pipe capacity

    @property
    def pending(self) -> int:
        return self.queued

    def on_readable(self) -> None:
        pipe = self.pipe
        if pipe is None:
            try:
                pipe = self.pipe = _pipe_acquire(self.pipe_size)
            except OSError:
                # Out of fds for a pipe: this direction copies instead.
                self.relay._fallback(self)
                return
            self.cap = pipe[2]
        room = self.cap - self.queued
        try:
            n = os.splice(self.src_fd, pipe[1], room, flags=_SPLICE_FLAGS)
        except (BlockingIOError, InterruptedError):
            if self.queued:
                # Either the socket has nothing or the pipe ran out of slots (it counts buffers,
                # not bytes). Wait for the sink to take something; on_writable resumes us.
                self._pause_reading()
            else:
                self._release_pipe()
            return
        except OSError as e:
            if (
                e.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)
                and self.total == 0
                and not self.queued
            ):
                global _splice_broken
                _splice_broken = True
                self.relay._fallback(self)
                return
            self.relay._error(e)
            return
        if n == 0:
            self._on_eof()
            return
        self.total += n
        for c in self.counters:
            c.value += n
        self.relay.last_activity = self.loop.time()
        queued = self.queued + n
        if queued > self.peak:
            self.peak = queued
        if not self.writing:
            try:
                out = os.splice(pipe[0], self.dst_fd, queued, flags=_SPLICE_FLAGS)
            except (BlockingIOError, InterruptedError):
                out = 0
            except OSError as e:
                self.queued = queued
                self.relay._error(e)
                return
            queued -= out
            if queued:
                self._want_write()  # a short write means the socket buffer is full
        self.queued = queued
        if not queued:
            self._release_pipe()
        elif queued >= self.cap:
            self._pause_reading()

    def on_writable(self) -> None:
        pipe = self.pipe
        if pipe is None or not self.queued:
            self._stop_writing()
            return
        try:
            out = os.splice(pipe[0], self.dst_fd, self.queued, flags=_SPLICE_FLAGS)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.relay._error(e)
            return
        self.queued -= out
        self.relay.last_activity = self.loop.time()
        if not self.queued:
            self._stop_writing()
            self._release_pipe()
            if self.eof:
                self._finish()
                return
        # The pipe's slot count, not its byte count, may have stopped the reader: any progress
        # frees slots, so read again.
        if not self.reading:
            self._resume_reading()

    def _release_pipe(self) -> None:
        if self.pipe is not None and not self.queued:
            _pipe_release(self.pipe_size, self.pipe)
            self.pipe = None

    def discard_pipe(self) -> None:
        if self.pipe is not None:
            if self.queued:
                _pipe_close(self.pipe)  # never pool a pipe that still holds bytes
            else:
                _pipe_release(self.pipe_size, self.pipe)
            self.pipe = None
            self.queued = 0


# --- the relay -----------------------------------------------------------------------------------

CLOSE_DONE = "done"  # both directions ended with EOF
CLOSE_RESET = "reset"  # a socket error (reset, broken pipe) on either side
CLOSE_IDLE = "idle_timeout"
CLOSE_LOCAL = "local"  # Relay.close() by the owner


class Relay:
    """A running relay between sockets ``a`` and ``b``; it owns (and finally closes) both."""

    __slots__ = (
        "_ab",
        "_ba",
        "_idle_handle",
        "_on_close",
        "a",
        "b",
        "buffer_limit",
        "close_error",
        "close_reason",
        "closed",
        "idle_timeout",
        "last_activity",
        "loop",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        a: socket.socket,
        b: socket.socket,
        *,
        use_splice: bool,
        buffer_limit: int,
        idle_timeout: float | None,
        on_close: Callable[[int, int], None] | None,
        counters_a_to_b: Sequence[Any] = (),
        counters_b_to_a: Sequence[Any] = (),
    ) -> None:
        self.loop = loop
        self.a = a
        self.b = b
        self.buffer_limit = buffer_limit
        self.idle_timeout = idle_timeout or None
        self._on_close = on_close
        self.closed = False
        self.close_reason: str | None = None
        self.close_error: OSError | None = None
        self.last_activity = loop.time()
        a.setblocking(False)
        b.setblocking(False)
        splice = use_splice and _HAVE_SPLICE and not _splice_broken
        pump = _SplicePump if splice else _CopyPump
        self._ab: _Pump = pump(self, a, b, counters_a_to_b, buffer_limit)
        self._ba: _Pump = pump(self, b, a, counters_b_to_a, buffer_limit)
        self._idle_handle: asyncio.TimerHandle | None = None
        if self.idle_timeout:
            self._idle_handle = loop.call_later(self.idle_timeout, self._on_idle_timer)
        self._ab.start()
        self._ba.start()

    # -- observation --

    @property
    def bytes_a_to_b(self) -> int:
        return self._ab.total

    @property
    def bytes_b_to_a(self) -> int:
        return self._ba.total

    @property
    def buffered(self) -> int:
        """Bytes read from one side and not yet written to the other, both directions."""
        return self._ab.pending + self._ba.pending

    @property
    def peak_buffered(self) -> int:
        """Largest number of bytes one direction ever held."""
        return max(self._ab.peak, self._ba.peak)

    @property
    def buffer_bound(self) -> int:
        """What one direction may hold at most (see the module docstring)."""
        return max(self._ab.cap, self._ba.cap)

    @property
    def uses_splice(self) -> bool:
        return isinstance(self._ab, _SplicePump) and isinstance(self._ba, _SplicePump)

    # -- control --

    def close(self, reason: str = CLOSE_LOCAL) -> None:
        """Close both sockets now (pending bytes are dropped) and report once through on_close."""
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None
        for p in (self._ab, self._ba):
            p.detach()
        for p in (self._ab, self._ba):
            if isinstance(p, _SplicePump):
                p.discard_pipe()
        self.a.close()
        self.b.close()
        cb = self._on_close
        self._on_close = None
        if cb is not None:
            cb(self._ab.total, self._ba.total)

    # -- called by the pumps --

    def _pump_done(self) -> None:
        if self._ab.done and self._ba.done:
            self.close(CLOSE_DONE)

    def _error(self, e: OSError) -> None:
        self.close_error = e
        self.close(CLOSE_RESET)

    def _fallback(self, pump: _Pump) -> None:
        """Replace a splice pump that never moved a byte with a copy pump."""
        assert isinstance(pump, _SplicePump)
        pump.detach()
        pump.discard_pipe()
        new = _CopyPump(self, pump.src, pump.dst, pump.counters, self.buffer_limit)
        if pump is self._ab:
            self._ab = new
        else:
            self._ba = new
        new.start()

    def _on_idle_timer(self) -> None:
        # Re-armed lazily: activity only stamps last_activity; the timer checks it when it fires.
        self._idle_handle = None
        if self.closed or self.idle_timeout is None:
            return
        left = self.last_activity + self.idle_timeout - self.loop.time()
        if left <= 0.001:
            self.close(CLOSE_IDLE)
        else:
            self._idle_handle = self.loop.call_later(left, self._on_idle_timer)


def relay(
    loop: asyncio.AbstractEventLoop,
    a: socket.socket,
    b: socket.socket,
    *,
    use_splice: bool,
    buffer_limit: int,
    idle_timeout: float | None,
    on_close: Callable[[int, int], None] | None,
    counters_a_to_b: Sequence[Any] = (),
    counters_b_to_a: Sequence[Any] = (),
) -> Relay:
    """Start relaying between connected sockets ``a`` and ``b`` on ``loop``.

    The relay owns both sockets and closes them when both directions ended, on a socket error,
    on idle timeout (``idle_timeout`` seconds without bytes in either direction; ``None``/0 = off)
    or on ``Relay.close()``. ``on_close(bytes_a_to_b, bytes_b_to_a)`` is called once, then.
    ``counters_*`` are stats counters (anything with ``.value``) bumped as bytes move.
    ``use_splice`` asks for ``os.splice``; it falls back to userspace copy where that is missing
    or refused by the kernel.
    """
    return Relay(
        loop,
        a,
        b,
        use_splice=use_splice,
        buffer_limit=buffer_limit,
        idle_timeout=idle_timeout,
        on_close=on_close,
        counters_a_to_b=counters_a_to_b,
        counters_b_to_a=counters_b_to_a,
    )
