"""A blocking HTTP/2 (h2c prior knowledge) client on the ``h2`` library, for byte-level e2e
checks that curl and grpcio hide (trailers-only answers, resets, GOAWAY, raw attack frames)."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.settings

# Stock h2 refuses every frame after a GOAWAY; in-flight streams must still complete.
from moorline.protocol.http2 import _KeepOpenStateMachine


@dataclass
class H2Result:
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    data: bytes = b""
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    reset: int | None = None
    goaway: int | None = None

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers + self.trailers:
            if k == name:
                return v
        return None

    @property
    def status(self) -> int:
        return int(self.header(b":status") or 0)


class H2Client:
    def __init__(self, port: int, window: int | None = None, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.conn.state_machine = _KeepOpenStateMachine()
        self.conn.initiate_connection()
        if window is not None:
            self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
        self.flush()
        self.results: dict[int, H2Result] = {}
        self.done: set[int] = set()
        self.auto_ack = window is None
        self.closed = False

    def flush(self) -> None:
        d = self.conn.data_to_send()
        if d:
            self.sock.sendall(d)

    def send(self, headers: list[tuple[bytes, bytes]], body: bytes = b"", end: bool = True) -> int:
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, headers, end_stream=end and not body)
        if body:
            self.conn.send_data(sid, body, end_stream=end)
        self.flush()
        self.results[sid] = H2Result()
        return sid

    def read_once(self) -> bool:
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            data = b""
        if not data:
            self.closed = True
            return False
        for ev in self.conn.receive_data(data):
            sid = getattr(ev, "stream_id", None)
            r = self.results.get(sid) if sid else None
            if isinstance(ev, h2.events.ResponseReceived) and r is not None:
                r.headers = list(ev.headers)
            elif isinstance(ev, h2.events.DataReceived) and r is not None:
                r.data += ev.data
                if self.auto_ack:
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.TrailersReceived) and r is not None:
                r.trailers = list(ev.headers)
            elif isinstance(ev, h2.events.StreamEnded):
                self.done.add(ev.stream_id)
            elif isinstance(ev, h2.events.StreamReset) and r is not None:
                r.reset = int(ev.error_code)
                self.done.add(ev.stream_id)
            elif isinstance(ev, h2.events.ConnectionTerminated):
                for res in self.results.values():
                    res.goaway = int(ev.error_code)
        self.flush()
        return True

    def wait(self, sid: int) -> H2Result:
        while sid not in self.done and not self.closed:
            self.read_once()
        return self.results[sid]

    def close(self) -> None:
        self.sock.close()


def request(
    port: int,
    path: bytes = b"/",
    method: bytes = b"GET",
    headers: list[tuple[bytes, bytes]] | None = None,
    body: bytes = b"",
) -> H2Result:
    c = H2Client(port)
    try:
        sid = c.send(
            [(b":method", method), (b":scheme", b"http"), (b":authority", b"test"), (b":path", path)]
            + (headers or []),
            body,
        )
        return c.wait(sid)
    finally:
        c.close()
