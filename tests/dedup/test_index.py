"""The event-ID index: staging, commit, reload, retention by count and age, idempotence."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chukcha.dedup import DedupConfig, DedupIndex
from chukcha.state import LevelDBStore, MemoryStore


def commit(index: DedupIndex, store: MemoryStore | LevelDBStore) -> None:
    puts: dict[bytes, bytes] = {}
    deletes: list[bytes] = []
    plan = index.stage(puts, deletes)
    store.write(puts, deletes)
    index.committed(plan)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_seen_add_commit_reload(tmp_path: Path) -> None:
    store = LevelDBStore(tmp_path / "st")
    try:
        index = DedupIndex()
        index.load(store)
        assert not index.seen("a")
        index.add("a")
        assert index.seen("a")  # staged IDs count (a duplicate inside one batch)
        commit(index, store)
        assert index.seen("a") and len(index) == 1
        index.add("b")
        index.discard()  # its batch failed: forgotten
        assert not index.seen("b")
    finally:
        store.close()
    store = LevelDBStore(tmp_path / "st")
    try:
        again = DedupIndex()
        again.load(store)
        assert again.seen("a") and not again.seen("b")
        assert list(again.committed_ids()) == ["a"]
    finally:
        store.close()


def test_retention_by_count_prunes_oldest_on_disk_too() -> None:
    store = MemoryStore()
    index = DedupIndex(DedupConfig(max_count=3))
    for batch in (["a", "b"], ["c"], ["d", "e"]):
        for key in batch:
            index.add(key)
        commit(index, store)
    assert list(index.committed_ids()) == ["c", "d", "e"]
    assert [k for k, _ in store.scan(b"d/")] == [b"d/c", b"d/d", b"d/e"]
    reloaded = DedupIndex(DedupConfig(max_count=3))
    reloaded.load(store)
    assert list(reloaded.committed_ids()) == ["c", "d", "e"]
    # More staged in one batch than the limit: the oldest staged go at once.
    for key in ("f", "g", "h", "i"):
        index.add(key)
    commit(index, store)
    assert list(index.committed_ids()) == ["g", "h", "i"]
    assert [k for k, _ in store.scan(b"d/")] == [b"d/g", b"d/h", b"d/i"]


def test_retention_by_age() -> None:
    clock = Clock()
    store = MemoryStore()
    index = DedupIndex(DedupConfig(max_age=60.0), clock=clock)
    index.add("old")
    commit(index, store)
    clock.now += 30
    index.add("mid")
    commit(index, store)
    clock.now += 31  # "old" is 61 s old now, "mid" 31 s
    index.add("new")
    commit(index, store)
    assert list(index.committed_ids()) == ["mid", "new"]
    assert store.get(b"d/old") is None
    clock.now += 100  # everything old: pruned at the next commit even with nothing added
    commit(index, store)
    assert len(index) == 0
    assert list(store.scan(b"d/")) == []


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="max_count"):
        DedupConfig(max_count=0)
    with pytest.raises(ValueError, match="max_age"):
        DedupConfig(max_age=-1)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.sampled_from("abcdefghij"), max_size=8), max_size=10))
def test_applying_batches_is_idempotent(batches: list[list[str]]) -> None:
    """Feeding any sequence of batches (with repeats inside and across batches), each ID is
    applied exactly once, and a reloaded index agrees with the live one."""
    store = MemoryStore()
    index = DedupIndex()
    applied: list[str] = []
    for batch in batches:
        for key in batch:
            if not index.seen(key):
                index.add(key)
                applied.append(key)
        commit(index, store)
    assert sorted(applied) == sorted({k for b in batches for k in b})
    reloaded = DedupIndex()
    reloaded.load(store)
    assert list(reloaded.committed_ids()) == list(index.committed_ids()) == applied
