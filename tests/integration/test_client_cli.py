"""``chukcha send|tail|ls|status`` as subprocesses against real nodes."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from aiohttp import web

from chukcha.bus.node import Node
from chukcha.client import Client
from chukcha.testing import run_node


async def chukcha(
    *args: str, stdin: bytes | None = None, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chukcha", *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, **(env or {})},
    )
    async with asyncio.timeout(30):
        out, err = await proc.communicate(stdin)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
async def small(tmp_path: Path) -> AsyncIterator[Node]:
    async with run_node(tmp_path / "small", instance="kyiv", max_chunk_size=200) as n:
        yield n


async def test_send_a_file_then_tail_and_ls(node: Node, tmp_path: Path) -> None:
    lines = [orjson.dumps({"id": f"e{i}", "n": i}) for i in range(500)]
    path = tmp_path / "events.ndjson"
    await asyncio.to_thread(path.write_bytes, b"\n".join(lines) + b"\n\n")  # a blank line too
    code, _, err = await chukcha("send", "orders", str(path), "--node", node.url)
    assert (code, err.startswith("sent 500 events to orders")) == (0, True), err

    code, out, err = await chukcha("tail", "orders", "--node", node.url)
    assert code == 0, err
    assert out.encode().splitlines() == lines

    code, out, _ = await chukcha("ls", "--node", node.url)
    assert code == 0
    assert out.split() == ["CATEGORY", "CHUNKS", "BYTES", "orders", "1",
                           str(sum(map(len, lines)) + 500)]


async def test_options_may_come_between_positionals(node: Node, tmp_path: Path) -> None:
    path = tmp_path / "two.ndjson"
    await asyncio.to_thread(path.write_bytes, b'{"id": "a"}\n{"id": "b"}\n')
    code, _, err = await chukcha("send", "orders", "--node", node.url, str(path))
    assert code == 0, err
    code, out, err = await chukcha("tail", "--node", node.url, "orders")
    assert (code, out) == (0, '{"id": "a"}\n{"id": "b"}\n'), err


async def test_send_from_stdin_with_nodes_from_the_environment(node: Node) -> None:
    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))  # never listens: refuses, so the second node is used
    try:
        dead = "http://127.0.0.1:%d" % refused.getsockname()[1]  # noqa: UP031
        code, _, err = await chukcha("send", "c", stdin=b"a\nb\n",
                                     env={"CHUKCHA_NODES": f"{dead},{node.url}"})
    finally:
        refused.close()
    assert code == 0, err
    async with Client([node.url]) as c:
        assert [x.size for x in await c.list_chunks("c")] == [4]


async def test_tail_with_a_group_acks_what_it_printed(small: Node) -> None:
    async with Client([small.url]) as c:
        for i in range(5):
            await c.send("g", [b"%d" % i * 150])
        await c.register_group("g", "other")  # so that our acks do not delete anything
        chunks = [x.name for x in await c.list_chunks("g")]
        code, out, err = await chukcha("tail", "g", "--group", "mine", "--commit",
                                       "--node", small.url)
        assert code == 0, err
        assert out.splitlines() == [str(i) * 150 for i in range(5)]
        code, out, _ = await chukcha("ls", "g", "--node", small.url)
        assert "groups: mine, other" in out
        acked = [line.split()[0] for line in out.splitlines() if line.endswith(" mine")]
        assert acked == chunks[:-1]  # every complete chunk, not the open one
        # A second run prints only what the group has not acked (the open chunk).
        code, out, err = await chukcha("tail", "g", "--group", "mine", "--node", small.url)
        assert (code, out.splitlines()) == (0, ["4" * 150]), err


@pytest.mark.allow_blocking
async def test_tail_follow_prints_new_events(node: Node) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chukcha", "tail", "live", "--follow", "--node", node.url,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        async with Client([node.url]) as c, asyncio.timeout(30):
            await c.send("live", [b"first"])
            assert await proc.stdout.readline() == b"first\n"
            await c.send("live", [b"second"])
            assert await proc.stdout.readline() == b"second\n"
    finally:
        proc.send_signal(signal.SIGTERM)
        await proc.wait()


async def test_status_of_a_node_and_of_a_node_without_status(node: Node) -> None:
    code, out, err = await chukcha("status", "--node", node.url)
    assert code == 0, err
    assert "instance moscow" in out

    app = web.Application()  # answers 404 to everything, as a Go node does to /status
    runner = web.AppRunner(app)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    site = web.SockSite(runner, sock)
    await site.start()
    try:
        url = "http://127.0.0.1:%d" % sock.getsockname()[1]  # noqa: UP031
        code, out, err = await chukcha("status", "--node", url)
    finally:
        await runner.cleanup()
    assert code == 0, err
    assert "no /status" in out


async def test_errors_are_one_line_and_a_failure_exit_code(node: Node) -> None:
    code, out, err = await chukcha("tail", "bad/category", "--node", node.url)
    assert code == 1 and out == ""
    assert err.startswith("chukcha: error: ") and err.count("\n") == 1, err
    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))
    try:
        url = "http://127.0.0.1:%d" % refused.getsockname()[1]  # noqa: UP031
        code, out, err = await chukcha("ls", "--node", url)
    finally:
        refused.close()
    assert code == 1
    assert err.startswith("chukcha: error: ") and err.count("\n") == 1, err
    code, _, err = await chukcha("send", "c", str(node.config.data_dir / "missing"),
                                 "--node", node.url)
    assert code == 1 and "No such file" in err


async def test_send_streams_stdin_line_by_line(node: Node) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chukcha", "send", "s", "--node", node.url,
        stdin=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None
    try:
        proc.stdin.write(b"one\n")
        await proc.stdin.drain()
        async with Client([node.url]) as c, c.consumer("s") as consumer, asyncio.timeout(30):
            got: list[bytes] = []
            while not got:  # arrives while stdin is still open
                for batch in await consumer.read():
                    got += batch.messages()
            assert got == [b"one"]
            proc.stdin.write(b"two")  # the last line without a newline
            proc.stdin.close()
            assert await proc.wait() == 0
            assert [x.size for x in await c.list_chunks("s")] == [8]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_retention_is_set_and_shown(node: Node) -> None:
    code, out, err = await chukcha("retention", "r", "--max-age", "1h30m", "--max-bytes",
                                   "5000", "--node", node.url)
    assert code == 0, err
    assert out.startswith(f"{node.url}: r: max age 1h30m") and "max bytes 5000" in out
    assert node.groups.registry.retention("r").max_age == 5400
    code, _, err = await chukcha("retention", "r", "--max-age", "soon", "--node", node.url)
    assert code == 2 and "invalid duration" in err
