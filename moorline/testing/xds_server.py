"""The test control plane: ``moorline.xds.server.XdsServer`` (ADS and per-type services, state of
the world and delta, in a thread of its own) with what tests wait on.

    cp = XdsServer().start()               # cp.port
    cp.push(CLUSTER_TYPE, "1", [cluster])  # protos (or packed Anys, for NACK-worthy ones)
    cp.wait_for(lambda r: r.type_url == CLUSTER_TYPE and r.response_nonce == cp.nonce)
    cp.stop()

``requests`` records every request received (``DiscoveryRequest`` or ``DeltaDiscoveryRequest``),
so tests see ACKs (state of the world: ``version_info`` = the push's; both: the nonce echoed)
and NACKs (``error_detail`` set). A restart is ``stop()`` and a new server on the same port.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from moorline.xds.server import XdsServer as _Server


class XdsServer(_Server):
    def wait_for(self, pred: Callable[[Any], bool], timeout: float = 20.0) -> Any:
        """The first received request matching ``pred`` (waiting up to ``timeout``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                for r in self.requests:
                    if pred(r):
                        return r
            time.sleep(0.05)
        raise AssertionError("no matching discovery request arrived")

    def acked(self, type_url: str, nonce: str | None = None) -> Any:
        """Wait for the ACK of ``nonce`` (default: the last push's) for ``type_url``."""
        n = self.nonce if nonce is None else nonce
        return self.wait_for(
            lambda r: r.type_url == type_url and r.response_nonce == n and not r.HasField("error_detail")
        )

    def nacked(self, type_url: str, nonce: str | None = None) -> Any:
        n = self.nonce if nonce is None else nonce
        return self.wait_for(
            lambda r: r.type_url == type_url and r.response_nonce == n and r.HasField("error_detail")
        )


__all__ = ["XdsServer"]
