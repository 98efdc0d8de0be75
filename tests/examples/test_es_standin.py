"""The Elasticsearch stand-in answers like Elasticsearch 8 for the subset the sink uses."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson

from examples.es_standin import ElasticsearchStandin

NDJSON = {"Content-Type": "application/x-ndjson"}


def _bulk(*lines: dict[str, Any]) -> bytes:
    return b"".join(orjson.dumps(line) + b"\n" for line in lines)


async def _call(
    http: aiohttp.ClientSession, method: str, url: str, **kw: Any
) -> tuple[int, Any]:
    async with http.request(method, url, **kw) as resp:
        assert resp.headers["X-Elastic-Product"] == "Elasticsearch"
        return resp.status, await resp.json()


async def _count(http: aiohttp.ClientSession, es: ElasticsearchStandin, index: str) -> int:
    status, body = await _call(http, "GET", f"{es.url}/{index}/_count")
    assert status == 200
    return int(body["count"])


async def test_bulk_index_get_refresh_and_count(
    es: ElasticsearchStandin, http: aiohttp.ClientSession
) -> None:
    status, body = await _call(http, "PUT", f"{es.url}/items", json={"mappings": {}})
    assert (status, body["acknowledged"]) == (200, True)
    status, body = await _call(http, "PUT", f"{es.url}/items")
    assert status == 400
    assert body["error"]["type"] == "resource_already_exists_exception"

    status, body = await _call(http, "POST", f"{es.url}/_bulk", headers=NDJSON, data=_bulk(
        {"index": {"_index": "items", "_id": "a"}}, {"n": 1},
        {"index": {"_index": "items", "_id": "a"}}, {"n": 2},
        {"index": {"_index": "items", "_id": "b"}}, {"n": 3},
        {"delete": {"_index": "items", "_id": "zzz"}},
    ))
    assert status == 200 and body["errors"] is False
    assert [(next(iter(i)), next(iter(i.values()))["result"]) for i in body["items"]] == [
        ("index", "created"), ("index", "updated"), ("index", "created"),
        ("delete", "not_found"),
    ]
    # GET is real time; count and search only see what was refreshed.
    status, doc = await _call(http, "GET", f"{es.url}/items/_doc/a")
    assert (status, doc["_source"], doc["_version"]) == (200, {"n": 2}, 2)
    assert await _count(http, es, "items") == 0
    status, _ = await _call(http, "POST", f"{es.url}/items/_refresh")
    assert status == 200
    assert await _count(http, es, "items") == 2
    status, body = await _call(http, "POST", f"{es.url}/items/_search?size=1",
                               json={"query": {"term": {"n": 3}}})
    assert status == 200
    assert body["hits"]["total"]["value"] == 1
    assert body["hits"]["hits"][0]["_id"] == "b"
    status, doc = await _call(http, "GET", f"{es.url}/items/_doc/nope")
    assert (status, doc["found"]) == (404, False)
    status, body = await _call(http, "GET", f"{es.url}/nosuch/_doc/a")
    assert (status, body["error"]["type"]) == (404, "index_not_found_exception")


async def test_external_versions_refuse_older_writes_per_item(
    es: ElasticsearchStandin, http: aiohttp.ClientSession
) -> None:
    def idx(doc_id: str, version: int) -> dict[str, Any]:
        return {"index": {"_index": "v", "_id": doc_id, "version": version,
                          "version_type": "external_gte"}}

    status, body = await _call(
        http, "POST", f"{es.url}/_bulk?refresh=true", headers=NDJSON,
        data=_bulk(idx("a", 5), {"v": 5}, idx("a", 3), {"v": 3}, idx("a", 5), {"v": 55},
                   idx("b", 1), {"v": 1}),
    )
    assert status == 200 and body["errors"] is True
    statuses = [i["index"]["status"] for i in body["items"]]
    assert statuses == [201, 409, 200, 201]
    assert body["items"][1]["index"]["error"]["type"] == "version_conflict_engine_exception"
    _, doc = await _call(http, "GET", f"{es.url}/v/_doc/a")
    assert (doc["_version"], doc["_source"]) == (5, {"v": 55})
    # A versioned delete leaves a tombstone: an older index after it is refused too.
    _, body = await _call(http, "POST", f"{es.url}/_bulk", headers=NDJSON, data=_bulk(
        {"delete": {"_index": "v", "_id": "a", "version": 6, "version_type": "external_gte"}},
        idx("a", 5), {"v": 5},
    ))
    assert [i[k]["status"] for i, k in zip(body["items"], ["delete", "index"], strict=True)] == [
        200, 409]
    status, _ = await _call(http, "GET", f"{es.url}/v/_doc/a")
    assert status == 404
    assert await _count(http, es, "v") == 2  # refreshed before the delete: a and b


async def test_malformed_bulk_bodies_change_nothing(
    es: ElasticsearchStandin, http: aiohttp.ClientSession
) -> None:
    good = _bulk({"index": {"_index": "m", "_id": "a"}}, {"n": 1})
    bad_bodies = [
        good.rstrip(b"\n"),                                    # not newline-terminated
        good + b"{not json\n",                                 # a broken line after good ones
        good + _bulk({"update": {"_index": "m", "_id": "a"}}, {"doc": {}}),  # unsupported
        good + _bulk({"index": {"_index": "m", "_id": "b"}}),  # source missing
        good + _bulk({"index": {"_index": "m", "_id": "c", "version": 3}}, {"n": 1}),
        good + _bulk({"index": {"_index": "Upper", "_id": "c"}}, {"n": 1}),
        b"",
    ]
    for body in bad_bodies:
        status, answer = await _call(http, "POST", f"{es.url}/_bulk", headers=NDJSON,
                                     data=body)
        assert status == 400, body
        assert answer["error"]["reason"]
    async with http.post(f"{es.url}/_bulk", data=good,
                         headers={"Content-Type": "text/plain"}) as resp:
        assert resp.status == 406
    # Nothing of any of them was applied: the index was not even created.
    async with http.head(f"{es.url}/m") as resp:
        assert resp.status == 404
    status, body = await _call(http, "GET", f"{es.url}/_cat/indices")
    assert status == 400
    assert "no handler" in body["error"]["reason"]
