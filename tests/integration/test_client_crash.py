"""A group consumer SIGKILLed mid-chunk and restarted from its saved positions loses nothing."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import orjson

from chukcha.client import Client
from chukcha.testing import run_node

# The consumer under test: for each batch, "process" it (append to OUT, fsync), save the
# positions atomically, commit (which acks finished chunks for the group), then report on stdout.
WORKER = r"""
import asyncio, os, sys
import orjson
from chukcha.client import Client, Position

async def main() -> None:
    url, category, group, pos_path, out_path = sys.argv[1:]
    positions = {}
    if os.path.exists(pos_path):
        with open(pos_path, "rb") as f:
            positions = {o: Position.from_json(p) for o, p in orjson.loads(f.read()).items()}
    async with Client([url]) as client:
        consumer = client.consumer(category, group=group, positions=positions,
                                   max_batch_bytes=300)
        async with consumer:
            with open(out_path, "ab") as out:
                while True:
                    for batch in await consumer.read():
                        out.write(batch.data)
                        out.flush()
                        os.fsync(out.fileno())
                        positions[batch.owner] = batch.position
                        with open(pos_path + ".tmp", "wb") as f:
                            f.write(orjson.dumps({o: p.to_json() for o, p in positions.items()}))
                            f.flush()
                            os.fsync(f.fileno())
                        os.replace(pos_path + ".tmp", pos_path)
                        await consumer.commit({batch.owner: batch.position})
                        print(len(batch.messages()), flush=True)

asyncio.run(main())
"""


async def start_worker(url: str, tmp: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", WORKER, url, "orders", "billing",
        str(tmp / "positions.json"), str(tmp / "out.ndjson"),
        stdout=asyncio.subprocess.PIPE,
    )


async def processed(tmp: Path) -> list[str]:
    data = await asyncio.to_thread((tmp / "out.ndjson").read_bytes)
    return [orjson.loads(line)["id"] for line in data.splitlines()]


async def test_killed_group_consumer_resumes_from_saved_positions(tmp_path: Path) -> None:
    async with (
        run_node(tmp_path / "n", instance="a", max_chunk_size=1000) as node,
        Client([node.url]) as c,
    ):
        sent: list[str] = []
        for i in range(30):
            sent += await c.send("orders", [{"i": i, "k": k} for k in range(10)])
        chunks_before = [x.name for x in await c.list_chunks("orders")]
        assert len(chunks_before) > 5

        worker = await start_worker(node.url, tmp_path)
        try:
            async with asyncio.timeout(30):
                assert worker.stdout is not None
                seen = 0
                while seen < 100:  # mid-stream: about a third, batches are partial chunks
                    line = await worker.stdout.readline()
                    assert line, "the worker exited early"
                    seen += int(line)
            worker.send_signal(signal.SIGKILL)
            await worker.wait()
            before = await processed(tmp_path)
            assert 100 <= len(set(before)) < len(sent)

            worker = await start_worker(node.url, tmp_path)
            async with asyncio.timeout(30):
                assert worker.stdout is not None
                while set(await processed(tmp_path)) != set(sent):
                    assert await worker.stdout.readline(), "the worker exited early"
        finally:
            if worker.returncode is None:
                worker.send_signal(signal.SIGKILL)
                await worker.wait()

        got = await processed(tmp_path)
        assert set(got) == set(sent)  # nothing lost; a redelivered tail is allowed
        assert len(got) - len(sent) <= 30  # only what was in flight at the kill came twice
        # Every chunk before the open one was acked by the group, and only after processing.
        live = [x.name for x in await c.list_chunks("orders")]
        assert live == chunks_before[-1:]
