"""Front workers (``chukcha node --workers N``): HTTP on every core, one writer behind them.

A node started with ``--workers N`` is one *primary* process (the whole node: chunk store,
replication, groups, every guarantee) and ``N - 1`` *front* processes. The fronts (and with 2
workers the primary) accept clients, each on its own listening socket (:mod:`chukcha.cli.workers`).
A front serves small single-message writes itself: concurrent ones with the same parameters are
coalesced into one write of the primary (:mod:`chukcha.bus.coalesce`;
each body is validated on its own first, and a write lands whole in one chunk, so each client
gets exactly the answer the primary gave the batch). A connection that starts any other request
with nothing in flight is handed over to the primary (:mod:`chukcha.bus.handover`); what cannot
be handed over (TLS, a request pipelined behind others, a primary that cannot take it now) is
relayed as it is (streams too). So the primary keeps being the one place where state lives: a
front holds nothing and can die at any moment.

Why this design and not shards (``docs/DESIGN.md``): shards would need per-worker owner names,
which Go peers do not replicate, and every shard is one more stream for readers.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Mapping
from ssl import SSLContext
from typing import Final, cast

from chukcha.bus import web
from chukcha.bus.coalesce import Answer, WriteCoalescer, parse_head, response_of
from chukcha.bus.handover import HandoverSender, handover_path
from chukcha.bus.server import HttpServer, Router, ServerLimits
from chukcha.errors import ChukchaError, WriterUnavailableError
from chukcha.protocol import check_messages

__all__ = ["FrontWorker", "PrimaryClient"]

logger = logging.getLogger(__name__)

_FORWARD_HEADERS: Final = ("authorization", "origin", "sec-fetch-site", "host", "content-type")
_POOL: Final = 64
_RELAY_WHOLE: Final = 1 << 20
"""Answers up to this size are read whole; bigger ones are relayed piece by piece, so a client
slow to take 16 MiB makes a front hold one piece (as the writer does)."""
_PIECE: Final = 128 << 10
_EMPTY_OK_START: Final = b"HTTP/1.1 200 OK\r\nDate: "
_EMPTY_OK_END: Final = b"\r\nContent-Length: 0\r\n\r\n"


class _PrimaryConn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    def close(self) -> None:
        self.writer.close()


class PrimaryClient:
    """Requests to the primary over its unix socket (keep-alive connections, a small pool)."""

    def __init__(self, path: str, timeout: float = 90.0) -> None:
        self._path = path
        self._idle: list[_PrimaryConn] = []
        self._timeout = timeout

    async def _conn(self) -> _PrimaryConn:
        while self._idle:
            conn = self._idle.pop()
            if not conn.reader.at_eof() and not conn.writer.is_closing():
                return conn
            conn.close()  # the writer closed it (it restarted): never reuse it
        try:
            reader, writer = await asyncio.open_unix_connection(self._path, limit=1 << 22)
        except OSError as exc:
            raise WriterUnavailableError(f"the node's writer process is not reachable: {exc}") \
                from None
        return _PrimaryConn(reader, writer)

    async def wait_ready(self, timeout: float) -> None:
        """Wait until the primary accepts connections (it is starting: imports, the store)."""
        delay = 0.01
        async with asyncio.timeout(timeout):
            while True:
                try:
                    self.release(await self._conn())
                except WriterUnavailableError:
                    await asyncio.sleep(delay)  # retry with backoff: the writer is starting
                    delay = min(0.2, delay * 2)
                else:
                    return

    def release(self, conn: _PrimaryConn) -> None:
        if len(self._idle) < _POOL:
            self._idle.append(conn)
        else:
            conn.close()

    async def request(self, method: str, target: str, headers: Mapping[str, str],
                      body: bytes | bytearray) -> Answer:
        conn = await self._conn()
        try:
            head = [f"{method} {target} HTTP/1.1\r\nContent-Length: {len(body)}\r\n"]
            head += [f"{k}: {v}\r\n" for k, v in headers.items()]
            head.append("\r\n")
            conn.writer.write("".join(head).encode("latin-1") + body if len(body) < 65536
                              else "".join(head).encode("latin-1"))
            if len(body) >= 65536:
                conn.writer.write(body)
            async with asyncio.timeout(self._timeout):
                raw = await conn.reader.readuntil(b"\r\n\r\n")
                if raw.startswith(_EMPTY_OK_START) and raw.endswith(_EMPTY_OK_END) \
                        and raw.count(b"\r\n") == 4:
                    # A write's answer (status, Date, Content-Length: 0): nothing to parse.
                    self.release(conn)
                    return Answer(200, {})
                status, answer_headers = parse_head(raw)
                if method == "HEAD":  # the head alone: no body follows, whatever it announces
                    data = b""
                elif answer_headers.get("transfer-encoding", "").lower() == "chunked":
                    return Answer(status, answer_headers, chunked=True, conn=conn)
                else:
                    length = int(answer_headers.get("content-length", "0"))
                    if length > _RELAY_WHOLE:  # the caller relays it piece by piece
                        return Answer(status, answer_headers, conn=conn, length=length)
                    data = await conn.reader.readexactly(length) if length else b""
        except (OSError, asyncio.IncompleteReadError, ValueError, TimeoutError) as exc:
            conn.close()
            self.close()  # the other idle connections went to the same (dead) writer
            raise WriterUnavailableError(
                f"the node's writer process failed to answer: {exc!r} (the request was sent: "
                f"it may have been done)") from None
        except BaseException:
            conn.close()
            raise
        if answer_headers.get("connection", "").lower() == "close":
            conn.close()
        else:
            self.release(conn)
        return Answer(status, answer_headers, data)

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()


async def _relay_sized(client: PrimaryClient, answer: Answer,
                       request: web.Request) -> web.StreamResponse:
    """Relay a big answer of known length piece by piece, as the client takes it."""
    conn = cast(_PrimaryConn, answer.conn)  # big answers keep their connection
    headers = {"Content-Length": str(answer.length)}
    if "content-type" in answer.headers:
        headers["Content-Type"] = answer.headers["content-type"]
    resp = web.StreamResponse(status=answer.status, headers=headers)
    done = False
    try:
        await resp.prepare(request)
        left = answer.length
        while left:
            piece = await conn.reader.readexactly(min(_PIECE, left))
            left -= len(piece)
            await resp.write(piece)  # waits while the client is slow
        done = True
    except asyncio.IncompleteReadError as exc:
        raise ConnectionResetError("the writer process went away mid-answer") from exc
    finally:
        if done:
            client.release(conn)
        else:
            conn.close()
    return resp


async def _relay_chunks(answer: Answer, request: web.Request) -> web.StreamResponse:
    """Relay a chunked (never-ending) answer piece by piece."""
    conn = cast(_PrimaryConn, answer.conn)  # chunked answers keep their connection
    headers = {k.title(): v for k, v in answer.headers.items()
               if k in ("content-type",)}
    resp = web.StreamResponse(status=answer.status, headers=headers)
    try:
        await resp.prepare(request)
        while True:
            size_line = await conn.reader.readline()
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                await conn.reader.readline()
                break
            data = await conn.reader.readexactly(size + 2)
            await resp.write(data[:-2])
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        logger.debug("relayed stream ended: %r", exc)
    finally:
        conn.close()
    return resp


class FrontWorker:
    """Serves the public socket and hands everything to the primary (see the module doc)."""

    def __init__(self, primary_socket: str, limits: ServerLimits, *,
                 max_message_size: int) -> None:
        self._client = PrimaryClient(primary_socket)
        self._coalescer = WriteCoalescer(primary_socket, limits.max_body_size)
        self._max_message = max_message_size
        self.router = Router()
        self.router.fallback = self._relay
        self.router.add_routes({"/write": self._write})
        self.router.add_fast_routes({"/write": self._write_fast})
        self.router.add_later_routes({"/write": self._write_later})
        self.server = HttpServer(self.router, limits)
        self.handover = HandoverSender(handover_path(primary_socket))

    @staticmethod
    def _headers(request: web.Request) -> dict[str, str]:
        headers = request.headers  # lower-case names: plain dict look-ups
        return {k: v for k in _FORWARD_HEADERS if (v := dict.get(headers, k)) is not None}

    def _key(self, request: web.Request) -> tuple[str, dict[str, str]] | None:
        """A write the coalescer may batch: its key (only requests the writer would treat
        alike share a write: the same parameters and the same credentials, a batch being
        checked once, with its first request's) and the headers to forward; else ``None``."""
        body = request.body
        if not body or "min_sync_replicas" in request.query_string:
            return None
        check_messages(body, self._max_message)  # each body on its own, as the primary
        headers = self._headers(request)
        return "\n".join([request.query_string, *(f"{k}:{v}" for k, v in headers.items())]), \
            headers

    def _batch_key(self, request: web.Request) -> tuple[str, dict[str, str]] | None:
        """:meth:`_key`, or ``None`` for a write it refuses: the handler answers it with the
        error."""
        try:
            return self._key(request)
        except ChukchaError:
            return None

    def _write_fast(self, request: web.Request) -> web.Later | None:
        """A write the coalescer may batch, answered through :meth:`Request.done
        <chukcha.bus.web.Request.done>` when the writer answers its batch: no future and no
        callback scheduled per write (each cost as much as a tenth of a front's CPU per write).
        While the server stops (not ``deferrable``) the later route takes it."""
        if not request.deferrable:
            return None
        key = self._batch_key(request)
        if key is None:
            return None
        self._coalescer.submit_later(key[0], request.query_string, key[1], request.body,
                                     request.done)
        return web.LATER

    def _write_later(self, request: web.Request) -> asyncio.Future[web.StreamResponse] | None:
        key = self._batch_key(request)
        if key is None:
            return None
        return self._coalescer.submit(key[0], request.query_string, key[1], request.body)

    async def _write(self, request: web.Request) -> web.StreamResponse:
        key = self._key(request)
        if key is None:
            answer = await self._client.request(request.method, request.path_qs,
                                                self._headers(request), request.body)
            return response_of(answer)
        return await self._coalescer.submit(key[0], request.query_string, key[1], request.body)

    async def _relay(self, request: web.Request) -> web.StreamResponse:
        answer = await self._client.request(request.method, request.path_qs,
                                            self._headers(request), request.body)
        if request.method == "HEAD":  # the writer's head, with the length a GET would get
            resp = response_of(answer)
            if "content-length" in answer.headers:
                resp.headers["Content-Length"] = answer.headers["content-length"]
            return resp
        if answer.chunked:
            return await _relay_chunks(answer, request)
        if answer.conn is not None:
            return await _relay_sized(self._client, answer, request)
        return response_of(answer)

    async def start(self, sock: socket.socket, *, ssl: SSLContext | None = None,
                    ready_timeout: float = 120.0) -> None:
        """Serve once the primary answers (so no client meets a front that cannot work)."""
        await self._client.wait_ready(ready_timeout)
        if ssl is None:  # a TLS session cannot move to another process: relayed instead
            self.router.handover = self.handover.offer
        await self.server.start(sock, ssl=ssl)

    async def stop(self, timeout: float) -> None:
        await self.server.stop(timeout)
        self._client.close()
        self._coalescer.close()
        self.handover.close()
