"""Secrets for TLS: DataSources, the secrets manager, secret providers and file watching.

A TLS context (``moorline.net.tls``) never reads a certificate once and forgets where it came
from: it asks its *sources* (inline ``DataSource``s, named secrets, or SDS secret providers) and
watches every file it read. When one changes, the context is rebuilt; connections that are
already up keep the ``SSLContext`` they were accepted with, new ones get the new one. A rebuild
that fails (a certificate replaced before its key, a half-written file) keeps the old context and
is retried at the next change.

``SecretsManager`` (one per server, reached through ``BuildContext.secrets``) owns everything
here that outlives one context: named secrets (static from ``static_resources.secrets``, dynamic
through ``add_or_update`` / ``remove``), the SDS-file providers, the ``FileWatcher`` and the
SDS-over-gRPC hook. No module-level state.

Providers (``SecretProvider``): ``get()`` the current ``Secret`` proto (or ``None`` while none is
known), ``subscribe(callback)`` to hear about changes (callbacks are held weakly, so a listener that
went away stops being rebuilt). Implemented here:

- ``NamedSecretProvider``: a secret of the manager by name (an ``SdsSecretConfig`` without
  ``sds_config``); an ``add_or_update`` of that name notifies it;
- ``FileSdsProvider``: ``sds_config.path_config_source`` (or the deprecated ``sds_config.path``):
  a file holding a ``DiscoveryResponse`` (YAML or JSON) whose ``resources`` are ``Secret``s; the
  file is re-read when it changes;
- ``StaticSecretProvider``: a fixed ``Secret`` proto.

SDS over gRPC (``api_config_source`` / ``ads``) plugs in through
``SecretsManager.register_sds_client(factory)``; without one such configs are a ``ConfigError``
naming the field.

File watching polls ``os.stat`` (mtime, size, inode) once per ``POLL_INTERVAL`` seconds on the
event loop: no inotify dependency, and atomic renames (Kubernetes' ``..data`` symlink swaps) are
seen as changes of the inode. Bound: one stat per watched path per interval.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import weakref
from collections.abc import Callable
from typing import Any

from moorline.config.errors import ConfigError

log = logging.getLogger("moorline.secrets")

POLL_INTERVAL = 1.0
SECRET_TYPE = "envoy.extensions.transport_sockets.tls.v3.Secret"
MAX_DATA_SOURCE = 1024 * 1024  # a certificate, key, CA bundle or CRL larger than this is refused


# --- DataSource ----------------------------------------------------------------------------------


def data_source_file(ds: Any) -> str | None:
    """The file a DataSource names, or None when it is inline."""
    return ds.filename if ds.WhichOneof("specifier") == "filename" else None


def read_data_source(ds: Any, path: str) -> bytes:
    """The bytes of an ``envoy.config.core.v3.DataSource`` (filename, inline or env variable)."""
    kind = ds.WhichOneof("specifier")
    if kind == "filename":
        try:
            with open(ds.filename, "rb") as f:
                data = f.read(MAX_DATA_SOURCE + 1)
        except OSError as e:
            raise ConfigError(f"{path}.filename", f"cannot read {ds.filename!r}: {e.strerror or e}") from None
        if len(data) > MAX_DATA_SOURCE:
            raise ConfigError(f"{path}.filename", f"{ds.filename!r} is larger than {MAX_DATA_SOURCE} bytes")
        return data
    if kind == "inline_string":
        return ds.inline_string.encode()
    if kind == "inline_bytes":
        return bytes(ds.inline_bytes)
    if kind == "environment_variable":
        v = os.environ.get(ds.environment_variable)
        if v is None:
            raise ConfigError(
                f"{path}.environment_variable", f"environment variable {ds.environment_variable!r} is not set"
            )
        return v.encode()
    raise ConfigError(path, "one of filename, inline_string, inline_bytes, environment_variable is required")


# --- file watching -------------------------------------------------------------------------------


def _stat_key(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class FileWatcher:
    """Polls watched files and calls back (weakly held bound methods) when one changed."""

    def __init__(self, interval: float = POLL_INTERVAL) -> None:
        self.interval = interval
        self._files: dict[str, tuple[tuple[int, int, int] | None, list[weakref.WeakMethod[Any]]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None

    def watch(self, path: str, callback: Callable[[], None]) -> None:
        """Call ``callback`` (a bound method, held weakly) when ``path`` changes. Idempotent."""
        entry = self._files.get(path)
        if entry is None:
            entry = self._files[path] = (_stat_key(path), [])
        cbs = entry[1]
        for r in cbs:
            if r() == callback:
                return
        cbs.append(weakref.WeakMethod(callback))  # type: ignore[arg-type]
        self._ensure_timer()

    def watched(self) -> list[str]:
        return list(self._files)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Poll on ``loop`` (the server's). Called by listeners and upstream connects."""
        if self._loop is loop and self._handle is not None:
            return
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._loop = loop
        self._ensure_timer()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._loop = None

    def _ensure_timer(self) -> None:
        loop = self._loop
        if loop is None:
            try:
                loop = self._loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # started later by start(loop)
        if loop.is_closed():
            self._loop = None
            self._handle = None
            return
        if self._handle is None and self._files:
            self._handle = loop.call_later(self.interval, self._tick)

    def _tick(self) -> None:
        self._handle = None
        try:
            self.poll_now()
        except Exception:  # a failing callback must not stop the watcher
            log.exception("secret file watcher failed")
        self._ensure_timer()

    def poll_now(self) -> int:
        """Check every watched file now; returns how many changed. Callbacks run once each."""
        to_call: list[Callable[[], None]] = []
        changed = 0
        for path in list(self._files):
            old, cbs = self._files[path]
            live = [r for r in cbs if r() is not None]
            if not live:
                del self._files[path]
                continue
            new = _stat_key(path)
            self._files[path] = (new, live)
            if new != old and new is not None:
                changed += 1
                for r in live:
                    cb = r()
                    if cb is not None and cb not in to_call:
                        to_call.append(cb)
        for cb in to_call:
            try:
                cb()
            except Exception:
                log.exception("secret reload failed")
        return changed


# --- providers -----------------------------------------------------------------------------------


class SecretProvider:
    """Interface: the current ``Secret`` and change notification. Subclass for new sources."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._subs: list[weakref.WeakMethod[Any]] = []

    def get(self) -> Any | None:
        raise NotImplementedError

    def subscribe(self, callback: Callable[[], None]) -> None:
        """``callback`` (a bound method, held weakly) runs after the secret changed."""
        self._subs.append(weakref.WeakMethod(callback))  # type: ignore[arg-type]

    def _notify(self) -> None:
        live = []
        for r in self._subs:
            cb = r()
            if cb is not None:
                live.append(r)
                cb()
        self._subs = live


class StaticSecretProvider(SecretProvider):
    """A fixed ``Secret`` (for callers that hold the proto themselves)."""

    def __init__(self, secret: Any) -> None:
        super().__init__(secret.name)
        self._secret = secret

    def get(self) -> Any | None:
        return self._secret


class NamedSecretProvider(SecretProvider):
    """A secret of the ``SecretsManager`` by name (``static_resources.secrets`` or one added
    through the API): ``get()`` reads the manager's current one, so an update reaches every TLS
    context that uses the name."""

    def __init__(self, manager: SecretsManager, name: str) -> None:
        super().__init__(name)
        self._manager = manager

    def get(self) -> Any | None:
        return self._manager.get(self.name)


class FileSdsProvider(SecretProvider):
    """One named secret from an SDS file (a ``DiscoveryResponse`` of ``Secret`` resources)."""

    def __init__(self, file: str, name: str, path: str, watcher: FileWatcher) -> None:
        super().__init__(name)
        self.file = file
        self.version_info = ""
        self.last_updated = 0.0
        self._secret = self._read(path)  # ConfigError at build time when missing or invalid
        watcher.watch(file, self._on_file_changed)

    def get(self) -> Any | None:
        return self._secret

    def _read(self, path: str) -> Any:
        from moorline.config.loader import load_document, parse_message, unpack_any

        try:
            with open(self.file, encoding="utf-8") as f:
                text = f.read(MAX_DATA_SOURCE + 1)
        except OSError as e:
            raise ConfigError(path, f"cannot read SDS file {self.file!r}: {e.strerror or e}") from None
        from envoy.service.discovery.v3 import discovery_pb2

        doc = load_document(text, self.file)
        resp = parse_message(doc, discovery_pb2.DiscoveryResponse, self.file)
        for i, res in enumerate(resp.resources):
            msg = unpack_any(res, f"{self.file}: resources[{i}]")
            if getattr(getattr(msg, "DESCRIPTOR", None), "full_name", "") != SECRET_TYPE:
                continue
            if getattr(msg, "name", None) == self.name:
                self.version_info = resp.version_info
                self.last_updated = time.time()
                return msg
        raise ConfigError(path, f"SDS file {self.file!r} has no secret named {self.name!r}")

    def _on_file_changed(self) -> None:
        try:
            new = self._read("sds_config")
        except ConfigError as e:
            log.warning("SDS file %s: keeping the previous secret %r: %s", self.file, self.name, e)
            return
        if new != self._secret:
            self._secret = new
            log.info("SDS file %s: secret %r updated", self.file, self.name)
            self._notify()


SdsClientFactory = Callable[[Any, str, Any, str], SecretProvider]


class SecretEntry:
    """A named secret the manager holds, with what ``/config_dump`` shows about it."""

    __slots__ = ("last_updated", "secret", "static", "version_info")

    def __init__(self, secret: Any, static: bool, version_info: str = "") -> None:
        self.secret = secret
        self.static = static
        self.version_info = version_info
        self.last_updated = time.time()


class SecretsManager:
    """The server's secrets: named ``Secret``s (static ones from ``static_resources.secrets``,
    dynamic ones added through this API, which SDS over xDS will drive), SDS-file providers, the
    file watcher that polls every certificate and SDS file, and the SDS-over-gRPC hook.

    TLS contexts look secrets up only through the manager of their build context
    (``provider_for``); nothing is kept at module level, so two servers in one process (or a
    test next to a server) never see each other's secrets."""

    def __init__(self, watcher: FileWatcher | None = None) -> None:
        self.watcher = watcher if watcher is not None else FileWatcher()
        self._secrets: dict[str, SecretEntry] = {}
        self._named: dict[str, NamedSecretProvider] = {}
        # SDS files: one provider per (file, secret name), shared by the contexts using it and
        # dropped with the last of them.
        self._file_providers: weakref.WeakValueDictionary[tuple[str, str], FileSdsProvider] = (
            weakref.WeakValueDictionary()
        )
        self._sds_client: SdsClientFactory | None = None

    # -- named secrets ----------------------------------------------------------------------

    def add_static(self, secret: Any, path: str = "") -> None:
        """A ``static_resources.secrets`` entry; a duplicate name -> ``ConfigError(path.name)``."""
        if not secret.name:
            raise ConfigError(f"{path}.name" if path else "name", "secret name is required")
        if secret.name in self._secrets:
            raise ConfigError(f"{path}.name" if path else "name", f"duplicate secret name {secret.name!r}")
        self._secrets[secret.name] = SecretEntry(secret, static=True)

    def add_or_update(self, secret: Any, version_info: str = "") -> bool:
        """Add or replace a dynamic secret by name; True when it changed. TLS contexts using the
        name rebuild (a rebuild that fails keeps their previous certificates). A static name ->
        ``ConfigError``."""
        name = secret.name
        if not name:
            raise ConfigError("name", "secret name is required")
        old = self._secrets.get(name)
        if old is not None and old.static:
            raise ConfigError("name", f"secret {name!r} is static (static_resources) and cannot be updated")
        if old is not None and old.secret == secret:
            old.version_info = version_info
            return False
        self._secrets[name] = SecretEntry(secret, static=False, version_info=version_info)
        p = self._named.get(name)
        if p is not None:
            p._notify()
        return True

    def remove(self, name: str) -> bool:
        """Forget a dynamic secret. Contexts built from it keep their certificates until the
        name comes back. False when there is no dynamic secret of that name."""
        e = self._secrets.get(name)
        if e is None or e.static:
            return False
        del self._secrets[name]
        return True

    def get(self, name: str) -> Any | None:
        e = self._secrets.get(name)
        return e.secret if e is not None else None

    def entries(self) -> list[tuple[str, SecretEntry]]:
        return sorted(self._secrets.items())

    def file_providers(self) -> list[FileSdsProvider]:
        """The SDS-file secrets in use (for ``/config_dump``'s dynamic secrets)."""
        return [self._file_providers[k] for k in sorted(self._file_providers.keys())]

    def xds_providers(self) -> list[Any]:
        """The secrets asked for over SDS (gRPC), received or not (for ``/config_dump``)."""
        providers = getattr(self._sds_client, "providers", None) or {}
        return [p for _k, p in sorted(list(providers.items()), key=lambda kv: kv[0][1])]

    # -- lookups by TLS contexts ------------------------------------------------------------

    def register_sds_client(self, factory: SdsClientFactory | None) -> None:
        """Plug in SDS over gRPC: ``factory(config_source, secret_name, ctx, path) -> SecretProvider``."""
        self._sds_client = factory

    def provider_for(self, sds: Any, ctx: Any, path: str) -> SecretProvider:
        """A provider for an ``SdsSecretConfig`` (``path`` is its field path)."""
        if not sds.name:
            raise ConfigError(f"{path}.name", "secret name is required")
        if not sds.HasField("sds_config"):
            if sds.name not in self._secrets:
                raise ConfigError(
                    f"{path}.name", f"no static secret named {sds.name!r} (static_resources.secrets)"
                )
            p = self._named.get(sds.name)
            if p is None:
                p = self._named[sds.name] = NamedSecretProvider(self, sds.name)
            return p
        cs = sds.sds_config
        kind = cs.WhichOneof("config_source_specifier")
        if kind in ("path", "path_config_source"):
            file = cs.path if kind == "path" else cs.path_config_source.path
            if not file:
                raise ConfigError(f"{path}.sds_config.{kind}", "path is required")
            key = (file, sds.name)
            fp = self._file_providers.get(key)
            if fp is None:
                fp = FileSdsProvider(file, sds.name, f"{path}.sds_config.{kind}", self.watcher)
                self._file_providers[key] = fp
            return fp
        if kind in ("api_config_source", "ads") and self._sds_client is not None:
            return self._sds_client(cs, sds.name, ctx, f"{path}.sds_config")
        if kind in ("api_config_source", "ads"):
            raise ConfigError(
                f"{path}.sds_config.{kind}",
                f"SDS over gRPC is not supported yet (secret {sds.name!r}); "
                "use sds_config.path_config_source or inline certificates",
            )
        raise ConfigError(f"{path}.sds_config", f"config source {kind!r} is not supported for secrets")

    # -- lifecycle --------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Poll the watched files on ``loop`` (the server's)."""
        self.watcher.start(loop)

    def stop(self) -> None:
        self.watcher.stop()


def secrets_of(ctx: Any) -> SecretsManager:
    """The secrets manager of a build context. A context without one (a listener or cluster
    compiled on its own, as in unit tests) gets a private manager of its own, kept on it."""
    sm = getattr(ctx, "secrets", None)
    if sm is None:
        sm = SecretsManager()
        try:
            ctx.secrets = sm
        except AttributeError:
            pass
    return sm  # type: ignore[no-any-return]


def provider_for(sds: Any, ctx: Any, path: str) -> SecretProvider:
    """``secrets_of(ctx).provider_for(sds, ctx, path)``."""
    return secrets_of(ctx).provider_for(sds, ctx, path)
