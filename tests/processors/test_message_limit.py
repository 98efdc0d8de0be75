"""The bus's 1 MiB message limit in processors: over-size emits fail inside the callback (so the
error policy handles them before anything is committed), dead letters of large events fit, the
tester enforces the limit, and a non-retriable send error stops the runner instead of a retry
loop."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest

from chukcha import App, Context
from chukcha.errors import MessageTooLargeError, ProcessorError
from chukcha.processors.engine import DEAD_LETTER_MAX_EVENT, OUTBOX_PREFIX
from chukcha.processors.tester import Tester
from chukcha.protocol import MAX_MESSAGE_SIZE
from chukcha.state import LevelDBStore
from chukcha.testing import run_node


def echo_app(on_error: str, url: str = "http://127.0.0.1:1", state_dir: Path | None = None) -> App:
    app = App("limits", nodes=[url], on_error=on_error, state_dir=state_dir)

    @app.processor("in")
    def on_in(ctx: Context, event: dict[str, Any]) -> None:
        ctx.set("n", ctx.get("n", 0) + 1)
        if event.get("fail"):
            raise RuntimeError("boom")
        ctx.emit("out", {"blob": "x" * event.get("emit_size", 1)})

    return app


def large_event(eid: str) -> dict[str, Any]:
    """An event just under the limit whose JSON doubles when embedded as a string (quotes)."""
    event = {"id": eid, "fail": True, "blob": '"' * (MAX_MESSAGE_SIZE // 2 - 100)}
    assert MAX_MESSAGE_SIZE - 300 < len(orjson.dumps(event)) <= MAX_MESSAGE_SIZE
    return event


async def test_dead_letter_of_a_large_event_is_truncated_to_fit() -> None:
    t = Tester(echo_app("dead_letter"))
    await t.feed_async("in", large_event("big"), {"id": "ok"})
    (dead,) = t.dead_letters("in")
    assert dead["id"] == "big/dead" and "boom" in dead["error"]
    assert dead["truncated"] is True
    assert len(dead["event"]) == DEAD_LETTER_MAX_EVENT
    assert (dead["chunk"], dead["offset"]) == ("tester-chunk000000000", 0)
    assert len(orjson.dumps(dead)) <= MAX_MESSAGE_SIZE
    assert t.table == {"n": 1}
    await t.feed_async("in", {"id": "small", "fail": True})
    assert "truncated" not in t.dead_letters("in")[1]


async def test_over_size_emit_fails_in_the_callback_under_either_policy() -> None:
    t = Tester(echo_app("dead_letter"))
    await t.feed_async("in", {"id": "a"}, {"id": "huge", "emit_size": MAX_MESSAGE_SIZE})
    (dead,) = t.dead_letters("in")
    assert dead["id"] == "huge/dead"
    assert "MessageTooLargeError" in dead["error"] and "'out'" in dead["error"]
    assert [e["id"] for e in t.emitted("out")] == ["a/0"]
    assert t.table == {"n": 1}  # the failed event's state change was rolled back

    t = Tester(echo_app("stop"))
    with pytest.raises(ProcessorError, match="over the limit"):
        await t.feed_async("in", {"id": "huge", "emit_size": MAX_MESSAGE_SIZE})
    assert t.table == {}
    assert t.emitted("out") == []


async def test_tester_refuses_a_fed_event_over_the_limit() -> None:
    t = Tester(echo_app("dead_letter"))
    with pytest.raises(MessageTooLargeError, match="fed event"):
        await t.feed_async("in", {"id": "x", "blob": "y" * MAX_MESSAGE_SIZE})
    assert t.table == {}


def _commit_over_size_outbox(state_dir: Path) -> None:
    """The state an app left before emits were size-checked: an unsendable committed outbox."""
    store = LevelDBStore(state_dir)
    try:
        line = orjson.dumps({"id": "x/0", "blob": "z" * MAX_MESSAGE_SIZE})
        store.write({OUTBOX_PREFIX + b"%016x" % 0: b"out\n" + line + b"\n"})
    finally:
        store.close()


async def test_runner_stops_on_a_non_retriable_send_error(tmp_path: Path) -> None:
    state = tmp_path / "state"
    await asyncio.to_thread(_commit_over_size_outbox, state)
    async with run_node(tmp_path / "data", instance="moscow") as node:
        app = echo_app("stop", node.url, state)
        with pytest.raises(MessageTooLargeError, match="over the limit"):
            # Without the fix the send is retried forever: this times out instead.
            async with asyncio.timeout(20):
                await app.run_async(asyncio.Event())
