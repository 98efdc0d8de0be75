"""The changelog writer's epoch links: a new epoch names the record its store stands at, the
same epoch goes on with the link it started with, a store of the previous release (no head
kept) writes no link, and a restore keeps the head of the last record it applied."""

from __future__ import annotations

from chukcha.processors.changelog import HEAD_KEY, SEQ_KEY, Changelog, read_head
from chukcha.processors.engine import CommitPlan
from chukcha.state.changelog import Assembler, Head, Record, encode_record
from chukcha.state.memory import MemoryStore


class Bus:
    """A changelog category in memory."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []

    async def publish(self, category: str, lines: list[bytes]) -> None:
        self.lines.extend(lines)

    async def read_all(self, category: str) -> list[bytes]:
        return list(self.lines)

    async def complete_chunks(self, category: str) -> list[tuple[str, int]]:
        return []

    async def ack_chunk(self, category: str, chunk: str, size: int, *,
                        fence: tuple[int, int] | None = None) -> None:
        raise AssertionError("not called")

    def records(self) -> list[tuple[int, int, tuple[int, int] | None]]:
        assembler = Assembler()
        for line in self.lines:
            assembler.add(line)
        return sorted((r.epoch, r.seq, r.link) for r in assembler.records())


async def commit(changelog: Changelog, store: MemoryStore, key: bytes) -> None:
    puts = {b"t/" + key: b"1"}
    extra, deletes = changelog.stage(CommitPlan(puts, [], 1))
    store.write({**puts, **extra}, deletes, sync=True)
    changelog.committed()
    await changelog.publish()


async def test_each_epoch_links_to_where_its_store_stood() -> None:
    bus, store = Bus(), MemoryStore()
    first = Changelog("app", 0, bus, epoch=5)
    first.load(store)
    await commit(first, store, b"a")
    await commit(first, store, b"b")
    assert read_head(store) == Head(5, 2, (0, 0))
    again = Changelog("app", 0, bus, epoch=5)  # the same claim after an etcd outage
    again.load(store)
    await commit(again, store, b"c")
    newer = Changelog("app", 0, bus, epoch=9)  # a new claim on the same store
    newer.load(store)
    await commit(newer, store, b"d")
    plain = Changelog("app", 0, bus)  # then without etcd: the store's epoch goes on
    plain.load(store)
    await commit(plain, store, b"e")
    assert bus.records() == [(5, 1, (0, 0)), (5, 2, (0, 0)), (5, 3, (0, 0)), (9, 4, (5, 3)),
                             (9, 5, (5, 3))]


async def test_a_restored_store_links_the_next_epoch_to_the_last_record_applied() -> None:
    bus = Bus()
    for record in (Record(0, 5, 1, {b"t/a": b"1"}, link=(0, 0)),
                   Record(0, 5, 2, {b"t/b": b"1"}, link=(0, 0)),
                   Record(0, 5, 3, {b"t/z": b"1"}, link=(0, 0)),  # late: not built on
                   Record(0, 7, 3, {b"t/c": b"1"}, link=(5, 2))):
        bus.lines.extend(encode_record(record))
    store = MemoryStore()
    owner = Changelog("app", 0, bus, epoch=8)
    await owner.restore_if_empty(store)
    owner.load(store)
    assert sorted(k for k, _ in store.scan(b"t/")) == [b"t/a", b"t/b", b"t/c"]
    assert owner.link == (7, 3)
    await commit(owner, store, b"d")
    assert bus.records()[-1] == (8, 4, (7, 3))


async def test_a_store_of_the_previous_release_writes_no_link() -> None:
    bus, store = Bus(), MemoryStore()
    store.write({SEQ_KEY: b"4", b"t/a": b"1"}, [], sync=True)  # no head kept
    assert HEAD_KEY not in dict(store.scan(b""))
    assert read_head(store) is None
    owner = Changelog("app", 0, bus, epoch=9)
    owner.load(store)
    await commit(owner, store, b"b")
    assert bus.records() == [(9, 5, None)]
