"""The RBAC policy engine shared by ``envoy.filters.http.rbac`` and ``envoy.filters.network.rbac``.

``Engine.compile(rules, path, notice, http=...)`` turns an ``envoy.config.rbac.v3.RBAC`` into
matcher objects once, at load; ``Engine.evaluate(facts)`` runs them against one ``Facts`` (a
connection, and for HTTP the request headers) and never reads a proto.

Semantics (Envoy's): a policy matches when one of its ``permissions`` **and** one of its
``principals`` match. ``ALLOW``: allowed when some policy matches; ``DENY``: denied when some
policy matches; ``LOG``: always allowed (the match is only reported). Policies are tried in name
order, so the reported policy is the same one Envoy reports.

What moorline cannot know is decided the way Envoy decides it when the information is absent,
and announced with a notice: dynamic ``metadata`` / ``sourced_metadata`` never match (moorline
produces no dynamic metadata; ``invert`` still inverts); a ``filter_state`` key never matches,
except Istio's ``io.istio.peer_principal``, which is the peer certificate's SPIFFE identity (its
first URI SAN), what Istio's own filters put there. What would change the decision in ways
moorline cannot evaluate (CEL ``condition``, ``matcher`` / ``custom`` extensions, ``uri_template``)
is a ``ConfigError``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

from moorline.config.errors import ConfigError
from moorline.config.matchers import StringMatcher
from moorline.protocol.headers import HeaderMap
from moorline.proxy.route_table import HeaderMatcher

ALLOW, DENY, LOG = 0, 1, 2
_ACTION_NAMES = {ALLOW: "ALLOW", DENY: "DENY", LOG: "LOG"}

PEER_PRINCIPAL_KEY = "io.istio.peer_principal"

_EMPTY_HEADERS = HeaderMap()

# (version, address as int)
_Ip = tuple[int, int]

# getpeercert() attribute names -> RFC 2253 short names (the subject as Envoy prints it).
_RDN_SHORT = {
    "commonName": "CN",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "domainComponent": "DC",
    "streetAddress": "STREET",
    "userId": "UID",
}


def _ip_of(addr: Any) -> _Ip | None:
    if not isinstance(addr, tuple) or not addr:
        return None  # a Unix pipe has no address
    try:
        a = ipaddress.ip_address(str(addr[0]).split("%", 1)[0])
    except ValueError:
        return None
    if a.version == 6:
        m = a.ipv4_mapped  # type: ignore[union-attr]
        if m is not None:
            return (4, int(m))
    return (a.version, int(a))


class Facts:
    """What a policy is evaluated against: one connection (``ConnInfo``) and, for HTTP, the
    request headers. Addresses and certificate identities are worked out on first use only."""

    __slots__ = ("_dst", "_ids", "_src", "headers", "info")

    def __init__(self, info: Any, headers: Any = None) -> None:
        self.info = info
        self.headers = headers  # protocol.headers.RequestHeaders, or None on a network filter
        self._src: Any = False
        self._dst: Any = False
        self._ids: Any = None

    def source_ip(self) -> _Ip | None:
        if self._src is False:
            self._src = _ip_of(self.info.remote) if self.info is not None else None
        return self._src  # type: ignore[no-any-return]

    def destination_ip(self) -> _Ip | None:
        if self._dst is False:
            self._dst = _ip_of(self.info.local) if self.info is not None else None
        return self._dst  # type: ignore[no-any-return]

    def destination_port(self) -> int | None:
        local = self.info.local if self.info is not None else None
        if isinstance(local, tuple) and len(local) > 1:
            return int(local[1])
        return None

    def server_name(self) -> bytes:
        sni = self.info.server_name if self.info is not None else None
        return sni.encode() if sni else b""

    def tls(self) -> bool:
        return self.info is not None and self.info.tls is not None

    def identities(self) -> tuple[list[bytes], list[bytes], bytes] | None:
        """(URI SANs, DNS SANs, subject) of the peer certificate, or None without one."""
        if self._ids is None:
            cert = self.info.peer_certificate if self.info is not None else None
            if not cert:
                self._ids = ()
            else:
                uris: list[bytes] = []
                dns: list[bytes] = []
                for kind, value in cert.get("subjectAltName", ()):
                    if kind == "URI":
                        uris.append(str(value).encode())
                    elif kind == "DNS":
                        dns.append(str(value).encode())
                parts = []
                for rdn in reversed(cert.get("subject", ())):
                    parts.append("+".join(f"{_RDN_SHORT.get(k, k)}={v}" for k, v in rdn))
                self._ids = (uris, dns, ",".join(parts).encode())
        return self._ids or None


# ----------------------------------------------------------------------------------- matchers
# One small class per rule shape; ``match(facts)``. Permissions and principals share them.


class _Any:
    __slots__ = ()

    def match(self, f: Facts) -> bool:
        return True


class _Never:
    """What moorline can never see (dynamic metadata, unknown filter state), ``invert`` applied."""

    __slots__ = ("result",)

    def __init__(self, invert: bool = False) -> None:
        self.result = invert

    def match(self, f: Facts) -> bool:
        return self.result


class _And:
    __slots__ = ("items",)

    def __init__(self, items: tuple[Any, ...]) -> None:
        self.items = items

    def match(self, f: Facts) -> bool:
        for m in self.items:
            if not m.match(f):
                return False
        return True


class _Or:
    __slots__ = ("items",)

    def __init__(self, items: tuple[Any, ...]) -> None:
        self.items = items

    def match(self, f: Facts) -> bool:
        for m in self.items:
            if m.match(f):
                return True
        return False


class _Not:
    __slots__ = ("inner",)

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def match(self, f: Facts) -> bool:
        return not self.inner.match(f)


class _Header:
    __slots__ = ("hm",)

    def __init__(self, hm: HeaderMatcher) -> None:
        self.hm = hm

    def match(self, f: Facts) -> bool:
        h = f.headers
        if h is None:  # a network filter has no headers: every header is missing
            return self.hm.match(_EMPTY_HEADERS, b"", b"", b"")
        return self.hm.match(h, h.method, h.authority, h.path)


class _UrlPath:
    __slots__ = ("sm",)

    def __init__(self, sm: StringMatcher) -> None:
        self.sm = sm

    def match(self, f: Facts) -> bool:
        h = f.headers
        if h is None or not h.path:
            return False
        p = h.path
        q = p.find(b"?")
        if q >= 0:
            p = p[:q]
        hsh = p.find(b"#")
        if hsh >= 0:
            p = p[:hsh]
        return self.sm.match(p)


class _Cidr:
    __slots__ = ("mask", "net", "source", "ver")

    def __init__(self, ver: int, net: int, mask: int, source: bool) -> None:
        self.ver = ver
        self.net = net
        self.mask = mask
        self.source = source

    def match(self, f: Facts) -> bool:
        ip = f.source_ip() if self.source else f.destination_ip()
        return ip is not None and ip[0] == self.ver and ip[1] & self.mask == self.net


class _Port:
    __slots__ = ("end", "start")

    def __init__(self, start: int, end: int) -> None:
        self.start = start
        self.end = end  # exclusive

    def match(self, f: Facts) -> bool:
        p = f.destination_port()
        return p is not None and self.start <= p < self.end


class _ServerName:
    __slots__ = ("sm",)

    def __init__(self, sm: StringMatcher) -> None:
        self.sm = sm

    def match(self, f: Facts) -> bool:
        return self.sm.match(f.server_name())


class _Authenticated:
    """The peer certificate: its URI SANs, then DNS SANs, then subject against ``principal_name``;
    without ``principal_name`` any TLS connection (Envoy's rule: the session is the proof)."""

    __slots__ = ("sm",)

    def __init__(self, sm: StringMatcher | None) -> None:
        self.sm = sm

    def match(self, f: Facts) -> bool:
        sm = self.sm
        if sm is None:
            return f.tls()
        ids = f.identities()
        if ids is None:
            return False
        uris, dns, subject = ids
        for v in uris:
            if sm.match(v):
                return True
        for v in dns:
            if sm.match(v):
                return True
        return sm.match(subject)


class _PeerPrincipal:
    """Istio's ``io.istio.peer_principal`` filter state: the peer's SPIFFE identity."""

    __slots__ = ("sm",)

    def __init__(self, sm: StringMatcher) -> None:
        self.sm = sm

    def match(self, f: Facts) -> bool:
        ids = f.identities()
        if ids is None or not ids[0]:
            return False
        return self.sm.match(ids[0][0])


# ----------------------------------------------------------------------------------- compiling

# notice(field_path, why): ``lambda p, m: ctx.notice(m, path=p)`` (policy names may hold brackets).
Notice = Callable[[str, str], None]


def _cidr(r: Any, path: str, source: bool) -> _Cidr:
    plen = int(r.prefix_len.value) if r.HasField("prefix_len") else None
    if not r.address_prefix:
        raise ConfigError(f"{path}.address_prefix", "address_prefix is required")
    try:
        a = ipaddress.ip_address(r.address_prefix)
    except ValueError:
        raise ConfigError(f"{path}.address_prefix", f"invalid address {r.address_prefix!r}") from None
    if plen is None:
        plen = a.max_prefixlen
    if plen > a.max_prefixlen:
        raise ConfigError(f"{path}.prefix_len", f"prefix length {plen} is too long for {r.address_prefix}")
    net = ipaddress.ip_network(f"{r.address_prefix}/{plen}", strict=False)
    return _Cidr(net.version, int(net.network_address), int(net.netmask), source)


def _string(sm: Any, path: str) -> StringMatcher:
    return StringMatcher.compile(sm, path)


def _path_matcher(pm: Any, path: str) -> StringMatcher:
    if pm.WhichOneof("rule") != "path":
        raise ConfigError(f"{path}.path", "path is required")
    return _string(pm.path, f"{path}.path")


def _metadata(md: Any, path: str, notice: Notice) -> _Never:
    notice(
        path,
        "dynamic metadata is never set by moorline, so this matcher never matches"
        + (" (inverted: always matches)" if md.invert else ""),
    )
    return _Never(bool(md.invert))


def compile_permission(p: Any, path: str, notice: Notice, http: bool) -> Any:
    kind = p.WhichOneof("rule")
    kp = f"{path}.{kind}"
    if kind == "any":
        if not p.any:
            raise ConfigError(kp, "any must be true")
        return _Any()
    if kind in ("and_rules", "or_rules"):
        rules = getattr(p, kind).rules
        if not len(rules):
            raise ConfigError(f"{kp}.rules", "at least one rule is required")
        items = tuple(compile_permission(r, f"{kp}.rules[{i}]", notice, http) for i, r in enumerate(rules))
        return _And(items) if kind == "and_rules" else _Or(items)
    if kind == "not_rule":
        return _Not(compile_permission(p.not_rule, kp, notice, http))
    if kind == "header":
        if not http:
            notice(kp, "a network filter sees no headers: matched as a missing header")
        return _Header(HeaderMatcher.compile(p.header, kp))
    if kind == "url_path":
        if not http:
            notice(kp, "a network filter sees no path: never matches")
        return _UrlPath(_path_matcher(p.url_path, kp))
    if kind == "destination_ip":
        return _cidr(p.destination_ip, kp, source=False)
    if kind == "destination_port":
        port = int(p.destination_port)
        if port > 65535:
            raise ConfigError(kp, f"port {port} out of range")
        return _Port(port, port + 1)
    if kind == "destination_port_range":
        r = p.destination_port_range
        if r.start > r.end:
            raise ConfigError(kp, f"start {r.start} is greater than end {r.end}")
        return _Port(int(r.start), int(r.end))
    if kind == "requested_server_name":
        return _ServerName(_string(p.requested_server_name, kp))
    if kind == "metadata":
        return _metadata(p.metadata, kp, notice)
    if kind == "sourced_metadata":
        return _metadata(p.sourced_metadata.metadata_matcher, kp, notice)
    if kind in ("matcher", "uri_template"):
        raise ConfigError(kp, f"RBAC permission {kind!r} is not supported (it would change the decision)")
    if kind is None:
        raise ConfigError(path, "a permission needs one rule (any, header, url_path, and_rules, ...)")
    raise ConfigError(kp, f"RBAC permission {kind!r} is not supported")


def compile_principal(p: Any, path: str, notice: Notice, http: bool) -> Any:
    kind = p.WhichOneof("identifier")
    kp = f"{path}.{kind}"
    if kind == "any":
        if not p.any:
            raise ConfigError(kp, "any must be true")
        return _Any()
    if kind in ("and_ids", "or_ids"):
        ids = getattr(p, kind).ids
        if not len(ids):
            raise ConfigError(f"{kp}.ids", "at least one id is required")
        items = tuple(compile_principal(r, f"{kp}.ids[{i}]", notice, http) for i, r in enumerate(ids))
        return _And(items) if kind == "and_ids" else _Or(items)
    if kind == "not_id":
        return _Not(compile_principal(p.not_id, kp, notice, http))
    if kind == "authenticated":
        a = p.authenticated
        sm = _string(a.principal_name, f"{kp}.principal_name") if a.HasField("principal_name") else None
        return _Authenticated(sm)
    if kind in ("source_ip", "direct_remote_ip", "remote_ip"):
        if kind == "remote_ip" and http:
            notice(kp, "matched against the connection's peer address (x-forwarded-for is not used)")
        return _cidr(getattr(p, kind), kp, source=True)
    if kind == "header":
        if not http:
            notice(kp, "a network filter sees no headers: matched as a missing header")
        return _Header(HeaderMatcher.compile(p.header, kp))
    if kind == "url_path":
        if not http:
            notice(kp, "a network filter sees no path: never matches")
        return _UrlPath(_path_matcher(p.url_path, kp))
    if kind == "filter_state":
        fs = p.filter_state
        mk = fs.WhichOneof("matcher")
        if fs.key == PEER_PRINCIPAL_KEY and mk == "string_match":
            return _PeerPrincipal(_string(fs.string_match, f"{kp}.string_match"))
        notice(kp, f"filter state {fs.key!r} is never set by moorline, so this matcher never matches")
        return _Never()
    if kind == "metadata":
        return _metadata(p.metadata, kp, notice)
    if kind == "sourced_metadata":
        return _metadata(p.sourced_metadata.metadata_matcher, kp, notice)
    if kind == "custom":
        raise ConfigError(kp, "RBAC principal extensions (custom) are not supported")
    if kind is None:
        raise ConfigError(path, "a principal needs one identifier (any, authenticated, source_ip, ...)")
    raise ConfigError(kp, f"RBAC principal {kind!r} is not supported")


class Policy:
    __slots__ = ("name", "permissions", "principals")

    def __init__(self, name: str, permissions: tuple[Any, ...], principals: tuple[Any, ...]) -> None:
        self.name = name
        self.permissions = permissions
        self.principals = principals

    def match(self, f: Facts) -> bool:
        for p in self.permissions:
            if p.match(f):
                break
        else:
            return False
        for q in self.principals:
            if q.match(f):
                return True
        return False


class Engine:
    """A compiled ``envoy.config.rbac.v3.RBAC``: ``action`` and the policies in name order."""

    __slots__ = ("action", "policies")

    def __init__(self, action: int, policies: tuple[Policy, ...]) -> None:
        self.action = action
        self.policies = policies

    @classmethod
    def compile(cls, rules: Any, path: str, notice: Notice, *, http: bool) -> Engine:
        action = int(rules.action)
        if action not in _ACTION_NAMES:
            raise ConfigError(f"{path}.action", f"unknown action {action}")
        if rules.HasField("audit_logging_options"):
            notice(f"{path}.audit_logging_options", "RBAC audit loggers are not supported; ignored")
        if action == LOG:
            notice(f"{path}.action", "LOG allows every request; the access-log hint metadata is not produced")
        policies = []
        for name in sorted(rules.policies):
            pol = rules.policies[name]
            pp = f"{path}.policies[{name!r}]"
            for field in ("condition", "checked_condition"):
                if pol.HasField(field):
                    raise ConfigError(f"{pp}.{field}", "CEL conditions are not supported")
            if not len(pol.permissions):
                raise ConfigError(f"{pp}.permissions", "at least one permission is required")
            if not len(pol.principals):
                raise ConfigError(f"{pp}.principals", "at least one principal is required")
            perms = tuple(
                compile_permission(p, f"{pp}.permissions[{i}]", notice, http)
                for i, p in enumerate(pol.permissions)
            )
            prins = tuple(
                compile_principal(p, f"{pp}.principals[{i}]", notice, http)
                for i, p in enumerate(pol.principals)
            )
            policies.append(Policy(name, perms, prins))
        return cls(action, tuple(policies))

    def evaluate(self, f: Facts) -> tuple[bool, str | None]:
        """(allowed, the name of the policy that matched or None)."""
        matched = None
        for pol in self.policies:
            if pol.match(f):
                matched = pol.name
                break
        if self.action == ALLOW:
            return matched is not None, matched
        if self.action == DENY:
            return matched is None, matched
        return True, matched


def denied_details(policy: str | None) -> str:
    """``rbac_access_denied_matched_policy[<name>]`` (``none`` without a match); each whitespace
    character of the name becomes ``_`` so access-log lines keep their shape."""
    name = "".join("_" if c.isspace() else c for c in policy) if policy else "none"
    return f"rbac_access_denied_matched_policy[{name}]"


class RbacStats:
    """``<prefix>rbac.<rules_stat_prefix>allowed`` / ``denied`` and
    ``<prefix>rbac.<shadow_rules_stat_prefix>shadow_allowed`` / ``shadow_denied``."""

    __slots__ = ("allowed", "denied", "shadow_allowed", "shadow_denied")

    def __init__(self, store: Any, prefix: str, rules_prefix: str = "", shadow_prefix: str = "") -> None:
        if prefix and not prefix.endswith("."):
            prefix += "."
        scope = store.scope(prefix + "rbac.")
        self.allowed = scope.counter(rules_prefix + "allowed")
        self.denied = scope.counter(rules_prefix + "denied")
        self.shadow_allowed = scope.counter(shadow_prefix + "shadow_allowed")
        self.shadow_denied = scope.counter(shadow_prefix + "shadow_denied")


def compile_pair(cfg: Any, path: str, notice: Notice, *, http: bool) -> tuple[Engine | None, Engine | None]:
    """``rules`` / ``shadow_rules`` of an HTTP or network RBAC config (``matcher`` /
    ``shadow_matcher``, the xds matcher API, is a ConfigError)."""
    for field in ("matcher", "shadow_matcher"):
        if cfg.HasField(field):
            raise ConfigError(f"{path}.{field}", "the matcher API is not supported; use rules / shadow_rules")
    rules = Engine.compile(cfg.rules, f"{path}.rules", notice, http=http) if cfg.HasField("rules") else None
    shadow = (
        Engine.compile(cfg.shadow_rules, f"{path}.shadow_rules", notice, http=http)
        if cfg.HasField("shadow_rules")
        else None
    )
    return rules, shadow
