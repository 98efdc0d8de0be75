"""Routes answered later without a task (``Router.add_later_routes``, what a front worker's
coalesced writes use): answers stay in request order behind them, errors become the handler's
answers, a graceful stop waits for them and a client that left gets nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest

from chukcha.bus import web
from chukcha.bus.server import HttpServer, Router, ServerLimits
from chukcha.testing import bind_loopback


class _Later:
    """A later route whose answers the test gives: one future per request, in order."""

    def __init__(self) -> None:
        self.waiting: list[asyncio.Future[web.StreamResponse]] = []
        self.arrived = asyncio.Event()

    def __call__(self, request: web.Request) -> asyncio.Future[web.StreamResponse] | None:
        if request.query.get("mode") == "handler":
            return None  # the route's handler answers this one
        fut: asyncio.Future[web.StreamResponse] = asyncio.get_running_loop().create_future()
        self.waiting.append(fut)
        self.arrived.set()
        return fut

    async def next(self) -> asyncio.Future[web.StreamResponse]:
        async with asyncio.timeout(10):
            while not self.waiting:
                self.arrived.clear()
                await self.arrived.wait()
        return self.waiting.pop(0)


async def _handler(request: web.Request) -> web.StreamResponse:
    return web.Response(text=f"handler {request.path}\n")


@asynccontextmanager
async def _served(
    observer: Callable[[str, int, float], None] | None = None,
) -> AsyncIterator[tuple[HttpServer, _Later, int]]:
    later = _Later()
    router = Router()
    if observer is not None:
        router.add_observer(observer)
    router.add_routes({"/later": _handler, "/other": _handler})
    router.add_later_routes({"/later": later})
    server = HttpServer(router, ServerLimits())
    sock = bind_loopback()
    sock.setblocking(False)
    await server.start(sock)
    try:
        yield server, later, sock.getsockname()[1]
    finally:
        await server.stop(1.0)


def _get(path: str) -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode()


async def _answers(reader: asyncio.StreamReader, n: int) -> list[tuple[int, bytes]]:
    out = []
    async with asyncio.timeout(10):
        for _ in range(n):
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            out.append((int(head.split(b" ")[1]), await reader.readexactly(length)))
    return out


async def test_answers_stay_in_order_behind_a_later_answer() -> None:
    async with _served() as (_, later, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            # Three pipelined requests: the first waits for its later answer; the others queue.
            writer.write(_get("/later") + _get("/other") + _get("/later?mode=handler"))
            first = await later.next()
            with pytest.raises(TimeoutError):  # nothing answered yet
                async with asyncio.timeout(0.05):
                    await reader.read(1)
            first.set_result(web.Response(text="later one\n"))
            assert await _answers(reader, 3) == [
                (200, b"later one\n"), (200, b"handler /other\n"), (200, b"handler /later\n")]
            # An error in a later answer is answered like a handler's.
            writer.write(_get("/later"))
            (await later.next()).set_exception(ValueError("bad thing"))
            [(status, body)] = await _answers(reader, 1)
            assert status == 500 and b"bad thing" in body
            # The connection keeps serving later routes.
            writer.write(_get("/later"))
            (await later.next()).set_result(web.Response(status=201))
            assert await _answers(reader, 1) == [(201, b"")]
        finally:
            writer.close()


async def test_later_answers_are_observed_like_the_handlers() -> None:
    observed: list[tuple[str, int]] = []
    seconds: list[float] = []

    def observe(route: str, status: int, took: float) -> None:  # the metrics' observer
        observed.append((route, status))
        seconds.append(took)

    async with _served(observe) as (_, later, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(_get("/later"))
            (await later.next()).set_result(web.Response(status=201))
            writer.write(_get("/later"))
            (await later.next()).set_exception(ValueError("bad thing"))
            writer.write(_get("/later?mode=handler"))
            assert [s for s, _ in await _answers(reader, 3)] == [201, 500, 200]
            assert observed == [("/later", 201), ("/later", 500), ("/later", 200)]
            assert all(s >= 0 for s in seconds)
        finally:
            writer.close()


async def test_a_graceful_stop_waits_for_a_later_answer() -> None:
    async with _served() as (server, later, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(_get("/later"))
            fut = await later.next()
            stopping = asyncio.create_task(server.stop(10.0))
            async with asyncio.timeout(10):
                while not server._closing:  # noqa: ASYNC110 - set as stop() begins
                    await asyncio.sleep(0)
            for _ in range(10):  # loop turns, no timed sleep: stop() is past its first await
                await asyncio.sleep(0)
            assert not stopping.done()  # it waits for the answer in progress
            assert server.connections  # with the connection open
            fut.set_result(web.Response(text="done\n"))
            assert await _answers(reader, 1) == [(200, b"done\n")]
            async with asyncio.timeout(10):
                await stopping
        finally:
            writer.close()


async def test_a_client_that_left_gets_nothing_and_the_server_goes_on() -> None:
    async with _served() as (server, later, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(_get("/later"))
        fut = await later.next()
        writer.close()
        async with asyncio.timeout(10):
            while server.connections:  # noqa: ASYNC110 - the close is not awaitable
                await asyncio.sleep(0.01)
        fut.set_result(web.Response(text="too late\n"))  # nobody to send it to: no error
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(_get("/other"))
            assert await _answers(reader, 1) == [(200, b"handler /other\n")]
        finally:
            writer.close()
