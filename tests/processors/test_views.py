"""Views: a read-only copy of a running app's table, from its changelog on the bus, for
scripts and for ``ctx.lookup`` in another app's callbacks."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from chukcha import App, Client, Context, Node
from chukcha.processors import ProcessorConfig
from chukcha.processors.tester import Tester
from chukcha.processors.views import View
from chukcha.state.changelog import Assembler, Record, encode_record
from chukcha.testing import run_node
from tests.processors.test_runner import collect


def billing_app(url: str, state: Path, snapshot_every: int = 1000) -> App:
    app = App("billing", nodes=[url], state_dir=state, partitions=2,
              config=ProcessorConfig(changelog=True, read_timeout=0.2,
                                     snapshot_every=snapshot_every))

    @app.processor("orders", key=lambda order: order["customer"])
    def on_order(ctx: Context, order: dict[str, Any]) -> None:
        ctx.set(ctx.key, ctx.get(ctx.key, 0) + order["amount"])
        if order.get("gone"):
            ctx.delete(ctx.key)

    return app


def alerts_app(url: str, state: Path) -> App:
    app = App("alerts", nodes=[url], state_dir=state)
    app.view("billing")

    @app.processor("checks")
    def on_check(ctx: Context, check: dict[str, Any]) -> None:
        ctx.emit("alerts", {"customer": check["customer"],
                            "spent": ctx.lookup("billing", check["customer"], 0)})

    return app


async def test_a_view_follows_a_running_app_and_answers_lookups(
    node: Node, tmp_path: Path,
) -> None:
    billing = billing_app(node.url, tmp_path / "billing")
    stop = asyncio.Event()
    tasks = [asyncio.create_task(billing.run_async(stop))]
    try:
        async with Client([node.url]) as client, View("billing", [node.url]) as view:
            await client.send("orders", [{"id": "1", "customer": "ann", "amount": 5},
                                         {"id": "2", "customer": "bob", "amount": 7}])
            await view.wait_for(lambda v: v.get("ann") == 5 and v.get("bob") == 7)
            await client.send("orders", [{"id": "3", "customer": "ann", "amount": 3},
                                         {"id": "4", "customer": "bob", "amount": 1,
                                          "gone": True}])
            await view.wait_for(lambda v: v.get("ann") == 8 and "bob" not in v)
            assert dict(view.items()) == {"ann": 8}
            assert sorted(view.seqs) == [0, 1]  # both partitions' changelogs followed

            # Another app looks the table up in its callbacks.
            tasks.append(asyncio.create_task(alerts_app(node.url, tmp_path / "alerts")
                                             .run_async(stop)))
            await client.send("checks", [{"id": "c1", "customer": "ann"},
                                         {"id": "c2", "customer": "zed"}])
            alerts = await collect(client, "alerts", {"c1/0", "c2/0"})
            assert alerts["c1/0"]["spent"] == 8 and alerts["c2/0"]["spent"] == 0
            await client.send("orders", [{"id": "5", "customer": "ann", "amount": 2}])
            await view.wait_for(lambda v: v.get("ann") == 10)
    finally:
        stop.set()
        for task in tasks:
            await asyncio.wait_for(task, 30)


async def test_a_view_started_late_builds_from_the_latest_snapshot(tmp_path: Path) -> None:
    # Small chunks and a snapshot every 2 commits: the changelog chunks before a snapshot are
    # deleted, so a view that starts afterwards has only the snapshot and what followed it.
    async with run_node(tmp_path / "node", max_chunk_size=300) as node, \
            Client([node.url]) as client:
        billing = billing_app(node.url, tmp_path / "billing", snapshot_every=2)
        stop = asyncio.Event()
        task = asyncio.create_task(billing.run_async(stop))
        try:
            expected: dict[str, int] = {}
            async with View("billing", [node.url]) as early:
                for i in range(12):  # one commit each: the app applied it before the next
                    customer = f"c{i % 3}"
                    total = expected[customer] = expected.get(customer, 0) + i
                    await client.send("orders", {"id": str(i), "customer": customer,
                                                 "amount": i})
                    await early.wait_for(lambda v: v.get(customer) == total)  # noqa: B023
            changelog = [c for c in await client.list_categories() if ".changelog." in c]
            first = {c: (await client.list_chunks(c))[0].name for c in changelog}
            assert any(not name.endswith("000000000") for name in first.values()), first
            async with View("billing", [node.url]) as view:
                await view.wait_caught_up()
                assert dict(view.items()) == expected
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)


def test_a_view_that_fell_behind_a_snapshot_starts_over_from_it() -> None:
    # The view applied seq 1 of partition 0; the records after it were deleted with the
    # changelog chunks before a snapshot at seq 5 (the app acks them once it is confirmed), so
    # what it reads next is the snapshot and seq 6: it must rebuild partition 0 from them.
    view = View("billing")
    view.seqs = {0: 0, 1: 0}
    p0, p1 = Assembler(), Assembler()
    for record in (Record(0, 0, 1, {b"t/a": b"1", b"t/b": b"1"}),):
        for line in encode_record(record):
            p0.add(line)
    for line in encode_record(Record(1, 0, 1, {b"t/z": b"9"})):
        p1.add(line)
    view._apply(0, p0)
    view._apply(1, p1)
    assert (dict(view.items()), view.seqs) == ({"a": 1, "b": 1, "z": 9}, {0: 1, 1: 1})
    for record in (Record(0, 0, 5, {b"t/a": b"5", b"t/c": b"5", b"d/x": b""}, base=True),
                   Record(0, 0, 6, {b"t/d": b"6"}, [b"t/c"])):
        for line in encode_record(record):
            p0.add(line)
    view._apply(0, p0)
    assert (dict(view.items()), view.seqs) == ({"a": 5, "d": 6, "z": 9}, {0: 6, 1: 1})


def test_a_former_owners_late_snapshot_does_not_pass_for_a_newer_one() -> None:
    # Epoch 8 wrote seqs 1..3; epoch 23 took the partition over from (8, 3) and wrote seq 4;
    # the view applied all four. Then epoch 8, paused past its lease and resumed, publishes
    # late records and a snapshot at seq 6: none of them is on the chain (epoch 23 holds every
    # seq past 3). The view must wait for epoch 23's seq 5, not take the late snapshot for a
    # newer one that it fell behind (it did once under load: the view ended with the former
    # owner's table in test_changelog_fencing).
    view = View("billing")
    view.seqs = {0: 0}
    p0 = Assembler()

    def add(*records: Record) -> None:
        for record in records:
            for line in encode_record(record):
                p0.add(line)

    add(*(Record(0, 8, s, {b"t/a": b'"8:%d"' % s}, link=(0, 0)) for s in (1, 2, 3)),
        Record(0, 23, 4, {b"t/b": b'"23:4"'}, link=(8, 3)))
    assert view._apply(0, p0)
    assert (dict(view.items()), view.seqs) == ({"a": "8:3", "b": "23:4"}, {0: 4})
    add(*(Record(0, 8, s, {b"t/a": b'"late %d"' % s}, link=(0, 0)) for s in (4, 5, 6)),
        Record(0, 8, 6, {b"t/a": b'"late 6"', b"t/z": b'"late"'}, base=True, link=(0, 0)))
    assert view._apply(0, p0)
    assert (dict(view.items()), view.seqs) == ({"a": "8:3", "b": "23:4"}, {0: 4})
    add(Record(0, 23, 5, {b"t/c": b'"23:5"'}, link=(8, 3)))
    assert view._apply(0, p0)
    assert (dict(view.items()), view.seqs) == ({"a": "8:3", "b": "23:4", "c": "23:5"}, {0: 5})


async def test_a_view_that_applied_a_former_owners_late_record_rebuilds_the_partition(
    node: Node,
) -> None:
    # Epoch 5 wrote seqs 1..3; the view applies them. Epoch 7 had taken the partition over
    # having seen only 1..2 (3 reached the bus late): its records name (5, 2) as their link,
    # so the view's seq 3 is off the chain and the partition is read again from the start.
    def lines(*records: Record) -> list[bytes]:
        return [line for r in records for line in encode_record(r)]

    old = [Record(0, 5, s, {b"t/a": b'"5:%d"' % s}, link=(0, 0)) for s in (1, 2, 3)]
    async with Client([node.url]) as client, View("billing", [node.url]) as view:
        await client.send("billing.changelog.p0000", lines(*old))
        await view.wait_for(lambda v: v.get("a") == "5:3")
        await client.send("billing.changelog.p0000", lines(
            Record(0, 7, 3, {b"t/a": b'"7:3"'}, link=(5, 2)),
            Record(0, 7, 4, {b"t/b": b'"7:4"'}, link=(5, 2))))
        await view.wait_for(lambda v: dict(v.items()) == {"a": "7:3", "b": "7:4"})
        assert (view.rebuilds, view.seqs) == (1, {0: 4})


async def test_a_view_of_an_app_without_a_changelog_warns(
    node: Node, caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="chukcha.processors.views"):
        async with View("nochangelog", [node.url]) as view:
            await view.wait_caught_up()
            assert len(view) == 0
    assert any("no changelog of app 'nochangelog'" in r.getMessage() for r in caplog.records)


def test_lookups_in_the_tester() -> None:
    app = alerts_app("http://127.0.0.1:1", Path("unused"))
    t = Tester(app, views={"billing": {"ann": 8}})
    t.feed("checks", {"id": "c1", "customer": "ann"}, {"id": "c2", "customer": "x"})
    assert [a["spent"] for a in t.emitted("alerts")] == [8, 0]

    bare = App("bare", state_dir="unused", on_error="stop")

    @bare.processor("checks")
    def on_check(ctx: Context, check: dict[str, Any]) -> None:
        ctx.lookup("billing", "ann")

    with pytest.raises(Exception, match=r"no view of app 'billing'"):
        Tester(bare).feed("checks", {"id": "1"})
