"""The configuration moorline runs when started without ``-c`` / ``--config-yaml``.

Modelled on Envoy's ``configs/envoy-demo.yaml``: a request to 127.0.0.1:10000 travels the whole
proxy path (listener -> HTTP connection manager -> router -> cluster -> upstream connection) and
is answered by a second listener on 127.0.0.1:10001, so ``curl http://127.0.0.1:10000/`` shows a
working proxy with nothing else running. Everything binds to loopback only: a default must never
open a port to the network.
"""

from __future__ import annotations

DEFAULT_CONFIG_YAML: str = """\
# moorline embedded default configuration (Envoy v3 bootstrap).
# curl http://127.0.0.1:10000/  -> proxied to listener_1, which answers "Hello from moorline".
# curl http://127.0.0.1:9901/stats  -> admin interface.

admin:
  # Admin API and stats; loopback only.
  address:
    socket_address: { address: 127.0.0.1, port_value: 9901 }

static_resources:
  listeners:
  # The front door: an HTTP proxy that sends every request to the local_service cluster.
  - name: listener_0
    address:
      socket_address: { address: 127.0.0.1, port_value: 10000 }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress_http
          codec_type: AUTO
          route_config:
            name: local_route
            virtual_hosts:
            - name: local_service
              domains: ["*"]
              routes:
              - match: { prefix: "/" }
                route: { cluster: local_service }
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router

  # The stand-in upstream: answers every request itself with a direct response,
  # and writes one access-log line per request to stdout.
  - name: listener_1
    address:
      socket_address: { address: 127.0.0.1, port_value: 10001 }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: local_upstream
          codec_type: AUTO
          access_log:
          - name: envoy.access_loggers.stdout
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog
          route_config:
            name: hello_route
            virtual_hosts:
            - name: hello
              domains: ["*"]
              routes:
              - match: { prefix: "/" }
                direct_response:
                  status: 200
                  body: { inline_string: "Hello from moorline\\n" }
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router

  clusters:
  # listener_1 seen as an upstream service.
  - name: local_service
    type: STATIC
    connect_timeout: 1s
    lb_policy: ROUND_ROBIN
    load_assignment:
      cluster_name: local_service
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: { address: 127.0.0.1, port_value: 10001 }
"""
