"""Emits given as bytes: a JSON object without an ``id`` gets the derived ``"<input id>/<n>"``
(so a resend is a duplicate downstream); bytes that are not a JSON object are refused."""

from __future__ import annotations

from typing import Any

from chukcha import App, Context
from chukcha.processors.tester import Tester

OBJECTS = (b'{"x":1}', b" { } ", b'{"id":null,"y":2}', b'{"id":"own","z":3}', b'{"id":7}')


def forwarder() -> App:
    app = App("fwd", nodes=["http://127.0.0.1:1"], on_error="dead_letter")

    @app.processor("in")
    def on_in(ctx: Context, event: dict[str, Any]) -> None:
        ids = [ctx.emit("out", line) for line in OBJECTS[: event.get("n", len(OBJECTS))]]
        ctx.set(ctx.event_id, ids)
        if "raw" in event:
            ctx.emit("out", event["raw"].encode())

    return app


def counter() -> App:
    app = App("count", nodes=["http://127.0.0.1:1"])

    @app.processor("out")
    def on_out(ctx: Context, event: dict[str, Any]) -> None:
        ctx.set("n", ctx.get("n", 0) + 1)

    return app


async def test_bytes_objects_without_an_id_get_the_derived_id() -> None:
    t = Tester(forwarder())
    await t.feed_async("in", {"id": "e1"})
    assert t.emitted("out") == [
        {"id": "e1/0", "x": 1},
        {"id": "e1/1"},
        {"id": "e1/2", "y": 2},
        {"id": "own", "z": 3},
        {"id": 7},
    ]
    assert t.table == {"e1": ["e1/0", "e1/1", "e1/2", "own", "7"]}

    # A resend of the same input's emits (as after a crash before the outbox was cleared) is
    # deduplicated by the next processor: the IDs are the same, the positions are not.
    again = Tester(forwarder())
    await again.feed_async("in", {"id": "e1"})
    downstream = Tester(counter())
    await downstream.feed_async("out", *t.emitted("out"))
    await downstream.feed_async("out", *again.emitted("out"))
    assert downstream.table == {"n": 5}


async def test_bytes_that_are_not_a_json_object_are_refused() -> None:
    t = Tester(forwarder())
    await t.feed_async("in", *({"id": raw, "n": 1, "raw": raw} for raw in ("7", "[1]", "{nope")))
    errors = [d["error"] for d in t.dead_letters("in")]
    assert len(errors) == 3
    assert all("must be a JSON object" in e for e in errors)
    assert "not int" in errors[0] and "not list" in errors[1]
    assert t.emitted("out") == []  # the failed events' emits were dropped with them
    assert t.table == {}
