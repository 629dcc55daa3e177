"""The built-in extensions, registered by the entry point (``moorline.server``).

``config/registry`` is the bottom layer and never imports upward; this module, which sits
beside ``server.py`` at the top, imports every built-in extension module so that each one
registers itself by Envoy name and type URL: network filters (the HTTP connection manager,
tcp_proxy), HTTP filters, listener filters and access loggers.
"""

from __future__ import annotations


def register_builtin() -> None:
    """Import (once) every module that registers a built-in extension."""
    import moorline.filters.http.adaptive_concurrency
    import moorline.filters.http.buffer
    import moorline.filters.http.compressor
    import moorline.filters.http.cors
    import moorline.filters.http.ext_authz
    import moorline.filters.http.fault
    import moorline.filters.http.grpc_web
    import moorline.filters.http.health_check
    import moorline.filters.http.local_ratelimit
    import moorline.filters.http.ratelimit
    import moorline.filters.http.rbac
    import moorline.filters.listener.http_inspector
    import moorline.filters.listener.original_dst
    import moorline.filters.listener.rpc_inspector
    import moorline.filters.listener.tls_inspector
    import moorline.filters.network.local_ratelimit
    import moorline.filters.network.rbac
    import moorline.observability.access_log
    import moorline.proxy.hcm
    import moorline.proxy.rpc_proxy
    import moorline.proxy.tcp_proxy  # noqa: F401
