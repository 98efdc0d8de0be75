"""Bulk ``/read`` for replication catch-up: the response body lands straight in our buffer.

A replica's catch-up is bound by memory copies, not by Python: with aiohttp every byte is
copied from the socket into aiohttp's buffers, joined into one ``bytes``, and then written to
the page cache. :class:`ChunkFetcher` speaks just enough HTTP/1.1 (one keep-alive connection,
``GET``, ``Content-Length`` bodies — what our server and the Go server send for ``/read``) over
an :class:`asyncio.BufferedProtocol`, so the kernel copies the body directly into the caller's
buffer. Anything unexpected (chunked encoding, no length, a body larger than the buffer) raises
:class:`UnsupportedResponseError` and the caller falls back to aiohttp.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Final, cast
from urllib.parse import urlencode, urlsplit

__all__ = ["ChunkFetcher", "UnsupportedResponseError"]

logger = logging.getLogger(__name__)

_MAX_HEAD: Final = 64 << 10


class UnsupportedResponseError(Exception):
    """The response is not a plain ``Content-Length`` one that fits the buffer."""


class _Protocol(asyncio.BufferedProtocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        # Never resized: a bytearray with an exported view (the loop's recv_into) cannot be.
        self._head = bytearray(_MAX_HEAD)
        self._head_len = 0
        self._buf = bytearray()
        self._n = 0
        self._want = -1
        self.status = 0
        self.keep_alive = True
        self._done: asyncio.Future[None] | None = None
        self._scratch = bytearray(4096)

    # --- request side ---------------------------------------------------------------------

    def begin(self, request: bytes, buf: bytearray) -> asyncio.Future[None]:
        if self.transport is None or self.transport.is_closing():
            raise ConnectionError("connection closed")
        self._buf, self._n, self._want, self._head_len = buf, 0, -1, 0
        self._done = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self._done

    @property
    def received(self) -> int:
        return self._n

    def _fail(self, exc: BaseException) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    # --- asyncio.BufferedProtocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a stream connection's transport

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._done is None or self._done.done():
            return memoryview(self._scratch)  # unsolicited bytes: dropped, connection closed
        if self._want < 0:
            return memoryview(self._head)[self._head_len:]
        return memoryview(self._buf)[self._n:self._want]

    def buffer_updated(self, nbytes: int) -> None:
        if self._done is None or self._done.done():
            self._fail(ConnectionError("unexpected data from the server"))
            return
        if self._want >= 0:
            self._n += nbytes
        else:
            self._head_len += nbytes
            end = self._head.find(b"\r\n\r\n", 0, self._head_len)
            if end < 0:
                if self._head_len == len(self._head):
                    self._fail(UnsupportedResponseError("response head too large"))
                return
            try:
                self._parse_head(bytes(self._head[:end]))
            except UnsupportedResponseError as exc:
                self._fail(exc)
                return
            rest = self._head_len - (end + 4)
            if rest > self._want:
                self._fail(UnsupportedResponseError("more data than Content-Length"))
                return
            self._buf[:rest] = self._head[end + 4:self._head_len]
            self._n = rest
        if self._n >= self._want:
            self._done.set_result(None)

    def _parse_head(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise UnsupportedResponseError(f"bad status line {lines[0][:100]!r}")
        self.status = int(parts[1])
        length = -1
        for line in lines[1:]:
            name, _, value = line.partition(":")
            key = name.strip().lower()
            if key == "content-length" and value.strip().isdigit():
                length = int(value.strip())
            elif key == "transfer-encoding":
                raise UnsupportedResponseError("transfer-encoding")
            elif key == "connection" and value.strip().lower() == "close":
                self.keep_alive = False
        if length < 0:
            raise UnsupportedResponseError("no Content-Length")
        if length > len(self._buf):
            raise UnsupportedResponseError(f"body of {length} bytes does not fit the buffer")
        self._want = length

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_exception(ConnectionError(f"connection lost: {exc}"))


class ChunkFetcher:
    """One keep-alive connection to a peer for sequential catch-up ``/read`` requests.

    ``async with ChunkFetcher(url) as f: status, n = await f.read(params, buf)``.
    """

    def __init__(
        self, base_url: str, timeout: float = 60.0, headers: Callable[[], str] | None = None
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise UnsupportedResponseError(f"not a plain http URL: {base_url}")
        self._host = parts.hostname
        self._port = parts.port or 80
        self._netloc = parts.netloc
        self._timeout = timeout
        self._headers = headers
        self._proto: _Protocol | None = None

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self._timeout):
            _, proto = await loop.create_connection(_Protocol, self._host, self._port)
        return proto

    async def read(self, params: dict[str, str], buf: bytearray) -> tuple[int, int]:
        """``GET /read?params`` into ``buf``: returns (HTTP status, body length)."""
        proto = self._proto
        if proto is None or proto.transport is None or proto.transport.is_closing():
            proto = self._proto = await self._connect()
        extra = self._headers() if self._headers is not None else ""
        request = (f"GET /read?{urlencode(params)} HTTP/1.1\r\nHost: {self._netloc}\r\n"
                   f"{extra}\r\n").encode()
        try:
            async with asyncio.timeout(self._timeout):
                await proto.begin(request, buf)
        except BaseException:
            self.close()
            raise
        if not proto.keep_alive:
            self.close()
        return proto.status, proto.received

    def close(self) -> None:
        proto, self._proto = self._proto, None
        if proto is not None and proto.transport is not None:
            proto.transport.close()

    async def __aenter__(self) -> ChunkFetcher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
