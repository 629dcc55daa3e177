"""Access logs: Envoy's ``access_log`` config compiled into loggers that write in batches.

Request path cost: ``AccessLogger.log(info)`` appends the ``StreamInfo`` to a list
and, for the first entry of a batch, schedules one flush with ``loop.call_soon``.
Filters, formatting and the write happen in that flush, off the request path,
with one ``write`` per batch.

Bounds: at most ``MAX_PENDING`` (10,000) entries wait per logger; beyond that
entries are dropped and counted in the ``access_log.dropped`` counter.

File writes are blocking: a batch is small (one line per request since the last
loop iteration) and regular files do not block for long; a file on a stalled
network filesystem would stall the loop, as it does Envoy's flush thread.

Supported: ``envoy.access_loggers.file`` (``FileAccessLog``: ``path``, ``log_format``
with ``text_format`` / ``text_format_source`` / ``json_format`` and
``omit_empty_values``, legacy ``format`` / ``json_format`` / ``typed_json_format``),
``envoy.access_loggers.stdout`` and ``envoy.access_loggers.stderr``. Filters:
``status_code_filter``, ``duration_filter``, ``response_flag_filter``, ``and_filter``,
``or_filter``, and ``not_health_check_filter`` (always true: moorline does not mark
health-check requests). Other filters are a ``ConfigError``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import sys
import time
import weakref
from collections.abc import Callable
from typing import Any

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.extensions.access_loggers.file.v3 import file_pb2
from envoy.extensions.access_loggers.stream.v3 import stream_pb2
from google.protobuf import json_format as pb_json

from moorline.config import registry
from moorline.config.errors import ConfigError
from moorline.observability.stats import Counter
from moorline.observability.stream_info import StreamInfo

log = logging.getLogger("moorline.access_log")

MAX_PENDING = 10_000  # entries waiting per logger before new ones are dropped
# With a flush interval (``--file-flush-interval-msec``), a batch this long is written without
# waiting for the timer: about Envoy's 64 KiB flush buffer at ~256 bytes a line.
FLUSH_AT = 256

DEFAULT_FORMAT = (
    '[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" '
    "%RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% "
    '%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" '
    '"%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%"\n'
)

FILE_TYPE = "envoy.extensions.access_loggers.file.v3.FileAccessLog"
STDOUT_TYPE = "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"
STDERR_TYPE = "envoy.extensions.access_loggers.stream.v3.StderrAccessLog"

# ---------------------------------------------------------------------------
# Formatter
# ---------------------------------------------------------------------------

# A compiled command: StreamInfo -> str | int | None (None prints "-" / null).
Getter = Callable[[StreamInfo], Any]

_COMMAND = re.compile(r"%([A-Z0-9_]+)(?:\(([^)]*)\))?(?::(\d+))?%")


def _header_getter(attr: str, arg: str, path: str, cmd: str) -> Getter:
    if not arg:
        raise ConfigError(path, f"%{cmd}()% needs a header name")
    names = arg.split("?")
    if len(names) > 2 or not all(names):
        raise ConfigError(path, f"%{cmd}({arg})%: expected HEADER or HEADER?ALTERNATIVE")
    keys = [n.lower().encode("ascii", "replace") for n in names]
    strip_query = cmd == "REQ_WITHOUT_QUERY"

    def get(info: StreamInfo) -> str | None:
        hm = getattr(info, attr)
        if hm is None:
            return None
        for k in keys:
            vals = hm.get_all(k)
            if vals:
                v = b",".join(vals).decode("utf-8", "backslashreplace")
                if strip_query:
                    v = v.split("?", 1)[0]
                return v
        return None

    return get


def _without_port(addr: str | None) -> str | None:
    if not addr:
        return None
    if addr.startswith("["):
        return addr[1 : addr.find("]")] if "]" in addr else addr
    if addr.count(":") == 1:
        return addr.rsplit(":", 1)[0]
    return addr


def _ms(a: float | None, b: float | None) -> int | None:
    if a is None or b is None:
        return None
    return int((b - a) * 1000)


_HOSTNAME = socket.gethostname()

_SIMPLE: dict[str, Getter] = {
    "RESPONSE_CODE": lambda i: i.response_code,
    "RESPONSE_FLAGS": lambda i: i.flags_str(),
    "RESPONSE_CODE_DETAILS": lambda i: i.response_code_details,
    "DURATION": lambda i: i.duration_ms(),
    # moorline records no "last downstream byte received" time; Envoy prints "-" too when unknown.
    "REQUEST_DURATION": lambda i: None,
    "RESPONSE_DURATION": lambda i: _ms(i.start_mono, i.first_upstream_rx_mono),
    "BYTES_RECEIVED": lambda i: i.bytes_received,
    "BYTES_SENT": lambda i: i.bytes_sent,
    "PROTOCOL": lambda i: i.protocol,
    "UPSTREAM_HOST": lambda i: i.upstream_host,
    "UPSTREAM_CLUSTER": lambda i: i.upstream_cluster,
    "UPSTREAM_LOCAL_ADDRESS": lambda i: i.upstream_local_address,
    "UPSTREAM_TRANSPORT_FAILURE_REASON": lambda i: i.upstream_transport_failure_reason,
    "DOWNSTREAM_REMOTE_ADDRESS": lambda i: i.downstream_remote_address,
    "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT": lambda i: _without_port(i.downstream_remote_address),
    "DOWNSTREAM_LOCAL_ADDRESS": lambda i: i.downstream_local_address,
    "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT": lambda i: _without_port(i.downstream_local_address),
    "REQUESTED_SERVER_NAME": lambda i: i.requested_server_name,
    "ROUTE_NAME": lambda i: i.route_name,
    "CONNECTION_ID": lambda i: i.connection_id,
    "UPSTREAM_REQUEST_ATTEMPT_COUNT": lambda i: i.attempt_count,
    "HOSTNAME": lambda i: _HOSTNAME,
    # Why a network filter closed the connection (Envoy: RBAC's "rbac_access_denied_matched_policy");
    # moorline's network filters record none yet, so "-" as Envoy prints when unset.
    "CONNECTION_TERMINATION_DETAILS": lambda i: getattr(i, "connection_termination_details", None),
    # x-protocol requests (moorline.proxy.rpc_proxy); "-" elsewhere.
    "RPC_SERVICE": lambda i: i.rpc_service,
    "RPC_METHOD": lambda i: i.rpc_method,
    "RPC_PROTOCOL": lambda i: i.rpc_protocol,
    "RPC_STATUS": lambda i: i.rpc_status,
}

# Commands whose value is a number in JSON output.
_NUMERIC = frozenset(
    {
        "RESPONSE_CODE",
        "DURATION",
        "REQUEST_DURATION",
        "RESPONSE_DURATION",
        "BYTES_RECEIVED",
        "BYTES_SENT",
        "CONNECTION_ID",
        "UPSTREAM_REQUEST_ATTEMPT_COUNT",
        "RPC_STATUS",
    }
)

DEFAULT_TIME_FORMAT = "%Y-%m-%dT%H:%M:%E3SZ"
_TIME_SPECIAL = re.compile(r"%(?:E(\d)S|(\d)?f|s|%)")


def compile_time_format(fmt: str) -> Callable[[float], str]:
    """strftime format (UTC) plus Envoy's extensions: ``%E<n>S`` seconds with n fraction
    digits, ``%<n>f`` n fraction digits (``%f``: 9), ``%s`` epoch seconds."""
    pieces: list[tuple[str, int]] = []  # (strftime text, 0) or ("", kind)
    pos = 0
    for m in _TIME_SPECIAL.finditer(fmt):
        if m.start() > pos:
            pieces.append((fmt[pos : m.start()], 0))
        tok = m.group(0)
        if tok == "%%":
            pieces.append(("%%", 0))
        elif tok == "%s":
            pieces.append(("", -1))
        elif m.group(1) is not None:
            pieces.append(("", 100 + int(m.group(1))))  # seconds + n digits
        else:
            pieces.append(("", int(m.group(2) or 9)))  # n fraction digits
        pos = m.end()
    if pos < len(fmt):
        pieces.append((fmt[pos:], 0))

    def render(t: float) -> str:
        st = time.gmtime(t)
        # floor, so the fraction never rounds up past the second strftime printed
        frac = f"{min(int((t - int(t)) * 1e9), 999_999_999):09d}"
        out = []
        for text, kind in pieces:
            if kind == 0:
                out.append(time.strftime(text, st))
            elif kind == -1:
                out.append(str(int(t)))
            elif kind >= 100:
                n = kind - 100
                out.append(f"{st.tm_sec:02d}" + (f".{frac[:n]}" if n else ""))
            else:
                out.append(frac[:kind])
        return "".join(out)

    return render


def _start_time_getter(arg: str | None) -> Getter:
    render = compile_time_format(arg or DEFAULT_TIME_FORMAT)
    return lambda i: render(i.start_time)


def _compile_command(cmd: str, arg: str | None, path: str) -> Getter:
    if cmd == "START_TIME":
        return _start_time_getter(arg)
    if cmd in ("REQ", "REQ_WITHOUT_QUERY"):
        return _header_getter("request_headers", arg or "", path, cmd)
    if cmd == "RESP":
        return _header_getter("response_headers", arg or "", path, cmd)
    if cmd == "TRAILER":
        return _header_getter("response_trailers", arg or "", path, cmd)
    getter = _SIMPLE.get(cmd)
    if getter is None:
        raise ConfigError(path, f"unknown or unsupported access log command %{cmd}%")
    if arg is not None:
        raise ConfigError(path, f"%{cmd}% takes no argument")
    return getter


def _truncating(g: Getter, n: int) -> Getter:
    def get(info: StreamInfo) -> Any:
        v = g(info)
        return v if v is None else str(v)[:n]

    return get


# A compiled format string: literal str or (getter, numeric) per part.
Part = str | tuple[Getter, bool]


def compile_format(fmt: str, path: str) -> list[Part]:
    """Parse an Envoy format string once into literal text and command getters."""
    parts: list[Part] = []
    lit: list[str] = []
    i = 0
    n = len(fmt)
    while i < n:
        j = fmt.find("%", i)
        if j < 0:
            lit.append(fmt[i:])
            break
        lit.append(fmt[i:j])
        if fmt.startswith("%%", j):
            lit.append("%")
            i = j + 2
            continue
        m = _COMMAND.match(fmt, j)
        if m is None:
            raise ConfigError(path, f"invalid access log format at offset {j}: {fmt[j : j + 30]!r}")
        cmd, arg, trunc = m.group(1), m.group(2), m.group(3)
        getter = _compile_command(cmd, arg, path)
        if trunc is not None:
            getter = _truncating(getter, int(trunc))
        text = "".join(lit)
        if text:
            parts.append(text)
        lit = []
        parts.append((getter, cmd in _NUMERIC and trunc is None))
        i = m.end()
    if lit and "".join(lit):
        parts.append("".join(lit))
    return parts


class TextFormatter:
    __slots__ = ("omit_empty", "parts")

    def __init__(self, fmt: str, path: str, omit_empty: bool = False) -> None:
        self.parts = compile_format(fmt, path)
        self.omit_empty = omit_empty

    def format(self, info: StreamInfo) -> str:
        missing = "" if self.omit_empty else "-"
        out = []
        for p in self.parts:
            if isinstance(p, str):
                out.append(p)
            else:
                v = p[0](info)
                out.append(missing if v is None or v == "" else str(v))
        return "".join(out)


class JsonFormatter:
    """One JSON object per line. A value that is exactly one numeric command is a number;
    a missing single command is ``null`` (or the key is left out with ``omit_empty_values``)."""

    __slots__ = ("omit_empty", "template")

    def __init__(self, template: dict[str, Any], path: str, omit_empty: bool = False) -> None:
        self.template = self._compile(template, path)
        self.omit_empty = omit_empty

    def _compile(self, obj: dict[str, Any], path: str) -> list[tuple[str, Any]]:
        out: list[tuple[str, Any]] = []
        for k, v in obj.items():
            p = f"{path}.{k}"
            if isinstance(v, dict):
                out.append((k, ("obj", self._compile(v, p))))
            elif isinstance(v, str):
                out.append((k, ("fmt", compile_format(v, p))))
            elif isinstance(v, bool | int | float) or v is None:
                if isinstance(v, float) and v == int(v):
                    v = int(v)  # Struct numbers are doubles; 3.0 was written as 3
                out.append((k, ("lit", v)))
            else:
                raise ConfigError(p, "json_format values must be strings, numbers, booleans or objects")
        return out

    def _eval(self, tpl: list[tuple[str, Any]], info: StreamInfo) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, (kind, val) in tpl:
            if kind == "lit":
                out[k] = val
            elif kind == "obj":
                out[k] = self._eval(val, info)
            else:
                v = _eval_parts(val, info)
                if v is None and self.omit_empty:
                    continue
                out[k] = v
        return out

    def format(self, info: StreamInfo) -> str:
        return json.dumps(self._eval(self.template, info), separators=(",", ":"), ensure_ascii=False) + "\n"


def _eval_parts(parts: list[Part], info: StreamInfo) -> Any:
    if len(parts) == 1 and not isinstance(parts[0], str):
        getter, numeric = parts[0]
        v = getter(info)
        if v is None or v == "":
            return None
        return v if numeric else str(v)
    out = []
    for p in parts:
        if isinstance(p, str):
            out.append(p)
        else:
            v = p[0](info)
            out.append("-" if v is None or v == "" else str(v))
    return "".join(out)


Formatter = TextFormatter | JsonFormatter


def formatter_from_substitution(sfs: Any, path: str) -> Formatter:
    """``envoy.config.core.v3.SubstitutionFormatString`` -> formatter."""
    omit = bool(sfs.omit_empty_values)
    kind = sfs.WhichOneof("format")
    if kind == "text_format":
        return TextFormatter(sfs.text_format, f"{path}.text_format", omit)
    if kind == "json_format":
        return JsonFormatter(pb_json.MessageToDict(sfs.json_format), f"{path}.json_format", omit)
    if kind == "text_format_source":
        src = sfs.text_format_source
        which = src.WhichOneof("specifier")
        p = f"{path}.text_format_source"
        if which == "inline_string":
            text = src.inline_string
        elif which == "inline_bytes":
            text = src.inline_bytes.decode("utf-8", "replace")
        elif which == "filename":
            try:
                with open(src.filename, encoding="utf-8") as f:
                    text = f.read(1 << 20)  # a format file larger than 1 MiB is a mistake
            except OSError as e:
                raise ConfigError(f"{p}.filename", f"cannot read {src.filename!r}: {e.strerror}") from None
        else:
            raise ConfigError(p, f"data source kind {which!r} is not supported")
        return TextFormatter(text, p, omit)
    return TextFormatter(DEFAULT_FORMAT, path, omit)


# ---------------------------------------------------------------------------
# Filters
# ---------------------------------------------------------------------------

Filter = Callable[[StreamInfo], bool]

_OPS: dict[int, Callable[[int, int], bool]] = {
    accesslog_pb2.ComparisonFilter.EQ: lambda a, b: a == b,
    accesslog_pb2.ComparisonFilter.GE: lambda a, b: a >= b,
    accesslog_pb2.ComparisonFilter.LE: lambda a, b: a <= b,
}
if hasattr(accesslog_pb2.ComparisonFilter, "NE"):
    _OPS[accesslog_pb2.ComparisonFilter.NE] = lambda a, b: a != b


def _comparison(cmp: Any, path: str, read: Callable[[StreamInfo], int | None]) -> Filter:
    op = _OPS.get(cmp.op)
    if op is None:
        raise ConfigError(f"{path}.comparison.op", f"comparison op {cmp.op} is not supported")
    value = int(cmp.value.default_value)

    def f(info: StreamInfo) -> bool:
        v = read(info)
        return v is not None and op(v, value)

    return f


def compile_filter(flt: Any, path: str) -> Filter:
    """``envoy.config.accesslog.v3.AccessLogFilter`` -> predicate over StreamInfo."""
    kind = flt.WhichOneof("filter_specifier")
    p = f"{path}.{kind}"
    if kind == "status_code_filter":
        return _comparison(flt.status_code_filter.comparison, p, lambda i: i.response_code)
    if kind == "duration_filter":
        return _comparison(flt.duration_filter.comparison, p, lambda i: i.duration_ms())
    if kind == "not_health_check_filter":
        return lambda i: True
    if kind == "response_flag_filter":
        wanted = frozenset(flt.response_flag_filter.flags)
        if not wanted:
            return lambda i: bool(i.response_flags)
        return lambda i: any(f in wanted for f in i.response_flags)
    if kind in ("and_filter", "or_filter"):
        subs = [compile_filter(s, f"{p}.filters[{n}]") for n, s in enumerate(getattr(flt, kind).filters)]
        if kind == "and_filter":
            return lambda i: all(s(i) for s in subs)
        return lambda i: any(s(i) for s in subs)
    if kind is None:
        raise ConfigError(path, "filter has no filter_specifier set")
    raise ConfigError(p, f"access log filter {kind!r} is not supported")


# ---------------------------------------------------------------------------
# Sinks and loggers
# ---------------------------------------------------------------------------


class FileSink:
    """An append-mode file shared by every logger writing to the same path."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._f = open(path, "ab", buffering=0)  # lives as long as the sink

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = self._f.write(view)
            if not n:
                raise OSError("short write")
            view = view[n:]

    def reopen(self) -> None:
        old = self._f
        self._f = open(self.path, "ab", buffering=0)
        old.close()

    def close(self) -> None:
        self._f.close()

    def __del__(self) -> None:
        try:
            self._f.close()
        except Exception:
            pass


class StreamSink:
    """stdout / stderr, resolved at write time so a replaced ``sys.stdout`` is honoured."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.path = name

    def write(self, data: bytes) -> None:
        stream = getattr(sys, self.name)
        buf = getattr(stream, "buffer", None)
        if buf is not None:
            buf.write(data)
            buf.flush()
        else:
            stream.write(data.decode("utf-8", "replace"))
            stream.flush()

    def reopen(self) -> None:
        pass


Sink = FileSink | StreamSink


class AccessLogSinks:
    """The access-log files and loggers of one server (``BuildContext.access_logs``): loggers
    writing to the same path share one file; ``flush_all`` (shutdown) and ``reopen_all``
    (SIGUSR1, after rotation) act on everything this server opened. Both are weak, so that
    loggers dropped by a config update close their files."""

    def __init__(self, flush_interval: float | None = None) -> None:
        self.file_sinks: weakref.WeakValueDictionary[str, FileSink] = weakref.WeakValueDictionary()
        self.loggers: weakref.WeakSet[AccessLogger] = weakref.WeakSet()
        # None: write once per loop iteration; seconds: Envoy's --file-flush-interval-msec.
        self.flush_interval = flush_interval

    def add(self, logger: AccessLogger) -> AccessLogger:
        """Register a logger (for ``flush_all`` / ``reopen_all``) and give it the flush interval."""
        logger.flush_interval = self.flush_interval
        self.loggers.add(logger)
        return logger

    def file_sink(self, path: str, err_path: str) -> FileSink:
        sink = self.file_sinks.get(path)
        if sink is None:
            try:
                sink = FileSink(path)
            except OSError as e:
                raise ConfigError(err_path, f"cannot open access log {path!r}: {e.strerror}") from None
            self.file_sinks[path] = sink
        return sink

    def flush_all(self) -> None:
        """Write every pending entry now (shutdown)."""
        for lg in list(self.loggers):
            lg.flush()

    def reopen_all(self) -> None:
        """Reopen every access log file (SIGUSR1, after log rotation)."""
        self.flush_all()
        for sink in list(self.file_sinks.values()):
            try:
                sink.reopen()
            except OSError as e:
                log.warning("reopening access log %s failed: %s", sink.path, e)


def sinks_of(ctx: Any) -> AccessLogSinks:
    """The server's access-log registry, kept on its build context (made on first use)."""
    s = getattr(ctx, "access_logs", None)
    if s is None:
        s = AccessLogSinks()
        if ctx is not None:
            ctx.access_logs = s
    return s


class AccessLogger:
    """Queues StreamInfos; formats and writes them in one batch per loop iteration."""

    __slots__ = (
        "__weakref__",
        "_dropped",
        "_pending",
        "_scheduled",
        "_timer",
        "filter",
        "flush_interval",
        "formatter",
        "sink",
    )

    def __init__(self, sink: Sink, formatter: Formatter, dropped: Counter | None = None) -> None:
        self.sink = sink
        self.formatter = formatter
        self.filter: Filter | None = None
        self.flush_interval: float | None = None  # see AccessLogSinks.flush_interval
        self._pending: list[StreamInfo] = []  # bounded by MAX_PENDING
        self._scheduled = False
        self._timer: asyncio.Handle | None = None
        self._dropped = dropped if dropped is not None else Counter("access_log.dropped")

    def log(self, info: StreamInfo) -> None:
        pending = self._pending
        if len(pending) >= MAX_PENDING:
            self._dropped.value += 1
            return
        pending.append(info)
        if not self._scheduled:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (tools, tests): write now
                self.flush()
                return
            self._scheduled = True
            if self.flush_interval:
                self._timer = loop.call_later(self.flush_interval, self.flush)
            else:
                loop.call_soon(self.flush)
        elif self._timer is not None and len(pending) == FLUSH_AT:
            self._timer.cancel()
            self._timer = asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch = self._pending
        if not batch:
            return
        self._pending = []
        flt = self.filter
        fmt = self.formatter.format
        lines = []
        for info in batch:
            if flt is not None and not flt(info):
                continue
            try:
                lines.append(fmt(info))
            except Exception:  # a formatting bug must not lose the rest of the batch
                log.exception("access log formatting failed")
        if not lines:
            return
        try:
            self.sink.write("".join(lines).encode("utf-8", "backslashreplace"))
        except OSError as e:
            log.warning("access log write to %s failed: %s", self.sink.path, e)


# ---------------------------------------------------------------------------
# Compilation from config
# ---------------------------------------------------------------------------


def _dropped_counter(ctx: Any) -> Counter | None:
    stats = getattr(ctx, "stats", None)
    return stats.counter("access_log.dropped") if stats is not None else None


def _file_factory(cfg: Any, ctx: Any, path: str) -> AccessLogger:
    if cfg is None or not isinstance(cfg, file_pb2.FileAccessLog):
        raise ConfigError(path, "envoy.access_loggers.file needs a FileAccessLog typed_config")
    if not cfg.path:
        raise ConfigError(f"{path}.path", "path is required")
    kind = cfg.WhichOneof("access_log_format")
    formatter: Formatter
    if kind == "log_format":
        formatter = formatter_from_substitution(cfg.log_format, f"{path}.log_format")
    elif kind == "format":
        formatter = TextFormatter(cfg.format or DEFAULT_FORMAT, f"{path}.format")
    elif kind in ("json_format", "typed_json_format"):
        formatter = JsonFormatter(pb_json.MessageToDict(getattr(cfg, kind)), f"{path}.{kind}")
    else:
        formatter = TextFormatter(DEFAULT_FORMAT, path)
    sinks = sinks_of(ctx)
    return sinks.add(
        AccessLogger(sinks.file_sink(cfg.path, f"{path}.path"), formatter, _dropped_counter(ctx))
    )


def _stream_factory(stream: str) -> Callable[[Any, Any, str], AccessLogger]:
    def factory(cfg: Any, ctx: Any, path: str) -> AccessLogger:
        if cfg is not None and cfg.HasField("log_format"):
            formatter = formatter_from_substitution(cfg.log_format, f"{path}.log_format")
        else:
            formatter = TextFormatter(DEFAULT_FORMAT, path)
        return sinks_of(ctx).add(AccessLogger(StreamSink(stream), formatter, _dropped_counter(ctx)))

    return factory


registry.register(
    "access_logger", ["envoy.access_loggers.file", "envoy.file_access_log"], [FILE_TYPE], _file_factory
)
registry.register("access_logger", ["envoy.access_loggers.stdout"], [STDOUT_TYPE], _stream_factory("stdout"))
registry.register("access_logger", ["envoy.access_loggers.stderr"], [STDERR_TYPE], _stream_factory("stderr"))

_KNOWN_TYPES: dict[str, type] = {
    FILE_TYPE: file_pb2.FileAccessLog,
    STDOUT_TYPE: stream_pb2.StdoutAccessLog,
    STDERR_TYPE: stream_pb2.StderrAccessLog,
}


def _unpack(any_msg: Any, path: str) -> Any:
    type_name = any_msg.type_url.rsplit("/", 1)[-1]
    cls = _KNOWN_TYPES.get(type_name)
    if cls is not None:
        msg = cls()
        if not any_msg.Unpack(msg):
            raise ConfigError(path, f"cannot decode {type_name}")
        return msg
    try:  # other types (TypedStruct, extensions registered elsewhere): the loader knows them
        from moorline.config.loader import unpack_any
    except ImportError:
        return None
    return unpack_any(any_msg, path)


def compile_access_logs(access_log_protos: Any, ctx: Any, path: str) -> list[AccessLogger]:
    """Repeated ``envoy.config.accesslog.v3.AccessLog`` -> loggers.

    ``path`` is the field path of the repeated field (``...access_log``).
    """
    out: list[AccessLogger] = []
    for n, al in enumerate(access_log_protos):
        p = f"{path}[{n}]"
        type_url = al.typed_config.type_url if al.HasField("typed_config") else None
        ext = registry.lookup("access_logger", al.name, type_url)
        if ext is None:
            reason = registry.noop_reason(al.name, type_url)
            if reason is not None:
                if hasattr(ctx, "notice"):
                    ctx.notice(f"{p}: {al.name or type_url}: {reason}")
                continue
            ext = registry.require("access_logger", al.name, type_url, p)  # raises ConfigError
        cfg = _unpack(al.typed_config, f"{p}.typed_config") if type_url else None
        logger = ext.factory(cfg, ctx, f"{p}.typed_config")
        if al.HasField("filter"):
            logger.filter = compile_filter(al.filter, f"{p}.filter")
        out.append(logger)
    return out
