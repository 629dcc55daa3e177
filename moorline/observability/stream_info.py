"""Per-request (or per-connection, for L4) facts that access logs read.

The connection manager fills one ``StreamInfo`` per stream; access loggers
receive it after the stream ends and format it off the request path.
"""

from __future__ import annotations

from typing import Any

from moorline.protocol.headers import HeaderMap

# Envoy response flags (short form as printed by %RESPONSE_FLAGS%).
NO_ROUTE = "NR"
NO_HEALTHY_UPSTREAM = "UH"
UPSTREAM_CONNECTION_FAILURE = "UF"
UPSTREAM_REQUEST_TIMEOUT = "UT"
UPSTREAM_REMOTE_RESET = "UR"
UPSTREAM_CONNECTION_TERMINATION = "UC"
UPSTREAM_OVERFLOW = "UO"
UPSTREAM_RETRY_LIMIT_EXCEEDED = "URX"
LOCAL_RESET = "LR"
DOWNSTREAM_CONNECTION_TERMINATION = "DC"
STREAM_IDLE_TIMEOUT = "SI"
NO_CLUSTER_FOUND = "NC"
DOWNSTREAM_PROTOCOL_ERROR = "DPE"
UPSTREAM_PROTOCOL_ERROR = "UPE"
DURATION_TIMEOUT = "DT"
DELAY_INJECTED = "DI"
FAULT_INJECTED = "FI"
OVERLOAD_MANAGER = "OL"


class StreamInfo:
    __slots__ = (
        "_down_local",  # set when the address was given directly (else from ``downstream``)
        "_down_remote",
        "attempt_count",
        "bytes_received",
        "bytes_sent",
        "connection_id",
        "downstream",  # the downstream connection's net.conn_info.ConnInfo, or None
        "end_mono",  # loop.time() at end (None while running)
        "first_upstream_rx_mono",
        "protocol",  # "HTTP/1.1", "HTTP/1.0", "HTTP/2", or None for L4
        "request_headers",  # protocol.headers.RequestHeaders (pseudo-headers as attributes)
        "request_id_bytes",  # x-request-id as sent upstream (``request_id`` decodes it)
        "requested_server_name",
        "response_code",  # int, 0 when none was sent
        "response_code_details",
        "response_flags",  # list[str] of the short flags above
        "response_headers",  # HeaderMap or None
        "response_trailers",
        "route_name",
        "rpc_method",  # x-protocol requests (rpc_proxy): None elsewhere
        "rpc_protocol",
        "rpc_service",
        "rpc_status",  # the response's protocol status (None: answered locally / none)
        "start_mono",  # loop.time() at start
        "start_time",  # wall clock, seconds since epoch (time.time())
        "upstream_cluster",  # cluster name or None
        "upstream_host",  # "ip:port" or None
        "upstream_local_address",
        "upstream_transport_failure_reason",
    )

    def __init__(self, start_time: float, start_mono: float) -> None:
        self.start_time = start_time
        self.start_mono = start_mono
        self.end_mono: float | None = None
        self.first_upstream_rx_mono: float | None = None
        self.protocol: str | None = None
        self.request_headers: HeaderMap | None = None
        self.response_headers: HeaderMap | None = None
        self.response_trailers: HeaderMap | None = None
        self.response_code = 0
        self.response_code_details: str | None = None
        self.response_flags: list[str] = []
        self.bytes_received = 0
        self.bytes_sent = 0
        self.upstream_host: str | None = None
        self.upstream_cluster: str | None = None
        self.upstream_local_address: str | None = None
        self.upstream_transport_failure_reason: str | None = None
        self.downstream: Any = None
        self._down_remote: str | None = None
        self._down_local: str | None = None
        self.request_id_bytes: bytes | None = None
        self.route_name: str | None = None
        self.connection_id = 0
        self.attempt_count = 0
        self.requested_server_name: str | None = None
        self.rpc_service: str | None = None
        self.rpc_method: str | None = None
        self.rpc_protocol: str | None = None
        self.rpc_status: int | None = None

    # The downstream addresses ("ip:port") are formatted when read (by an access log), not
    # kept per connection: an idle keep-alive connection should not carry two strings.
    @property
    def downstream_remote_address(self) -> str | None:
        if self._down_remote is None and self.downstream is not None:
            return str(self.downstream.remote_str())
        return self._down_remote

    @downstream_remote_address.setter
    def downstream_remote_address(self, v: str | None) -> None:
        self._down_remote = v

    @property
    def downstream_local_address(self) -> str | None:
        if self._down_local is None and self.downstream is not None:
            return str(self.downstream.local_str())
        return self._down_local

    @downstream_local_address.setter
    def downstream_local_address(self, v: str | None) -> None:
        self._down_local = v

    @property
    def request_id(self) -> str | None:
        rid = self.request_id_bytes
        return None if rid is None else rid.decode("latin-1")

    def duration_ms(self) -> int | None:
        if self.end_mono is None:
            return None
        return int((self.end_mono - self.start_mono) * 1000)

    def flags_str(self) -> str:
        return ",".join(self.response_flags) if self.response_flags else "-"
