"""End to end: "product changed" events (duplicated on two nodes, out of order, replayed) ->
the Elasticsearch example app (in process) -> the stand-in. The index converges to the catalog."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

from chukcha.bus.config import parse_peers
from chukcha.bus.node import Node
from chukcha.client import Client
from chukcha.testing import bind_loopback, run_node
from examples.elastic_sink import ProductCatalog, build_app
from examples.es_standin import ElasticsearchStandin


@asynccontextmanager
async def two_nodes(root: Path) -> AsyncIterator[tuple[Node, Node]]:
    """Two in-process nodes replicating each other (sockets bound first, so peers are known)."""
    socks = [bind_loopback(), bind_loopback()]
    peers = parse_peers(",".join(
        f"{name}={s.getsockname()[0]}:{s.getsockname()[1]}"
        for name, s in zip("ab", socks, strict=True)
    ))
    async with AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(
                run_node(root / name, instance=name, listen_fd=s.detach(), peers=peers)
            )
            for name, s in zip("ab", socks, strict=True)
        ]
        yield nodes[0], nodes[1]


async def test_changes_converge_despite_duplicates_reordering_and_replays(
    tmp_path: Path, es: ElasticsearchStandin
) -> None:
    rng = random.Random(7)  # noqa: S311 - a reproducible shuffle, not a secret
    catalog = ProductCatalog(tmp_path / "products.sqlite3")
    await catalog.create()
    ids = [f"p{i}" for i in range(20)]
    async with two_nodes(tmp_path) as (a, b), Client([a.url, b.url]) as client:
        the_app, sink = build_app([a.url], str(tmp_path / "state"), es.url, catalog,
                                  index="products")
        stop = asyncio.Event()
        async with sink, asyncio.TaskGroup() as tg:
            run = tg.create_task(the_app.run_async(stop))
            events: list[dict[str, Any]] = []
            for step in range(200):
                pid = rng.choice(ids)
                if rng.random() < 0.15:
                    await catalog.remove(pid)
                else:
                    await catalog.put(pid, f"{pid} v{step}", rng.randrange(1, 1000))
                events.append({"id": f"change-{step}", "product_id": pid})
                if len(events) % 25 == 0:
                    # A burst in any order, each event on both nodes (a retried send), plus an
                    # old change replayed under a new ID (say, from a backup).
                    burst = events[-25:]
                    rng.shuffle(burst)
                    await client.send_to(b.url, "product-changes", burst)
                    await client.send_to(a.url, "product-changes", burst[::-1])
                    old = rng.choice(events)
                    await client.send("product-changes",
                                      [{"id": f"replay-{step}", "product_id": old["product_id"]}])
            current = await catalog.fetch(ids)
            expected = {pid: dict(e.document) for pid, e in current.items()
                        if e.document is not None}
            assert 0 < len(expected) < len(ids)  # some products were deleted, some remain
            await es.wait_until(lambda s: s.documents("products") == expected, timeout=60)
            stop.set()
        assert run.exception() is None
    assert es.documents("products") == expected
