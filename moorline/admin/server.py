"""Envoy-compatible admin HTTP API.

Not the hot path: one asyncio task per admin connection, ``httptools`` for parsing,
handlers run synchronously against the ``AdminHost`` (``moorline.server.Server``).

HTTP behaviour:
- HTTP/1.1 keep-alive and pipelining (responses in request order); HTTP/1.0 closes
  unless the client asks for keep-alive.
- A request (request line + headers) larger than ``MAX_HEAD`` answers 431, a body
  larger than ``MAX_BODY`` answers 413; bytes that do not parse answer 400. All three
  close the connection. These limits bound the memory a connection can hold.
- Idle keep-alive connections are closed after ``IDLE_TIMEOUT`` seconds.
- Endpoints that change server state require POST, as Envoy's do: any other method
  gets ``405 Method GET not allowed, POST required.``. ``GET /logging`` without
  parameters only lists levels and is allowed (Envoy answers 405 there).
- Unknown paths answer 404 with the list of endpoints, like Envoy.
- ``admin.allow_paths`` (Envoy string matchers on the path, query excluded): when set, a path
  that none of them matches answers 403, whatever the endpoint.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import http
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlsplit

import httptools

from moorline.config.matchers import StringMatcher
from moorline.observability import logging as mlog
from moorline.observability import render
from moorline.observability.stats import Counter, Store

log = logging.getLogger("moorline.admin")

MAX_HEAD = 64 * 1024  # request line + headers
MAX_BODY = 64 * 1024  # request body (admin requests carry none in practice)
READ_SIZE = 64 * 1024  # bytes read per socket read
IDLE_TIMEOUT = 300.0  # seconds an idle keep-alive connection is kept

TEXT = "text/plain; charset=UTF-8"
JSON = "application/json"
HTML = "text/html; charset=UTF-8"
PROMETHEUS = "text/plain; version=0.0.4; charset=UTF-8"


class AdminHost(Protocol):
    """What the admin API needs from the server (``moorline.server.Server``)."""

    stats: Store

    def is_ready(self) -> bool:
        """True when LIVE; ``/ready`` then answers 200 ``LIVE``, else 503 with ``server_info()["state"]``."""
        ...

    def server_info(self) -> dict[str, Any]:
        """Envoy's ServerInfo JSON: version, state ("LIVE", "DRAINING", "PRE_INITIALIZING",
        "INITIALIZING"), uptime_current_epoch, uptime_all_epochs, hot_restart_version,
        command_line_options, node."""
        ...

    def config_dump(self, include_eds: bool = False) -> dict[str, Any]:
        """``/config_dump`` JSON, secrets already redacted; ``include_eds`` adds the
        ``EndpointsConfigDump`` (every cluster's endpoints)."""
        ...

    def clusters_text(self) -> str:
        """Envoy's ``/clusters`` text (``cluster::host:port::health_flags::healthy`` lines)."""
        ...

    def clusters_json(self) -> dict[str, Any]: ...

    def listeners_info(self) -> list[dict[str, Any]]:
        """One dict per listener: ``name`` and ``local_address`` as Envoy's ListenerStatus JSON
        (``{"socket_address": {"address": ..., "port_value": ...}}`` / ``{"pipe": {"path": ...}}``),
        or an ``(ip, port)`` tuple / pipe path; an optional ``address`` string is used for the
        text form."""
        ...

    def set_health_check_failed(self, failed: bool) -> None: ...

    def drain_listeners(
        self, inbound_only: bool = False, graceful: bool = False, skip_exit: bool = False
    ) -> None:
        """``/drain_listeners`` with its query options (``inboundonly``, ``graceful``, ``skip_exit``)."""
        ...

    def quit(self) -> None: ...


@dataclass(slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = TEXT
    after: Callable[[], None] | None = None  # run once the response is fully written
    close: bool = False


def _text(status: int, text: str) -> Response:
    return Response(status, text.encode("utf-8"), TEXT)


def _json(obj: Any, status: int = 200) -> Response:
    return Response(status, (json.dumps(obj, indent=2, default=str) + "\n").encode("utf-8"), JSON)


# ---------------------------------------------------------------------------
# Request reading
# ---------------------------------------------------------------------------


@dataclass(slots=True)
class Request:
    method: str
    target: str
    headers: list[tuple[bytes, bytes]]
    body: bytes
    keep_alive: bool
    version: str = "1.1"


class RequestError(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass
class _Reader:
    """httptools callbacks collecting whole requests; sizes checked as bytes arrive."""

    ready: collections.deque[Request] = field(default_factory=collections.deque)
    error: RequestError | None = None
    continue_needed: bool = False
    upgraded: bool = False
    _url: bytearray = field(default_factory=bytearray)
    _headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    _name: bytes = b""
    _body: bytearray = field(default_factory=bytearray)
    _head_size: int = 0
    _parser: Any = None

    def __post_init__(self) -> None:
        self._parser = httptools.HttpRequestParser(self)

    def feed(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # The admin API speaks no upgraded protocol: answer what is complete, then close.
            self.upgraded = True
        except httptools.HttpParserError as e:
            if self.error is None:
                self.error = RequestError(400, f"bad request: {e}")

    # -- httptools callbacks --
    def on_message_begin(self) -> None:
        self._url.clear()
        self._headers = []
        self._body.clear()
        self._head_size = 0

    def _grow_head(self, n: int) -> bool:
        self._head_size += n
        if self._head_size > MAX_HEAD:
            if self.error is None:
                self.error = RequestError(431, "request headers too large")
            return False
        return self.error is None

    def on_url(self, url: bytes) -> None:
        if self._grow_head(len(url)):
            self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._grow_head(len(name) + len(value) + 4):
            self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        for k, v in self._headers:
            if k == b"expect" and v.lower() == b"100-continue":
                self.continue_needed = True

    def on_body(self, body: bytes) -> None:
        if self.error is not None:
            return
        if len(self._body) + len(body) > MAX_BODY:
            self.error = RequestError(413, "request body too large")
            return
        self._body += body

    def on_message_complete(self) -> None:
        if self.error is not None:
            return
        p = self._parser
        self.ready.append(
            Request(
                method=p.get_method().decode("ascii", "replace"),
                target=self._url.decode("utf-8", "replace"),
                headers=self._headers,
                body=bytes(self._body),
                keep_alive=bool(p.should_keep_alive()),
                version=p.get_http_version(),
            )
        )


# ---------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------

Handler = Callable[[Request, dict[str, str]], Response]


def compile_allow_paths(matchers: Any, path: str) -> tuple[StringMatcher, ...]:
    """``admin.allow_paths`` (``envoy.type.matcher.v3.StringMatcher`` list) compiled at load, so a
    bad regex is a config error; empty means every path is allowed."""
    return tuple(StringMatcher.compile(m, f"{path}[{i}]") for i, m in enumerate(matchers))


class AdminServer:
    def __init__(
        self,
        host: AdminHost,
        address: tuple[str, str, int | None],
        allow_paths: tuple[StringMatcher, ...] = (),
    ) -> None:
        self.host = host
        self.address = address
        self.allow_paths = allow_paths
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        # path -> (handler, mutates server state, help)
        self._routes: dict[str, tuple[Handler, bool, str]] = {
            "/": (self._h_index, False, "Admin home page"),
            "/help": (self._h_help, False, "print out list of admin commands"),
            "/ready": (self._h_ready, False, "print server state, return 200 if LIVE, otherwise return 503"),
            "/server_info": (self._h_server_info, False, "print server version/status information"),
            "/stats": (
                self._h_stats,
                False,
                "print server stats (?filter=REGEX, ?usedonly, ?format=json|prometheus)",
            ),
            "/stats/prometheus": (self._h_prometheus, False, "print server stats in prometheus format"),
            "/config_dump": (self._h_config_dump, False, "dump current Envoy configs"),
            "/clusters": (self._h_clusters, False, "upstream cluster status (?format=json)"),
            "/listeners": (self._h_listeners, False, "print listener info (?format=json)"),
            "/logging": (
                self._h_logging,
                True,
                "query/change logging levels (?level=LEVEL, ?COMPONENT=LEVEL)",
            ),
            "/healthcheck/fail": (self._h_hc_fail, True, "cause the server to fail health checks"),
            "/healthcheck/ok": (self._h_hc_ok, True, "cause the server to pass health checks"),
            "/drain_listeners": (
                self._h_drain,
                True,
                "drain listeners (?graceful, ?inboundonly, ?skip_exit)",
            ),
            "/reset_counters": (self._h_reset_counters, True, "reset all counters to zero"),
            "/quitquitquit": (self._h_quit, True, "exit the server"),
            "/memory": (self._h_memory, False, "print current allocation/heap usage"),
            "/runtime": (self._h_runtime, False, "print runtime values"),
        }

    # -- lifecycle --

    async def start(self) -> None:
        kind, where, port = self.address
        if kind == "pipe":
            self._server = await asyncio.start_unix_server(self._serve, path=where)
        else:
            self._server = await asyncio.start_server(self._serve, where, port or 0, reuse_address=True)
        log.info("admin address: %s", self.bound_address)

    @property
    def bound_address(self) -> tuple[str, int]:
        """``(ip, port)`` actually bound (the real port when configured with 0); ``(path, 0)`` for a pipe."""
        kind, where, _ = self.address
        if kind == "pipe" or self._server is None:
            return (where, 0)
        name = self._server.sockets[0].getsockname()
        return (name[0], name[1])

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for w in list(self._writers):
            w.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 5.0)

    # -- connections --

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        # High-water mark 0: drain() returns only when the kernel took every byte, so
        # actions that must follow the response (quitquitquit) really come after it.
        writer.transport.set_write_buffer_limits(high=0)
        rd = _Reader()
        try:
            while True:
                try:
                    data = await asyncio.wait_for(reader.read(READ_SIZE), IDLE_TIMEOUT)
                except TimeoutError:
                    break
                if not data:
                    break
                rd.feed(data)
                if rd.continue_needed and rd.error is None:
                    rd.continue_needed = False
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                closing = False
                while rd.ready:
                    req = rd.ready.popleft()
                    resp = self.handle(req)
                    closing = resp.close or not req.keep_alive or (rd.upgraded and not rd.ready)
                    writer.write(self._encode(req, resp, closing))
                    await writer.drain()
                    if resp.after is not None:
                        try:
                            resp.after()
                        except Exception:
                            log.exception("admin: post-response action failed")
                    if closing:
                        break
                if closing:
                    break
                if rd.error is not None:
                    err = rd.error
                    resp = _text(err.status, err.detail + "\n")
                    writer.write(self._encode(None, resp, True))
                    await writer.drain()
                    break
                if rd.upgraded:
                    break
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    @staticmethod
    def _encode(req: Request | None, resp: Response, closing: bool) -> bytes:
        reason = http.HTTPStatus(resp.status).phrase
        head = [
            f"HTTP/1.1 {resp.status} {reason}",
            f"content-type: {resp.content_type}",
            f"content-length: {len(resp.body)}",
            "cache-control: no-cache, max-age=0",
            "x-content-type-options: nosniff",
        ]
        if closing:
            head.append("connection: close")
        elif req is not None and req.version == "1.0":
            head.append("connection: keep-alive")
        out = ("\r\n".join(head) + "\r\n\r\n").encode("ascii")
        if req is not None and req.method == "HEAD":
            return out
        return out + resp.body

    # -- dispatch --

    def handle(self, req: Request) -> Response:
        """Answer one request (public so tests and embedders can call it without sockets)."""
        parts = urlsplit(req.target)
        path = parts.path or "/"
        params = dict(parse_qsl(parts.query, keep_blank_values=True))
        if self.allow_paths and not any(
            m.match(path.encode("utf-8", "surrogateescape")) for m in self.allow_paths
        ):
            log.info("admin: request to path %s not in allow_paths", path)
            return _text(403, "path not allowed by admin.allow_paths\n")
        route = self._routes.get(path)
        if route is None:
            return _text(404, "invalid path. " + self._help_text())
        handler, mutates, _ = route
        if mutates and req.method != "POST" and not (path == "/logging" and not params):
            return _text(405, f"Method {req.method} not allowed, POST required.")
        try:
            return handler(req, params)
        except Exception:
            log.exception("admin: handler for %s failed", path)
            return _text(500, "internal error\n")

    def _help_text(self) -> str:
        lines = ["admin commands are:"]
        lines += [f"  {p}: {h}" for p, (_, _, h) in sorted(self._routes.items())]
        return "\n".join(lines) + "\n"

    # -- handlers --

    def _h_index(self, req: Request, params: dict[str, str]) -> Response:
        rows = []
        for p, (_, mutates, h) in sorted(self._routes.items()):
            if mutates:
                link = f'<form action="{p}" method="post"><button>{p}</button></form>'
            else:
                link = f'<a href="{p}">{p}</a>'
            rows.append(f"<tr><td>{link}</td><td>{h}</td></tr>")
        body = (
            "<!DOCTYPE html><html><head><title>moorline admin</title></head><body>"
            "<h1>moorline admin</h1><table>" + "".join(rows) + "</table></body></html>\n"
        )
        return Response(200, body.encode("utf-8"), HTML)

    def _h_help(self, req: Request, params: dict[str, str]) -> Response:
        return _text(200, self._help_text())

    def _h_ready(self, req: Request, params: dict[str, str]) -> Response:
        if self.host.is_ready():
            return _text(200, "LIVE\n")
        state = "PRE_INITIALIZING"
        with contextlib.suppress(Exception):
            state = str(self.host.server_info().get("state", state))
        return _text(503, state + "\n")

    def _h_server_info(self, req: Request, params: dict[str, str]) -> Response:
        return _json(self.host.server_info())

    def _stats_selection(self, params: dict[str, str]) -> tuple[str | None, bool, Response | None]:
        flt = params.get("filter") or None
        if flt is not None:
            try:
                re.compile(flt)
            except re.error as e:
                return None, False, _text(400, f"Invalid regex: {e}\n")
        return flt, "usedonly" in params, None

    def _h_stats(self, req: Request, params: dict[str, str]) -> Response:
        flt, used_only, err = self._stats_selection(params)
        if err is not None:
            return err
        fmt = params.get("format", "")
        store = self.host.stats
        if fmt == "json":
            return Response(200, render.render_json(store, flt, used_only).encode("utf-8"), JSON)
        if fmt == "prometheus":
            return Response(200, render.render_prometheus(store, flt, used_only).encode("utf-8"), PROMETHEUS)
        if fmt not in ("", "text"):
            return _text(400, f"usage: /stats?format=json|prometheus|text (unknown format {fmt!r})\n")
        return _text(200, render.render_text(store, flt, used_only))

    def _h_prometheus(self, req: Request, params: dict[str, str]) -> Response:
        flt, used_only, err = self._stats_selection(params)
        if err is not None:
            return err
        return Response(
            200, render.render_prometheus(self.host.stats, flt, used_only).encode("utf-8"), PROMETHEUS
        )

    def _h_config_dump(self, req: Request, params: dict[str, str]) -> Response:
        # ?resource=, ?mask= and ?include_eds as in Envoy; ?name_regex is accepted and ignored.
        from moorline.admin.config_dump import ViewError, select

        dump = self.host.config_dump(include_eds="include_eds" in params)
        try:
            return _json(select(dump, params.get("resource"), params.get("mask")))
        except ViewError as e:
            return _text(404, f"{e}\n")

    def _h_clusters(self, req: Request, params: dict[str, str]) -> Response:
        if params.get("format") == "json":
            return _json(self.host.clusters_json())
        return _text(200, self.host.clusters_text())

    def _h_listeners(self, req: Request, params: dict[str, str]) -> Response:
        infos = self.host.listeners_info()
        if params.get("format") == "json":
            return _json({"listener_statuses": [_listener_status(i) for i in infos]})
        return _text(200, "".join(f"{i.get('name', '')}::{_listener_address(i)}\n" for i in infos))

    def _h_logging(self, req: Request, params: dict[str, str]) -> Response:
        for name, value in params.items():
            ok = mlog.set_level(value) if name == "level" else mlog.set_level(value, name)
            if not ok:
                usage = (
                    "usage: /logging?<name>=<level> (change single level)\n"
                    "usage: /logging?level=<level> (change all levels)\n"
                    f"levels: {', '.join(mlog.LEVELS)}\n"
                )
                return _text(404, f"invalid logging parameter {name}={value}\n" + usage)
        lines = ["active loggers:"] + [f"  {n}: {lv}" for n, lv in mlog.levels().items()]
        return _text(200, "\n".join(lines) + "\n")

    def _h_hc_fail(self, req: Request, params: dict[str, str]) -> Response:
        self.host.set_health_check_failed(True)
        return _text(200, "OK\n")

    def _h_hc_ok(self, req: Request, params: dict[str, str]) -> Response:
        self.host.set_health_check_failed(False)
        return _text(200, "OK\n")

    def _h_drain(self, req: Request, params: dict[str, str]) -> Response:
        if "skip_exit" in params and "graceful" not in params:
            return _text(400, "skip_exit requires graceful\n")
        self.host.drain_listeners(
            inbound_only="inboundonly" in params,
            graceful="graceful" in params,
            skip_exit="skip_exit" in params,
        )
        return _text(200, "OK\n")

    def _h_reset_counters(self, req: Request, params: dict[str, str]) -> Response:
        for s in self.host.stats:
            if isinstance(s, Counter):
                s.value = 0
        return _text(200, "OK\n")

    def _h_quit(self, req: Request, params: dict[str, str]) -> Response:
        resp = _text(200, "OK\n")
        resp.after = self.host.quit
        resp.close = True
        return resp

    def _h_memory(self, req: Request, params: dict[str, str]) -> Response:
        rss, size = _proc_memory()
        # uint64 fields are strings in proto3 JSON, as Envoy prints them.
        return _json(
            {
                "allocated": str(rss),
                "heap_size": str(size),
                "pageheap_unmapped": "0",
                "pageheap_free": "0",
                "total_thread_cache": "0",
                "total_physical_bytes": str(rss),
            }
        )

    def _h_runtime(self, req: Request, params: dict[str, str]) -> Response:
        return _json({"layers": [], "entries": {}})


def _local_address(info: dict[str, Any]) -> dict[str, Any]:
    """Envoy's ``local_address`` JSON from what the host gave: that dict already, an
    ``(ip, port)`` tuple, or a pipe path."""
    a = info.get("local_address")
    if isinstance(a, dict):
        return a
    if isinstance(a, tuple | list) and len(a) >= 2:
        return {"socket_address": {"address": str(a[0]), "port_value": int(a[1])}}
    if isinstance(a, str) and a:
        return {"pipe": {"path": a}}
    return {}


def _listener_status(info: dict[str, Any]) -> dict[str, Any]:
    return {"name": info.get("name", ""), "local_address": _local_address(info)}


def _listener_address(info: dict[str, Any]) -> str:
    if isinstance(info.get("address"), str):
        return str(info["address"])
    addr = _local_address(info)
    sa = addr.get("socket_address")
    if sa:
        host = sa.get("address", "")
        port = sa.get("port_value", 0)
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    pipe = addr.get("pipe")
    return str(pipe.get("path", "")) if pipe else ""


def _proc_memory() -> tuple[int, int]:
    """(resident bytes, virtual size bytes) from /proc/self/status; zeros where unavailable."""
    rss = size = 0
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("VmSize:"):
                    size = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return rss, size
