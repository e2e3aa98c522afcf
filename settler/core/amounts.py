"""Fixed-point money: the one home of asset scaling.

Amounts are integers of raw units (10^decimals raw units per whole unit). Nothing here
ever touches a float: costs are exact integer arithmetic, and decimal strings for people
are produced and parsed digit by digit.
"""

from __future__ import annotations

import re
from typing import Final

from settler.core.events import Reason

INT64_MAX: Final = 2**63 - 1
INT64_MIN: Final = -(2**63)

# Exact powers of ten as ints (`10**n` types as Any because n could be negative).
_POW10: Final[tuple[int, ...]] = tuple(10**n for n in range(40))


class AmountError(Exception):
    """An amount that cannot be settled exactly; `reason` goes to the dead-letter header."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def cost(price: int, quantity: int, *, base_decimals: int, quote_decimals: int,
         price_decimals: int) -> int:
    """Quote raw units paid for `quantity` base raw units at `price`.

    cost = price * quantity * 10^(q - p - b), exact. Raises AmountError(overflow) if any
    intermediate or the result exceeds 2^63-1, AmountError(inexact_cost) if the division
    would drop a remainder: settlement never rounds money away.
    """
    product = price * quantity
    if product > INT64_MAX:
        raise AmountError(Reason.OVERFLOW, f"price*quantity = {product} exceeds 2^63-1")
    exponent = quote_decimals - price_decimals - base_decimals
    if exponent >= 0:
        result = product * _POW10[exponent]
    else:
        result, remainder = divmod(product, _POW10[-exponent])
        if remainder:
            raise AmountError(
                Reason.INEXACT_COST,
                f"price*quantity = {product} is not a multiple of 10^{-exponent}",
            )
    if result > INT64_MAX:
        raise AmountError(Reason.OVERFLOW, f"cost {result} exceeds 2^63-1")
    return result


def checked_int64(value: int, what: str) -> int:
    if not INT64_MIN <= value <= INT64_MAX:
        raise AmountError(Reason.OVERFLOW, f"{what} = {value} does not fit a signed 64-bit integer")
    return value


def to_decimal_string(raw: int, decimals: int) -> str:
    """Raw units -> whole units as a plain decimal string: 150000000, 8 -> "1.5"."""
    sign = "-" if raw < 0 else ""
    whole, fraction = divmod(abs(raw), _POW10[decimals])
    if decimals == 0 or fraction == 0:
        return f"{sign}{whole}"
    digits = str(fraction).rjust(decimals, "0").rstrip("0")
    return f"{sign}{whole}.{digits}"


_DECIMAL = re.compile(r"^(-?)([0-9]+)(?:\.([0-9]+))?$")


def parse_decimal(text: str, decimals: int) -> int:
    """Whole units as a decimal string -> raw units, exactly; more digits than the asset has
    is a ValueError, never a rounding."""
    match = _DECIMAL.match(text.strip())
    if match is None:
        raise ValueError(f"not a decimal number: {text!r}")
    sign, whole, fraction = match.group(1), match.group(2), match.group(3) or ""
    fraction = fraction.rstrip("0")
    if len(fraction) > decimals:
        raise ValueError(f"{text!r} has more than {decimals} decimal places")
    raw = int(whole) * _POW10[decimals] + (int(fraction.ljust(decimals, "0")) if fraction else 0)
    return -raw if sign else raw
