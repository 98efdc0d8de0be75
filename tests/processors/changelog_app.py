"""The app of the changelog tests (``chukcha run tests.processors.changelog_app:app``): 4
partitions keyed by customer, state on the bus (``changelog=True``, a snapshot every 4 commits),
small batches so that a run makes many commits."""

from __future__ import annotations

from typing import Any

from chukcha import App, Context
from chukcha.processors import ProcessorConfig

__all__ = ["app", "app12", "audit"]

app = App("billing", partitions=4, config=ProcessorConfig(
    max_batch_bytes=2048, read_timeout=0.2, changelog=True, snapshot_every=4))


@app.processor("orders", key=lambda order: order["customer"])
def on_order(ctx: Context, order: dict[str, Any]) -> None:
    spent = ctx.get(ctx.key, 0) + order["amount"]
    ctx.set(ctx.key, spent)
    ctx.emit("receipts", {"order": ctx.event_id, "customer": ctx.key, "spent": spent})


app12 = App("billing12", partitions=12, config=ProcessorConfig(
    max_batch_bytes=2048, read_timeout=0.2, changelog=True, snapshot_every=4))
"""The same with 12 partitions (the torture test of instances through etcd)."""


@app12.processor("orders", key=lambda order: order["customer"])
def on_order12(ctx: Context, order: dict[str, Any]) -> None:
    spent = ctx.get(ctx.key, 0) + order["amount"]
    ctx.set(ctx.key, spent)
    ctx.emit("receipts", {"order": ctx.event_id, "customer": ctx.key, "spent": spent})


audit = App("audit", partitions=2, config=ProcessorConfig(read_timeout=0.2, changelog=True))
"""Looks customers up in a view of ``billing``'s table (instances through etcd: a view is
followed by every instance, owned by none)."""
audit.view("billing")


@audit.processor("checks", key=lambda check: check["customer"])
def on_check(ctx: Context, check: dict[str, Any]) -> None:
    ctx.emit("audits", {"customer": ctx.key, "spent": ctx.lookup("billing", ctx.key, 0)})
