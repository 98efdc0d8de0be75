"""The apps ``bench/bench_failover.py`` runs as instances (``chukcha run failover_app:app
--etcd ...``): 4 partitions keyed by ``k``, state on the bus, a receipt per event. ``app``
(``failover``, receipts in ``receipts``) and ``app_sb`` (``failover-sb``, receipts in
``receipts-sb``) are the same app twice, so that the bench runs them side by side on one bus,
one without and one with standbys."""

from __future__ import annotations

from typing import Any

from chukcha import App, Context
from chukcha.processors import ProcessorConfig

__all__ = ["app", "app_sb"]


def make(name: str, receipts: str) -> App:
    made = App(name, partitions=4, config=ProcessorConfig(changelog=True, read_timeout=0.2))

    @made.processor("events", key=lambda event: event["k"])
    def on_event(ctx: Context, event: dict[str, Any]) -> None:
        ctx.set(ctx.key, ctx.get(ctx.key, 0) + event["amount"])
        ctx.emit(receipts, {"event": ctx.event_id})

    return made


app = make("failover", "receipts")
app_sb = make("failover-sb", "receipts-sb")
