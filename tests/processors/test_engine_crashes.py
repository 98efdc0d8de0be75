"""The commit protocol as a pure invariant (Hypothesis): a stream with duplicates, read in
batches of any size, with "crashes" (the process state thrown away, the engine reloaded from the
store) before or after any commit, always ends with every ID applied exactly once, and every
emit in the outbox/sent exactly once by ID."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from chukcha import App, Context
from chukcha.processors.engine import Engine, read_table
from chukcha.state import MemoryStore

CHUNK = "n-chunk000000000"


def make_app() -> App:
    app = App("inv", nodes=["http://127.0.0.1:1"])

    @app.processor("c")
    def on_event(ctx: Context, event: dict[str, Any]) -> None:
        ctx.set(event["k"], ctx.get(event["k"], 0) + event["v"])
        ctx.emit("out", {"v": event["v"]})

    return app


@settings(max_examples=150, deadline=None)
@given(
    ids=st.lists(st.integers(0, 15), min_size=1, max_size=40),
    steps=st.lists(st.tuples(st.integers(1, 6),
                             st.sampled_from(["commit", "crash", "crash_after"])),
                   min_size=1, max_size=30),
)
async def test_any_batches_and_crashes_apply_each_id_once(
    ids: list[int], steps: list[tuple[int, str]]
) -> None:
    app = make_app()
    lines = [orjson.dumps({"id": f"e{i}", "k": f"k{i % 3}", "v": i + 1}) + b"\n" for i in ids]
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    store = MemoryStore()
    engine = Engine(app, store)
    engine.load()
    sent: list[str] = []

    def restart() -> Engine:
        fresh = Engine(app, store)
        fresh.load()
        return fresh

    def deliver(e: Engine) -> None:
        for entry in list(e.outbox):
            sent.extend(orjson.loads(line)["id"] for line in entry.lines())
            e.outbox_sent(entry)

    async def step(e: Engine, size: int, action: str) -> Engine:
        chunk, pos = e.positions.get("c", {}).get("n", (CHUNK, 0))
        i = offsets.index(pos)
        j = min(len(lines), i + size)
        await e.process("c", "n", chunk, pos, b"".join(lines[i:j]))
        if action == "crash":  # before the commit: nothing of the batch survives
            return restart()
        plan = e.prepare()
        store.write(plan.puts, plan.deletes)
        e.committed()
        if action == "crash_after":  # committed, but the outbox was not sent
            return restart()
        deliver(e)
        return e

    for size, action in steps:
        engine = await step(engine, size, action)
    while engine.positions.get("c", {}).get("n", (CHUNK, 0))[1] < offsets[-1]:
        engine = await step(engine, 7, "commit")
    deliver(engine)  # the last instance sends what is left in the outbox

    unique = sorted(set(ids))
    want: dict[str, int] = {}
    for i in unique:
        want[f"k{i % 3}"] = want.get(f"k{i % 3}", 0) + i + 1
    assert read_table(store) == want
    assert sorted(set(sent)) == sorted(f"e{i}/0" for i in unique)
    # Sent outbox entries are deleted by the next commit.
    plan = engine.prepare()
    store.write(plan.puts, plan.deletes)
    engine.committed()
    assert list(store.scan(b"o/")) == []
