"""Process and client helpers for end-to-end tests: moorline, nginx and redis-server as child processes,
Envoy config builders, a raw HTTP/1.1 response reader, access-log polling.

Processes are started in their own session (process group) with stdout/stderr going to files
under the test's ``tmp_path`` (pipes could fill and block the child). Every process started here
is remembered; :func:`stop_all` (called by the pytest fixtures and at interpreter exit) ends the
ones still running, so a failing test leaks nothing.
"""

from __future__ import annotations

import atexit
import contextlib
import grp
import http.client
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

READY_TIMEOUT_S = 20.0
NGINX_BIN = "/usr/sbin/nginx"

# The peers `make test` installs (scripts/install-deps.sh): command -> (Debian path, package).
REQUIRED_PEERS: dict[str, tuple[str, str]] = {
    "nginx": (NGINX_BIN, "nginx"),
    "haproxy": ("/usr/sbin/haproxy", "haproxy"),
    "wrk": ("/usr/bin/wrk", "wrk"),
    "iperf3": ("/usr/bin/iperf3", "iperf3"),
    "h2load": ("/usr/bin/h2load", "nghttp2-client"),
    "nghttp": ("/usr/bin/nghttp", "nghttp2-client"),
    "curl": ("/usr/bin/curl", "curl"),
    "openssl": ("/usr/bin/openssl", "openssl"),
    "redis-server": ("/usr/bin/redis-server", "redis-server"),
    "node": ("/usr/bin/node", "nodejs"),
}

_live: list[_Proc] = []


class ProcStartError(RuntimeError):
    """A child process did not become ready; the message carries its stderr tail."""


class PeerMissingError(RuntimeError):
    """A peer program a test drives (nginx, curl, ...) is not on this machine."""


def processes_mentioning(text: str) -> list[str]:
    """``"<pid>: <command line>"`` of every process but this one whose command line contains
    ``text`` (say, a work directory that should have no process left in it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            found.append(f"{entry.name}: {cmd}")
    return found


def require_binary(name: str) -> str:
    """The path of program ``name`` (a command, an absolute path, or a :data:`REQUIRED_PEERS`
    key); raises :class:`PeerMissingError` naming the package that provides it.

    It raises rather than skips: ``make test`` and CI install every peer, so a test that skipped
    for a missing one would hide a broken install behind a green run."""
    base = os.path.basename(name)
    known = REQUIRED_PEERS.get(base)
    candidates = [name] if os.path.isabs(name) else []
    if known is not None:
        candidates.append(known[0])
    for cand in candidates:
        if os.access(cand, os.X_OK):
            return cand
    found = shutil.which(base)
    if found is not None:
        return found
    how = (
        f"the Debian package {known[1]} provides it; `make test` installs it (scripts/install-deps.sh)"
        if known is not None
        else "install it"
    )
    raise PeerMissingError(
        f"{name} is missing: {how}. Tests that need it fail instead of skipping, so a broken install"
        " cannot pass unseen."
    )


def free_port(host: str = "127.0.0.1") -> int:
    """An ephemeral port that was free a moment ago (bind 0, read it, close).

    Another process may take it before the caller binds it; the kernel hands out ephemeral ports
    in sequence, so parallel pytest-xdist workers rarely collide.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True if a listener could bind ``port`` now (with SO_REUSEADDR, as moorline's listeners
    do: connections in TIME_WAIT from an earlier run do not make it busy)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def wait_until(
    cond: Callable[[], Any],
    what: str,
    timeout: float = 20.0,
    interval: float = 0.05,
    ignore: tuple[type[BaseException], ...] = (),
) -> None:
    """Poll ``cond`` until it is true; ``AssertionError`` naming ``what`` after ``timeout``
    seconds. An exception of one of the ``ignore`` types (e.g. ``OSError`` while a port is not
    open yet) counts as not yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if cond():
                return
        except ignore:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def wait_port(
    host: str, port: int, timeout: float = 10.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Block until ``host:port`` accepts a TCP connection (raises TimeoutError).

    With ``proc``, give up early (ProcStartError) if that process exits meanwhile.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            raise ProcStartError(f"process exited with {proc.returncode} before {host}:{port} accepted")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{host}:{port} did not accept connections within {timeout}s")
        time.sleep(0.05)


def rss_kb(pid: int, with_children: bool = True) -> int:
    """Resident set size (VmRSS, KiB) of ``pid`` plus, by default, all its descendants."""
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
            if with_children:
                for task in Path(f"/proc/{p}/task").iterdir():
                    kids = (task / "children").read_text().split()
                    todo.extend(int(k) for k in kids)
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


@dataclass
class _Proc:
    popen: subprocess.Popen[bytes]
    workdir: Path
    stdout_path: Path
    stderr_path: Path
    name: str

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stdout_text(self) -> str:
        try:
            return self.stdout_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def rss_kb(self) -> int:
        return rss_kb(self.pid)

    def send_signal(self, sig: int) -> None:
        if self.alive():
            self.popen.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """Wait for exit; returns the exit code (raises subprocess.TimeoutExpired)."""
        return self.popen.wait(timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Send ``sig`` to the main process and wait up to ``timeout``; on expiry kill the whole
        process group (which this module created) with SIGKILL. Returns the exit code seen
        after ``sig`` (negative for death by signal), or None if it had to be killed."""
        code: int | None
        if self.popen.poll() is not None:
            code = self.popen.returncode
        else:
            self.popen.send_signal(sig)
            try:
                code = self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                code = None
        self._kill_group()
        with contextlib.suppress(ValueError):
            _live.remove(self)
        return code

    def _kill_group(self) -> None:
        # Workers (--concurrency > 1) share the group; make sure none outlives the test.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        if self.popen.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(5)


def _spawn(
    name: str, argv: list[str], workdir: Path, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], Path, Path]:
    workdir.mkdir(parents=True, exist_ok=True)
    seq = len(list(workdir.glob(f"{name}-*.stderr"))) + 1
    out = workdir / f"{name}-{seq}.stdout"
    err = workdir / f"{name}-{seq}.stderr"
    full_env = dict(os.environ)
    full_env.update(env or {})
    with open(out, "wb") as fo, open(err, "wb") as fe:
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=fo,
            stderr=fe,
            cwd=str(workdir),
            env=full_env,
            start_new_session=True,
        )
    return popen, out, err


@dataclass
class HttpResult:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None


def http_request(
    host: str,
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> HttpResult:
    """One request on a fresh ``http.client`` connection."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return HttpResult(resp.status, list(resp.getheaders()), data)
    finally:
        conn.close()


@dataclass
class MoorlineProc(_Proc):
    admin_host: str = "127.0.0.1"
    admin_port: int | None = None
    config_path: Path | None = None
    argv: list[str] = field(default_factory=list)

    def admin_request(self, method: str, path: str, timeout: float = 5.0) -> HttpResult:
        if self.admin_port is None:
            raise RuntimeError("this moorline has no admin address")
        return http_request(self.admin_host, self.admin_port, method, path, timeout=timeout)

    def admin_get(self, path: str, timeout: float = 5.0) -> HttpResult:
        return self.admin_request("GET", path, timeout)

    def admin_post(self, path: str, timeout: float = 5.0) -> HttpResult:
        return self.admin_request("POST", path, timeout)

    def stats(self) -> dict[str, int | str]:
        """``/stats`` (Envoy text format, ``name: value`` per line) as a dict; integer values
        become ints, histograms and anything else stay strings."""
        res = self.admin_get("/stats")
        if res.status != 200:
            raise RuntimeError(f"/stats answered {res.status}: {res.body[:200]!r}")
        return parse_stats_text(res.body.decode())

    def stat(self, name: str, default: int = 0) -> int:
        v = self.stats().get(name, default)
        return v if isinstance(v, int) else default


def parse_stats_text(text: str) -> dict[str, int | str]:
    out: dict[str, int | str] = {}
    for line in text.splitlines():
        name, sep, value = line.partition(": ")
        if not sep:
            continue
        value = value.strip()
        try:
            out[name.strip()] = int(value)
        except ValueError:
            out[name.strip()] = value
    return out


def admin_port_of(config_text: str) -> tuple[str, int] | None:
    """(host, port) of the bootstrap's ``admin.address.socket_address``, if any."""
    try:
        doc = yaml.safe_load(config_text)
    except yaml.YAMLError:
        return None
    try:
        sa = doc["admin"]["address"]["socket_address"]
        return str(sa.get("address", "127.0.0.1")), int(sa["port_value"])
    except (KeyError, TypeError, ValueError):
        return None


def wait_ready(host: str, port: int, timeout: float, proc: _Proc) -> None:
    """Poll ``GET /ready`` until it answers 200 ``LIVE``."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not proc.alive():
            raise ProcStartError(
                f"{proc.name} exited with {proc.popen.returncode} before /ready; stderr:\n"
                + proc.stderr_text()[-4000:]
            )
        try:
            res = http_request(host, port, "GET", "/ready", timeout=1.0)
            if res.status == 200 and res.body.strip() == b"LIVE":
                return
            last = f"{res.status} {res.body[:100]!r}"
        except OSError as exc:
            last = repr(exc)
        time.sleep(0.05)
    raise ProcStartError(
        f"{proc.name} not ready within {timeout}s (last /ready: {last}); stderr:\n"
        + proc.stderr_text()[-4000:]
    )


def start_moorline(
    config: str | Path | None,
    tmp_path: Path,
    extra_args: list[str] | tuple[str, ...] = (),
    *,
    env: dict[str, str] | None = None,
    ready_timeout: float = READY_TIMEOUT_S,
    wait: str = "ready",
    wait_for: tuple[str, int] | None = None,
    log_level: str = "info",
    subcommand: list[str] | None = None,
    admin: tuple[str, int] | None = None,
    wrap: list[str] | tuple[str, ...] = (),
) -> MoorlineProc:
    """Launch ``python -m moorline run -c <config> --log-level <level> <extra_args>``.

    ``config`` is YAML text (written to a file under ``tmp_path``), a path, or None (no ``-c``:
    the embedded default, admin 127.0.0.1:9901). ``wait``: ``"ready"`` polls the admin
    ``/ready`` for 200 LIVE; ``"port"`` waits for ``wait_for`` (host, port) to accept; ``"none"``
    returns at once. ``admin`` overrides the admin (host, port) read from the config (needed
    with ``--config-yaml``). ``subcommand`` replaces ``run -c ...`` entirely (e.g. ``["proxy",
    "--listen", ...]``). On a failed start the process is stopped and ProcStartError carries
    its stderr. ``wrap`` goes before the command line (``ip netns exec NS setpriv ...``: run
    it inside a network namespace, as another group); the command must exec moorline in
    place, so that stopping the process stops moorline.
    """
    tmp_path = Path(tmp_path)
    config_path: Path | None = None
    text: str | None = None
    if isinstance(config, Path) or (
        isinstance(config, str) and "\n" not in config and Path(config).is_file()
    ):
        config_path = Path(config)
        text = config_path.read_text()
    elif isinstance(config, str):
        tmp_path.mkdir(parents=True, exist_ok=True)
        config_path = tmp_path / f"moorline-{len(list(tmp_path.glob('moorline-*.yaml'))) + 1}.yaml"
        config_path.write_text(config)
        text = config
    if subcommand is not None:
        argv = [sys.executable, "-m", "moorline", *subcommand]
    else:
        argv = [sys.executable, "-m", "moorline", "run"]
        if config_path is not None:
            argv += ["-c", str(config_path)]
        argv += ["--log-level", log_level]
    argv = [*wrap, *argv, *extra_args]
    if admin is None:
        admin = admin_port_of(text) if text is not None else None
    if admin is None and config is None and subcommand is None and "--config-yaml" not in extra_args:
        admin = ("127.0.0.1", 9901)
    repo_root = Path(__file__).resolve().parents[2]
    env2 = {"PYTHONPATH": str(repo_root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env2.update(env or {})
    popen, out, err = _spawn("moorline", argv, tmp_path, env2)
    proc = MoorlineProc(
        popen=popen,
        workdir=tmp_path,
        stdout_path=out,
        stderr_path=err,
        name="moorline",
        admin_host=admin[0] if admin else "127.0.0.1",
        admin_port=admin[1] if admin else None,
        config_path=config_path,
        argv=argv,
    )
    _live.append(proc)
    try:
        if wait == "ready":
            if proc.admin_port is None:
                raise ProcStartError("wait='ready' needs an admin address in the config")
            wait_ready(proc.admin_host, proc.admin_port, ready_timeout, proc)
        elif wait == "port":
            if wait_for is None:
                raise ValueError("wait='port' needs wait_for=(host, port)")
            try:
                wait_port(wait_for[0], wait_for[1], ready_timeout, popen)
            except (TimeoutError, ProcStartError) as exc:
                raise ProcStartError(f"{exc}; stderr:\n{proc.stderr_text()[-4000:]}") from None
    except BaseException:
        proc.stop(signal.SIGKILL, 5)
        raise
    return proc


@dataclass
class NginxProc(_Proc):
    port: int = 0
    conf_path: Path | None = None

    def error_log(self) -> str:
        try:
            return (self.workdir / "error.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""


def nginx_fixed_body(port: int, body: str = "hello from nginx\n") -> str:
    """``http {}`` content: a server on ``port`` answering every request 200 with ``body``."""
    escaped = body.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f"""
    server {{
        listen 127.0.0.1:{port};
        keepalive_requests 1000000;
        location / {{
            default_type text/plain;
            return 200 "{escaped}";
        }}
    }}
"""


def nginx_reverse_proxy(port: int, upstream_port: int, extra_location: str = "") -> str:
    """``http {}`` content: a streaming reverse proxy on ``port`` to 127.0.0.1:upstream_port,
    HTTP/1.1 keep-alive upstream, no request or response buffering (like moorline)."""
    return f"""
    upstream backend {{
        server 127.0.0.1:{upstream_port};
        keepalive 16;
    }}
    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      '';
    }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 0;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Host $host;
            proxy_request_buffering off;
            proxy_buffering off;
            {extra_location}
        }}
    }}
"""


def start_nginx(
    tmp_path: Path, conf_snippet: str, port: int | None = None, ready_timeout: float = 10.0
) -> NginxProc:
    """Run ``nginx -p <tmp> -c <conf> -g 'daemon off; pid <tmp>/nginx.pid;'`` in the foreground.

    ``conf_snippet`` is the inside of the ``http {}`` block (see :func:`nginx_fixed_body`,
    :func:`nginx_reverse_proxy`); ``port`` is the port it listens on (waited for). Logs and
    temp paths stay inside ``tmp_path/nginx``. When run as root the workers keep the current
    user (nginx would otherwise switch to ``nobody``, who cannot enter pytest's 0700 temp dirs).
    """
    require_binary(NGINX_BIN)
    prefix = Path(tmp_path) / "nginx"
    n = 1
    while (prefix.parent / f"nginx{n}").exists():
        n += 1
    prefix = prefix.parent / f"nginx{n}"
    prefix.mkdir(parents=True)
    for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi", "logs"):
        (prefix / d).mkdir()
    user_line = ""
    if os.geteuid() == 0:
        user_line = f"user {pwd.getpwuid(os.getuid()).pw_name} {grp.getgrgid(os.getgid()).gr_name};"
    conf = f"""
{user_line}
worker_processes 1;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
{conf_snippet}
}}
"""
    conf_path = prefix / "nginx.conf"
    conf_path.write_text(conf)
    argv = [
        NGINX_BIN,
        "-p",
        str(prefix),
        "-e",
        str(prefix / "error.log"),
        "-c",
        str(conf_path),
        "-g",
        f"daemon off; pid {prefix}/nginx.pid;",
    ]
    popen, out, err = _spawn("nginx", argv, prefix)
    proc = NginxProc(
        popen=popen,
        workdir=prefix,
        stdout_path=out,
        stderr_path=err,
        name="nginx",
        port=port or 0,
        conf_path=conf_path,
    )
    _live.append(proc)
    if port:
        try:
            wait_port("127.0.0.1", port, ready_timeout, popen)
        except (TimeoutError, ProcStartError) as exc:
            proc.stop(signal.SIGKILL, 5)
            raise ProcStartError(f"nginx: {exc}\n{proc.stderr_text()}\n{proc.error_log()}") from None
    return proc


@dataclass
class RedisProc(_Proc):
    port: int = 0

    def ping(self, timeout: float = 1.0) -> bool:
        """True when the server answers ``PING`` with ``+PONG`` (a loading or stopped one does not)."""
        return redis_ping("127.0.0.1", self.port, timeout)


def redis_ping(host: str, port: int, timeout: float = 1.0) -> bool:
    """One inline ``PING`` over a fresh connection; False on any error or another answer."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(tmp_path: Path, port: int = 0, ready_timeout: float = 10.0) -> RedisProc:
    """Run ``redis-server --port <port> --save '' --appendonly no`` bound to 127.0.0.1 in the
    foreground (a free port when ``port`` is 0; pass the old one to restart a killed server at
    the same address), and wait until it answers ``PING``. Nothing is persisted: a restarted
    server starts empty. A missing redis-server raises :class:`PeerMissingError` (never a skip)."""
    binary = require_binary("redis-server")
    port = port or free_port()
    workdir = Path(tmp_path) / "redis"
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    argv += ["--dir", str(workdir), "--daemonize", "no", "--logfile", ""]
    popen, out, err = _spawn("redis", argv, workdir)
    proc = RedisProc(popen=popen, workdir=workdir, stdout_path=out, stderr_path=err, name="redis", port=port)
    _live.append(proc)
    try:
        wait_until(lambda: not proc.alive() or proc.ping(), f"redis-server on {port}", ready_timeout)
        if not proc.alive():
            raise AssertionError("it exited")
    except AssertionError as exc:
        proc.stop(signal.SIGKILL, 5)
        raise ProcStartError(f"redis-server on {port}: {exc}\n{proc.stdout_text()[-2000:]}") from None
    return proc


@contextlib.contextmanager
def redis_server(tmp_path: Path, port: int = 0) -> Iterator[RedisProc]:
    """:func:`start_redis` for a ``with`` block; the server is stopped when it ends."""
    proc = start_redis(tmp_path, port)
    try:
        yield proc
    finally:
        proc.stop(signal.SIGTERM, 5)


def stop_all() -> None:
    """Stop every process this module started that is still running (SIGKILL after 5 s)."""
    for p in list(_live):
        p.stop(signal.SIGTERM, 5)


atexit.register(stop_all)


# ---------------------------------------------------------------------------------------------
# Envoy config builders
# ---------------------------------------------------------------------------------------------

ACCESS_LOG_FORMAT = (
    "code=%RESPONSE_CODE% flags=%RESPONSE_FLAGS% method=%REQ(:METHOD)% path=%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% "
    "upstream=%UPSTREAM_HOST% cluster=%UPSTREAM_CLUSTER%\n"
)


def _endpoint(host: str, port: int) -> dict[str, Any]:
    return {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}


def cluster(
    name: str,
    endpoints: list[int | tuple[str, int]],
    connect_timeout: str = "1s",
    lb_policy: str = "ROUND_ROBIN",
    **extra: Any,
) -> dict[str, Any]:
    """A STATIC cluster over ``endpoints`` (ports on 127.0.0.1, or (host, port))."""
    eps = [_endpoint("127.0.0.1", e) if isinstance(e, int) else _endpoint(e[0], e[1]) for e in endpoints]
    c: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": connect_timeout,
        "lb_policy": lb_policy,
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": eps}] if eps else []},
    }
    c.update(extra)
    return c


def file_access_log(path: str | Path, fmt: str = ACCESS_LOG_FORMAT) -> list[dict[str, Any]]:
    return [
        {
            "name": "envoy.access_loggers.file",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                "path": str(path),
                "log_format": {"text_format_source": {"inline_string": fmt}},
            },
        }
    ]


def hcm_listener(
    name: str,
    port: int,
    routes: list[dict[str, Any]] | None = None,
    virtual_hosts: list[dict[str, Any]] | None = None,
    hcm_extra: dict[str, Any] | None = None,
    access_log_path: str | Path | None = None,
    stat_prefix: str | None = None,
    host: str = "127.0.0.1",
) -> dict[str, Any]:
    """A listener with one HTTP connection manager (router filter) on ``host:port``."""
    if virtual_hosts is None:
        virtual_hosts = [{"name": "default", "domains": ["*"], "routes": routes or []}]
    hcm: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": stat_prefix or name,
        "codec_type": "AUTO",
        "route_config": {"name": f"{name}_routes", "virtual_hosts": virtual_hosts},
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
    }
    if access_log_path is not None:
        hcm["access_log"] = file_access_log(access_log_path)
    hcm.update(hcm_extra or {})
    return {
        "name": name,
        "address": {"socket_address": {"address": host, "port_value": port}},
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
        ],
    }


def tcp_listener(name: str, port: int, cluster_name: str, host: str = "127.0.0.1") -> dict[str, Any]:
    return {
        "name": name,
        "address": {"socket_address": {"address": host, "port_value": port}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.tcp_proxy",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                            "stat_prefix": name,
                            "cluster": cluster_name,
                        },
                    }
                ]
            }
        ],
    }


def bootstrap(
    listeners: list[dict[str, Any]], clusters: list[dict[str, Any]], admin_port: int | None = None
) -> str:
    """Envoy v3 bootstrap YAML with an admin on 127.0.0.1:``admin_port`` (a free port if None)."""
    doc = {
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port or free_port()}}
        },
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }
    return yaml.safe_dump(doc, sort_keys=False)


def config_http(
    listener_port: int,
    clusters: dict[str, list[int | tuple[str, int]]] | list[dict[str, Any]] | None = None,
    routes: list[dict[str, Any]] | None = None,
    hcm_extra: dict[str, Any] | None = None,
    access_log_path: str | Path | None = None,
    admin_port: int | None = None,
) -> str:
    """One HCM listener on 127.0.0.1:``listener_port`` plus clusters, as bootstrap YAML.

    ``clusters``: ``{name: [port, ...]}`` (STATIC, round robin) or full cluster dicts. ``routes``
    defaults to prefix ``/`` -> the first cluster.
    """
    cl: list[dict[str, Any]]
    if clusters is None:
        cl = []
    elif isinstance(clusters, dict):
        cl = [cluster(n, eps) for n, eps in clusters.items()]
    else:
        cl = list(clusters)
    if routes is None:
        routes = [{"match": {"prefix": "/"}, "route": {"cluster": cl[0]["name"]}}] if cl else []
    lst = hcm_listener(
        "listener_http", listener_port, routes, hcm_extra=hcm_extra, access_log_path=access_log_path
    )
    return bootstrap([lst], cl, admin_port)


# ---------------------------------------------------------------------------------------------
# Raw HTTP/1.1 on sockets, access-log polling
# ---------------------------------------------------------------------------------------------


@dataclass
class RawResponse:
    version: str
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    trailers: list[tuple[str, str]] = field(default_factory=list)
    chunked: bool = False

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k == name:
                return v
        return None


class RawConn:
    """A blocking client socket with a read buffer, for byte-exact HTTP tests."""

    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = bytearray()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawConn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            return False
        self.buf += data
        return True

    def read_until(self, marker: bytes, limit: int = 1 << 20) -> bytes:
        while True:
            i = self.buf.find(marker)
            if i >= 0:
                out = bytes(self.buf[: i + len(marker)])
                del self.buf[: i + len(marker)]
                return out
            if len(self.buf) > limit:
                raise ValueError(f"no {marker!r} within {limit} bytes")
            if not self._fill():
                raise ConnectionError(f"closed before {marker!r}; have {bytes(self.buf[:200])!r}")

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise ConnectionError(f"closed after {len(self.buf)} of {n} bytes")
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def read_to_eof(self) -> bytes:
        while self._fill():
            pass
        out = bytes(self.buf)
        self.buf.clear()
        return out

    def is_closed_by_peer(self, timeout: float = 5.0) -> bool:
        """True if the peer closes (EOF or RST) within ``timeout`` with no further bytes."""
        if self.buf:
            return False
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1)
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
        return data == b""

    def read_response(self, head_request: bool = False, max_body: int = 64 << 20) -> RawResponse:
        """Read one response (skipping none: 1xx heads are returned as responses too)."""
        head = self.read_until(b"\r\n\r\n").decode("latin-1")
        lines = head.split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code, _, reason = rest.partition(" ")
        headers = []
        for line in lines[1:]:
            if not line:
                continue
            k, _, v = line.partition(":")
            headers.append((k.strip().lower(), v.strip()))
        resp = RawResponse(version, int(code), reason, headers, b"")
        status = resp.status
        if head_request or status < 200 or status in (204, 304):
            return resp
        te = (resp.header("transfer-encoding") or "").lower()
        cl = resp.header("content-length")
        if "chunked" in te:
            resp.chunked = True
            body = bytearray()
            while True:
                size_line = self.read_until(b"\r\n").decode("latin-1")
                size = int(size_line.split(";")[0].strip(), 16)
                if size == 0:
                    break
                body += self.read_exact(size)
                if len(body) > max_body:
                    raise ValueError("body too large")
                self.read_exact(2)
            while True:
                line = self.read_until(b"\r\n").decode("latin-1")
                if line == "\r\n":
                    break
                k, _, v = line.partition(":")
                resp.trailers.append((k.strip().lower(), v.strip()))
            resp.body = bytes(body)
        elif cl is not None:
            resp.body = self.read_exact(int(cl))
        elif status == 101:
            return resp
        else:
            resp.body = self.read_to_eof()
        return resp


def raw_exchange(host: str, port: int, data: bytes, timeout: float = 10.0) -> tuple[RawResponse, bool]:
    """Send ``data`` on a new connection, read one response, and report whether the peer then
    closed the connection (within 2 s)."""
    with RawConn(host, port, timeout) as c:
        c.send(data)
        resp = c.read_response()
        closed = c.is_closed_by_peer(2.0)
        return resp, closed


def wait_for_log(path: str | Path, needle: str, timeout: float = 10.0) -> str:
    """Poll the file at ``path`` until a line containing ``needle`` appears; return that line.

    Access logs are written in batches off the request path, so the line shows up a little
    after the response; this polls instead of sleeping a fixed time.
    """
    p = Path(path)
    deadline = time.monotonic() + timeout
    while True:
        try:
            for line in p.read_text(errors="replace").splitlines():
                if needle in line:
                    return line
        except FileNotFoundError:
            pass
        if time.monotonic() > deadline:
            content = p.read_text(errors="replace")[-2000:] if p.exists() else "<no file>"
            raise TimeoutError(f"no line with {needle!r} in {p} within {timeout}s; tail:\n{content}")
        time.sleep(0.05)
