"""The processor API through the in-process tester (the same Engine as the real runner)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from chukcha import App, Context
from chukcha.errors import ProcessorError
from chukcha.processors import ProcessorConfig
from chukcha.processors.tester import Tester


def billing(on_error: str = "stop") -> App:
    app = App("billing", nodes=["http://127.0.0.1:1"], on_error=on_error)

    @app.processor("orders")
    def on_order(ctx: Context, order: dict[str, Any]) -> None:
        if order.get("explode"):
            ctx.set(order["customer"], -1)  # staged, must not survive the failure
            raise RuntimeError("boom")
        spent = ctx.get(order["customer"], 0) + order["amount"]
        ctx.set(order["customer"], spent)
        ctx.emit("receipts", {"customer": order["customer"], "spent": spent})

    @app.processor("refunds")
    async def on_refund(ctx: Context, refund: dict[str, Any]) -> None:
        await asyncio.sleep(0)  # a real await inside an async callback
        left = ctx.get(refund["customer"], 0) - refund["amount"]
        if left <= 0:
            ctx.delete(refund["customer"])
        else:
            ctx.set(refund["customer"], left)

    return app


async def test_state_emits_and_duplicates() -> None:
    t = Tester(billing())
    await t.feed_async("orders", {"id": "o1", "customer": "ann", "amount": 30},
                       {"id": "o2", "customer": "bob", "amount": 5},
                       {"id": "o1", "customer": "ann", "amount": 30})  # dup inside the batch
    await t.feed_async("orders", {"id": "o2", "customer": "bob", "amount": 5},  # dup, later
                       {"id": "o3", "customer": "ann", "amount": 12})
    assert t.table == {"ann": 42, "bob": 5}
    assert t.emitted("receipts") == [
        {"customer": "ann", "spent": 30, "id": "o1/0"},
        {"customer": "bob", "spent": 5, "id": "o2/0"},
        {"customer": "ann", "spent": 42, "id": "o3/0"},
    ]
    assert t.stats == {"applied": 3, "duplicates": 2, "dead_lettered": 0, "undecodable": 0,
                       "timers_run": 0, "timer_failures": 0, "dedup_pruned_young": 0}


async def test_categories_share_state_async_callback_and_delete() -> None:
    t = Tester(billing())
    await t.feed_async("orders", {"id": "o1", "customer": "ann", "amount": 30},
                       {"id": "o2", "customer": "bob", "amount": 5})
    await t.feed_async("refunds", {"id": "r1", "customer": "ann", "amount": 10},
                       {"id": "r2", "customer": "bob", "amount": 5})
    assert t.table == {"ann": 20}


def test_sync_feed() -> None:
    t = Tester(billing())
    t.feed("orders", {"id": "o1", "customer": "ann", "amount": 1})
    t.feed("orders", {"id": "o1", "customer": "ann", "amount": 1})
    assert t.get("ann") == 1


async def test_sync_feed_inside_a_loop_is_a_clear_error() -> None:
    t = Tester(billing())
    with pytest.raises(RuntimeError, match="feed_async"):
        t.feed("orders", {"id": "o1", "customer": "ann", "amount": 1})
    assert t.table == {}


async def test_stop_policy_commits_nothing_of_the_batch() -> None:
    t = Tester(billing("stop"))
    await t.feed_async("orders", {"id": "o0", "customer": "zed", "amount": 1})
    with pytest.raises(ProcessorError, match=r"'o2'.*boom.*nothing of this batch"):
        await t.feed_async("orders", {"id": "o1", "customer": "ann", "amount": 30},
                           {"id": "o2", "customer": "ann", "explode": True})
    assert t.table == {"zed": 1}
    assert [e["id"] for e in t.emitted("receipts")] == ["o0/0"]
    # The batch was not recorded as applied: once the input is fixed it is processed.
    await t.feed_async("orders", {"id": "o1", "customer": "ann", "amount": 30})
    assert t.table == {"zed": 1, "ann": 30}


async def test_dead_letter_policy_drops_the_event_and_continues() -> None:
    t = Tester(billing("dead_letter"))
    await t.feed_async("orders", {"id": "o1", "customer": "ann", "amount": 30},
                       {"id": "o2", "customer": "ann", "explode": True},
                       {"id": "o3", "customer": "ann", "amount": 1})
    assert t.table == {"ann": 31}
    (dead,) = t.dead_letters("orders")
    assert dead["id"] == "o2/dead"
    assert "boom" in dead["error"]
    assert dead["event"] == '{"id":"o2","customer":"ann","explode":true}'
    assert dead["chunk"] == "tester-chunk000000000"
    # A duplicate of the failed event is not dead-lettered twice.
    await t.feed_async("orders", {"id": "o2", "customer": "ann", "explode": True})
    assert len(t.dead_letters("orders")) == 1


async def test_invalid_json_is_dead_lettered_even_under_stop() -> None:
    t = Tester(billing("stop"))
    await t.feed_async("orders", b"{not json", {"id": "o1", "customer": "ann", "amount": 2})
    assert t.table == {"ann": 2}
    (dead,) = t.dead_letters("orders")
    assert dead["event"] == "{not json"
    assert dead["id"] == "orders:tester-chunk000000000:0/dead"
    assert "invalid JSON" in dead["error"]


async def test_event_without_id_gets_a_position_id_and_context_fields() -> None:
    app = App("ctx", nodes=["http://127.0.0.1:1"])
    seen: list[tuple[str, str, int, str]] = []

    @app.processor("things")
    def on_thing(ctx: Context, thing: Any) -> None:
        pos = ctx.position
        seen.append((ctx.event_id, pos.chunk, pos.offset, pos.owner))
        ctx.set("count", ctx.table.get("count", 0) + 1)
        assert ("count" in ctx.table) is True
        assert ctx.table["count"] == ctx.get("count")

    t = Tester(app)
    await t.feed_async("things", {"x": 1}, b"7", {"id": 5})
    await t.feed_async("things", {"x": 1})  # no id: a new position, so a new event
    c = "tester-chunk000000000"
    assert seen == [(f"things:{c}:0", c, 0, "tester"), (f"things:{c}:8", c, 8, "tester"),
                    ("5", c, 10, "tester"), (f"things:{c}:19", c, 19, "tester")]
    assert t.table == {"count": 4}


async def test_custom_event_id_function() -> None:
    app = App("custom", nodes=["http://127.0.0.1:1"], event_id=lambda e: e["key"])

    @app.processor("things")
    def on_thing(ctx: Context, thing: dict[str, Any]) -> None:
        ctx.set("n", ctx.get("n", 0) + 1)

    t = Tester(app)
    await t.feed_async("things", {"key": "a", "id": "1"}, {"key": "a", "id": "2"},
                       {"key": "b", "id": "1"})
    assert t.table == {"n": 2}

    numbered = App("numbered", nodes=["http://127.0.0.1:1"], event_id=lambda e: e["n"])
    numbered.processor("things")(on_thing)
    t = Tester(numbered)
    await t.feed_async("things", {"n": 1}, {"n": 1}, {"n": 2})  # an int key works too
    assert t.table == {"n": 2}


class ListSink:
    def __init__(self) -> None:
        self.rows: list[Any] = []

    async def flush(self, rows: Sequence[Any]) -> None:
        self.rows.extend(rows)


async def test_sink_rows_only_for_applied_events() -> None:
    app = App("sinks", nodes=["http://127.0.0.1:1"], on_error="dead_letter")
    sink = app.add_sink("rows", ListSink())

    @app.processor("orders")
    def on_order(ctx: Context, order: dict[str, Any]) -> None:
        ctx.to_sink("rows", {"id": ctx.event_id, "amount": order["amount"]})
        if order["amount"] < 0:
            raise ValueError("negative amount")

    t = Tester(app)
    await t.feed_async("orders", {"id": "a", "amount": 1}, {"id": "a", "amount": 1},
                       {"id": "b", "amount": -1}, {"id": "c", "amount": 3})
    assert t.sink_rows("rows") == [{"id": "a", "amount": 1}, {"id": "c", "amount": 3}]
    assert sink.rows == []  # the tester collects rows; it does not call sinks
    with pytest.raises(ValueError, match="already registered"):
        app.add_sink("rows", ListSink())


async def test_bad_emits_and_keys_follow_the_error_policy() -> None:
    app = App("bad", nodes=["http://127.0.0.1:1"], on_error="dead_letter")

    @app.processor("in")
    def on_in(ctx: Context, event: dict[str, Any]) -> None:
        kind = event["kind"]
        if kind == "category":
            ctx.emit("../etc", {"x": 1})
        elif kind == "value":
            ctx.set("k", {1, 2})  # not JSON
        elif kind == "key":
            ctx.set(7, 1)  # type: ignore[arg-type]
        elif kind == "sink":
            ctx.to_sink("nope", 1)
        else:
            ctx.emit("out", {"kind": kind})

    t = Tester(app)
    await t.feed_async("in", *({"id": k, "kind": k} for k in
                               ("category", "value", "key", "sink", "fine")))
    errors = [d["error"] for d in t.dead_letters("in")]
    assert len(errors) == 4
    assert "category" in errors[0] and "TypeError" in errors[1]
    assert "table keys are strings" in errors[2] and "no sink named" in errors[3]
    assert t.emitted("out") == [{"kind": "fine", "id": "fine/0"}]
    assert t.table == {}


def test_app_validation() -> None:
    app = App("v", nodes=["127.0.0.1:8080"])
    assert app.nodes == ("http://127.0.0.1:8080",)
    with pytest.raises(ValueError, match="category"):
        app.processor("a/b")

    @app.processor("x")
    def on_x(ctx: Context, event: Any) -> None: ...

    with pytest.raises(ValueError, match="already has a processor"):
        app.processor("x")(on_x)
    with pytest.raises(ValueError, match="at least one node"):
        App("v", nodes=[])
    with pytest.raises(ValueError, match="not a valid ErrorPolicy"):
        App("v", on_error="ignore")
    with pytest.raises(ValueError, match="max_batch_bytes"):
        ProcessorConfig(max_batch_bytes=0)
    with pytest.raises(TypeError, match="flush"):
        app.add_sink("s", object())  # type: ignore[type-var]


async def test_events_without_ids_in_two_categories_emit_distinct_ids() -> None:
    """Chunk names repeat across categories: position-derived IDs (and the emit IDs derived from
    them) include the category, so downstream dedup does not drop one of them."""
    app = App("two", nodes=["http://127.0.0.1:1"])

    def forward(ctx: Context, event: Any) -> None:
        ctx.emit("out", {"from": ctx.category})

    app.processor("a")(forward)
    app.processor("b")(forward)
    t = Tester(app)
    await t.feed_async("a", {"x": 1})
    await t.feed_async("b", {"x": 1})  # same chunk name and offset in another category
    ids = [e["id"] for e in t.emitted("out")]
    assert len(set(ids)) == 2
    assert [e["from"] for e in t.emitted("out")] == ["a", "b"]
