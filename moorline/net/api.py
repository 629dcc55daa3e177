"""Interfaces of the NET/IO layer (implementations live beside this module).

``ConnectionFilter`` is a non-terminal network filter (``terminal = False`` in a filter chain's
``filters``): it decides on a new downstream connection once its facts are known, and the
terminal filter of the chain asks it. A chain without such filters runs none of this:
``ConnInfo.filters`` is the empty tuple and the terminals only test it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from moorline.net.conn_info import ConnInfo


@runtime_checkable
class ConnectionFilter(Protocol):
    """A non-terminal network filter that accepts or refuses a new connection.

    ``on_new_connection(info)`` is called once per connection by the chain's terminal filter
    (the HTTP connection manager, ``tcp_proxy``), in chain order, after the TLS handshake when
    the chain terminates TLS (``info.peer_certificate``, ``info.server_name`` are then set) and
    before any byte of the connection is read by the terminal or sent upstream. ``True`` lets the
    connection go on; ``False`` closes it (the first refusal wins; later filters are not asked).
    The filter counts its own stats; it must not block and must not touch the socket.
    """

    terminal: bool  # always False

    def on_new_connection(self, info: ConnInfo) -> bool: ...
