"""Codecs per processor and per emit (Tester, in memory): text, bytes, msgspec Structs,
dataclasses, pydantic models; undecodable events are dead-lettered, counted and warned about."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import msgspec
import orjson
import pydantic
import pytest

from chukcha import App, Context
from chukcha.client.events import IdSupply, encode_event, encode_events
from chukcha.codecs import BYTES, JSON, STR, EventDecodeError, get_codec
from chukcha.processors.tester import Tester


class Order(msgspec.Struct):
    customer: str
    amount: int
    id: str | None = None


@dataclasses.dataclass
class Click:
    page: str
    n: int


class Visit(pydantic.BaseModel):
    id: str
    user: str


class Receipt(msgspec.Struct):
    customer: str
    spent: int


def test_get_codec() -> None:
    assert (get_codec(None), get_codec("json"), get_codec("str"), get_codec("bytes")) == (
        JSON, JSON, STR, BYTES)
    assert get_codec(Order) is get_codec(Order)  # one decoder per class
    with pytest.raises(ValueError, match="unknown codec 'yaml'"):
        get_codec("yaml")
    with pytest.raises(TypeError, match=r"a msgspec\.Struct, a dataclass"):
        get_codec(int)
    with pytest.raises(EventDecodeError, match=r"cannot decode as Order: Expected `int`, got "
                                               r"`str` - at `\$.amount`"):
        get_codec(Order).decode(b'{"customer": "a", "amount": "x"}')
    with pytest.raises(EventDecodeError, match="not UTF-8"):
        STR.decode(b"\xff\xfe")
    with pytest.raises(EventDecodeError, match="cannot decode as Visit"):
        get_codec(Visit).decode(b'{"id": "v"}')


def test_text_word_count_with_the_str_codec() -> None:
    app = App("words", state_dir="unused")

    @app.processor("lines", codec="str")
    def on_line(ctx: Context, line: str) -> None:
        assert isinstance(line, str)
        for word in line.split():
            ctx.set(word, ctx.get(word, 0) + 1)
        ctx.emit("lengths", f"len {len(line)}")  # a raw text line

    t = Tester(app)
    t.feed("lines", "the cat", "the dog  sat", b"caf\xc3\xa9 the")
    assert t.table == {"the": 3, "cat": 1, "dog": 1, "sat": 1, "café": 1}
    assert t.stats["applied"] == 3 and t.stats["dead_lettered"] == 0
    assert t.emitted("lengths") == ["len 7", "len 12", "len 8"]


def test_an_undecodable_line_is_dead_lettered_counted_and_warned(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = App("words", state_dir="unused", on_error="stop")  # decoding is not the callback

    @app.processor("lines", codec="str")
    def on_line(ctx: Context, line: str) -> None:
        ctx.set("n", ctx.get("n", 0) + 1)

    t = Tester(app)
    with caplog.at_level(logging.WARNING, logger="chukcha.processors.engine"):
        t.feed("lines", b"ok", b"\xff bad", b"fine", b"\xfe worse")
    assert t.table == {"n": 2}
    assert (t.stats["undecodable"], t.stats["dead_lettered"]) == (2, 2)
    dead = t.dead_letters("lines")
    assert [d["offset"] for d in dead] == [3, 14]
    assert dead[0]["error"].startswith("cannot decode as str: not UTF-8")
    assert dead[0]["id"] == "lines:tester-chunk000000000:3/dead"
    # One warning at once (with the count and the reason), not one per event.
    warnings = [r.getMessage() for r in caplog.records if "could not be decoded" in r.getMessage()]
    assert len(warnings) == 1
    assert "1 event(s) could not be decoded as str (1 in all)" in warnings[0]
    assert "lines.dead" in warnings[0] and "not UTF-8" in warnings[0]


def test_invalid_json_is_warned_about_too(caplog: pytest.LogCaptureFixture) -> None:
    app = App("a", state_dir="unused")

    @app.processor("c")
    def on_event(ctx: Context, event: dict[str, Any]) -> None:
        ctx.set("n", 1)

    t = Tester(app)
    with caplog.at_level(logging.WARNING, logger="chukcha.processors.engine"):
        t.feed("c", b"plain text")
    assert t.stats["undecodable"] == 1 and t.table == {}
    assert t.dead_letters("c")[0]["error"].startswith("invalid JSON")
    assert any("could not be decoded as json" in r.getMessage() for r in caplog.records)


def test_typed_events_msgspec_struct() -> None:
    app = App("billing", state_dir="unused", on_error="dead_letter")

    @app.processor("orders", codec=Order)
    def on_order(ctx: Context, order: Order) -> None:
        assert isinstance(order, Order)
        spent = ctx.get(order.customer, 0) + order.amount
        ctx.set(order.customer, spent)
        ctx.emit("receipts", Receipt(order.customer, spent))

    t = Tester(app)
    t.feed("orders", Order("ann", 5, id="o1"), Order("ann", 5, id="o1"),  # a duplicate
           {"customer": "bob", "amount": 7, "id": "o2"},
           {"customer": "bob", "amount": "seven", "id": "o3"})  # fails validation
    assert t.table == {"ann": 5, "bob": 7}
    assert t.stats == {"applied": 2, "duplicates": 1, "dead_lettered": 1, "undecodable": 1,
                       "timers_run": 0, "timer_failures": 0, "dedup_pruned_young": 0}
    assert t.emitted("receipts") == [{"id": "o1/0", "customer": "ann", "spent": 5},
                                     {"id": "o2/0", "customer": "bob", "spent": 7}]
    assert "Expected `int`, got `str` - at `$.amount`" in t.dead_letters("orders")[0]["error"]


def test_a_class_without_an_id_field_uses_the_lines_id() -> None:
    app = App("clicks", state_dir="unused")

    @app.processor("clicks", codec=Click)
    def on_click(ctx: Context, click: Click) -> None:
        assert isinstance(click, Click)
        ctx.set(click.page, ctx.get(click.page, 0) + click.n)
        ctx.emit("pages", click)  # a dataclass emit gets the derived ID spliced in

    t = Tester(app)
    t.feed("clicks", {"id": "c1", "page": "/", "n": 2}, {"id": "c1", "page": "/", "n": 2},
           {"page": "/a", "n": 1}, {"page": "/a", "n": 1})  # no IDs: two events by position
    assert t.table == {"/": 2, "/a": 2}
    assert t.stats["duplicates"] == 1
    assert t.emitted("pages")[0] == {"id": "c1/0", "page": "/", "n": 2}


def test_pydantic_models_and_a_user_event_id() -> None:
    app = App("visits", state_dir="unused", event_id=lambda v: f"{v.user}:{v.id}")

    @app.processor("visits", codec=Visit)
    def on_visit(ctx: Context, visit: Visit) -> None:
        assert ctx.event_id == f"{visit.user}:{visit.id}"
        ctx.set(visit.user, ctx.get(visit.user, 0) + 1)
        ctx.emit("seen", visit)

    t = Tester(app)
    t.feed("visits", Visit(id="1", user="u"), Visit(id="1", user="u"), Visit(id="1", user="w"))
    assert t.table == {"u": 1, "w": 1}
    assert t.emitted("seen") == [{"id": "1", "user": "u"}, {"id": "1", "user": "w"}]


def test_emit_codecs() -> None:
    app = App("e", state_dir="unused")

    @app.processor("in")
    def on_event(ctx: Context, event: dict[str, Any]) -> None:
        ctx.emit("raw", b"not json at all", codec="bytes")
        ctx.emit("typed", {"customer": "x", "spent": 1}, codec=Receipt)
        with pytest.raises(ValueError, match="one line"):
            ctx.emit("raw", "two\nlines")
        with pytest.raises(TypeError, match="emit takes"):
            ctx.emit("raw", 42)

    t = Tester(app)
    t.feed("in", {"id": "i"})
    assert t.emitted("raw") == ["not json at all"]
    assert t.emitted("typed") == [{"id": "i/1", "customer": "x", "spent": 1}]


def test_client_encodes_typed_events_and_text() -> None:
    lines, ids = encode_events([Order("a", 1), Order("b", 2, id="mine"), Click("/", 1),
                                Visit(id="v", user="u"), "some text"])
    assert ids[1:4] == ["mine", ids[2], "v"] and len(ids[0]) == 28 and ids[4] == ""
    assert orjson.loads(lines[0]) == {"customer": "a", "amount": 1, "id": ids[0]}
    assert orjson.loads(lines[2]) == {"id": ids[2], "page": "/", "n": 1}
    assert lines[4] == b"some text"
    line, eid = encode_event(Order("a", 1), IdSupply())
    assert orjson.loads(line)["id"] == eid  # the ID is in the bytes: a retry resends it
