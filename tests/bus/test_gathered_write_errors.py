"""A small write gathered for the iteration's end (another connection open, see
test_gathered_writes) with more behind it on its connection: a request refused at its headers,
a partial request while the node stops. The write's answer is sent all the same, before the
refusal or the close."""

from __future__ import annotations

import asyncio

from chukcha.bus.node import Node
from tests.bus.conftest import Api, read_file
from tests.bus.test_gathered_writes import C0, _post, _raw


async def test_stop_answers_a_gathered_write_with_a_partial_request_behind_it(
    node: Node, api: Api
) -> None:
    await api.write("s", b"start\n")
    other = await _raw(node)
    reader, writer = await _raw(node)
    writer.write(_post("s", b"landed\n") + b"GET /listCategories HTTP/1.1\r\nHo")  # 2nd: partial
    async with asyncio.timeout(10):
        while node.server.deferred == 0:  # noqa: ASYNC110 - polled until the node took the write
            await asyncio.sleep(0)
    await node.server.stop(10)
    async with asyncio.timeout(10):
        data = await reader.read()
    writer.close()
    other[1].close()
    assert await read_file(node.config.data_dir / "s" / C0) == b"start\nlanded\n"
    assert data.startswith(b"HTTP/1.1 200 OK\r\n"), data
    assert data.count(b"HTTP/1.1 ") == 1, data  # then closed: the partial one is never answered
