"""`settler replay --from-offset N | --from-time ISO8601`: rewind the consumer group, then
show the worker's catch-up to the end of the topic (Ctrl-C stops watching, not the replay)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import UTC, datetime
from typing import Any

from aiokafka.errors import KafkaConnectionError, KafkaError

from settler import logs, texttable
from settler.config import Settings
from settler.ops.progress import Progress
from settler.ops.replay import CatchUp, ReplayError, Rewind, Start, rewind, watch


def _offset(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an offset >= 0, got {text!r}")
    return value


def _time_ms(text: str) -> int:
    """ISO 8601 -> ms since the epoch; a time without a UTC offset is taken as UTC."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an ISO 8601 time such as 2024-05-01T12:00:00Z, got {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "replay", help="rewind the consumer group to an offset or a time and watch catch-up",
        description="Rewind the committed offsets of the worker's consumer group, then show "
                    "a worker (`settler run`) re-reading up to the end of the topic. Every "
                    "re-read event is a duplicate and changes no balance. The group must "
                    "have no active member: stop the workers first.",
    )
    start = parser.add_mutually_exclusive_group(required=True)
    start.add_argument("--from-offset", type=_offset, metavar="N",
                       help="rewind to offset N of each chosen partition (clamped to the "
                            "oldest and newest offsets it has)")
    start.add_argument("--from-time", type=_time_ms, metavar="ISO8601",
                       help="rewind to the first record at or after this time (UTC unless "
                            "the time says otherwise)")
    parser.add_argument("--partition", type=int, action="append", metavar="P",
                        help="only this partition (repeatable; default: all)")
    parser.add_argument("--topic", action="append", metavar="T",
                        help="only this input topic (repeatable; default: SETTLER_TOPICS)")
    parser.add_argument("--group", metavar="G", help="consumer group (default: SETTLER_GROUP_ID)")
    parser.add_argument("--force", action="store_true",
                        help="skip the check for active group members (Kafka still refuses "
                             "new offsets while a member is active)")
    parser.add_argument("--no-wait", action="store_true",
                        help="rewind and exit without watching the catch-up")
    parser.add_argument("--timeout", type=float, default=None, metavar="S",
                        help="stop watching after S seconds, exit 1 if not caught up")
    parser.set_defaults(handler=_replay)


def _replay(args: argparse.Namespace, settings: Settings) -> int:
    logs.configure(settings.log_level, settings.log_format)
    group = args.group or settings.group_id
    topics = args.topic or list(settings.topics)
    start = Start(offset=args.from_offset) if args.from_offset is not None else Start(
        time_ms=args.from_time)
    try:
        rewinds = asyncio.run(rewind(settings, group=group, start=start, topics=topics,
                                     partitions=args.partition, force=args.force))
    except ReplayError as exc:
        print(f"settler replay: {exc}", file=sys.stderr)
        return 1
    except (KafkaConnectionError, KafkaError, OSError) as exc:
        print(f"settler replay: cannot talk to Kafka at {settings.kafka_bootstrap}: {exc!r}",
              file=sys.stderr)
        return 1
    print(rewinds_table(rewinds))
    total = sum(r.to_read for r in rewinds)
    print(f"group {group} rewound: {len(rewinds)} partition(s), {total} record(s) to re-read")
    if args.no_wait or total == 0:
        return 0
    return _watch(settings, group, rewinds, total, args.timeout)


def _watch(settings: Settings, group: str, rewinds: list[Rewind], total: int,
           timeout: float | None) -> int:
    progress = Progress(f"replay {group}", total, unit="records")
    print(f"waiting for a worker of group {group} to catch up (Ctrl-C stops watching only)",
          file=sys.stderr)

    def show(state: CatchUp) -> None:
        progress.update(state.done, total=state.total)

    try:
        state = asyncio.run(watch(settings, group, rewinds, show, timeout_s=timeout))
    except KeyboardInterrupt:
        progress.finish(note="stopped watching")
        print("stopped watching; the replay goes on in the worker", file=sys.stderr)
        return 0
    except KafkaError as exc:
        progress.finish(note="stopped watching")
        print(f"settler replay: lost Kafka while watching: {exc!r}", file=sys.stderr)
        return 1
    if not state.complete:
        progress.finish(note="timed out")
        print(f"settler replay: not caught up after {timeout}s ({state.done}/{state.total})",
              file=sys.stderr)
        return 1
    progress.finish(note="caught up")
    print(f"caught up: {state.total} record(s) re-read by group {group}")
    return 0


def rewinds_table(rewinds: list[Rewind]) -> str:
    rows = [("TOPIC", "PARTITION", "WAS", "NOW", "END")] + [
        (r.tp.topic, str(r.tp.partition), "-" if r.previous is None else str(r.previous),
         str(r.offset), str(r.end))
        for r in rewinds
    ]
    return texttable.render(rows)
