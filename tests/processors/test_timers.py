"""Timers in the Tester (explicit clock): periodic and per-key, committed like events."""

from __future__ import annotations

import pytest

from chukcha import App, Context
from chukcha.errors import ProcessorError
from chukcha.processors.tester import Tester

T0 = 1_700_000_000.0


def reminders_app(on_error: str = "stop") -> App:
    app = App("remind", state_dir="unused", on_error=on_error)

    @app.processor("signups")
    def on_signup(ctx: Context, event: dict[str, str]) -> None:
        ctx.set(f"user:{event['user']}", "new")
        ctx.schedule(float(event["at"]), event["user"])
        if event.get("fail"):
            raise RuntimeError("after scheduling")  # the schedule is dropped with the event

    @app.on_timer
    def remind(ctx: Context, user: str) -> None:
        if user == "boom":
            raise RuntimeError("timer failed")
        ctx.set(f"user:{user}", "reminded")
        ctx.set("reminders", ctx.get("reminders", 0) + 1)
        ctx.emit("reminders", {"user": user})

    return app


def test_per_key_timers_fire_once_in_time_order() -> None:
    t = Tester(reminders_app(on_error="dead_letter"))
    t.feed("signups", {"id": "1", "user": "ann", "at": str(T0 + 60)},
           {"id": "2", "user": "bob", "at": str(T0 + 30)},
           {"id": "3", "user": "eve", "at": str(T0 + 10), "fail": "yes"},
           {"id": "1", "user": "ann", "at": str(T0 + 60)})  # a duplicate: no second timer
    assert t.fire_timers(T0 + 29.999) == 0
    assert t.fire_timers(T0 + 30) == 1
    assert t.get("user:bob") == "reminded" and t.get("user:ann") == "new"
    assert t.fire_timers(T0 + 3600) == 1
    assert t.fire_timers(T0 + 7200) == 0  # each ran once
    assert t.table == {"user:ann": "reminded", "user:bob": "reminded", "reminders": 2}
    assert [e["id"] for e in t.emitted("reminders")] == [
        f"timer:@bob:{int((T0 + 30) * 1000)}/0", f"timer:@ann:{int((T0 + 60) * 1000)}/0"]
    assert t.stats["timers_run"] == 2


def test_a_failing_timer_stops_the_app_and_stays_scheduled() -> None:
    t = Tester(reminders_app())
    t.feed("signups", {"id": "1", "user": "boom", "at": str(T0)},
           {"id": "2", "user": "ann", "at": str(T0)})
    with pytest.raises(ProcessorError, match="timer 'timer:@boom"):
        # "ann" < "boom": ann's run is staged, then boom fails: nothing is committed
        t.fire_timers(T0)
    assert t.get("reminders") is None
    assert len(t.partitions.engines[0].timers) == 2  # both still there


def test_periodic_timers_persist_their_next_run() -> None:
    def ticking() -> App:
        app = App("tick", state_dir="unused")

        @app.processor("noop")
        def noop(ctx: Context, event: object) -> None:
            return

        @app.timer(every=10)
        def tick(ctx: Context) -> None:
            ctx.set("ticks", ctx.get("ticks", 0) + 1)
            ctx.emit("ticks", {"n": ctx.get("ticks")})

        return app

    t = Tester(ticking())
    engine = t.partitions.engines[0]
    first = engine.timers.next_due()
    assert first is not None
    assert t.fire_timers(first - 1) == 0
    assert t.fire_timers(first) == 1
    assert t.fire_timers(first + 5) == 0
    assert t.fire_timers(first + 10) == 1
    assert t.fire_timers(first + 100) == 1  # fell behind: one run, not nine
    assert t.get("ticks") == 3
    assert engine.timers.next_due() == pytest.approx(first + 110)
    ids = [e["id"] for e in t.emitted("ticks")]
    assert ids[0] == f"timer:test_periodic_timers_persist_their_next_run.<locals>.ticking." \
                     f"<locals>.tick:{round(first * 1000)}/0"


def test_schedule_needs_a_handler_and_a_time() -> None:
    app = App("x", state_dir="unused", on_error="dead_letter")

    @app.processor("c")
    def on_event(ctx: Context, event: dict[str, object]) -> None:
        ctx.schedule(T0, "k")

    t = Tester(app)
    t.feed("c", {"id": "1"})
    assert "needs an @app.on_timer handler" in t.dead_letters("c")[0]["error"]
    with pytest.raises(ValueError, match="positive number of seconds"):
        app.timer(every=0)
