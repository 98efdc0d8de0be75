"""The Elasticsearch sink ("entity changed" pattern) against the stand-in, over real HTTP."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from examples.elastic_sink import (
    ElasticsearchBulkError,
    ElasticsearchSink,
    ProductCatalog,
    entity_id_of,
)
from examples.es_standin import ElasticsearchStandin


async def _doc(http: aiohttp.ClientSession, es: ElasticsearchStandin, pid: str) -> Any:
    async with http.get(f"{es.url}/products/_doc/{pid}") as resp:
        body = await resp.json()
        return body["_source"] if resp.status == 200 else None


async def _expected(catalog: ProductCatalog, ids: list[str]) -> dict[str, Any]:
    current = await catalog.fetch(ids)
    return {pid: (dict(e.document) if e.document is not None else None)
            for pid, e in current.items()}


async def test_replays_reordering_and_duplicates_converge(
    tmp_path: Path, es: ElasticsearchStandin, http: aiohttp.ClientSession
) -> None:
    rng = random.Random(6)  # noqa: S311 - a reproducible shuffle, not a secret
    catalog = ProductCatalog(tmp_path / "products.sqlite3")
    await catalog.create()
    ids = [f"p{i}" for i in range(15)]
    delivered: list[str] = []   # every "changed" event ever produced (entity IDs)
    pending: list[str] = []     # produced but not flushed yet
    async with ElasticsearchSink(es.url, "products", catalog) as sink:
        for step in range(150):
            pid = rng.choice(ids)
            if rng.random() < 0.15:
                await catalog.remove(pid)
            else:
                await catalog.put(pid, f"name-{pid}-{step}", rng.randrange(1, 10_000))
            delivered.append(pid)
            pending.append(pid)
            if rng.random() < 0.3:
                # A batch: some pending events in any order, plus replays of old ones.
                rng.shuffle(pending)
                cut = rng.randrange(len(pending) + 1)
                batch, pending = pending[:cut], pending[cut:]
                batch += rng.sample(delivered, min(len(delivered), rng.randrange(5)))
                await sink.flush(batch)
        rng.shuffle(pending)
        await sink.flush(pending + pending[:3])
        await sink.flush(rng.sample(delivered, 30))  # a late replay after everything
    expected = await _expected(catalog, ids)
    assert any(doc is None for doc in expected.values())      # the run deleted some
    assert any(doc is not None for doc in expected.values())
    for pid in ids:
        want = expected.get(pid)
        assert await _doc(http, es, pid) == want, pid
    async with http.post(f"{es.url}/products/_refresh"), \
            http.get(f"{es.url}/products/_count") as resp:
        assert (await resp.json())["count"] == sum(d is not None for d in expected.values())


async def test_a_flush_with_stale_data_never_goes_back_in_time(
    tmp_path: Path, es: ElasticsearchStandin, http: aiohttp.ClientSession
) -> None:
    catalog = ProductCatalog(tmp_path / "products.sqlite3")
    await catalog.create()
    for price in (10, 20):
        await catalog.put("p1", "lamp", price)  # version 2 in the catalog
    # A newer version (3) was indexed already, say by a sink that read a fresher replica.
    newer = {"name": "lamp", "price": 30, "version": 3}
    async with http.put(
        f"{es.url}/products/_doc/p1", json=newer,
        params={"version": "3", "version_type": "external_gte"},
    ) as resp:
        assert resp.status == 400  # the stand-in implements _bulk, not single-document PUT
    body = (b'{"index":{"_index":"products","_id":"p1","version":3,'
            b'"version_type":"external_gte"}}\n{"name":"lamp","price":30,"version":3}\n')
    async with http.post(f"{es.url}/_bulk", data=body,
                         headers={"Content-Type": "application/x-ndjson"}) as resp:
        assert resp.status == 200
    async with ElasticsearchSink(es.url, "products", catalog) as sink:
        await sink.flush(["p1"])  # the 409 for the stale version counts as done
        assert sink.stale_skipped == 1
    assert await _doc(http, es, "p1") == newer


async def test_duplicates_in_a_batch_are_sent_once_and_empty_flush_sends_nothing(
    tmp_path: Path, es: ElasticsearchStandin, http: aiohttp.ClientSession
) -> None:
    catalog = ProductCatalog(tmp_path / "products.sqlite3")
    await catalog.create()
    await catalog.put("p1", "chair", 5)
    async with ElasticsearchSink(es.url, "products", catalog) as sink:
        before = es.requests
        await sink.flush([])
        assert es.requests == before
        await sink.flush(["p1", "p1", "p1", "never-existed"])
        assert es.requests == before + 1
    assert await _doc(http, es, "p1") == {"name": "chair", "price": 5, "version": 1}
    assert await _doc(http, es, "never-existed") is None


async def test_failures_raise_so_the_framework_retries(
    tmp_path: Path, es: ElasticsearchStandin
) -> None:
    catalog = ProductCatalog(tmp_path / "products.sqlite3")
    await catalog.create()
    await catalog.put("p1", "desk", 7)
    with pytest.raises(ElasticsearchBulkError, match="cannot create index"):
        await ElasticsearchSink(es.url, "bad*name", catalog).start()
    sink = ElasticsearchSink(es.url, "products", catalog)
    await es.stop()
    with pytest.raises(aiohttp.ClientConnectionError):
        await sink.flush(["p1"])
    await sink.stop()


def test_bad_arguments_are_rejected() -> None:
    catalog = ProductCatalog(Path("unused.sqlite3"))
    with pytest.raises(ValueError, match="index"):
        ElasticsearchSink("http://127.0.0.1:1", "Products", catalog)
    with pytest.raises(ValueError, match="index"):
        ElasticsearchSink("http://127.0.0.1:1", "a#b", catalog)
    with pytest.raises(ValueError, match="timeout"):
        ElasticsearchSink("http://127.0.0.1:1", "products", catalog, timeout=-1)
    with pytest.raises(ValueError, match="product_id"):
        entity_id_of({"id": "e1"})
    assert entity_id_of({"id": "e1", "product_id": "p9"}) == "p9"


async def test_a_sink_that_was_never_started_still_works(
    tmp_path: Path, es: ElasticsearchStandin, http: aiohttp.ClientSession
) -> None:
    catalog = ProductCatalog(tmp_path / "products.sqlite3")
    await catalog.create()
    await catalog.put("p1", "shelf", 9)
    sink = ElasticsearchSink(es.url, "products", catalog)  # no start(): a session per flush
    await sink.flush(["p1"])
    await sink.flush(["p1"])
    assert await _doc(http, es, "p1") == {"name": "shelf", "price": 9, "version": 1}
