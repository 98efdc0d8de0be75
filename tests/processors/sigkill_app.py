"""The app the SIGKILL test runs as a subprocess (``chukcha run tests.processors.sigkill_app:app``).

Like ``examples.orders`` but with small batches, so that a run makes many commits and random
kills land in every phase: reading, processing, the fsync'ed commit, sending the outbox, acking.
"""

from __future__ import annotations

from typing import Any

from chukcha import App, Context
from chukcha.processors import ProcessorConfig

__all__ = ["app", "partitioned"]

app = App("billing", config=ProcessorConfig(max_batch_bytes=4096, read_timeout=0.2))


@app.processor("orders")
def on_order(ctx: Context, order: dict[str, Any]) -> None:
    customer = order["customer"]
    spent = ctx.get(customer, 0) + order["amount"]
    ctx.set(customer, spent)
    ctx.emit("receipts", {"order": ctx.event_id, "customer": customer, "spent": spent})


partitioned = App("billing", config=ProcessorConfig(max_batch_bytes=4096, read_timeout=0.2),
                  partitions=8)
"""The same app with 8 partitions, keyed by customer."""


@partitioned.processor("orders", key=lambda order: order["customer"])
def on_order_partitioned(ctx: Context, order: dict[str, Any]) -> None:
    spent = ctx.get(ctx.key, 0) + order["amount"]
    ctx.set(ctx.key, spent)
    ctx.emit("receipts", {"order": ctx.event_id, "customer": ctx.key, "spent": spent})
