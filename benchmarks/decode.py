"""Decoding one record at a time versus a whole fetch at once (no stack needed).

    .venv/bin/python -m benchmarks.decode

The worker decodes each record value with one `msgspec` call (`settler.core.events.decode`).
The alternative measured here joins a fetch's values into one JSON array and decodes it
with a single call; one invalid record fails that call, so the fetch then has to be
decoded record by record anyway (the "one bad record" row). Same 2,000-record fetches of
the settle stream's shape for every row; best of 5 repetitions.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import msgspec

from benchmarks.stream import TradeShape, trade_stream
from settler.config import load_settings
from settler.core.events import Event, decode
from settler.core.registry import load_registry

FETCH = 2_000
REPEAT = 5

_many: msgspec.json.Decoder[list[Event]] = msgspec.json.Decoder(list[Event])


def per_record(values: Sequence[bytes]) -> list[object]:
    return [decode(value) for value in values]


def whole_fetch(values: Sequence[bytes]) -> list[object]:
    try:
        return list(_many.decode(b"[" + b",".join(values) + b"]"))
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return per_record(values)  # find which one, and why


def best_us_per_record(fn: Callable[[Sequence[bytes]], list[object]],
                       fetches: Sequence[Sequence[bytes]]) -> float:
    records = sum(len(f) for f in fetches)
    best = float("inf")
    for _ in range(REPEAT):
        started = time.perf_counter()
        for fetch in fetches:
            fn(fetch)
        best = min(best, time.perf_counter() - started)
    return best / records * 1e6


def main() -> None:
    registry = load_registry(load_settings(environ={}).registry)
    stream = trade_stream(registry, TradeShape.scaled(40_000, seed=3))
    values = [r.value for r in stream.records]
    fetches = [values[i:i + FETCH] for i in range(0, len(values), FETCH)]
    assert per_record(fetches[0]) == whole_fetch(fetches[0])  # same events either way
    poisoned = [[b"{not json", *fetch[1:]] for fetch in fetches]
    one = best_us_per_record(per_record, fetches)
    rows = [
        ("one call per record (the worker)", one),
        ("one call per fetch", best_us_per_record(whole_fetch, fetches)),
        ("one call per fetch, one bad record in it", best_us_per_record(whole_fetch, poisoned)),
    ]
    print(f"{len(values):,} records in fetches of {FETCH:,}; best of {REPEAT}\n")
    print("| decoding | µs per record | vs per record |")
    print("|---|---:|---:|")
    for name, us in rows:
        print(f"| {name} | {us:.2f} | {us / one:.2f}x |")


if __name__ == "__main__":
    main()
