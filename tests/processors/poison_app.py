"""An app whose callback fails on one kind of event (``"poison": true``): the positions tests
run it in-process and point ``chukcha app`` at it (``tests.processors.poison_app:app``)."""

from __future__ import annotations

from typing import Any

from chukcha import App, Context
from chukcha.processors import ProcessorConfig

__all__ = ["app", "build"]


def build(on_error: str = "stop", nodes: tuple[str, ...] = ("http://127.0.0.1:8080",),
          state_dir: str | None = None, *, changelog: bool = False) -> App:
    a = App("shop", nodes=nodes, state_dir=state_dir, on_error=on_error,
            config=ProcessorConfig(read_timeout=0.2, changelog=changelog))

    @a.processor("orders")
    def on_order(ctx: Context, order: dict[str, Any]) -> None:
        if order.get("poison"):
            raise ValueError(f"cannot price order {order['id']}")  # the line the trace names
        ctx.set(order["customer"], ctx.get(order["customer"], 0) + order["amount"])
        ctx.emit("receipts", {"order": order["id"]})

    return a


app = build()
