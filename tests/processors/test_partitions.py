"""Keys and partitions: the documented hash (same in a fresh process), the partition of each
event, per-partition state in the tester, bad keys under both error policies, bad counts, and
the state directory layout (new, legacy, another count)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chukcha import App, Context
from chukcha.errors import ProcessorError, StateLayoutError
from chukcha.partitioning import (
    parse_partition_category,
    partition_category,
    partition_of,
)
from chukcha.processors.engine import read_state_table
from chukcha.processors.tester import Tester
from chukcha.state import LevelDBStore
from chukcha.state.partitions import open_partition_stores

# (key, digest of blake2b with an 8-byte digest, partition of 8, partition of 1024): the
# documented function, so that another language can check its implementation against these.
VECTORS = [
    ("", "e4a6a0577479b2b4", 4, 692),
    ("ann", "8d3adf6abf23f3a5", 5, 933),
    ("customer-42", "33e0fb1ab541cc2a", 2, 42),
    (42, "57b43cf02666687a", 2, 122),
    ("\u00e9", "cb1abf8beff3192f", 7, 303),
]


@pytest.mark.parametrize(("key", "digest", "p8", "p1024"), VECTORS)
def test_documented_vectors(key: str | int, digest: str, p8: int, p1024: int) -> None:
    assert int(digest, 16) % 8 == p8  # the vectors agree with the formula
    assert partition_of(key, 8) == p8
    assert partition_of(key, 1024) == p1024
    assert partition_of(key, 1) == 0


@settings(max_examples=1, deadline=None)
@given(keys=st.lists(st.one_of(st.text(max_size=30), st.integers(-(10**20), 10**20)),
                     min_size=200, max_size=200),
       counts=st.lists(st.integers(1, 1024), min_size=200, max_size=200))
@pytest.mark.allow_blocking  # one subprocess
def test_partition_is_the_same_in_a_fresh_process(keys: list[str | int],
                                                  counts: list[int]) -> None:
    """A fresh interpreter with another PYTHONHASHSEED computes the same partitions (no
    salted hash anywhere)."""
    here = [partition_of(k, n) for k, n in zip(keys, counts, strict=True)]
    code = ("import json,sys; from chukcha.partitioning import partition_of; "
            "d=json.load(sys.stdin); print(json.dumps([partition_of(k, n) for k, n in d]))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    pairs = list(zip(keys, counts, strict=True))
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(pairs),
                         capture_output=True, text=True, check=True, env=env, timeout=60)
    assert json.loads(out.stdout) == here
    assert all(0 <= p < n for p, n in zip(here, counts, strict=True))


def test_partition_category_names() -> None:
    assert partition_category("orders", 3) == "orders.p0003"
    assert partition_category("orders", 1023) == "orders.p1023"
    assert parse_partition_category("orders.p0003") == ("orders", 3)
    assert parse_partition_category("orders.dead") is None
    with pytest.raises(ValueError, match="outside"):
        partition_category("orders", 1024)


@pytest.mark.parametrize("bad", [0, -1, 1025, 2.0, "8", True])
def test_partitions_outside_the_range_are_refused(bad: Any) -> None:
    with pytest.raises(ValueError, match="from 1 to 1024"):
        App("billing", partitions=bad)


def keyed_app(partitions: int, on_error: str = "stop") -> App:
    app = App("billing", partitions=partitions, on_error=on_error)

    @app.processor("orders", key=lambda order: order["customer"])
    def on_order(ctx: Context, order: dict[str, Any]) -> None:
        assert ctx.key == order["customer"]
        assert ctx.partition == partition_of(ctx.key, partitions)
        ctx.set(ctx.key, ctx.get(ctx.key, 0) + order["amount"])
        ctx.emit("receipts", {"customer": ctx.key, "partition": ctx.partition})

    return app


def orders(n: int) -> list[dict[str, Any]]:
    return [{"id": f"o{i}", "customer": f"c{i % 13}", "amount": i % 7 + 1} for i in range(n)]


def test_tester_with_partitions_equals_one_partition() -> None:
    events = orders(300)
    one, eight = Tester(keyed_app(1)), Tester(keyed_app(8))
    for t in (one, eight):
        for i in range(0, 300, 37):
            t.feed("orders", *events[i:i + 37])
        t.feed("orders", *events[:50])  # duplicates: skipped in their partition
    assert eight.table == one.table
    assert eight.stats["applied"] == one.stats["applied"] == 300
    assert eight.stats["duplicates"] == 50
    # Each key lives in the partition of its hash, and only there.
    for p, table in enumerate(eight.partition_tables()):
        assert all(partition_of(k, 8) == p for k in table)
    assert sum(1 for t in eight.partition_tables() if t) > 1
    assert [e["id"] for e in eight.emitted("receipts")] != []
    assert sorted(e["id"] for e in eight.emitted("receipts")) == \
        sorted(e["id"] for e in one.emitted("receipts"))


def test_default_key_is_the_event_id() -> None:
    app = App("ids", partitions=4)

    @app.processor("c")
    def on_event(ctx: Context, event: dict[str, Any]) -> None:
        ctx.set(ctx.event_id, [ctx.key, ctx.partition])

    t = Tester(app)
    t.feed("c", *({"id": f"e{i}"} for i in range(20)))
    assert t.table == {f"e{i}": [f"e{i}", partition_of(f"e{i}", 4)] for i in range(20)}


@pytest.mark.parametrize("key_fn", [lambda e: e["missing"], lambda e: 1.5, lambda e: None,
                                    lambda e: True])
def test_a_bad_key_stops_the_app_and_commits_nothing(key_fn: Any) -> None:
    app = App("bad", partitions=4)

    @app.processor("c", key=key_fn)
    def on_event(ctx: Context, event: dict[str, Any]) -> None:
        ctx.set("seen", 1)

    t = Tester(app)
    with pytest.raises(ProcessorError, match="nothing of this batch was committed"):
        t.feed("c", {"id": "e1"}, {"id": "e2"})
    assert t.table == {}
    assert t.stats["applied"] == 0


def test_a_bad_key_is_dead_lettered_once_under_that_policy() -> None:
    app = App("bad", partitions=4, on_error="dead_letter")

    @app.processor("c", key=lambda e: e["k"])
    def on_event(ctx: Context, event: dict[str, Any]) -> None:
        ctx.set(ctx.key, event["v"])

    t = Tester(app)
    t.feed("c", {"id": "e1", "k": "a", "v": 1}, {"id": "e2", "v": 2}, {"id": "e3", "k": 3.5})
    t.feed("c", {"id": "e2", "v": 2})  # a copy of a dead-lettered event: not again
    assert t.table == {"a": 1}
    dead = t.dead_letters("c")
    assert [d["id"] for d in dead] == ["e2/dead", "e3/dead"]
    assert "KeyError" in dead[0]["error"]
    assert "a key is a string or an integer" in dead[1]["error"]


def test_a_key_that_is_not_a_function_is_refused() -> None:
    app = App("x")
    with pytest.raises(TypeError, match="function of the event"):
        app.processor("c", key="customer")  # type: ignore[arg-type]


def test_state_dir_layout_and_partition_count_change_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    stores = open_partition_stores(state, 4)
    stores[2].write({b"t/k": orjson.dumps(5)})
    for s in stores:
        s.close()
    assert sorted(p.name for p in state.iterdir()) == ["PARTITIONS", "p0000", "p0001", "p0002",
                                                       "p0003"]
    assert json.loads((state / "PARTITIONS").read_text()) == {"partitions": 4,
                                                               "hash": "blake2b-64"}
    before = sorted(str(p) for p in state.rglob("*"))
    with pytest.raises(StateLayoutError, match=r"holds 4 partition\(s\) and the app asks for 8"):
        open_partition_stores(state, 8)
    assert sorted(str(p) for p in state.rglob("*")) == before  # nothing changed
    assert read_state_table(state) == {"k": 5}


def test_a_state_written_before_partitions_opens_as_one_partition(tmp_path: Path) -> None:
    legacy = tmp_path / "state"
    store = LevelDBStore(legacy)  # what the previous release wrote: a LevelDB at the root
    store.write({b"t/ann": orjson.dumps(30), b"p/orders\x00n1": orjson.dumps(["n1-chunk0", 9])})
    store.close()
    app = App("billing", state_dir=legacy)
    stores = open_partition_stores(app.state_dir, app.partitions)
    try:
        assert [s.path for s in stores] == [legacy]
        assert stores[0].get(b"t/ann") == b"30"
    finally:
        stores[0].close()
    assert not (legacy / "PARTITIONS").exists()
    with pytest.raises(StateLayoutError, match="written before partitions existed"):
        open_partition_stores(legacy, 8)
    assert read_state_table(legacy) == {"ann": 30}


def test_a_directory_that_holds_something_else_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(StateLayoutError, match="holds no app state"):
        open_partition_stores(tmp_path, 2)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_an_integer_key_is_its_decimal_string() -> None:
    app = App("ints", partitions=8)

    @app.processor("c", key=lambda e: e["n"])
    def on_event(ctx: Context, event: dict[str, Any]) -> None:
        ctx.set(ctx.key, ctx.partition)

    t = Tester(app)
    t.feed("c", {"id": "a", "n": 42}, {"id": "b", "n": "7"})
    assert t.table == {"42": partition_of(42, 8), "7": partition_of("7", 8)}
    assert partition_of(42, 8) == partition_of("42", 8)
