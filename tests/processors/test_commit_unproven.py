"""A commit of several partitions whose owner cannot prove its ownership (an instance through
etcd stopping every partition after its lease lapsed) raises one
:class:`~chukcha.processors.checkpoint.OwnershipUnproven`, which the partition loop ends on
quietly, not an ExceptionGroup of them, which failed the whole instance (seen in a
SIGSTOP/SIGCONT run: both partitions' proofs were refused in the same commit)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from chukcha import App, Context
from chukcha.partitioning import partition_of
from chukcha.processors.checkpoint import OwnershipUnproven
from chukcha.processors.tester import Tester


def _app() -> App:
    app = App("billing", partitions=2)

    @app.processor("orders", key=lambda order: order["customer"])
    def on_order(ctx: Context, order: dict[str, Any]) -> None:
        ctx.set(ctx.key, order["amount"])
        ctx.emit("receipts", {"customer": ctx.key})

    return app


async def test_a_commit_of_two_unproven_partitions_raises_one_ownership_unproven() -> None:
    tester = Tester(_app())
    waiting: list[str] = []
    both_waiting, refuse = asyncio.Event(), asyncio.Event()

    def proof(name: str) -> Callable[[], Awaitable[bool]]:
        async def prove() -> bool:
            # Both commits wait for the proof, then both are refused at once (as when
            # every partition is being stopped).
            waiting.append(name)
            if len(waiting) == 2:
                both_waiting.set()
            await refuse.wait()
            return False
        return prove

    for checkpoint in tester.partitions.checkpoints:
        checkpoint.owner_proof = proof(checkpoint.name)
    customers = [f"c{i}" for i in range(20)]
    assert {partition_of(c, 2) for c in customers} == {0, 1}
    feed = asyncio.create_task(
        tester.feed_async("orders", *({"customer": c, "amount": 1} for c in customers)))
    await asyncio.wait_for(both_waiting.wait(), 10)
    refuse.set()
    with pytest.raises(OwnershipUnproven):
        await asyncio.wait_for(feed, 10)
