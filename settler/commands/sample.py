"""`settler sample`: publish a realistic market stream (settler.ops.sample.market) into the
input topic. `--wait` follows it until the worker has settled it and prints what
happened; `--worker` (what `make run` does) starts `settler run` first and leaves it
running afterwards, until Ctrl-C. Argument parsing only: settler.ops.first_run does it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

from settler.config import Settings
from settler.ops import first_run
from settler.ops.first_run import DEFAULT_TIMEOUT_S, SampleError, SampleOptions


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "sample", help="publish a realistic sample market stream into the input topic",
        description="Publish users funded by deposits, orders that freeze what they may "
                    "spend, trades against market makers' orders, cancels and withdrawals "
                    "into the first input topic, each user's records on one partition so "
                    "that settling them in any interleaving of partitions never takes a "
                    "balance below zero.",
    )
    parser.add_argument("--events", type=_positive, default=5000, metavar="N",
                        help="valid events to publish, at least one funding deposit per user "
                             "(default 5000)")
    parser.add_argument("--users", type=_positive, default=200, metavar="N",
                        help="users of the sample, ids 10001 and up (default 200)")
    parser.add_argument("--market-makers", type=_positive, default=2, metavar="N",
                        help="market makers per partition that carries trades (default 2)")
    parser.add_argument("--seed", type=int, default=1, help="the same seed, the same stream "
                        "(ids aside: they start at the clock, so reruns add new events)")
    parser.add_argument("--duplicates", type=_rate, default=0.0, metavar="RATE",
                        help="share of re-sent duplicates (0..1)")
    parser.add_argument("--malformed", type=_rate, default=0.0, metavar="RATE",
                        help="share of invalid records (0..1)")
    parser.add_argument("--wait", action="store_true",
                        help="wait until the worker has settled the sample, then summarize")
    parser.add_argument("--worker", action="store_true",
                        help="start `settler run` first, summarize once the sample is "
                             "settled, and keep the worker running until Ctrl-C (implies "
                             "--wait; what `make run` does)")
    parser.add_argument("--timeout", type=_positive_seconds, default=DEFAULT_TIMEOUT_S,
                        metavar="S",
                        help=f"how long --wait waits (default {DEFAULT_TIMEOUT_S:g})")
    parser.add_argument("--metrics", metavar="URL", default=None,
                        help="the settling worker's metrics endpoint, for the summary's "
                             "counts (default: http://127.0.0.1:SETTLER_METRICS_PORT)")
    parser.set_defaults(handler=_sample)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a share between 0 and 1, got {text!r}")
    return value


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text!r}")
    return value


def _sample(args: argparse.Namespace, settings: Settings) -> int:
    # The clients here log what their callers report better in one line (a topic that is
    # about to be auto-created, a broker that does not answer); the worker logs its own.
    for name in ("aiokafka", "cassandra"):
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)
    options = SampleOptions(
        events=args.events, users=args.users, market_makers=args.market_makers,
        seed=args.seed, duplicates=args.duplicates, malformed=args.malformed,
        timeout_s=args.timeout, metrics=args.metrics, config=args.config)
    if args.worker:
        return asyncio.run(first_run.with_worker(settings, options))
    follow = first_run.publish_and_follow if args.wait else first_run.publish_only
    try:
        return asyncio.run(follow(settings, options))
    except SampleError as exc:
        print(f"settler sample: {exc}", file=sys.stderr)
        return 1
