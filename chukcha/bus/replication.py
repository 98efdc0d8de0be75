"""Replication, the owner side: what a node tells the replicas of its own chunks.

Every node holds every owner's chunks (``DESIGN.md``, "The bus"). This module is the owner's
half: :class:`ReplicationServer` serves ``/replication/events`` (an NDJSON stream of
``chunk_created`` / ``chunk_ack`` events per subscriber), ``/replication/ack`` (a replica reports
how far it holds one of our chunks) and ``/replication/tombstones``, and implements
``min_sync_replicas`` waits (:class:`~chukcha.bus.http.ReplicaWaiter`) woken by those reports.
The replica's half is :class:`~chukcha.bus.replicator.Replicator`, one
:class:`~chukcha.bus.replication_link.PeerLink` per peer, whose progress reports are sent by
:class:`~chukcha.bus.replication_reports.ProgressReporter`.

Nothing polls on a timer. New chunks arrive as ``chunk_created`` events; new data in an open
chunk arrives through the ``/read?wait=`` long poll, which the owner answers the moment a write
lands or the chunk becomes complete.

Acks: an ack (local, or replicated from a peer) emits an ``ACKED`` store event, which is sent to
every subscriber; applying a replicated ack is idempotent and emits only when it changed
something, so acks spread transitively and stop. An ack that could not be delivered (the peer was
down) is not lost: when a peer (re)subscribes it is first sent the state — ``chunk_created`` for
our latest chunk of every category and ``chunk_ack`` for the most recent tombstones per
(category, owner) — which also survives restarts, because tombstones are files. Older acks of
the peer's own stream are inferred from its listing when a replica syncs
(:meth:`~chukcha.bus.replication_link.PeerLink._drop_acked`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import aiohttp
import orjson

from chukcha.bus import web
from chukcha.bus.chunks import ChunkStore, StoreEvent, StoreEventKind
from chukcha.bus.config import ReplicationConfig
from chukcha.bus.http import Handler, int_param, str_param
from chukcha.errors import ReplicationError, ReplicationTimeoutError, UnknownPeerError
from chukcha.protocol import (
    chunk_file_name,
    parse_chunk_name,
    validate_category,
    validate_instance,
)

__all__ = [
    "HEARTBEAT_INTERVAL",
    "REPLAY_TOMBSTONES",
    "ReplicationServer",
    "encode_event",
    "position_rank",
]

logger = logging.getLogger(__name__)

HEARTBEAT_INTERVAL: Final = 10.0
"""The events stream sends an empty message this often (the Go server does the same)."""
REPLAY_TOMBSTONES: Final = 1024
"""Tombstones per (category, owner) re-sent to a (re)subscribing peer: the bound of the replay."""
_MAX_QUEUE: Final = 100_000
_EMPTY: Final = b'{"Type":"","Chunk":{"Owner":"","Category":"","FileName":""}}\n'
_NDJSON: Final = "application/x-ndjson"


def encode_event(kind: str, owner: str, category: str, chunk: str) -> bytes:
    """One line of the events stream, in the Go server's JSON shape."""
    return orjson.dumps(
        {"Type": kind, "Chunk": {"Owner": owner, "Category": category, "FileName": chunk}}
    ) + b"\n"


class _Subscriber:
    """One ``/replication/events`` connection; a newer one from the same instance replaces it."""

    __slots__ = ("closed", "instance", "queue")

    def __init__(self, instance: str) -> None:
        self.instance = instance
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.closed = False

    def send(self, line: bytes) -> None:
        if self.closed:
            return
        if self.queue.qsize() >= _MAX_QUEUE:
            # A subscriber that stopped reading: drop it; it reconnects and gets the replay.
            logger.warning("events subscriber %s is not reading; disconnecting it", self.instance)
            self.close()
            return
        self.queue.put_nowait(line)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.queue.put_nowait(None)


@dataclass(slots=True)
class _Waiter:
    chunk: str
    end: int
    count: int
    future: asyncio.Future[None]


class ReplicationServer:
    """The owner side: the events stream, replica progress reports, ``min_sync_replicas``."""

    def __init__(
        self,
        store: ChunkStore,
        config: ReplicationConfig,
        live_peers: Callable[[], int],
        is_peer: Callable[[str], bool] = lambda _name: False,
    ) -> None:
        self._store = store
        self._config = config
        self._instance = store.instance
        self._live_peers = live_peers
        self._is_peer = is_peer
        self._subscribers: dict[str, _Subscriber] = {}
        # (category, replica) -> highest (chunk, size) of OUR stream it reported holding. A
        # replica downloads strictly in order, so holding (c, n) means holding everything before.
        self._progress: dict[tuple[str, str], tuple[str, int]] = {}
        self._waiters: dict[str, list[_Waiter]] = {}
        self._stopped = False
        store.add_listener(self._on_store_event)

    def routes(self) -> dict[str, Handler]:
        return {
            "/replication/events": self.events,
            "/replication/ack": self.ack,
            "/replication/tombstones": self.tombstones,
        }

    async def tombstones(self, request: web.Request) -> web.StreamResponse:
        """Extension: the chunks of OUR stream in ``category`` that were acknowledged here.

        A replica that missed ack events asks for them before it drops its copies: a chunk is
        dropped only when its owner confirms the ack (a chunk the owner merely lost is kept).
        """
        category = validate_category(str_param(request, "category"))
        prefix = f"{self._instance}-"
        names = [n for n in self._store.tombstones(category) if n.startswith(prefix)]
        return web.Response(body=orjson.dumps(names), content_type="application/json")

    def subscribers(self) -> list[str]:
        return sorted(self._subscribers)

    def progress(self, category: str, replica: str) -> tuple[str, int] | None:
        return self._progress.get((category, replica))

    async def stop(self) -> None:
        """End every events stream (so a graceful stop does not wait for them)."""
        self._stopped = True
        self._store.remove_listener(self._on_store_event)
        for sub in list(self._subscribers.values()):
            sub.close()
        for waiters in self._waiters.values():
            for w in waiters:
                if not w.future.done():
                    w.future.set_exception(ReplicationError("node is stopping"))

    # --- events --------------------------------------------------------------------------

    def _on_store_event(self, event: StoreEvent) -> None:
        if event.kind is StoreEventKind.CREATED:
            owner = parse_chunk_name(event.chunk).instance
            if owner != self._instance:
                return  # replicas download each chunk from its owner only
            line = encode_event("chunk_created", owner, event.category, event.chunk)
        elif event.kind is StoreEventKind.ACKED:
            owner = parse_chunk_name(event.chunk).instance
            line = encode_event("chunk_ack", owner, event.category, event.chunk)
        else:
            return
        for sub in self._subscribers.values():
            sub.send(line)

    def _replay(self) -> list[bytes]:
        """The state a (re)subscribing peer must know: our latest chunks, recent tombstones."""
        lines: list[bytes] = []
        for category in self._store.categories():
            index = self._store.last_index(category, self._instance)
            if index >= 0:
                chunk = chunk_file_name(self._instance, index)
                lines.append(encode_event("chunk_created", self._instance, category, chunk))
            by_owner: dict[str, list[str]] = {}
            for chunk in self._store.tombstones(category):
                by_owner.setdefault(chunk.rpartition("-")[0], []).append(chunk)
            for owner, chunks in by_owner.items():
                for chunk in chunks[-REPLAY_TOMBSTONES:]:
                    lines.append(encode_event("chunk_ack", owner, category, chunk))
        return lines

    async def events(self, request: web.Request) -> web.StreamResponse:
        instance = validate_instance(str_param(request, "instance"))
        if self._stopped:
            raise ReplicationError("node is stopping")
        sub = _Subscriber(instance)
        old = self._subscribers.get(instance)
        if old is not None:
            old.close()
        # Registered before the replay is taken: an event in between is sent twice (harmless:
        # both kinds are idempotent), never missed.
        self._subscribers[instance] = sub
        resp = web.StreamResponse(headers={"Content-Type": _NDJSON})
        try:
            await resp.prepare(request)
            await resp.write(_EMPTY + b"".join(self._replay()))
            logger.info("instance=%s peer %s subscribed to events", self._instance, instance)
            while True:
                try:
                    async with asyncio.timeout(HEARTBEAT_INTERVAL):
                        line = await sub.queue.get()
                except TimeoutError:
                    line = _EMPTY
                if line is None:
                    break
                await resp.write(line)
        except (ConnectionError, aiohttp.ClientConnectionResetError) as exc:
            logger.debug("events stream to %s ended: %s", instance, exc)
        finally:
            sub.close()
            if self._subscribers.get(instance) is sub:
                del self._subscribers[instance]
        return resp

    # --- progress reports and min_sync_replicas ------------------------------------------

    async def ack(self, request: web.Request) -> web.StreamResponse:
        category = validate_category(str_param(request, "category"))
        chunk = str_param(request, "chunk")
        owner = parse_chunk_name(chunk).instance
        instance = validate_instance(str_param(request, "instance"))
        size = int_param(request, "size")
        if not self._is_peer(instance):
            # Only a member's report may count towards min_sync_replicas (a forged one would
            # answer a write 200 with no replica holding it). A peer that joined a moment ago
            # and is not in our view yet retries its report.
            raise UnknownPeerError(
                f"instance {instance!r} is not a peer of {self._instance}; its replication "
                "report is ignored"
            )
        if owner == self._instance:
            self.record(category, chunk, instance, size)
        return web.Response()

    def record(self, category: str, chunk: str, instance: str, size: int) -> None:
        """``instance`` holds our ``chunk`` up to ``size``: wake the writers it satisfies."""
        key = (category, instance)
        new = (chunk, size)
        cur = self._progress.get(key)
        if cur is not None and position_rank(new) <= position_rank(cur):
            return
        self._progress[key] = new
        waiters = self._waiters.get(category)
        if not waiters:
            return
        for w in waiters:
            if not w.future.done() and self._held_by(category, w.chunk, w.end) >= w.count:
                w.future.set_result(None)

    def _held_by(self, category: str, chunk: str, end: int) -> int:
        want = position_rank((chunk, end))
        return sum(
            1 for (cat, _), pos in self._progress.items()
            if cat == category and position_rank(pos) >= want
        )

    async def wait_replicas(self, category: str, chunk: str, end: int, count: int) -> None:
        """Return when ``count`` peers hold ``category/chunk`` up to ``end``.

        Raises:
            ReplicationError: fewer live peers than ``count`` (at once; waiting cannot help).
            ReplicationTimeoutError: not enough reports within ``min_sync_timeout``.
        """
        live = self._live_peers()
        if count > live:
            raise ReplicationError(
                f"min_sync_replicas={count} but only {live} other node(s) are live; "
                "the data was written here but is not on enough replicas"
            )
        if self._held_by(category, chunk, end) >= count:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(chunk, end, count, fut)
        self._waiters.setdefault(category, []).append(waiter)
        timeout = self._config.min_sync_timeout
        try:
            async with asyncio.timeout(timeout):
                await fut
        except TimeoutError:
            raise ReplicationTimeoutError(
                f"min_sync_replicas={count}: only {self._held_by(category, chunk, end)} "
                f"replica(s) reported holding {category}/{chunk} up to {end} within "
                f"{timeout:g} s; the data was written here"
            ) from None
        finally:
            waiters = self._waiters.get(category, [])
            with contextlib.suppress(ValueError):
                waiters.remove(waiter)
            if not waiters:
                self._waiters.pop(category, None)


def position_rank(position: tuple[str, int]) -> tuple[int, int]:
    """A position ``(chunk, size)`` in one owner's stream, ordered by chunk index (not by name:
    a Go data directory's ``me-chunk1`` sorts after ``me-chunk000000002`` as a string)."""
    return parse_chunk_name(position[0]).index, position[1]
