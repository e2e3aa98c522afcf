"""The Ledger's decision of which stored rows already include an event (ARCHITECTURE.md
"Why exactly once"), case by case: what a crash can leave behind, and what a later
writer session must then write. Rows and claims are built as the database would hold
them after the described history; the Ledger under test is a fresh session."""

from __future__ import annotations

import pytest

from settler.config import DEFAULT_REGISTRY
from settler.core.events import Rejected, decode, digest
from settler.core.ledger import (
    Claim,
    Ledger,
    Outcome,
    Position,
    ReplanInFlight,
    Resolved,
    Row,
    Skip,
    Write,
    row_keys,
)
from settler.core.registry import load_registry
from settler.core.settlement import Effect

REGISTRY = load_registry(DEFAULT_REGISTRY)
TOPIC = "t"
USER, BTC, USDT = 10001, 1, 2


def deposit(event_id: int, amount: int, user: int = USER, asset: int = BTC) -> bytes:
    return (f'{{"type": "deposit", "event_id": {event_id}, "user_id": {user}, '
            f'"asset_id": {asset}, "amount": {amount}, "ts": 1700000000000}}').encode()


def trade(trade_id: int, buyer: int, seller: int, fee: int = 0) -> bytes:
    return (f'{{"type": "trade", "trade_id": {trade_id}, "symbol": "BTC_USDT", '
            f'"buy_order_id": 1, "sell_order_id": 2, "buyer_user_id": {buyer}, '
            f'"seller_user_id": {seller}, "base_asset_id": 1, "quote_asset_id": 2, '
            f'"price": 15000, "quantity": 50000000, "buyer_fee": {fee}, "match_seq": 1, '
            f'"executed_at": 1700000000001}}').encode()


def at(partition: int, offset: int) -> Position:
    return Position(TOPIC, partition, offset)


def claim_of(value: bytes, position: Position, epoch: int, batch: int, mask: int) -> Claim:
    event = decode(value)
    assert not isinstance(event, Rejected)
    return Claim(event.event_id, digest(event), str(position), epoch, batch, mask)


def session(epoch: int, rows: dict[tuple[int, int], Row], claims: list[Claim],
            resolved: Resolved | None = None) -> Ledger:
    """A new writer session that loaded these rows and claims from the database."""
    ledger = Ledger(REGISTRY, 1000, 1000, epoch=epoch, resolved=resolved)
    by_user: dict[int, dict[int, Row]] = {}
    for (user, asset), row in rows.items():
        by_user.setdefault(user, {})[asset] = row
    for user in (USER, 10002, REGISTRY.fee_account):
        ledger.add_user(user, by_user.get(user, {}))
    ledger.add_claims(True, [c for c in claims if c.event_id >= 1_000_000])
    ledger.add_claims(False, [c for c in claims if c.event_id < 1_000_000])
    return ledger


def plan(ledger: Ledger, value: bytes, position: Position) -> Write | Skip:
    event = decode(value)
    assert not isinstance(event, Rejected)
    effect = ledger.effect(event)
    assert isinstance(effect, Effect)
    result = ledger.plan(event, effect, position)
    assert isinstance(result, Write | Skip), result
    return result


D7, D8 = deposit(7, 5), deposit(8, 3)


def test_a_row_written_by_a_later_group_of_the_same_epoch_includes_the_event() -> None:
    # Epoch 1 planned D7 into group 1 and D8 into group 2, both changing the row; group 1
    # was lost in a crash, group 2 (the row at 8, carrying D7 too) landed.
    rows = {(USER, BTC): Row(8, 0, 2, 1700000000000, {1: 2})}
    claims = [claim_of(D7, at(0, 0), 1, 1, 0b1), claim_of(D8, at(0, 1), 1, 2, 0b1)]
    ledger = session(2, rows, claims)

    d7, d8 = plan(ledger, D7, at(0, 0)), plan(ledger, D8, at(0, 1))

    assert isinstance(d7, Write) and d7.rows == () and d7.outcome is Outcome.DUPLICATE
    assert isinstance(d8, Write) and d8.rows == ()
    assert ledger.row(USER, BTC) == Row(8, 0, 2, 1700000000000, {1: 2})


def test_a_row_last_written_before_the_events_group_lacks_it() -> None:
    # Epoch 1 wrote the row in group 1 (D8 at 3), then planned D7 into group 4, lost.
    rows = {(USER, BTC): Row(3, 0, 1, 1700000000000, {1: 1})}
    ledger = session(2, rows, [claim_of(D7, at(0, 5), 1, 4, 0b1)])

    d7 = plan(ledger, D7, at(0, 5))

    assert isinstance(d7, Write) and d7.rows == ((USER, BTC),)
    row = ledger.row(USER, BTC)
    assert row is not None and (row.available, row.version) == (8, 2)


def test_a_copy_in_another_partition_is_a_duplicate_of_the_claimed_position() -> None:
    rows = {(USER, BTC): Row(8, 0, 2, 1700000000000, {1: 2})}
    ledger = session(2, rows, [claim_of(D7, at(1, 0), 1, 1, 0b1)])

    copy = plan(ledger, D7, at(0, 0))

    assert copy == Skip(Outcome.DUPLICATE)


def test_a_trade_partly_carried_by_a_later_group_is_completed_on_the_other_rows() -> None:
    # Trade T changed 4 rows in group 1 (lost); group 2 (landed) carried it on the
    # buyer's quote row only. The new session applies T to the three others.
    value = trade(1_000_001, USER, 10002)
    event = decode(value)
    assert not isinstance(event, Rejected)
    effect = Ledger(REGISTRY, 1, 1).effect(event)
    assert isinstance(effect, Effect)
    keys = row_keys(effect)
    carried = keys.index((USER, USDT))
    rows = {(USER, USDT): Row(0, 0, 2, 1, {1: 2})}
    ledger = session(2, rows, [claim_of(value, at(0, 0), 1, 1, (1 << len(keys)) - 1)])

    write = plan(ledger, value, at(0, 0))

    assert isinstance(write, Write)
    assert set(write.rows) == set(keys) - {keys[carried]}
    assert write.claim.rows_applied == ((1 << len(keys)) - 1) & ~(1 << carried)


def test_lineage_carried_through_a_later_epoch_still_decides() -> None:
    # Epoch 1 applied D7 to the row in group 2 and wrote it in group 3 (landed); epoch 2
    # loaded it, wrote it for D8 (another partition) and crashed before re-reading D7.
    rows = {(USER, BTC): Row(8, 0, 2, 1700000000000, {1: 3, 2: 1})}
    ledger = session(3, rows, [claim_of(D7, at(0, 0), 1, 2, 0b1)])

    d7 = plan(ledger, D7, at(0, 0))

    assert isinstance(d7, Write) and d7.rows == (), "D7 applied twice"
    row = ledger.row(USER, BTC)
    assert row is not None and row.available == 8


def test_a_claim_of_a_resolved_epoch_below_the_resolved_offsets_is_complete() -> None:
    resolved = Resolved(3, {f"{TOPIC}:0": 10})
    ledger = session(4, {(USER, BTC): Row(5, 0, 1, 1, {})},
                     [claim_of(D7, at(0, 0), 1, 1, 0b1)], resolved)

    assert plan(ledger, D7, at(0, 0)) == Skip(Outcome.DUPLICATE)


def test_a_late_claim_of_a_resolved_epoch_beyond_its_offsets_still_applies() -> None:
    # A claims batch that was never acknowledged landed late: no batch carried D7, and the
    # lineage of its epoch was dropped: the row lacks it.
    resolved = Resolved(3, {f"{TOPIC}:0": 10})
    ledger = session(4, {(USER, BTC): Row(0, 0, 0, 1, {3: 9})},
                     [claim_of(D7, at(0, 12), 1, 1, 0b1)], resolved)

    write = plan(ledger, D7, at(0, 12))

    assert isinstance(write, Write) and write.rows == ((USER, BTC),)


def test_sealing_drops_lineage_of_resolved_epochs_and_records_this_group() -> None:
    ledger = session(5, {(USER, BTC): Row(1, 0, 1, 1, {2: 7, 4: 1})}, [],
                     Resolved(4, {}))
    plan(ledger, D7, at(0, 0))

    group = ledger.seal()

    assert [image.lineage for image in group.images] == [{4: 1, 5: 1}]
    assert ledger.group.batch == group.batch + 1


def test_re_reading_an_event_whose_first_plan_is_in_flight_is_refused() -> None:
    ledger = session(1, {}, [])
    plan(ledger, D7, at(0, 0))
    ledger.seal()

    with pytest.raises(ReplanInFlight):
        plan(ledger, D7, at(0, 0))


def test_re_reading_an_event_this_session_made_durable_is_skipped() -> None:
    ledger = session(1, {}, [])
    plan(ledger, D7, at(0, 0))
    ledger.landed(ledger.seal())

    assert plan(ledger, D7, at(0, 0)) == Skip(Outcome.DUPLICATE)


def test_an_overflow_on_one_row_changes_no_row() -> None:
    big = 2**63 - 10
    value = trade(1_000_002, USER, 10002)
    rows = {(10002, USDT): Row(big, 0, 1, 1, {})}
    ledger = session(1, rows, [])

    event = decode(value)
    assert not isinstance(event, Rejected)
    effect = ledger.effect(event)
    assert isinstance(effect, Effect)
    result = ledger.plan(event, effect, at(0, 0))

    assert not isinstance(result, Write)
    assert ledger.row(10002, USDT) == Row(big, 0, 1, 1, {})
    assert ledger.row(USER, USDT) is None
