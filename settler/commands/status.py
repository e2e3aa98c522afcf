"""`settler status [--watch] [--json] [--metrics URL] [--max-lag N]`: the writer, lag per
partition, dead letters by reason and the worker's own view on one screen.

Exit code: 0 healthy, 1 more than --max-lag records not settled, 2 Kafka or the database
unreachable (one line on stderr naming which).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from typing import Any

from settler.config import Settings
from settler.ops.status import (
    DEFAULT_MAX_LAG,
    UNREACHABLE,
    Status,
    StatusReader,
    Unreachable,
    default_metrics_url,
)
from settler.ops.status_view import document, render
from settler.timeouts import within

WATCH_INTERVAL_S = 2.0
CLOSE_BUDGET_S = 5.0  # after Ctrl-C: connections closed within this, then exit
CLEAR_SCREEN = "\x1b[H\x1b[2J"


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text!r}")
    return value


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "status", help="the worker at a glance: writer, lag, dead letters, rate, latency",
        description="One screen for an operator, from the same settings as `settler run`: "
                    "the writer lease (owner, epoch, expiry, ts_ceiling), each input "
                    "partition's committed offset, end offset and lag, the dead-letter "
                    "topic by reason, and, when a worker's endpoint answers, its role, "
                    "readiness, events/s and settle latency p99 over the last minute. "
                    "Exit code: 0 healthy, 1 lagging beyond --max-lag, 2 Kafka or the "
                    "database unreachable.",
    )
    parser.add_argument("--watch", action="store_true",
                        help=f"redraw every {WATCH_INTERVAL_S:g} s until Ctrl-C")
    parser.add_argument("--json", action="store_true", help="one JSON document for tools "
                        "(one per line with --watch)")
    parser.add_argument("--metrics", metavar="URL", default=None,
                        help="a worker's metrics endpoint (default: http://127.0.0.1:"
                             "SETTLER_METRICS_PORT)")
    parser.add_argument("--max-lag", type=_non_negative, default=DEFAULT_MAX_LAG, metavar="N",
                        help=f"exit 1 when more than N records are not settled "
                             f"(default {DEFAULT_MAX_LAG})")
    parser.add_argument("--timeout", type=_positive_seconds, default=5.0, metavar="S",
                        help="how long Kafka, the database and the worker may take to "
                             "answer (default 5)")
    parser.set_defaults(handler=_status)


def _status(args: argparse.Namespace, settings: Settings) -> int:
    # The drivers log their connection failures; the one line below says it better.
    for name in ("aiokafka", "cassandra"):
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)
    reader = StatusReader(settings, args.metrics or default_metrics_url(settings),
                          timeout_s=args.timeout, max_lag=args.max_lag)
    if args.watch:
        last = [UNREACHABLE]
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how a watch ends
            asyncio.run(_watch(reader, args.json, last))
        return last[0]
    try:
        status = asyncio.run(_once(reader))
    except Unreachable as exc:
        print(f"settler status: {exc}", file=sys.stderr)
        return UNREACHABLE
    print(json.dumps(document(status)) if args.json else render(status))
    return status.exit_code


async def _once(reader: StatusReader) -> Status:
    async with reader:
        return await reader.read()


async def _watch(reader: StatusReader, as_json: bool, last: list[int]) -> None:
    """Redraw until Ctrl-C (or SIGTERM); an unreachable service is shown, and retried next
    time. The signal sets an event rather than cancelling a read: a client library may turn
    a cancel into an error of its own (a read then looks unreachable and the watch would go
    on), so a read in progress is abandoned instead, and closing is bounded."""
    clear = sys.stdout.isatty() and not as_json
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    stopped = asyncio.ensure_future(stop.wait())
    read: asyncio.Future[Status] | None = None
    try:
        while not stop.is_set():
            read = asyncio.ensure_future(reader.read())
            await asyncio.wait({read, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if stop.is_set():
                break
            try:
                status = read.result()
            except Unreachable as exc:
                last[0] = UNREACHABLE
                text = (json.dumps({"exit_code": UNREACHABLE, "error": str(exc)}) if as_json
                        else f"settler status: {exc}")
                await reader.close()  # reconnect from scratch next time
            else:
                last[0] = status.exit_code
                text = json.dumps(document(status)) if as_json else render(status)
            if clear:
                sys.stdout.write(CLEAR_SCREEN)
            elif not as_json:
                text += "\n"  # screens one after another when not on a terminal
            print(text, flush=True)
            await asyncio.wait({stopped}, timeout=WATCH_INTERVAL_S)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        if read is not None and not read.done():
            read.cancel()
        stopped.cancel()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await within(CLOSE_BUDGET_S, reader.close())
