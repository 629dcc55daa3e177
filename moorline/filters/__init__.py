"""Built-in filters by Envoy name: ``http/`` (HTTP filters), ``listener/`` (listener filters),
``network/`` (network filters other than the connection manager and tcp_proxy, which live in
``proxy/``). Each module registers itself in ``moorline.config.registry`` when imported;
``moorline.extensions.register_builtin`` imports them all.
"""
