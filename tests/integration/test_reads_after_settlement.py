"""Balances settled by the real worker read back exactly through the library, the CLI and
HTTP (issue 4's end-to-end check)."""

from __future__ import annotations

import asyncio
import json

import pytest

from settler import cli
from settler.ops.sample import SampleRecord
from settler.read import apikeys
from settler.read.api import create_app
from settler.store.db import SettlementDb
from tests import harness
from tests.integration.test_reads import api_client

pytestmark = pytest.mark.integration

ALICE, BOB, CAROL = 5001, 5002, 5003
BTC, USDT, ETH = 1, 2, 3


def _balance_event(kind: str, event_id: int, user: int, asset: int, amount: int) -> SampleRecord:
    body = {"type": kind, "event_id": event_id, "user_id": user, "asset_id": asset,
            "amount": amount, "ts": 1_700_000_000_000 + event_id}
    return SampleRecord(str(user).encode(), json.dumps(body).encode())


def _trade(trade_id: int, symbol: str, buyer: int, seller: int, base: int, price: int,
           quantity: int, **extra: int) -> SampleRecord:
    body = {"type": "trade", "trade_id": trade_id, "symbol": symbol, "buy_order_id": trade_id,
            "sell_order_id": trade_id + 1, "buyer_user_id": buyer, "seller_user_id": seller,
            "base_asset_id": base, "quote_asset_id": USDT, "price": price,
            "quantity": quantity, "match_seq": trade_id, "executed_at": 1_700_000_100_000,
            **extra}
    return SampleRecord(symbol.encode(), json.dumps(body).encode())


# Alice buys 0.5 BTC at 150.00 (cost 75 USDT, she froze 80: 5 USDT price improvement) and
# sells 2 ETH at 20.00 (40 USDT, fee 0.04 USDT to the fee account).
STREAM = [
    _balance_event("deposit", 1, ALICE, USDT, 100 * 10**8),
    _balance_event("deposit", 2, ALICE, ETH, 3 * 10**8),
    _balance_event("deposit", 3, BOB, BTC, 1 * 10**8),
    _balance_event("deposit", 4, CAROL, USDT, 50 * 10**8),
    _balance_event("freeze", 5, ALICE, USDT, 80 * 10**8),
    _balance_event("freeze", 6, BOB, BTC, 50_000_000),
    _balance_event("freeze", 7, ALICE, ETH, 2 * 10**8),
    _balance_event("freeze", 8, CAROL, USDT, 40 * 10**8),
    _trade(100, "BTC_USDT", ALICE, BOB, BTC, 150_00, 50_000_000, buyer_refund=5 * 10**8),
    _trade(101, "ETH_USDT", CAROL, ALICE, ETH, 20_00, 2 * 10**8, seller_fee=4_000_000),
]
ALICE_EXPECTED = [
    {"asset": "BTC", "available": "0.5", "frozen": "0", "total": "0.5"},
    {"asset": "USDT", "available": "64.96", "frozen": "0", "total": "64.96"},
    {"asset": "ETH", "available": "1", "frozen": "0", "total": "1"},
]


async def test_settled_trades_read_back_exactly_everywhere(
    env: harness.TestEnv, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    await harness.produce(env.topic, STREAM)
    await harness.run_until_caught_up(env, 120)

    db = await SettlementDb.open(env.settings)
    try:
        library = await db.get_user_all_balances(ALICE)
        assert [(b.asset_id, b.available, b.frozen) for b in library] == [
            (BTC, 50_000_000, 0), (USDT, 6_496_000_000, 0), (ETH, 10**8, 0)]
        alice_key = (await apikeys.create_key(db.session, ALICE)).key
        bob_key = (await apikeys.create_key(db.session, BOB)).key
        async for client in api_client(create_app(env.settings, db=db)):
            mine = await client.get("/v1/balances", headers={"X-API-Key": alice_key})
            theirs = await client.get("/v1/balances", headers={"X-API-Key": bob_key})
    finally:
        await db.close()

    assert mine.status_code == 200
    assert mine.json() == {"user_id": ALICE, "balances": ALICE_EXPECTED}
    bob = {row["asset"]: row for row in theirs.json()["balances"]}
    assert theirs.json()["user_id"] == BOB
    assert bob["BTC"] == {"asset": "BTC", "available": "0.5", "frozen": "0", "total": "0.5"}
    assert bob["USDT"]["total"] == "75"  # what Alice paid, never Alice's own balances

    monkeypatch.setenv("SETTLER_KEYSPACE", env.settings.keyspace)
    # The CLI runs its own event loop, so it gets a thread of its own here.
    assert await asyncio.to_thread(cli.main, ["balances", str(ALICE), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"user_id": ALICE, "balances": ALICE_EXPECTED}
