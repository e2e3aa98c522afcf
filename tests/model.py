"""An independent model of what settlement must produce, written apart from settler's
own rules (no import of settler.core.settlement or settler.core.amounts) so the two can disagree."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from settler.core.registry import Registry
from settler.ops.sample import SampleRecord


@dataclass
class ModelRow:
    available: int = 0
    frozen: int = 0
    version: int = 0
    times: set[int] = field(default_factory=set)


def expected_balances(registry: Registry, records: list[SampleRecord]
                      ) -> dict[tuple[int, int], ModelRow]:
    """Final rows after settling every valid record once (duplicates by id ignored)."""
    rows: dict[tuple[int, int], ModelRow] = defaultdict(ModelRow)
    seen: set[tuple[str, int]] = set()
    for record in records:
        if record.expect is not None:
            continue
        body = json.loads(record.value)
        ident = ("trade", body["trade_id"]) if body["type"] == "trade" else (
            "balance", body["event_id"])
        if ident in seen:
            continue
        seen.add(ident)
        moves = _trade(registry, body) if body["type"] == "trade" else _balance(body)
        time = body.get("executed_at", body.get("ts"))
        touched: dict[tuple[int, int], tuple[int, int]] = {}
        for key, available, frozen in moves:
            a, f = touched.get(key, (0, 0))
            touched[key] = (a + available, f + frozen)
        for key, (available, frozen) in touched.items():
            row = rows[key]
            row.available += available
            row.frozen += frozen
            row.version += 1
            row.times.add(time)
    return dict(rows)


def _balance(body: dict[str, int | str]) -> list[tuple[tuple[int, int], int, int]]:
    key = (int(body["user_id"]), int(body["asset_id"]))
    amount = int(body["amount"])
    return [{
        "deposit": (key, amount, 0),
        "withdraw": (key, -amount, 0),
        "freeze": (key, -amount, amount),
        "unfreeze": (key, amount, -amount),
    }[str(body["type"])]]


def _trade(registry: Registry, t: dict[str, int | str]) -> list[tuple[tuple[int, int], int, int]]:
    symbol = registry.symbols[str(t["symbol"])]
    numerator = int(t["price"]) * int(t["quantity"]) * 10**symbol.quote.decimals
    denominator = 10 ** (symbol.price_decimals + symbol.base.decimals)
    assert numerator % denominator == 0, "the model only settles exact costs"
    cost = numerator // denominator
    qty = int(t["quantity"])
    base, quote = symbol.base.id, symbol.quote.id
    buyer, seller = int(t["buyer_user_id"]), int(t["seller_user_id"])
    b_refund, s_refund = int(t.get("buyer_refund", 0)), int(t.get("seller_refund", 0))
    b_fee, s_fee = int(t.get("buyer_fee", 0)), int(t.get("seller_fee", 0))
    moves = [
        ((buyer, quote), b_refund, -(cost + b_refund)),
        ((buyer, base), qty - b_fee, 0),
        ((seller, base), s_refund, -(qty + s_refund)),
        ((seller, quote), cost - s_fee, 0),
    ]
    if b_fee:
        moves.append(((registry.fee_account, base), b_fee, 0))
    if s_fee:
        moves.append(((registry.fee_account, quote), s_fee, 0))
    return moves


def expected_trade_ids(records: list[SampleRecord]) -> set[int]:
    """The ids of the trades that must be stored: every valid trade, once."""
    return {
        json.loads(record.value)["trade_id"]
        for record in records
        if record.expect is None and json.loads(record.value)["type"] == "trade"
    }


def expected_dead_letters(records: list[SampleRecord], sources: list[str]
                          ) -> Counter[tuple[str, bytes, str]]:
    """(source, original value, reason) of every dead letter due: exactly one per invalid
    record, named by where it sits in the input topic."""
    return Counter(
        (source, record.value, record.expect)
        for record, source in zip(records, sources, strict=True)
        if record.expect is not None
    )
