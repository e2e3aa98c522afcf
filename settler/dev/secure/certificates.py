"""Making the secure mode's material with openssl: a throw-away CA, a server certificate
for IP:127.0.0.1 only (with its PKCS#12 keystore), a client certificate for mutual TLS,
and generated passwords. Made once per stack directory, valid for CERT_DAYS.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from pathlib import Path

from settler.dev.secure.material import (
    CREDENTIALS_FILE,
    Material,
    load_material,
    secure_dir,
    write_private,
)
from settler.dev.services import DevStackError

CERT_DAYS = 30

_OPENSSL_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = settler dev
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
# 127.0.0.1 only: a client that connects by any other name must fail the hostname check.
subjectAltName = IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


def ensure_material(directory: Path | None = None) -> tuple[Material, bool]:
    """The secure mode's material, made now (CA, certificates, passwords) unless it exists.
    Returns it and whether it was made now."""
    directory = directory or secure_dir()
    existing = load_material(directory)
    if existing is not None:
        return existing, False
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    material = Material(
        directory=directory,
        kafka_password=secrets.token_urlsafe(18),
        cql_password=secrets.token_urlsafe(18),
        admin_password=secrets.token_urlsafe(18),
        keystore_password=secrets.token_urlsafe(18),
    )
    make_certificates(material)
    write_private(directory / CREDENTIALS_FILE, json.dumps({
        "kafka_password": material.kafka_password,
        "cql_password": material.cql_password,
        "admin_password": material.admin_password,
        "keystore_password": material.keystore_password,
    }, indent=2) + "\n")
    return material, True


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    """A new self-signed CA (`ca.pem`, `ca.key`) in `directory`: also what tests use as a CA
    the servers' certificates do not lead to."""
    directory.mkdir(parents=True, exist_ok=True)
    config = _openssl_config(directory)
    cert, key = directory / "ca.pem", directory / "ca.key"
    _openssl("req", "-x509", "-new", *_new_key(key), "-out", str(cert),
             "-days", str(CERT_DAYS), "-subj", f"/O=settler dev stack/CN={name}",
             "-config", str(config), "-extensions", "ca")
    return cert, key


def make_certificates(material: Material) -> None:
    """CA, server certificate (IP:127.0.0.1) with its PKCS#12 keystore, client certificate."""
    directory = material.directory
    make_ca(directory, f"settler dev CA {secrets.token_hex(4)}")
    _signed(material, "server", "/CN=127.0.0.1", material.server_cert, material.server_key)
    _signed(material, "client", "/CN=settler-client", material.client_cert, material.client_key)
    _openssl("pkcs12", "-export", "-in", str(material.server_cert),
             "-inkey", str(material.server_key), "-certfile", str(material.ca_file),
             "-name", "server", "-out", str(material.keystore),
             "-passout", "env:SETTLER_DEV_KEYSTORE_PASSWORD",
             env={"SETTLER_DEV_KEYSTORE_PASSWORD": material.keystore_password})
    for path in directory.iterdir():
        if path.suffix in (".key", ".p12"):
            path.chmod(0o600)
    for leftover in directory.glob("*.csr"):
        leftover.unlink()


def _signed(material: Material, extensions: str, subject: str, cert: Path, key: Path) -> None:
    csr = cert.with_suffix(".csr")
    config = _openssl_config(material.directory)
    _openssl("req", "-new", *_new_key(key), "-out", str(csr), "-subj", subject,
             "-config", str(config))
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(material.ca_file),
             "-CAkey", str(material.ca_key), "-set_serial", f"0x{secrets.token_hex(16)}",
             "-days", str(CERT_DAYS), "-out", str(cert), "-extfile", str(config),
             "-extensions", extensions)


def _new_key(key: Path) -> list[str]:
    # P-256: quick to make, and every TLS stack here (Java 17, OpenSSL) speaks ECDSA.
    return ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", str(key)]


def _openssl_config(directory: Path) -> Path:
    path = directory / "openssl.cnf"
    if not path.exists():
        path.write_text(_OPENSSL_CONFIG)
    return path


def _openssl(*args: str, env: dict[str, str] | None = None) -> None:
    try:
        result = subprocess.run(
            ["openssl", *args], capture_output=True, text=True, timeout=60, check=False,
            env={**os.environ, **(env or {})},
        )
    except FileNotFoundError:
        raise DevStackError("openssl is not on PATH: the secure dev stack needs it") from None
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise DevStackError(f"openssl {args[0]} failed (exit {result.returncode}): {last}")
