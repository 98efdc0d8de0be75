"""Where a run's checkpoint effects go (moved out of :mod:`chukcha.processors.runner`).

:class:`BusIO` is the bus side of :class:`~chukcha.processors.checkpoint.Checkpoint` in a real
run: flushes to the app's sinks (one at a time per sink), sends to the bus, changelog records
and their reads, and ``consumer.commit(positions)``, which acks the complete chunks wholly
before the lowest committed position of all partitions.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from chukcha.client import Client
from chukcha.client.consumer import Consumer, Position
from chukcha.errors import ClientError, ConsumerError, RequestRejectedError
from chukcha.processors.checkpoint import Checkpoint
from chukcha.processors.partitions import PartitionSet
from chukcha.protocol import ChunkInfo

if TYPE_CHECKING:
    from chukcha.processors.base import App

__all__ = ["BusIO"]

# The runner's logger, as before the move: the same log lines under the same name.
logger = logging.getLogger("chukcha.processors.runner")


class BusIO:
    """Where the checkpoints' effects go in a real run: the app's sinks, the bus, the acks."""

    def __init__(self, app: App, client: Client, consumers: dict[str, Consumer]) -> None:
        self._app = app
        self._client = client
        self._consumers = consumers
        self.partitions: PartitionSet | None = None
        self._acked: dict[str, dict[str, tuple[str, int]]] = {}
        # Partitions commit concurrently: one flush at a time per sink (a sink need not be
        # safe for concurrent flushes), one ack round at a time.
        self._sink_locks: dict[str, asyncio.Lock] = {}
        self._ack_lock = asyncio.Lock()

    async def flush(self, sink: str, rows: list[Any]) -> None:
        async with self._sink_locks.setdefault(sink, asyncio.Lock()):
            await self._app.sinks[sink].flush(rows)

    async def send(self, category: str, lines: list[bytes]) -> None:
        await self._client.send(category, lines)

    async def publish(self, category: str, lines: list[bytes]) -> None:
        """A changelog record, confirmed by ``changelog_min_sync_replicas`` other nodes."""
        await self._client.send(category, lines,
                                min_sync_replicas=self._app.config.changelog_min_sync_replicas)

    async def read_all(self, category: str) -> list[bytes]:
        """Every message of ``category`` on every node that answers (a record that has not
        replicated everywhere yet is still found); raises when no node answers."""
        lines: list[bytes] = []
        answered: list[str] = []
        errors: list[str] = []
        api = self._client.api
        for url in self._client.nodes:
            try:
                for info in await api.list_chunks(url, category):
                    off = 0
                    while data := await api.read(url, category, info.name, off, 4 << 20):
                        off += len(data)
                        lines.extend(data[:-1].split(b"\n"))
            except ClientError as exc:
                errors.append(f"{url}: {exc}")
                continue
            answered.append(url)
        if not answered:
            raise ClientError(f"no node answered reading {category!r}: {'; '.join(errors)}")
        return lines

    @property
    def nodes(self) -> list[str]:
        """Every node the app knows (a follower reads each of them)."""
        return self._client.nodes

    async def chunks_on(self, url: str, category: str) -> list[ChunkInfo]:
        return await self._client.api.list_chunks(url, category)

    async def read_on(self, url: str, category: str, chunk: str, offset: int, max_size: int,
                      *, wait: float = 0.0) -> bytes:
        return await self._client.api.read(url, category, chunk, offset, max_size, wait=wait)

    async def complete_chunks(self, category: str) -> list[tuple[str, int]]:
        return [(c.name, c.size) for c in await self._client.list_chunks(category)
                if c.complete]

    async def ack_chunk(self, category: str, chunk: str, size: int, *,
                        fence: tuple[int, int] | None = None) -> None:
        """A plain ack (no group: nothing else reads a changelog) on the first node that takes
        it; acks replicate to every node. ``fence`` = ``(partition, epoch)``: applied only
        while the app's claim of that partition has that epoch (a refusal raises)."""
        errors: list[str] = []
        for url in self._client.nodes:
            try:
                await self._client.api.ack(url, category, chunk, size, fence=fence,
                                           app=self._app.name if fence else None)
            except RequestRejectedError:
                raise  # refused (a fenced ack whose claim moved): every node says the same
            except ClientError as exc:
                errors.append(f"{url}: {exc}")
            else:
                return
        raise ClientError(f"ack of {category}/{chunk} failed: {'; '.join(errors)}")

    async def ack(self, checkpoint: Checkpoint, *, force: bool) -> None:
        """Ack (through each consumer) everything wholly before the lowest committed position
        of all partitions, once none of them waits for an fsync."""
        parts = self.partitions
        if parts is None or not parts.synced:
            return
        async with self._ack_lock:
            for category, consumer in list(self._consumers.items()):
                positions = parts.ack_positions(category)
                if not force and positions == self._acked.get(category):
                    continue
                try:
                    await consumer.commit(
                        {owner: Position(chunk, off) for owner, (chunk, off) in positions.items()}
                    )
                except ClientError as exc:
                    # Not fatal: the positions are committed; the next commit acks again.
                    logger.warning("app=%s category=%s ack failed: %s", self._app.name,
                                   category, exc)
                except ConsumerError as exc:
                    if consumer.fence is None:
                        raise
                    # A fenced ack refused: another instance owns the partition now; its
                    # loops are being stopped (the lease watch says so too).
                    logger.warning("app=%s category=%s ack refused, the partition moved: %s",
                                   self._app.name, category, exc)
                else:
                    self._acked[category] = dict(positions)
