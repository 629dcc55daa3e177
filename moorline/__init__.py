"""moorline: a service-mesh sidecar proxy configured with Envoy's v3 API."""

__version__ = "0.1.0"
