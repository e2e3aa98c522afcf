"""Dead letters (settler.worker.dead_letters): what a read_committed reader of the
dead-letter topic gets for each refused record, and which commit carries it."""

from __future__ import annotations

from aiokafka import ConsumerRecord, TopicPartition

from settler.core.events import Reason, Rejected
from settler.core.lineage import Position
from settler.core.offsets import Offsets
from settler.worker.dead_letters import OMITTED_HEADER, REPLAY_HEADER, DeadLetters
from settler.worker.intake import Item

TP = TopicPartition("events", 0)
OTHER = TopicPartition("events", 1)
LIMIT = 4096


def item(tp: TopicPartition, offset: int, value: bytes = b"{not json",
         headers: tuple[tuple[str, bytes], ...] = ()) -> Item:
    record: ConsumerRecord[bytes, bytes] = ConsumerRecord(
        tp.topic, tp.partition, offset, 0, 0, b"key-7", value, None, 5, len(value),
        list(headers))
    rejected = Rejected(Reason.UNDECODABLE, "Input data was truncated")
    return Item(tp, record, Position(tp.topic, tp.partition, offset), rejected, rejected)


def dead_letters(offsets: Offsets[TopicPartition] | None = None, *,
                 committed_ever: dict[str, int] | None = None,
                 refused: set[tuple[str, int, int]] | None = None) -> DeadLetters:
    return DeadLetters(offsets=offsets or Offsets(), replayed_below=committed_ever or {},
                       max_request_bytes=LIMIT,
                       refused_values=set() if refused is None else refused)


def queue(letters: DeadLetters, *items: Item) -> None:
    for each in items:
        letters.offsets.track(each.tp, each.record.offset)
        letters.dead_letter(each, "unknown", "undecodable", "Input data was truncated")


def test_a_dead_letter_keeps_the_record_and_says_why_and_where_from() -> None:
    letters = dead_letters()
    queue(letters, item(TP, 3, headers=(("trace", b"abc"), ("settler.reason", b"forged"))))
    [letter] = letters.letters
    assert (letter.key, letter.value) == (b"key-7", b"{not json")
    assert dict(letter.headers) == {"trace": b"abc", "settler.reason": b"undecodable",
                                    "settler.source": b"events/0/3",
                                    "settler.detail": b"Input data was truncated"}


def test_a_dead_lettered_offset_may_be_committed_at_once() -> None:
    offsets: Offsets[TopicPartition] = Offsets()
    letters = dead_letters(offsets)
    queue(letters, item(TP, 0), item(TP, 1))
    assert offsets.commit_ready() == {TP: 2}


def test_a_letter_above_the_producers_request_limit_goes_without_its_value() -> None:
    letters = dead_letters()
    queue(letters, item(TP, 3, value=b"x" * LIMIT), item(TP, 4, value=b"y" * 100))
    large, small = letters.letters
    assert large.value is None
    assert dict(large.headers)[OMITTED_HEADER] == str(LIMIT).encode()
    assert (large.key, dict(large.headers)["settler.source"]) == (b"key-7", b"events/0/3")
    assert small.value == b"y" * 100
    assert OMITTED_HEADER not in dict(small.headers)


def test_a_value_the_broker_refused_is_left_out_now_and_by_the_next_session() -> None:
    """A refusal breaks the transactional producer: the next session reads the record
    again, and must not send the value the broker will refuse again."""
    refused: set[tuple[str, int, int]] = set()
    first = dead_letters(refused=refused)
    queue(first, item(TP, 3, value=b"z" * 100))
    [letter] = first.letters
    first.value_refused(letter, Exception("MessageSizeTooLargeError"))
    assert letter.value is None
    assert dict(letter.headers)[OMITTED_HEADER] == b"100"
    second = dead_letters(refused=refused)
    queue(second, item(TP, 3, value=b"z" * 100))
    assert second.letters[0].value is None
    assert dict(second.letters[0].headers)[OMITTED_HEADER] == b"100"


def test_a_record_reread_below_the_groups_commit_is_not_published_again() -> None:
    """Its letter went out in the transaction that committed past it; re-read only
    because the database may have lost acknowledged writes, its offset still settles."""
    offsets: Offsets[TopicPartition] = Offsets()
    letters = dead_letters(offsets)
    offsets.assigned(TP, 5)
    letters.published_below[TP] = 5
    queue(letters, item(TP, 4), item(TP, 5))
    assert [letter.offset for letter in letters.letters] == [5]
    assert offsets.commit_ready() == {TP: 6}


def test_a_letter_below_the_highest_offset_ever_committed_is_marked_as_a_replay() -> None:
    letters = dead_letters(committed_ever={"events:0": 10})
    queue(letters, item(TP, 9), item(TP, 10))
    replayed, new = letters.letters
    assert dict(replayed.headers)[REPLAY_HEADER] == b"1"
    assert REPLAY_HEADER not in dict(new.headers)


def test_a_commit_carries_the_letters_below_its_offsets_and_publishes_them_once() -> None:
    letters = dead_letters()
    queue(letters, item(TP, 1), item(TP, 7), item(OTHER, 2))
    carried = letters.below({TP: 5})
    assert [(letter.tp, letter.offset) for letter in carried] == [(TP, 1)]
    letters.published(carried)
    assert [(letter.tp, letter.offset) for letter in letters.letters] == [(TP, 7), (OTHER, 2)]


def test_revoked_partitions_drop_their_queued_letters() -> None:
    """They come back with their records, read again by whoever owns them next."""
    letters = dead_letters()
    queue(letters, item(TP, 1), item(OTHER, 2))
    letters.published_below[TP] = 1
    letters.forget({TP})
    assert [(letter.tp, letter.offset) for letter in letters.letters] == [(OTHER, 2)]
    assert letters.published_below == {}
