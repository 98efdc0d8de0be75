"""The app the timer SIGKILL test runs as a subprocess
(``chukcha run tests.processors.timer_app:app``): a signup schedules a reminder per user."""

from __future__ import annotations

from typing import Any

from chukcha import App, Context
from chukcha.processors import ProcessorConfig

__all__ = ["app", "group_app"]

app = App("remind", config=ProcessorConfig(read_timeout=0.2), partitions=2)


@app.processor("signups", key=lambda event: event["user"])
def on_signup(ctx: Context, event: dict[str, Any]) -> None:
    ctx.schedule(float(event["at"]), ctx.key)
    ctx.emit("scheduled", {"user": ctx.key})


@app.on_timer
def remind(ctx: Context, user: str) -> None:
    fired = ctx.get(f"fired:{user}", 0) + 1
    ctx.set(f"fired:{user}", fired)
    ctx.emit("fired", {"user": user, "n": fired})


group_app = App("remind4", partitions=4, config=ProcessorConfig(
    read_timeout=0.2, changelog=True, snapshot_every=4))
"""The same with 4 partitions and the changelog on: instances through etcd (the timers move
with their partitions)."""


@group_app.processor("signups", key=lambda event: event["user"])
def on_signup4(ctx: Context, event: dict[str, Any]) -> None:
    ctx.schedule(float(event["at"]), ctx.key)
    ctx.emit("scheduled", {"user": ctx.key})


@group_app.on_timer
def remind4(ctx: Context, user: str) -> None:
    fired = ctx.get(f"fired:{user}", 0) + 1
    ctx.set(f"fired:{user}", fired)
    ctx.emit("fired", {"user": user, "n": fired})
