"""SDS over gRPC: a TLS context's secret asked for by name on an xDS stream (the ADS one, or a
``SecretDiscoveryService`` stream such as Istio's ``sds-grpc`` Unix-socket cluster).

``XdsSecretProvider`` is both a ``net.secrets.SecretProvider`` (what a TLS context reads and
watches) and an ``xds.ads.NamedTarget`` (what the stream feeds). A context whose secret has not
arrived yet has no certificates: its listener or cluster warms on ``init`` until the first
secret, or the source's ``initial_fetch_timeout``. A new secret rebuilds every context using it
in place: connections already up keep their session, new handshakes use the new certificate.

Stats, as Envoy's: ``sds.<secret name>.update_success``, ``update_rejected``, ``version``.
"""

from __future__ import annotations

import time
import weakref
from typing import Any

from moorline.config.errors import ConfigError
from moorline.config.warming import InitTarget
from moorline.net.secrets import SecretProvider
from moorline.observability.stats import Store

SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
_KINDS = ("tls_certificate", "validation_context", "session_ticket_keys", "generic_secret")


class XdsSecretProvider(SecretProvider):
    def __init__(self, name: str, stats: Store) -> None:
        super().__init__(name)
        self.init = InitTarget(f"sds {name}")
        self.version_info = ""
        self.last_updated = 0.0
        self._secret: Any = None
        pre = f"sds.{name}"
        self.success = stats.counter(f"{pre}.update_success")
        self.rejected = stats.counter(f"{pre}.update_rejected")
        self.version = stats.gauge(f"{pre}.version")

    def get(self) -> Any | None:
        return self._secret

    # -- xds.ads.NamedTarget -----------------------------------------------------------------
    def check(self, proto: Any, path: str) -> None:
        if proto.WhichOneof("type") not in _KINDS:
            self.rejected.value += 1
            raise ConfigError(path, f"secret {self.name!r} holds nothing (one of {', '.join(_KINDS)})")

    def apply(self, proto: Any, version_info: str) -> None:
        from moorline.xds.files import version_hash

        self.success.value += 1
        self.version.value = version_hash(version_info)
        self.version_info = version_info
        self.last_updated = time.time()
        if proto == self._secret:
            self.init.done()
            return
        self._secret = proto
        self.init.done()
        self._notify()

    def on_fetch_timeout(self) -> None:
        self.init.timed_out = True
        self.init.done()


def sds_client_factory(clients: Any, stats: Store) -> Any:
    """``net.secrets.SdsClientFactory`` over a server's ``xds.ads.XdsClients``: one provider per
    (stream, secret name), shared by every context that names it. The contexts hold it; here it
    is held weakly, so a secret no listener or cluster uses any more (removed, replaced, or only
    compiled for an update that was refused) leaves the stream's subscription (``xds.ads``
    holds its targets weakly too) instead of staying asked for for good."""
    from envoy.extensions.transport_sockets.tls.v3.secret_pb2 import Secret

    from moorline.xds.files import initial_fetch_timeout

    providers: weakref.WeakValueDictionary[tuple[int, str], XdsSecretProvider] = weakref.WeakValueDictionary()

    def factory(source: Any, name: str, ctx: Any, path: str) -> SecretProvider:
        client = clients.for_source(source, SECRET_TYPE, path)
        if client is None:
            raise ConfigError(path, "SDS needs a file (path_config_source), ads or a gRPC api_config_source")
        key = (id(client), name)
        p = providers.get(key)
        if p is None:
            p = providers[key] = XdsSecretProvider(name, stats)
            client.subscribe(SECRET_TYPE, Secret, name, p, initial_fetch_timeout(source))
        return p

    factory.providers = providers  # type: ignore[attr-defined]  # (for /config_dump)
    return factory


__all__ = ["SECRET_TYPE", "XdsSecretProvider", "sds_client_factory"]
