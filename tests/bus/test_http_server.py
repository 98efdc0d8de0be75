"""The node's HTTP server on real sockets: HTTP/1.1 features, limits, errors, a fuzzed parser."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chukcha.bus import web
from chukcha.bus.server import HttpServer, Router, ServerLimits
from chukcha.testing import bind_loopback

LIMITS = ServerLimits(max_body_size=1000, memory_budget=1 << 20)


async def _echo(request: web.Request) -> web.StreamResponse:
    return web.Response(body=request.method.encode() + b" " + request.query.get("x", "").encode()
                        + b" " + await request.read())


async def _boom(request: web.Request) -> web.StreamResponse:
    raise ZeroDivisionError("the handler divided by zero")


async def _stream(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await resp.prepare(request)
    await resp.write(b"one\n")
    await resp.write(b"two\n")
    return resp


async def _big(request: web.Request) -> web.StreamResponse:
    n = int(request.query["n"])
    await request.hold_memory(n)
    return web.Response(body=b"x" * n)


class Served:
    def __init__(self, server: HttpServer, address: tuple[str, int]) -> None:
        self.server = server
        self.host, self.port = address

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(self.host, self.port)

    async def exchange(self, data: bytes, *, timeout: float = 10) -> bytes:
        """Send ``data``, then read until the server closes the connection."""
        reader, writer = await self.connect()
        try:
            writer.write(data)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            async with asyncio.timeout(timeout):
                out = b""
                with contextlib.suppress(ConnectionError):
                    while chunk := await reader.read(65536):
                        out += chunk
                return out
        finally:
            writer.close()


Serve = Callable[[ServerLimits], Awaitable[Served]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    servers: list[HttpServer] = []

    async def start(limits: ServerLimits) -> Served:
        router = Router()
        router.add_routes({"/echo": _echo, "/boom": _boom, "/stream": _stream, "/big": _big})
        server = HttpServer(router, limits)
        sock = bind_loopback()
        sock.listen(128)
        await server.start(sock)
        servers.append(server)
        return Served(server, sock.getsockname()[:2])

    yield start
    for server in servers:
        await server.stop(1.0)


def _req(path: str, body: bytes = b"", *, extra: bytes = b"", version: bytes = b"1.1") -> bytes:
    return (b"POST %b HTTP/%b\r\nHost: t\r\nContent-Length: %d\r\n%b\r\n%b"
            % (path.encode(), version, len(body), extra, body))


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    async with asyncio.timeout(10):
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        return status, await reader.readexactly(length)


async def test_pipelined_requests_are_answered_in_order(serve: Serve) -> None:
    srv = await serve(LIMITS)
    reader, writer = await srv.connect()
    writer.write(b"".join(_req(f"/echo?x={i}", b"b%d" % i) for i in range(5)))
    for i in range(5):
        assert await _read_response(reader) == (200, b"POST %d b%d" % (i, i))
    writer.write(b"GET /echo?x=again HTTP/1.1\r\nHost: t\r\n\r\n")  # still open: keep-alive
    assert await _read_response(reader) == (200, b"GET again ")
    writer.close()


async def test_chunked_bodies_http_1_0_and_unknown_paths(serve: Serve) -> None:
    srv = await serve(LIMITS)
    chunked = (b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
               b"Connection: close\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    out = await srv.exchange(chunked)
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and out.endswith(b"\r\n\r\nPOST  abcde"), out
    out = await srv.exchange(_req("/echo", b"old", version=b"1.0"))  # closed after the answer
    assert out.startswith(b"HTTP/1.0 200 OK\r\n") and out.endswith(b"POST  old"), out
    out = await srv.exchange(_req("/nothing-here", extra=b"Connection: close\r\n"))
    assert out.startswith(b"HTTP/1.1 404 ") and out.endswith(b"\r\n\r\nnot found\n"), out


async def test_expect_100_continue(serve: Serve) -> None:
    srv = await serve(LIMITS)
    reader, writer = await srv.connect()
    writer.write(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n"
                 b"Expect: 100-continue\r\n\r\n")
    async with asyncio.timeout(10):
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"body")
    assert await _read_response(reader) == (200, b"POST  body")
    writer.close()
    # Over the limit: a 400 at once, no 100 Continue first, and the connection closed.
    out = await srv.exchange(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 1001\r\n"
                             b"Expect: 100-continue\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 "), out
    assert b"100 Continue" not in out
    assert out.endswith(b"write body is over the batch limit of 1000 bytes\n"), out


async def test_bodies_over_the_limit_are_400_and_closed(serve: Serve) -> None:
    srv = await serve(LIMITS)
    # Content-Length over the limit: answered before the body is sent.
    reader, writer = await srv.connect()
    writer.write(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\n\r\n")
    status, body = await _read_response(reader)
    assert (status, body) == (400, b"write body is over the batch limit of 1000 bytes\n")
    async with asyncio.timeout(10):
        assert await reader.read() == b""  # closed
    writer.close()
    # A chunked body learns its length while reading.
    chunks = b"".join(b"%x\r\n%b\r\n" % (600, b"y" * 600) for _ in range(2)) + b"0\r\n\r\n"
    out = await srv.exchange(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
                             b"\r\n" + chunks)
    assert out.startswith(b"HTTP/1.1 400 ") and b"over the batch limit" in out, out


async def test_malformed_and_oversized_heads_are_refused(serve: Serve) -> None:
    srv = await serve(replace(LIMITS, max_header_size=2048))
    out = await srv.exchange(b"THIS IS NOT HTTP\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 ") and b"bad request" in out, out
    big = b"X-Big: " + b"a" * 4000 + b"\r\n"
    out = await srv.exchange(b"GET /echo HTTP/1.1\r\nHost: t\r\n" + big + b"\r\n")
    assert out.startswith(b"HTTP/1.1 431 ") and b"over the limit of 2048 bytes" in out, out
    out = await srv.exchange(b"GET /echo?" + b"q" * 4000 + b" HTTP/1.1\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 431 "), out


async def test_an_unhandled_error_is_a_plain_500_with_its_reason_and_logged(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    srv = await serve(LIMITS)
    with caplog.at_level(logging.ERROR, logger="chukcha.bus.routing"):
        out = await srv.exchange(_req("/boom", extra=b"Connection: close\r\n"))
    assert out.startswith(b"HTTP/1.1 500 "), out
    assert out.endswith(b"internal error: ZeroDivisionError: the handler divided by zero\n"), out
    assert b"Server got itself in trouble" not in out
    [record] = [r for r in caplog.records if r.name == "chukcha.bus.routing"]
    assert record.exc_info is not None and "POST /boom" in record.getMessage()


async def test_streamed_answers_are_chunked(serve: Serve) -> None:
    srv = await serve(LIMITS)
    out = await srv.exchange(_req("/stream", extra=b"Connection: close\r\n"))
    head, _, body = out.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head, out
    assert body == b"4\r\none\n\r\n4\r\ntwo\n\r\n0\r\n\r\n", out


async def test_slow_heads_and_bodies_and_idle_connections_time_out(serve: Serve) -> None:
    srv = await serve(replace(LIMITS, header_timeout=0.3, body_timeout=0.3,
                              keepalive_timeout=0.3))
    out = await srv.exchange(b"POST /echo HTTP/1.1\r\nHost: t\r\n")  # headers never end
    assert out.startswith(b"HTTP/1.1 408 ") and b"request headers" in out, out
    out = await srv.exchange(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nab")
    assert out.startswith(b"HTTP/1.1 408 ") and b"inside a request body" in out, out
    reader, writer = await srv.connect()
    writer.write(_req("/echo", b"k"))
    assert await _read_response(reader) == (200, b"POST  k")
    async with asyncio.timeout(10):
        assert await reader.read() == b""  # the idle keep-alive connection was closed
    writer.close()


async def test_the_connection_cap_closes_idle_ones_first_then_refuses(serve: Serve) -> None:
    srv = await serve(replace(LIMITS, max_connections=3))
    idle = [await srv.connect() for _ in range(3)]
    for reader, writer in idle:  # each made a request: they are idle keep-alive connections
        writer.write(_req("/echo", b"i"))
        assert await _read_response(reader) == (200, b"POST  i")
    # A newcomer is served; the longest-idle connection made room for it.
    out = await srv.exchange(_req("/echo", b"new", extra=b"Connection: close\r\n"))
    assert out.endswith(b"POST  new"), out
    async with asyncio.timeout(10):
        assert await idle[0][0].read() == b""
    # With every slot in the middle of a request, a newcomer gets a 503.
    busy = [await srv.connect() for _ in range(3)]
    for _, writer in busy:
        writer.write(b"POST /echo HTTP/1.1\r\n")
        await writer.drain()
    async with asyncio.timeout(10):
        while len(srv.server.connections) < 3:  # noqa: ASYNC110 - the accept is not awaitable
            await asyncio.sleep(0.01)
    out = await srv.exchange(_req("/echo", b"late"))
    assert out.startswith(b"HTTP/1.1 503 ") and b"too many connections" in out, out
    for _, writer in idle + busy:
        writer.close()


async def test_clients_that_do_not_read_cannot_hold_more_than_the_budget(serve: Serve) -> None:
    budget = 4 << 20
    srv = await serve(replace(LIMITS, memory_budget=budget, stall_grace=0.2))
    loop = asyncio.get_running_loop()
    stalled = []
    for _ in range(12):  # 12 answers of 1 MiB that nobody reads: 3x the budget
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await loop.sock_connect(sock, (srv.host, srv.port))
        await loop.sock_sendall(sock, _req("/big?n=1048576"))
        stalled.append(sock)
    # A well-behaved client is still answered (the budget closes the longest-stalled ones).
    for _ in range(3):
        reader, writer = await srv.connect()
        writer.write(_req("/big?n=1048576", extra=b"Connection: close\r\n"))
        status, body = await _read_response(reader)
        assert (status, len(body)) == (200, 1 << 20)
        writer.close()
    assert srv.server.budget.peak <= budget
    for sock in stalled:
        sock.close()


# --- the parser, fuzzed ------------------------------------------------------------------

_GOOD = [
    _req("/echo?x=1", b"hello"),
    b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"POST /echo HTTP/1.0\r\nContent-Length: 2\r\n\r\nhi",
    b"POST /echo HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi",
]


@st.composite
def _mangled(draw: st.DrawFn) -> bytes:
    base = draw(st.sampled_from(_GOOD))
    kind = draw(st.sampled_from(["truncate", "flip", "insert", "garbage", "oversize"]))
    if kind == "truncate":
        return base[: draw(st.integers(0, len(base) - 1))]
    if kind == "flip":
        at = draw(st.integers(0, len(base) - 1))
        return base[:at] + bytes([draw(st.integers(0, 255))]) + base[at + 1:]
    if kind == "insert":
        at = draw(st.integers(0, len(base)))
        return base[:at] + draw(st.binary(min_size=1, max_size=40)) + base[at:]
    if kind == "garbage":
        return draw(st.binary(min_size=1, max_size=300))
    return base.replace(b"Host: t", b"Host: " + b"h" * draw(st.integers(3000, 9000)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(data=_mangled())
def test_fuzzed_requests_get_an_answer_or_a_close_and_the_server_keeps_serving(
    data: bytes,
) -> None:
    async def run() -> None:
        router = Router()
        router.add_routes({"/echo": _echo})
        server = HttpServer(router, replace(LIMITS, max_header_size=4096, header_timeout=0.2,
                                            body_timeout=0.2, keepalive_timeout=0.2))
        sock = bind_loopback()
        sock.listen(16)
        await server.start(sock)
        srv = Served(server, sock.getsockname()[:2])
        try:
            out = await srv.exchange(data + b"", timeout=10)  # ends by a close, not a hang
            if out:
                assert out.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")), out
                assert b" 500 " not in out.split(b"\r\n", 1)[0], out
            # The same server must still serve; its short timeouts (there so that each
            # truncated example ends quickly) apply to new connections only from here on, so a
            # loaded machine pausing this process for 0.2 s cannot close the check's connection.
            server.limits = replace(server.limits, header_timeout=10, body_timeout=10,
                                    keepalive_timeout=10)
            good = await srv.exchange(_req("/echo", b"ok", extra=b"Connection: close\r\n"))
            assert good.endswith(b"POST  ok"), good
        finally:
            await server.stop(1.0)

    asyncio.run(run())
