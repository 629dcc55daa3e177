"""Access logs: config compilation, Envoy format strings, filters, batched writes."""

from __future__ import annotations

import asyncio
import calendar
import json
import os
from pathlib import Path

import pytest
from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.extensions.access_loggers.file.v3 import file_pb2
from envoy.extensions.access_loggers.stream.v3 import stream_pb2
from google.protobuf import struct_pb2

from moorline.config import registry
from moorline.config.context import BuildContext
from moorline.config.errors import ConfigError
from moorline.observability import access_log as al
from moorline.observability.stats import Store
from moorline.observability.stream_info import StreamInfo
from moorline.protocol.headers import HeaderMap

# 2026-11-27T12:00:05.123Z
T0 = calendar.timegm((2026, 11, 27, 12, 0, 5)) + 0.123456


def _info(**kw: object) -> StreamInfo:
    i = StreamInfo(T0, 100.0)
    i.end_mono = 100.0265
    i.protocol = "HTTP/1.1"
    i.request_headers = HeaderMap(
        [
            (b":method", b"GET"),
            (b":path", b"/api/v1?x=1"),
            (b":authority", b"example.com"),
            (b":scheme", b"http"),
            (b"user-agent", b"curl/8.0"),
            (b"x-request-id", b"rid-1"),
        ]
    )
    i.response_headers = HeaderMap([(b":status", b"200"), (b"x-envoy-upstream-service-time", b"12")])
    i.response_code = 200
    i.bytes_received = 10
    i.bytes_sent = 58
    i.upstream_host = "10.0.0.1:8080"
    i.upstream_cluster = "backend"
    i.downstream_remote_address = "192.168.1.9:51234"
    i.downstream_local_address = "127.0.0.1:10000"
    for k, v in kw.items():
        setattr(i, k, v)
    return i


def _ctx() -> BuildContext:
    return BuildContext(stats=Store())


def _file_log(path: Path, **fields: object) -> accesslog_pb2.AccessLog:
    cfg = file_pb2.FileAccessLog(path=str(path), **fields)  # type: ignore[arg-type]
    entry = accesslog_pb2.AccessLog(name="envoy.access_loggers.file")
    entry.typed_config.Pack(cfg)
    return entry


def test_registered_by_name_and_type() -> None:
    assert registry.lookup("access_logger", "envoy.access_loggers.file", None) is not None
    assert registry.lookup("access_logger", "", "type.googleapis.com/" + al.STDOUT_TYPE) is not None
    assert registry.lookup("access_logger", "envoy.access_loggers.stderr", None) is not None


def test_default_format_exact(tmp_path: Path) -> None:
    (logger,) = al.compile_access_logs([_file_log(tmp_path / "a.log")], _ctx(), "access_log")
    logger.log(_info())  # no running loop: written at once
    assert (tmp_path / "a.log").read_text() == (
        '[2026-11-27T12:00:05.123Z] "GET /api/v1?x=1 HTTP/1.1" 200 - 10 58 26 12 "-" "curl/8.0" '
        '"rid-1" "example.com" "10.0.0.1:8080"\n'
    )


def test_original_path_preferred_and_missing_values(tmp_path: Path) -> None:
    info = _info(response_headers=None, upstream_host=None)
    assert info.request_headers is not None
    info.request_headers.add(b"x-envoy-original-path", b"/orig")
    f = al.TextFormatter(al.DEFAULT_FORMAT, "p")
    line = f.format(info)
    assert '"GET /orig HTTP/1.1"' in line
    assert line.endswith(' 26 - "-" "curl/8.0" "rid-1" "example.com" "-"\n')


def test_commands_and_truncation() -> None:
    fmt = (
        "%REQ(:METHOD)%|%REQ(X-MISSING?:AUTHORITY)%|%REQ(USER-AGENT):4%|%REQ_WITHOUT_QUERY(:PATH)%|"
        "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%|%TRAILER(GRPC-STATUS)%|%RESPONSE_CODE%|%RESPONSE_FLAGS%|"
        "%RESPONSE_CODE_DETAILS%|%UPSTREAM_CLUSTER%|%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%|"
        "%DOWNSTREAM_LOCAL_ADDRESS%|%CONNECTION_ID%|%UPSTREAM_REQUEST_ATTEMPT_COUNT%|%RESPONSE_DURATION%|"
        "%REQUEST_DURATION%|%HOSTNAME%|100%%"
    )
    info = _info(
        response_flags=["UF", "URX"],
        response_code_details="via_upstream",
        connection_id=42,
        attempt_count=2,
        first_upstream_rx_mono=100.0125,
        response_trailers=HeaderMap([(b"grpc-status", b"0")]),
    )
    out = al.TextFormatter(fmt, "p").format(info).split("|")
    assert out[:9] == ["GET", "example.com", "curl", "/api/v1", "12", "0", "200", "UF,URX", "via_upstream"]
    assert out[9:15] == ["backend", "192.168.1.9", "127.0.0.1:10000", "42", "2", "12"]
    assert out[15] == "-"
    assert out[16] == al._HOSTNAME
    assert out[17] == "100%"
    v6 = _info(downstream_remote_address="[::1]:5000")
    assert al.TextFormatter("%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%", "p").format(v6) == "::1"


def test_start_time_formats() -> None:
    info = _info()
    f = al.TextFormatter(
        "%START_TIME(%Y/%m/%d %H:%M:%E3S)%|%START_TIME(%s)%|%START_TIME(%s.%6f)%|%START_TIME(%E0S)%", "p"
    )
    assert f.format(info) == f"2026/11/27 12:00:05.123|{int(T0)}|{int(T0)}.123456|05"


@pytest.mark.parametrize(
    ("fmt", "where"),
    [("%NOPE%", "x.format"), ("%REQ()%", "x.format"), ("50% off", "x.format"), ("%DURATION(1)%", "x.format")],
)
def test_bad_format_is_config_error(tmp_path: Path, fmt: str, where: str) -> None:
    with pytest.raises(ConfigError) as e:
        al.compile_access_logs([_file_log(tmp_path / "b.log", format=fmt)], _ctx(), "x")
    assert e.value.path == "x[0].typed_config.format"


def test_json_format_typed_values(tmp_path: Path) -> None:
    js = struct_pb2.Struct()
    js.update(
        {
            "code": "%RESPONSE_CODE%",
            "dur": "%DURATION%",
            "sent": "%BYTES_SENT%",
            "method": "%REQ(:METHOD)%",
            "xff": "%REQ(X-FORWARDED-FOR)%",
            "mixed": "%REQ(:METHOD)% %UPSTREAM_HOST% %ROUTE_NAME%",
            "lit": 3,
            "flag": True,
            "nested": {"up": "%UPSTREAM_CLUSTER%"},
        }
    )
    cfg = file_pb2.FileAccessLog(path=str(tmp_path / "j.log"))
    cfg.log_format.json_format.CopyFrom(js)
    entry = accesslog_pb2.AccessLog(name="envoy.access_loggers.file")
    entry.typed_config.Pack(cfg)
    (logger,) = al.compile_access_logs([entry], _ctx(), "p")
    logger.log(_info())
    logger.log(_info(response_code=503))
    lines = (tmp_path / "j.log").read_text().splitlines()
    assert len(lines) == 2
    obj = json.loads(lines[0])
    assert obj == {
        "code": 200,
        "dur": 26,
        "sent": 58,
        "method": "GET",
        "xff": None,
        "mixed": "GET 10.0.0.1:8080 -",
        "lit": 3,
        "flag": True,
        "nested": {"up": "backend"},
    }
    assert json.loads(lines[1])["code"] == 503


def test_text_format_source_and_omit_empty(tmp_path: Path) -> None:
    cfg = file_pb2.FileAccessLog(path=str(tmp_path / "t.log"))
    cfg.log_format.text_format_source.inline_string = "%REQ(:PATH)% [%ROUTE_NAME%]\n"
    cfg.log_format.omit_empty_values = True
    entry = accesslog_pb2.AccessLog(name="envoy.access_loggers.file")
    entry.typed_config.Pack(cfg)
    (logger,) = al.compile_access_logs([entry], _ctx(), "p")
    logger.log(_info())
    assert (tmp_path / "t.log").read_text() == "/api/v1?x=1 []\n"


def test_filters(tmp_path: Path) -> None:
    entry = _file_log(tmp_path / "f.log", format="%RESPONSE_CODE% %RESPONSE_FLAGS%\n")
    entry.filter.or_filter.filters.add().status_code_filter.comparison.CopyFrom(
        accesslog_pb2.ComparisonFilter(op=accesslog_pb2.ComparisonFilter.GE, value={"default_value": 500})
    )
    rf = entry.filter.or_filter.filters.add().response_flag_filter
    rf.flags.append("UH")
    (logger,) = al.compile_access_logs([entry], _ctx(), "p")
    for code, flags in [(200, []), (503, ["UF"]), (404, ["UH"]), (404, ["NR"]), (500, [])]:
        logger.log(_info(response_code=code, response_flags=flags))
    assert (tmp_path / "f.log").read_text().splitlines() == ["503 UF", "404 UH", "500 -"]


def test_not_health_check_and_and_filter(tmp_path: Path) -> None:
    entry = _file_log(tmp_path / "h.log", format="%RESPONSE_CODE%\n")
    entry.filter.and_filter.filters.add().not_health_check_filter.SetInParent()
    entry.filter.and_filter.filters.add().duration_filter.comparison.CopyFrom(
        accesslog_pb2.ComparisonFilter(op=accesslog_pb2.ComparisonFilter.LE, value={"default_value": 10})
    )
    (logger,) = al.compile_access_logs([entry], _ctx(), "p")
    logger.log(_info())  # 26 ms: filtered out
    logger.log(_info(end_mono=100.005, response_code=201))
    assert (tmp_path / "h.log").read_text() == "201\n"


def test_unknown_filter_and_logger_are_config_errors(tmp_path: Path) -> None:
    entry = _file_log(tmp_path / "u.log")
    entry.filter.traceable_filter.SetInParent()
    with pytest.raises(ConfigError) as e:
        al.compile_access_logs([entry], _ctx(), "hcm.access_log")
    assert e.value.path == "hcm.access_log[0].filter.traceable_filter"

    bad = accesslog_pb2.AccessLog(name="envoy.access_loggers.nope")
    with pytest.raises(ConfigError) as e:
        al.compile_access_logs([_file_log(tmp_path / "ok.log"), bad], _ctx(), "hcm.access_log")
    assert e.value.path == "hcm.access_log[1]"

    with pytest.raises(ConfigError) as e:
        al.compile_access_logs([_file_log(tmp_path / "missing-dir" / "x.log")], _ctx(), "a")
    assert e.value.path == "a[0].typed_config.path"


def test_batched_single_write_per_loop_iteration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (logger,) = al.compile_access_logs(
        [_file_log(tmp_path / "batch.log", format="%RESPONSE_CODE%\n")], _ctx(), "p"
    )
    writes: list[bytes] = []
    real = al.FileSink.write

    def counting(self: al.FileSink, data: bytes) -> None:
        writes.append(data)
        real(self, data)

    monkeypatch.setattr(al.FileSink, "write", counting)

    async def main() -> int:
        for code in (200, 201, 202):
            logger.log(_info(response_code=code))
        before = len(writes)  # nothing written on the request path
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return before

    assert asyncio.run(main()) == 0
    assert writes == [b"200\n201\n202\n"]
    assert (tmp_path / "batch.log").read_text() == "200\n201\n202\n"


def test_bounded_queue_counts_drops(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(al, "MAX_PENDING", 3)
    ctx = _ctx()
    (logger,) = al.compile_access_logs([_file_log(tmp_path / "d.log", format="x\n")], ctx, "p")

    async def main() -> None:
        for _ in range(5):
            logger.log(_info())
        ctx.access_logs.flush_all()

    asyncio.run(main())
    assert (tmp_path / "d.log").read_text() == "x\nx\nx\n"
    assert ctx.stats.counter("access_log.dropped").value == 2


def test_reopen_after_rotation(tmp_path: Path) -> None:
    path = tmp_path / "r.log"
    ctx = _ctx()
    (logger,) = al.compile_access_logs([_file_log(path, format="%RESPONSE_CODE%\n")], ctx, "p")
    logger.log(_info(response_code=200))
    os.rename(path, tmp_path / "r.log.1")
    ctx.access_logs.reopen_all()
    logger.log(_info(response_code=204))
    assert (tmp_path / "r.log.1").read_text() == "200\n"
    assert path.read_text() == "204\n"


def test_two_loggers_share_one_file(tmp_path: Path) -> None:
    path = tmp_path / "s.log"
    a, b = al.compile_access_logs([_file_log(path, format="a\n"), _file_log(path, format="b\n")], _ctx(), "p")
    assert a.sink is b.sink
    a.log(_info())
    b.log(_info())
    assert path.read_text() == "a\nb\n"


def test_stdout_and_stderr(capfd: pytest.CaptureFixture[str]) -> None:
    out = accesslog_pb2.AccessLog(name="envoy.access_loggers.stdout")
    cfg = stream_pb2.StdoutAccessLog()
    cfg.log_format.text_format_source.inline_string = "OUT %RESPONSE_CODE%\n"
    out.typed_config.Pack(cfg)
    err = accesslog_pb2.AccessLog(name="envoy.access_loggers.stderr")
    err.typed_config.Pack(stream_pb2.StderrAccessLog())
    lo, le = al.compile_access_logs([out, err], _ctx(), "p")
    lo.log(_info())
    le.log(_info())
    captured = capfd.readouterr()
    assert captured.out == "OUT 200\n"
    assert captured.err.startswith('[2026-11-27T12:00:05.123Z] "GET /api/v1?x=1 HTTP/1.1" 200')


def test_access_log_files_belong_to_their_server(tmp_path: Path) -> None:
    """Two servers (build contexts) writing the same path each own their file object: nothing
    is shared through module state, and each server's reopen/flush touches only its own."""
    path = tmp_path / "own.log"
    c1, c2 = _ctx(), _ctx()
    (a,) = al.compile_access_logs([_file_log(path, format="a\n")], c1, "p")
    (b,) = al.compile_access_logs([_file_log(path, format="b\n")], c2, "p")
    assert a.sink is not b.sink
    assert set(c1.access_logs.loggers) == {a} and set(c2.access_logs.loggers) == {b}


def test_file_flush_interval_batches_until_the_timer_or_a_full_buffer(tmp_path: Path) -> None:
    """``--file-flush-interval-msec``: entries wait for the interval instead of the next loop
    iteration; ``FLUSH_AT`` waiting entries are written at once (Envoy's full 64 KiB buffer),
    and ``flush_all`` (shutdown) writes the rest and cancels the timer."""
    ctx = _ctx()
    ctx.access_logs = al.AccessLogSinks(flush_interval=60.0)
    path = tmp_path / "a.log"
    (logger,) = al.compile_access_logs([_file_log(path)], ctx, "access_log")
    assert logger.flush_interval == 60.0

    async def main() -> tuple[int, int, int]:
        logger.log(_info())
        for _ in range(5):
            await asyncio.sleep(0)
        before = len(path.read_text().splitlines())
        for _ in range(al.FLUSH_AT - 1):
            logger.log(_info())
        for _ in range(3):
            await asyncio.sleep(0)
        full = len(path.read_text().splitlines())
        logger.log(_info())
        ctx.access_logs.flush_all()
        assert logger._timer is None
        return before, full, len(path.read_text().splitlines())

    assert asyncio.run(main()) == (0, al.FLUSH_AT, al.FLUSH_AT + 1)


def test_without_an_interval_each_loop_iteration_writes(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    (logger,) = al.compile_access_logs([_file_log(path)], _ctx(), "access_log")
    assert logger.flush_interval is None

    async def main() -> int:
        logger.log(_info())
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return len(path.read_text().splitlines())

    assert asyncio.run(main()) == 1
