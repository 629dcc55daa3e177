"""Real SOFARPC (Bolt) peers for tests and the bolt bench: Ant's Node.js implementation,
``sofa-rpc-node`` on ``sofa-bolt-node``, driven as child processes.

The Node programs live in ``tests/rpc/node/`` (``server.js``, ``client.js``; their npm
dependencies are pinned by its ``package-lock.json`` and installed by ``scripts/install-deps.sh``).
A missing ``node`` or ``node_modules`` raises :class:`~moorline.testing.procs.PeerMissingError`:
tests that need these peers fail, they never skip.

- :func:`start_sofa_server` runs ``server.js`` (``com.alipay.test.HelloService:1.0``: ``echo``,
  ``echoBytes``, ``sleep``, ``die``, ``note``/``notes``, ``whoami``) on a port and waits until it
  listens.
- :func:`run_sofa_client` runs ``client.js`` with a JSON scenario and returns its per-call
  results; :func:`sofa_load` runs its load step (connections x in-flight requests for some
  seconds) and returns calls and QPS.
- :class:`RecordingRelay` is a TCP relay that keeps every byte in both directions, to capture
  real frames between two peers.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moorline.testing.procs import (
    PeerMissingError,
    ProcStartError,
    _live,
    _Proc,
    _spawn,
    require_binary,
    wait_until,
)

SERVICE = "com.alipay.test.HelloService"
VERSION = "1.0"

# The npm project with server.js and client.js; MOORLINE_SOFA_NODE_DIR points elsewhere (a tree
# installed outside the checkout, say).
NODE_DIR = Path(
    os.environ.get("MOORLINE_SOFA_NODE_DIR", Path(__file__).resolve().parents[2] / "tests" / "rpc" / "node")
)

# What one client run may print before it is cut off (a 1 MiB reply is reported by its size, not
# echoed, so real output stays small).
MAX_CLIENT_OUTPUT = 16 * 1024 * 1024


def node_peer() -> tuple[str, Path]:
    """``(node binary, NODE_DIR)``, or :class:`PeerMissingError` saying how to install them."""
    node = require_binary("node")
    if not (NODE_DIR / "node_modules" / "sofa-rpc-node" / "package.json").is_file():
        raise PeerMissingError(
            f"{NODE_DIR}/node_modules has no sofa-rpc-node: `make test` installs it "
            f"(scripts/install-deps.sh runs `npm ci` in {NODE_DIR}). Tests that need it fail instead "
            "of skipping, so a broken install cannot pass unseen."
        )
    return node, NODE_DIR


@dataclass
class SofaServerProc(_Proc):
    port: int = 0


def start_sofa_server(
    port: int = 0, tmp_path: Path | None = None, ready_timeout: float = 20.0
) -> SofaServerProc:
    """Run ``node server.js <port>`` (0: a port the kernel picks; fixed ones only in the
    project's range) and wait until it prints that it listens and the port accepts; ``.port`` is
    the real one. Stopped by ``.stop()`` or, if a test forgets, by
    :func:`moorline.testing.procs.stop_all`. A failed start raises :class:`ProcStartError` with
    its stderr tail."""
    node, node_dir = node_peer()
    workdir = Path(tmp_path) if tmp_path is not None else Path(tempfile.mkdtemp(prefix="sofa-"))
    workdir = workdir / "sofa-server"
    popen, out, err = _spawn("sofa-server", [node, str(node_dir / "server.js"), str(port)], workdir)
    proc = SofaServerProc(
        popen=popen, workdir=workdir, stdout_path=out, stderr_path=err, name="sofa-server", port=port
    )
    _live.append(proc)

    def up() -> bool:
        if not proc.alive():
            return True
        m = re.search(r"^listening (\d+)$", proc.stdout_text(), re.M)
        if m is None:
            return False
        proc.port = int(m.group(1))
        with socket.create_connection(("127.0.0.1", proc.port), timeout=1.0):
            return True

    try:
        wait_until(up, f"sofa-rpc-node server on {port}", ready_timeout, ignore=(OSError,))
        if not proc.alive():
            raise AssertionError(f"it exited with {proc.popen.returncode}")
    except AssertionError as exc:
        proc.stop(signal.SIGKILL, 5)
        raise ProcStartError(f"sofa-rpc-node server on {port}: {exc}\n{proc.stderr_text()[-2000:]}") from None
    return proc


def run_sofa_client_doc(
    target_port: int, scenario: dict[str, Any], host: str = "127.0.0.1", timeout: float = 60.0
) -> dict[str, Any]:
    """Run ``node client.js host:port`` with ``scenario`` on stdin; its whole JSON document
    (``results`` and ``unsolicited``, the frames its raw connection got unasked). A client that
    does not finish within ``timeout`` seconds (a hang) or exits non-zero raises AssertionError."""
    node, node_dir = node_peer()
    try:
        done = subprocess.run(
            [node, str(node_dir / "client.js"), f"{host}:{target_port}", "-"],
            input=json.dumps(scenario).encode(),
            capture_output=True,
            timeout=timeout,
            cwd=str(node_dir),
        )
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stderr or b"")[-2000:].decode(errors="replace")
        raise AssertionError(f"sofa client hung: no result within {timeout}s\n{tail}") from None
    if done.returncode != 0:
        tail = done.stderr[-2000:].decode(errors="replace")
        raise AssertionError(f"sofa client exited with {done.returncode}\n{tail}")
    if len(done.stdout) > MAX_CLIENT_OUTPUT:
        raise AssertionError(f"sofa client printed {len(done.stdout)} bytes, over {MAX_CLIENT_OUTPUT}")
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


def run_sofa_client(
    target_port: int, scenario: dict[str, Any], host: str = "127.0.0.1", timeout: float = 60.0
) -> list[dict[str, Any]]:
    """The per-call results of :func:`run_sofa_client_doc` (see ``client.js`` for the shape:
    ``ok``, ``size``, ``value``, ``bytes_match``, or ``error``, ``code``, ``message``)."""
    results: list[dict[str, Any]] = run_sofa_client_doc(target_port, scenario, host, timeout)["results"]
    return results


def call(
    method: str, *args: dict[str, Any], count: int = 1, concurrency: int = 1, timeout_ms: int = 3000
) -> dict[str, Any]:
    """A ``call`` step (through sofa-rpc-node's RpcClient) for a scenario's ``steps``."""
    return {
        "kind": "call",
        "method": method,
        "args": list(args),
        "count": count,
        "concurrency": concurrency,
        "timeout": timeout_ms,
    }


def sofa_load(
    target_port: int,
    payload_bytes: int = 1024,
    connections: int = 100,
    concurrency: int = 1,
    seconds: float = 10.0,
    host: str = "127.0.0.1",
) -> dict[str, Any]:
    """Load for the bolt bench: ``connections`` raw Bolt connections, each keeping
    ``concurrency`` ``echo`` calls of a ``payload_bytes`` string in flight for ``seconds``.
    Returns ``calls``, ``errors``, ``seconds``, ``qps`` and ``first_error``."""
    step = {
        "kind": "load",
        "method": "echo",
        "args": [{"string": "x" * payload_bytes}],
        "connections": connections,
        "concurrency": concurrency,
        "seconds": seconds,
        "timeout": 5000,
    }
    results = run_sofa_client(target_port, {"steps": [step]}, host, timeout=seconds + 60.0)
    return results[0]


class RecordingRelay:
    """A TCP relay on a free loopback port to ``upstream_port`` that records every byte in both
    directions, per accepted connection (``.client_bytes(i)``: what the client sent,
    ``.server_bytes(i)``: what came back). A thread per direction; the recording is bounded by
    ``limit`` bytes per direction per connection (beyond, it stops recording, still relays)."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1", limit: int = 8 * 1024 * 1024):
        self.upstream = (upstream_host, upstream_port)
        self.limit = limit
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._records: list[tuple[bytearray, bytearray]] = []
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._closed = False
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self._listener.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(self.upstream, timeout=5.0)
            except OSError:
                down.close()
                continue
            up.settimeout(None)
            rec = (bytearray(), bytearray())
            with self._lock:
                if self._closed:
                    down.close()
                    up.close()
                    return
                self._records.append(rec)
                self._socks += [down, up]
            threading.Thread(target=self._pump, args=(down, up, rec[0]), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, down, rec[1]), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, into: bytearray) -> None:
        try:
            while data := src.recv(65536):
                with self._lock:
                    room = self.limit - len(into)
                    if room > 0:
                        into += data[:room]
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._records)

    def client_bytes(self, index: int = 0) -> bytes:
        with self._lock:
            return bytes(self._records[index][0])

    def server_bytes(self, index: int = 0) -> bytes:
        with self._lock:
            return bytes(self._records[index][1])

    def close(self) -> None:
        with self._lock:
            self._closed = True
            socks, self._socks = self._socks, []
        # shutdown wakes the accept() blocked in the other thread; close alone may not.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for s in socks:
            with contextlib.suppress(OSError):
                s.close()

    def __enter__(self) -> RecordingRelay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def rpc_proxy_listener(
    name: str,
    port: int,
    routes: list[dict[str, Any]] | None = None,
    cluster_name: str | None = None,
    protocol: str = "bolt",
    stat_prefix: str = "rpc",
    extra: dict[str, Any] | None = None,
    host: str = "127.0.0.1",
) -> dict[str, Any]:
    """A listener with one ``moorline.filters.network.rpc_proxy`` (the issue 10 schema, as an
    ``xds.type.v3.TypedStruct``) on ``host:port``: ``routes`` as given, or one catch-all route to
    ``cluster_name``; ``extra`` merges more top-level fields (``access_log``,
    ``max_pending_per_connection``)."""
    if routes is None:
        if cluster_name is None:
            raise ValueError("rpc_proxy_listener needs routes or cluster_name")
        routes = [{"match": {}, "route": {"cluster": cluster_name}}]
    value: dict[str, Any] = {"stat_prefix": stat_prefix, "protocol": protocol, "routes": routes}
    value.update(extra or {})
    return {
        "name": name,
        "address": {"socket_address": {"address": host, "port_value": port}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "moorline.filters.network.rpc_proxy",
                        "typed_config": {
                            "@type": "type.googleapis.com/xds.type.v3.TypedStruct",
                            "type_url": "type.googleapis.com/moorline.filters.network.rpc_proxy.v1.RpcProxy",
                            "value": value,
                        },
                    }
                ]
            }
        ],
    }
