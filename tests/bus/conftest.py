"""Helpers for the node tests: a thin HTTP caller and a snapshot of what is on disk."""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from chukcha.bus.chunks import ChunkStore
from chukcha.bus.front import FrontWorker
from chukcha.bus.node import Node
from chukcha.bus.server import ServerLimits
from chukcha.testing import bind_loopback, run_node


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")


@dataclass(frozen=True, slots=True)
class Api:
    """Raw calls to a node: every test sees the exact status and body."""

    http: aiohttp.ClientSession
    url: str

    async def call(
        self,
        path: str,
        params: Mapping[str, str | int] | None = None,
        body: bytes | None = None,
        method: str = "POST",
    ) -> Answer:
        # aiohttp warns about big raw bodies (it copies them on the loop); a file object not.
        data = io.BytesIO(body) if body is not None and len(body) > 1 << 20 else body
        async with asyncio.timeout(30), self.http.request(
            method, self.url + path, params=params, data=data
        ) as resp:
            return Answer(resp.status, await resp.read())

    async def write(self, category: str, body: bytes, **params: str | int) -> None:
        ans = await self.call("/write", {"category": category, **params}, body)
        assert (ans.status, ans.body) == (200, b""), ans

    async def read(
        self, category: str, chunk: str, off: int = 0, max_size: int = 1 << 20, **extra: Any
    ) -> bytes:
        ans = await self.call(
            "/read", {"category": category, "chunk": chunk, "off": off, "max_size": max_size,
                      **extra}, method="GET",
        )
        assert ans.status == 200, ans
        return ans.body

    async def list_chunks(self, category: str) -> list[dict[str, Any]]:
        async with asyncio.timeout(30), self.http.get(
            f"{self.url}/listChunks", params={"category": category}
        ) as resp:
            assert resp.status == 200, await resp.text()
            result: list[dict[str, Any]] = await resp.json()
            return result

    async def ack(self, category: str, chunk: str, size: int) -> Answer:
        return await self.call("/ack", {"category": category, "chunk": chunk, "size": size})


def _snapshot(root: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        out[rel + "/" if path.is_dir() else rel] = 0 if path.is_dir() else path.stat().st_size
    return out


async def disk_state(root: Path) -> dict[str, int]:
    """Every file (with its size) and directory under ``root``."""
    return await asyncio.to_thread(_snapshot, root)


async def read_file(path: Path) -> bytes:
    return await asyncio.to_thread(path.read_bytes)


@asynccontextmanager
async def front_and_writer(
    tmp_path: Path, **node_options: Any,
) -> AsyncIterator[tuple[Node, FrontWorker, int]]:
    """A writer node (in this process, its internal socket under ``tmp_path``; ``node_options``
    as :func:`~chukcha.testing.run_node` takes them) and one front worker serving a loopback
    port of its own: the node, the front and the front's port."""
    private = str(tmp_path / "writer.sock")
    async with run_node(tmp_path / "data", "w", internal_socket=private,
                        **node_options) as node:
        front = FrontWorker(private, ServerLimits(), max_message_size=1 << 20)
        sock = bind_loopback()
        sock.setblocking(False)
        await front.start(sock)
        try:
            yield node, front, sock.getsockname()[1]
        finally:
            await front.stop(1.0)


@pytest.fixture
async def api(node: Node, http: aiohttp.ClientSession) -> AsyncIterator[Api]:
    yield Api(http, node.url)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[ChunkStore]:
    """A chunk store of its own (instance ``me``, 1 MiB chunks), opened and closed off the loop."""
    s = ChunkStore(tmp_path / "data", "me", max_chunk_size=1 << 20)
    await asyncio.to_thread(s.open)
    try:
        yield s
    finally:
        await asyncio.to_thread(s.close)


class AppendGate:
    """Blocks the first ``ChunkStore._append`` in its worker thread until :meth:`open`."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self._calls = 0
        self.entered = threading.Event()
        self._open = threading.Event()

    def append(self, fd: int, chunk: Any, data: bytes | memoryview, sync: bool) -> None:
        self._calls += 1
        if self._calls == 1:
            self.entered.set()
            self._open.wait(10)
        self._real(fd, chunk, data, sync)

    def open(self) -> None:
        self._open.set()


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> AppendGate:
    g = AppendGate(ChunkStore._append)
    monkeypatch.setattr(ChunkStore, "_append", staticmethod(g.append))
    return g
