"""Changelog records: round trip through lines of bounded length, in any order and with
duplicates; the replay order (by seq, contiguous, newest epoch)."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from chukcha.state.changelog import Assembler, Record, encode_record, replay_order

keys = st.binary(min_size=1, max_size=40)
records = st.builds(
    Record,
    partition=st.integers(0, 1023),
    epoch=st.integers(0, 2**40),
    seq=st.integers(1, 2**40),
    puts=st.dictionaries(keys, st.binary(max_size=5000), max_size=20),
    deletes=st.lists(keys, max_size=20),
)


@settings(max_examples=200)
@given(records, st.integers(1024, 8192), st.randoms(use_true_random=False))
def test_a_record_survives_lines_in_any_order_with_duplicates(
    record: Record, max_line: int, rng: random.Random
) -> None:
    lines = encode_record(record, max_line=max_line)
    assert all(len(line) <= max_line and b"\n" not in line for line in lines)
    shuffled = lines + rng.sample(lines, k=min(2, len(lines)))
    rng.shuffle(shuffled)
    assembler = Assembler()
    for line in shuffled:
        assembler.add(line)
    assert assembler.records() == [record]
    assert assembler.incomplete == 0


def test_a_value_larger_than_a_line_is_cut_and_rebuilt() -> None:
    record = Record(3, 7, 1, {b"t/big": bytes(range(256)) * 2000}, [b"t/gone"])
    lines = encode_record(record, max_line=4096)
    assert len(lines) > 100
    assembler = Assembler()
    for line in reversed(lines):
        assembler.add(line)
    assert assembler.records() == [record]


def test_a_missing_part_keeps_the_record_out_and_garbage_is_counted() -> None:
    lines = encode_record(Record(0, 0, 1, {b"k": b"v" * 3000}), max_line=1024)
    assembler = Assembler()
    for line in lines[1:]:
        assembler.add(line)
    assembler.add(b"not json")
    assert assembler.records() == []
    assert assembler.incomplete == 1
    assert assembler.bad_lines == 1


def rec(seq: int, epoch: int = 0) -> Record:
    return Record(0, epoch, seq, {b"k": str((seq, epoch)).encode()})


def test_replay_is_contiguous_by_seq_and_the_newest_epoch_wins() -> None:
    got = [(r.seq, r.epoch) for r in replay_order([rec(3), rec(1), rec(2), rec(2, 5), rec(5)])]
    assert got == [(1, 0), (2, 5)]  # 3 is of an older epoch than 2's winner: the replay ends
    assert [r.seq for r in replay_order([rec(1), rec(2), rec(4)])] == [1, 2]  # 3 missing
    assert [r.seq for r in replay_order([rec(1), rec(2), rec(3)], after=1)] == [2, 3]
    assert list(replay_order([])) == []


def snap(seq: int, epoch: int = 0) -> Record:
    return Record(0, epoch, seq, {b"all": str(seq).encode()}, base=True)


def test_replay_starts_at_the_latest_snapshot() -> None:
    got = [(r.seq, r.base) for r in replay_order(
        [rec(1), rec(2), snap(2), rec(3), rec(4), snap(4), rec(5), rec(7)])]
    assert got == [(4, True), (5, False)]  # 7 waits for 6
    assert [(r.seq, r.base) for r in replay_order([snap(3), rec(5)])] == [(3, True)]
    # Into a store that holds commits already, a snapshot is not a starting point.
    assert [r.seq for r in replay_order([snap(4), rec(3), rec(4)], after=2)] == [3, 4]


def test_a_snapshot_round_trips_marked_as_a_base() -> None:
    lines = encode_record(snap(9), max_line=1024)
    assembler = Assembler()
    for line in lines + encode_record(rec(9), max_line=1024):
        assembler.add(line)
    assert sorted((r.seq, r.base) for r in assembler.records()) == [(9, False), (9, True)]
