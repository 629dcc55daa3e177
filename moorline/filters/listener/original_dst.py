"""Listener filter ``envoy.filters.listener.original_dst``: recover the destination before NAT.

A sidecar receives a workload's traffic through an iptables ``REDIRECT`` (Istio: outbound to
15001, inbound to 15006), so the accepted socket's own address is the proxy's port. Conntrack
still knows where the client meant to go; ``moorline.net.sockopts.original_dst`` asks it
(``SO_ORIGINAL_DST`` / ``IP6T_SO_ORIGINAL_DST``) and this filter makes that the connection's local
address (``info.local``, ``info.local_restored = True``). Filter-chain matching on
``destination_port`` / ``prefix_ranges``, listener handoff (``use_original_dst``), ORIGINAL_DST
clusters and ``%DOWNSTREAM_LOCAL_ADDRESS%`` all see the original destination from then on.

A connection the kernel has no NAT record for (not redirected, conntrack not loaded, a pipe)
keeps its address and is not marked restored.

It needs no bytes from the client (``max_read_bytes = 0``): the listener calls ``on_accept``
once, before any peeking filter, so server-first protocols are not held up.
"""

from __future__ import annotations

from typing import Any

from moorline.config import registry
from moorline.net import sockopts

NAME = "envoy.filters.listener.original_dst"
ORIGINAL_DST_TYPE = "envoy.extensions.filters.listener.original_dst.v3.OriginalDst"


class OriginalDst:
    __slots__ = ("max_read_bytes",)

    def __init__(self) -> None:
        self.max_read_bytes = 0

    def on_accept(self, sock: Any, info: Any) -> bool:
        if not isinstance(info.local, tuple):
            return True  # a pipe: nothing was redirected
        dst = sockopts.original_dst(sock)
        if dst is not None:
            info.local = dst
            info.local_restored = True
        return True


def _factory(cfg: Any, ctx: Any, path: str) -> OriginalDst:
    return OriginalDst()


registry.register(
    "listener",
    [NAME, "envoy.listener.original_dst"],
    ["type.googleapis.com/" + ORIGINAL_DST_TYPE],
    _factory,
)
