"""The app ``bench/bench_failover.py`` runs as instances (``chukcha run failover_app:app
--etcd ...``): 4 partitions keyed by ``k``, state on the bus, a receipt per event."""

from __future__ import annotations

from typing import Any

from chukcha import App, Context
from chukcha.processors import ProcessorConfig

__all__ = ["app"]

app = App("failover", partitions=4, config=ProcessorConfig(changelog=True, read_timeout=0.2))


@app.processor("events", key=lambda event: event["k"])
def on_event(ctx: Context, event: dict[str, Any]) -> None:
    ctx.set(ctx.key, ctx.get(ctx.key, 0) + event["amount"])
    ctx.emit("receipts", {"event": ctx.event_id})
