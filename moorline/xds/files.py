"""LDS, CDS and RDS from watched files: ``ConfigSource.path_config_source`` (and the deprecated
``path``), as in Envoy's dynamic-config-fs example. (RDS: an HCM's ``rds`` names its file and
``route_config_name``; ``proxy.hcm`` drives its route-config provider through this module.)

A file holds one state-of-the-world discovery response in YAML or JSON::

    version_info: "3"
    resources:
    - "@type": type.googleapis.com/envoy.config.listener.v3.Listener
      name: listener_0
      ...

Each load is all or nothing, the way a control plane's update is ACKed or NACKed:

* every resource is parsed and compiled first; a bad one (a field error, a wrong ``@type``, a
  duplicate name, a static resource's name) rejects the whole file, counts ``update_rejected``,
  logs the file and field path, and the running configuration stays as it was (the last good
  version keeps serving);
* otherwise the dynamic resources the file no longer names are removed (state of the world)
  and the resources applied through the managers' public API (``add_or_update``: unchanged
  resources are kept as they run, changed ones replaced without dropping traffic), then
  ``update_success`` and ``version`` count it.

The file is polled (``net.secrets.FileWatcher``: mtime, size and inode, so an atomic rename is
seen, which is how Envoy's example updates its files). At start-up a bad file is a
configuration error (exit 2 naming the file and field path): there is no last good version yet.

Stats, under Envoy's names: ``listener_manager.lds.*`` and ``cluster_manager.cds.*`` with
``update_attempt``, ``update_success``, ``update_rejected``, ``update_failure`` (the file cannot
be read) and the gauge ``version`` (a 64-bit hash of ``version_info``, as Envoy's).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from typing import Any, Protocol

from moorline.config.errors import ConfigError
from moorline.config.loader import load_document, parse_message
from moorline.config.util import opt_duration_s
from moorline.net.secrets import FileWatcher
from moorline.observability.stats import Store

log = logging.getLogger("moorline.xds")

LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ROUTE_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
ENDPOINT_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
DEFAULT_INITIAL_FETCH_TIMEOUT = 15.0


class ResourceManager(Protocol):
    """What a subscription drives: ``net.listener_manager.ListenerManager`` and
    ``upstream.manager.ClusterManager`` both have this shape."""

    def compile(self, proto: Any, path: str = "") -> Any: ...

    def add_or_update(self, proto: Any, path: str = "", version_info: str = "") -> Any: ...

    def remove(self, name: str) -> bool: ...

    def __iter__(self) -> Any: ...


def version_hash(version_info: str) -> int:
    """The ``version`` gauge: a 64-bit hash of ``version_info`` (0 for none)."""
    if not version_info:
        return 0
    return int.from_bytes(hashlib.blake2b(version_info.encode(), digest_size=8).digest(), "big") >> 1


def check_resources(
    manager: ResourceManager, protos: list[Any], name_field: str = "name", required_name: str | None = None
) -> dict[str, Any]:
    """Validate one state-of-the-world update before anything changes: names present and
    unique, each resource compiles (``ConfigError`` with ``resources[i]`` paths). Returns what
    was compiled, by name, for ``apply_resources`` to install without compiling again; a
    resource equal to the one the manager runs is not compiled at all (a control plane resends
    every resource of a type on each change)."""
    names: set[str] = set()
    compiled: dict[str, Any] = {}
    running = getattr(manager, "get", None)
    for i, proto in enumerate(protos):
        rpath = f"resources[{i}]"
        name = getattr(proto, name_field)
        if not name:
            raise ConfigError(f"{rpath}.{name_field}", "a resource needs a name")
        if name in names:
            raise ConfigError(f"{rpath}.{name_field}", f"duplicate name {name!r}")
        names.add(name)
        cur = running(name) if running is not None else None
        if cur is not None and getattr(cur, "added_via_api", True) is False:
            # (refused here, not by add_or_update: the resources before it would be applied)
            raise ConfigError(
                f"{rpath}.{name_field}", f"{name!r} is static (static_resources) and cannot be updated"
            )
        if cur is not None and getattr(cur, "added_via_api", False) and getattr(cur, "proto", None) == proto:
            continue
        compiled[name] = manager.compile(proto, rpath)
    if required_name is not None and required_name not in names:
        raise ConfigError("resources", f"no resource named {required_name!r}")
    return compiled


def apply_resources(
    manager: ResourceManager,
    protos: list[Any],
    version: str,
    name_field: str = "name",
    compiled: dict[str, Any] | None = None,
) -> None:
    """Apply a checked update: remove the dynamic resources (active or warming) it no longer
    names (state of the world), then ``add_or_update`` each resource (with what
    ``check_resources`` compiled, for managers that take it: ``takes_compiled``). Removals go
    first, as in Envoy: an address a removed listener held is free for one the update adds."""
    wanted = {getattr(p, name_field) for p in protos}
    for res in list(manager):
        if getattr(res, "added_via_api", False) and res.name not in wanted:
            manager.remove(res.name)
    for name in list(getattr(manager, "warming", ())):
        if name not in wanted:  # (a warming resource the new state no longer names)
            manager.remove(name)
    if compiled and getattr(manager, "takes_compiled", False):
        for i, proto in enumerate(protos):
            c = compiled.get(getattr(proto, name_field))
            manager.add_or_update(proto, f"resources[{i}]", version, compiled=c)  # type: ignore[call-arg]
    else:
        for i, proto in enumerate(protos):
            manager.add_or_update(proto, f"resources[{i}]", version)


class FileSubscription:
    """One resource type (LDS or CDS) served from one file."""

    def __init__(
        self,
        path: str,
        type_url: str,
        message_cls: Any,
        manager: ResourceManager,
        stats: Store,
        stat_prefix: str,
        field_path: str,
        required_name: str | None = None,
        name_field: str = "name",
    ) -> None:
        self.path = path
        self.name_field = name_field  # ClusterLoadAssignment: cluster_name
        # RDS: the one resource the subscriber asked for must be in the file.
        self.required_name = required_name
        self.type_url = type_url
        self.message_cls = message_cls
        self.manager = manager
        self.field_path = field_path  # where the bootstrap names this source, for messages
        self.version_info = ""
        self.last_error: str | None = None
        self.loaded_key: tuple[int, int, int] | None = None  # (mtime, size, inode) of the last read
        self._compiled: dict[str, Any] = {}  # what the last read compiled, for its apply
        self._attempt = stats.counter(f"{stat_prefix}.update_attempt")
        self._success = stats.counter(f"{stat_prefix}.update_success")
        self._rejected = stats.counter(f"{stat_prefix}.update_rejected")
        self._failure = stats.counter(f"{stat_prefix}.update_failure")
        self._version = stats.gauge(f"{stat_prefix}.version")

    # -- loading ------------------------------------------------------------------------------
    def _read(self) -> tuple[str, list[Any]]:
        """The file's version and parsed resources; ``ConfigError`` (with this file as its
        source) for anything wrong in it, ``OSError`` when it cannot be read."""
        with open(self.path, encoding="utf-8") as f:
            st = os.fstat(f.fileno())
            self.loaded_key = (st.st_mtime_ns, st.st_size, st.st_ino)
            text = f.read()
        try:
            doc = load_document(text, self.path)
            version = doc.get("version_info", "")
            if not isinstance(version, str):
                raise ConfigError("version_info", "must be a string")
            items = doc.get("resources", [])
            if not isinstance(items, list):
                raise ConfigError("resources", "must be a list")
            unknown = sorted(set(doc) - {"version_info", "resources", "type_url", "nonce"})
            if unknown:
                raise ConfigError(unknown[0], "unknown field of a discovery response")
            protos = []
            for i, item in enumerate(items):
                rpath = f"resources[{i}]"
                if not isinstance(item, Mapping):
                    raise ConfigError(rpath, "must be a mapping")
                if item.get("@type") != self.type_url:
                    raise ConfigError(
                        f"{rpath}.@type", f"expected {self.type_url}, got {item.get('@type')!r}"
                    )
                protos.append(parse_message(item, self.message_cls, rpath))
            self._compiled = check_resources(self.manager, protos, self.name_field, self.required_name)
        except ConfigError as e:
            raise e.with_source(self.path) from None
        return version, protos

    def _apply(self, version: str, protos: list[Any]) -> None:
        try:
            compiled, self._compiled = self._compiled, {}
            apply_resources(self.manager, protos, version, self.name_field, compiled)
        except ConfigError as e:
            raise e.with_source(self.path) from None
        self.version_info = version
        self._version.value = version_hash(version)

    def load_initial(self) -> None:
        """At start-up: a bad or unreadable file is a configuration error."""
        self._attempt.value += 1
        try:
            version, protos = self._read()
        except OSError as e:
            self._failure.value += 1
            raise ConfigError(self.field_path, f"cannot read {self.path}: {e.strerror or e}") from None
        self._apply(version, protos)
        self._success.value += 1

    def reload(self) -> bool:
        """The file changed: apply it, or reject it and keep serving the last good version.
        Returns whether it was applied."""
        self._attempt.value += 1
        try:
            version, protos = self._read()
            self._apply(version, protos)
        except OSError as e:
            self._failure.value += 1
            self.last_error = f"{self.path}: {e.strerror or e}"
            log.warning("%s update failed: cannot read %s (%s)", self.field_path, self.path, e.strerror or e)
            return False
        except ConfigError as e:
            self._rejected.value += 1
            self.last_error = str(e)
            log.warning(
                "%s update rejected, version %r keeps serving: %s", self.field_path, self.version_info, e
            )
            return False
        except Exception as e:  # a bug of ours: counted and logged, the watcher goes on
            self._failure.value += 1
            self.last_error = f"{self.path}: {type(e).__name__}: {e}"
            log.exception("%s update from %s failed", self.field_path, self.path)
            return False
        self._success.value += 1
        self.last_error = None
        log.info("%s: version %r applied from %s", self.field_path, version, self.path)
        return True

    def _changed(self) -> None:
        self.reload()

    def watch(self, watcher: FileWatcher) -> None:
        watcher.watch(self.path, self._changed)
        # A change between the last read and the watch's first look would go unseen.
        try:
            st = os.stat(self.path)
        except OSError:
            return
        if (st.st_mtime_ns, st.st_size, st.st_ino) != self.loaded_key:
            self.reload()


class EdsTarget:
    """An EDS cluster (``upstream.cluster.Cluster``) as a ``ResourceManager``: the assignment
    named after its ``eds_service_name`` replaces its hosts (the others in the file are only
    validated)."""

    def __init__(self, cluster: Any) -> None:
        self.cluster = cluster

    def compile(self, proto: Any, path: str = "") -> Any:
        self.cluster.check_load_assignment(proto, path)
        return proto

    def add_or_update(self, proto: Any, path: str = "", version_info: str = "") -> Any:
        if proto.cluster_name == self.cluster.eds_service_name:
            self.cluster.apply_load_assignment(proto, path)
        return None

    def remove(self, name: str) -> bool:
        return False

    def __iter__(self) -> Any:
        return iter(())


class EdsAdsTarget:
    """An EDS cluster's assignment over gRPC xDS (``xds.ads.NamedTarget``), kept on the cluster.
    ``init`` is what the cluster warms on: done by the first assignment, or by the source's
    initial fetch timeout (the cluster then serves with no hosts)."""

    def __init__(self, cluster: Any, store: Store) -> None:
        from moorline.config.warming import InitTarget

        self.cluster = cluster
        pre = f"cluster.{cluster.stat_name}"
        self.rejected = store.counter(f"{pre}.update_rejected")
        self.version = store.gauge(f"{pre}.version")
        self.init = InitTarget(f"eds {cluster.eds_service_name}")

    def check(self, proto: Any, path: str) -> None:
        if self.cluster.retired:
            return  # (see apply)
        try:
            self.cluster.check_load_assignment(proto, path)
        except ConfigError:
            self.rejected.value += 1
            raise

    def apply(self, proto: Any, version_info: str) -> None:
        if self.cluster.retired:
            # Replaced, removed or dropped while warming, and alive until its last request ends
            # (it shares its stats with the cluster in service): it takes no more assignments.
            return
        self.cluster.update_load_assignment(proto)  # (counts update_attempt / update_success)
        self.version.value = version_hash(version_info)
        self.init.done()

    def on_fetch_timeout(self) -> None:
        self.init.timed_out = True
        self.init.done()


class FileSources:
    """The file-based subscriptions of one server (CDS before LDS, as Envoy initializes them),
    and the watcher that polls their files."""

    def __init__(self, store: Store, watcher: FileWatcher | None = None) -> None:
        self.store = store
        self.grpc: Any = None  # xds.ads.XdsClients, when a server runs (EDS over ADS or gRPC)
        self.watcher = watcher or FileWatcher()
        self.subscriptions: list[FileSubscription] = []

    def add(self, sub: FileSubscription) -> None:
        self.subscriptions.append(sub)

    def load_initial(self) -> None:
        for sub in sorted(self.subscriptions, key=lambda s: s.type_url != CLUSTER_TYPE):
            sub.load_initial()

    def eds_source(self, cluster: Any, eds_config: Any, path: str) -> Any:
        """``upstream.api.EdsSourceFactory``: an EDS cluster whose ``eds_config`` is a file
        (``FileSubscription``) or ADS (``EdsAdsTarget``, asked for on the server's ADS stream)
        follows the assignment named after its service (stats ``cluster.<name>.*``:
        ``update_attempt``, ``update_success``, ``update_rejected``, ``update_failure``,
        ``version``)."""
        from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment

        file = config_source_path(eds_config)
        if file is None:
            client = self.grpc.for_source(eds_config, ENDPOINT_TYPE, path) if self.grpc is not None else None
            if client is None:
                return None
            target = EdsAdsTarget(cluster, self.store)
            cluster.init_targets.append(target.init)  # (after its TLS secrets, if any)
            client.subscribe(
                ENDPOINT_TYPE,
                ClusterLoadAssignment,
                cluster.eds_service_name,
                target,
                initial_fetch_timeout(eds_config),
            )
            return target
        sub = FileSubscription(
            file,
            ENDPOINT_TYPE,
            ClusterLoadAssignment,
            EdsTarget(cluster),
            self.store,
            f"cluster.{cluster.stat_name}",
            path,
            required_name=cluster.eds_service_name,
            name_field="cluster_name",
        )
        sub.load_initial()
        sub.watch(self.watcher)
        return sub

    def start(self, loop: Any) -> None:
        for sub in self.subscriptions:
            sub.watch(self.watcher)
        self.watcher.start(loop)  # (EDS files are watched from their clusters' creation)

    def stop(self) -> None:
        self.watcher.stop()


def config_source_path(source: Any) -> str | None:
    """The file of a ``ConfigSource`` that names one (``path_config_source.path`` or the
    deprecated ``path``), else None."""
    which = source.WhichOneof("config_source_specifier")
    if which == "path_config_source":
        return str(source.path_config_source.path)
    if which == "path":
        return str(source.path)
    return None


def initial_fetch_timeout(source: Any) -> float:
    """A ``ConfigSource``'s ``initial_fetch_timeout`` in seconds (15 by default, 0: never)."""
    if source is None:
        return DEFAULT_INITIAL_FETCH_TIMEOUT
    t = opt_duration_s(source, "initial_fetch_timeout", DEFAULT_INITIAL_FETCH_TIMEOUT)
    assert t is not None
    return t


def is_file_source(source: Any) -> bool:
    return config_source_path(source) is not None


__all__ = [
    "CLUSTER_TYPE",
    "ENDPOINT_TYPE",
    "LISTENER_TYPE",
    "ROUTE_TYPE",
    "EdsAdsTarget",
    "EdsTarget",
    "FileSources",
    "FileSubscription",
    "ResourceManager",
    "apply_resources",
    "check_resources",
    "config_source_path",
    "initial_fetch_timeout",
    "is_file_source",
    "version_hash",
]
