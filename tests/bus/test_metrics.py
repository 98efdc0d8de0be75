"""``/metrics`` and ``/groups/lag`` on real nodes: the values match the work done."""

from __future__ import annotations

import time
from pathlib import Path

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from chukcha.bus.chunks import STREAM_READ_OVER
from chukcha.client.ids import new_id
from chukcha.testing import run_cluster, run_node
from tests.integration.cluster_helpers import read_all, wait_for, write

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(http: aiohttp.ClientSession, url: str) -> Samples:
    async with http.get(f"{url}/metrics") as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_metrics_count_writes_reads_acks_and_requests(tmp_path: Path) -> None:
    async with run_node(tmp_path / "d", instance="m", max_chunk_size=300) as node, \
            aiohttp.ClientSession() as http:
        bodies = [b'{"n": %d, "pad": "%s"}\n' % (i, b"x" * 50) for i in range(10)]
        for body in bodies:
            assert (await write(http, node.url, "orders", body)).status == 200
        assert (await write(http, node.url, "orders", b"two\nmessages\n")).status == 200
        assert (await write(http, node.url, "orders", b"no newline")).status == 500
        messages = await read_all(http, node.url, "orders")
        assert len(messages) == 12
        first = node.store.list_chunks("orders")[0]
        async with http.get(f"{node.url}/ack", params={
            "category": "orders", "chunk": first.name, "size": str(first.size),
        }) as resp:
            assert resp.status == 200
        async with http.get(f"{node.url}/nope") as resp:
            assert resp.status == 404

        m = await scrape(http, node.url)
        written = sum(len(b) for b in bodies) + len(b"two\nmessages\n")
        assert value(m, "chukcha_written_bytes_total", category="orders") == written
        assert value(m, "chukcha_written_messages_total", category="orders") == 12
        assert value(m, "chukcha_write_requests_total", category="orders") == 11
        assert value(m, "chukcha_read_bytes_total", category="orders") == written
        assert value(m, "chukcha_read_messages_total", category="orders") == 12
        assert value(m, "chukcha_chunks_acknowledged_total", category="orders") == 1
        assert value(m, "chukcha_acks_total", category="orders", group="") == 1
        live = node.store.list_chunks("orders")
        assert value(m, "chukcha_chunk_bytes", category="orders") == sum(c.size for c in live)
        assert value(m, "chukcha_chunks", category="orders", complete="false") == 1
        assert value(m, "chukcha_chunks", category="orders", complete="true") == len(live) - 1
        assert value(m, "chukcha_http_requests_total", endpoint="/write", status="200") == 11
        assert value(m, "chukcha_http_requests_total", endpoint="/write", status="500") == 1
        assert value(m, "chukcha_http_requests_total", endpoint="other", status="404") == 1
        assert value(m, "chukcha_http_requests_total", endpoint="/ack", status="200") == 1
        assert value(m, "chukcha_http_request_duration_seconds_count", endpoint="/write") == 12
        assert value(m, "chukcha_http_request_duration_seconds_sum", endpoint="/write") > 0
        assert value(m, "chukcha_node_info", instance="m", cluster="standalone") == 1


async def test_messages_read_are_counted_in_small_and_streamed_reads(tmp_path: Path) -> None:
    started = time.monotonic()  # the /ui's first sample (all zeros) is taken after this
    async with run_node(tmp_path / "d", instance="m") as node, aiohttp.ClientSession() as http:
        # 3 writes of 1 MiB minus a little: one chunk of ~3 MiB, read whole in one /read of
        # 4 MiB (sent from the file piece by piece: over STREAM_READ_OVER).
        line = b"m" * 99 + b"\n"
        body = line * 10000
        for _ in range(3):
            assert (await write(http, node.url, "big", body)).status == 200
        [chunk] = node.store.list_chunks("big")
        assert chunk.size == 3 * len(body) > STREAM_READ_OVER
        reads_from = time.monotonic()  # the first sample was taken before any read
        # Two small reads first (in memory), cut to whole messages: 2 and then 1.
        for off, max_size, n in ((0, 250, 2), (200, 150, 1)):
            async with http.get(f"{node.url}/read", params={
                "category": "big", "chunk": chunk.name, "off": str(off),
                "max_size": str(max_size),
            }) as resp:
                assert resp.status == 200
                assert (await resp.read()).count(b"\n") == n
        m = await scrape(http, node.url)
        assert value(m, "chukcha_read_messages_total", category="big") == 3
        assert value(m, "chukcha_read_bytes_total", category="big") == 300

        messages = await read_all(http, node.url, "big")
        assert len(messages) == 30000
        m = await scrape(http, node.url)
        assert value(m, "chukcha_read_messages_total", category="big") == 30003
        assert value(m, "chukcha_read_bytes_total", category="big") == 300 + chunk.size
        # read_all: the big read, then one empty read at the end.
        assert value(m, "chukcha_read_requests_total", category="big") == 4

        # The /ui rate: 30003 messages since the first sample (within the 1 min window).
        asked = time.monotonic()
        async with http.get(f"{node.url}/ui/data") as resp:
            data = await resp.json()
        answered = time.monotonic()
        assert answered - started < 60
        [big] = [c for c in data["categories"] if c["name"] == "big"]
        rate = big["rates"]["60s"]["read_messages"]
        assert 30003 / (answered - started) <= rate <= 30003 / (asked - reads_from)


async def test_group_lag_counts_unacked_chunks_and_the_oldest_message_age(
    tmp_path: Path,
) -> None:
    async with run_node(tmp_path / "d", instance="m", max_chunk_size=100) as node, \
            aiohttp.ClientSession() as http:
        async with http.get(f"{node.url}/groups/register",
                            params={"category": "pay", "group": "billing"}) as resp:
            assert resp.status == 200
        born = time.time() - 30  # an ID made 30 s ago: its time is the message's age
        old_id = f"{int(born * 1000):012x}" + new_id()[12:]
        await write(http, node.url, "pay", orjson.dumps({"id": old_id, "pad": "p" * 90}) + b"\n")
        await write(http, node.url, "pay", orjson.dumps({"id": new_id(), "pad": "q" * 90}) + b"\n")
        chunks = node.store.list_chunks("pay")
        assert [c.complete for c in chunks] == [True, False]

        async with http.get(f"{node.url}/groups/lag", params={"category": "pay"}) as resp:
            lag = await resp.json()
        assert [(x["group"], x["chunks"], x["bytes"]) for x in lag] == [
            ("billing", 2, sum(c.size for c in chunks))
        ]
        assert 29 <= lag[0]["oldest_age"] < 300

        async with http.get(f"{node.url}/ack", params={
            "category": "pay", "chunk": chunks[0].name, "size": str(chunks[0].size),
            "group": "billing",
        }) as resp:
            assert resp.status == 200
        m = await scrape(http, node.url)
        assert value(m, "chukcha_consumer_lag_chunks", category="pay", group="billing") == 1
        assert value(m, "chukcha_consumer_lag_bytes", category="pay", group="billing") == (
            chunks[1].size
        )
        assert value(m, "chukcha_consumer_lag_seconds", category="pay", group="billing") < 29
        assert value(m, "chukcha_acks_total", category="pay", group="billing") == 1


async def test_a_node_without_metrics_answers_404(tmp_path: Path) -> None:
    async with run_node(tmp_path / "d", metrics=False) as node, \
            aiohttp.ClientSession() as http, http.get(f"{node.url}/metrics") as resp:
        assert resp.status == 404


@pytest.mark.allow_blocking
@pytest.mark.timeout(120)
async def test_metrics_of_a_three_node_cluster_match_the_replicated_work(tmp_path: Path) -> None:
    async with run_cluster(tmp_path) as cluster, aiohttp.ClientSession() as http:
        body = b"".join(b"event %04d\n" % i for i in range(200))
        for _ in range(5):
            assert (await write(http, cluster["a"].url, "events", body)).status == 200
        total = 5 * len(body)

        async def replicated() -> bool:
            for name in ("b", "c"):
                m = await scrape(http, cluster[name].url)
                if value(m, "chukcha_replicated_bytes_total", category="events") != total:
                    return False
            return True

        await wait_for(replicated, timeout=60, what="b and c to hold a's writes")
        a = await scrape(http, cluster["a"].url)
        assert value(a, "chukcha_written_bytes_total", category="events") == total
        assert value(a, "chukcha_written_messages_total", category="events") == 1000
        for name in ("b", "c"):
            m = await scrape(http, cluster[name].url)
            assert value(m, "chukcha_written_bytes_total", category="events") == 0
            assert value(m, "chukcha_chunk_bytes", category="events") == total
            assert value(m, "chukcha_replication_downloaded_bytes_total", peer="a") == total
            assert value(m, "chukcha_replication_peer_up", peer="a") == 1
            assert value(m, "chukcha_replication_lag_bytes", peer="a") == 0
            assert value(m, "chukcha_replication_lag_seconds", peer="a") == 0
            assert value(m, "chukcha_node_info", instance=name, cluster="static") == 1
        # The replicas read a's chunk through /read: a served them every byte at least once.
        assert value(a, "chukcha_read_bytes_total", category="events") >= 2 * total
