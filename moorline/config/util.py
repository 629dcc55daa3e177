"""Small helpers for reading Envoy v3 protos during compilation (never on the hot path)."""

from __future__ import annotations

from typing import Any

from moorline.config.errors import ConfigError

# ("tcp", host, port) or ("pipe", path, None)
Addr = tuple[str, str, int | None]


def duration_s(d: Any, default: float | None = None) -> float | None:
    """Protobuf Duration -> float seconds; ``default`` when the field is unset (pass the parent
    message's ``HasField`` result by calling ``opt_duration_s`` instead when presence matters)."""
    if d is None:
        return default
    return d.seconds + d.nanos / 1e9


def opt_duration_s(msg: Any, field: str, default: float | None = None) -> float | None:
    """Seconds of ``msg.field`` if set, else ``default``."""
    if msg.HasField(field):
        d = getattr(msg, field)
        return d.seconds + d.nanos / 1e9
    return default


def opt_uint(msg: Any, field: str, default: int | None = None) -> int | None:
    """Value of a wrapper (``UInt32Value``...) field if set, else ``default``."""
    if msg.HasField(field):
        return int(getattr(msg, field).value)
    return default


def opt_bool(msg: Any, field: str, default: bool) -> bool:
    if msg.HasField(field):
        return bool(getattr(msg, field).value)
    return default


def address_of(addr: Any, path: str) -> Addr:
    """``envoy.config.core.v3.Address`` -> ``Addr``."""
    kind = addr.WhichOneof("address")
    if kind == "socket_address":
        sa = addr.socket_address
        if sa.WhichOneof("port_specifier") == "named_port":
            raise ConfigError(f"{path}.socket_address.named_port", "named ports are not supported")
        if not sa.address:
            raise ConfigError(f"{path}.socket_address.address", "address is required")
        if sa.port_value > 65535:
            raise ConfigError(f"{path}.socket_address.port_value", f"port {sa.port_value} out of range")
        return ("tcp", sa.address, int(sa.port_value))
    if kind == "pipe":
        if not addr.pipe.path:
            raise ConfigError(f"{path}.pipe.path", "path is required")
        return ("pipe", addr.pipe.path, None)
    if kind is None:
        raise ConfigError(path, "address is required")
    raise ConfigError(f"{path}.{kind}", f"address kind {kind!r} is not supported")


def addr_str(a: Addr) -> str:
    """Envoy's textual form: ``127.0.0.1:80``, ``[::1]:80``, or the pipe path."""
    kind, host, port = a
    if kind in ("pipe", "internal"):
        return host
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"
