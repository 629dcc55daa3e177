"""``/config_dump``: what the managers hold, in Envoy's ConfigDump shape, redacted like Envoy, with
the ``resource`` and ``mask`` views."""

from __future__ import annotations

import base64
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from envoy.admin.v3 import config_dump_pb2, config_dump_shared_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from google.protobuf import json_format

from moorline.admin.config_dump import ViewError, redact, select
from moorline.config.loader import load_bootstrap, parse_message
from moorline.server import Server
from moorline.testing.inproc import ServerThread
from moorline.testing.procs import RawConn, bootstrap, cluster, free_port, hcm_listener, http_request

_spec = importlib.util.spec_from_file_location(
    "tls_certs", Path(__file__).parent.parent / "net" / "test_tls_certs.py"
)
assert _spec is not None and _spec.loader is not None
_certs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_certs)
Pki = _certs.Pki

DTLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
SECTIONS = {
    "BootstrapConfigDump": config_dump_pb2.BootstrapConfigDump,
    "ClustersConfigDump": config_dump_shared_pb2.ClustersConfigDump,
    "ListenersConfigDump": config_dump_shared_pb2.ListenersConfigDump,
    "RoutesConfigDump": config_dump_shared_pb2.RoutesConfigDump,
    "SecretsConfigDump": config_dump_pb2.SecretsConfigDump,
}
B64_REDACTED = base64.b64encode(b"[redacted]").decode()  # "W3JlZGFjdGVkXQ==", as Envoy prints it
GENERIC = "generic-secret-value-1234"
PKCS12 = b"pkcs12-bytes-5678"
PASSWORD = "hunter2-password"
TICKET = b"t" * 80


def _tls_listener(name: str, port: int, common: dict[str, Any]) -> dict[str, Any]:
    d = hcm_listener(name, port, [{"match": {"prefix": "/"}, "direct_response": {"status": 200}}])
    d["filter_chains"][0]["transport_socket"] = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {"@type": DTLS, "common_tls_context": common},
    }
    return d


def _section(dump: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in dump["configs"] if c["@type"].endswith("." + name))


@pytest.fixture(scope="module")
def keypair(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    pki = Pki(tmp_path_factory.mktemp("cd-pki"))
    c, k = pki.issue("srv", "srv", ["DNS:srv"])
    return c.read_text(), k.read_text()


def _server(keypair: tuple[str, str], tmp_path: Path) -> Server:
    cert, key = keypair
    secrets = [
        {"name": "srv", "tls_certificate": {"certificate_chain": {"inline_string": cert}, "private_key": {"inline_string": key}}},
        {"name": "gen", "generic_secret": {"secret": {"inline_string": GENERIC}}},
        {"name": "p12", "tls_certificate": {"pkcs12": {"inline_bytes": base64.b64encode(PKCS12).decode()},
                                            "password": {"inline_string": PASSWORD}}},
        {"name": "tickets", "session_ticket_keys": {"keys": [{"inline_bytes": base64.b64encode(TICKET).decode()}]}},
    ]  # fmt: skip
    inline = {
        "tls_certificates": [
            {"certificate_chain": {"inline_string": cert}, "private_key": {"inline_string": key}}
        ]
    }
    doc = yaml.safe_load(
        bootstrap(
            [
                _tls_listener(
                    "by_name", free_port(), {"tls_certificate_sds_secret_configs": [{"name": "srv"}]}
                ),
                _tls_listener("inline", free_port(), inline),
            ],
            [cluster("static_svc", [8080])],
        )
    )
    doc["static_resources"]["secrets"] = secrets
    return Server(load_bootstrap(yaml_text=yaml.safe_dump(doc)), "test")


def test_shape_sections_and_redaction(keypair: tuple[str, str], tmp_path: Path) -> None:
    cert, key = keypair
    s = _server(keypair, tmp_path)
    s.cluster_manager.add_or_update(parse_message(cluster("dyn", [9090]), cluster_pb2.Cluster), "", "c1")
    s.listener_manager.add_or_update(
        parse_message(
            _tls_listener("dyn_l", free_port(), {"tls_certificate_sds_secret_configs": [{"name": "srv"}]}),
            listener_pb2.Listener,
        ),
        "",
        "l1",
    )
    dyn_secret = parse_message(
        {
            "name": "dyn_s",
            "tls_certificate": {
                "certificate_chain": {"inline_string": cert},
                "private_key": {"inline_string": key},
            },
        },
        secret_pb2.Secret,
    )
    s.secrets.add_or_update(dyn_secret, "s1")
    dump = s.config_dump()
    text = json.dumps(dump)
    # Nothing secret anywhere (bootstrap, listeners, secrets), redaction marks instead.
    body = "".join(key.strip().splitlines()[1:-1])
    assert body[:40] not in text.replace("\\n", "")
    for leaked in (GENERIC, PASSWORD, base64.b64encode(PKCS12).decode(), base64.b64encode(TICKET).decode()):
        assert leaked not in text, leaked
    assert [c["@type"].rsplit(".", 1)[1] for c in dump["configs"]] == list(SECTIONS)
    # Every section is a valid envoy.admin.v3 message (field names and nesting as Envoy's).
    for c in dump["configs"]:
        msg = {k: v for k, v in c.items() if k != "@type"}
        json_format.ParseDict(msg, SECTIONS[c["@type"].rsplit(".", 1)[1]]())

    boot = _section(dump, "BootstrapConfigDump")
    assert boot["last_updated"].endswith("Z")
    bsec = {x["name"]: x for x in boot["bootstrap"]["static_resources"]["secrets"]}
    assert bsec["gen"]["generic_secret"]["secret"]["inline_string"] == "[redacted]"

    cl = _section(dump, "ClustersConfigDump")
    assert [x["cluster"]["name"] for x in cl["static_clusters"]] == ["static_svc"]
    (dc,) = cl["dynamic_active_clusters"]
    assert dc["version_info"] == "c1" and dc["cluster"]["name"] == "dyn" and dc["last_updated"]
    assert dc["cluster"]["@type"] == "type.googleapis.com/envoy.config.cluster.v3.Cluster"

    ls = _section(dump, "ListenersConfigDump")
    assert [x["listener"]["name"] for x in ls["static_listeners"]] == ["by_name", "inline"]
    inline_tls = ls["static_listeners"][1]["listener"]["filter_chains"][0]["transport_socket"]["typed_config"]
    tc = inline_tls["common_tls_context"]["tls_certificates"][0]
    assert (
        tc["private_key"] == {"inline_string": "[redacted]"}
        and tc["certificate_chain"]["inline_string"] == cert
    )
    (dl,) = ls["dynamic_listeners"]
    assert dl["name"] == "dyn_l" and dl["active_state"]["version_info"] == "l1"
    assert dl["active_state"]["listener"]["name"] == "dyn_l" and dl["active_state"]["last_updated"]

    rt = _section(dump, "RoutesConfigDump")
    assert {x["route_config"]["name"] for x in rt["static_route_configs"]} == {
        "by_name_routes",
        "inline_routes",
        "dyn_l_routes",
    }

    sc = _section(dump, "SecretsConfigDump")
    st = {x["name"]: x for x in sc["static_secrets"]}
    assert set(st) == {"srv", "gen", "p12", "tickets"} and all(x["last_updated"] for x in st.values())
    assert st["srv"]["secret"]["tls_certificate"]["private_key"] == {"inline_string": "[redacted]"}
    assert st["srv"]["secret"]["tls_certificate"]["certificate_chain"] == {"inline_string": cert}
    assert st["gen"]["secret"]["generic_secret"]["secret"] == {"inline_string": "[redacted]"}
    p12 = st["p12"]["secret"]["tls_certificate"]
    assert p12["pkcs12"] == {"inline_bytes": B64_REDACTED} and p12["password"] == {
        "inline_string": "[redacted]"
    }
    assert st["tickets"]["secret"]["session_ticket_keys"]["keys"] == [{"inline_bytes": B64_REDACTED}]
    (ds,) = sc["dynamic_active_secrets"]
    assert ds["name"] == "dyn_s" and ds["version_info"] == "s1"
    assert ds["secret"]["tls_certificate"]["private_key"] == {"inline_string": "[redacted]"}


def test_a_replaced_listener_shows_while_it_drains(upstream: Any) -> None:
    port = free_port()
    cfg = bootstrap([], [cluster("up", [upstream.port])])
    with ServerThread(cfg, drain_time=30.0) as srv:
        lm = srv.server.listener_manager

        def lp(body: str) -> Any:
            routes = [
                {"match": {"prefix": "/delay"}, "route": {"cluster": "up"}},
                {
                    "match": {"prefix": "/"},
                    "direct_response": {"status": 200, "body": {"inline_string": body}},
                },
            ]
            return parse_message(hcm_listener("web", port, routes), listener_pb2.Listener)

        srv.call(lm.add_or_update, lp("one"), "", "1")
        busy = RawConn("127.0.0.1", port)  # a request in flight on version 1
        busy.send(b"GET /delay/2000 HTTP/1.1\r\nHost: x\r\n\r\n")
        upstream.wait_for_requests(1)
        srv.call(lm.add_or_update, lp("two"), "", "2")
        assert http_request("127.0.0.1", port, "GET", "/").body == b"two"
        (dl,) = _section(srv.call(srv.server.config_dump), "ListenersConfigDump")["dynamic_listeners"]
        assert dl["active_state"]["version_info"] == "2" and dl["draining_state"]["version_info"] == "1"
        assert busy.read_response().status == 200
        busy.close()


def test_sds_file_secrets_are_dynamic_secrets(keypair: tuple[str, str], tmp_path: Path) -> None:
    cert, key = keypair
    sds = tmp_path / "sds.yaml"
    sds.write_text(
        json.dumps(
            {
                "version_info": "file-7",
                "resources": [
                    {
                        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
                        "name": "from_file",
                        "tls_certificate": {
                            "certificate_chain": {"inline_string": cert},
                            "private_key": {"inline_string": key},
                        },
                    }
                ],
            }
        )
    )
    common = {
        "tls_certificate_sds_secret_configs": [
            {"name": "from_file", "sds_config": {"path_config_source": {"path": str(sds)}}}
        ]
    }
    s = Server(load_bootstrap(yaml_text=bootstrap([_tls_listener("l", free_port(), common)], [])), "test")
    (ds,) = _section(s.config_dump(), "SecretsConfigDump")["dynamic_active_secrets"]
    assert ds["name"] == "from_file" and ds["version_info"] == "file-7" and ds["last_updated"]
    assert ds["secret"]["tls_certificate"]["private_key"] == {"inline_string": "[redacted]"}


def test_redact_copies_and_follows_any_and_struct() -> None:
    sec = parse_message(
        {"name": "g", "generic_secret": {"secret": {"inline_string": "x"}}}, secret_pb2.Secret
    )
    out = redact(sec)
    assert (
        out.generic_secret.secret.inline_string == "[redacted]"
        and sec.generic_secret.secret.inline_string == "x"
    )
    # A TypedStruct of an unknown type: no annotations, secret-looking keys are redacted.
    lst = parse_message(
        {
            "name": "l",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": 1}},
            "filter_chains": [
                {
                    "filters": [
                        {
                            "name": "x",
                            "typed_config": {
                                "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
                                "type_url": "type.googleapis.com/acme.Unknown",
                                "value": {"password": "p4ss", "nested": {"private_key": "k3y"}, "keep": "v"},
                            },
                        }
                    ]
                }
            ],
        },
        listener_pb2.Listener,
    )
    text = json.dumps(json_format.MessageToDict(redact(lst)))
    assert "p4ss" not in text and "k3y" not in text and '"keep": "v"' in text


def test_resource_and_mask_views() -> None:
    dump = {
        "configs": [
            {
                "@type": "type.googleapis.com/envoy.admin.v3.BootstrapConfigDump",
                "bootstrap": {"node": {"id": "n"}},
            },
            {
                "@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump",
                "static_clusters": [
                    {"cluster": {"@type": "t/C", "name": "a", "type": "STATIC"}, "last_updated": "x"}
                ],
                "dynamic_active_clusters": [
                    {
                        "version_info": "1",
                        "cluster": {"@type": "t/C", "name": "b", "type": "EDS"},
                        "last_updated": "y",
                    }
                ],
            },
        ]
    }
    assert select(dump, None, None) is dump
    out = select(dump, "dynamic_active_clusters", "cluster.name")
    assert out == {
        "configs": [
            {
                "@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump.DynamicCluster",
                "cluster": {"@type": "t/C", "name": "b"},
            }
        ]
    }
    out = select(dump, None, "static_clusters.cluster.name")
    assert out["configs"][1] == {
        "@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump",
        "static_clusters": [{"cluster": {"@type": "t/C", "name": "a"}}],
    }
    assert out["configs"][0] == {"@type": "type.googleapis.com/envoy.admin.v3.BootstrapConfigDump"}
    with pytest.raises(ViewError):
        select(dump, "no_such_field", None)


def test_views_over_http(upstream: Any) -> None:
    admin = free_port()
    cfg = bootstrap([], [cluster("s", [upstream.port])], admin_port=admin)
    with ServerThread(cfg) as srv:
        srv.call(
            srv.server.cluster_manager.add_or_update,
            parse_message(cluster("d", [1]), cluster_pb2.Cluster),
            "",
            "9",
        )
        r = http_request(
            "127.0.0.1",
            admin,
            "GET",
            "/config_dump?resource=dynamic_active_clusters&mask=cluster.name,version_info",
        )
        assert r.status == 200
        assert json.loads(r.body) == {
            "configs": [
                {
                    "@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump.DynamicCluster",
                    "version_info": "9",
                    "cluster": {"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "name": "d"},
                }
            ]
        }
        assert http_request("127.0.0.1", admin, "GET", "/config_dump?resource=bogus").status == 404
