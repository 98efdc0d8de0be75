"""Big request bodies on real sockets: over 64 KiB they are received straight into one buffer
(``chukcha.bus.body_reader.BodyReader``), not through the parser. Both event loops (asyncio's, and
uvloop, which the node runs on), plain and TLS: split anywhere, pipelined, with ``Expect:
100-continue``, a client that leaves or pauses mid-body."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chukcha.bus import web
from chukcha.bus.server import HttpServer, Router, ServerLimits
from chukcha.testing import bind_loopback, run_node
from tests.bus.test_auth import make_cert
from tests.integration.cluster_helpers import wait_for

LIMITS = ServerLimits(max_body_size=1 << 20, memory_budget=8 << 20)
BIG = 64 << 10  # bodies over this are received straight into their buffer
LOOPS = ["asyncio", "uvloop"]


def _run(loop: str, main: Coroutine[Any, Any, None]) -> None:
    if loop == "uvloop":
        uvloop.run(main)
    else:
        asyncio.run(main)


class _Echo:
    """Answers ``<type of the body> <its bytes>`` and counts the requests it saw."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        self.calls += 1
        body = await request.read()
        return web.Response(body=type(body).__name__.encode() + b" " + body)


@contextlib.asynccontextmanager
async def _served(
    limits: ServerLimits = LIMITS, tls: ssl.SSLContext | None = None,
) -> AsyncIterator[tuple[HttpServer, _Echo, tuple[str, int]]]:
    echo = _Echo()
    router = Router()
    router.add_routes({"/echo": echo})
    server = HttpServer(router, limits)
    sock = bind_loopback()
    sock.listen(16)
    await server.start(sock, ssl=tls)
    try:
        yield server, echo, sock.getsockname()[:2]
    finally:
        await server.stop(1.0)


def _true(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def holds() -> bool:
        return check()

    return holds


def _req(body: bytes, *, expect: bool = False) -> bytes:
    extra = b"Expect: 100-continue\r\n" if expect else b""
    return b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n%b\r\n%b" % (
        len(body), extra, body)


async def _response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    async with asyncio.timeout(20):
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 100 "):  # an interim 100 Continue
                break
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        return int(head[9:12]), await reader.readexactly(length)


def _expected(body: bytes) -> bytes:
    return (b"bytearray " if len(body) > BIG else b"bytes ") + body


async def _exchange(address: tuple[str, int], bodies: list[bytes], cuts: list[int],
                    expect: bool, tls: ssl.SSLContext | None = None) -> None:
    """Send the requests as one stream cut at ``cuts`` (each piece drained before the next),
    then check every answer, in order."""
    stream = b"".join(_req(b, expect=expect and i == 0) for i, b in enumerate(bodies))
    reader, writer = await asyncio.open_connection(*address, ssl=tls)
    try:
        at = 0
        for cut in [*sorted({c % len(stream) for c in cuts}), len(stream)]:
            writer.write(stream[at:cut])
            await writer.drain()
            at = cut
        for body in bodies:
            status, answer = await _response(reader)
            assert status == 200, answer[:200]
            assert answer == _expected(body), (len(answer), len(body))
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


_sizes = st.lists(st.one_of(st.integers(1, 2000), st.integers(BIG - 2, 3 * BIG),
                            st.integers(600_000, 1 << 20)), min_size=1, max_size=4)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(loop=st.sampled_from(LOOPS), sizes=_sizes, cuts=st.lists(st.integers(0, 1 << 23),
       max_size=8), expect=st.booleans(), seed=st.integers(0, 1 << 30))
def test_bodies_of_any_size_split_anywhere_and_pipelined_arrive_whole(
    loop: str, sizes: list[int], cuts: list[int], expect: bool, seed: int,
) -> None:
    rnd = random.Random(seed)  # noqa: S311 - reproducible test data
    bodies = [rnd.randbytes(n) for n in sizes]

    async def main() -> None:
        async with _served() as (_, echo, address):
            await _exchange(address, bodies, cuts, expect)
            assert echo.calls == len(bodies)

    _run(loop, main())


@pytest.mark.parametrize("loop", LOOPS)
def test_big_bodies_over_tls(loop: str, tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    rnd = random.Random(7)  # noqa: S311 - reproducible test data
    bodies = [rnd.randbytes(n) for n in (BIG + 1, 10, 1 << 20, 3 * BIG + 5, 1)]

    async def main() -> None:
        async with _served(tls=server_ctx) as (_, echo, address):
            await _exchange(address, bodies, [5000, 70_000, 1_500_000], False, client_ctx)
            await _exchange(address, bodies[:2], [], True, client_ctx)
            assert echo.calls == len(bodies) + 2

    _run(loop, main())


@pytest.mark.parametrize("loop", LOOPS)
def test_a_client_that_leaves_or_pauses_mid_body(loop: str) -> None:
    async def main() -> None:
        limits = replace(LIMITS, body_timeout=0.3)
        async with _served(limits) as (server, echo, address):
            # Leaves after half of a big body: no request reaches the handler, the memory the
            # body held is given back, and the server keeps serving.
            reader, writer = await asyncio.open_connection(*address)
            writer.write(_req(b"x" * 400_000)[:200_000])
            await writer.drain()
            await wait_for(_true(lambda: server.budget.used > 0), 10, "the body to be received")
            writer.close()
            await wait_for(_true(lambda: server.budget.used == 0), 10, "the budget given back")
            assert echo.calls == 0
            # Pauses longer than the body timeout: 408, closed.
            reader, writer = await asyncio.open_connection(*address)
            writer.write(_req(b"y" * 300_000)[:150_000])
            await writer.drain()
            async with asyncio.timeout(10):
                out = await reader.read()
            assert out.startswith(b"HTTP/1.1 408 ") and b"inside a request body" in out, out
            writer.close()
            assert echo.calls == 0
            await _exchange(address, [b"z" * 100_000, b"ok"], [], False)
            assert server.budget.used == 0

    _run(loop, main())


@pytest.mark.parametrize("tls", [False, True])
@pytest.mark.parametrize("loop", LOOPS)
def test_an_answers_buffer_is_released_only_once_sent(
    loop: str, tls: bool, tmp_path: Path,
) -> None:
    # The handler scribbles over its answer's buffer when it is released (as a reused buffer
    # would be): a client that takes its answers slowly still gets every byte as it was, over
    # plain TCP and TLS.
    server_ctx = client_ctx = None
    if tls:
        cert, key = make_cert(tmp_path)
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_ctx.load_cert_chain(cert, key)
        client_ctx = ssl.create_default_context(cafile=str(cert))
    answer = bytes(range(256)) * 4096  # 1 MiB
    released: list[int] = []

    async def scribbled(request: web.Request) -> web.StreamResponse:
        buf = bytearray(answer)

        def release() -> None:
            buf[:] = b"X" * len(buf)
            released.append(1)

        return web.Response(body=memoryview(buf), release=release)

    async def main() -> None:
        router = Router()
        router.add_routes({"/a": scribbled})
        server = HttpServer(router, replace(LIMITS, stall_grace=0.1))
        sock = bind_loopback()
        sock.listen(4)
        await server.start(sock, ssl=server_ctx)
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a slow, small window
        client.setblocking(False)
        await asyncio.get_running_loop().sock_connect(client, sock.getsockname()[:2])
        reader, writer = await asyncio.open_connection(
            sock=client, limit=1 << 16, ssl=client_ctx,
            server_hostname="127.0.0.1" if tls else None)
        try:
            writer.write(b"GET /a HTTP/1.1\r\nHost: t\r\n\r\n" * 3)
            for _ in range(3):
                async with asyncio.timeout(20):
                    head = await reader.readuntil(b"\r\n\r\n")
                    assert head.startswith(b"HTTP/1.1 200 ")
                    got = bytearray()
                    while len(got) < len(answer):
                        got += await reader.read(min(8192, len(answer) - len(got)))
                assert got == answer
            writer.write(b"GET /a HTTP/1.1\r\nHost: t\r\n\r\n")  # releases what was sent
            async with asyncio.timeout(20):
                await reader.readuntil(b"\r\n\r\n")
                await reader.readexactly(len(answer))
            await wait_for(_true(lambda: len(released) >= 3), 20, "the buffers to be released")
        finally:
            writer.close()
            await server.stop(1.0)

    _run(loop, main())


async def test_concurrent_big_reads_from_reused_buffers_are_exact(tmp_path: Path) -> None:
    # /read answers over 64 KiB come from a pool of reused buffers: readers at every pace,
    # fast ones and one with a 4 KiB window, each get exactly the chunk's bytes.
    lines = [b"%07d %s\n" % (i, b"m" * (i % 200)) for i in range(40_000)]
    async with run_node(tmp_path / "d") as node:
        host, port = node.url.removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        for at in range(0, len(lines), 8000):
            writer.write(_req(b"".join(lines[at:at + 8000])).replace(b"/echo",
                                                                      b"/write?category=c"))
            assert (await _response(reader))[0] == 200
        writer.write(b"GET /listChunks?category=c HTTP/1.1\r\nHost: t\r\n\r\n")
        chunk = orjson.loads((await _response(reader))[1])[0]["name"]
        writer.close()
        expected = b"".join(lines)

        async def read_all(window: int | None) -> bytes:
            sock = socket.socket()
            if window:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, window)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
            r, w = await asyncio.open_connection(sock=sock, limit=1 << 16)
            got = bytearray()
            try:
                while True:
                    w.write(b"GET /read?category=c&chunk=%b&off=%d&max_size=%d HTTP/1.1\r\n"
                            b"Host: t\r\n\r\n" % (chunk.encode(), len(got), 1 << 20))
                    status, data = await _response(r)
                    assert status == 200, data
                    if not data:
                        return bytes(got)
                    got += data
            finally:
                w.close()

        answers = await asyncio.gather(*(read_all(w) for w in (None, None, None, 4096)))
        assert all(a == expected for a in answers)


async def _post(address: tuple[str, int], body: bytes, path: bytes = b"/echo") -> bytes:
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(_req(body).replace(b"/echo", path, 1))
        status, answer = await _response(reader)
        assert status == 200, answer[:200]
        return answer
    finally:
        writer.close()


@pytest.mark.parametrize("loop", LOOPS)
def test_a_reused_buffer_never_shows_another_requests_bytes(loop: str) -> None:
    # Big bodies are received into buffers reused from earlier requests (cut to or grown into
    # their size): each handler sees exactly its own body, never a byte of an earlier one,
    # whether a body is the same size, shorter, longer, or on another connection.
    rnd = random.Random(11)  # noqa: S311 - reproducible test data
    sizes = [300_000, 300_000, 200_000, 290_000, 160_000, 100_000, 1 << 20, 600_000, 1 << 20]
    bodies = [rnd.randbytes(n) for n in sizes]

    async def main() -> None:
        async with _served() as (server, echo, address):
            for body in bodies:  # one connection, one request at a time
                await _exchange(address, [body], [], False)
            reused = server.budget.reused
            assert reused >= 5, reused  # the test proves nothing if nothing was reused
            for body in bodies[::-1]:  # a new connection each
                assert await _post(address, body) == _expected(body)
            # Several at once, cut anywhere: every one gets its own bytes.
            await asyncio.gather(*(_exchange(address, bodies[i:i + 3], [70_000 * i + 1], False)
                                   for i in range(0, len(bodies), 3)))
            assert server.budget.reused > reused
            assert echo.calls == 3 * len(bodies)

    _run(loop, main())


@pytest.mark.parametrize("loop", LOOPS)
def test_a_handler_that_keeps_a_body_keeps_its_buffer(loop: str) -> None:
    # A handler may keep a request or its body after answering: that buffer is never reused,
    # so what it kept still holds its own bytes after other requests were received.
    kept_bodies: list[bytes | bytearray] = []
    kept_requests: list[web.Request] = []

    async def keep_body(request: web.Request) -> web.StreamResponse:
        kept_bodies.append(request.body)
        return web.Response()

    async def keep_request(request: web.Request) -> web.StreamResponse:
        kept_requests.append(request)
        return web.Response()

    async def main() -> None:
        router = Router()
        router.add_routes({"/echo": _Echo(), "/body": keep_body, "/request": keep_request})
        server = HttpServer(router, LIMITS)
        sock = bind_loopback()
        sock.listen(16)
        await server.start(sock)
        address = sock.getsockname()[:2]
        try:
            sent = [bytes([65 + i]) * 200_000 for i in range(6)]
            for i, body in enumerate(sent):
                await _post(address, body, b"/body" if i % 2 else b"/request")
                assert server.budget.pooled == 0  # nothing of theirs was kept for reuse
                for _ in range(2):  # bodies that are reused, same size
                    await _post(address, b"z" * 200_000)
            assert server.budget.reused >= 4
            assert [bytes(b) for b in kept_bodies] == sent[1::2]
            assert [bytes(r.body) for r in kept_requests] == sent[0::2]
        finally:
            await server.stop(1.0)

    _run(loop, main())


def test_reused_buffers_are_bounded_and_given_up_when_the_budget_is_short() -> None:
    # The idle buffers kept for reuse count against the memory budget: there are few of them
    # (8 at most), and clients that stall holding bodies take their place in the budget, so
    # idle buffers and held bodies together never pass it.
    limits = replace(LIMITS, max_body_size=1 << 20, memory_budget=4 << 20, stall_grace=30.0)

    async def main() -> None:
        async with _served(limits) as (server, _, address):
            budget = server.budget
            await asyncio.gather(*(_post(address, b"p" * 100_000) for _ in range(20)))
            assert 0 < budget.pooled <= 8 * 100_000
            stalled: list[asyncio.StreamWriter] = []
            try:
                for _ in range(4):  # four of 1 MiB: with idle buffers, over the 4 MiB budget
                    _, writer = await asyncio.open_connection(*address)
                    writer.write(_req(b"s" * (1 << 20))[:300_000])
                    await writer.drain()
                    stalled.append(writer)
                    held = len(stalled) << 20
                    await wait_for(_true(lambda: budget.used >= held), 10,  # noqa: B023 - awaited here
                                   "the body to be taken from the budget")
                    assert budget.used + budget.pooled <= budget.capacity
                assert budget.pooled == 0  # given up for the stalled bodies
                assert await _post(address, b"q" * 1000) == b"bytes " + b"q" * 1000
                assert budget.used + budget.pooled <= budget.capacity
            finally:
                for writer in stalled:
                    writer.close()
            await wait_for(_true(lambda: budget.used == 0), 10, "the budget given back")
            assert budget.used + budget.pooled <= budget.capacity

    uvloop.run(main())
