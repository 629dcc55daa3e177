"""What a network filter learns about an accepted downstream connection."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

# One process-wide id sequence, like Envoy's connection ids (shown in logs and access logs).
_next_id = itertools.count(1).__next__

DEFAULT_BUFFER_LIMIT = 1024 * 1024  # Envoy's per_connection_buffer_limit_bytes default (1 MiB)


def next_connection_id() -> int:
    return _next_id()


class ConnInfo:
    """Facts about one downstream connection, filled by the listener.

    ``local`` / ``remote`` are ``(ip, port)`` tuples for TCP, or the socket path (``str``) for
    pipes. ``server_name``, ``alpn`` (the protocols the client offered) and ``transport_protocol``
    (``"tls"`` or ``"raw_buffer"``) are filled by listener filters (``tls_inspector``,
    ``http_inspector``) before the filter chain is chosen; a chain that terminates TLS fills
    ``server_name`` (from the handshake, when no inspector ran) and ``negotiated_alpn`` (the ALPN
    protocol agreed, ``"h2"``, ``"http/1.1"`` or ``None``) once its handshake is done, and
    ``peer_certificate`` (``getpeercert()`` dict) when the client presented one.

    ``local_restored``: ``local`` is the connection's original destination (the
    ``original_dst`` listener filter read it from conntrack after an iptables REDIRECT).

    ``tls`` is the chain's compiled server side (``moorline.net.tls.DownstreamTls``) or ``None``
    for plain TCP: terminal filters hand the socket to ``moorline.net.tls`` when it is set.
    ``filters`` are the chain's non-terminal ``moorline.net.api.ConnectionFilter``s (usually
    none); the terminal filter calls ``admit()`` once the connection's facts are known.

    The terminal network filter owns the connection and must call ``notify_closed()`` exactly
    when it is gone (calling it again is harmless): the listener's active-connection gauge, destroy
    counter and length histogram hang off it.
    """

    __slots__ = (
        "alpn",
        "buffer_limit",
        "connection_id",
        "filter_state",
        "filters",
        "listener_name",
        "local",
        "local_restored",
        "negotiated_alpn",
        "on_close",
        "peer_certificate",
        "remote",
        "server_name",
        "start_mono",
        "tls",
        "tls_version",
        "transport_protocol",
    )

    def __init__(
        self,
        local: tuple[str, int] | str,
        remote: tuple[str, int] | str,
        listener_name: str,
        connection_id: int | None = None,
        buffer_limit: int = DEFAULT_BUFFER_LIMIT,
        server_name: str | None = None,
        alpn: list[str] | None = None,
        on_close: Callable[[], None] | None = None,
        start_mono: float = 0.0,
    ) -> None:
        self.local = local
        # True once a listener filter (original_dst) replaced ``local`` with the destination the
        # client asked for before NAT; only then do ORIGINAL_DST clusters and listener handoff use it.
        self.local_restored = False
        self.remote = remote
        self.listener_name = listener_name
        self.connection_id = next_connection_id() if connection_id is None else connection_id
        self.buffer_limit = buffer_limit
        self.server_name = server_name
        self.alpn = alpn
        self.on_close = on_close
        self.start_mono = start_mono  # loop.time() at accept; 0.0 when unknown
        self.transport_protocol = "raw_buffer"
        self.tls: Any = None  # moorline.net.tls.DownstreamTls of the chain, None for plain TCP
        self.filters: tuple[Any, ...] = ()  # the chain's ConnectionFilters (net.api)
        self.negotiated_alpn: str | None = None
        self.tls_version: str | None = None
        self.peer_certificate: dict[str, Any] | None = None
        # Per-connection state of HTTP filters (a local rate limit's bucket), keyed by the
        # filter's compiled config; None until one needs it, freed with the connection.
        self.filter_state: dict[Any, Any] | None = None

    def notify_closed(self) -> None:
        """Run the ``on_close`` callback once; later calls do nothing."""
        cb = self.on_close
        if cb is not None:
            self.on_close = None
            cb()

    def admit(self) -> bool:
        """Ask the chain's connection filters, in order: False as soon as one refuses."""
        for f in self.filters:
            if not f.on_new_connection(self):
                return False
        return True

    def remote_str(self) -> str:
        return _fmt(self.remote)

    def local_str(self) -> str:
        return _fmt(self.local)

    def __repr__(self) -> str:
        return f"ConnInfo(#{self.connection_id} {self.remote_str()} -> {self.local_str()} on {self.listener_name!r})"


def _fmt(a: tuple[str, int] | str) -> str:
    if isinstance(a, str):
        return a
    host, port = a[0], a[1]
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"
