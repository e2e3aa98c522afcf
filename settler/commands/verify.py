"""`settler verify [--json]`: rebuild balances from stored events and report differences.

Exit 0: "N rows checked, no difference". Exit 1: a table (or JSON) of the rows that differ.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from cassandra import InvalidRequest

from settler import logs, texttable
from settler.config import Settings
from settler.core.amounts import to_decimal_string
from settler.core.registry import Asset, Registry, load_registry
from settler.ops import verify as reconcile
from settler.ops.progress import Progress
from settler.ops.verify import DEFAULT_PARALLEL, DEFAULT_RANGES, Difference, Figures, Report
from settler.read.balances_view import unregistered_asset
from settler.store import cql

TABLE_HEADER = ("USER", "ASSET", "STORED AVAILABLE", "REBUILT AVAILABLE", "STORED FROZEN",
                "REBUILT FROZEN", "STORED VERSION", "REBUILT VERSION")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "verify",
        help="rebuild every balance from stored trades and balance events and compare",
        description="Rebuild every balance from the stored trades and balance_events rows "
                    "and compare available, frozen and version with user_balances. Exit 0 "
                    "when they agree, 1 with a table of the rows that differ. Run it with "
                    "the worker caught up: a batch being written is briefly half-visible.",
    )
    parser.add_argument("--json", action="store_true", help="one JSON document for tools")
    parser.add_argument("--ranges", type=_positive, default=DEFAULT_RANGES, metavar="N",
                        help=f"token ranges per table (default {DEFAULT_RANGES})")
    parser.add_argument("--parallel", type=_positive, default=DEFAULT_PARALLEL, metavar="N",
                        help=f"range scans in flight at once (default {DEFAULT_PARALLEL})")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.set_defaults(handler=_verify)


def _verify(args: argparse.Namespace, settings: Settings) -> int:
    logs.configure(settings.log_level, settings.log_format)
    registry = load_registry(settings.registry)
    progress = Progress(f"verify {settings.keyspace}", reconcile.scans_for(args.ranges),
                        unit="ranges")

    def on_range_done(ranges_done: int, rows: int) -> None:
        if not args.quiet:
            progress.update(ranges_done, note=f"{rows:,} rows read")

    try:
        report = asyncio.run(reconcile.verify(settings, ranges=args.ranges, parallel=args.parallel,
                                        on_range_done=on_range_done))
    except (*cql.TRANSIENT_ERRORS, InvalidRequest) as exc:
        print(f"settler verify: cannot read keyspace {settings.keyspace}: {exc}",
              file=sys.stderr)
        return 2
    if not args.quiet:
        rate = report.rows_scanned / report.seconds if report.seconds > 0 else 0.0
        progress.finish(note=f"{report.rows_scanned:,} rows read, {rate:,.0f} rows/s")
    if args.json:
        print(json.dumps(report_document(report, registry)))
    elif report.clean:
        print(f"{report.rows_checked} rows checked, no difference")
    else:
        print(differences_table(report.differences, registry))
        print(f"{len(report.differences)} of {report.rows_checked} rows differ "
              f"(rebuilt from {report.trades} trades and {report.balance_events} "
              "balance events)")
    return 0 if report.clean else 1


def _asset(registry: Registry, asset_id: int) -> Asset:
    return registry.asset(asset_id) or unregistered_asset(asset_id)


def _figures_text(figures: Figures | None, asset: Asset) -> tuple[str, str, str]:
    if figures is None:
        return "-", "-", "-"
    return (to_decimal_string(figures.available, asset.decimals),
            to_decimal_string(figures.frozen, asset.decimals), str(figures.version))


def differences_table(differences: list[Difference], registry: Registry) -> str:
    """Stored vs rebuilt, amounts in whole units; `-` where a side has no such row."""
    lines: list[tuple[str, ...]] = [TABLE_HEADER]
    for diff in differences:
        asset = _asset(registry, diff.asset_id)
        stored = _figures_text(diff.stored, asset)
        rebuilt = _figures_text(diff.rebuilt, asset)
        lines.append((str(diff.user_id), asset.name, stored[0], rebuilt[0], stored[1],
                      rebuilt[1], stored[2], rebuilt[2]))
    return texttable.render(lines, left=2)


def _figures_json(figures: Figures | None, asset: Asset) -> dict[str, Any] | None:
    if figures is None:
        return None
    return {
        "available": to_decimal_string(figures.available, asset.decimals),
        "frozen": to_decimal_string(figures.frozen, asset.decimals),
        "version": figures.version,
        "available_raw": figures.available,
        "frozen_raw": figures.frozen,
    }


def report_document(report: Report, registry: Registry) -> dict[str, Any]:
    return {
        "clean": report.clean,
        "rows_checked": report.rows_checked,
        "trades": report.trades,
        "balance_events": report.balance_events,
        "seconds": round(report.seconds, 3),
        "differences": [
            {
                "user_id": diff.user_id,
                "asset_id": diff.asset_id,
                "asset": _asset(registry, diff.asset_id).name,
                "stored": _figures_json(diff.stored, _asset(registry, diff.asset_id)),
                "rebuilt": _figures_json(diff.rebuilt, _asset(registry, diff.asset_id)),
            }
            for diff in report.differences
        ],
    }
