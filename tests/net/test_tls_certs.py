"""Test PKI made with the ``openssl`` CLI (CA, leaf certificates with SANs, CRLs), shared by the
TLS tests (the e2e test loads this file by path). Its own tests check the helper."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import pytest

OPENSSL = shutil.which("openssl")


def _run(*args: str, cwd: Path) -> None:
    assert OPENSSL is not None
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, capture_output=True, timeout=30)


class Pki:
    """A CA in ``root`` that issues EC P-256 certificates."""

    def __init__(self, root: Path, name: str = "ca") -> None:
        if OPENSSL is None:
            pytest.skip("openssl is not installed")
        self.root = root
        self.name = name
        root.mkdir(parents=True, exist_ok=True)
        self.ca_key = root / f"{name}.key"
        self.ca_cert = root / f"{name}.pem"
        self._serial = 0x1000
        _run(
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(self.ca_key), "-out", str(self.ca_cert), "-days", "2", "-subj", f"/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            cwd=root,
        )  # fmt: skip
        (root / "index.txt").write_text("")
        (root / "crlnumber").write_text("01\n")
        (root / "ca.cnf").write_text(
            "[ca]\ndefault_ca = d\n[d]\n"
            f"database = {root}/index.txt\ncrlnumber = {root}/crlnumber\n"
            f"certificate = {self.ca_cert}\nprivate_key = {self.ca_key}\n"
            "default_md = sha256\ndefault_crl_days = 2\n"
        )

    def issue(
        self, stem: str, cn: str, sans: list[str], *, serial: int | None = None, client: bool = False
    ) -> tuple[Path, Path]:
        """Certificate and key files ``<stem>.pem`` / ``<stem>.key``; ``sans`` like ``DNS:x``."""
        self._serial += 1
        serial = serial if serial is not None else self._serial
        key = self.root / f"{stem}.key"
        cert = self.root / f"{stem}.pem"
        csr = self.root / f"{stem}.csr"
        ext = self.root / f"{stem}.ext"
        eku = "clientAuth" if client else "serverAuth,clientAuth"
        lines = ["basicConstraints=CA:FALSE", f"extendedKeyUsage={eku}"]
        if sans:
            lines.append("subjectAltName=" + ",".join(sans))
        ext.write_text("\n".join(lines) + "\n")
        _run(
            "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={cn}", cwd=self.root,
        )  # fmt: skip
        _run(
            "x509", "-req", "-in", str(csr), "-CA", str(self.ca_cert), "-CAkey", str(self.ca_key),
            "-set_serial", str(serial), "-days", "2", "-out", str(cert), "-extfile", str(ext), cwd=self.root,
        )  # fmt: skip
        return cert, key

    def revoke(self, cert: Path) -> None:
        _run("ca", "-config", str(self.root / "ca.cnf"), "-revoke", str(cert), cwd=self.root)

    def crl(self, out: Path | None = None) -> Path:
        out = out or self.root / f"{self.name}.crl.pem"
        _run("ca", "-config", str(self.root / "ca.cnf"), "-gencrl", "-out", str(out), cwd=self.root)
        return out


def cert_info(path: Path) -> dict:
    return ssl._ssl._test_decode_cert(str(path))  # type: ignore[attr-defined]


def test_pki_issues_verifiable_certs(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    cert, key = pki.issue("srv", "srv", ["DNS:a.example.com", "URI:spiffe://cluster.local/ns/default/sa/foo"])
    info = cert_info(cert)
    assert ("DNS", "a.example.com") in info["subjectAltName"]
    assert ("URI", "spiffe://cluster.local/ns/default/sa/foo") in info["subjectAltName"]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(pki.ca_cert))
    ctx.load_cert_chain(str(cert), str(key))
