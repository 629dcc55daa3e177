"""``moorline xds-serve DIR``: a control plane for a small mesh, from a directory of files.

Every ``*.yaml`` / ``*.yml`` / ``*.json`` file in ``DIR`` holds resources, in the shape of the
``path_config_source`` files (``resources:``, each with its ``@type``; ``version_info`` is not
needed). They are served to every node. Files under ``DIR/nodes/<node id>/`` are served only to
the sidecar whose ``node.id`` is that name, in place of the shared resources of the same types.

The directory is polled (twice a second); a change is pushed to the connected sidecars (state of
the world or delta, ADS or per-type streams, whatever each asks for). A file that does not parse
or holds a resource that does not validate is refused whole: the last good resources keep being
served and the error (file and field path) is printed. Each type's version is a hash of what it
holds, so an unchanged type is not pushed again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from moorline.config.errors import ConfigError
from moorline.config.loader import load_document, parse_message
from moorline.xds.files import CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE
from moorline.xds.server import XdsServer

log = logging.getLogger("moorline.xds.serve")

SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
SUFFIXES = (".yaml", ".yml", ".json")
POLL = 0.5


def _classes() -> dict[str, Any]:
    from envoy.config.cluster.v3.cluster_pb2 import Cluster
    from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment
    from envoy.config.listener.v3.listener_pb2 import Listener
    from envoy.config.route.v3.route_pb2 import RouteConfiguration
    from envoy.extensions.transport_sockets.tls.v3.secret_pb2 import Secret

    return {
        LISTENER_TYPE: Listener,
        CLUSTER_TYPE: Cluster,
        ROUTE_TYPE: RouteConfiguration,
        ENDPOINT_TYPE: ClusterLoadAssignment,
        SECRET_TYPE: Secret,
    }


Snapshot = dict[str, list[Any]]  # type URL -> resources


def load_dir(root: Path) -> dict[str, Snapshot]:
    """``{"": shared, "<node id>": that node's}``; ``ConfigError`` (with the file) on anything
    wrong."""
    classes = _classes()
    out: dict[str, Snapshot] = {}
    groups = [("", root)]
    nodes = root / "nodes"
    if nodes.is_dir():
        groups += [(d.name, d) for d in sorted(nodes.iterdir()) if d.is_dir()]
    for node, d in groups:
        snap: Snapshot = {t: [] for t in classes}
        names: dict[tuple[str, str], str] = {}
        for f in sorted(p for p in d.iterdir() if p.is_file() and p.suffix in SUFFIXES):
            try:
                doc = load_document(f.read_text(encoding="utf-8"), str(f))
                items = doc.get("resources") if isinstance(doc, Mapping) else None
                if not isinstance(items, list):
                    raise ConfigError("resources", "a list of resources (each with its @type) is required")
                for i, item in enumerate(items):
                    rpath = f"resources[{i}]"
                    t = item.get("@type") if isinstance(item, Mapping) else None
                    cls = classes.get(str(t))
                    if cls is None:
                        raise ConfigError(f"{rpath}.@type", f"not an xDS resource type served here: {t!r}")
                    msg = parse_message({k: v for k, v in item.items() if k != "@type"}, cls, rpath)
                    name = getattr(msg, "cluster_name", "") if t == ENDPOINT_TYPE else msg.name
                    if not name:
                        raise ConfigError(rpath, "a resource needs a name")
                    other = names.get((str(t), name))
                    if other is not None:
                        raise ConfigError(f"{rpath}.name", f"{name!r} is also in {other}")
                    names[(str(t), name)] = f.name
                    snap[str(t)].append(msg)
            except ConfigError as e:
                raise e.with_source(str(f)) from None
            except OSError as e:
                raise ConfigError("", f"cannot read: {e.strerror or e}").with_source(str(f)) from None
        out[node] = snap
    return out


def _version(resources: list[Any]) -> str:
    h = hashlib.sha256()
    for r in resources:
        h.update(r.SerializeToString(deterministic=True))
    return h.hexdigest()[:12]


def _dir_key(root: Path) -> tuple[Any, ...]:
    key = []
    for dirpath, _dirs, files in os.walk(root):
        for f in sorted(files):
            try:
                st = os.stat(os.path.join(dirpath, f))
            except OSError:
                continue
            key.append((dirpath, f, st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(sorted(key))


class DirServer:
    """The directory, served: ``start()``, then ``poll()`` (or ``run()`` until ``stop()``)."""

    def __init__(self, root: Path, server: XdsServer) -> None:
        self.root = root
        self.server = server
        self.versions: dict[tuple[str, str], str] = {}
        self.last_error: str | None = None
        self._key: tuple[Any, ...] | None = None
        self._stop = threading.Event()

    def poll(self) -> bool:
        """Load and push when the directory changed; True when something was pushed."""
        key = _dir_key(self.root)
        if key == self._key:
            return False
        self._key = key
        try:
            snaps = load_dir(self.root)
        except ConfigError as e:
            self.last_error = str(e)
            log.error("refused (the last good resources are still served): %s", e)
            return False
        self.last_error = None
        pushed = False
        for node, snap in snaps.items():
            for type_url, resources in snap.items():
                if node and not resources:
                    continue  # (a node's own files replace only the types they hold)
                v = _version(resources)
                if self.versions.get((node, type_url)) == v:
                    continue
                self.versions[(node, type_url)] = v
                self.server.push(type_url, v, resources, node=node)
                pushed = True
                log.info(
                    "%s%s: version %s, %d resources",
                    f"node {node}: " if node else "",
                    type_url.rsplit(".", 1)[-1],
                    v,
                    len(resources),
                )
        return pushed

    def run(self) -> None:
        while not self._stop.wait(POLL):
            self.poll()

    def stop(self) -> None:
        self._stop.set()


def control_plane(listen: str, unix: str | None) -> XdsServer:
    """The server ``main`` runs: on ``listen`` ("host:port") or the Unix socket ``unix``. It runs
    for good, so it keeps no record of the requests it answers (the test server's does)."""
    host, _, port = listen.rpartition(":")
    return XdsServer(
        host=host.strip("[]") or "127.0.0.1", port=int(port or 0), unix_path=unix, record_requests=False
    )


def main(directory: str, listen: str, unix: str | None) -> int:
    import signal

    root = Path(directory)
    if not root.is_dir():
        print(f"moorline xds-serve: {directory}: not a directory", flush=True)
        return 2
    try:
        load_dir(root)
    except ConfigError as e:
        print(f"moorline xds-serve: {e}", flush=True)
        return 2
    server = control_plane(listen, unix)
    server.start()
    ds = DirServer(root, server)
    ds.poll()
    where = f"unix:{unix}" if unix else f"{server.host}:{server.port}"
    print(f"moorline xds-serve: serving {directory} on {where}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: ds.stop())
    signal.signal(signal.SIGINT, lambda *_: ds.stop())
    try:
        ds.run()
    finally:
        server.stop()
    return 0


__all__ = ["DirServer", "control_plane", "load_dir", "main"]
