"""A new owner's local copy against the changelog on a real node (real LevelDB stores): a
current copy is used as it is (nothing replayed, no rebuild), one that is behind replays only
the records after it, a diverged one (it applied a fenced-off owner's record, or it holds
unpublished commits) is rebuilt; a follower keeps a standby's store equal to the owner's,
through snapshots that delete the chunks it has not read."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from chukcha import App, Client
from chukcha.dedup.index import _VALUE as DEDUP_VALUE
from chukcha.dedup.index import PREFIX as DEDUP
from chukcha.processors.busio import BusIO
from chukcha.processors.changelog import PENDING_PREFIX, Changelog, changelog_category, read_head
from chukcha.processors.engine import OUTBOX_PREFIX, CommitPlan, Engine, skip_key
from chukcha.processors.follower import Follower, local_copy
from chukcha.state.changelog import Head, Record, encode_record
from chukcha.state.leveldb import LevelDBStore
from chukcha.testing import run_node
from tests.integration.cluster_helpers import wait_for

pytestmark = pytest.mark.allow_blocking  # the stores are opened and read inline

APP = "fol"


class Owner:
    """One ownership of partition 0 at ``epoch``: commits through a real :class:`Changelog`
    into its own store and publishes each record (as the checkpoint does)."""

    def __init__(self, store: LevelDBStore, bus: BusIO, epoch: int,
                 snapshot_every: int = 0) -> None:
        self.store = store
        self.changelog = Changelog(APP, 0, bus, epoch=epoch, snapshot_every=snapshot_every)
        self.changelog.load(store)

    def commit(self, puts: dict[bytes, bytes], deletes: tuple[bytes, ...] = ()) -> None:
        plan = CommitPlan(puts, list(deletes), 1)
        extra, done = self.changelog.stage(plan)
        self.store.write({**puts, **extra}, [*deletes, *done], sync=False)
        self.changelog.committed()

    async def publish(self) -> None:
        await self.changelog.publish()


def items(store: LevelDBStore) -> dict[bytes, bytes]:
    return {k: v for k, v in store.scan(b"t/")}


@pytest.fixture
async def bus(tmp_path: Path) -> AsyncIterator[BusIO]:
    async with run_node(tmp_path / "node") as node, Client([node.url]) as client:
        yield BusIO(App(APP, nodes=[node.url]), client, {})


def open_store(tmp_path: Path, name: str) -> LevelDBStore:
    return LevelDBStore(tmp_path / name)


async def test_a_current_local_copy_is_used_as_it_is(tmp_path: Path, bus: BusIO) -> None:
    store = open_store(tmp_path, "a")
    owner = Owner(store, bus, epoch=5)
    for i in range(20):
        owner.commit({f"t/k{i % 7}".encode(): str(i).encode()})
    await owner.publish()
    before = items(store)
    follower = Follower(changelog_category(APP, 0), 0, store, bus)
    assert await follower.catch_up() == 0
    assert follower.rebuilds == 0
    assert follower.head[:2] == (5, 20)
    assert items(store) == before


async def _b_takes_over_at_epoch_9(b: LevelDBStore, bus: BusIO) -> Owner:
    """Another instance (store ``b``) follows the changelog from the bus, then owns it at epoch
    9: five keys rewritten, ``t/k9`` deleted. Returns that owner."""
    b_follower = Follower(changelog_category(APP, 0), 0, b, bus)
    await b_follower.catch_up()
    second = Owner(b, bus, epoch=9)
    for i in range(5):
        second.commit({f"t/k{i}".encode(): b"b"}, (b"t/k9",))
    await second.publish()
    return second


async def test_a_copy_behind_replays_only_the_records_after_it(tmp_path: Path,
                                                               bus: BusIO) -> None:
    a, b = open_store(tmp_path, "a"), open_store(tmp_path, "b")
    first = Owner(a, bus, epoch=5)
    for i in range(10):
        first.commit({f"t/k{i}".encode(): b"a"})
    await first.publish()
    # Another instance takes over at epoch 9 from the bus (a's disk is left as it is).
    await _b_takes_over_at_epoch_9(b, bus)
    # a becomes the owner again: its copy is behind, on the same history.
    follower = Follower(changelog_category(APP, 0), 0, a, bus)
    assert await follower.catch_up() == 5
    assert follower.rebuilds == 0
    assert follower.head[:2] == (9, 15)
    assert items(a) == items(b)
    head = read_head(a)
    assert head is not None and head.seq == 15


async def test_a_diverged_copy_is_rebuilt(tmp_path: Path, bus: BusIO) -> None:
    a, b = open_store(tmp_path, "a"), open_store(tmp_path, "b")
    first = Owner(a, bus, epoch=5)
    for i in range(10):
        first.commit({f"t/k{i}".encode(): b"a"})
    await first.publish()
    follower_b = Follower(changelog_category(APP, 0), 0, b, bus)
    await follower_b.catch_up()
    # a is a zombie: it goes on committing (and publishing) at epoch 5 after b took over at 9.
    second = Owner(b, bus, epoch=9)
    second.commit({b"t/k0": b"b"})
    await second.publish()
    first.commit({b"t/zombie": b"z"})
    first.commit({b"t/zombie2": b"z"})
    await first.publish()
    follower = Follower(changelog_category(APP, 0), 0, a, bus)
    await follower.catch_up()
    assert follower.rebuilds == 1
    assert follower.head[:2] == (9, 11)
    assert items(a) == items(b)
    assert b"t/zombie" not in items(a)


async def test_a_copy_with_unpublished_commits_is_rebuilt(tmp_path: Path, bus: BusIO) -> None:
    a = open_store(tmp_path, "a")
    owner = Owner(a, bus, epoch=5)
    owner.commit({b"t/x": b"1"})
    await owner.publish()
    owner.commit({b"t/x": b"2"})  # committed, killed before it was published
    follower = Follower(changelog_category(APP, 0), 0, a, bus)
    await follower.catch_up()
    assert follower.rebuilds == 1
    assert items(a) == {b"t/x": b"1"}
    assert not local_copy(a).pending
    copy = local_copy(a)
    assert copy.head is not None and copy.head[:2] == (5, 1)


async def test_a_standby_follows_through_snapshots(tmp_path: Path, bus: BusIO) -> None:
    a, s = open_store(tmp_path, "a"), open_store(tmp_path, "s")
    owner = Owner(a, bus, epoch=3, snapshot_every=4)
    follower = Follower(changelog_category(APP, 0), 0, s, bus)
    follow = asyncio.create_task(follower.follow(wait=0.5))
    try:
        for i in range(30):
            owner.commit({f"t/k{i % 5}".encode(): str(i).encode()}, (f"t/k{i % 3}".encode(),))
            await owner.publish()

        async def followed() -> bool:
            return follower.head.seq == 30

        await wait_for(followed, what="the follower at seq 30")
    finally:
        follow.cancel()
        await asyncio.gather(follow, return_exceptions=True)
    assert owner.changelog.snapshots >= 5
    assert items(s) == items(a)
    assert follower.head[:2] == (3, 30)

    # A follower that starts late: the chunks before a newer snapshot are gone.
    late = Follower(changelog_category(APP, 0), 0, open_store(tmp_path, "late"), bus)
    await late.catch_up()
    assert late.head.seq == 30


def engine_state(engine: Engine) -> tuple[object, ...]:
    return (list(engine.dedup._ids.items()), engine.dedup._seq, engine.positions,
            [(e.key, e.category, e.data) for e in engine.outbox],
            engine._outbox_seq, engine._skips)


async def test_a_warm_engine_equals_a_fresh_load(tmp_path: Path, bus: BusIO) -> None:
    """A standby's engine, loaded once and then kept by the records it applies, holds what a
    load of the store would (dedup IDs in order, positions, outbox, skips)."""
    app = App(APP, nodes=bus.nodes)
    a, s = open_store(tmp_path, "a"), open_store(tmp_path, "s")
    owner = Owner(a, bus, epoch=4)
    follower = Follower(changelog_category(APP, 0), 0, s, bus,
                        engine=lambda: Engine(app, s, partition=0))
    follow = asyncio.create_task(follower.follow(wait=0.5))
    try:
        for i in range(12):
            puts = {DEDUP + f"e{i}".encode(): DEDUP_VALUE.pack(i, 1000.0 + i),
                    b"p/orders\x00n" + str(i % 2).encode(): orjson.dumps([f"c{i}", i * 10]),
                    OUTBOX_PREFIX + b"%016x" % i: b"receipts\n{\"id\":\"" + str(i).encode()
                    + b"\"}\n",
                    skip_key("orders", f"c{i}", i): b""}
            deletes: tuple[bytes, ...] = ()
            if i >= 3:  # prune the oldest ID, send an old emit, drop a skip
                deletes = (DEDUP + f"e{i - 3}".encode(), OUTBOX_PREFIX + b"%016x" % (i - 2),
                           skip_key("orders", f"c{i - 1}", i - 1))
            owner.commit(puts, deletes)
            await owner.publish()
            if i == 5:
                async def warm() -> bool:
                    return follower._engine is not None and follower.head.seq == 6

                await wait_for(warm, what="the standby's engine loaded at seq 6")

        async def followed() -> bool:
            return follower.head.seq == 12

        await wait_for(followed, what="the follower at seq 12")
    finally:
        follow.cancel()
        await asyncio.gather(follow, return_exceptions=True)
    engine = follower.take_engine()
    assert engine is not None
    fresh = Engine(app, s, partition=0)
    fresh.load()
    assert engine_state(engine) == engine_state(fresh)
    assert len(fresh.dedup) == 3 and len(fresh.outbox) == 3 and len(fresh.positions["orders"]) == 2


async def test_confirmed_pending_keys_do_not_outlive_a_newer_epoch(tmp_path: Path,
                                                                    bus: BusIO) -> None:
    """A store that followed a newer epoch keeps no ``c/`` key of the older one (a restart of
    the standby, or a new follower over it, uses it as it is), while a pending record that the
    bus does not hold still makes it be rebuilt."""
    a, b = open_store(tmp_path, "a"), open_store(tmp_path, "b")
    first = Owner(a, bus, epoch=5)
    for i in range(10):
        first.commit({f"t/k{i}".encode(): b"a"})
    await first.publish()
    old_pending = dict(a.scan(PENDING_PREFIX))
    second = await _b_takes_over_at_epoch_9(b, bus)
    # a is a standby: its follower brings it current (same process)
    follower = Follower(changelog_category(APP, 0), 0, a, bus)
    assert await follower.catch_up() == 5
    assert follower.rebuilds == 0
    assert local_copy(a).pending == frozenset()
    assert local_copy(a).head == Head(9, 15, (5, 10))
    # a restarts (a new Follower over the same, current, store): nothing new on the bus
    again = Follower(changelog_category(APP, 0), 0, a, bus)
    assert await again.catch_up() == 0
    assert again.rebuilds == 0, "a current copy was rebuilt because of a stale c/ key"
    # A store of the previous release kept those keys: they are on the bus with their own
    # epoch, so they are confirmed (no rebuild) and deleted with the next records applied.
    a.write(old_pending, [], sync=False)
    second.commit({b"t/k0": b"c"})
    await second.publish()
    older = Follower(changelog_category(APP, 0), 0, a, bus)
    assert await older.catch_up() == 1
    assert older.rebuilds == 0
    assert local_copy(a).pending == frozenset()
    # A pending record the bus does not hold (seq 12 of epoch 5: a commit never published,
    # while epoch 9 wrote its own seq 12) still makes the copy be rebuilt.
    zombie = encode_record(Record(0, 5, 12, {b"t/z": b"z"}, []))
    a.write({PENDING_PREFIX + b"%016x" % 12: b"\n".join(zombie)}, [], sync=False)
    last = Follower(changelog_category(APP, 0), 0, a, bus)
    await last.catch_up()
    assert last.rebuilds == 1
    assert items(a) == items(b)
    assert local_copy(a).pending == frozenset()
