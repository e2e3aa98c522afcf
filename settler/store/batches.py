"""The write path's batches, as statement names and bound values: the claims batch, the ONE
LOGGED settlement batch of a group, progress records; and what a batch costs. Pure: the
connected driver (`SettlementDb.run`) turns a `Batch` into its own batch."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from settler.core.events import Trade, kind
from settler.core.ledger import Write
from settler.core.lineage import RowImage

ID_BUCKET_BITS: Final = 12
"""Ids are stored in partitions of 4096 consecutive ids (see schema/003_events.cql)."""

PROGRESS_SCOPE: Final = "writer"


@dataclass(slots=True)
class Batch:
    """A batch as the write path builds it: statement names (keys of `_CQL`) and their bound
    values, the write timestamp last. The connected driver turns it into its own batch."""

    logged: bool
    statements: list[tuple[str, tuple[Any, ...]]]


# What a batch costs on the wire, estimated from its values (CQL's batch size limits
# count the mutations' data): a balance row, a trade record, a balance-event record and a
# claim, plus per-character costs of the strings they carry.
ROW_BYTES: Final = 64
LINEAGE_ENTRY_BYTES: Final = 16
TRADE_RECORD_BYTES: Final = 190
BALANCE_RECORD_BYTES: Final = 80
SOURCE_CHAR_BYTES: Final = 1


def estimated_bytes(writes: Iterable[Write], rows: int, lineage_entries: int = 1) -> int:
    """The approximate size of one settlement batch holding these events' records and
    `rows` balance rows (a cheap, slightly pessimistic estimate used to bound batches)."""
    size = rows * (ROW_BYTES + LINEAGE_ENTRY_BYTES * lineage_entries)
    for write in writes:
        record = TRADE_RECORD_BYTES if isinstance(write.event, Trade) else BALANCE_RECORD_BYTES
        size += record + len(write.claim.source) * SOURCE_CHAR_BYTES
    return size


def claims_batch(writes: Sequence[Write], frontier: Mapping[str, int], *,
                 timestamp: int) -> Batch:
    """The id claims of these events, plus the writer's frontier for their input
    partitions, as one UNLOGGED batch (each write is idempotent). Sent and acknowledged
    before any batch carrying these events' effects, so a row can only include an
    event whose claim and frontier are durable."""
    statements: list[tuple[str, tuple[Any, ...]]] = []
    add = statements.append
    for write in writes:
        claim = write.claim
        add(("write_claim", (
            "trade" if isinstance(write.event, Trade) else "balance",
            claim.event_id >> ID_BUCKET_BITS, claim.event_id, claim.digest, claim.source,
            claim.epoch, claim.batch, claim.rows_applied, timestamp)))
    for stream, position in frontier.items():
        add(("write_progress", (PROGRESS_SCOPE, "frontier", stream, position, None,
                                timestamp)))
    return Batch(False, statements)

def settlement_batch(images: Sequence[RowImage], writes: Sequence[Write], *,
                     fee_account: int, timestamp: int) -> Batch:
    """ONE LOGGED batch: the record of each event plus the final absolute value of each
    row they touch (a row touched by several of them is written once, last value).

    Every statement carries the same explicit write timestamp, so re-executing the
    batch after a timeout rewrites identical cells and cannot undo a later batch.
    """
    statements: list[tuple[str, tuple[Any, ...]]] = [
        ("write_balance", (row.user_id, row.asset_id, row.available, row.frozen,
                           row.version, row.updated_at, row.lineage, timestamp))
        for row in images
    ]
    add = statements.append
    for write in writes:
        event, digest, source = write.event, write.digest, write.claim.source
        if isinstance(event, Trade):
            add(("write_trade", (
                event.trade_id >> ID_BUCKET_BITS, event.trade_id, event.symbol,
                event.buy_order_id, event.sell_order_id, event.buyer_user_id,
                event.seller_user_id, event.base_asset_id, event.quote_asset_id,
                event.price, event.quantity, write.cost, event.buyer_refund,
                event.seller_refund, event.buyer_fee, event.seller_fee, fee_account,
                event.match_seq, event.executed_at, digest, source, timestamp)))
        else:
            add(("write_balance_event", (
                event.event_id >> ID_BUCKET_BITS, event.event_id, kind(event),
                event.user_id, event.asset_id, event.amount, event.ts, digest, source,
                timestamp)))
    return Batch(True, statements)

def progress_batch(name: str, positions: Mapping[str, int], *, timestamp: int,
                   epoch: int | None = None) -> Batch:
    """Progress records of one kind, in the writer's single progress partition (a
    single-partition batch is applied atomically and in isolation)."""
    statements: list[tuple[str, tuple[Any, ...]]] = []
    if epoch is not None:
        statements.append(("write_progress", (PROGRESS_SCOPE, name, "", None, epoch,
                                              timestamp)))
    statements += [("write_progress", (PROGRESS_SCOPE, name, stream, position, None,
                                       timestamp)) for stream, position in positions.items()]
    return Batch(False, statements)
