"""Asynchronous DNS resolution for STRICT_DNS / LOGICAL_DNS clusters.

The default backend is ``loop.getaddrinfo`` (the system resolver run in the loop's executor, so
the loop never blocks; uvloop runs it on libuv's thread pool). Tests and embedders inject their
own backend: ``Resolver(fn)`` where ``fn(hostname, family) -> Awaitable[list[(family, ip)]]``.

Concurrent lookups of the same ``(hostname, family)`` share one in-flight future, so a hundred
clusters pointing at the same name cost one query per refresh round, not a hundred.

``dns_lookup_family`` follows Envoy v3 (``envoy.config.cluster.v3.Cluster.DnsLookupFamily``):

- ``AUTO``: IPv6 addresses if the name has any, else IPv4 (Envoy's default; it asks AAAA first
  and falls back to A).
- ``V4_PREFERRED``: IPv4 addresses if any, else IPv6.
- ``V4_ONLY`` / ``V6_ONLY``: that family only (the backend is asked for that family alone).
- ``ALL``: every address, IPv4 first then IPv6.

getaddrinfo gives no TTLs, so ``respect_dns_ttl`` cannot be honoured (the cluster records a
notice); results are not cached beyond the in-flight dedupe: the cluster's refresh rate is the
cache lifetime.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable

# (family, ip literal) pairs, e.g. (socket.AF_INET, "10.0.0.1")
Answer = list[tuple[int, str]]
ResolveFn = Callable[[str, int], Awaitable[Answer]]

LOOKUP_FAMILIES = ("AUTO", "V4_ONLY", "V6_ONLY", "V4_PREFERRED", "ALL")


class DnsError(Exception):
    """A lookup that failed (NXDOMAIN, timeout, no resolver...). ``str()`` is the reason."""


def ip_family(host: str) -> int | None:
    """``AF_INET`` / ``AF_INET6`` when ``host`` is an IP literal, else ``None``."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    return socket.AF_INET6 if ip.version == 6 else socket.AF_INET


def _query_family(lookup_family: str) -> int:
    if lookup_family == "V4_ONLY":
        return socket.AF_INET
    if lookup_family == "V6_ONLY":
        return socket.AF_INET6
    return socket.AF_UNSPEC


def select_family(answer: Answer, lookup_family: str) -> Answer:
    """Apply Envoy's ``dns_lookup_family`` policy to a raw answer; order within a family is kept,
    duplicates (getaddrinfo repeats addresses per socket type) are dropped."""
    seen: set[tuple[int, str]] = set()
    v4: Answer = []
    v6: Answer = []
    for fam, ip in answer:
        if (fam, ip) in seen:
            continue
        seen.add((fam, ip))
        if fam == socket.AF_INET:
            v4.append((fam, ip))
        elif fam == socket.AF_INET6:
            v6.append((fam, ip))
    if lookup_family == "V4_ONLY":
        return v4
    if lookup_family == "V6_ONLY":
        return v6
    if lookup_family == "V4_PREFERRED":
        return v4 or v6
    if lookup_family == "ALL":
        return v4 + v6
    return v6 or v4  # AUTO


class Resolver:
    """Shared asynchronous resolver with in-flight dedupe.

    The in-flight table holds at most one entry per distinct ``(hostname, family)`` being looked up
    right now; entries are removed when the lookup finishes, so it is bounded by the number of
    distinct DNS names in the configuration.
    """

    def __init__(self, fn: ResolveFn | None = None) -> None:
        self._fn: ResolveFn = fn if fn is not None else self._getaddrinfo
        self._inflight: dict[tuple[str, int], asyncio.Future[Answer]] = {}
        self.queries = 0  # backend calls made (after dedupe); for tests and /stats

    @staticmethod
    async def _getaddrinfo(hostname: str, family: int) -> Answer:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(hostname, None, family=family, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as e:
            raise DnsError(f"{hostname}: {e}") from None
        out: Answer = []
        for fam, _type, _proto, _canon, sockaddr in infos:
            if fam in (socket.AF_INET, socket.AF_INET6):
                out.append((int(fam), str(sockaddr[0])))
        return out

    async def resolve(self, hostname: str, lookup_family: str = "AUTO") -> Answer:
        """Addresses of ``hostname`` after the ``lookup_family`` policy. Raises ``DnsError``."""
        fam = ip_family(hostname)
        if fam is not None:
            # An IP literal needs no query (Envoy's resolvers short-circuit these too).
            return select_family([(fam, hostname)], lookup_family)
        qfam = _query_family(lookup_family)
        key = (hostname.lower(), qfam)
        fut = self._inflight.get(key)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._inflight[key] = fut
            self.queries += 1
            err: DnsError | None = None
            try:
                answer = list(await self._fn(hostname, qfam))
            except asyncio.CancelledError:
                fut.set_exception(DnsError(f"{hostname}: lookup cancelled"))
                fut.exception()  # retrieved: no "never retrieved" warning when nobody shares it
                raise
            except DnsError as e:
                err = e
            except Exception as e:  # a broken backend is a failed lookup, not a crash
                err = DnsError(f"{hostname}: {type(e).__name__}: {e}")
            finally:
                del self._inflight[key]
            if err is not None:
                fut.set_exception(err)
                fut.exception()
                raise err
            fut.set_result(answer)
            return select_family(answer, lookup_family)
        answer = await asyncio.shield(fut)
        return select_family(answer, lookup_family)
