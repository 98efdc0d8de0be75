"""A small write gathered for the iteration's end (enough connections open, see
test_gathered_writes) with more behind it on its connection: a request refused at its headers,
a partial request while the node stops. The write's answer is sent all the same, before the
refusal or the close."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from chukcha.bus.connection import ConnectionState
from chukcha.bus.node import Node
from chukcha.bus.web import Request, Response
from tests.bus.conftest import Api, front_and_writer, read_file
from tests.bus.test_gathered_writes import _MANY, C0, _gathering_on, _post, _raw

_REFUSED = {
    "body over the limit": (400, b"POST /write?category=c HTTP/1.1\r\nHost: t\r\n"
                                 b"Content-Length: 999999999999\r\n\r\n"),
    "headers over the limit": (431, b"GET /listCategories HTTP/1.1\r\nHost: t\r\nX-Big: "
                                    + b"a" * (70 << 10) + b"\r\n\r\n"),
    "bad syntax": (400, b"GET /listCategories HTTP/1.1\r\nno colon here\r\n\r\n"),
}


async def _answers(reader: asyncio.StreamReader) -> bytes:
    async with asyncio.timeout(10):
        return await reader.read()  # all of them: the node closes after the refusal


@pytest.mark.parametrize("refused", _REFUSED, ids=list(_REFUSED))
@pytest.mark.parametrize("sync", ["", "&sync=1"], ids=["gathered", "synced (handler)"])
async def test_a_write_before_a_refused_request_is_answered_then_the_refusal(
    node: Node, api: Api, refused: str, sync: str
) -> None:
    status, request = _REFUSED[refused]
    await api.write("c", b"first\n")
    others = await _gathering_on(node)
    reader, writer = await _raw(node)
    write = _post("c", b"landed\n").replace(b"category=c", b"category=c" + sync.encode())
    writer.write(write + request)  # one packet: the refusal is parsed before the write's answer
    data = await _answers(reader)
    writer.close()
    for other in others:
        other.close()
    assert await read_file(node.config.data_dir / "c" / C0) == b"first\nlanded\n"
    assert data.startswith(b"HTTP/1.1 200 OK\r\n"), data  # the write that landed is answered
    assert data.count(b"HTTP/1.1 ") == 2, data
    assert b"\r\n\r\nHTTP/1.1 %d " % status in data, data  # then the refusal, then the close


async def test_a_front_answers_a_write_before_a_refused_request(tmp_path: Path) -> None:
    async with front_and_writer(tmp_path) as (node, _, port):
        other = await asyncio.open_connection("127.0.0.1", port)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(_post("c", b"landed\n") + _REFUSED["body over the limit"][1])
        data = await _answers(reader)
        writer.close()
        other[1].close()
        chunks = node.store.list_chunks("c")
        assert await read_file(tmp_path / "data" / "c" / chunks[0].name) == b"landed\n"
        assert data.startswith(b"HTTP/1.1 200 OK\r\n"), data
        assert data.count(b"HTTP/1.1 ") == 2, data
        assert b"\r\n\r\nHTTP/1.1 400 " in data, data


async def test_stop_answers_a_gathered_write_with_a_partial_request_behind_it(
    node: Node, api: Api
) -> None:
    await api.write("s", b"start\n")
    others = await _gathering_on(node)
    reader, writer = await _raw(node)
    writer.write(_post("s", b"landed\n") + b"GET /listCategories HTTP/1.1\r\nHo")  # 2nd: partial
    async with asyncio.timeout(10):
        while node.server.deferred == 0:  # noqa: ASYNC110 - polled until the node took the write
            await asyncio.sleep(0)
    await node.server.stop(10)
    async with asyncio.timeout(10):
        data = await reader.read()
    writer.close()
    for other in others:
        other.close()
    assert await read_file(node.config.data_dir / "s" / C0) == b"start\nlanded\n"
    assert data.startswith(b"HTTP/1.1 200 OK\r\n"), data
    assert data.count(b"HTTP/1.1 ") == 1, data  # then closed: the partial one is never answered


async def test_a_write_completed_while_the_node_stops_is_answered(node: Node, api: Api) -> None:
    """A write whose body completes while stop() waits for a running handler is answered: it is
    not gathered for an iteration's end that stop() no longer waits for (it used to land in the
    chunk with its connection aborted: no answer, so a retry would store it twice)."""
    await api.write("w", b"start\n")
    mid_body = []  # connections that stay open through the stop (mid-body)
    for _ in range(_MANY + 1):
        _, other = await _raw(node)
        other.write(b"POST /write?category=w HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nab")
        mid_body.append(other)
    reader, writer = await _raw(node)
    writer.write(_post("w", b"landed\n")[:-1])  # all but the body's last byte
    entered, go = asyncio.Event(), asyncio.Event()

    async def slow(request: Request) -> Response:
        entered.set()
        await go.wait()
        writer.write(b"\n")  # the write's last byte, sent as this handler ends
        return Response(text="slow\n")

    node.router.routes["/slow"] = slow
    _, slow_writer = await _raw(node)
    slow_writer.write(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
    async with asyncio.timeout(10):
        await entered.wait()
        while sum(c.state is ConnectionState.BODY for c in node.server.connections) \
                < _MANY + 2:  # noqa: ASYNC110 - polled until the node read every body start
            await asyncio.sleep(0)
    stop = asyncio.create_task(node.server.stop(10))
    async with asyncio.timeout(10):
        while not node.server._closing:  # noqa: ASYNC110 - stop() now waits for the handler
            await asyncio.sleep(0)
    go.set()
    await stop
    async with asyncio.timeout(10):
        data = await reader.read()
    for w in [*mid_body, writer, slow_writer]:
        w.close()
    assert await read_file(node.config.data_dir / "w" / C0) == b"start\nlanded\n"
    assert data.startswith(b"HTTP/1.1 200 OK\r\n"), data


@pytest.mark.parametrize("shape", ["gathered", "gathered sync=1", "handler (new category)",
                                   "big, on the loop"])
async def test_a_write_whose_bytes_are_in_is_answered_200_when_counting_its_messages_fails(
    node: Node, api: Api, monkeypatch: pytest.MonkeyPatch, shape: str,
) -> None:
    # Counting a write's messages (numpy, for the metrics) comes after its append: should it
    # fail (numpy out of memory), the write is in the chunk all the same, so its answer is 200
    # (a 500 makes the client send it again: stored twice), and the writes gathered with it
    # are answered too (before, the gathered ones never were: their clients waited for good).
    from chukcha.bus import chunks  # noqa: PLC0415
    from chukcha.protocol import count_newlines as real  # noqa: PLC0415

    failed: list[int] = []

    def count(data: bytes | bytearray | memoryview) -> int:
        if b"boom" in bytes(data):
            failed.append(len(data))
            raise MemoryError
        return real(data)

    category = "n" if shape.startswith("handler") else "c"
    await api.write("c", b"first\n")
    monkeypatch.setattr(chunks, "count_newlines", count)
    if shape.startswith("big"):
        monkeypatch.setattr(chunks, "BIG_IN_THREAD_AFTER_SMALL", 0)
        body = b"boom\n" + b"x" * 99 + b"\n" + b"y" * 100_000 + b"\n"
    else:
        body = b"boom\nboom\n"
    query = "&sync=1" if "sync=1" in shape else ""
    reader, writer = await _raw(node)
    writer.write(_post(category, body).replace(b"category=%b" % category.encode(),
                                               b"category=%b%b" % (category.encode(),
                                                                   query.encode())))
    async with asyncio.timeout(10):
        head = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    assert head.startswith(b"HTTP/1.1 200 OK\r\n"), head
    assert failed, f"the write ({shape}) was never counted where counting fails"
    expected = (b"first\n" if category == "c" else b"") + body
    assert await read_file(node.config.data_dir / category / C0) == expected
    assert node.store.traffic()[category].messages_written == expected.count(b"\n")
