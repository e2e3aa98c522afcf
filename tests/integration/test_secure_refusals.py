"""A server that refuses the settings ends every command at once with exit 2 and one line
naming the setting and the server (issue 15): a wrong Kafka or CQL password, a CA that did
not sign the server's certificate, a certificate issued for another address, a client
certificate the mutual-TLS listener requires but did not get. Never a retry loop that looks
like an outage; readiness says it too."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from settler.config import ConnectionSettingError, load_settings
from settler.core.registry import load_registry
from settler.dev import secure as devstack_secure
from settler.store.schema import apply_schema, drop_keyspace
from settler.worker import Worker
from tests import harness
from tests.secure_harness import (
    Run,
    SecureStack,
    Transcript,
    clean_environ,
    ensure_secure_stack,
    forwarder,
)

pytestmark = pytest.mark.integration

WITHIN_S = 15.0
"""A refusal ends a command this fast (about 1 s here); a retry loop would not."""

WRONG_PASSWORD = "wrong-" + secrets.token_urlsafe(12)

KAFKA_COMMANDS = {
    "run": ("run",),
    "replay": ("replay", "--from-offset", "0", "--no-wait"),
    "dlq": ("dlq", "list"),
}
CQL_COMMANDS = {
    "run": ("run",),
    "balances": ("balances", "1"),
    "verify": ("verify", "--quiet"),
    "api": ("api",),
}


@dataclass(frozen=True)
class Refusal:
    """One way to get the settings wrong, and the setting the error must name."""

    kafka_mode: str  # which secure Kafka path the settings start from
    changes: dict[str, str]
    setting: str
    server: str


@dataclass
class RefusalStack:
    secure: SecureStack
    keyspace: str
    untrusted_ca: Path
    cql_mismatch_address: str  # a forwarder on 127.0.0.2 to the secure CQL port
    transcript: Transcript

    def refusals(self) -> dict[str, Refusal]:
        ports = self.secure.ports
        sasl = f"127.0.0.1:{ports.kafka_sasl_ssl}"
        cql = f"127.0.0.1:{ports.cql}"
        return {
            "kafka-wrong-password": Refusal(
                "scram", {"SETTLER_KAFKA_SASL_PASSWORD": WRONG_PASSWORD},
                "SETTLER_KAFKA_SASL_USERNAME/SETTLER_KAFKA_SASL_PASSWORD", sasl),
            "kafka-untrusted-ca": Refusal(
                "scram", {"SETTLER_KAFKA_SSL_CAFILE": str(self.untrusted_ca)},
                "SETTLER_KAFKA_SSL_CAFILE", sasl),
            "kafka-hostname-mismatch": Refusal(
                # The broker's certificate names 127.0.0.1 only.
                "scram", {"SETTLER_KAFKA_BOOTSTRAP": f"localhost:{ports.kafka_sasl_ssl}"},
                "SETTLER_KAFKA_BOOTSTRAP", f"localhost:{ports.kafka_sasl_ssl}"),
            "kafka-no-client-certificate": Refusal(
                "mtls", {"SETTLER_KAFKA_SSL_CERTFILE": "", "SETTLER_KAFKA_SSL_KEYFILE": ""},
                "SETTLER_KAFKA_SSL_CERTFILE", f"127.0.0.1:{ports.kafka_ssl}"),
            "cql-wrong-password": Refusal(
                "scram", {"SETTLER_CQL_PASSWORD": WRONG_PASSWORD},
                "SETTLER_CQL_USERNAME/SETTLER_CQL_PASSWORD", cql),
            "cql-untrusted-ca": Refusal(
                "scram", {"SETTLER_CQL_SSL_CAFILE": str(self.untrusted_ca)},
                "SETTLER_CQL_SSL_CAFILE", cql),
            "cql-hostname-mismatch": Refusal(
                "scram", {"SETTLER_CQL_CONTACT_POINTS": self.cql_mismatch_address},
                "SETTLER_CQL_CONTACT_POINTS", self.cql_mismatch_address),
        }

    def environ(self, refusal: Refusal) -> dict[str, str]:
        return clean_environ(**{
            **self.secure.environ(refusal.kafka_mode),
            "SETTLER_KEYSPACE": self.keyspace,
            "SETTLER_TOPICS": f"t.{self.keyspace}.events",
            "SETTLER_DLQ_TOPIC": f"t.{self.keyspace}.dlq",
            "SETTLER_GROUP_ID": f"t-{self.keyspace}",
            "SETTLER_METRICS_HOST": "127.0.0.1",
            "SETTLER_METRICS_PORT": str(harness.free_port()),
            "SETTLER_API_HOST": "127.0.0.1",
            "SETTLER_API_PORT": str(harness.free_port()),
            "SETTLER_LOG_FORMAT": "json",
            **refusal.changes,
        })


@pytest.fixture(scope="module")
def refusal_stack(stack: None, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[RefusalStack]:
    secure = ensure_secure_stack()
    untrusted, _ = devstack_secure.make_ca(tmp_path_factory.mktemp("untrusted-ca"),
                                           "a CA no server here uses")
    keyspace = f"refusals_{secrets.token_hex(4)}"
    # A keyspace on the secure node: a worker refused by Kafka has connected to CQL first.
    settings = load_settings(environ={**secure.environ(), "SETTLER_KEYSPACE": keyspace})
    apply_schema(settings)
    try:
        with forwarder("127.0.0.2", secure.ports.cql) as proxy:
            yield RefusalStack(secure, keyspace, untrusted, proxy.address, Transcript())
    finally:
        drop_keyspace(settings)


CASES = [
    *((case, command) for case in ("kafka-wrong-password", "kafka-untrusted-ca",
                                   "kafka-hostname-mismatch", "kafka-no-client-certificate")
      for command in KAFKA_COMMANDS),
    *((case, command) for case in ("cql-wrong-password", "cql-untrusted-ca",
                                   "cql-hostname-mismatch")
      for command in CQL_COMMANDS),
]


@pytest.mark.parametrize(("case", "command"), CASES, ids=[f"{c}-{m}" for c, m in CASES])
def test_a_refused_setting_ends_the_command_with_exit_2_naming_it(
    refusal_stack: RefusalStack, case: str, command: str
) -> None:
    refusal = refusal_stack.refusals()[case]
    args = {**KAFKA_COMMANDS, **CQL_COMMANDS}[command]
    run = refusal_stack.transcript.settler(f"{case} {command}", *args,
                                           environ=refusal_stack.environ(refusal), timeout=60)
    assert run.code == 2, run.describe()
    assert run.seconds < WITHIN_S, run.describe()
    assert run.last_line.startswith(f"settler: {refusal.setting}: "), run.describe()
    assert refusal.server in run.last_line, run.describe()
    # The worker logs each retry as a transient failure; aiokafka logs each refused
    # bootstrap attempt: one attempt, no retry.
    assert "transient failure" not in run.output, f"a refusal was retried:\n{run.describe()}"
    assert run.output.count("Unable connect") <= 1, f"a refusal was retried:\n{run.describe()}"
    leaks = Transcript({"output": run.output}).leaks(
        {**refusal_stack.secure.material.secrets(), "the wrong password": WRONG_PASSWORD})
    assert not leaks, f"secrets printed: {leaks}\n{run.describe()}"


@pytest.mark.parametrize(("case", "check"), [("cql-wrong-password", "cql"),
                                             ("kafka-wrong-password", "kafka"),
                                             ("kafka-untrusted-ca", "kafka")])
async def test_readiness_reports_the_refused_setting(
    refusal_stack: RefusalStack, case: str, check: str
) -> None:
    refusal = refusal_stack.refusals()[case]
    settings = load_settings(environ=refusal_stack.environ(refusal))
    worker = Worker(settings, load_registry(settings.registry))
    started = time.monotonic()
    with pytest.raises(ConnectionSettingError) as refused:
        await worker.run()
    assert time.monotonic() - started < WITHIN_S
    readiness = json.loads(worker.health.body())
    assert readiness["ready"] is False
    assert check in readiness["failing"]
    assert readiness["error"] == str(refused.value)
    assert readiness["error"].startswith(f"{refusal.setting}: ")


def test_a_cql_node_asking_for_credentials_names_the_username_setting(
    refusal_stack: RefusalStack
) -> None:
    refusal = Refusal("scram", {"SETTLER_CQL_USERNAME": "", "SETTLER_CQL_PASSWORD": ""},
                      "SETTLER_CQL_USERNAME/SETTLER_CQL_PASSWORD",
                      f"127.0.0.1:{refusal_stack.secure.ports.cql}")
    run: Run = refusal_stack.transcript.settler("no credentials", "balances", "1",
                                                environ=refusal_stack.environ(refusal))
    assert run.code == 2, run.describe()
    assert run.last_line.startswith(f"settler: {refusal.setting}: "), run.describe()
    assert "requires a username and password" in run.last_line
