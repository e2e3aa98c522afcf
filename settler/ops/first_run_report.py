"""What `settler sample --wait` prints once the sample is settled: what the worker counted
(differences of its metrics), balances read back, and three next steps to paste, about a
real user of the sample.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from settler.config import Settings
from settler.ops.sample import Sample


@dataclass(frozen=True)
class Counts:
    """What the worker counted while settling the sample (differences of its metrics)."""

    settled: Counter[str]  # by event type
    duplicates: int
    dead_letters: Counter[str]  # by reason
    anomalies: int

    @classmethod
    def between(cls, before: dict[str, Any], after: dict[str, Any]) -> Counts:
        def diff(name: str) -> Counter[tuple[tuple[str, str], ...]]:
            counts: Counter[tuple[tuple[str, str], ...]] = Counter()
            for labels, value in after.get(name, []):
                counts[tuple(sorted(labels.items()))] += int(value)
            for labels, value in before.get(name, []):
                counts[tuple(sorted(labels.items()))] -= int(value)
            return counts

        settled: Counter[str] = Counter()
        letters: Counter[str] = Counter()
        duplicates = 0
        for key, count in diff("settler_events_total").items():
            labels = dict(key)
            if labels["outcome"] == "settled":
                settled[labels["type"]] += count
            elif labels["outcome"] == "duplicate":
                duplicates += count
            elif count:
                letters[labels["reason"]] += count
        anomalies = sum(diff("settler_balance_anomalies_total").values())
        return cls(settled, duplicates, +letters, anomalies)


def summary(sample: Sample, topic: str, counts: Counts | None, negative: int, users: int,
            took_s: float, metrics_url: str) -> str:
    """What happened, in a few lines: the end of `make run`'s first screen."""
    lines = ["", f"sample settled in {took_s:.1f} s: {len(sample.records):,} records in "
                 f"{topic} ({sample.partitions} partitions)"]
    if counts is None:
        lines.append(f"  (no counts: the worker at {metrics_url} did not answer, or is a "
                     "standby while another worker settles)")
    else:
        events = sum(counts.settled.values()) - counts.settled["trade"]
        lines.append(f"  {counts.settled['trade']:,} trades and {events:,} balance events "
                     f"settled, {counts.duplicates:,} duplicates skipped")
        if counts.dead_letters:
            reasons = ", ".join(f"{r} {n}" for r, n in sorted(counts.dead_letters.items()))
            lines.append(f"  {sum(counts.dead_letters.values()):,} dead letters ({reasons}): "
                         "the malformed records the sample put in on purpose")
        else:
            lines.append("  0 dead letters")
    anomalies = "?" if counts is None else f"{counts.anomalies:,}"
    lines.append(f"  {anomalies} balance anomalies, {negative:,} negative balances "
                 f"({users:,} users and the fee account read back)")
    return "\n".join(lines)


def settler_command() -> str:
    """How to call this settler from the user's shell: `settler` when that is on PATH,
    else the path of the one running now (`.venv/bin/settler` under `make run`)."""
    here = Path(sys.executable).parent / "settler"
    found = shutil.which("settler")
    if found and Path(found).resolve() == here.resolve():
        return "settler"
    with contextlib.suppress(ValueError):
        return str(here.relative_to(Path.cwd()))
    return str(here)


def next_steps(settings: Settings, sample: Sample, config_args: list[str]) -> str:
    """Three things to try next, ready to paste, about a real user of the sample."""
    settler = " ".join([settler_command(), *config_args])
    user = busiest_user(sample)
    api = f"http://{settings.api_host}:{settings.api_port}"
    return "\n".join([
        "",
        "next steps, in another terminal:",
        f"  {settler} balances {user}",
        f"  KEY=$({settler} keys create {user} | sed -n 's/^api_key: //p')",
        f"  {settler} api & curl --retry 10 --retry-connrefused -H \"X-API-Key: $KEY\" "
        f"{api}/v1/balances",
        f"  {settler} status",
    ])


def busiest_user(sample: Sample) -> int:
    """The user on the most trades (a market maker: open orders, fees, both assets), or
    the one with the most records when nobody trades."""
    trades: Counter[int] = Counter()
    records: Counter[int] = Counter()
    for record in sample.records:
        if record.expect is not None or record.duplicate:
            continue
        body = json.loads(record.value)
        if body["type"] == "trade":
            trades.update((body["buyer_user_id"], body["seller_user_id"]))
        else:
            records[body["user_id"]] += 1
    ranked = trades or records
    return ranked.most_common(1)[0][0] if ranked else min(sample.home)
