"""The secure servers' configuration: the checked-in templates of `deploy/local/`
(Kafka's secure.properties, Cassandra's secure.yaml) filled in with this stack's keystore,
CA file and users.
"""

from __future__ import annotations

import re
from string import Template

from settler.dev.paths import deploy_dir
from settler.dev.secure.material import CQL_ADMIN, CQL_USER, KAFKA_USER, Material


def _substitutions(material: Material) -> dict[str, str]:
    return {
        "ca_file": str(material.ca_file),
        "keystore": str(material.keystore),
        "keystore_password": material.keystore_password,
        "kafka_user": KAFKA_USER,
        "kafka_password": material.kafka_password,
        "cql_user": CQL_USER,
        "admin_user": CQL_ADMIN,
    }


def kafka_properties(material: Material) -> str:
    """The secure listeners' broker settings (deploy/local/kafka/secure.properties, filled)."""
    template = (deploy_dir() / "kafka" / "secure.properties").read_text()
    return Template(template).substitute(_substitutions(material))


def cassandra_yaml(material: Material) -> str:
    """deploy/local/cassandra/cassandra.yaml with the top-level keys of secure.yaml
    replaced by secure.yaml's (filled in)."""
    base = (deploy_dir() / "cassandra" / "cassandra.yaml").read_text()
    overrides = Template((deploy_dir() / "cassandra" / "secure.yaml").read_text()).substitute(
        _substitutions(material))
    replaced = set(re.findall(r"^([A-Za-z_]+):", overrides, flags=re.MULTILINE))
    kept: list[str] = []
    skipping = False
    for line in base.splitlines():
        top_level = re.match(r"^([A-Za-z_]+):", line)
        if top_level:
            skipping = top_level.group(1) in replaced
        elif line and not line[0].isspace():
            skipping = False  # a comment at column 0 ends the block before it
        if not skipping:
            kept.append(line)
    return "\n".join(kept) + "\n\n# ---- settler dev up --secure\n" + overrides
