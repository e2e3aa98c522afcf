"""Where the writer's I/O comes from: Kafka clients, the database and a clock.

Production wires aiokafka and scylla-driver (`production_clients`); the deterministic
simulation (tests/unit/test_simulation.py) wires simulated ones into the same session
code, so every rule of the exactly-once argument runs there as it runs here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener

from settler import kafka
from settler.config import Settings
from settler.core.lineage import Claim, Resolved, Row
from settler.store import cql
from settler.store.db import Progress, SettlementDb
from settler.store.lease import Clock, CqlLeaseTable, LeaseTable, SystemClock


class Consumer(Protocol):
    """The part of AIOKafkaConsumer the writer uses (its group membership and fetches)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def subscribe(self, topics: list[str], listener: ConsumerRebalanceListener) -> None: ...

    async def getmany(self, *partitions: TopicPartition, timeout_ms: int = 0,
                      max_records: int | None = None
                      ) -> dict[TopicPartition, list[ConsumerRecord[Any, Any]]]: ...

    def assignment(self) -> set[TopicPartition]: ...

    async def committed(self, partition: TopicPartition) -> int | None: ...

    def seek(self, partition: TopicPartition, offset: int) -> None: ...

    async def beginning_offsets(self, partitions: list[TopicPartition]
                                ) -> dict[TopicPartition, int]: ...

    async def end_offsets(self, partitions: list[TopicPartition]
                          ) -> dict[TopicPartition, int]: ...


class Producer(Protocol):
    """The part of a transactional AIOKafkaProducer the writer uses: dead letters and
    offset commits go out together in one transaction."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def begin_transaction(self) -> None: ...

    async def commit_transaction(self) -> None: ...

    async def abort_transaction(self) -> None: ...

    async def send(self, topic: str, value: bytes | None = None, key: bytes | None = None,
                   partition: int | None = None, timestamp_ms: int | None = None,
                   headers: Any = None) -> Awaitable[Any]: ...

    async def send_offsets_to_transaction(self, offsets: Mapping[TopicPartition, int],
                                          group_id: str) -> None: ...

    async def partitions_for(self, topic: str) -> set[int]: ...


class Store(Protocol):
    """What the writer needs from the database (SettlementDb in production)."""

    async def run(self, statement: Any, parameters: Any = None) -> Any: ...

    async def load_user(self, user_id: int) -> dict[int, Row]: ...

    async def claims(self, is_trade: bool, bucket: int, low: int, high: int) -> list[Claim]: ...

    async def progress(self) -> Progress: ...

    def lease_table(self) -> LeaseTable: ...

    async def server(self) -> str: ...

    async def batch_fail_threshold(self) -> int | None: ...

    async def node_uptimes(self) -> list[float]: ...

    async def probe(self) -> None: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class Clients:
    open_store: Callable[[], Awaitable[Store]]
    consumer: Callable[[], Consumer]
    producer: Callable[[], Producer]
    clock: Clock
    serve_metrics: bool = True
    # One connection to the brokers as the clients would make it: raises
    # ConnectionSettingError when they refuse the settings (a wrong password).
    check_kafka: Callable[[], Awaitable[None]] | None = None


NODE_CLOCK: Final = "SELECT toUnixTimestamp(now()), gossip_generation FROM system.local"
"""A node's own time (ms) and when it last started (s), both by its clock."""


class ProductionStore(SettlementDb):
    """SettlementDb plus the writer's lease table, probe and server detection."""

    @classmethod
    async def open_store(cls, settings: Settings) -> ProductionStore:
        store = await cls.open(settings)
        assert isinstance(store, ProductionStore)
        if settings.cql_driver == "acsylla":
            from settler.store.acsylla_writer import AcsyllaWriter

            try:
                store.writer = await AcsyllaWriter.open(settings, store.worker_statements())
            except BaseException:
                await store.close()
                raise
        return store

    def lease_table(self) -> LeaseTable:
        return CqlLeaseTable(self.session)

    async def server(self) -> str:
        """"scylla" or "cassandra": ScyllaDB has a system.scylla_local table."""
        system = self.cluster.metadata.keyspaces.get("system")
        return "scylla" if system is not None and "scylla_local" in system.tables else (
            "cassandra")

    async def probe(self) -> None:
        await self.run("SELECT release_version FROM system.local")

    async def batch_fail_threshold(self) -> int | None:
        """The server's batch_size_fail_threshold in bytes, if it says (Cassandra's
        system_views.settings, ScyllaDB's system.config)."""
        setting = "name = 'batch_size_fail_threshold_in_kb'"
        for query in (f"SELECT value FROM system_views.settings WHERE {setting}",
                      f"SELECT value FROM system.config WHERE {setting}"):
            try:
                rows = list(await self.run(query) or ())
            except Exception:  # noqa: BLE001 - this server has no such table: try the next
                continue
            digits = "".join(ch for ch in str(rows[0][0]) if ch.isdigit()) if rows else ""
            if digits:
                return int(digits) * 1024
        return None


    async def node_uptimes(self) -> list[float]:
        """How long each node of the cluster has been up, each by its own clock: every
        node the driver knows is asked, as coordinator, for its time and its gossip
        generation (when it last started) from its own system.local, the same table on
        Cassandra and ScyllaDB. Raises if any node does not answer (down, or a timeout):
        its uptime is unknown, so the caller waits the whole bound."""
        hosts = list(self.cluster.metadata.all_hosts())
        if not hosts:
            raise LookupError("the driver knows no database node")
        uptimes = []
        for host in hosts:
            rows = list(await self.run_on(host, NODE_CLOCK) or ())
            if not rows or rows[0][0] is None or not rows[0][1]:
                raise LookupError(f"node {host} gave no time or gossip generation")
            now_ms, generation = rows[0]
            uptimes.append(now_ms / 1000 - generation)
        return uptimes

    async def run_on(self, host: Any, statement: str) -> Any:
        """One statement with `host` as its coordinator."""
        return await cql.run(self.session, statement, host=host)


def production_clients(settings: Settings) -> Clients:
    async def open_store() -> Store:
        return await ProductionStore.open_store(settings)

    return Clients(
        open_store=open_store,
        consumer=lambda: kafka.writer_consumer(settings),
        producer=lambda: kafka.writer_producer(settings),
        clock=SystemClock(),
        check_kafka=lambda: kafka.check(settings),
    )


__all__ = ["Clients", "Consumer", "Producer", "Resolved", "Store", "production_clients"]
