"""Catch-up of a peer's complete chunks: reads ahead, appends strictly in order.

A complete chunk's listed size is final, so no read past its end is needed, and the remainder of
a small chunk is one read whose length is known: up to :data:`READ_AHEAD` such reads (of the
next chunks) are in flight at once while earlier answers are appended, strictly in order. A large
chunk is read in pieces of the buffer size into two reused buffers (fresh multi-MiB buffers per
read cost more in allocation and page faults than the copy itself), the next piece in flight
while the previous one is written. Without the read-ahead, a catch-up of many small chunks
waited one round trip (and a listing) per chunk: 2,048 chunks of 64 KiB replicated at 2.6 MB/s.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Final

from chukcha.bus.chunks import ChunkStore

__all__ = ["READ_AHEAD", "SMALL_READ", "CatchUp", "Fetch"]

READ_AHEAD: Final = 8
"""Catch-up reads in flight at once (each on its own connection)."""
SMALL_READ: Final = 1 << 20
"""A chunk remainder up to this size is read whole into a buffer of its size (and read
ahead); a larger one in pieces into the two reused buffers."""

Fetch = Callable[[str, int, bytearray], Coroutine[Any, Any, int | None]]
"""Read ``chunk`` from ``off`` into ``buf``: the length read, ``0`` at the end, ``None`` when
the chunk is gone at its owner."""


@dataclass(slots=True, eq=False)
class _Read:
    chunk: str
    off: int
    size: int
    buf: bytearray
    task: asyncio.Task[int | None] = field(init=False)

    @property
    def whole(self) -> bool:
        """Whether the read asks for the rest of the chunk (so what follows is known)."""
        return self.size - self.off <= len(self.buf)

    async def discard(self) -> None:
        """Cancel the read and wait for it: its answer is not needed."""
        self.task.cancel()
        await asyncio.wait([self.task])
        if not self.task.cancelled():
            self.task.exception()  # retrieved


class CatchUp:
    """Download ``plan`` (``(chunk, local size, listed size)`` of complete chunks, in order)
    of ``category`` into ``store``.

    ``appended(chunk, n, size)`` is called after each append of ``n`` bytes (``size``: the
    local size after it). An append that finds the chunk acked meanwhile drops it and its
    other reads (never resurrected); a read that finds it gone at the owner skips it.
    """

    def __init__(
        self,
        store: ChunkStore,
        category: str,
        plan: list[tuple[str, int, int]],
        *,
        buffers: tuple[bytearray, bytearray],
        fetch: Fetch,
        appended: Callable[[str, int, int], None],
    ) -> None:
        self._store = store
        self._category = category
        self._plan = collections.deque(plan)
        self._buffers = buffers
        self._free = list(buffers)
        self._fetch = fetch
        self._appended = appended
        self._inflight: collections.deque[_Read] = collections.deque()

    async def run(self) -> None:
        inflight, plan = self._inflight, self._plan
        try:
            self._issue()
            while inflight:
                r = inflight[0]
                n = await r.task
                inflight.popleft()
                if n and r.off + n < r.size:
                    plan.appendleft((r.chunk, r.off + n, r.size))  # its next piece
                self._issue()  # the next reads go out while this answer is written
                if not n:
                    self._release(r)  # gone at the owner (None), or its end (0)
                    continue
                try:
                    new_size = await self._store.append_replica(
                        self._category, r.chunk, r.off, memoryview(r.buf)[:n])
                finally:
                    self._release(r)
                if new_size is None:
                    # Acked meanwhile: dropped, never resurrected; skip its other reads.
                    while plan and plan[0][0] == r.chunk:
                        plan.popleft()
                    while inflight and inflight[0].chunk == r.chunk:
                        dropped = inflight.popleft()
                        await dropped.discard()
                        self._release(dropped)
                    self._issue()
                    continue
                self._appended(r.chunk, n, new_size)
        finally:
            while inflight:
                await inflight.popleft().discard()

    def _issue(self) -> None:
        plan, inflight = self._plan, self._inflight
        while plan and len(inflight) < READ_AHEAD:
            if inflight and not inflight[-1].whole:
                return  # where that chunk's next piece starts is not known yet
            chunk, off, size = plan[0]
            if size - off <= SMALL_READ:
                buf = bytearray(size - off)
            elif self._free:
                buf = self._free.pop()
            else:
                return
            plan.popleft()
            r = _Read(chunk, off, size, buf)
            r.task = asyncio.create_task(self._fetch(chunk, off, buf))
            inflight.append(r)

    def _release(self, r: _Read) -> None:
        if any(r.buf is b for b in self._buffers):
            self._free.append(r.buf)
