"""What ``upstream/`` expects from the layers that use it (one place, as ``typing.Protocol``s).

``upstream/`` may not import ``net/`` or ``stream/``; they plug in here instead:

- ``ConnPool``: a connection pool kept on a ``Host`` (``host.pool`` for HTTP/1.1, ``host.h2pool``
  for HTTP/2, both made by ``moorline.stream``). The cluster drains them when the host leaves the
  cluster or the cluster is replaced or removed.
- ``LbContext``: what a load balancer may ask about the request or connection it picks a host
  for. ``Cluster.choose_host(exclude, context)`` takes it; only ORIGINAL_DST clusters call it
  (the router and tcp_proxy pass themselves, so other clusters cost nothing extra).
- ``HealthConnect``: how active health checks open a connection (``moorline.net.upstream.
  connect``, through the cluster's TLS when it has one); handed to the ``ClusterManager``.
- ``TransportFactory``: compiles a cluster's ``transport_socket`` (``moorline.net.upstream.
  UpstreamTransportFactory`` builds TLS); handed to the ``ClusterManager`` by the server.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol


class ConnPool(Protocol):
    closed: bool
    draining: bool

    def drain(self) -> None:
        """Stop reusing connections: idle ones close now, busy ones when their request ends.
        Requests already queued are still served."""
        ...


class LbContext(Protocol):
    def downstream_local_address(self) -> tuple[str, int] | None:
        """The downstream connection's original destination ``(ip, port)`` when a listener
        filter restored it (``original_dst`` after an iptables REDIRECT), else ``None``."""
        ...

    def downstream_header(self, name: bytes) -> bytes | None:
        """A request header's value (``name`` lower case), ``None`` when absent or when the
        caller is not HTTP (tcp_proxy)."""
        ...


class TransportFactory(Protocol):
    def __call__(self, transport_socket: Any, cluster: Any, path: str) -> Any:
        """The compiled transport for ``cluster`` (None: plain TCP). Raises ``ConfigError`` with
        ``path`` (relative to the cluster) when the transport socket is invalid. Notices go to
        ``cluster.notice``."""
        ...


class EdsSourceFactory(Protocol):
    """Given by the server: follows an EDS cluster's ``eds_config`` when it names a source the
    server serves (a watched file, ``xds.files``). Returns the subscription (kept on the cluster,
    so it lives exactly as long) or None when the source is not one it serves; raises
    ``ConfigError`` for a bad first assignment."""

    def __call__(self, cluster: Any, eds_config: Any, path: str) -> Any: ...


class HealthConnect(Protocol):
    def __call__(
        self,
        loop: Any,
        host: Any,
        protocol: Any,
        timeout: float,
        keepalive: Any,
        on_done: Callable[[BaseException | None, bool], None],
    ) -> Callable[[], None]:
        """Connect the asyncio ``protocol`` to ``host``; ``on_done(error, timed_out)`` once;
        returns a cancel function (``moorline.net.upstream.connect``)."""
        ...
