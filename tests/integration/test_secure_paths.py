"""Settling and operating over the secure paths of the local stack (issue 15): Kafka over
SASL_SSL with SCRAM-SHA-512 (records produced with PLAIN) or over mutual TLS, CQL over TLS
with a password, for the worker and for every command an operator runs.

`secure_run` does the whole secure run once (schema, stream, worker, every command, the
HTTP API) and keeps every output; each test checks one part of it, and the last one
searches all of it for secrets."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from settler import kafka
from settler.config import Settings, load_settings
from settler.core.registry import Registry
from settler.ops.sample import SampleRecord, StreamShape, generate
from tests import harness
from tests.integration.test_settlement import assert_dead_letters, assert_settled_exactly
from tests.secure_harness import (
    Run,
    SecureStack,
    Transcript,
    clean_environ,
    ensure_secure_stack,
    secret_forms,
)

pytestmark = pytest.mark.integration

SHAPE = StreamShape(events=3000, users=60, duplicate_rate=0.05, malformed_rate=0.02, seed=15)
MTLS_SHAPE = StreamShape(events=1000, users=30, malformed_rate=0.02, seed=16)
CATCH_UP_S = 180.0


@pytest.fixture(scope="module")
def secure(stack: None) -> SecureStack:
    return ensure_secure_stack()


@dataclass
class SecureRun:
    """What the secure run left behind: the test's topics and keyspace, the records, and
    each step's outcome and output."""

    env: harness.TestEnv
    records: list[SampleRecord]
    sources: list[str]
    worker_code: int
    runs: dict[str, Run]
    transcript: Transcript
    user_id: int
    api_status: int = 0
    api_body: Any = None
    api_unknown_key_status: int = 0
    committed_after_replay: dict[TopicPartition, int] = field(default_factory=dict)
    key_hashes: list[bytes] = field(default_factory=list)
    api_keys: list[str] = field(default_factory=list)


async def _create_topics(env: harness.TestEnv) -> None:
    # Topics through the plain listener: the same broker, and the tests' admin needs no
    # credentials. The keyspace goes through `settler schema apply` over the secure path.
    admin = AIOKafkaAdminClient(bootstrap_servers=harness.BOOTSTRAP)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(env.topic, harness.PARTITIONS, 1),
                                   NewTopic(env.settings.dlq_topic, 1, 1)])
    finally:
        await admin.close()


async def _produce_over_sasl_plain(settings: Settings, records: list[SampleRecord]
                                   ) -> list[str]:
    """Where each record landed, as its dead letter's `settler.source` names it."""
    producer = kafka.producer(settings, linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(settings.topics[0], value=r.value, key=r.key)
                   for r in records]
        sent = await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return [f"{m.topic}/{m.partition}/{m.offset}" for m in sent]


async def _serve_api_and_get(transcript: Transcript, environ: dict[str, str], api_key: str
                             ) -> tuple[int, Any, int]:
    """`settler api` as a process: GET /v1/balances with the key (status, body) and with an
    unknown key (status), its /metrics into the transcript, then SIGTERM."""
    port = harness.free_port()
    environ = {**environ, "SETTLER_API_HOST": "127.0.0.1", "SETTLER_API_PORT": str(port)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "settler", "api", env=environ,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
            for _ in range(300):
                try:
                    response = await http.get("/v1/balances", headers={"X-API-Key": api_key})
                    break
                except httpx.TransportError:
                    if proc.returncode is not None:
                        return -1, None, -1
                    await asyncio.sleep(0.1)
            else:
                return -1, None, -1
            unknown = await http.get("/v1/balances", headers={"X-API-Key": "sk_" + "0" * 40})
            transcript.add("settler api /metrics", (await http.get("/metrics")).text)
            return response.status_code, response.json(), unknown.status_code
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(proc.communicate(), 15)
        transcript.add("settler api", output.decode(errors="replace"))


@pytest.fixture(scope="module")
async def secure_run(secure: SecureStack, registry: Registry,
                     tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[SecureRun]:
    env = harness.new_env(tmp_path_factory.mktemp("secure"), **secure.environ("scram"))
    environ = env.environ(**secure.environ("scram"), SETTLER_LOG_LEVEL="debug")
    transcript = Transcript()
    runs: dict[str, Run] = {}
    await _create_topics(env)
    try:
        runs["schema"] = transcript.settler("schema", "schema", "apply", environ=environ)
        records = generate(registry, SHAPE)
        plain_settings = load_settings(environ=env.environ(**secure.environ("plain")))
        sources = await _produce_over_sasl_plain(plain_settings, records)

        worker = harness.WorkerProcess(env, "secure-worker", **secure.environ("scram"),
                                       SETTLER_LOG_LEVEL="debug")
        try:
            await harness.wait_caught_up(env, CATCH_UP_S, worker)
            transcript.add("worker /metrics", (await harness.scrape(worker.metrics_port))[1])
            transcript.add("worker /readyz", (await harness.scrape(worker.metrics_port,
                                                                   "/readyz"))[1])
        finally:
            worker_code = worker.stop()
            transcript.add("settler run", worker.log_path.read_text(errors="replace"))

        user_id = min(user for user, _ in harness.balances(env.settings))
        for name, args in {
            "balances": ("balances", str(user_id), "--json"),
            "verify": ("verify", "--json", "--quiet"),
            "dlq list": ("dlq", "list", "--json"),
            "keys create": ("keys", "create", str(user_id)),
            "keys list": ("keys", "list"),
            "run --help": ("run", "--help"),
            "dev status": ("dev", "status"),
        }.items():
            runs[name] = transcript.settler(name, *args, environ=environ)
        api_key = next(line.split(": ", 1)[1] for line in runs["keys create"].stdout.splitlines()
                       if line.startswith("api_key: "))
        result = SecureRun(env, records, sources, worker_code, runs, transcript, user_id,
                           api_keys=[api_key])
        (result.api_status, result.api_body,
         result.api_unknown_key_status) = await _serve_api_and_get(transcript, environ, api_key)
        result.key_hashes = [row[0] for row in harness.read_rows(
            env.settings, "SELECT key_hash FROM api_keys")]

        runs["replay"] = transcript.settler("replay", "replay", "--from-offset", "0",
                                            "--no-wait", environ=environ)
        result.committed_after_replay = await harness.committed_offsets(env.settings.group_id)
        yield result
    finally:
        await asyncio.wait_for(harness.destroy(env), 120)


def _ok(run: Run) -> None:
    assert run.code == 0, run.describe()


async def test_worker_settles_a_stream_over_sasl_ssl_scram_and_cql_tls_with_a_password(
    secure_run: SecureRun, registry: Registry
) -> None:
    assert secure_run.worker_code == 0, secure_run.transcript.outputs["settler run"][-3000:]
    # Read back over CQL TLS + password (env.settings are the secure settings).
    assert_settled_exactly(secure_run.env, registry, secure_run.records)
    await assert_dead_letters(secure_run.env, secure_run.records, secure_run.sources)


def test_schema_apply_works_over_cql_tls_with_a_password(secure_run: SecureRun) -> None:
    _ok(secure_run.runs["schema"])
    assert "schema applied to keyspace" in secure_run.runs["schema"].stdout


def test_balances_command_reads_over_cql_tls_with_a_password(
    secure_run: SecureRun, registry: Registry
) -> None:
    run = secure_run.runs["balances"]
    _ok(run)
    document = json.loads(run.stdout)
    stored = {registry.assets_by_id[asset].name
              for user, asset in harness.balances(secure_run.env.settings)
              if user == secure_run.user_id}
    assert document["user_id"] == secure_run.user_id
    assert {entry["asset"] for entry in document["balances"]} == stored


def test_verify_command_finds_no_difference_over_cql_tls(secure_run: SecureRun) -> None:
    run = secure_run.runs["verify"]
    _ok(run)
    report = json.loads(run.stdout)
    assert report["clean"] is True and report["rows_checked"] > 0


def test_dlq_command_lists_the_dead_letters_over_sasl_ssl(secure_run: SecureRun) -> None:
    run = secure_run.runs["dlq list"]
    _ok(run)
    malformed = sum(1 for record in secure_run.records if record.expect is not None)
    assert json.loads(run.stdout)["total"] >= malformed > 0


def test_api_serves_a_key_owner_over_cql_tls_with_a_password(secure_run: SecureRun) -> None:
    _ok(secure_run.runs["keys create"])
    _ok(secure_run.runs["keys list"])
    assert secure_run.api_status == 200, secure_run.transcript.outputs.get("settler api")
    assert secure_run.api_body["user_id"] == secure_run.user_id
    assert secure_run.api_body["balances"], "the key's owner has balances"
    assert secure_run.api_unknown_key_status == 401


def test_replay_command_rewinds_the_group_over_sasl_ssl(secure_run: SecureRun) -> None:
    _ok(secure_run.runs["replay"])
    committed = secure_run.committed_after_replay
    assert len(committed) == harness.PARTITIONS
    assert set(committed.values()) == {0}


def test_no_secret_appears_in_any_output_of_the_secure_run(
    secure_run: SecureRun, secure: SecureStack
) -> None:
    secrets = secure.material.secrets()
    for name, value in list(secrets.items()):
        if name.startswith("private key"):
            secrets[f"{name} (first line)"] = value[:64]
    for index, key_hash in enumerate(secure_run.key_hashes):
        secrets.update(secret_forms(f"api key hash {index}", key_hash))
    outputs = dict(secure_run.transcript.outputs)
    # `settler keys create` prints the new key once, by design; nothing else may.
    created = outputs.pop("keys create")
    assert secure_run.api_keys[0] in created
    for name, text in outputs.items():
        assert secure_run.api_keys[0] not in text, f"the API key appears in {name}"
    assert len(outputs["settler run"]) > 10_000, "the worker's debug output is all there"
    leaks = Transcript(outputs).leaks(secrets)
    assert not leaks, f"secrets printed: {leaks}"


async def test_worker_settles_a_stream_over_kafka_mutual_tls(
    secure: SecureStack, registry: Registry, tmp_path: Path
) -> None:
    env = harness.new_env(tmp_path, **secure.environ("mtls"))
    await _create_topics(env)
    try:
        environ = env.environ(**secure.environ("mtls"))
        schema = Transcript().settler("schema", "schema", "apply", environ=environ)
        _ok(schema)
        records = generate(registry, MTLS_SHAPE)
        await harness.produce(env.topic, records)
        await harness.run_until_caught_up(env, CATCH_UP_S, "mtls-worker",
                                          **secure.environ("mtls"))
        assert_settled_exactly(env, registry, records)
        listing = Transcript().settler("dlq list", "dlq", "list", "--json", environ=environ)
        _ok(listing)
        assert json.loads(listing.stdout)["total"] >= sum(r.expect is not None for r in records)
    finally:
        await asyncio.wait_for(harness.destroy(env), 120)


def test_secure_status_names_the_mode_and_the_ca_file(secure: SecureStack) -> None:
    environ = clean_environ(**harness.STACK_ENV)
    run = Transcript().settler("dev status", "dev", "status", environ=environ)
    _ok(run)
    assert "mode: secure" in run.stdout
    assert str(secure.material.ca_file) in run.stdout
    assert "cassandra-secure" in run.stdout and "running" in run.stdout
