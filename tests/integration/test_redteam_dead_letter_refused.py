"""Red team, on the real stack: a dead letter the broker refuses is lost while the offset
past it is committed.

The dead-letter topic takes records up to its max.message.bytes (here 4 KiB; a cluster
whose message.max.bytes is below the worker's kafka_max_request_bytes, 1 MiB by default,
is the same case). A 6 KB record that cannot be decoded fits the producer's limit, so
the worker keeps its value (`DeadLetters._fit`) and the broker refuses it
(MESSAGE_TOO_LARGE). aiokafka fails that record's send future but still commits the
transaction, offsets included (message_accumulator.flush_for_commit waits for the batch
and ignores its error); the committer awaits the send futures only after
commit_transaction, takes the error for a failed commit, and its abort of a transaction
that already committed fails (ProducerBroken): the next session starts past the record.
A read_committed reader never sees that dead letter.
"""

from __future__ import annotations

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from settler.core.registry import Registry
from settler.ops.sample import SampleRecord, StreamShape, generate
from tests import harness

pytestmark = pytest.mark.integration

DLQ_MAX_MESSAGE_BYTES = 4096


async def test_a_dead_letter_the_broker_refuses_is_not_lost(env: harness.TestEnv,
                                                            registry: Registry) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=harness.BOOTSTRAP)
    await admin.start()
    try:
        await admin.alter_configs([ConfigResource(
            ConfigResourceType.TOPIC, env.settings.dlq_topic,
            configs={"max.message.bytes": str(DLQ_MAX_MESSAGE_BYTES)})])
    finally:
        await admin.close()
    records = generate(registry, StreamShape(events=300, users=20, duplicate_rate=0.0,
                                             malformed_rate=0.0, seed=3))
    records.insert(150, SampleRecord(b"10001", b"{" * 6000, "undecodable"))
    await harness.produce(env.topic, records)

    worker = await harness.run_until_caught_up(env, 120.0)

    letters = await harness.dead_letters(env)
    reasons = [harness.header(letter, "settler.reason") for letter in letters]
    log = worker.log_path.read_text(errors="replace").splitlines()
    assert reasons == ["undecodable"], (
        f"dead letters seen by a read_committed reader: {reasons}; worker log:\n"
        + "\n".join(line for line in log if '"level": "info"' not in line
                    and "below zero" not in line)[-3000:])
