"""`settler dlq list | show | replay`: look at dead letters and send fixed ones back."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any, TypeVar

from aiokafka.errors import KafkaError

from settler import logs, texttable
from settler.config import Settings
from settler.ops.deadletters import (
    DeadLetter,
    DeadLetterError,
    Listing,
    Position,
    Sent,
    fetch,
    read,
    republish,
    text_of,
)

T = TypeVar("T")

PREVIEW_CHARS = 48
DEFAULT_LIMIT = 50


def _position(text: str) -> Position:
    try:
        return Position.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("dlq", help="list, show and re-publish dead letters")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    listing = actions.add_parser("list", help="dead letters, oldest first: offset, reason, "
                                              "source, key, first bytes")
    listing.add_argument("--limit", type=_positive, default=DEFAULT_LIMIT, metavar="N",
                         help=f"at most N records (default {DEFAULT_LIMIT})")
    listing.add_argument("--reason", metavar="R", help="only records with this reason")
    listing.add_argument("--json", action="store_true", help="one JSON document for tools")
    listing.set_defaults(handler=_list)

    show = actions.add_parser("show", help="one dead letter: headers, key and full value")
    show.add_argument("offset", type=_position, metavar="OFFSET",
                      help="offset in the dead-letter topic (PARTITION:OFFSET if it has "
                           "several partitions)")
    show.add_argument("--json", action="store_true", help="one JSON document for tools")
    show.set_defaults(handler=_show)

    replay = actions.add_parser(
        "replay", help="re-publish dead letters to the input topic (after a fix upstream)",
        description="Send chosen dead letters back to the input topic (the first of "
                    "SETTLER_TOPICS) with their original key and headers, without the "
                    "settler.* headers. The worker then settles them like any record.",
    )
    chosen = replay.add_mutually_exclusive_group(required=True)
    chosen.add_argument("offsets", type=_position, nargs="*", default=[], metavar="OFFSET",
                        help="offsets in the dead-letter topic")
    chosen.add_argument("--reason", metavar="R", help="every dead letter with this reason")
    replay.add_argument("--dry-run", action="store_true", help="print what would be sent")
    replay.set_defaults(handler=_replay)


def _run(settings: Settings, what: Callable[[], Coroutine[Any, Any, T]]) -> T | int:
    """Run a coroutine; a Kafka or lookup failure becomes one line on stderr and exit 1."""
    logs.configure(settings.log_level, settings.log_format)
    try:
        return asyncio.run(what())
    except DeadLetterError as exc:
        print(f"settler dlq: {exc}", file=sys.stderr)
    except (KafkaError, OSError) as exc:
        print(f"settler dlq: cannot talk to Kafka at {settings.kafka_bootstrap}: {exc!r}",
              file=sys.stderr)
    return 1


def _list(args: argparse.Namespace, settings: Settings) -> int:
    listing = _run(settings, lambda: read(settings, limit=args.limit, reason=args.reason))
    if isinstance(listing, int):
        return listing
    if args.json:
        print(json.dumps({"topic": settings.dlq_topic, "total": listing.total,
                          "letters": [_letter_json(letter) for letter in listing.letters]}))
        return 0
    print(listing_table(listing))
    which = f" with reason {args.reason}" if args.reason else ""
    print(f"{len(listing.letters)} shown{which}; {listing.total} in {settings.dlq_topic}")
    return 0


def listing_table(listing: Listing) -> str:
    rows = [("OFFSET", "REASON", "SOURCE", "KEY", "VALUE")] + [
        (str(letter.offset) if letter.partition == 0 else str(letter.position),
         letter.reason, letter.source, text_of(letter.key, 24),
         text_of(letter.value, PREVIEW_CHARS))
        for letter in listing.letters
    ]
    return texttable.render(rows, left=len(rows[0]))


def _show(args: argparse.Namespace, settings: Settings) -> int:
    letters = _run(settings, lambda: fetch(settings, [args.offset]))
    if isinstance(letters, int):
        return letters
    (letter,) = letters
    if args.json:
        print(json.dumps(_letter_json(letter, full=True)))
        return 0
    when = datetime.fromtimestamp(letter.timestamp_ms / 1000, UTC).isoformat()
    print(f"position  {settings.dlq_topic} {letter.position}  ({when})")
    print(f"reason    {letter.reason}")
    print(f"source    {letter.source}")
    print(f"detail    {letter.detail}")
    print("headers")
    for key, value in letter.headers:
        print(f"  {key}: {text_of(value)}")
    print(f"key       {text_of(letter.key)}")
    print("value")
    print(text_of(letter.value))
    return 0


def _replay(args: argparse.Namespace, settings: Settings) -> int:
    async def choose() -> list[DeadLetter]:
        if args.reason is not None:
            return (await read(settings, reason=args.reason)).letters
        return await fetch(settings, args.offsets)

    letters = _run(settings, choose)
    if isinstance(letters, int):
        return letters
    if not letters:
        print(f"settler dlq: no dead letter with reason {args.reason!r}", file=sys.stderr)
        return 1
    if args.dry_run:
        for letter in letters:
            print(f"would send {letter.position} ({letter.reason}, from {letter.source}) "
                  f"key={text_of(letter.key, 24)} to {settings.topics[0]}")
        return 0
    sent = _run(settings, lambda: republish(settings, letters))
    if isinstance(sent, int):
        return sent
    for item in sent:
        print(sent_line(item))
    print(f"{len(sent)} dead letter(s) re-published to {settings.topics[0]}")
    return 0


def sent_line(item: Sent) -> str:
    letter = item.letter
    return (f"sent {letter.position} ({letter.reason}, from {letter.source}) "
            f"key={text_of(letter.key, 24)} -> {item.topic} partition {item.partition} "
            f"offset {item.offset}")


def _letter_json(letter: DeadLetter, *, full: bool = False) -> dict[str, Any]:
    document: dict[str, Any] = {
        "partition": letter.partition,
        "offset": letter.offset,
        "timestamp_ms": letter.timestamp_ms,
        "reason": letter.reason,
        "source": letter.source,
        "detail": letter.detail,
        "key": text_of(letter.key),
    }
    if full:
        document["headers"] = [[key, text_of(value)] for key, value in letter.headers]
        document["value"] = text_of(letter.value)
    else:
        document["value_preview"] = text_of(letter.value, PREVIEW_CHARS)
    return document
