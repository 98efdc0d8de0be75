"""Codecs end to end against a real node: a text word count and a typed-event app."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import msgspec
import orjson

from chukcha import App, Client, Context, Node
from tests.processors.test_runner import collect, table_of


class Order(msgspec.Struct):
    customer: str
    amount: int
    id: str | None = None


@dataclasses.dataclass
class Receipt:
    customer: str
    spent: int


async def test_text_word_count(node: Node, tmp_path: Path) -> None:
    state = tmp_path / "state"
    app = App("wc", nodes=[node.url], state_dir=state, on_error="stop")

    @app.processor("lines", codec="str")
    def on_line(ctx: Context, line: str) -> None:
        for word in line.split():
            ctx.set(word, ctx.get(word, 0) + 1)
        ctx.emit("counted", {"words": len(line.split())})

    text = ["the quick fox", "the lazy dog", "  the end  ", "ünïcode the"]
    async with Client([node.url]) as client:
        await client.send("lines", [*text[:2], b"\xff\xfe not utf-8", *text[2:]])
        task = asyncio.create_task(app.run_async(stop := asyncio.Event()))
        try:
            # The IDs of text lines come from where they are stored: "<category>:<chunk>:<off>".
            seen = await collect(client, "counted", set(), min_count=4)
            dead = await collect(client, "lines.dead", set(), min_count=1)
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
    assert sorted(e["words"] for e in seen.values()) == [2, 2, 3, 3]
    assert all(eid.startswith("lines:") and eid.endswith("/0") for eid in seen)
    [letter] = dead.values()
    assert letter["error"].startswith("cannot decode as str: not UTF-8")
    assert letter["offset"] == len(b"the quick fox\nthe lazy dog\n")
    assert await asyncio.to_thread(table_of, state) == {
        "the": 4, "quick": 1, "fox": 1, "lazy": 1, "dog": 1, "end": 1, "ünïcode": 1}


async def test_typed_events(node: Node, tmp_path: Path) -> None:
    state = tmp_path / "state"
    app = App("billing", nodes=[node.url], state_dir=state, on_error="dead_letter")

    @app.processor("orders", codec=Order)
    def on_order(ctx: Context, order: Order) -> None:
        spent = ctx.get(order.customer, 0) + order.amount
        ctx.set(order.customer, spent)
        ctx.emit("receipts", Receipt(order.customer, spent))

    orders = [Order("ann", 5, id="o1"), Order("bob", 7, id="o2"), Order("ann", 3)]
    async with Client([node.url]) as client:
        ids = await client.send("orders", orders)
        await client.send("orders", orders[:2])  # resent: the same IDs
        await client.send("orders", [{"customer": "eve", "amount": "lots", "id": "o4"}])
        task = asyncio.create_task(app.run_async(stop := asyncio.Event()))
        try:
            receipts = await collect(client, "receipts", {f"{i}/0" for i in ids})
            dead = await collect(client, "orders.dead", {"o4/dead"})
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
    assert ids[:2] == ["o1", "o2"] and len(ids[2]) == 28  # the client gave the third an ID
    assert len(receipts) == 3
    decoded = {eid: msgspec.convert(r, Receipt) for eid, r in receipts.items()}
    assert decoded["o1/0"] == Receipt("ann", 5) and decoded["o2/0"] == Receipt("bob", 7)
    assert decoded[f"{ids[2]}/0"] == Receipt("ann", 8)
    assert "Expected `int`, got `str` - at `$.amount`" in dead["o4/dead"]["error"]
    assert orjson.loads(dead["o4/dead"]["event"])["customer"] == "eve"
    assert await asyncio.to_thread(table_of, state) == {"ann": 8, "bob": 7}
