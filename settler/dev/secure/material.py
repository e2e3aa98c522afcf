"""The secure mode's material as the rest of the stack and the tests see it: where the
certificates, keys and passwords are, the settler settings that use them, and reading them
back from `.stack/secure/` (certificates.py makes them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from settler.dev.paths import stack_dir
from settler.dev.services import SecurePorts

KAFKA_USER = "settler"
CQL_USER = "settler"
CQL_ADMIN = "settler_admin"
KAFKA_MODES = ("scram", "plain", "mtls")
CREDENTIALS_FILE = "credentials.json"


@dataclass(frozen=True)
class Material:
    """The secure mode's certificates, keys and passwords, as files under `directory`."""

    directory: Path
    # Kept out of repr: a failing test or a traceback prints the objects it holds.
    kafka_password: str = field(repr=False)
    cql_password: str = field(repr=False)
    admin_password: str = field(repr=False)
    keystore_password: str = field(repr=False)

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.directory / "server.key"

    @property
    def keystore(self) -> Path:
        """The servers' certificate and key as PKCS#12 (Kafka and Cassandra read it)."""
        return self.directory / "server.p12"

    @property
    def client_cert(self) -> Path:
        return self.directory / "client.pem"

    @property
    def client_key(self) -> Path:
        return self.directory / "client.key"

    @property
    def settings_file(self) -> Path:
        """A settler TOML config for the secure paths: `settler --config <it> run`."""
        return self.directory / "settler.toml"

    def secrets(self) -> dict[str, str]:
        """Every secret no output may show, by name: the passwords and the private keys
        (their base64 bodies)."""
        return {
            "kafka password": self.kafka_password,
            "cql password": self.cql_password,
            "cql admin password": self.admin_password,
            "keystore password": self.keystore_password,
            **{f"private key {path.name}": _pem_body(path)
               for path in (self.ca_key, self.server_key, self.client_key)},
        }

    def settler_environ(self, ports: SecurePorts, *, kafka: str = "scram") -> dict[str, str]:
        """SETTLER_* variables for the secure paths: Kafka over SASL_SSL with SCRAM-SHA-512
        (`scram`) or PLAIN (`plain`), or over TLS with a client certificate (`mtls`); CQL
        over TLS with the `settler` role's password."""
        if kafka not in KAFKA_MODES:
            raise ValueError(f"kafka must be one of {KAFKA_MODES}, got {kafka!r}")
        if kafka == "mtls":
            environ = {
                "SETTLER_KAFKA_BOOTSTRAP": f"127.0.0.1:{ports.kafka_ssl}",
                "SETTLER_KAFKA_SECURITY_PROTOCOL": "SSL",
                "SETTLER_KAFKA_SSL_CAFILE": str(self.ca_file),
                "SETTLER_KAFKA_SSL_CERTFILE": str(self.client_cert),
                "SETTLER_KAFKA_SSL_KEYFILE": str(self.client_key),
            }
        else:
            environ = {
                "SETTLER_KAFKA_BOOTSTRAP": f"127.0.0.1:{ports.kafka_sasl_ssl}",
                "SETTLER_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
                "SETTLER_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512" if kafka == "scram" else "PLAIN",
                "SETTLER_KAFKA_SASL_USERNAME": KAFKA_USER,
                "SETTLER_KAFKA_SASL_PASSWORD": self.kafka_password,
                "SETTLER_KAFKA_SSL_CAFILE": str(self.ca_file),
            }
        return {
            **environ,
            "SETTLER_CQL_CONTACT_POINTS": f"127.0.0.1:{ports.cql}",
            "SETTLER_CQL_USERNAME": CQL_USER,
            "SETTLER_CQL_PASSWORD": self.cql_password,
            "SETTLER_CQL_SSL_CAFILE": str(self.ca_file),
        }


def secure_dir() -> Path:
    return stack_dir() / "secure"


def _pem_body(path: Path) -> str:
    lines = [line for line in path.read_text().splitlines() if line and "-----" not in line]
    return "".join(lines)


def load_material(directory: Path | None = None) -> Material | None:
    """The material `ensure_material` made, or None when there is none (or it is partial)."""
    directory = directory or secure_dir()
    try:
        stored = json.loads((directory / CREDENTIALS_FILE).read_text())
        material = Material(directory=directory, **stored)
    except (OSError, ValueError, TypeError):
        return None
    files = (material.ca_file, material.server_cert, material.keystore, material.client_cert,
             material.client_key)
    return material if all(path.is_file() for path in files) else None


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner may read: it holds passwords."""
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_text(text)


def write_settings_file(material: Material, ports: SecurePorts) -> Path:
    """`.stack/secure/settler.toml`: settler's settings for the secure paths (SASL_SSL +
    SCRAM-SHA-512, CQL TLS + password), readable by its owner only."""
    environ = material.settler_environ(ports, kafka="scram")
    lines = ["# settler's settings for `settler dev up --secure` (generated; holds passwords).",
             f"# Use: settler --config {material.settings_file} run"]
    for variable, value in environ.items():
        name = variable.removeprefix("SETTLER_").lower()
        lines.append(f"{name} = {json.dumps(value)}")
    write_private(material.settings_file, "\n".join(lines) + "\n")
    return material.settings_file
