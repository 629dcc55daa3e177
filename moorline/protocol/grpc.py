"""gRPC over HTTP: what the connection manager and the protocol bridges (grpc_web) share.
Sans-IO, no state."""

from __future__ import annotations

# Envoy's Grpc::Utility::httpToGrpcStatus: the grpc-status an HTTP status stands for when an
# answer is not gRPC (a local reply, a proxy's error page); anything else is UNKNOWN (2).
GRPC_FOR_HTTP = {
    400: b"13",
    401: b"16",
    403: b"7",
    404: b"12",
    429: b"14",
    502: b"14",
    503: b"14",
    504: b"14",
}


def grpc_status_for_http(status: int) -> bytes:
    return GRPC_FOR_HTTP.get(status, b"2")


def percent_encode(msg: bytes) -> bytes:
    """grpc-message encoding: bytes outside printable ASCII, and '%' itself, as %XX."""
    if all(0x20 <= c <= 0x7E and c != 0x25 for c in msg):
        return msg
    return b"".join(bytes((c,)) if 0x20 <= c <= 0x7E and c != 0x25 else b"%%%02X" % c for c in msg)
