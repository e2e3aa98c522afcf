"""Wire events (Kafka record values) and their decoding.

bytes -> `Event` or `Rejected(reason)`. Decoding is msgspec's tagged union on "type";
unknown fields are ignored, missing or out-of-range fields are rejected with a reason
code that ends up in the dead-letter record's `settler.reason` header.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Final

import msgspec

INT64_MAX: Final = 2**63 - 1

Id = Annotated[int, msgspec.Meta(gt=0, le=INT64_MAX)]
Amount = Annotated[int, msgspec.Meta(gt=0, le=INT64_MAX)]
OptionalAmount = Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)]
Count = Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)]


class Reason(StrEnum):
    """Why an event was dead-lettered: the `settler.reason` header."""

    UNDECODABLE = "undecodable"
    UNKNOWN_TYPE = "unknown_type"
    MISSING_FIELD = "missing_field"
    WRONG_TYPE = "wrong_type"
    BAD_RANGE = "bad_range"
    UNKNOWN_SYMBOL = "unknown_symbol"
    UNKNOWN_ASSET = "unknown_asset"
    ASSET_MISMATCH = "asset_mismatch"
    INEXACT_COST = "inexact_cost"
    OVERFLOW = "overflow"
    QUOTE_AMOUNT_MISMATCH = "quote_amount_mismatch"
    FEE_TOO_LARGE = "fee_too_large"
    CONFLICTING_DUPLICATE = "conflicting_duplicate"


class Trade(msgspec.Struct, tag="trade", tag_field="type", frozen=True):
    """MatchExecData: one fill between a buy and a sell order."""

    trade_id: Id
    symbol: str
    buy_order_id: Id
    sell_order_id: Id
    buyer_user_id: Id
    seller_user_id: Id
    base_asset_id: Id
    quote_asset_id: Id
    price: Amount
    quantity: Amount
    match_seq: Count
    executed_at: Count
    quote_amount: Amount | None = None
    buyer_refund: OptionalAmount = 0
    seller_refund: OptionalAmount = 0
    buyer_fee: OptionalAmount = 0
    seller_fee: OptionalAmount = 0

    @property
    def event_id(self) -> int:
        return self.trade_id

    @property
    def time(self) -> int:
        return self.executed_at


class _BalanceEventBase(msgspec.Struct, tag_field="type", frozen=True):
    event_id: Id
    user_id: Id
    asset_id: Id
    amount: Amount
    ts: Count

    @property
    def time(self) -> int:
        return self.ts


class Deposit(_BalanceEventBase, tag="deposit", frozen=True):
    """available += amount"""


class Withdraw(_BalanceEventBase, tag="withdraw", frozen=True):
    """available -= amount"""


class Freeze(_BalanceEventBase, tag="freeze", frozen=True):
    """available -= amount; frozen += amount (an order was placed)"""


class Unfreeze(_BalanceEventBase, tag="unfreeze", frozen=True):
    """frozen -= amount; available += amount (an order was cancelled)"""


BalanceEvent = Deposit | Withdraw | Freeze | Unfreeze
Event = Trade | Deposit | Withdraw | Freeze | Unfreeze

_decoder: Final[msgspec.json.Decoder[Event]] = msgspec.json.Decoder(Event)
_encoder: Final = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class Rejected:
    reason: Reason
    detail: str


def decode(value: bytes | None) -> Event | Rejected:
    """One record value -> a typed event, or the reason it can never be settled."""
    if value is None:
        return Rejected(Reason.UNDECODABLE, "record has no value")
    try:
        return _decoder.decode(value)
    except msgspec.ValidationError as exc:
        return Rejected(_classify(str(exc)), str(exc))
    except msgspec.DecodeError as exc:
        return Rejected(Reason.UNDECODABLE, str(exc))
    except (UnicodeDecodeError, RecursionError) as exc:
        # msgspec lets these escape for invalid UTF-8 in a kept string and absurd nesting.
        return Rejected(Reason.UNDECODABLE, f"{type(exc).__name__}: {exc}")


def _classify(message: str) -> Reason:
    # msgspec's messages are stable: "Object missing required field `x`",
    # "Invalid value 'y' - at `$.type`", "Expected `int` >= 1 - at ...",
    # "Expected `int`, got `str` - at ...", "Expected `object`, got `array`".
    if message.startswith("Object missing required field"):
        return Reason.MISSING_FIELD
    if message.startswith("Invalid value") and message.endswith("`$.type`"):
        return Reason.UNKNOWN_TYPE
    if message.startswith("Expected `object`"):
        return Reason.UNDECODABLE
    if message.startswith("Integer value out of range"):
        return Reason.BAD_RANGE
    if "`int` >=" in message or "`int` <=" in message or "`int` >" in message:
        return Reason.BAD_RANGE
    return Reason.WRONG_TYPE


def kind(event: Event) -> str:
    """The `type` tag, used as a metrics label and in logs."""
    return type(event).__struct_config__.tag  # type: ignore[return-value]


def digest(event: Event) -> bytes:
    """Content fingerprint for duplicate-vs-conflict checks: same decoded content, same digest.

    Computed over the decoded event (defaults filled, unknown fields dropped), so a re-send
    that differs only in ignored fields or key order is a duplicate, not a conflict.
    """
    return hashlib.blake2b(_encoder.encode(event), digest_size=16).digest()


def encode(event: Event) -> bytes:
    return _encoder.encode(event)
