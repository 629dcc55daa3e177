"""TLS transport sockets: Envoy's ``DownstreamTlsContext`` / ``UpstreamTlsContext`` on Python ``ssl``.

Compilation (once, at config time; again when a watched certificate or SDS secret changes):

- ``compile_downstream(proto, ctx, path) -> DownstreamTls`` for a filter chain's
  ``transport_socket``; ``compile_upstream(proto, ctx, path) -> UpstreamTls`` for a cluster's.
  ``compile_transport_socket(ts, ctx, path, server=...)`` takes the ``TransportSocket`` wrapper
  and returns ``None`` for ``raw_buffer``.
- Clusters get theirs through ``moorline.net.upstream.UpstreamTransportFactory`` (the cluster
  manager calls it at compile time; the result is ``cluster.transport``).
- Secrets and watched files come from the build context's ``SecretsManager`` (``ctx.secrets``).

What maps onto OpenSSL through ``ssl.SSLContext``: certificates from files, inline strings/bytes
and SDS; several certificates chosen by SNI against their DNS SANs (``sni_callback`` switches the
connection to that certificate's context; the first certificate is the default); ALPN; TLS 1.0 -
1.3 bounds; TLS 1.2 cipher suites (Envoy's ``[a|b]`` equal-preference groups are flattened; TLS 1.3
suites are OpenSSL's fixed set); the first ECDH curve; client certificates (required or optional),
trusted CA, CRLs, SAN matching (checked on ``getpeercert()`` right after the handshake, before
any byte reaches a filter); ``disable_stateless_session_resumption``; ``require_sni``. Upstream:
``sni`` / ``auto_host_sni``, ALPN, server verification against a CA and SANs, client certificates.

Not possible with Python's ``ssl`` (a notice, or a ``ConfigError`` where ignoring would weaken
security): session ticket keys, key-type based certificate selection, SPKI/hash pinning,
``allow_expired_certificate``, private key providers, custom validators, OCSP stapling.

Serving: ``serve_accepted(loop, sock, info, protocol_factory)`` is what a terminal filter calls
with an accepted socket. With ``info.tls`` set it runs the handshake (uvloop's SSL protocol), fills
``info.negotiated_alpn`` / ``server_name`` / ``tls_version`` / ``peer_certificate``, checks SANs,
counts ``ssl.*`` stats, and only then calls ``protocol_factory()`` -- so the factory may pick a codec
by ``info.negotiated_alpn``. ``StreamRelay`` is tcp_proxy's userspace relay for connections whose
bytes must pass through TLS on either side (splice cannot see plaintext).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import ssl
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

from moorline.config.errors import ConfigError
from moorline.net.secrets import (
    FileWatcher,
    SecretProvider,
    data_source_file,
    provider_for,
    read_data_source,
    secrets_of,
)
from moorline.observability.stats import Counter, Scope, Store

log = logging.getLogger("moorline.tls")

DOWNSTREAM_TYPE = "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
UPSTREAM_TYPE = "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
RAW_BUFFER_TYPE = "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"
TLS_NAMES = ("envoy.transport_sockets.tls", "tls")
RAW_BUFFER_NAMES = ("envoy.transport_sockets.raw_buffer", "raw_buffer", "")
INTERNAL_UPSTREAM_TYPE = "envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport"

DEFAULT_HANDSHAKE_TIMEOUT = 60.0  # asyncio's default; Envoy has none unless transport_socket_connect_timeout

_VERSIONS = {
    1: ssl.TLSVersion.TLSv1,
    2: ssl.TLSVersion.TLSv1_1,
    3: ssl.TLSVersion.TLSv1_2,
    4: ssl.TLSVersion.TLSv1_3,
}
# Envoy's defaults: servers TLS 1.2-1.3, clients TLS 1.2-1.2.
_SERVER_DEFAULT = (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3)
_CLIENT_DEFAULT = (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2)
# Envoy's default TLS 1.2 cipher list (BoringSSL names; OpenSSL spells these the same).
_DEFAULT_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-RSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384"
)
_CURVES = {"P-256": "prime256v1", "P-384": "secp384r1", "P-521": "secp521r1", "X25519": "X25519"}
# SubjectAltNameMatcher.SanType -> the type names getpeercert() uses.
_SAN_TYPES = {1: "email", 2: "DNS", 3: "URI", 4: "IP Address"}


# --- stats ---------------------------------------------------------------------------------------


class TlsStats:
    """Envoy's ``ssl.*`` stats under a listener's or a cluster's scope."""

    __slots__ = (
        "_dyn",
        "connection_error",
        "fail_verify_error",
        "fail_verify_no_cert",
        "fail_verify_san",
        "handshake",
        "no_certificate",
        "scope",
        "session_reused",
    )

    def __init__(self, scope: Scope) -> None:
        self.scope = scope
        c = scope.counter
        self.handshake: Counter = c("handshake")
        self.connection_error: Counter = c("connection_error")
        self.fail_verify_no_cert: Counter = c("fail_verify_no_cert")
        self.fail_verify_san: Counter = c("fail_verify_san")
        self.fail_verify_error: Counter = c("fail_verify_error")
        self.no_certificate: Counter = c("no_certificate")
        self.session_reused: Counter = c("session_reused")
        self._dyn: dict[str, Counter] = {}

    def dyn(self, name: str) -> Counter:
        """``versions.TLSv1.3``, ``ciphers.<name>``: created on first use, cached."""
        ctr = self._dyn.get(name)
        if ctr is None:
            ctr = self._dyn[name] = self.scope.counter(name)
        return ctr

    def on_handshake(self, sslobj: Any) -> None:
        self.handshake.value += 1
        v = sslobj.version()
        if v:
            self.dyn("versions." + v).value += 1
        c = sslobj.cipher()
        if c:
            self.dyn("ciphers." + c[0]).value += 1
        if getattr(sslobj, "session_reused", False):
            self.session_reused.value += 1

    def on_failure(self, exc: BaseException | None) -> None:
        reason = getattr(exc, "reason", None) if exc is not None else None
        if reason in (
            "PEER_DID_NOT_RETURN_A_CERTIFICATE",
            "CERTIFICATE_REQUIRED",
            "TLSV13_ALERT_CERTIFICATE_REQUIRED",
        ):
            self.fail_verify_no_cert.value += 1
        elif reason == "CERTIFICATE_VERIFY_FAILED" or isinstance(exc, ssl.SSLCertVerificationError):
            self.fail_verify_error.value += 1
        else:
            self.connection_error.value += 1


def _detached_stats(prefix: str) -> TlsStats:
    # Until a listener/cluster binds real stats, count into a private store.
    return TlsStats(Store().scope(prefix))


# --- SAN matching --------------------------------------------------------------------------------


class SanMatcher:
    """One ``SubjectAltNameMatcher`` (``san_type`` None: any type, the deprecated form)."""

    __slots__ = ("matcher", "san_type")

    def __init__(self, san_type: str | None, matcher: Any) -> None:
        self.san_type = san_type
        self.matcher = matcher

    def matches(self, sans: Sequence[tuple[str, str]]) -> bool:
        m = self.matcher
        for kind, value in sans:
            if self.san_type is not None and kind != self.san_type:
                continue
            if kind == "IP Address":
                value = _norm_ip(value)
            if m.match(value.encode()):
                return True
            # A wildcard DNS SAN in the certificate matches an exact name (Envoy's dnsNameMatch).
            if kind == "DNS" and value.startswith("*.") and type(m).__name__ == "_Exact":
                want = bytes(m.pattern).decode(errors="replace")
                if "." in want and want.split(".", 1)[1] == value[2:]:
                    return True
        return False


def _norm_ip(v: str) -> str:
    try:
        return str(ipaddress.ip_address(v.strip()))
    except ValueError:
        return v


def san_list(cert: dict[str, Any] | None) -> list[tuple[str, str]]:
    if not cert:
        return []
    return [(k, v) for k, v in cert.get("subjectAltName", ())]


def _compile_san_matchers(vc: Any, path: str) -> list[SanMatcher]:
    # net/ may not import proxy/ in general; the string matcher is a pure compiled value shared
    # with the route table (see the report on moving it to a neutral module).
    from moorline.config.matchers import StringMatcher

    out: list[SanMatcher] = []
    for i, sm in enumerate(vc.match_typed_subject_alt_names):
        p = f"{path}.match_typed_subject_alt_names[{i}]"
        if sm.san_type not in _SAN_TYPES:
            raise ConfigError(f"{p}.san_type", "only EMAIL, DNS, URI and IP_ADDRESS SAN types are supported")
        out.append(SanMatcher(_SAN_TYPES[sm.san_type], StringMatcher.compile(sm.matcher, f"{p}.matcher")))
    for i, m in enumerate(vc.match_subject_alt_names):
        out.append(SanMatcher(None, StringMatcher.compile(m, f"{path}.match_subject_alt_names[{i}]")))
    return out


# --- building SSLContexts ------------------------------------------------------------------------


class _Built:
    """One generation of compiled contexts; swapped as a whole on reload."""

    __slots__ = ("by_name", "context", "san_matchers", "verify", "wildcards")

    def __init__(self) -> None:
        self.context: ssl.SSLContext | None = None
        self.by_name: dict[str, ssl.SSLContext] = {}
        self.wildcards: dict[str, ssl.SSLContext] = {}  # "example.com" for "*.example.com"
        self.san_matchers: list[SanMatcher] = []
        self.verify = False  # a trusted CA is configured


class _PemFiles:
    """Inline PEM written to private temp files for ``load_cert_chain`` (needs paths); removed
    as soon as the context has loaded them."""

    def __init__(self) -> None:
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._n = 0

    def path_of(self, ds: Any, path: str, files_read: list[str]) -> str:
        fn = data_source_file(ds)
        if fn is not None:
            read_data_source(ds, path)  # a clear error for a missing file
            files_read.append(fn)
            return fn
        data = read_data_source(ds, path)
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="moorline-tls-")
        self._n += 1
        p = os.path.join(self._dir.name, f"{self._n}.pem")
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return p

    def cleanup(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


def _cert_names(certfile: str) -> list[str]:
    """DNS SANs (or the CN when there are none) of the leaf certificate in a PEM file."""
    try:
        decoded = ssl._ssl._test_decode_cert(certfile)  # type: ignore[attr-defined]
    except Exception:  # not decodable here: the certificate still works, only not for SNI choice
        return []
    names = [v.lower() for k, v in decoded.get("subjectAltName", ()) if k == "DNS"]
    if not names:
        for rdn in decoded.get("subject", ()):
            for k, v in rdn:
                if k == "commonName":
                    names.append(v.lower())
    return names


def _ciphers(params: Any, path: str) -> str | None:
    if not len(params.cipher_suites):
        return None
    out: list[str] = []
    for s in params.cipher_suites:
        s = s.strip()
        if s.startswith("[") and s.endswith("]"):
            out.extend(x for x in s[1:-1].split("|") if x)
        elif s.startswith("TLS_"):
            continue  # a TLS 1.3 suite: OpenSSL's fixed set applies
        else:
            out.append(s)
    if not out:
        return None
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(":".join(out))
    except ssl.SSLError:
        raise ConfigError(
            f"{path}.cipher_suites", f"no usable cipher in {list(params.cipher_suites)}"
        ) from None
    return ":".join(out)


class _Common:
    """The static part of a ``CommonTlsContext``; certificates and validation come from sources
    (inline, files, SDS providers) read at every build."""

    def __init__(self, common: Any, ctx: Any, path: str, server: bool) -> None:
        self.server = server
        self.path = path
        # Files this context reads are polled by its secrets manager's watcher.
        self.watcher: FileWatcher = secrets_of(ctx).watcher
        p = f"{path}.tls_params"
        params = common.tls_params
        lo, hi = _SERVER_DEFAULT if server else _CLIENT_DEFAULT
        if params.tls_minimum_protocol_version:
            lo = _VERSIONS[params.tls_minimum_protocol_version]
        if params.tls_maximum_protocol_version:
            hi = _VERSIONS[params.tls_maximum_protocol_version]
        elif hi < lo:
            hi = lo
        if hi < lo:
            raise ConfigError(
                f"{p}.tls_maximum_protocol_version", "is lower than tls_minimum_protocol_version"
            )
        self.min_version, self.max_version = lo, hi
        self.ciphers = _ciphers(params, p) or _DEFAULT_CIPHERS
        self.curve: str | None = None
        if len(params.ecdh_curves):
            first = params.ecdh_curves[0]
            self.curve = _CURVES.get(first, first)
            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ecdh_curve(self.curve)
            except (ValueError, ssl.SSLError):
                raise ConfigError(f"{p}.ecdh_curves[0]", f"unknown curve {first!r}") from None
            if len(params.ecdh_curves) > 1:
                ctx.notice(f"{p}.ecdh_curves: only the first curve ({first}) is used (Python's ssl sets one)")
        if len(params.signature_algorithms):
            ctx.notice(f"{p}.signature_algorithms: ignored (not settable through Python's ssl)")
        if len(params.compliance_policies):
            raise ConfigError(f"{p}.compliance_policies", "compliance policies are not supported")
        self.alpn = list(common.alpn_protocols)
        for field in (
            "tls_certificate_provider_instance",
            "custom_tls_certificate_selector",
            "tls_certificate_certificate_provider",
            "tls_certificate_certificate_provider_instance",
            "validation_context_certificate_provider",
            "validation_context_certificate_provider_instance",
            "custom_handshaker",
        ):
            if common.HasField(field):
                raise ConfigError(f"{path}.{field}", "is not supported")
        if common.HasField("key_log"):
            ctx.notice(f"{path}.key_log: ignored")

        # Certificates: inline/file TlsCertificates, or SDS providers.
        self.cert_static = list(common.tls_certificates)
        for i, tc in enumerate(self.cert_static):
            self._check_cert(tc, ctx, f"{path}.tls_certificates[{i}]")
        self.cert_providers: list[tuple[SecretProvider, str]] = []
        for i, sc in enumerate(common.tls_certificate_sds_secret_configs):
            sp = f"{path}.tls_certificate_sds_secret_configs[{i}]"
            self.cert_providers.append((provider_for(sc, ctx, sp), sp))
        if self.cert_static and self.cert_providers:
            raise ConfigError(
                f"{path}.tls_certificate_sds_secret_configs",
                "use either tls_certificates or tls_certificate_sds_secret_configs",
            )

        # Validation: static, SDS, or combined (default merged with SDS).
        self.validation_default: Any = None
        self.validation_provider: tuple[SecretProvider, str] | None = None
        kind = common.WhichOneof("validation_context_type")
        if kind == "validation_context":
            self.validation_default = common.validation_context
        elif kind == "validation_context_sds_secret_config":
            sp = f"{path}.validation_context_sds_secret_config"
            self.validation_provider = (
                provider_for(common.validation_context_sds_secret_config, ctx, sp),
                sp,
            )
        elif kind == "combined_validation_context":
            cvc = common.combined_validation_context
            self.validation_default = cvc.default_validation_context
            sp = f"{path}.combined_validation_context.validation_context_sds_secret_config"
            self.validation_provider = (provider_for(cvc.validation_context_sds_secret_config, ctx, sp), sp)
        self.providers = [p for p, _ in self.cert_providers]
        if self.validation_provider is not None:
            self.providers.append(self.validation_provider[0])

    @staticmethod
    def _check_cert(tc: Any, ctx: Any, p: str) -> None:
        if tc.HasField("private_key_provider"):
            raise ConfigError(f"{p}.private_key_provider", "private key providers are not supported")
        if tc.HasField("pkcs12"):
            raise ConfigError(
                f"{p}.pkcs12", "PKCS#12 is not supported; use certificate_chain and private_key"
            )
        if not tc.HasField("certificate_chain") or not tc.HasField("private_key"):
            raise ConfigError(p, "certificate_chain and private_key are required")
        if tc.HasField("ocsp_staple"):
            ctx.notice(f"{p}.ocsp_staple: ignored (OCSP stapling is not supported)")

    def certificates(self) -> list[tuple[Any, str]]:
        if self.cert_static:
            return [(tc, f"{self.path}.tls_certificates[{i}]") for i, tc in enumerate(self.cert_static)]
        out: list[tuple[Any, str]] = []
        for prov, sp in self.cert_providers:
            s = prov.get()
            if s is None or not s.HasField("tls_certificate"):
                raise ConfigError(sp, f"secret {prov.name!r} holds no tls_certificate")
            self._check_cert(s.tls_certificate, _NoCtx(), f"{sp}(secret {prov.name!r})")
            out.append((s.tls_certificate, f"{sp}(secret {prov.name!r}).tls_certificate"))
        return out

    def validation(self) -> tuple[Any, str] | None:
        if self.validation_provider is None:
            if self.validation_default is None:
                return None
            return self.validation_default, f"{self.path}.validation_context"
        prov, sp = self.validation_provider
        s = prov.get()
        if s is None or not s.HasField("validation_context"):
            raise ConfigError(sp, f"secret {prov.name!r} holds no validation_context")
        if self.validation_default is None:
            return s.validation_context, sp
        merged = type(self.validation_default)()
        merged.CopyFrom(self.validation_default)
        merged.MergeFrom(s.validation_context)  # Envoy: the SDS part is merged into the default
        return merged, sp

    def build(self, require_client: bool, files_read: list[str]) -> _Built:
        built = _Built()
        pem = _PemFiles()
        try:
            certs = self.certificates()
            if self.server and not certs:
                raise ConfigError(self.path, "a server TLS context needs at least one certificate")
            contexts: list[tuple[ssl.SSLContext, list[str]]] = []
            vc = self.validation()
            for tc, p in certs or [(None, self.path)]:
                c = self._base(require_client, vc, pem, files_read, built)
                names: list[str] = []
                if tc is not None:
                    certfile = pem.path_of(tc.certificate_chain, f"{p}.certificate_chain", files_read)
                    keyfile = pem.path_of(tc.private_key, f"{p}.private_key", files_read)
                    password = (
                        read_data_source(tc.password, f"{p}.password") if tc.HasField("password") else None
                    )
                    try:
                        c.load_cert_chain(certfile, keyfile, password)
                    except (ssl.SSLError, OSError) as e:
                        raise ConfigError(p, f"cannot load the certificate and key: {e}") from None
                    names = _cert_names(certfile) if self.server and len(certs) > 1 else []
                contexts.append((c, names))
                if not self.server:
                    if len(certs) > 1:
                        log.warning("%s: only the first client certificate is used", self.path)
                    break
            built.context = contexts[0][0]
            for c, names in contexts:
                for n in names:
                    if n.startswith("*."):
                        built.wildcards.setdefault(n[2:], c)
                    else:
                        built.by_name.setdefault(n, c)
            return built
        finally:
            pem.cleanup()

    def _base(
        self,
        require_client: bool,
        vc: tuple[Any, str] | None,
        pem: _PemFiles,
        files_read: list[str],
        built: _Built,
    ) -> ssl.SSLContext:
        c = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if self.server else ssl.PROTOCOL_TLS_CLIENT)
        c.minimum_version = self.min_version
        c.maximum_version = self.max_version
        c.set_ciphers(self.ciphers)
        if self.curve:
            c.set_ecdh_curve(self.curve)
        if self.alpn:
            c.set_alpn_protocols(self.alpn)
        if not self.server:
            c.check_hostname = False  # Envoy verifies SANs only through the SAN matchers
        c.verify_mode = ssl.CERT_NONE
        if vc is not None:
            v, vp = vc
            for field, why in (
                ("verify_certificate_spki", "SPKI pinning"),
                ("verify_certificate_hash", "certificate hash pinning"),
            ):
                if len(getattr(v, field)):
                    raise ConfigError(f"{vp}.{field}", f"{why} is not supported")
            for field in ("custom_validator_config", "ca_certificate_provider_instance"):
                if v.HasField(field):
                    raise ConfigError(f"{vp}.{field}", "is not supported")
            if v.allow_expired_certificate:
                raise ConfigError(f"{vp}.allow_expired_certificate", "is not supported")
            if v.trust_chain_verification != 0:
                raise ConfigError(f"{vp}.trust_chain_verification", "only VERIFY_TRUST_CHAIN is supported")
            built.san_matchers = _compile_san_matchers(v, vp)
            if v.HasField("trusted_ca"):
                fn = data_source_file(v.trusted_ca)
                try:
                    if fn is not None:
                        read_data_source(v.trusted_ca, f"{vp}.trusted_ca")
                        files_read.append(fn)
                        c.load_verify_locations(cafile=fn)
                    else:
                        c.load_verify_locations(
                            cadata=read_data_source(v.trusted_ca, f"{vp}.trusted_ca").decode()
                        )
                except (ssl.SSLError, ValueError) as e:
                    raise ConfigError(f"{vp}.trusted_ca", f"cannot load the CA certificates: {e}") from None
                built.verify = True
            elif v.HasField("system_root_certs"):
                c.load_default_certs(ssl.Purpose.CLIENT_AUTH if self.server else ssl.Purpose.SERVER_AUTH)
                built.verify = True
            if v.HasField("crl"):
                crlfile = pem.path_of(v.crl, f"{vp}.crl", files_read)
                try:
                    c.load_verify_locations(cafile=crlfile)
                except ssl.SSLError as e:
                    raise ConfigError(f"{vp}.crl", f"cannot load the CRL: {e}") from None
                c.verify_flags |= (
                    ssl.VERIFY_CRL_CHECK_LEAF if v.only_verify_leaf_cert_crl else ssl.VERIFY_CRL_CHECK_CHAIN
                )
            if built.verify:
                if self.server:
                    c.verify_mode = ssl.CERT_REQUIRED if require_client else ssl.CERT_OPTIONAL
                else:
                    c.verify_mode = ssl.CERT_REQUIRED
            elif built.san_matchers:
                raise ConfigError(f"{vp}.trusted_ca", "SAN matching needs a trusted_ca")
        if require_client and not built.verify:
            raise ConfigError(
                f"{self.path}.validation_context.trusted_ca", "require_client_certificate needs a trusted_ca"
            )
        return c


class _NoCtx:
    def notice(self, msg: str) -> None:
        log.info("%s", msg)


class _TlsBase:
    """Shared reload machinery: rebuild on a watched file or secret change."""

    def __init__(self, common: _Common, require_client: bool, stats_prefix: str) -> None:
        self.common = common
        self.require_client = require_client
        self.stats = _detached_stats(stats_prefix)
        self.generation = 0
        self.last_error: str | None = None
        # Secrets over xDS not received yet (SDS): what the listener or cluster warms on. Until
        # they arrive there is no context (a connection is refused); their arrival builds it.
        inits = [getattr(p, "init", None) for p in common.providers]
        self.init_targets = [t for t in inits if t is not None and not t.ready]
        if self.init_targets:
            self._built = _Built()
            self.last_error = "waiting for SDS secrets: " + ", ".join(t.name for t in self.init_targets)
        else:
            self._built = self._build()  # ConfigError at compile time
        for p in common.providers:
            p.subscribe(self._reload_cb)

    def _build(self) -> _Built:
        files: list[str] = []
        built = self.common.build(self.require_client, files)
        for f in files:
            self.common.watcher.watch(f, self._reload_cb)
        self._install_sni(built)
        return built

    def _install_sni(self, built: _Built) -> None:
        pass

    def _reload_cb(self) -> None:
        if any(not t.ready for t in self.init_targets):
            return  # (every secret first)
        self.reload()

    @property
    def has_context(self) -> bool:
        """False until the SDS secrets it waits for arrived (or after they never did)."""
        return self._built.context is not None

    def reload(self) -> bool:
        """Rebuild from the current files and secrets; keep the old contexts when that fails."""
        try:
            built = self._build()
        except ConfigError as e:
            self.last_error = str(e)
            log.warning(
                "TLS context %s: reload failed, keeping the previous certificates: %s", self.common.path, e
            )
            return False
        self._built = built
        self.generation += 1
        self.last_error = None
        log.info("TLS context %s: certificates reloaded", self.common.path)
        return True

    @property
    def watcher(self) -> FileWatcher:
        return self.common.watcher

    def bind_stats(self, scope: Scope) -> None:
        """Count into ``<scope>ssl.*`` (the listener's or the cluster's)."""
        self.stats = TlsStats(scope.scope("ssl."))

    @property
    def alpn(self) -> list[str]:
        return self.common.alpn

    @property
    def san_matchers(self) -> list[SanMatcher]:
        return self._built.san_matchers


class DownstreamTls(_TlsBase):
    """Compiled ``DownstreamTlsContext``: ``server_context`` is the current ``SSLContext``."""

    def __init__(self, proto: Any, ctx: Any, path: str) -> None:
        common = _Common(proto.common_tls_context, ctx, f"{path}.common_tls_context", server=True)
        self.require_sni = proto.require_sni.value if proto.HasField("require_sni") else False
        self.handshake_timeout = DEFAULT_HANDSHAKE_TIMEOUT
        self.no_tickets = (
            proto.disable_stateless_session_resumption
        )  # OP_NO_TICKET: no TLS 1.2/1.3 session tickets
        self.prefer_client_ciphers = proto.prefer_client_ciphers
        if len(proto.session_ticket_keys.keys) or proto.HasField("session_ticket_keys_sds_secret_config"):
            ctx.notice(
                f"{path}.session_ticket_keys: ignored (OpenSSL's own rotating ticket keys are used; "
                "tickets are not shared between worker processes)"
            )
        if proto.disable_stateful_session_resumption:
            ctx.notice(
                f"{path}.disable_stateful_session_resumption: ignored (not settable through Python's ssl)"
            )
        if proto.HasField("session_timeout"):
            ctx.notice(f"{path}.session_timeout: ignored (OpenSSL's default lifetime is used)")
        if proto.ocsp_staple_policy == 2:  # MUST_STAPLE
            raise ConfigError(f"{path}.ocsp_staple_policy", "OCSP stapling is not supported")
        require_client = (
            proto.require_client_certificate.value if proto.HasField("require_client_certificate") else False
        )
        super().__init__(common, require_client, "ssl.")

    def _install_sni(self, built: _Built) -> None:
        assert built.context is not None
        contexts: dict[int, ssl.SSLContext] = {id(built.context): built.context}
        for c in (*built.by_name.values(), *built.wildcards.values()):
            contexts[id(c)] = c
        for c in contexts.values():
            if self.no_tickets:
                c.options |= ssl.OP_NO_TICKET
            if self.prefer_client_ciphers:
                c.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
            c.sni_callback = self._make_sni_callback(built)

    @staticmethod
    def _make_sni_callback(built: _Built) -> Callable[[Any, str | None, ssl.SSLContext], None]:
        by_name, wild = built.by_name, built.wildcards

        def on_sni(sslobj: Any, name: str | None, _ctx: ssl.SSLContext) -> None:
            # Remember the name for ConnInfo.server_name (server-side SSLObjects don't keep it).
            try:
                sslobj.moorline_sni = name
            except AttributeError:
                pass
            if not name or not (by_name or wild):
                return
            n = name.lower().rstrip(".")  # "a.example.com." names the same host
            c = by_name.get(n)
            if c is None and "." in n:
                c = wild.get(n.split(".", 1)[1])
            if c is not None and c is not sslobj.context:
                sslobj.context = c

        return on_sni

    @property
    def server_context(self) -> ssl.SSLContext:
        c = self._built.context
        assert c is not None
        return c

    def after_handshake(self, sslobj: Any, info: Any) -> bool:
        """Fill ``info`` from a finished handshake, check SANs, count stats. False: close."""
        st = self.stats
        sni = getattr(sslobj, "moorline_sni", None)
        if sni and not info.server_name:
            info.server_name = sni.lower().rstrip(".")
        if self.require_sni and not sni:
            st.connection_error.value += 1
            return False
        cert = sslobj.getpeercert()
        if not cert:
            st.no_certificate.value += 1
            if self.require_client:  # verify_mode guarantees a cert; belt and braces
                st.fail_verify_no_cert.value += 1
                return False
        else:
            matchers = self._built.san_matchers
            if matchers:
                sans = san_list(cert)
                if not any(m.matches(sans) for m in matchers):
                    st.fail_verify_san.value += 1
                    return False
        info.peer_certificate = cert or None
        info.negotiated_alpn = sslobj.selected_alpn_protocol()
        info.tls_version = sslobj.version()
        st.on_handshake(sslobj)
        return True


class UpstreamTls(_TlsBase):
    """Compiled ``UpstreamTlsContext``: ``context`` is the current client ``SSLContext``."""

    def __init__(self, proto: Any, ctx: Any, path: str) -> None:
        common = _Common(proto.common_tls_context, ctx, f"{path}.common_tls_context", server=False)
        self.sni: str | None = proto.sni or None
        self.auto_host_sni = proto.auto_host_sni
        self.auto_sni_san_validation = proto.auto_sni_san_validation
        if proto.allow_renegotiation:
            ctx.notice(f"{path}.allow_renegotiation: ignored (renegotiation stays off)")
        super().__init__(common, False, "ssl.")

    @property
    def context(self) -> ssl.SSLContext:
        c = self._built.context
        assert c is not None
        return c

    def server_hostname(self, host: Any) -> str:
        """The SNI for ``host``: ``sni``, else the host name with ``auto_host_sni``, else the
        address (Python sends no SNI for an IP literal, as Envoy sends none without ``sni``)."""
        if self.auto_host_sni and getattr(host, "hostname", None):
            return str(host.hostname)
        if self.sni:
            return self.sni
        return str(host.address)

    def verify_peer(self, sslobj: Any, sni: str | None) -> bool:
        """SAN check after the handshake (the chain was verified by OpenSSL). Counts stats."""
        st = self.stats
        cert = sslobj.getpeercert()
        matchers = self._built.san_matchers
        if matchers or (self.auto_sni_san_validation and sni and self._built.verify):
            sans = san_list(cert)
            ok = any(m.matches(sans) for m in matchers) if matchers else True
            if ok and self.auto_sni_san_validation and sni and not _dns_san_matches(sans, sni):
                ok = False
            if not ok:
                st.fail_verify_san.value += 1
                return False
        if not cert:
            st.no_certificate.value += 1
        st.on_handshake(sslobj)
        return True


def _dns_san_matches(sans: Sequence[tuple[str, str]], name: str) -> bool:
    name = name.lower()
    for kind, v in sans:
        if kind != "DNS":
            continue
        v = v.lower()
        if v == name or (v.startswith("*.") and "." in name and name.split(".", 1)[1] == v[2:]):
            return True
    return False


# --- compile entry points ------------------------------------------------------------------------


def _unpack(any_msg: Any, path: str) -> Any:
    from moorline.config.loader import unpack_any

    return unpack_any(any_msg, path)


def compile_downstream(proto: Any, ctx: Any, path: str) -> DownstreamTls:
    return DownstreamTls(proto, ctx, path)


def compile_upstream(proto: Any, ctx: Any, path: str) -> UpstreamTls:
    return UpstreamTls(proto, ctx, path)


def compile_transport_socket(
    ts: Any, ctx: Any, path: str, *, server: bool
) -> DownstreamTls | UpstreamTls | None:
    """A ``TransportSocket`` -> compiled TLS, or None for ``raw_buffer``. ``ConfigError`` for any
    other transport socket (tap, ALTS, PROXY protocol, ...): caught at load, not on every connection.
    ``internal_upstream`` (Istio) only adds metadata for internal listeners, which moorline does not
    have: its inner transport socket is what carries the bytes, so that one is compiled."""
    tname = ts.typed_config.type_url.rsplit("/", 1)[-1] if ts.HasField("typed_config") else ""
    if tname == RAW_BUFFER_TYPE or (not tname and ts.name in RAW_BUFFER_NAMES):
        return None
    if tname == INTERNAL_UPSTREAM_TYPE and not server:
        iu = _unpack(ts.typed_config, f"{path}.typed_config")
        if len(iu.passthrough_metadata):
            ctx.notice(f"{path}.typed_config.passthrough_metadata: ignored (no internal listeners)")
        if not iu.HasField("transport_socket"):
            return None
        return compile_transport_socket(
            iu.transport_socket, ctx, f"{path}.typed_config.transport_socket", server=False
        )
    want = DOWNSTREAM_TYPE if server else UPSTREAM_TYPE
    if tname in (DOWNSTREAM_TYPE, UPSTREAM_TYPE):
        if tname != want:
            raise ConfigError(f"{path}.typed_config", f"expected {want}, got {tname}")
        msg = _unpack(ts.typed_config, f"{path}.typed_config")
        cpath = f"{path}.typed_config"
        return compile_downstream(msg, ctx, cpath) if server else compile_upstream(msg, ctx, cpath)
    if not tname and ts.name in TLS_NAMES:
        raise ConfigError(f"{path}.typed_config", f"{want} is required")
    raise ConfigError(path, f"unsupported transport socket {tname or ts.name!r}")


# --- serving accepted connections ----------------------------------------------------------------


def serve_accepted(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    info: Any,
    protocol_factory: Callable[[], asyncio.BaseProtocol],
    admit: Callable[[], bool] | None = None,
) -> None:
    """Attach an accepted socket to a protocol, through TLS when ``info.tls`` is set.

    With TLS the handshake runs first; ``protocol_factory()`` is only called after it succeeded
    and ``info`` carries ``negotiated_alpn``, ``server_name``, ``tls_version``. A failed
    handshake (or SAN check) counts its stat, closes the socket and calls ``info.notify_closed()``.

    ``admit`` (the chain's connection filters, ``ConnInfo.admit``) decides before the protocol
    exists: at once for plain TCP, after the checked handshake with TLS. ``False`` closes the
    connection the same way, without reading a byte of it.
    """
    tls: DownstreamTls | None = info.tls
    if tls is None:
        if admit is not None and not admit():
            sock.close()
            info.notify_closed()
            return
        task = loop.create_task(loop.connect_accepted_socket(protocol_factory, sock))  # type: ignore[arg-type]
        task.add_done_callback(lambda t: _plain_done(t, sock, info))
        return
    tls.watcher.start(loop)
    if not tls.has_context:  # its SDS secrets never arrived: refuse, as a handshake failure
        tls.stats.connection_error.value += 1
        sock.close()
        info.notify_closed()
        return
    gate = _ServerGate(tls, info, protocol_factory, admit)
    task = loop.create_task(
        loop.connect_accepted_socket(
            lambda: gate, sock, ssl=tls.server_context, ssl_handshake_timeout=tls.handshake_timeout
        )
    )
    task.add_done_callback(lambda t: gate.task_done(t, sock))


def _plain_done(t: asyncio.Task[Any], sock: socket.socket, info: Any) -> None:
    if t.cancelled() or t.exception() is not None:
        if sock.fileno() != -1:
            sock.close()
        info.notify_closed()


class _ServerGate(asyncio.Protocol):
    """Sits on the TLS transport until the handshake is checked, then hands it to the real
    protocol with ``transport.set_protocol``."""

    def __init__(
        self,
        tls: DownstreamTls,
        info: Any,
        factory: Callable[[], asyncio.BaseProtocol],
        admit: Callable[[], bool] | None = None,
    ) -> None:
        self.tls = tls
        self.info = info
        self.factory = factory
        self.admit = admit
        self.handed = False
        self.failed = False

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        sslobj = transport.get_extra_info("ssl_object")
        if sslobj is None or not self.tls.after_handshake(sslobj, self.info):
            self.failed = True
            transport.abort()
            return
        if self.admit is not None and not self.admit():
            # Refused by a connection filter (it counted why): not a TLS failure.
            self.failed = True
            transport.abort()
            return
        proto = self.factory()
        self.handed = True
        transport.set_protocol(proto)
        proto.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.handed:
            self.info.notify_closed()

    def task_done(self, t: asyncio.Task[Any], sock: socket.socket) -> None:
        if t.cancelled():
            exc: BaseException | None = None
        else:
            exc = t.exception()
            if exc is None:
                return
        self.tls.stats.on_failure(exc)
        if sock.fileno() != -1:
            sock.close()
        if not self.handed:
            self.info.notify_closed()


class _ClientGate(asyncio.Protocol):
    """Upstream counterpart: SAN check before the pool's protocol sees the connection."""

    def __init__(self, tls: UpstreamTls, sni: str | None, proto: asyncio.BaseProtocol) -> None:
        self.tls = tls
        self.sni = sni
        self.proto = proto
        self.failed = False

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        sslobj = transport.get_extra_info("ssl_object")
        if sslobj is None or not self.tls.verify_peer(sslobj, self.sni):
            self.failed = True
            transport.abort()
            return
        transport.set_protocol(self.proto)
        self.proto.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        pass


def upstream_connect_coro(
    loop: asyncio.AbstractEventLoop,
    tls: UpstreamTls,
    host: Any,
    protocol: asyncio.BaseProtocol,
    timeout: float | None,
    sock: socket.socket | None = None,
) -> tuple[Any, _ClientGate]:
    """``(coroutine, gate)`` opening a TLS connection to ``host`` (or over the connected
    ``sock``); after the coroutine, ``gate.failed`` tells a SAN mismatch (transport aborted)."""
    tls.watcher.start(loop)
    sni = tls.server_hostname(host)
    gate = _ClientGate(tls, sni, protocol)
    if not tls.has_context:

        async def refuse() -> Any:
            raise ConnectionError(f"TLS context has no certificates yet ({tls.last_error})")

        return refuse(), gate
    kw: dict[str, Any] = {"ssl": tls.context, "server_hostname": sni}
    if timeout and timeout > 0:
        kw["ssl_handshake_timeout"] = timeout
    if sock is not None:
        coro = loop.create_connection(lambda: gate, sock=sock, **kw)
    elif host.port is None:
        coro = loop.create_unix_connection(lambda: gate, host.address, **kw)
    else:
        coro = loop.create_connection(lambda: gate, host.address, host.port, **kw)
    return coro, gate


class TlsVerifyError(ssl.SSLError):
    """The peer's certificate did not match the configured SANs."""


# --- userspace relay for tcp_proxy over TLS ------------------------------------------------------

CLOSE_DONE = "done"
CLOSE_RESET = "reset"
CLOSE_IDLE = "idle_timeout"
CLOSE_LOCAL = "local"
CLOSE_HANDSHAKE = "handshake_failed"


class _Side(asyncio.Protocol):
    __slots__ = ("counters", "early", "eof", "lost", "name", "peer", "relay", "transport")

    def __init__(self, relay: StreamRelay, name: str, counters: Sequence[Any]) -> None:
        self.relay = relay
        self.name = name
        self.counters = tuple(counters)
        self.transport: Any = None
        self.peer: _Side | None = None
        self.eof = False
        self.lost = False
        # Bytes read before the other side was up (uvloop starts reading right after
        # connection_made whatever it was told there): at most one read, since the first one
        # pauses reading; handed over by StreamRelay._side_up.
        self.early: list[bytes] = []

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        self.transport = transport
        transport.pause_reading()  # until both sides are up
        transport.set_write_buffer_limits(high=self.relay.buffer_limit, low=self.relay.buffer_limit // 4)
        self.relay._side_up(self)

    def data_received(self, data: bytes) -> None:
        n = len(data)
        for c in self.counters:
            c.value += n
        r = self.relay
        r.last_activity = r.loop.time()
        peer = self.peer
        if peer is None or peer.lost:
            return
        if peer.transport is None:
            self.early.append(data)
            self.transport.pause_reading()
            return
        peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        if self.peer is not None and self.peer.transport is None:
            return True  # passed on by StreamRelay._side_up once the peer is up
        # A transport that can half-close (plain TCP, HalfCloseTls) keeps its write direction;
        # the loop's TLS transports cannot, and close after EOF anyway.
        half_close = self.transport is not None and self.transport.can_write_eof()
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.lost:
            if peer.transport.can_write_eof():
                peer.transport.write_eof()
            else:
                peer.transport.close()  # TLS has no half-close here: flush and close_notify
        if peer is not None and peer.eof:
            self.relay._finish_both(CLOSE_DONE)
            return False
        return half_close

    def pause_writing(self) -> None:
        p = self.peer
        if p is not None and p.transport is not None and not p.lost:
            p.transport.pause_reading()

    def resume_writing(self) -> None:
        p = self.peer
        if p is not None and p.transport is not None and not p.lost:
            p.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.relay._side_lost(self, exc)


class StreamRelay:
    """tcp_proxy's relay when either side speaks TLS: two asyncio transports, bytes in userspace.

    Same surface as ``moorline.net.tcp_relay.Relay``: ``close()``, ``closed``, ``close_reason``,
    and ``on_close(a_to_b, b_to_a)`` once both sockets are closed. Bound per direction: the
    receiving side's transport write buffer above ``buffer_limit`` pauses the sending side.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        down: socket.socket,
        up: socket.socket,
        *,
        down_tls: DownstreamTls | None,
        up_tls: UpstreamTls | None,
        up_host: Any,
        info: Any,
        buffer_limit: int,
        idle_timeout: float | None,
        on_close: Callable[[int, int], None] | None,
        counters_a_to_b: Sequence[Any] = (),
        counters_b_to_a: Sequence[Any] = (),
        admit: Callable[[], bool] | None = None,
    ) -> None:
        self.loop = loop
        # The chain's connection filters, asked once the downstream handshake is checked
        # (before a byte of the downstream goes upstream); None for a plain downstream.
        self.admit = admit if down_tls is not None else None
        self.buffer_limit = max(buffer_limit, 4096)
        self.idle_timeout = idle_timeout or None
        self._on_close = on_close
        self.info = info
        self.closed = False
        self.close_reason: str | None = None
        self.close_error: BaseException | None = None
        self.last_activity = loop.time()
        self._socks = [down, up]
        self._idle: asyncio.TimerHandle | None = None
        self.a_to_b = 0
        self.b_to_a = 0
        self._counter_a = _Tally(self, True)
        self._counter_b = _Tally(self, False)
        self.down = _Side(self, "down", (*counters_a_to_b, self._counter_a))
        self.up = _Side(self, "up", (*counters_b_to_a, self._counter_b))
        self.down.peer, self.up.peer = self.up, self.down
        self._gate: _ClientGate | None = None
        self._down_tls = down_tls
        for t in (down_tls, up_tls):
            if t is not None:
                t.watcher.start(loop)
        dcoro: Any
        ucoro: Any
        self._down_htls: HalfCloseTls | None = None
        if down_tls is not None:
            # TLS in memory BIOs over the plain socket, not the loop's TLS transport: a client's
            # close_notify is then a half-close (passed on as FIN) and the answer still flows.
            self._down_htls = HalfCloseTls(self, down_tls)
            htls = self._down_htls
            dcoro = loop.connect_accepted_socket(lambda: htls, down)
        else:
            dcoro = loop.connect_accepted_socket(lambda: self.down, down)
        if up_tls is not None:
            ucoro, self._gate = upstream_connect_coro(loop, up_tls, up_host, self.up, None, sock=up)
        else:
            ucoro = loop.connect_accepted_socket(lambda: self.up, up)
        self._tasks = [loop.create_task(dcoro), loop.create_task(ucoro)]
        self._tasks[0].add_done_callback(lambda t: self._task_done(t, down_tls, True))
        self._tasks[1].add_done_callback(lambda t: self._task_done(t, up_tls, False))
        if self.idle_timeout:
            self._idle = loop.call_later(self.idle_timeout, self._check_idle)

    def _task_done(self, t: asyncio.Task[Any], tls: _TlsBase | None, is_down: bool) -> None:
        if t.cancelled():
            return
        exc = t.exception()
        if exc is None and not (not is_down and self._gate is not None and self._gate.failed):
            return
        if exc is not None and tls is not None:
            tls.stats.on_failure(exc)
        self.close_error = exc
        self._close(CLOSE_HANDSHAKE)

    def _side_up(self, side: _Side) -> None:
        if self.closed:
            side.transport.abort()
            return
        if self.down.transport is not None and self.up.transport is not None:
            for sd in (self.down, self.up):
                peer = sd.peer
                assert peer is not None
                for chunk in sd.early:
                    peer.transport.write(chunk)
                sd.early.clear()
                if sd.eof:
                    t = peer.transport
                    if t.can_write_eof():
                        t.write_eof()
                    else:
                        t.close()
            self.down.transport.resume_reading()
            self.up.transport.resume_reading()

    def _side_lost(self, side: _Side, exc: Exception | None) -> None:
        peer = side.peer
        assert peer is not None
        if exc is not None and self.close_reason is None:
            self.close_reason = CLOSE_RESET
            self.close_error = exc
        if peer.transport is not None and not peer.lost:
            if exc is not None:
                peer.transport.abort()
            else:
                peer.transport.close()  # flush what the peer still has to send
        if (peer.lost or peer.transport is None) and not self.closed:
            htls = self._down_htls
            if peer is self.down and htls is not None and htls.handshaking:
                if not htls.raw.is_closing():
                    # Still in the downstream handshake: its plain transport owns the socket
                    # (closing the socket under it would leave it, and its handshake timer,
                    # on a stale fd). Its connection_lost ends the relay.
                    htls.raw.abort()
                return
            self._done()

    def _finish_both(self, reason: str) -> None:
        # Both directions ended: remember why; the transports' connection_lost finishes.
        if self.close_reason is None:
            self.close_reason = reason

    def _check_idle(self) -> None:
        self._idle = None
        if self.closed or not self.idle_timeout:
            return
        left = self.last_activity + self.idle_timeout - self.loop.time()
        if left > 0:
            self._idle = self.loop.call_later(left, self._check_idle)
            return
        self._close(CLOSE_IDLE)

    def close(self) -> None:
        self._close(CLOSE_LOCAL)

    def _close(self, reason: str) -> None:
        if self.closed:
            return
        if self.close_reason is None:
            self.close_reason = reason
        for t in self._tasks:
            if not t.done():
                t.cancel()
        any_open = False
        for s in (self.down, self.up):
            if s.transport is not None and not s.lost:
                s.transport.abort()
                any_open = True
        htls = self._down_htls
        if htls is not None and htls.handshaking and not htls.raw.is_closing():
            # Still in the downstream handshake: its plain transport owns the socket.
            htls.raw.abort()
            any_open = True
        if not any_open:
            self._done()
        else:
            # connection_lost of the transports completes the close; sockets without a
            # transport yet are closed now.
            for sk in self._socks:
                if sk.fileno() != -1 and not self._owned_by_transport(sk):
                    sk.close()

    def _owned_by_transport(self, sk: socket.socket) -> bool:
        if sk is self._socks[0]:
            htls = self._down_htls
            return self.down.transport is not None or (htls is not None and htls.raw is not None)
        return self.up.transport is not None

    def _done(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.close_reason is None:
            self.close_reason = CLOSE_DONE
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        for sk in self._socks:
            if sk.fileno() != -1:
                sk.close()
        cb = self._on_close
        self._on_close = None
        if cb is not None:
            cb(self.a_to_b, self.b_to_a)


class _Tally:
    """A counter-like slot that feeds the relay's own byte totals."""

    __slots__ = ("a", "relay")

    def __init__(self, relay: StreamRelay, a: bool) -> None:
        self.relay = relay
        self.a = a

    @property
    def value(self) -> int:
        return self.relay.a_to_b if self.a else self.relay.b_to_a

    @value.setter
    def value(self, v: int) -> None:
        if self.a:
            self.relay.a_to_b = v
        else:
            self.relay.b_to_a = v


class HalfCloseTls(asyncio.Protocol):
    """The relay's downstream TLS: an ``ssl.SSLObject`` over memory BIOs on the plain socket's
    transport, itself a transport to the relay's side protocol.

    Unlike the loop's TLS transport it keeps the write direction open after the client's
    close_notify (TLS 1.3 and 1.2 both allow it): ``eof_received`` reaches the relay, which
    passes a FIN on upstream, and the answer still goes back encrypted. ``write_eof`` sends
    close_notify (then FIN). The handshake is checked with ``DownstreamTls.after_handshake``
    before the relay sees the connection, and bounded by the handshake timeout."""

    def __init__(self, relay: StreamRelay, tls: DownstreamTls) -> None:
        self.relay = relay
        self.tls = tls
        self.raw: Any = None
        self.proto: _Side | None = None  # set once the handshake is done and checked
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self.sslobj = tls.server_context.wrap_bio(self._in, self._out, server_side=True)
        self._timer: asyncio.TimerHandle | None = None
        self._eof_in = False
        self._eof_out = False
        self._closing = False
        self.lost = False  # the plain transport's connection_lost has come

    @property
    def handshaking(self) -> bool:
        """The plain transport holds the socket, and the relay has no side for it yet."""
        return self.proto is None and self.raw is not None and not self.lost

    # -- plain transport events ------------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        self.raw = transport
        t = self.tls.handshake_timeout
        if t:
            self._timer = self.relay.loop.call_later(t, self._handshake_timeout)

    def data_received(self, data: bytes) -> None:
        if self._eof_in:
            return  # bytes after the client's close_notify: nothing may follow it (and nothing is kept)
        self._in.write(data)
        if self.proto is None:
            if not self._handshake():
                return
        self._read()

    def eof_received(self) -> bool:
        # A FIN without close_notify (a truncated stream): the same half-close for the relay.
        if self.proto is None:  # gone during the handshake
            self._fail(ConnectionResetError("EOF during the TLS handshake"))
            return False
        if not self._eof_in:
            self._eof_in = True
            return self.proto.eof_received()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        p = self.proto
        if p is None:
            self.relay._close(CLOSE_HANDSHAKE)
            return
        p.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.proto is not None:
            self.proto.pause_writing()

    def resume_writing(self) -> None:
        if self.proto is not None:
            self.proto.resume_writing()

    # -- TLS ---------------------------------------------------------------------------------------
    def _handshake(self) -> bool:
        try:
            self.sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return False
        except (ssl.SSLError, OSError) as e:
            self._flush()
            self._fail(e)
            return False
        self._flush()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.tls.after_handshake(self.sslobj, self.relay.info):  # (it counted why)
            self.raw.abort()
            return False
        admit = self.relay.admit
        if admit is not None and not admit():  # refused by a connection filter (it counted why)
            self.raw.abort()
            return False
        side = self.relay.down
        self.proto = side
        side.connection_made(self)  # type: ignore[arg-type]
        return True

    def _read(self) -> None:
        p = self.proto
        while p is not None and not self._eof_in:
            try:
                chunk = self.sslobj.read(65536)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                chunk = b""
            except (ssl.SSLError, OSError) as e:
                self.relay.close_error = e
                self.abort()
                return
            if not chunk:
                # The client's close_notify (SSLObject.read answers it with b""): its
                # half-close. The relay passes it on; the answer may still come back.
                self._eof_in = True
                self._flush()
                if not p.eof_received():
                    self.close()
                return
            p.data_received(chunk)
        self._flush()

    def _flush(self) -> None:
        out = self._out.read()
        if out and self.raw is not None and not self.raw.is_closing():
            self.raw.write(out)

    def _fail(self, exc: BaseException | None) -> None:
        self.tls.stats.on_failure(exc)
        self.relay.close_error = exc
        if self.raw is not None:
            self.raw.abort()

    def _handshake_timeout(self) -> None:
        self._timer = None
        if self.proto is None:
            self._fail(TimeoutError("TLS handshake timeout"))

    # -- the transport the relay's side protocol writes to ----------------------------------------
    def write(self, data: bytes) -> None:
        if self._eof_out or self._closing:
            return
        try:
            self.sslobj.write(data)
        except (ssl.SSLError, OSError) as e:
            self.relay.close_error = e
            self.abort()
            return
        self._flush()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self._eof_out:
            return
        self._eof_out = True
        self._close_notify()
        if not self.raw.is_closing():
            self.raw.write_eof()

    def _close_notify(self) -> None:
        try:
            self.sslobj.unwrap()
        except (ssl.SSLError, OSError, ValueError):
            pass  # sent; the client's own close_notify (if any) is not waited for
        self._flush()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if not self._eof_out:
            self._eof_out = True
            self._close_notify()
        self.raw.close()

    def abort(self) -> None:
        self._closing = True
        self.raw.abort()

    def is_closing(self) -> bool:
        return self._closing or self.raw.is_closing()

    def pause_reading(self) -> None:
        self.raw.pause_reading()

    def resume_reading(self) -> None:
        self.raw.resume_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.raw.set_write_buffer_limits(high=high, low=low)

    def get_write_buffer_size(self) -> int:
        return int(self.raw.get_write_buffer_size())

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self.sslobj
        if name == "sslcontext":
            return self.tls.server_context
        if name == "peercert":
            return self.sslobj.getpeercert()
        return self.raw.get_extra_info(name, default)
