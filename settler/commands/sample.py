"""`settler sample`: produce a realistic sample stream into the input topic."""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from settler import kafka
from settler.config import Settings
from settler.registry import load_registry
from settler.sample import StreamShape, generate


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "sample", help="produce sample deposits, orders and trades into the input topic"
    )
    parser.add_argument("--events", type=int, default=5000, help="records to produce")
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--duplicates", type=float, default=0.0, metavar="RATE",
                        help="share of re-sent duplicates (0..1)")
    parser.add_argument("--malformed", type=float, default=0.0, metavar="RATE",
                        help="share of invalid records (0..1)")
    parser.set_defaults(handler=_sample)


def _sample(args: argparse.Namespace, settings: Settings) -> int:
    for name in ("duplicates", "malformed"):
        if not 0 <= getattr(args, name) <= 1:
            raise SystemExit(f"settler sample: error: --{name} must be between 0 and 1")
    if args.events <= 0 or args.users <= 0:
        raise SystemExit("settler sample: error: --events and --users must be positive")
    registry = load_registry(settings.registry)
    # Ids start at a clock-derived base so that a second run adds new events instead of
    # re-sending (and so skipping) the first run's.
    base = time.time_ns() // 1000
    shape = StreamShape(events=args.events, users=args.users, seed=args.seed,
                        duplicate_rate=args.duplicates, malformed_rate=args.malformed,
                        first_trade_id=base, first_event_id=base)
    records = generate(registry, shape)
    asyncio.run(_produce(settings, records))
    print(f"produced {len(records)} sample records to {settings.topics[0]}")
    return 0


async def _produce(settings: Settings, records: list[Any]) -> None:
    producer = kafka.producer(settings, linger_ms=5)
    await producer.start()
    try:
        futures = [
            await producer.send(settings.topics[0], value=r.value, key=r.key) for r in records
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
