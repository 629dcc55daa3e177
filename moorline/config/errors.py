"""Configuration errors carry the field path and the source they came from."""

from __future__ import annotations


class ConfigError(Exception):
    """A configuration value that cannot be used.

    ``path`` is the field path in Envoy's proto field names, e.g.
    ``static_resources.clusters[0].load_assignment.endpoints[0]``.
    ``source`` is the file (or ``--config-yaml``, ``xds``) it came from.
    """

    def __init__(self, path: str, message: str, source: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.message = message
        self.source = source

    def with_source(self, source: str) -> ConfigError:
        if self.source is None:
            self.source = source
        return self

    def prefixed(self, prefix: str) -> ConfigError:
        """Return the same error with ``prefix`` put in front of its path."""
        if prefix:
            self.path = f"{prefix}.{self.path}" if self.path else prefix
        return self

    def __str__(self) -> str:
        where = f"{self.source}: " if self.source else ""
        path = f"{self.path}: " if self.path else ""
        return f"{where}{path}{self.message}"
