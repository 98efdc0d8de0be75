"""The event-ID index: staging, commit, reload, retention by count and age, idempotence."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chukcha import App, Context
from chukcha.dedup import DedupConfig, DedupIndex
from chukcha.processors import ProcessorConfig
from chukcha.processors.tester import Tester
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
    # More staged in one batch than the limit: all of them are kept (the events they guard are
    # applied in that commit); only the committed ones make room. The next commit prunes.
    for key in ("f", "g", "h", "i"):
        index.add(key)
    commit(index, store)
    assert list(index.committed_ids()) == ["f", "g", "h", "i"]
    assert [k for k, _ in store.scan(b"d/")] == [b"d/f", b"d/g", b"d/h", b"d/i"]
    commit(index, store)
    assert list(index.committed_ids()) == ["g", "h", "i"]


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


def test_age_first_then_count_and_young_ids_pruned_by_count_are_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    store = MemoryStore()
    index = DedupIndex(DedupConfig(max_count=3, max_age=1000.0, min_age=100.0), clock=clock)

    def at(now: float, *keys: str) -> None:
        clock.now = now
        for key in keys:
            index.add(key)
        commit(index, store)

    at(0, "a")
    at(500, "b", "c")
    at(1100, "d", "e")  # "a" goes by age (1100 s old), "b" by count (600 s old: not young)
    at(1150, "f")  # "c" by count, 650 s old
    assert list(index.committed_ids()) == ["d", "e", "f"]
    assert (index.pruned_by_age, index.pruned_by_count, index.pruned_young) == (1, 2, 0)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    with caplog.at_level("WARNING", logger="chukcha.dedup.index"):
        at(1160, "g", "h")  # the count limit forces out "d" and "e", only 60 s old
    assert list(index.committed_ids()) == ["f", "g", "h"]
    assert index.pruned_young == 2
    (warning,) = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "pruned 2 IDs younger than min_age=100s" in warning.getMessage()
    assert "the youngest 60s old" in warning.getMessage()


def test_an_app_batch_larger_than_max_count_is_deduplicated_exactly() -> None:
    """Every ID of a batch is written even when the batch alone exceeds max_count, so a
    redelivery of that batch is skipped entirely."""
    app = App("big", nodes=["http://127.0.0.1:1"],
              config=ProcessorConfig(dedup=DedupConfig(max_count=2)))

    @app.processor("adds")
    def on_add(ctx: Context, event: dict[str, Any]) -> None:
        ctx.set("n", ctx.get("n", 0) + 1)

    t = Tester(app)
    events = [{"id": f"e{i}"} for i in range(3)]
    t.feed("adds", *events)
    t.feed("adds", *events)  # redelivered
    assert t.table == {"n": 3}
    assert t.stats["duplicates"] == 3


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="max_count"):
        DedupConfig(max_count=0)
    with pytest.raises(ValueError, match="max_age"):
        DedupConfig(max_age=-1)
    with pytest.raises(ValueError, match="min_age"):
        DedupConfig(min_age=-1)


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
