"""The orders example: per-customer totals, exactly once, with a receipt per applied order.

Run a node (``make run``) and then::

    chukcha run examples.orders:app                     # or: python -m examples.orders
    chukcha run examples.orders:app --node http://127.0.0.1:8080 --state-dir ./billing-state

Every order ``{"id": "...", "customer": "ann", "amount": 30}`` adds its amount to the customer's
total once, however often it is delivered (the same ``id`` sent to two nodes, a restart after a
crash). Each applied order emits a receipt to ``receipts`` whose ID is derived from the order's,
so a downstream processor can drop resent receipts too. ``make demo`` drives this app end to end.
"""

from __future__ import annotations

from typing import Any

from chukcha import App, Context

__all__ = ["VIP_THRESHOLD", "app", "on_order"]

VIP_THRESHOLD = 1000

app = App("billing", nodes=["http://127.0.0.1:8080"], state_dir="./billing-state",
          on_error="dead_letter")


@app.processor("orders")
def on_order(ctx: Context, order: dict[str, Any]) -> None:
    """Add the order's amount to its customer's total; emit a receipt (and a VIP event once a
    customer's total passes the threshold)."""
    customer = str(order["customer"])
    amount = int(order["amount"])
    before = ctx.get(customer, 0)
    spent = before + amount
    ctx.set(customer, spent)
    ctx.emit("receipts", {"order": ctx.event_id, "customer": customer, "spent": spent})
    if before < VIP_THRESHOLD <= spent:
        ctx.emit("vip", {"customer": customer, "spent": spent})


if __name__ == "__main__":
    app.run()
