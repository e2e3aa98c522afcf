"""Red team, round 5: the exactly-once argument away from the takeover rule.

FIXED since (the tests below pass): `Ledger.plan` raises PartlyApplied, and the worker
stops (exit 1, naming the event), when a re-plan of an event an earlier writer planned and
that may be in some of its rows is refused. Where money went wrong (most likely first):

1. An event a crash left in SOME of its rows (ARCHITECTURE "Crash anywhere": a later group
   of the same epoch carried it on a shared row, its own batch was lost) is re-planned by
   the next session on the rows that lack it, and that re-plan may decide differently
   from the first one: `Ledger.plan` turns a validation failure at re-plan time into a
   `Reject` (dead letter) although rows already hold part of the event.
   a. The registry changed between the crash and the restart (a two-replica rolling
      deploy: the standby is upgraded first with a symbol removed; the writer's SIGTERM
      drains for only 3 s, so with the database slow it abandons in-flight groups just as
      a crash does, and the upgraded replica takes over): `plan` returns
      `Reject(effect.reason)` before it looks at the claim (settler/core/ledger.py:158,
      `if isinstance(effect, Rejected)`; the pipeline dead-letters it and commits past
      it, settler/worker/pipeline.py `_plan`). A re-scaled asset or symbol (decimals,
      price_decimals) instead applies different amounts to the rows that lack it.
   b. A row the first plan could move is now too close to 2^63-1, because the new
      session planned another partition's event on it first (partitions interleave
      differently after a crash): `_apply` raises AmountError (overflow, caught at
      settler/core/ledger.py:173) and the event is
      rejected, while a row that a later group carried already includes it.
   Either way the event is dead-lettered, its offset committed, and the rows that
   included it keep their part: an asset's total changes by the event's amount (SPEC §3
   "trades move value between rows and never create or destroy it").

   Suggested fix: a re-plan of an event whose claim is at its own position and whose
   rows already include it on any row (`includes(...)` true for some changed bit, or a
   zero bit in `rows_applied`) must not be rejected: either complete it with the deltas
   of the first plan (store them, or the digest-verified content, in the claim and
   compute the effect with the registry the first plan used: a registry version in the
   claim), or stop the worker (Fatal, exit 1, naming the event) so an operator decides.
   An overflow on a partially applied event can only be completed (apply anyway and count
   an anomaly) or stopped on, never dead-lettered. Checking the claim before the effect's
   validation also keeps a replay after a registry change from dead-lettering events that
   are complete (covered by `Resolved`, or recorded).

Histories that held (passing tests, with why):

- A partition re-assigned to the same session after a revoke that drained completely
  re-reads events whose ids this session has evicted: the claim re-read from the
  database names this epoch and a group the in-memory rows' lineage reaches, so nothing
  is applied twice (settler/core/lineage.py:113 `includes`; rows keep this epoch's entry:
  settler/core/ledger.py:235 drops only epochs below `resolved.epoch`, and a session only
  resolves its own epoch while it runs, settler/worker/progress.py:61; ids and users are
  evicted only unpinned, i.e. landed, settler/core/memory.py:77,86 and ledger.py:245).
- The same, with the rows evicted too and re-read from the database (which holds what
  the landed groups wrote, lineage included).
- A cross-partition copy skipped while the original's group is still in flight
  (settler/worker/pipeline.py:96 settles the copy at once), then a crash before the
  original's claims land: no claim exists, so the next session plans the original as new
  at its own position and applies it once; its partition was never committed past it
  (settler/core/offsets.py `commit_ready`: contiguous settled offsets only).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from settler.config import DEFAULT_REGISTRY
from settler.core.amounts import INT64_MAX
from settler.core.events import Event, Rejected, decode
from settler.core.ledger import (
    Claim,
    Ledger,
    Outcome,
    PartlyApplied,
    Position,
    Reject,
    Row,
    Skip,
    Write,
)
from settler.core.registry import Registry, load_registry
from tests.unit.test_ledger import REGISTRY, at, deposit, trade

BUYER, SELLER, BTC, USDT = 10001, 10002, 1, 2
T1 = trade(1_000_001, BUYER, SELLER)  # 0.5 BTC at 150.00: cost 7_500_000_000 raw USDT
COST = 7_500_000_000


def _event(value: bytes) -> Event:
    event = decode(value)
    assert not isinstance(event, Rejected)
    return event


def _plan(ledger: Ledger, value: bytes, position: Position) -> Write | Skip | Reject:
    event = _event(value)
    return ledger.plan(event, ledger.effect(event), position)


def _fresh(registry: Registry, epoch: int, rows: dict[tuple[int, int], Row],
           claims: list[Claim], max_rows: int = 1000, max_ids: int = 1000) -> Ledger:
    """A session that loaded these rows and claims from the database."""
    ledger = Ledger(registry, max_rows, max_ids, epoch=epoch)
    users: dict[int, dict[int, Row]] = {}
    for (user, asset), row in rows.items():
        users.setdefault(user, {})[asset] = Row(row.available, row.frozen, row.version,
                                                row.updated_at, dict(row.lineage))
    for user in (BUYER, SELLER, registry.fee_account):
        ledger.add_user(user, users.get(user, {}))
    ledger.add_claims(True, [c for c in claims if c.event_id >= 1_000_000])
    ledger.add_claims(False, [c for c in claims if c.event_id < 1_000_000])
    return ledger


def _crash_leaves_t1_in_the_buyers_quote_row_only(
        initial: dict[tuple[int, int], Row]) -> tuple[dict[tuple[int, int], Row], list[Claim]]:
    """Epoch 1 plans T1 (group 1) and a deposit D7 to the buyer's USDT row (group 2).
    Group 2's claims wait for group 1's (acknowledged), group 2's batch lands, group 1's
    is lost with the process. The database then holds both claims, the buyer's USDT row
    as group 2 wrote it (with T1 in it) and T1's other rows as they were."""
    first = _fresh(REGISTRY, 1, initial, [])
    t1 = _plan(first, T1, at(0, 0))
    assert isinstance(t1, Write)
    first.seal()  # group 1: its batch never lands
    d7 = _plan(first, deposit(7, 1, BUYER, USDT), at(0, 1))
    assert isinstance(d7, Write)
    group2 = first.seal()  # group 2: lands
    rows = dict(initial)
    for image in group2.images:
        rows[(image.user_id, image.asset_id)] = Row(image.available, image.frozen,
                                                    image.version, image.updated_at,
                                                    dict(image.lineage))
    return rows, [t1.claim, d7.claim]


def _usdt_total(ledger: Ledger, users: tuple[int, ...]) -> int:
    total = 0
    for user in users:
        row = ledger.row(user, USDT)
        if row is not None:
            total += row.available + row.frozen
    return total


def _registry_without_btc_usdt(tmp_path: Path) -> Registry:
    text = DEFAULT_REGISTRY.read_text()
    start = text.index('[[symbols]]\nname = "BTC_USDT"')
    end = text.index("[[symbols]]", start + 1)
    path = tmp_path / "registry.toml"
    path.write_text(text[:start] + text[end:])
    registry = load_registry(path)
    assert registry.symbol("BTC_USDT") is None
    return registry


def test_a_partly_applied_trade_is_not_dead_lettered_after_a_registry_change(
        tmp_path: Path) -> None:
    """Failed before PartlyApplied: 'T1 dead-lettered (unknown_symbol) though the buyer's
    USDT row holds it'. Now planning stops (the worker exits 1 naming T1)."""
    initial = {(BUYER, USDT): Row(0, COST, 1, 1, {}), (SELLER, BTC): Row(0, 50_000_000, 1, 1, {})}
    rows, claims = _crash_leaves_t1_in_the_buyers_quote_row_only(initial)
    before = sum(r.available + r.frozen for (_, asset), r in initial.items() if asset == USDT)
    # The replica that takes over runs the new registry (BTC_USDT delisted).
    second = _fresh(_registry_without_btc_usdt(tmp_path), 2, rows, claims)

    users = (BUYER, SELLER, REGISTRY.fee_account)
    # The buyer's USDT row holds T1's debit (and D7), the seller's does not yet.
    assert _usdt_total(second, users) == before - COST + 1
    with pytest.raises(PartlyApplied, match=r"event 1000001 .*\(unknown_symbol\)"):
        _plan(second, T1, at(0, 0))
    # Nothing was decided about T1 (no dead letter, no commit past it): the restored
    # registry completes it on the seller's row.
    assert _usdt_total(second, users) == before - COST + 1
    restored = _fresh(REGISTRY, 3, rows, claims)
    assert isinstance(_plan(restored, T1, at(0, 0)), Write)
    assert _usdt_total(restored, users) == before + 1


def test_a_partly_applied_trade_is_not_dead_lettered_when_its_re_plan_overflows() -> None:
    """Failed before PartlyApplied: 'T1 dead-lettered as overflow: the buyer paid ... and
    the seller got nothing'. Now planning stops."""
    big = 1_000_000
    # The seller's USDT row: T1 fits (INT64_MAX - big + 1), T1 + D9 does not.
    start = INT64_MAX - COST - big + 1
    initial = {(BUYER, USDT): Row(0, COST, 1, 1, {}), (SELLER, BTC): Row(0, 50_000_000, 1, 1, {}),
               (SELLER, USDT): Row(start, 0, 1, 1, {})}
    rows, claims = _crash_leaves_t1_in_the_buyers_quote_row_only(initial)
    second = _fresh(REGISTRY, 2, rows, claims)
    # D9, a deposit to the seller's USDT row in partition 1, was never planned by epoch 1
    # (read later); after the restart partition 1 is fetched first.
    d9 = _plan(second, deposit(9, big, SELLER, USDT), at(1, 0))
    assert isinstance(d9, Write)

    buyer = second.row(BUYER, USDT)
    assert buyer is not None and buyer.frozen == 0  # T1's debit of the frozen cost is there
    with pytest.raises(PartlyApplied, match=r"event 1000001 .*\(overflow\)"):
        _plan(second, T1, at(0, 0))


def test_control_an_overflowing_re_plan_in_none_of_its_rows_is_still_dead_lettered() -> None:
    """A claim whose batch was lost entirely (no row holds the event): an overflow on its
    re-plan is an ordinary rejection, as on a first plan."""
    big = 1_000_000
    start = INT64_MAX - COST - big + 1
    initial = {(BUYER, USDT): Row(0, COST, 1, 1, {}), (SELLER, BTC): Row(0, 50_000_000, 1, 1, {}),
               (SELLER, USDT): Row(start, 0, 1, 1, {})}
    first = _fresh(REGISTRY, 1, initial, [])
    t1 = _plan(first, T1, at(0, 0))
    assert isinstance(t1, Write)
    first.seal()  # its batch is lost: no row holds T1
    second = _fresh(REGISTRY, 2, initial, [t1.claim])
    assert isinstance(_plan(second, deposit(9, big, SELLER, USDT), at(1, 0)), Write)
    rejected = _plan(second, T1, at(0, 0))
    assert isinstance(rejected, Reject) and rejected.reason == "overflow"


# -- histories that hold ------------------------------------------------------------------


def _settle_other(ledger: Ledger, n: int) -> None:
    """Settle (landed) a trade and a deposit of other users on partition 1, so that older
    ids and users are evicted."""
    for user in (20_000 + n, 21_000 + n):
        ledger.add_user(user, {})
    for k, value in enumerate((trade(1_000_100 + n, 20_000 + n, 21_000 + n),
                               deposit(100 + n, 1, 20_000 + n, BTC))):
        write = _plan(ledger, value, at(1, 2 * n + k))
        assert isinstance(write, Write)
        ledger.landed(ledger.seal())


def test_a_reassigned_partition_re_reads_evicted_ids_without_applying_them_again() -> None:
    # Keep the writes' claims (what the claims batches made durable) before eviction.
    ledger = _fresh(REGISTRY, 3, {(BUYER, USDT): Row(0, COST, 1, 1, {}),
                                  (SELLER, BTC): Row(0, 50_000_000, 1, 1, {})}, [],
                    max_rows=1000, max_ids=1)
    durable: list[Claim] = []
    for value, position in ((T1, at(0, 0)), (deposit(7, 5, BUYER, USDT), at(0, 1))):
        write = _plan(ledger, value, position)
        assert isinstance(write, Write)
        durable.append(write.claim)
        ledger.landed(ledger.seal())
    for n in range(6):
        _settle_other(ledger, n)
    ledger.trim()
    assert 1_000_001 not in ledger.seen[True] and 7 not in ledger.seen[False]
    before = _usdt_total(ledger, (BUYER, SELLER, REGISTRY.fee_account))
    # Partition 0 revoked (drained) and assigned again to this session below the commit:
    # intake loads the evicted ids' claims from the database.
    ledger.add_claims(True, [c for c in durable if c.event_id >= 1_000_000])
    ledger.add_claims(False, [c for c in durable if c.event_id < 1_000_000])

    again = [_plan(ledger, T1, at(0, 0)), _plan(ledger, deposit(7, 5, BUYER, USDT), at(0, 1))]

    assert all(isinstance(p, Write) and p.rows == () for p in again), again
    assert all(p.outcome is Outcome.DUPLICATE for p in again)
    assert _usdt_total(ledger, (BUYER, SELLER, REGISTRY.fee_account)) == before


def test_evicted_rows_and_ids_re_read_from_the_database_are_not_applied_again() -> None:
    ledger = _fresh(REGISTRY, 3, {(BUYER, USDT): Row(0, COST, 1, 1, {}),
                                  (SELLER, BTC): Row(0, 50_000_000, 1, 1, {})}, [],
                    max_rows=2, max_ids=1)
    durable: list[Claim] = []
    database: dict[tuple[int, int], Row] = {}
    for value, position in ((T1, at(0, 0)), (deposit(7, 5, BUYER, USDT), at(0, 1))):
        write = _plan(ledger, value, position)
        assert isinstance(write, Write)
        durable.append(write.claim)
        group = ledger.seal()
        for image in group.images:  # the batch lands: the database has these cells
            database[(image.user_id, image.asset_id)] = Row(
                image.available, image.frozen, image.version, image.updated_at,
                dict(image.lineage))
        ledger.landed(group)
    for n in range(8):
        _settle_other(ledger, n)
        ledger.trim()
    assert BUYER not in ledger.users and SELLER not in ledger.users
    for user in (BUYER, SELLER, REGISTRY.fee_account):
        ledger.add_user(user, {asset: Row(r.available, r.frozen, r.version, r.updated_at,
                                          dict(r.lineage))
                               for (u, asset), r in database.items() if u == user})
    ledger.add_claims(True, [c for c in durable if c.event_id >= 1_000_000])
    ledger.add_claims(False, [c for c in durable if c.event_id < 1_000_000])
    before = _usdt_total(ledger, (BUYER, SELLER, REGISTRY.fee_account))

    again = [_plan(ledger, T1, at(0, 0)), _plan(ledger, deposit(7, 5, BUYER, USDT), at(0, 1))]

    assert all(isinstance(p, Write) and p.rows == () for p in again), again
    assert _usdt_total(ledger, (BUYER, SELLER, REGISTRY.fee_account)) == before


def test_a_copy_skipped_while_the_original_is_in_flight_then_a_crash_applies_it_once() -> None:
    first = _fresh(REGISTRY, 1, {}, [])
    original = _plan(first, deposit(7, 5, BUYER, USDT), at(0, 0))
    assert isinstance(original, Write)
    first.seal()  # in flight: claims not yet acknowledged when the process dies
    copy = _plan(first, deposit(7, 5, BUYER, USDT), at(1, 0))
    assert copy == Skip(Outcome.DUPLICATE)  # partition 1 commits past it
    # Crash: neither the claims nor the batch landed. The next session re-reads only
    # partition 0 from its commit (0): no claim, so the original is new.
    second = _fresh(REGISTRY, 2, {}, [])

    again = _plan(second, deposit(7, 5, BUYER, USDT), at(0, 0))

    assert isinstance(again, Write) and again.rows == ((BUYER, USDT),)
    row = second.row(BUYER, USDT)
    assert row is not None and row.available == 5
