"""The app the SIGKILL test runs as a subprocess (``chukcha run tests.processors.sigkill_app:app``).

Like ``examples.orders`` but with small batches, so that a run makes many commits and random
kills land in every phase: reading, processing, the fsync'ed commit, sending the outbox, acking.
"""

from __future__ import annotations

from typing import Any

from chukcha import App, Context
from chukcha.processors import ProcessorConfig

__all__ = ["app"]

app = App("billing", config=ProcessorConfig(max_batch_bytes=4096, read_timeout=0.2))


@app.processor("orders")
def on_order(ctx: Context, order: dict[str, Any]) -> None:
    customer = order["customer"]
    spent = ctx.get(customer, 0) + order["amount"]
    ctx.set(customer, spent)
    ctx.emit("receipts", {"order": ctx.event_id, "customer": customer, "spent": spent})
