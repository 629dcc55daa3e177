"""Local replies (moorline/proxy/local_reply.py and ActiveStream.send_local_reply): the
``local_reply_config`` mappers and body formats, gRPC trailers-only answers, HEAD. Driven through
the real connection manager with moorline.testing.pair.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from moorline.testing.pair import Pair, bootstrap_yaml

ROUTES = [
    {
        "match": {"prefix": "/direct"},
        "direct_response": {"status": 503, "body": {"inline_string": "direct body"}},
    },
    {"match": {"prefix": "/timeout"}, "route": {"cluster": "be", "timeout": "1s"}},
    {"match": {"prefix": "/up"}, "route": {"cluster": "be"}},
]


def status_filter(code: int, op: str = "EQ") -> dict[str, Any]:
    return {
        "status_code_filter": {"comparison": {"op": op, "value": {"default_value": code, "runtime_key": "k"}}}
    }


@pytest.fixture
def make() -> Iterator[Any]:
    pairs: list[Pair] = []

    def make_pair(local_reply: dict[str, Any] | None = None, **kw: Any) -> Pair:
        hcm = dict(kw.pop("hcm_extra", {}))
        if local_reply is not None:
            hcm["local_reply_config"] = local_reply
        p = Pair(bootstrap_yaml(routes=kw.pop("routes", ROUTES), hcm_extra=hcm, **kw))
        pairs.append(p)
        return p

    yield make_pair
    for p in pairs:
        p.close()


def get(pair: Pair, path: str, method: str = "GET", headers: tuple[tuple[str, str], ...] = ()) -> Any:
    c = pair.connect()
    c.request(method, path, headers=headers)
    return c


# -- mappers and formats -----------------------------------------------------------------------


def test_without_config_local_replies_are_plain(make: Any) -> None:
    pair = make()
    r = get(pair, "/nowhere").response()
    assert (r.status, r.body, r.header("content-length")) == (404, b"", b"0")
    r = get(pair, "/direct").response()
    assert (r.status, r.body, r.header("content-type")) == (503, b"direct body", b"text/plain")
    pair.assert_settled()


def test_mapper_rewrites_status_and_body(make: Any) -> None:
    pair = make(
        {
            "mappers": [
                {"filter": status_filter(404), "status_code": 200, "body": {"inline_string": "not here"}}
            ]
        }
    )
    r = get(pair, "/nowhere").response()
    assert (r.status, r.body) == (200, b"not here")
    assert r.header("content-length") == b"8"
    r = get(pair, "/direct").response()  # the mapper's filter does not match 503
    assert (r.status, r.body) == (503, b"direct body")
    # the access log records what was sent, the stats count it
    assert [e.response_code for e in pair.access_log.entries] == [200, 503]
    assert pair.http("downstream_rq_2xx") == 1 and pair.http("downstream_rq_4xx") == 0
    pair.assert_settled()


def test_first_matching_mapper_wins(make: Any) -> None:
    pair = make(
        {
            "mappers": [
                {"filter": status_filter(500, "GE"), "body": {"inline_string": "server side"}},
                {"filter": status_filter(503), "body": {"inline_string": "never used"}},
            ]
        }
    )
    assert get(pair, "/direct").response().body == b"server side"


def test_body_format_override_with_commands_and_content_type(make: Any) -> None:
    pair = make(
        {
            "mappers": [
                {
                    "filter": status_filter(404),
                    "body": {"inline_string": "gone"},
                    "body_format_override": {
                        "text_format": "<p>%LOCAL_REPLY_BODY% %RESPONSE_CODE% %REQ(:PATH)% %RESPONSE_CODE_DETAILS% 100%%</p>",
                        "content_type": "text/html; charset=UTF-8",
                    },
                }
            ]
        }
    )
    r = get(pair, "/nowhere").response()
    assert r.status == 404
    assert r.body == b"<p>gone 404 /nowhere route_not_found 100%</p>"
    assert r.header("content-type") == b"text/html; charset=UTF-8"


def test_json_body_format_for_every_local_reply(make: Any) -> None:
    pair = make(
        {
            "body_format": {
                "json_format": {
                    "code": "%RESPONSE_CODE%",
                    "message": "%LOCAL_REPLY_BODY%",
                    "flags": "%RESPONSE_FLAGS%",
                }
            }
        }
    )
    r = get(pair, "/nowhere").response()
    assert r.header("content-type") == b"application/json"
    assert json.loads(r.body) == {"code": 404, "message": "", "flags": "NR"}
    r = get(pair, "/direct").response()
    assert json.loads(r.body) == {"code": 503, "message": "direct body", "flags": "-"}
    assert r.header("content-length") == str(len(r.body)).encode()


def test_header_filter_mapper(make: Any) -> None:
    pair = make(
        {
            "mappers": [
                {
                    "filter": {"header_filter": {"header": {"name": "x-debug", "present_match": True}}},
                    "status_code": 418,
                }
            ]
        }
    )
    assert get(pair, "/nowhere", headers=(("x-debug", "1"),)).response().status == 418
    assert get(pair, "/nowhere").response().status == 404


def test_response_flag_filter_mapper_on_upstream_failure(make: Any) -> None:
    pair = make(
        {
            "mappers": [
                {
                    "filter": {"response_flag_filter": {"flags": ["UF"]}},
                    "body": {"inline_string": "try later"},
                }
            ]
        }
    )
    c = get(pair, "/up")
    pair.upstream.refuse()
    r = c.response()
    assert (r.status, r.body) == (503, b"try later")


def test_upstream_responses_are_not_local_replies(make: Any) -> None:
    pair = make(
        {"mappers": [{"filter": status_filter(503), "status_code": 200, "body": {"inline_string": "x"}}]}
    )
    c = get(pair, "/up")
    up = pair.upstream.accept()
    up.request()
    up.respond(503, body=b"from upstream")
    r = c.response()
    assert (r.status, r.body) == (503, b"from upstream")


def test_route_timeout_local_reply_is_mapped(make: Any) -> None:
    pair = make({"mappers": [{"filter": status_filter(504), "body": {"inline_string": "slow"}}]})
    c = get(pair, "/timeout")
    up = pair.upstream.accept()
    up.request()
    pair.advance(1.1)
    r = c.response()
    assert (r.status, r.body) == (504, b"slow")
    assert up.aborted
    pair.assert_settled()


# -- gRPC ----------------------------------------------------------------------------------------


GRPC = (("content-type", "application/grpc"), ("te", "trailers"))


@pytest.mark.parametrize(
    ("path", "grpc_status", "message"),
    [
        ("/nowhere", b"12", b""),  # 404 -> UNIMPLEMENTED
        ("/direct", b"14", b"direct body"),  # 503 -> UNAVAILABLE
    ],
)
def test_grpc_local_reply_is_trailers_only_over_h2(
    make: Any, path: str, grpc_status: bytes, message: bytes
) -> None:
    pair = make()
    h = pair.connect_h2()
    sid = h.request("POST", path, "svc", headers=GRPC, body=b"\x00\x00\x00\x00\x00")
    r = h.response(sid)
    assert r.status == 200
    assert r.header("content-type") == b"application/grpc"
    assert r.header("grpc-status") == grpc_status
    assert r.header("grpc-message") == message
    assert r.body == b"" and r.trailers is None and r.ended  # one HEADERS frame with END_STREAM
    info = pair.access_log.entries[0]
    assert info.response_code == 200
    pair.assert_settled()


def test_grpc_route_timeout_is_deadline_exceeded(make: Any) -> None:
    pair = make()
    h = pair.connect_h2()
    sid = h.request("POST", "/timeout", "svc", headers=GRPC, body=b"\x00\x00\x00\x00\x00")
    up = pair.upstream.accept()
    up.request()
    pair.advance(1.1)
    r = h.response(sid)
    assert r.status == 200
    assert r.header("grpc-status") == b"4"  # DEADLINE_EXCEEDED, not the UNAVAILABLE of a 504
    assert r.header("grpc-message") == b"upstream request timeout"
    pair.assert_settled()


def test_grpc_per_try_timeout_is_deadline_exceeded(make: Any) -> None:
    routes = [
        {
            "match": {"prefix": "/"},
            "route": {
                "cluster": "be",
                "retry_policy": {"retry_on": "5xx", "num_retries": 0, "per_try_timeout": "1s"},
            },
        }
    ]
    pair = make(routes=routes)
    h = pair.connect_h2()
    sid = h.request("POST", "/svc/M", "svc", headers=GRPC, body=b"\x00\x00\x00\x00\x00")
    pair.upstream.accept().request()
    pair.advance(1.1)
    assert h.response(sid).header("grpc-status") == b"4"


def test_grpc_upstream_connect_failure_is_unavailable_with_encoded_message(make: Any) -> None:
    pair = make()
    c = get(pair, "/up", "POST", headers=GRPC)
    pair.upstream.refuse()
    r = c.response()
    assert r.status == 200 and r.header("grpc-status") == b"14"
    msg = r.header("grpc-message")
    assert msg is not None and msg.startswith(b"upstream connect error or disconnect/reset before headers.")
    assert all(0x20 <= ch <= 0x7E for ch in msg)


def test_grpc_message_is_percent_encoded(make: Any) -> None:
    routes = [
        {"match": {"prefix": "/"}, "direct_response": {"status": 403, "body": {"inline_string": "100% nö"}}}
    ]
    pair = make(routes=routes)
    r = get(pair, "/x", "POST", headers=GRPC).response()
    assert r.header("grpc-status") == b"7"  # 403 -> PERMISSION_DENIED
    assert r.header("grpc-message") == b"100%25 n%C3%B6"
    assert r.body == b""


def test_grpc_proto_subtype_is_grpc(make: Any) -> None:
    pair = make()
    r = get(pair, "/nowhere", "POST", headers=(("content-type", "application/grpc+proto"),)).response()
    assert r.status == 200 and r.header("grpc-status") == b"12"


def test_grpc_web_local_reply_is_plain_http(make: Any) -> None:
    pair = make()
    r = get(pair, "/nowhere", "POST", headers=(("content-type", "application/grpc-web+proto"),)).response()
    assert r.status == 404 and r.header("grpc-status") is None


# -- HEAD ------------------------------------------------------------------------------------------


def test_head_local_reply_has_length_but_no_body(make: Any) -> None:
    pair = make()
    c = pair.connect()
    c.request("HEAD", "/direct")
    c.request("GET", "/direct")  # the connection stays in step: no stray body bytes
    head, full = c.responses()
    assert head.status == 503 and head.body == b""
    assert head.header("content-length") == b"11"
    assert full.body == b"direct body"
    assert not c.closed
    pair.assert_settled()


def test_head_local_reply_with_a_body_format_has_no_body(make: Any) -> None:
    pair = make({"body_format": {"text_format": "error %RESPONSE_CODE%"}})
    c = pair.connect()
    c.request("HEAD", "/nowhere")
    c.request("GET", "/nowhere")
    head, full = c.responses()
    assert head.status == 404 and head.body == b""
    assert full.body == b"error 404"
    assert head.header("content-length") == full.header("content-length")


def test_head_local_reply_over_h2_has_no_data(make: Any) -> None:
    pair = make()
    h = pair.connect_h2()
    sid = h.request("HEAD", "/direct", "a")
    r = h.response(sid)
    assert r.status == 503 and r.body == b"" and r.ended
