"""Changelog records: round trip through lines of bounded length, in any order and with
duplicates; the replay order (by seq, contiguous, newest epoch); the epoch links that keep a
former owner's late records out (simulated histories of several owners, zombies and snapshots,
their records arriving in any order, with duplicates, as read from several nodes)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chukcha.state.changelog import (
    Assembler,
    Head,
    Record,
    encode_record,
    plan_replay,
    replay_order,
)

keys = st.binary(min_size=1, max_size=40)
records = st.builds(
    Record,
    partition=st.integers(0, 1023),
    epoch=st.integers(0, 2**40),
    seq=st.integers(1, 2**40),
    puts=st.dictionaries(keys, st.binary(max_size=5000), max_size=20),
    deletes=st.lists(keys, max_size=20),
    link=st.none() | st.tuples(st.integers(0, 2**40), st.integers(0, 2**40)),
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


# --- epoch links --------------------------------------------------------------------------


def lrec(epoch: int, seq: int, link: tuple[int, int], *, base: bool = False,
         puts: dict[bytes, bytes] | None = None) -> Record:
    return Record(0, epoch, seq, {b"at": b"%d:%d" % (epoch, seq)} if puts is None else puts,
                  base=base, link=link)


def test_a_link_round_trips_and_a_record_without_one_still_decodes() -> None:
    assembler = Assembler()
    linked = lrec(9, 13, (5, 12))
    for line in encode_record(linked, max_line=1024) + encode_record(rec(3, 2)):
        assembler.add(line)
    assert sorted(assembler.records(), key=lambda r: r.seq) == [rec(3, 2), linked]
    assert b'"l"' not in encode_record(rec(3, 2))[0]  # the previous release's format


def test_a_zombies_records_after_the_link_are_ignored_even_a_later_snapshot() -> None:
    # Epoch 5 wrote 1..3; epoch 7 took over having seen 1..2 (3 came late), wrote 3..4; the
    # paused epoch-5 owner then wrote 4..6 and a snapshot at 6.
    z = [lrec(5, s, (0, 0)) for s in (1, 2, 3, 4, 5, 6)] + [lrec(5, 6, (0, 0), base=True)]
    n = [lrec(7, 3, (5, 2)), lrec(7, 4, (5, 2))]
    got = plan_replay(z + n)
    assert [(r.epoch, r.seq, r.base) for r in got.records] == [
        (5, 1, False), (5, 2, False), (7, 3, False), (7, 4, False)]
    assert not got.diverged
    # The old rules (no links) took the zombie's snapshot.
    legacy = [Record(0, r.epoch, r.seq, r.puts, base=r.base) for r in z + n]
    assert [(r.epoch, r.seq) for r in plan_replay(legacy).records] == [(5, 6)]


def test_an_epoch_that_a_newer_link_skipped_is_off_the_chain() -> None:
    # 7 built on 5's seq 2 and wrote 3; 9 never saw 7's record, built on 5's seq 2 too.
    records = [lrec(5, 1, (0, 0)), lrec(5, 2, (0, 0)), lrec(7, 3, (5, 2)), lrec(9, 3, (5, 2)),
               lrec(9, 4, (5, 2))]
    assert [(r.epoch, r.seq) for r in plan_replay(records).records] == [
        (5, 1), (5, 2), (9, 3), (9, 4)]
    # 9 built on 7's seq 3 instead: 7 is on the chain.
    records = [lrec(5, 1, (0, 0)), lrec(5, 2, (0, 0)), lrec(5, 3, (0, 0)),
               lrec(7, 3, (5, 2)), lrec(9, 4, (7, 3))]
    assert [(r.epoch, r.seq) for r in plan_replay(records).records] == [
        (5, 1), (5, 2), (7, 3), (9, 4)]


def test_a_missing_record_of_the_linked_epoch_ends_the_replay() -> None:
    # 7 built on 5's seq 2, but only 5's seq 1 and a newer epoch's seq 2 (3, not linked) came.
    records = [lrec(5, 1, (0, 0)), lrec(3, 2, (0, 0)), lrec(7, 3, (5, 2))]
    assert [(r.epoch, r.seq) for r in plan_replay(records).records] == [(5, 1)]


def test_a_reader_that_applied_a_zombies_record_is_told_to_start_over() -> None:
    records = [lrec(5, 1, (0, 0)), lrec(5, 2, (0, 0)), lrec(5, 3, (0, 0))]
    assert [r.seq for r in plan_replay(records, Head(5, 2, (0, 0))).records] == [3]
    late = [*records, lrec(7, 3, (5, 2)), lrec(7, 4, (5, 2))]  # 7 never saw 5's seq 3
    assert plan_replay(late, Head(5, 3, (0, 0))).diverged
    assert plan_replay(late, Head(5, 2, (0, 0))).records == late[3:]
    # A reader that only knows its seq and epoch (no link) is placed by the newer link too.
    assert plan_replay(late[3:], Head(5, 3)).diverged
    assert not plan_replay(late[3:], Head(7, 4, (5, 2))).diverged


def test_records_without_links_replay_by_the_previous_rules_and_a_new_epoch_links_to_them() -> None:
    old = [rec(1, 4), rec(2, 4), rec(3, 4), rec(3, 2)]
    assert [(r.epoch, r.seq) for r in plan_replay(old).records] == [(4, 1), (4, 2), (4, 3)]
    new = [*old, lrec(6, 4, (4, 3)), rec(4, 4)]  # the old owner's seq 4: after 6's link
    assert [(r.epoch, r.seq) for r in plan_replay(new).records] == [
        (4, 1), (4, 2), (4, 3), (6, 4)]


class _Writer:
    """One owner's view of the partition's chain, as the records it builds on."""

    def __init__(self, epoch: int, chain: list[Record]) -> None:
        self.epoch = epoch
        self.chain = list(chain)
        last = chain[-1] if chain else None
        self.link = (last.epoch, last.seq) if last is not None else (0, 0)

    def write(self, rng: random.Random, out: list[Record]) -> None:
        seq = len(self.chain) + 1
        record = lrec(self.epoch, seq, self.link, puts={b"at": b"%d:%d" % (self.epoch, seq),
                                                       b"r%d" % seq: b"%d" % self.epoch})
        self.chain.append(record)
        out.append(record)
        if rng.random() < 0.2:  # a snapshot of this owner's state right after the record
            out.append(lrec(self.epoch, seq, self.link, base=True, puts=state_of(self.chain)))


def state_of(chain: list[Record]) -> dict[bytes, bytes]:
    state: dict[bytes, bytes] = {}
    for r in chain:
        state.update(r.puts)
    return state


def history(rng: random.Random) -> tuple[list[Record], list[Record]]:
    """Every record a run of several owners wrote (zombies included), and the true chain."""
    out: list[Record] = []
    writers: list[_Writer] = []
    epoch = 0
    rounds = rng.randint(1, 5)
    for round_ in range(rounds):
        epoch += rng.randint(1, 3)
        if writers:
            prev = writers[-1]
            # The new owner saw the previous one's records, maybe not the last few (they
            # reach the bus late); the previous owner may go on as a zombie.
            seen = prev.chain[:rng.randint(max(0, len(prev.chain) - 3), len(prev.chain))]
            for _ in range(rng.randint(0, 4)):
                prev.write(rng, out)
            writer = _Writer(epoch, seen)
        else:
            writer = _Writer(epoch, [])
        # 0: claimed, then died before writing (the last owner writes: a reader cannot know
        # of an owner that wrote nothing).
        for _ in range(rng.randint(0 if round_ < rounds - 1 else 1, 6)):
            writer.write(rng, out)
        writers.append(writer)
    return out, writers[-1].chain


def arrival(rng: random.Random, records: list[Record]) -> list[Record]:
    """The records as read from several nodes: any order, some twice."""
    got = records + rng.sample(records, k=len(records) // 3)
    rng.shuffle(got)
    return got


def apply(state: dict[bytes, bytes], records: list[Record]) -> None:
    for r in records:
        if r.base:
            state.clear()
        state.update(r.puts)


@pytest.mark.parametrize("seed", range(300))
def test_a_restore_rebuilds_the_last_owners_state_whatever_the_zombies_wrote(seed: int) -> None:
    rng = random.Random(seed)  # noqa: S311 - a reproducible history
    records, chain = history(rng)
    state: dict[bytes, bytes] = {}
    replay = plan_replay(arrival(rng, records))
    apply(state, replay.records)
    assert state == state_of(chain)
    assert not replay.diverged


@pytest.mark.parametrize("seed", range(300))
def test_a_follower_that_sees_records_one_by_one_ends_on_the_last_owners_state(
    seed: int
) -> None:
    rng = random.Random(seed)  # noqa: S311 - a reproducible history
    records, chain = history(rng)
    arrived: list[Record] = []
    state: dict[bytes, bytes] = {}
    head: Head | None = None
    for record in arrival(rng, records):
        arrived.append(record)
        replay = plan_replay(arrived, head)
        if replay.diverged:  # start over from every record that came
            state.clear()
            head = None
            replay = plan_replay(arrived)
        apply(state, replay.records)
        if replay.records:
            head = replay.records[-1].head
    assert state == state_of(chain)
