"""The pure parts of what operators see next to the metrics: log lines, progress output, the
reconciliation arithmetic of `settler verify`, dead-letter positions and replay progress."""

from __future__ import annotations

import io
import itertools
import json
import logging
from collections.abc import Iterator

import pytest
import structlog
from aiokafka import TopicPartition

from settler import logs
from settler.config import load_settings
from settler.ops.deadletters import DeadLetter, Position, text_of
from settler.ops.progress import Progress
from settler.ops.replay import Rewind, catch_up
from settler.ops.verify import (
    TOKEN_MAX,
    TOKEN_MIN,
    Figures,
    Rebuild,
    compare,
    token_ranges,
    trade_moves,
)

# -- logs -----------------------------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """Logs configured into a buffer; the previous configuration restored afterwards."""
    saved = structlog.get_config()
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    stream = io.StringIO()
    logs.configure("info", "json", stream=stream)
    yield stream
    structlog.configure(**saved)
    root.handlers[:] = handlers
    root.setLevel(level)


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_line_about_an_event_is_json_with_its_id_and_kafka_position(
    log_stream: io.StringIO,
) -> None:
    logs.get("settler.test").warning(
        "event dead-lettered", reason="overflow",
        **logs.event_fields("settlement.events", 2, 41, event_id=1_000_123))
    (line,) = lines(log_stream)
    assert line["event"] == "event dead-lettered"
    assert (line["level"], line["logger"]) == ("warning", "settler.test")
    assert (line["topic"], line["partition"], line["offset"], line["event_id"]) == (
        "settlement.events", 2, 41, 1_000_123)
    assert "timestamp" in line


def test_the_level_filters_lines(log_stream: io.StringIO) -> None:
    logs.configure("warning", "json", stream=log_stream)
    log = logs.get("settler.test")
    log.info("not shown")
    log.warning("shown")
    assert [line["event"] for line in lines(log_stream)] == ["shown"]


def test_no_secret_reaches_a_log_line(log_stream: io.StringIO) -> None:
    settings = load_settings(environ={"SETTLER_CQL_PASSWORD": "hunter2",
                                      "SETTLER_KAFKA_SASL_PASSWORD": "s3cret"})
    log = logs.get("settler.test")
    log.info("starting", settings=settings)
    log.info("starting", settings=settings.redacted())
    log.info("request", headers={"X-API-Key": "k-123456"}, cql_password="hunter2", token="t")
    text = log_stream.getvalue()
    for secret in ("hunter2", "s3cret", "k-123456"):
        assert secret not in text
    first = lines(log_stream)[0]
    assert isinstance(first["settings"], dict) and first["settings"]["cql_password"] == "***"


def test_driver_logs_come_out_as_json_lines_too(log_stream: io.StringIO) -> None:
    logging.getLogger("cassandra.cluster").warning("host %s is down", "10.0.0.1")
    logging.getLogger("aiokafka").info("chatty line below the drivers' WARNING floor")
    (line,) = lines(log_stream)
    assert (line["event"], line["logger"], line["level"]) == (
        "host 10.0.0.1 is down", "cassandra.cluster", "warning")


def test_a_terminal_gets_the_console_renderer(log_stream: io.StringIO) -> None:
    terminal = _Terminal()
    logs.configure("info", "auto", stream=terminal)
    logs.get("settler.test").info("hello people", user_id=7)
    text = terminal.getvalue()
    assert "hello people" in text and "user_id" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


# -- progress -------------------------------------------------------------------------------


def test_progress_off_a_terminal_is_plain_periodic_lines() -> None:
    out = io.StringIO()
    progress = Progress("verify", 200, unit="ranges", stream=out, every_s=3600)
    progress.update(10)
    progress.update(20)  # within the interval: not printed
    progress.finish(note="done")
    first, last = out.getvalue().splitlines()
    assert first.startswith("verify    5.0% 10/200 ranges")
    assert "\r" not in out.getvalue()
    assert "done" in last and "20/200" in last


def test_progress_on_a_terminal_redraws_one_bar() -> None:
    out = io.StringIO()
    progress = Progress("replay", 4, unit="records", stream=out, tty=True)
    progress.update(4)
    progress.finish()
    assert out.getvalue().startswith("\r\x1b[2Kreplay  [" + "#" * 30 + "]")
    assert out.getvalue().endswith("\n")


# -- verify arithmetic ----------------------------------------------------------------------


def test_token_ranges_cover_the_whole_token_space_without_overlap() -> None:
    ranges = token_ranges(64)
    assert len(ranges) == 64
    assert ranges[0][0] == TOKEN_MIN and ranges[-1][1] == TOKEN_MAX
    assert all(high == next_low for (_, high), (next_low, _) in itertools.pairwise(ranges))
    assert all(low < high for low, high in ranges)


def _trade(**overrides: int) -> dict[tuple[int, int], tuple[int, int]]:
    fields = dict(buyer=10, seller=20, base=1, quote=2, quantity=50, cost=7_500,
                  buyer_refund=100, seller_refund=5, buyer_fee=1, seller_fee=15, fee_account=1)
    fields.update(overrides)
    return trade_moves(**fields)


def test_a_trade_moves_value_between_rows_and_conserves_each_asset() -> None:
    moves = _trade()
    assert moves == {
        (10, 2): (100, -7_600), (10, 1): (49, 0), (20, 1): (5, -55), (20, 2): (7_485, 0),
        (1, 1): (1, 0), (1, 2): (15, 0),
    }
    for asset in (1, 2):
        assert sum(a + f for (_, a_id), (a, f) in moves.items() if a_id == asset) == 0


def test_a_row_touched_twice_by_one_trade_counts_one_version() -> None:
    rebuilt = Rebuild()
    # A self-trade where the fee account is also the trader: 6 moves, 2 rows, and the
    # frozen funds of both orders come back to available in full.
    rebuilt.add_trade_row((1, 1, 1, 2, 50, 7_500, 0, 0, 1, 15, 1))
    assert rebuilt.figures() == {(1, 1): Figures(50, -50, 1), (1, 2): Figures(7_500, -7_500, 1)}


def test_balance_events_and_trades_add_up_per_row() -> None:
    rebuilt = Rebuild()
    for kind, amount in (("deposit", 100), ("freeze", 30), ("unfreeze", 10), ("withdraw", 5)):
        rebuilt.add_balance_event_row((kind, 7, 2, amount))
    assert rebuilt.figures() == {(7, 2): Figures(75, 20, 4)}
    with pytest.raises(ValueError, match="unknown kind"):
        rebuilt.add_balance_event_row(("airdrop", 7, 2, 1))


def test_compare_reports_rows_missing_on_either_side_and_changed_rows() -> None:
    stored = {(1, 1): Figures(5, 0, 1), (2, 1): Figures(9, 0, 2), (3, 1): Figures(1, 0, 1)}
    rebuilt = {(1, 1): Figures(5, 0, 1), (2, 1): Figures(8, 0, 2), (4, 1): Figures(1, 0, 1)}
    assert [(d.user_id, d.stored, d.rebuilt) for d in compare(stored, rebuilt)] == [
        (2, Figures(9, 0, 2), Figures(8, 0, 2)),
        (3, Figures(1, 0, 1), None),
        (4, None, Figures(1, 0, 1)),
    ]


# -- dead letters and replay ----------------------------------------------------------------


@pytest.mark.parametrize(("text", "position"), [("17", Position(0, 17)),
                                                ("2:17", Position(2, 17))])
def test_a_dead_letter_position_is_offset_or_partition_and_offset(
    text: str, position: Position
) -> None:
    assert Position.parse(text) == position


@pytest.mark.parametrize("text", ["", "x", "1:x", "-1", "1:-3"])
def test_a_bad_dead_letter_position_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        Position.parse(text)


def test_republished_headers_are_the_original_ones() -> None:
    letter = DeadLetter(0, 3, 0, b"k", b"v", (("trace", b"1"), ("settler.reason", b"x"),
                                               ("settler.source", b"t/0/1")))
    assert letter.original_headers == [("trace", b"1")]
    assert (letter.reason, letter.source) == ("x", "t/0/1")


def test_bytes_are_shown_escaped_and_cut() -> None:
    assert text_of(b"\xff{\"a\"}\n", 40) == '\\xff{"a"}\\n'
    assert text_of(b"x" * 50, 10) == "xxxxxxx..."
    assert text_of(None) == "(none)"


def test_replay_progress_counts_records_committed_again_since_the_rewind() -> None:
    a, b = TopicPartition("t", 0), TopicPartition("t", 1)
    rewinds = [Rewind(a, 100, 0, 100), Rewind(b, 50, 40, 50)]
    assert catch_up(rewinds, {a: 0, b: 40}).done == 0
    state = catch_up(rewinds, {a: 60, b: 50})
    assert (state.done, state.total, state.complete) == (70, 110, False)
    assert catch_up(rewinds, {a: 120, b: 50}).complete
