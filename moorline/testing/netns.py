"""A Linux network namespace for tests that need iptables (transparent interception).

``NetNs`` creates a namespace (``ip netns add``) with its loopback up and extra local addresses,
runs iptables inside it, and gives the test two ways in:

- ``ns.argv(cmd)``: a command line that runs ``cmd`` inside (``ip netns exec NS ...``), for child
  processes such as moorline (``start_moorline(..., wrap=ns.argv([]))``);
- ``ns.run(fn, *args)``: call ``fn`` on a thread that has entered the namespace (``setns(2)``), so
  every socket ``fn`` opens, and every thread it starts (the in-process test upstreams' loop
  threads), lives there. Blocking clients (``http.client``, raw sockets) work unchanged.

``close()`` (also on ``with`` exit) stops the thread and deletes the namespace, which takes its
iptables rules and addresses with it: nothing is left in the host's network. Needs root (CI runs
these tests as root) and the ``iptables`` package (scripts/install-deps.sh).
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import itertools
import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
_seq = itertools.count(1)


class NetNsError(RuntimeError):
    """The namespace or a rule in it could not be set up (the message has the command's stderr)."""


def _sh(argv: Sequence[str]) -> str:
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise NetNsError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


def iptables_binary(ns: NetNs | None = None, ipv6: bool = False) -> str:
    """The iptables that works on this kernel: ``iptables`` (whichever backend Debian's
    alternatives chose), else ``iptables-nft``, else ``iptables-legacy`` (``ip6tables...`` with
    ``ipv6``); checked by listing the nat table (inside ``ns`` when given)."""
    errors = []
    base = "ip6tables" if ipv6 else "iptables"
    for name in (base, f"{base}-nft", f"{base}-legacy"):
        path = shutil.which(name) or (
            f"/usr/sbin/{name}" if os.access(f"/usr/sbin/{name}", os.X_OK) else None
        )
        if path is None:
            continue
        argv = [path, "-t", "nat", "-S"]
        try:
            _sh(ns.argv(argv) if ns is not None else argv)
        except NetNsError as e:
            errors.append(str(e))
            continue
        return path
    raise NetNsError(
        "no working iptables (the Debian package iptables provides it; scripts/install-deps.sh "
        "installs it): " + "; ".join(errors)
    )


class NetNs:
    """See the module docstring. ``addresses``: extra IPs (``"10.44.0.2/32"``) put on ``lo``."""

    def __init__(self, prefix: str = "ml", addresses: Sequence[str] = ()) -> None:
        _remove_stale(prefix)
        self.name = f"{prefix}-{os.getpid()}-{next(_seq)}"
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._iptables: dict[bool, str] = {}
        _sh(["ip", "netns", "add", self.name])
        try:
            _sh(["ip", "-n", self.name, "link", "set", "lo", "up"])
            for a in addresses:
                _sh(["ip", "-n", self.name, "addr", "add", a, "dev", "lo"])
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"netns-{self.name}", initializer=self._enter
            )
            self.run(lambda: None)  # fail here, not in the test, when setns is refused
        except BaseException:
            self.close()
            raise

    def _enter(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns({self.name}): {os.strerror(err)}")
        finally:
            os.close(fd)

    def argv(self, cmd: Sequence[str]) -> list[str]:
        """``cmd`` run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *cmd]

    def run(self, fn: Callable[..., T], *args: Any, timeout: float = 60.0, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` on the namespace's thread; its result or its exception."""
        if self._pool is None:
            raise NetNsError(f"namespace {self.name} is closed")
        return self._pool.submit(fn, *args, **kwargs).result(timeout)

    def _binary(self, ipv6: bool) -> str:
        b = self._iptables.get(ipv6)
        if b is None:
            b = self._iptables[ipv6] = iptables_binary(self, ipv6)
        return b

    def iptables(self, *args: str, ipv6: bool = False) -> None:
        _sh(self.argv([self._binary(ipv6), *args]))

    def iptables_rules(self, table: str = "nat", ipv6: bool = False) -> str:
        return _sh(self.argv([self._binary(ipv6), "-t", table, "-S"]))

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=30)

    def __enter__(self) -> NetNs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _remove_stale(prefix: str) -> None:
    """Namespaces an earlier test process (killed before its cleanup ran) left behind: named
    ``<prefix>-<pid>-<n>`` with a pid that no longer runs."""
    try:
        names = os.listdir("/run/netns")
    except OSError:
        return
    for name in names:
        parts = name.split("-")
        if len(parts) != 3 or parts[0] != prefix or not parts[1].isdigit():
            continue
        if int(parts[1]) == os.getpid() or os.path.exists(f"/proc/{parts[1]}"):
            continue
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def redirect_outbound(ns: NetNs, to_port: int, exclude_gid: int, ipv6: bool = False) -> None:
    """istio-iptables' outbound capture, in short: every TCP connection a process in ``ns``
    opens goes to ``to_port`` on loopback (``REDIRECT``), except the proxy's own (its group
    ``exclude_gid``, as Istio excludes uid 1337) and connections to 127.0.0.1 (``::1`` with
    ``ipv6``, through ip6tables)."""
    loopback = "::1/128" if ipv6 else "127.0.0.1/32"

    def ipt(*args: str) -> None:
        ns.iptables(*args, ipv6=ipv6)

    ipt("-t", "nat", "-N", "MOORLINE_REDIRECT")
    ipt("-t", "nat", "-A", "MOORLINE_REDIRECT", "-p", "tcp", "-j", "REDIRECT", "--to-ports", str(to_port))
    ipt("-t", "nat", "-N", "MOORLINE_OUTPUT")
    ipt("-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-j", "MOORLINE_OUTPUT")
    ipt("-t", "nat", "-A", "MOORLINE_OUTPUT", "-m", "owner", "--gid-owner", str(exclude_gid), "-j", "RETURN")
    ipt("-t", "nat", "-A", "MOORLINE_OUTPUT", "-d", loopback, "-j", "RETURN")
    ipt("-t", "nat", "-A", "MOORLINE_OUTPUT", "-j", "MOORLINE_REDIRECT")


def connect_veth(a: NetNs, b: NetNs, addr_a: str, addr_b: str, name: str = "veth0") -> None:
    """A veth pair between ``a`` and ``b`` (``name`` on both sides, which lives inside the
    namespaces only), addresses ``addr_a`` / ``addr_b`` (``"10.45.0.1/24"``), both up. It goes
    away with either namespace."""
    _sh(["ip", "link", "add", name, "netns", a.name, "type", "veth", "peer", "name", name, "netns", b.name])
    for ns, addr in ((a, addr_a), (b, addr_b)):
        _sh(["ip", "-n", ns.name, "addr", "add", addr, "dev", name])
        _sh(["ip", "-n", ns.name, "link", "set", name, "up"])


def redirect_inbound(ns: NetNs, to_port: int, exclude_ports: Sequence[int] = ()) -> None:
    """istio-iptables' inbound capture, in short: TCP connections arriving from outside ``ns``
    go to ``to_port`` (``REDIRECT`` in PREROUTING), except to ``exclude_ports``."""
    ns.iptables("-t", "nat", "-N", "MOORLINE_INBOUND")
    ns.iptables("-t", "nat", "-A", "PREROUTING", "-p", "tcp", "-j", "MOORLINE_INBOUND")
    for p in exclude_ports:
        ns.iptables("-t", "nat", "-A", "MOORLINE_INBOUND", "-p", "tcp", "--dport", str(p), "-j", "RETURN")
    ns.iptables(
        "-t", "nat", "-A", "MOORLINE_INBOUND", "-p", "tcp", "-j", "REDIRECT", "--to-ports", str(to_port)
    )
