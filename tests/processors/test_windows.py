"""Windows in the Tester: tumbling and hopping, grace, late events, results with stable IDs."""

from __future__ import annotations

from typing import Any

import pytest

from chukcha import App, Context
from chukcha.processors.tester import Tester
from chukcha.processors.windows import Window, WindowResult


def clicks_app(*, hop: float | None = None) -> tuple[App, Window, list[WindowResult]]:
    app = App("clicks", state_dir="unused")
    per_minute = app.window("per_minute", size=60, hop=hop, grace=5, emit_to="counts")
    closed: list[WindowResult] = []

    @app.processor("clicks")
    def on_click(ctx: Context, click: dict[str, Any]) -> None:
        per_minute.update(ctx, click["page"], click["ts"], lambda n: n + 1, initial=0)

    @per_minute.on_close
    def remember(ctx: Context, result: WindowResult) -> None:
        assert ctx.event_id == result.id
        closed.append(result)

    return app, per_minute, closed


def test_tumbling_windows_close_after_grace() -> None:
    app, window, closed = clicks_app()
    t = Tester(app)
    t.feed("clicks", {"id": "1", "page": "/", "ts": 0.5}, {"id": "2", "page": "/a", "ts": 59.9},
           {"id": "2", "page": "/a", "ts": 59.9},  # a duplicate: counted once
           {"id": "3", "page": "/", "ts": 61})
    assert closed == []
    t.feed("clicks", {"id": "4", "page": "/", "ts": 62}, {"id": "5", "page": "/", "ts": 3})
    assert closed == []  # 3 is within grace of 62: still counted in [0, 60)
    t.feed("clicks", {"id": "6", "page": "/", "ts": 65})  # watermark 65 = 60 + grace: closes
    assert [(r.key, r.start, r.end, r.value) for r in closed] == [
        ("/", 0, 60, 2), ("/a", 0, 60, 1)]
    assert t.emitted("counts") == [
        {"id": "window:per_minute:0:/", "key": "/", "start": 0, "end": 60, "value": 2},
        {"id": "window:per_minute:0:/a", "key": "/a", "start": 0, "end": 60, "value": 1}]
    t.feed("clicks", {"id": "7", "page": "/", "ts": 10})  # too late: dropped and counted
    t.feed("clicks", {"id": "8", "page": "/", "ts": 200})
    assert [(r.start, r.value) for r in closed[2:]] == [(60, 3)]
    engine = t.partitions.engines[0]
    assert window.late(engine.ctx) == 1
    # Closed windows leave nothing behind but the bookkeeping of the open one.
    assert {k for k in t.table if k.startswith("~w/per_minute/v/")} == {
        "~w/per_minute/v/0000000000180000//"}
    assert {k for k in t.table if k.startswith(("~w/per_minute/k/", "~w/per_minute/n/"))} == {
        "~w/per_minute/k/0000000000180000/0", "~w/per_minute/n/0000000000180000"}


def test_hopping_windows_count_an_event_in_each_window() -> None:
    app, _, closed = clicks_app(hop=20)
    t = Tester(app)
    t.feed("clicks", {"id": "1", "page": "p", "ts": 45}, {"id": "2", "page": "p", "ts": 50},
           {"id": "3", "page": "p", "ts": 300})
    assert [(r.start, r.end, r.value) for r in closed] == [
        (0, 60, 2), (20, 80, 2), (40, 100, 2)]


def test_streams_out_of_order_with_each_other() -> None:
    app, _, closed = clicks_app()
    t = Tester(app)
    t.add_streams("clicks", "a", "b")
    t.feed("clicks", {"id": "a1", "page": "p", "ts": 10}, {"id": "a2", "page": "p", "ts": 500},
           owner="a")
    assert closed == []  # stream b has not shown its time: nothing closes
    t.feed("clicks", {"id": "b1", "page": "p", "ts": 20}, owner="b")
    assert closed == []  # b is at 20: [0, 60) stays open for b's late-in-time events
    t.feed("clicks", {"id": "b2", "page": "p", "ts": 30}, {"id": "b3", "page": "p", "ts": 90},
           owner="b")
    assert [(r.start, r.value) for r in closed] == [(0, 3)]


def test_window_definitions_are_checked() -> None:
    app = App("x", state_dir="unused")
    with pytest.raises(ValueError, match="size"):
        app.window("w", size=0)
    with pytest.raises(ValueError, match="hop must not be longer"):
        app.window("w", size=10, hop=20)
    app.window("w", size=10)
    with pytest.raises(ValueError, match="already defined"):
        app.window("w", size=10)
