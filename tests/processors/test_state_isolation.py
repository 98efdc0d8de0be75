"""Values handed out by ``ctx.get`` (and given to ``ctx.set``) are not the staged, cached or
committed values themselves: an in-place change of a failed event is rolled back."""

from __future__ import annotations

from typing import Any

import pytest

from chukcha import App, Context
from chukcha.processors.tester import Tester


def counter_app(on_error: str = "dead_letter") -> App:
    app = App("iso", nodes=["http://127.0.0.1:1"], on_error=on_error)

    @app.processor("adds")
    def on_add(ctx: Context, event: dict[str, Any]) -> None:
        d = ctx.get("k", {"n": 0})
        d["n"] += event["x"]
        if event.get("fail"):
            raise RuntimeError("after the in-place change")
        ctx.set("k", d)

    return app


EVENTS = ({"id": "a", "x": 1}, {"id": "b", "x": 100, "fail": True}, {"id": "c", "x": 1})


async def test_in_place_change_of_a_failed_event_in_the_same_batch_is_rolled_back() -> None:
    t = Tester(counter_app())
    await t.feed_async("adds", *EVENTS)  # b reads the value a staged in this batch
    assert t.table == {"k": {"n": 2}}
    assert len(t.dead_letters("adds")) == 1


async def test_in_place_change_of_a_failed_event_does_not_reach_the_cache() -> None:
    t = Tester(counter_app())
    for event in EVENTS:  # one batch each: b reads the committed (cached) value
        await t.feed_async("adds", event)
    assert t.table == {"k": {"n": 2}}


@pytest.mark.parametrize("on_error", ["dead_letter", "stop"])
async def test_get_returns_a_copy_and_set_takes_a_snapshot(on_error: str) -> None:
    app = App("snap", nodes=["http://127.0.0.1:1"], on_error=on_error)
    seen: list[Any] = []

    @app.processor("in")
    def on_in(ctx: Context, event: dict[str, Any]) -> None:
        value = {"list": [1]}
        ctx.set("k", value)
        value["list"].append(2)  # after set: not part of the staged value
        first, second = ctx.get("k"), ctx.get("k")
        assert first == second == {"list": [1]} and first is not second
        first["list"].append(3)
        seen.append(ctx.table["k"])
        ctx.set("n", 7)
        assert ctx.get("n") == 7 and dict(ctx.items()) == {"k": {"list": [1]}, "n": 7}

    t = Tester(app)
    await t.feed_async("in", {"id": "1"})
    assert seen == [{"list": [1]}]
    assert t.table == {"k": {"list": [1]}, "n": 7}
