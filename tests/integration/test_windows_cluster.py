"""A window aggregate is exact with events written to two nodes, the streams out of order with
each other (one node's events all come before the other's), and duplicates on both nodes."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from chukcha import App, Client, Context
from chukcha.testing_cluster import run_cluster
from tests.integration.cluster_helpers import list_chunks, wait_for

pytestmark = [pytest.mark.allow_blocking, pytest.mark.timeout(180)]

T0 = 1_700_000_040  # a whole minute


def click(i: int, node: str, rng: random.Random) -> dict[str, Any]:
    return {"id": f"{node}{i}", "page": f"/p{rng.randrange(3)}", "ts": T0 + rng.uniform(0, 180)}


async def test_windows_are_exact_across_two_nodes(tmp_path: Path) -> None:
    rng = random.Random(7)  # noqa: S311 - test data, seeded
    # Each node's stream is in time order (within the grace), the two are not with each other.
    on_a = sorted((click(i, "a", rng) for i in range(300)), key=lambda c: c["ts"])
    on_b = sorted((click(i, "b", rng) for i in range(300)), key=lambda c: c["ts"])
    dup = on_b[:50]  # also written to node a: the same events twice
    closing = [{"id": f"end-{n}", "page": "/end", "ts": T0 + 1000} for n in "ab"]
    expected: dict[str, int] = {}
    for c in on_a + on_b:
        start = int(c["ts"] * 1000) - int(c["ts"] * 1000) % 60_000
        wid = f"window:clicks:{start}:{c['page']}"
        expected[wid] = expected.get(wid, 0) + 1

    async with run_cluster(tmp_path / "c", ("a", "b")) as cluster:
        a, b = cluster.urls
        async with Client([a]) as ca, Client([b]) as cb:
            await ca.send("clicks", on_a + dup)  # node a first, all of it
            await cb.send("clicks", on_b)
            await ca.send("clicks", closing[:1])
            await cb.send("clicks", closing[1:])
            async with aiohttp.ClientSession() as http:
                async def replicated() -> bool:
                    own = {c["name"]: c["size"] for c in await list_chunks(http, b, "clicks")
                           if c["name"].startswith("b-")}
                    there = {c["name"]: c["size"] for c in await list_chunks(http, a, "clicks")}
                    return all(there.get(n) == s for n, s in own.items())

                await wait_for(replicated, what="node b's clicks on node a")

            app = App("counter", nodes=[a], state_dir=tmp_path / "state")
            window = app.window("clicks", size=60, grace=5, emit_to="counts")

            @app.processor("clicks")
            def on_click(ctx: Context, c: dict[str, Any]) -> None:
                window.update(ctx, c["page"], c["ts"], lambda n: n + 1, initial=0)

            stop = asyncio.Event()
            task = asyncio.create_task(app.run_async(stop))
            counts: dict[str, int] = {}
            try:
                async with ca.consumer("counts") as consumer, asyncio.timeout(60):
                    while not expected.keys() <= counts.keys():
                        for batch in await consumer.read(timeout=1):
                            for m in batch.messages():
                                event = orjson.loads(m)
                                counts[event["id"]] = event["value"]
            finally:
                stop.set()
                await asyncio.wait_for(task, 30)
    assert counts == expected
    assert sum(counts.values()) == 600
