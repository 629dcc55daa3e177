"""The secrets manager: named secrets (static and dynamic), providers, and TLS contexts that
follow an update of a secret they use. No module-level state: managers are independent."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2, tls_pb2

from moorline.config.context import BuildContext
from moorline.config.errors import ConfigError
from moorline.config.loader import parse_message
from moorline.net import secrets as secrets_mod
from moorline.net.secrets import FileSdsProvider, NamedSecretProvider, SecretsManager, secrets_of
from moorline.net.tls import compile_downstream
from moorline.observability.stats import Store

_spec = importlib.util.spec_from_file_location("tls_certs", Path(__file__).parent / "test_tls_certs.py")
assert _spec is not None and _spec.loader is not None
_certs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_certs)
Pki = _certs.Pki


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, str]]:
    pki = Pki(tmp_path_factory.mktemp("secrets-pki"))
    out = []
    for i in range(2):
        c, k = pki.issue(f"s{i}", "srv", ["DNS:srv"], serial=500 + i)
        out.append((c.read_text(), k.read_text()))
    return out


def tls_secret(name: str, pair: tuple[str, str]) -> Any:
    c, k = pair
    return parse_message(
        {
            "name": name,
            "tls_certificate": {
                "certificate_chain": {"inline_string": c},
                "private_key": {"inline_string": k},
            },
        },
        secret_pb2.Secret,
    )


def downstream(name: str, sds_config: dict[str, Any] | None = None) -> Any:
    ref: dict[str, Any] = {"name": name}
    if sds_config is not None:
        ref["sds_config"] = sds_config
    return parse_message(
        {"common_tls_context": {"tls_certificate_sds_secret_configs": [ref]}}, tls_pb2.DownstreamTlsContext
    )


def test_named_secrets_static_and_dynamic(pairs: list[tuple[str, str]]) -> None:
    m = SecretsManager()
    m.add_static(tls_secret("a", pairs[0]), "static_resources.secrets[0]")
    with pytest.raises(ConfigError) as ei:
        m.add_static(tls_secret("a", pairs[1]), "static_resources.secrets[1]")
    assert ei.value.path == "static_resources.secrets[1].name" and "duplicate" in ei.value.message
    with pytest.raises(ConfigError) as ei:
        m.add_or_update(tls_secret("a", pairs[1]))
    assert "static" in ei.value.message
    assert m.remove("a") is False and m.get("a") is not None
    assert m.add_or_update(tls_secret("d", pairs[0]), "v1") is True
    assert m.add_or_update(tls_secret("d", pairs[0]), "v2") is False  # unchanged, version noted
    entries = dict(m.entries())
    assert entries["a"].static and not entries["d"].static and entries["d"].version_info == "v2"
    assert m.remove("d") is True and m.get("d") is None and m.remove("d") is False


def test_provider_lookups_name_the_field() -> None:
    m = SecretsManager()
    with pytest.raises(ConfigError) as ei:
        m.provider_for(downstream("nope").common_tls_context.tls_certificate_sds_secret_configs[0], None, "p")
    assert ei.value.path == "p.name" and "no static secret named 'nope'" in ei.value.message
    ads = downstream("x", {"ads": {}}).common_tls_context.tls_certificate_sds_secret_configs[0]
    with pytest.raises(ConfigError) as ei:
        m.provider_for(ads, None, "p")
    assert ei.value.path == "p.sds_config.ads"
    seen: list[str] = []

    class Client(secrets_mod.StaticSecretProvider):
        pass

    def factory(cs: Any, name: str, ctx: Any, path: str) -> Any:
        seen.append(f"{name}@{path}")
        return Client(secret_pb2.Secret(name=name))

    m.register_sds_client(factory)
    assert isinstance(m.provider_for(ads, None, "p"), Client) and seen == ["x@p.sds_config"]
    # The hook is the manager's, not the module's: another manager still refuses.
    with pytest.raises(ConfigError):
        SecretsManager().provider_for(ads, None, "p")


def test_tls_context_follows_an_update_of_its_named_secret(pairs: list[tuple[str, str]]) -> None:
    m = SecretsManager()
    m.add_or_update(tls_secret("srv", pairs[0]), "1")
    ctx = BuildContext(stats=Store(), secrets=m)
    tls = compile_downstream(downstream("srv"), ctx, "tls")
    p = tls.common.cert_providers[0][0]
    assert isinstance(p, NamedSecretProvider)
    first = tls.server_context
    assert m.add_or_update(tls_secret("srv", pairs[1]), "2")
    assert tls.generation == 1 and tls.last_error is None and tls.server_context is not first
    # A secret that cannot be loaded: the context keeps the certificates it has.
    bad = tls_secret("srv", (pairs[0][0], pairs[1][1]))  # certificate and key do not match
    current = tls.server_context
    m.add_or_update(bad, "3")
    assert tls.last_error is not None and tls.server_context is current


def test_managers_do_not_share_secrets_files_or_watchers(
    tmp_path: Path, pairs: list[tuple[str, str]]
) -> None:
    c, k = pairs[0]
    sds = tmp_path / "sds.json"
    sds.write_text(
        json.dumps(
            {
                "version_info": "f1",
                "resources": [
                    {
                        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
                        "name": "f",
                        "tls_certificate": {
                            "certificate_chain": {"inline_string": c},
                            "private_key": {"inline_string": k},
                        },
                    }
                ],
            }
        )
    )
    src = {"path_config_source": {"path": str(sds)}}
    a, b = SecretsManager(), SecretsManager()
    a.add_static(tls_secret("only_a", pairs[0]))
    ref = downstream("f", src).common_tls_context.tls_certificate_sds_secret_configs[0]
    pa1, pa2, pb = (
        a.provider_for(ref, None, "p"),
        a.provider_for(ref, None, "p"),
        b.provider_for(ref, None, "p"),
    )
    assert isinstance(pa1, FileSdsProvider) and pa1 is pa2 and pb is not pa1
    assert pa1.version_info == "f1" and [fp.name for fp in a.file_providers()] == ["f"]
    assert a.watcher is not b.watcher and a.watcher.watched() == [str(sds)] == b.watcher.watched()
    only_a = downstream("only_a").common_tls_context.tls_certificate_sds_secret_configs[0]
    assert a.provider_for(only_a, None, "p") is not None
    with pytest.raises(ConfigError):
        b.provider_for(only_a, None, "p")
    # A context without a manager gets a private one of its own.
    ctx = BuildContext(stats=Store())
    assert secrets_of(ctx) is secrets_of(ctx) and ctx.secrets is not a
    assert not hasattr(secrets_mod, "WATCHER") and not hasattr(secrets_mod, "_static_secrets")
