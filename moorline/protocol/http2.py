"""HTTP/2 codec: a sans-IO wrapper around the pure-Python ``h2`` state machine.

``Http2Codec(client_side, options)`` takes bytes with ``receive(data)`` and returns a list of
small event tuples (kinds below); ``send_*`` queue frames; ``data_to_send()`` returns the bytes
to write. No sockets, no loop, no clock.

Event tuples (first item is the kind):

==============  ==========================================================================
``HEADERS``     ``(HEADERS, sid, headers, end_stream)``: request head (server side) or final
                response head (client side); ``headers`` is a list of ``(bytes, bytes)``
``INFORMATIONAL`` ``(INFORMATIONAL, sid, headers)``: a 1xx response head (client side)
``DATA``        ``(DATA, sid, data, flow_controlled_length, end_stream)``; the glue hands the
                length back with ``ack(sid, n)`` once the bytes moved on (flow control)
``TRAILERS``    ``(TRAILERS, sid, headers)`` (always ends the stream)
``RESET``       ``(RESET, sid, error_code)``: the peer reset the stream
``WRITABLE``    ``(WRITABLE, sid)``: data queued for ``sid`` beyond the peer's window was sent
``GOAWAY``      ``(GOAWAY, last_stream_id, error_code)``: the peer will take no new streams
``SETTINGS``    ``(SETTINGS,)``: the peer changed its settings (max concurrent streams ...)
``OVERSIZED``   ``(OVERSIZED, sid)``: the header block of ``sid`` decoded past
                ``max_header_list_size``; the codec reset that stream alone (RST_STREAM), the
                connection goes on (Envoy's ``http2.header_overflow``)
``MALFORMED``   ``(MALFORMED, sid, detail)``: the peer's message on ``sid`` broke HTTP/2's messaging
                rules (RFC 9113 8.1.1: pseudo-headers, content-length ...); the codec reset that
                stream alone (PROTOCOL_ERROR). Upstream always (nghttp2; h2 with the option);
                downstream only with ``stream_error_on_invalid_http_messaging``, else it
                raises ``Http2Error``. The glue ends the stream as if reset and counts
                ``http2.rx_messaging_error``
==============  ==========================================================================

Flow control. Inbound: the codec never acknowledges DATA by itself; the glue calls
``ack(sid, n)`` when the bytes were passed on and the receiving side is not paused, so a slow
reader on the other side stops window updates and the peer stops sending: what a peer can make
us hold is bounded by the stream window (``initial_stream_window_size``) per stream and the
connection window overall. Outbound: ``send_data`` sends what the peer's windows allow and
queues the rest per stream; ``pending(sid)`` tells the glue how much is queued so it can pause
the producer (its bound is the glue's high-water mark plus one producer read).

Protections (each raises ``Http2Error`` with the GOAWAY already queued, and names the Envoy
``http2.*`` stat to count):

- header blocks: one that decodes past ``max_header_list_size`` resets its stream alone
  (``OVERSIZED``, INTERNAL_ERROR, as Envoy's codec does); past ``hard_header_cap`` of that
  (an HPACK bomb: h2/hpack ``OversizedHeaderListError``) the connection ends
  (``header_overflow``); at most 64 CONTINUATION frames of at most ``max_frame_size`` bytes
  (h2's frame buffer -> ``too_many_header_frames``);
- HPACK: the decoder's dynamic table is capped at our advertised ``header_table_size``; the
  encoder's at ``MAX_ENCODER_TABLE`` whatever the peer allows (its memory is ours);
- outbound floods: every frame the codec produces is counted as h2 serialises it (its own
  answers too: PING and SETTINGS ACKs, the RST_STREAM h2 sends back for each frame on a reset
  stream). More than ``max_outbound_control_frames`` RST_STREAM, PING and SETTINGS frames, or
  more than ``max_outbound_frames`` frames of any kind, produced since the glue last reported
  the socket writable (``flushed()``) -> ``outbound_control_flood`` / ``outbound_flood``
  (Envoy's limits of the same names). Checked at the end of ``receive`` (raises) and in
  ``data_to_send`` for frames produced by ``send_*`` (sets ``error``: GOAWAY queued, the glue
  writes it and closes the connection);
- invalid messages (h2's header validation, content-length): a connection error
  (GOAWAY PROTOCOL_ERROR, ``rx_messaging_error``) unless ``stream_error_on_invalid_http_messaging``
  is set, then only that stream is reset (``MALFORMED`` event), as Envoy's option does;
- empty DATA frames without END_STREAM: more than ``max_consecutive_empty_frames`` in a row ->
  ``inbound_empty_frames_flood`` (CVE-2019-9518);
- rapid reset (CVE-2023-44487), server side: once ``premature_reset_min_streams`` streams have
  closed, a connection where at least half were reset by the client before our response ended
  gets GOAWAY ENHANCE_YOUR_CALM (Envoy's premature-reset rule). Streams opened and reset in
  the same read are dropped before the glue sees them, so an attack batch costs no upstream
  requests.

Extended CONNECT (RFC 8441): ``Http2Options.allow_connect`` (Envoy's
``http2_protocol_options.allow_connect``) makes a server codec advertise
SETTINGS_ENABLE_CONNECT_PROTOCOL = 1; ``:protocol`` then passes through in the ``HEADERS``
event's header list like the other pseudo-headers, and the server glue decides (it rejects
``:protocol`` when the option is off). A client codec sends ``:protocol`` only when
``peer_allows_connect`` (the peer's setting) is true. CONNECT streams carry tunnel bytes as
ordinary DATA, under the same flow control.

GOAWAY does not end the streams already in flight (RFC 9113 6.8), but ``h2``'s connection
state machine closes on any GOAWAY; the codec swaps in a state machine that keeps the
connection open after a GOAWAY, and the glue refuses new streams itself.
"""

from __future__ import annotations

import collections
from typing import Any

from h2.config import H2Configuration
from h2.connection import ConnectionInputs, H2Connection, H2ConnectionStateMachine
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    InformationalResponseReceived,
    PriorityUpdated,
    RemoteSettingsChanged,
    RequestReceived,
    ResponseReceived,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import (
    DenialOfServiceError,
    InvalidBodyLengthError,
    NoSuchStreamError,
    ProtocolError,
    StreamClosedError,
    StreamIDTooLowError,
    TooManyStreamsError,
)
from h2.settings import SettingCodes, Settings
from h2.stream import StreamClosedBy
from hpack import HPACKError
from hyperframe.frame import PingFrame, RstStreamFrame, SettingsFrame, WindowUpdateFrame

HEADERS = 0
INFORMATIONAL = 1
DATA = 2
TRAILERS = 3
RESET = 4
WRITABLE = 5
GOAWAY = 6
SETTINGS = 7
OVERSIZED = 8
MALFORMED = 9

NO_ERROR = 0
PROTOCOL_ERROR = 1
INTERNAL_ERROR = 2
STREAM_CLOSED = 5
FRAME_SIZE_ERROR = 6
REFUSED_STREAM = 7
CANCEL = 8
COMPRESSION_ERROR = 9
ENHANCE_YOUR_CALM = 11

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Our HPACK encoder's dynamic table, whatever larger size the peer allows: it is our memory.
MAX_ENCODER_TABLE = 64 * 1024
_MAX_WINDOW = 2**31 - 1
_DEFAULT_WINDOW = 65535
_INITIAL_PEER_STREAMS = 100


def hard_header_cap(limit: int) -> int:
    """Decoded header bytes past which a block is a bomb, not a large request: the connection
    ends instead of the stream (4x the limit, at least 256 KiB)."""
    return max(4 * limit, 256 * 1024)


def _list_size(headers: list[tuple[bytes, bytes]]) -> int:
    # RFC 9113 6.5.2's SETTINGS_MAX_HEADER_LIST_SIZE accounting: name + value + 32 per field.
    n = 32 * len(headers)
    for k, v in headers:
        n += len(k) + len(v)
    return n


class Http2Error(Exception):
    """A connection error the peer caused: GOAWAY ``code`` is queued; ``stat`` names the
    Envoy ``http2.<stat>`` counter to bump (or None)."""

    def __init__(self, code: int, detail: str, stat: str | None = None) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.stat = stat


class Http2Options:
    """HTTP/2 settings and protection thresholds (Envoy ``Http2ProtocolOptions``)."""

    __slots__ = (
        "allow_connect",
        "header_table_size",
        "initial_connection_window_size",
        "initial_stream_window_size",
        "max_concurrent_streams",
        "max_consecutive_empty_frames",
        "max_frame_size",
        "max_header_list_size",
        "max_inbound_priority_frames_per_stream",
        "max_inbound_window_update_frames_per_data_frame_sent",
        "max_outbound_control_frames",
        "max_outbound_frames",
        "premature_reset_min_streams",
        "stream_error_on_invalid_http_messaging",
    )

    def __init__(
        self,
        max_concurrent_streams: int = 100,
        initial_stream_window_size: int = 256 * 1024,
        initial_connection_window_size: int = 1024 * 1024,
        max_header_list_size: int = 60 * 1024,
        max_frame_size: int = 16384,
        header_table_size: int = 4096,
        max_outbound_control_frames: int = 1000,
        max_consecutive_empty_frames: int = 1,
        premature_reset_min_streams: int = 100,
        max_inbound_priority_frames_per_stream: int = 100,
        max_inbound_window_update_frames_per_data_frame_sent: int = 10,
        allow_connect: bool = False,
        max_outbound_frames: int = 10000,
        stream_error_on_invalid_http_messaging: bool = False,
    ) -> None:
        # RFC 8441: advertise SETTINGS_ENABLE_CONNECT_PROTOCOL and take extended CONNECT
        # (``:protocol``) requests (server side); client side, send them when the peer allows.
        self.allow_connect = allow_connect
        self.max_concurrent_streams = max_concurrent_streams
        self.initial_stream_window_size = initial_stream_window_size
        self.initial_connection_window_size = initial_connection_window_size
        self.max_header_list_size = max_header_list_size
        self.max_frame_size = max_frame_size
        self.header_table_size = header_table_size
        self.max_outbound_control_frames = max_outbound_control_frames
        self.max_consecutive_empty_frames = max_consecutive_empty_frames
        self.premature_reset_min_streams = premature_reset_min_streams
        self.max_inbound_priority_frames_per_stream = max_inbound_priority_frames_per_stream
        self.max_inbound_window_update_frames_per_data_frame_sent = (
            max_inbound_window_update_frames_per_data_frame_sent
        )
        self.max_outbound_frames = max_outbound_frames
        self.stream_error_on_invalid_http_messaging = stream_error_on_invalid_http_messaging

    @classmethod
    def from_proto(
        cls,
        proto: Any,
        path: str,
        max_header_list_size: int | None = None,
        hcm_stream_error: bool | None = None,
    ) -> tuple[Http2Options, tuple[str, str] | None]:
        """Compile an ``envoy.config.core.v3.Http2ProtocolOptions`` (or None: defaults).

        ``hcm_stream_error`` is the connection manager's ``stream_error_on_invalid_http_message``
        when set: Envoy's order is the options' ``override_stream_error_on_invalid_http_message``,
        then the HCM's field, then the deprecated ``stream_error_on_invalid_http_messaging``.

        Returns ``(options, error)``; ``error`` is ``(field_path, message)`` (the path starts
        with ``path``) for a value outside Envoy's bounds."""
        o = cls()
        if max_header_list_size:
            o.max_header_list_size = max_header_list_size
        if hcm_stream_error is not None:
            o.stream_error_on_invalid_http_messaging = hcm_stream_error
        if proto is None:
            return o, None
        if proto.HasField("override_stream_error_on_invalid_http_message"):
            o.stream_error_on_invalid_http_messaging = (
                proto.override_stream_error_on_invalid_http_message.value
            )
        elif hcm_stream_error is None:
            o.stream_error_on_invalid_http_messaging = proto.stream_error_on_invalid_http_messaging

        def u(name: str) -> int | None:
            return int(getattr(proto, name).value) if proto.HasField(name) else None

        v = u("max_concurrent_streams")
        if v is not None:
            if v < 1:
                return o, (f"{path}.max_concurrent_streams", "must be at least 1")
            o.max_concurrent_streams = v
        v = u("initial_stream_window_size")
        if v is not None:
            if not _DEFAULT_WINDOW <= v <= _MAX_WINDOW:
                return o, (f"{path}.initial_stream_window_size", "must be between 65535 and 2147483647")
            o.initial_stream_window_size = v
        v = u("initial_connection_window_size")
        if v is not None:
            if not _DEFAULT_WINDOW <= v <= _MAX_WINDOW:
                return o, (
                    f"{path}.initial_connection_window_size",
                    "must be between 65535 and 2147483647",
                )
            o.initial_connection_window_size = v
        v = u("hpack_table_size")
        if v is not None:
            o.header_table_size = min(v, MAX_ENCODER_TABLE)
        v = u("max_outbound_control_frames")
        if v is not None:
            if v < 1:
                return o, (f"{path}.max_outbound_control_frames", "must be at least 1")
            o.max_outbound_control_frames = v
        v = u("max_outbound_frames")
        if v is not None:
            if v < 1:
                return o, (f"{path}.max_outbound_frames", "must be at least 1")
            o.max_outbound_frames = v
        v = u("max_consecutive_inbound_frames_with_empty_payload")
        if v is not None:
            o.max_consecutive_empty_frames = v
        v = u("max_inbound_priority_frames_per_stream")
        if v is not None:
            o.max_inbound_priority_frames_per_stream = v
        v = u("max_inbound_window_update_frames_per_data_frame_sent")
        if v is not None:
            if v < 1:
                return o, (
                    f"{path}.max_inbound_window_update_frames_per_data_frame_sent",
                    "must be at least 1",
                )
            o.max_inbound_window_update_frames_per_data_frame_sent = v
        if proto.allow_connect:
            o.allow_connect = True
        return o, None


def _rfc_error_code(e: ProtocolError) -> int | None:
    """The error code RFC 9113 names where h2 answers PROTOCOL_ERROR: a field block that does
    not decode is a COMPRESSION_ERROR (4.3), a SETTINGS ACK with a payload a FRAME_SIZE_ERROR
    (6.5)."""
    if str(e).startswith("Error decoding header block"):
        return COMPRESSION_ERROR
    cause = e.__cause__
    if cause is not None and "SETTINGS ack" in str(cause):
        return FRAME_SIZE_ERROR
    return None


class _KeepOpenStateMachine(H2ConnectionStateMachine):
    """h2's connection state machine, except that a GOAWAY (sent or received) leaves the
    connection open for the streams already in flight (RFC 9113 6.8)."""

    def process_input(self, input_: ConnectionInputs) -> list[Any]:
        if input_ is ConnectionInputs.SEND_GOAWAY or input_ is ConnectionInputs.RECV_GOAWAY:
            return []
        return super().process_input(input_)


_CONTROL_FRAMES = (RstStreamFrame, PingFrame, SettingsFrame)


class _InvalidMessage:
    """Marker event of ``_Connection``: a stream was reset for an invalid message."""

    __slots__ = ("detail", "stream_id")

    def __init__(self, stream_id: int, detail: str) -> None:
        self.stream_id = stream_id
        self.detail = detail


class _Connection(H2Connection):
    """h2's connection with two additions: every frame produced is counted (``frames_out``,
    control frames in ``ctrl_out``) where h2 serialises it, so h2's automatic answers are
    counted like ours; and, with ``stream_errors``, an invalid message on one stream resets
    that stream instead of ending the connection."""

    def __init__(self, config: H2Configuration, stream_errors: bool) -> None:
        super().__init__(config)
        self.frames_out = 0
        self.ctrl_out = 0
        self.stream_errors = stream_errors

    def _prepare_for_sending(self, frames: list[Any]) -> None:
        if not frames:
            return
        self.frames_out += len(frames)
        for f in frames:
            if isinstance(f, _CONTROL_FRAMES):
                self.ctrl_out += 1
        self._data_to_send += b"".join([f.serialize() for f in frames])

    def _receive_headers_frame(self, frame: Any) -> tuple[list[Any], list[Any]]:
        try:
            return super()._receive_headers_frame(frame)  # type: ignore[no-any-return]
        except ProtocolError as e:
            sid = frame.stream_id
            if (
                not self.stream_errors
                or isinstance(
                    e, (DenialOfServiceError, NoSuchStreamError, StreamIDTooLowError, TooManyStreamsError)
                )
                or isinstance(e.__cause__, (HPACKError, IndexError, TypeError, UnicodeDecodeError))
                or sid not in self.streams
            ):
                raise  # framing, HPACK or connection state: no stream to blame
            return self._stream_error(sid, e), [_InvalidMessage(sid, str(e))]

    def _receive_data_frame(self, frame: Any) -> tuple[list[Any], list[Any]]:
        try:
            return super()._receive_data_frame(frame)  # type: ignore[no-any-return]
        except InvalidBodyLengthError as e:
            if not self.stream_errors:
                raise
            sid = frame.stream_id
            frames = self._stream_error(sid, e)
            # The frame's bytes were counted against the connection window and nobody reads them.
            inc = self._inbound_flow_control_window_manager.process_bytes(frame.flow_controlled_length)
            if inc:
                wu = WindowUpdateFrame(0)
                wu.window_increment = inc
                frames.append(wu)
            return frames, [_InvalidMessage(sid, str(e))]

    def _stream_error(self, sid: int, e: ProtocolError) -> list[Any]:
        stream = self.streams[sid]
        try:
            return stream.reset_stream(PROTOCOL_ERROR)  # type: ignore[no-any-return]
        except ProtocolError:
            # h2's stream state machine closed the stream when it raised: close it as reset, so
            # later frames on it get RST_STREAM instead of a connection error.
            stream.state_machine.stream_closed_by = StreamClosedBy.SEND_RST_STREAM
            f = RstStreamFrame(sid)
            f.error_code = PROTOCOL_ERROR
            return [f]


class _Out:
    """Data queued for a stream beyond the peer's flow-control window."""

    __slots__ = ("chunks", "end", "size", "trailers")

    def __init__(self) -> None:
        self.chunks: collections.deque[bytes] = collections.deque()
        self.size = 0
        self.end = False
        self.trailers: list[tuple[bytes, bytes]] | None = None


class Http2Codec:
    """One HTTP/2 connection's protocol state (either side)."""

    def __init__(self, client_side: bool, options: Http2Options | None = None) -> None:
        o = self.options = options or Http2Options()
        self.client_side = client_side
        cfg = H2Configuration(
            client_side=client_side,
            header_encoding=None,
            validate_inbound_headers=True,
            # The glues build header lists that are valid by construction (lower-case names,
            # no connection-specific headers); re-validating every one costs per request.
            validate_outbound_headers=False,
            normalize_outbound_headers=True,
        )
        h = self.h2 = _Connection(cfg, o.stream_error_on_invalid_http_messaging)
        h.state_machine = _KeepOpenStateMachine()
        initial = {
            SettingCodes.MAX_CONCURRENT_STREAMS: o.max_concurrent_streams,
            SettingCodes.MAX_HEADER_LIST_SIZE: o.max_header_list_size,
            SettingCodes.INITIAL_WINDOW_SIZE: o.initial_stream_window_size,
            SettingCodes.MAX_FRAME_SIZE: o.max_frame_size,
            SettingCodes.HEADER_TABLE_SIZE: o.header_table_size,
            SettingCodes.ENABLE_PUSH: 0,
        }
        if o.allow_connect and not client_side:
            # RFC 8441 3: only the server advertises it (a client's value means nothing).
            initial[SettingCodes.ENABLE_CONNECT_PROTOCOL] = 1
        h.local_settings = Settings(client=client_side, initial_values=initial)
        # Settings given as initial values are never "acknowledged" in h2: apply them to the
        # decoder and frame buffer now.
        # The decoder stops only a bomb; a block past the limit but under this costs its stream.
        self._header_limit = o.max_header_list_size
        h.decoder.max_header_list_size = hard_header_cap(o.max_header_list_size)
        h.decoder.max_allowed_table_size = o.header_table_size
        h.max_inbound_frame_size = o.max_frame_size
        self._out: dict[int, _Out] = {}
        self._open_local: set[int] = set()  # server: streams whose response has not ended
        self.goaway_received = False
        self.goaway_sent = False
        # Set when frames produced by ``send_*`` passed an outbound limit (see ``data_to_send``).
        self.error: Http2Error | None = None
        self._flooded = False
        self._peer_settings = False
        self.closed_streams = 0
        self.premature_resets = 0
        self._empty_run = 0
        # Inbound frame floods (Envoy's limits, server side): PRIORITY and WINDOW_UPDATE frames
        # received, streams the peer opened and DATA frames we sent.
        self._prio_frames = 0
        self._wu_frames = 0
        self._in_streams = 0
        self._data_frames = 0

    # -- connection ---------------------------------------------------------------------
    def initiate(self) -> None:
        """Queue the preface (client) and our SETTINGS, and open the connection window."""
        h = self.h2
        h.initiate_connection()
        if not self.client_side:
            # Our SETTINGS carry the limit; h2 would enforce it as a connection error (and lose
            # the HPACK state). RFC 9113 5.1.2 wants a stream error: ``receive`` refuses the
            # streams beyond it with REFUSED_STREAM instead.
            h.local_settings._settings[SettingCodes.MAX_CONCURRENT_STREAMS] = collections.deque([2**31 - 1])
        extra = self.options.initial_connection_window_size - _DEFAULT_WINDOW
        if extra > 0:
            h.increment_flow_control_window(extra)

    def data_to_send(self) -> bytes:
        """The bytes to write. When the frames queued since ``flushed()`` passed an outbound
        limit, GOAWAY ENHANCE_YOUR_CALM is queued first and ``error`` is set: the glue writes
        these bytes, then treats ``error`` as a connection error (counts ``error.stat``, closes)."""
        h = self.h2
        if self._over_outbound_limits():
            self.error = self._outbound_flood()
        return h.data_to_send()

    def flushed(self) -> None:
        """The glue wrote everything queued and the transport is below its high-water mark."""
        h = self.h2
        h.frames_out = 0
        h.ctrl_out = 0

    @property
    def ctrl_queued(self) -> int:
        """Control frames (RST_STREAM, PING, SETTINGS) produced since ``flushed()``."""
        return int(self.h2.ctrl_out)

    @property
    def frames_queued(self) -> int:
        """Frames of any kind produced since ``flushed()``."""
        return int(self.h2.frames_out)

    def _over_outbound_limits(self) -> bool:
        h = self.h2
        o = self.options
        return not self._flooded and (
            h.ctrl_out > o.max_outbound_control_frames or h.frames_out > o.max_outbound_frames
        )

    def _outbound_flood(self) -> Http2Error:
        h = self.h2
        self.goaway(ENHANCE_YOUR_CALM)
        if h.ctrl_out > self.options.max_outbound_control_frames:
            e = Http2Error(ENHANCE_YOUR_CALM, "too many queued control frames", "outbound_control_flood")
        else:
            e = Http2Error(ENHANCE_YOUR_CALM, "too many queued frames", "outbound_flood")
        self._flooded = True
        return e

    @property
    def peer_max_concurrent_streams(self) -> int:
        """The peer's SETTINGS_MAX_CONCURRENT_STREAMS; 100 until its first SETTINGS arrived
        (nghttp2's default for the peer's limit), so a new connection is not handed more streams
        than a typical server takes before it has spoken."""
        v = int(self.h2.remote_settings.max_concurrent_streams)
        return v if self._peer_settings else min(v, _INITIAL_PEER_STREAMS)

    @property
    def finished(self) -> bool:
        """The codec will neither read nor write again (nghttp2 says so after the peer's GOAWAY
        with no stream open); h2's connection stays usable, so never here."""
        return False

    @property
    def peer_allows_connect(self) -> bool:
        """The peer advertised SETTINGS_ENABLE_CONNECT_PROTOCOL = 1 (RFC 8441): extended
        CONNECT requests may be sent to it."""
        return bool(self.h2.remote_settings.enable_connect_protocol)

    @property
    def open_outbound_streams(self) -> int:
        return int(self.h2.open_outbound_streams)

    @property
    def highest_inbound_stream_id(self) -> int:
        return int(self.h2.highest_inbound_stream_id)

    def next_stream_id(self) -> int:
        return int(self.h2.get_next_available_stream_id())

    def goaway(self, code: int = NO_ERROR, last_stream_id: int | None = None, detail: bytes = b"") -> None:
        self.goaway_sent = True
        self.h2.close_connection(code, additional_data=detail or None, last_stream_id=last_stream_id)

    def ping(self, opaque: bytes = b"moorline") -> None:
        self.h2.ping(opaque[:8].ljust(8, b"\0"))

    # -- receiving ------------------------------------------------------------------------
    def receive(self, data: bytes) -> list[tuple[Any, ...]]:
        """Feed bytes; returns event tuples. Raises ``Http2Error`` (GOAWAY queued)."""
        h = self.h2
        try:
            raw: list[Any] = h.receive_data(data)
        except DenialOfServiceError as e:
            msg = str(e)
            stat = "header_overflow" if "header" in msg.lower() else "too_many_header_frames"
            raise Http2Error(ENHANCE_YOUR_CALM, msg, stat) from None
        except ProtocolError as e:
            msg = str(e)
            stat = "too_many_header_frames" if "continuation" in msg.lower() else "rx_messaging_error"
            code = int(getattr(e, "error_code", PROTOCOL_ERROR))
            right = _rfc_error_code(e)
            if right is not None and right != code and self._recode_goaway(code, right):
                code = right
            raise Http2Error(code, msg, stat) from None
        out: list[tuple[Any, ...]] = []
        if not raw:
            # Frames that make no event can still make answers (RST_STREAM for each frame on a
            # reset stream).
            if self._over_outbound_limits():
                raise self._outbound_flood()
            return out
        server = not self.client_side
        reset_now: set[int] | None = None
        if server:
            opened = None
            for ev in raw:
                t = type(ev)
                if t is RequestReceived:
                    if opened is None:
                        opened = set()
                    opened.add(ev.stream_id)
                elif t is StreamReset and opened is not None and ev.stream_id in opened:
                    if reset_now is None:
                        reset_now = set()
                    reset_now.add(ev.stream_id)
        open_local = self._open_local
        for ev in raw:
            t = type(ev)
            if t is DataReceived:
                sid = ev.stream_id
                n = ev.flow_controlled_length
                end = ev.stream_ended is not None
                if not n and not end:
                    self._empty_run += 1
                    if self._empty_run > self.options.max_consecutive_empty_frames:
                        self.goaway(ENHANCE_YOUR_CALM)
                        raise Http2Error(
                            ENHANCE_YOUR_CALM, "too many empty DATA frames", "inbound_empty_frames_flood"
                        )
                else:
                    self._empty_run = 0
                if reset_now is not None and sid in reset_now:
                    h.acknowledge_received_data(n, sid) if n else None
                    continue
                out.append((DATA, sid, ev.data, n, end))
            elif t is RequestReceived:
                sid = ev.stream_id
                self._empty_run = 0
                self._in_streams += 1
                if reset_now is not None and sid in reset_now:
                    # Opened and reset in the same read: never reaches the proxy.
                    self.closed_streams += 1
                    self.premature_resets += 1
                    continue
                if _list_size(ev.headers) > self._header_limit:
                    reset_now = self._oversized(sid, out, reset_now)
                    continue
                if len(open_local) >= self.options.max_concurrent_streams:
                    h.reset_stream(sid, REFUSED_STREAM)
                    if reset_now is None:
                        reset_now = set()
                    reset_now.add(sid)  # its DATA is acknowledged and dropped
                    continue
                open_local.add(sid)
                out.append((HEADERS, sid, ev.headers, ev.stream_ended is not None))
            elif t is ResponseReceived:
                if _list_size(ev.headers) > self._header_limit:
                    reset_now = self._oversized(ev.stream_id, out, reset_now)
                    continue
                out.append((HEADERS, ev.stream_id, ev.headers, ev.stream_ended is not None))
            elif t is TrailersReceived:
                if reset_now is not None and ev.stream_id in reset_now:
                    continue
                if _list_size(ev.headers) > self._header_limit:
                    reset_now = self._oversized(ev.stream_id, out, reset_now)
                    continue
                out.append((TRAILERS, ev.stream_id, ev.headers))
            elif t is InformationalResponseReceived:
                out.append((INFORMATIONAL, ev.stream_id, ev.headers))
            elif t is StreamReset:
                sid = ev.stream_id
                self._out.pop(sid, None)
                if server and ev.remote_reset:
                    if reset_now is not None and sid in reset_now:
                        continue  # counted with its RequestReceived
                    if sid in open_local:
                        open_local.discard(sid)
                        self.closed_streams += 1
                        self.premature_resets += 1
                    out.append((RESET, sid, int(ev.error_code)))
                else:
                    out.append((RESET, sid, int(ev.error_code)))
            elif t is WindowUpdated:
                self._wu_frames += 1
                if self._out:
                    self._flush_queued(out)
            elif t is PriorityUpdated:
                self._prio_frames += 1
            elif t is RemoteSettingsChanged:
                self._peer_settings = True
                if SettingCodes.HEADER_TABLE_SIZE in ev.changed_settings:
                    enc = h.encoder
                    if enc.header_table_size > MAX_ENCODER_TABLE:
                        enc.header_table_size = MAX_ENCODER_TABLE
                if SettingCodes.INITIAL_WINDOW_SIZE in ev.changed_settings and self._out:
                    self._flush_queued(out)
                out.append((SETTINGS,))
            elif t is ConnectionTerminated:
                self.goaway_received = True
                out.append((GOAWAY, int(ev.last_stream_id or 0), int(ev.error_code)))
            elif t is _InvalidMessage:
                sid = ev.stream_id
                self._out.pop(sid, None)
                if sid in open_local:
                    open_local.discard(sid)
                    self.closed_streams += 1
                if reset_now is None:
                    reset_now = set()
                reset_now.add(sid)  # frames after it in this read are dropped
                out.append((MALFORMED, sid, ev.detail))
        if server:
            o = self.options
            if self._prio_frames > o.max_inbound_priority_frames_per_stream * (1 + self._in_streams):
                self.goaway(ENHANCE_YOUR_CALM)
                raise Http2Error(
                    ENHANCE_YOUR_CALM, "too many PRIORITY frames", "inbound_priority_frames_flood"
                )
            if self._wu_frames > 5 + 2 * (
                self._in_streams + o.max_inbound_window_update_frames_per_data_frame_sent * self._data_frames
            ):
                self.goaway(ENHANCE_YOUR_CALM)
                raise Http2Error(
                    ENHANCE_YOUR_CALM, "too many WINDOW_UPDATE frames", "inbound_window_update_frames_flood"
                )
        if self._over_outbound_limits():
            raise self._outbound_flood()
        if (
            server
            and self.premature_resets
            and self.closed_streams >= self.options.premature_reset_min_streams
        ):
            if self.premature_resets * 2 >= self.closed_streams:
                self.goaway(ENHANCE_YOUR_CALM)
                raise Http2Error(ENHANCE_YOUR_CALM, "too many premature resets", "too_many_premature_resets")
        return out

    def _recode_goaway(self, old: int, new: int) -> bool:
        """h2 has just queued GOAWAY ``old`` as the last frame; make its error code ``new``."""
        buf = self.h2._data_to_send
        if len(buf) < 17 or buf[-14] != 0x7 or int.from_bytes(buf[-4:], "big") != old:
            return False
        buf[-4:] = new.to_bytes(4, "big")
        return True

    def _oversized(self, sid: int, out: list[tuple[Any, ...]], reset_now: set[int] | None) -> set[int]:
        """Reset ``sid`` (its header block is past the limit); its later frames are dropped."""
        self._open_local.discard(sid)
        self._out.pop(sid, None)
        try:
            self.h2.reset_stream(sid, INTERNAL_ERROR)
        except (StreamClosedError, ProtocolError, KeyError):
            pass
        out.append((OVERSIZED, sid))
        if reset_now is None:
            reset_now = set()
        reset_now.add(sid)
        return reset_now

    def ack(self, sid: int, n: int) -> None:
        """``n`` flow-controlled bytes of ``sid`` were consumed: let the peer send more."""
        if n:
            self.h2.acknowledge_received_data(n, sid)

    # -- sending --------------------------------------------------------------------------
    def send_headers(self, sid: int, headers: list[tuple[bytes, bytes]], end_stream: bool) -> bool:
        try:
            self.h2.send_headers(sid, headers, end_stream=end_stream)
        except (StreamClosedError, ProtocolError, KeyError):
            return False
        if end_stream:
            self._ended(sid)
        return True

    def send_data(self, sid: int, data: bytes, end_stream: bool) -> bool:
        """Send ``data`` within the peer's windows, queueing the rest (see ``pending``)."""
        q = self._out.get(sid)
        if q is not None:
            if data:
                q.chunks.append(data)
                q.size += len(data)
            if end_stream:
                q.end = True
            return True
        h = self.h2
        try:
            if data:
                sent = self._send_window(sid, data)
                if sent < len(data):
                    q = self._out[sid] = _Out()
                    rest = data[sent:]
                    q.chunks.append(rest)
                    q.size = len(rest)
                    q.end = end_stream
                    return True
            if end_stream:
                h.end_stream(sid)
                self._ended(sid)
        except (StreamClosedError, ProtocolError, KeyError):
            self._out.pop(sid, None)
            return False
        return True

    def send_trailers(self, sid: int, trailers: list[tuple[bytes, bytes]]) -> bool:
        q = self._out.get(sid)
        if q is not None:
            q.trailers = trailers
            q.end = True
            return True
        return self.send_headers(sid, trailers, True)

    def pending(self, sid: int) -> int:
        q = self._out.get(sid)
        return q.size if q is not None else 0

    def reset(self, sid: int, code: int = CANCEL) -> None:
        self._out.pop(sid, None)
        self._open_local.discard(sid)
        try:
            self.h2.reset_stream(sid, code)
        except (StreamClosedError, ProtocolError, KeyError):
            pass

    def forget(self, sid: int) -> None:
        """The glue is done with ``sid`` (both directions ended): drop any queued output."""
        self._out.pop(sid, None)
        self._open_local.discard(sid)

    def _ended(self, sid: int) -> None:
        if sid in self._open_local:
            self._open_local.discard(sid)
            self.closed_streams += 1

    def _send_window(self, sid: int, data: bytes) -> int:
        h = self.h2
        window = h.local_flow_control_window(sid)
        n = len(data)
        if n > window:
            n = window
        if n <= 0:
            return 0
        mfs = h.max_outbound_frame_size
        if n <= mfs and n == len(data):
            h.send_data(sid, data)
            self._data_frames += 1
            return n
        mv = memoryview(data)
        off = 0
        while off < n:
            k = min(mfs, n - off)
            h.send_data(sid, bytes(mv[off : off + k]))
            self._data_frames += 1
            off += k
        return n

    def _flush_queued(self, out: list[tuple[Any, ...]]) -> None:
        h = self.h2
        for sid in list(self._out):
            q = self._out[sid]
            try:
                while q.chunks:
                    chunk = q.chunks[0]
                    sent = self._send_window(sid, chunk)
                    q.size -= sent
                    if sent < len(chunk):
                        q.chunks[0] = chunk[sent:]
                        break
                    q.chunks.popleft()
                if q.chunks:
                    continue
                del self._out[sid]
                if q.trailers is not None:
                    h.send_headers(sid, q.trailers, end_stream=True)
                    self._ended(sid)
                elif q.end:
                    h.end_stream(sid)
                    self._ended(sid)
            except (StreamClosedError, ProtocolError, KeyError):
                self._out.pop(sid, None)
                continue
            out.append((WRITABLE, sid))
