"""Replication: every node holds every owner's chunks (``DESIGN.md``, "The bus").

Two halves, one per direction:

- :class:`ReplicationServer` (the owner side) serves ``/replication/events`` (an NDJSON stream of
  ``chunk_created`` / ``chunk_ack`` events per subscriber) and ``/replication/ack`` (a replica
  reports how far it holds one of our chunks), and implements ``min_sync_replicas`` waits
  (:class:`~chukcha.bus.http.ReplicaWaiter`) woken by those reports.
- :class:`Replicator` (the replica side) keeps one :class:`PeerLink` per peer: it subscribes to
  the peer's events and, per category, downloads the peer's own chunks strictly in order from the
  local size on (so a restart resumes), never a tombstoned one, reporting progress after every
  append.

Nothing polls on a timer. New chunks arrive as ``chunk_created`` events; new data in an open
chunk arrives through the ``/read?wait=`` long poll, which the owner answers the moment a write
lands or the chunk becomes complete. Catch-up runs back to back, with the next read in flight
while the previous batch is written to disk.

Acks: an ack (local, or replicated from a peer) emits an ``ACKED`` store event, which is sent to
every subscriber; applying a replicated ack is idempotent and emits only when it changed
something, so acks spread transitively and stop. An ack that could not be delivered (the peer was
down) is not lost: when a peer (re)subscribes it is first sent the state — ``chunk_created`` for
our latest chunk of every category and ``chunk_ack`` for the most recent tombstones per
(category, owner) — which also survives restarts, because tombstones are files. Older acks of
the peer's own stream are inferred from its listing when a replica syncs (``_drop_acked``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp
import orjson
from aiohttp.http_exceptions import LineTooLong

from chukcha.bus import web
from chukcha.bus.catchup import CatchUp
from chukcha.bus.chunks import ChunkStore, StoreEvent, StoreEventKind
from chukcha.bus.config import Peer, ReplicationConfig
from chukcha.bus.coordination import Membership
from chukcha.bus.fetch import ChunkFetcher, UnsupportedResponseError
from chukcha.bus.http import Handler, int_param, str_param
from chukcha.bus.peers import PeerAccess
from chukcha.bus.tasks import log_task_crash
from chukcha.errors import (
    ChukchaError,
    ReplicationError,
    ReplicationTimeoutError,
    UnknownPeerError,
)
from chukcha.protocol import (
    ChunkInfo,
    chunk_file_name,
    parse_chunk_name,
    validate_category,
    validate_instance,
)

__all__ = [
    "HEARTBEAT_INTERVAL",
    "PeerLink",
    "ReplicationServer",
    "Replicator",
    "encode_event",
]

logger = logging.getLogger(__name__)

HEARTBEAT_INTERVAL: Final = 10.0
"""The events stream sends an empty message this often (the Go server does the same)."""
REPLAY_TOMBSTONES: Final = 1024
"""Tombstones per (category, owner) re-sent to a (re)subscribing peer: the bound of the replay."""
_MAX_QUEUE: Final = 100_000
_MAX_EVENT_LINE: Final = 64 << 10
"""Longest line read from a peer's events stream (an event is ~100 bytes)."""
_MAX_LISTING: Final = 64 << 20
"""Largest ``/listChunks`` answer read from a peer (~70 bytes per chunk: ~1M chunks)."""
_POLL_MIN: Final = 0.05
_POLL_MAX: Final = 1.0
"""Pauses between reads of an open chunk of a peer that does not long-poll (grows while it
is idle, back to the minimum on data)."""
_REPORT_EVERY: Final = 0.05
"""During a catch-up, progress is reported to the owner at most this often (and at its end)."""
_EMPTY: Final = b'{"Type":"","Chunk":{"Owner":"","Category":"","FileName":""}}\n'
_NDJSON: Final = "application/x-ndjson"


def encode_event(kind: str, owner: str, category: str, chunk: str) -> bytes:
    """One line of the events stream, in the Go server's JSON shape."""
    return orjson.dumps(
        {"Type": kind, "Chunk": {"Owner": owner, "Category": category, "FileName": chunk}}
    ) + b"\n"


# --- the owner side -----------------------------------------------------------------------


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
        if cur is not None and _rank(new) <= _rank(cur):
            return
        self._progress[key] = new
        waiters = self._waiters.get(category)
        if not waiters:
            return
        for w in waiters:
            if not w.future.done() and self._held_by(category, w.chunk, w.end) >= w.count:
                w.future.set_result(None)

    def _held_by(self, category: str, chunk: str, end: int) -> int:
        want = _rank((chunk, end))
        return sum(
            1 for (cat, _), pos in self._progress.items()
            if cat == category and _rank(pos) >= want
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


def _rank(position: tuple[str, int]) -> tuple[int, int]:
    """A position in OUR stream, ordered by chunk index (not by name: a Go data directory's
    ``me-chunk1`` sorts after ``me-chunk000000002`` as a string)."""
    return parse_chunk_name(position[0]).index, position[1]


# --- the replica side ---------------------------------------------------------------------


@dataclass(slots=True)
class _CategoryState:
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    remote: dict[str, ChunkInfo] = field(default_factory=dict)  # last listing, own chunks
    task: asyncio.Task[None] | None = None
    warned: float = float("-inf")  # monotonic time of the last warning about this category


class PeerLink:
    """Replication from one peer: its events stream and one downloader per category."""

    def __init__(
        self,
        peer: Peer,
        store: ChunkStore,
        config: ReplicationConfig,
        session: aiohttp.ClientSession,
        buffers: _BufferPool,
        *,
        access: PeerAccess | None = None,
    ) -> None:
        self.peer = peer
        self._access = access or PeerAccess()
        self._buffers = buffers
        self._store = store
        self._config = config
        self._session = session
        self._me = store.instance
        self._categories: dict[str, _CategoryState] = {}
        self._events_task: asyncio.Task[None] | None = None
        self._report_task: asyncio.Task[None] | None = None
        self._reports: dict[str, tuple[str, int]] = {}  # category -> furthest (chunk, size)
        self._report_wake = asyncio.Event()
        self._up = asyncio.Event()
        self.last_seen: float | None = None
        """Unix time the peer was last heard from (``None``: never)."""
        self.bytes_replicated = 0
        self.connects = 0
        self._fetch_unsupported = False
        self.no_long_poll = False
        self.empty_polls = 0
        """Reads of the peer's open chunks that found nothing new."""
        """Whether the peer answered a ``/read?wait=`` at once with nothing (no long polls)."""

    @property
    def up(self) -> bool:
        return self._up.is_set()

    def lag_bytes(self) -> int:
        """Bytes of the peer's chunks (as last listed) not downloaded here yet."""
        lag = 0
        for category, state in self._categories.items():
            for info in state.remote.values():
                if self._store.is_tombstoned(category, info.name):
                    continue
                lag += max(0, info.size - (self._store.chunk_size(category, info.name) or 0))
        return lag

    def start(self) -> None:
        self._events_task = asyncio.create_task(
            self._events_loop(), name=f"events-{self.peer.instance}"
        )
        self._events_task.add_done_callback(_log_crash)
        self._report_task = asyncio.create_task(
            self._report_loop(), name=f"reports-{self.peer.instance}"
        )
        self._report_task.add_done_callback(_log_crash)

    async def stop(self, timeout: float) -> None:
        tasks = [t for t in [self._events_task, self._report_task,
                             *(s.task for s in self._categories.values())]
                 if t is not None]
        self._events_task = self._report_task = None
        for s in self._categories.values():
            s.task = None
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        self._up.clear()

    # --- events --------------------------------------------------------------------------

    async def _events_loop(self) -> None:
        url = f"{self.peer.url}/replication/events"
        backoff = self._config.retry_interval
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=10, sock_read=3 * HEARTBEAT_INTERVAL
        )
        while True:
            try:
                async with self._session.get(
                    url, params={"instance": self._me}, timeout=timeout
                ) as resp:
                    _check_ok(resp, url)
                    self.connects += 1
                    self._up.set()
                    self.last_seen = time.time()
                    backoff = self._config.retry_interval
                    logger.info("instance=%s subscribed to %s events", self._me,
                                self.peer.instance)
                    # The Go server sends no replay of what exists: look at every category of
                    # the peer once per subscription (events that arrive meanwhile wait in the
                    # stream), or chunks created before we subscribed would wait for the next.
                    await self._wake_all()
                    async for line in _lines(resp.content, _MAX_EVENT_LINE):
                        self.last_seen = time.time()
                        await self._on_event(line)
            except (aiohttp.ClientError, TimeoutError, ReplicationError, ValueError) as exc:
                if self.up:
                    logger.warning("instance=%s lost events stream of %s: %s", self._me,
                                   self.peer.instance, exc)
            except Exception:
                # Anything else (an OSError applying an ack, a bug) must not end replication
                # from this peer until a restart: log it, back off, subscribe again (the replay
                # brings back what was being applied). CancelledError is not an Exception.
                logger.exception("instance=%s events from %s failed; resubscribing", self._me,
                                 self.peer.instance)
            self._up.clear()
            await asyncio.sleep(backoff)  # reconnect backoff, not synchronisation
            backoff = min(backoff * 2, 5.0)

    async def _wake_all(self) -> None:
        """Start (or re-run) the downloader of every category the peer lists."""
        url = f"{self.peer.url}/listCategories"
        async with self._session.get(url, timeout=aiohttp.ClientTimeout(total=30)) as resp:
            if resp.status != 200:
                raise ReplicationError(f"{url}: HTTP {resp.status}")
            names = orjson.loads(await _read_capped(resp, _MAX_LISTING))
        if not isinstance(names, list):
            raise ReplicationError(f"{url}: unexpected answer")
        for name in names:
            if isinstance(name, str):
                try:
                    self.wake(validate_category(name))
                except ChukchaError:
                    logger.warning("ignoring category %r listed by %s", name[:200],
                                   self.peer.instance)

    async def _on_event(self, line: bytes) -> None:
        if not line.strip():
            return
        msg = orjson.loads(line)
        chunk_obj = msg.get("Chunk") if isinstance(msg, dict) else None
        if not isinstance(chunk_obj, dict):
            return  # not an event we know (or the heartbeat)
        kind = msg.get("Type")
        category = chunk_obj.get("Category")
        chunk = chunk_obj.get("FileName")
        if not kind or not isinstance(category, str) or not isinstance(chunk, str):
            return
        if not category or not chunk:
            return  # the heartbeat
        try:
            validate_category(category)
            cname = parse_chunk_name(chunk)
        except ChukchaError:
            logger.warning("ignoring bad event from %s: %r", self.peer.instance, line[:200])
            return
        if kind == "chunk_created":
            if cname.instance == self.peer.instance:
                self.wake(category)
        elif kind == "chunk_ack":
            if cname.instance == self._me:
                # An ack of our own chunk done elsewhere: apply it like a consumer's ack.
                await self._apply_own_ack(category, chunk)
            else:
                with contextlib.suppress(ChukchaError):
                    await self._store.tombstone_replica(category, chunk)

    async def _apply_own_ack(self, category: str, chunk: str) -> None:
        try:
            await self._store.tombstone_replica(category, chunk)
        except ChukchaError as exc:
            # Our current write chunk cannot be acked; a consumer that acked it elsewhere read
            # an incomplete copy. Keep the data.
            logger.warning("instance=%s refused replicated ack of own %s/%s: %s",
                           self._me, category, chunk, exc)

    def wake(self, category: str) -> None:
        """The peer has (or may have) news in ``category``: make sure its downloader runs."""
        state = self._categories.get(category)
        if state is None:
            state = self._categories[category] = _CategoryState()
        state.wake.set()
        if state.task is None or state.task.done():
            state.task = asyncio.create_task(
                self._category_loop(category, state),
                name=f"replicate-{self.peer.instance}-{category}",
            )
            state.task.add_done_callback(_log_crash)

    # --- downloads -----------------------------------------------------------------------

    async def _category_loop(self, category: str, state: _CategoryState) -> None:
        while True:
            state.wake.clear()
            try:
                busy = await self._sync_category(category, state)
            except Exception as exc:
                # Expected (the peer is down, a race with an ack) or not (an OSError here): never
                # let the downloader die, it would stay dead until the peer announces a chunk.
                if isinstance(exc, aiohttp.ClientError | TimeoutError):
                    # The peer is down or restarting: /status shows it; not worth a warning.
                    logger.debug("instance=%s replicating %s/%s: %s", self._me,
                                 self.peer.instance, category, exc)
                elif isinstance(exc, ChukchaError | ValueError):
                    # Refused data or a race: visible, but at most once a minute per category.
                    now = time.monotonic()
                    if now - state.warned >= 60.0:
                        state.warned = now
                        logger.warning("instance=%s replicating %s/%s: %s", self._me,
                                       self.peer.instance, category, exc)
                else:
                    logger.exception("instance=%s replicating %s/%s failed", self._me,
                                     self.peer.instance, category)
                # Retry after a pause, or at once when the peer announces something.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._config.retry_interval):
                        await state.wake.wait()
                continue
            if not busy:
                await state.wake.wait()  # until the peer announces a new chunk

    async def _list(self, category: str, state: _CategoryState) -> list[ChunkInfo]:
        url = f"{self.peer.url}/listChunks"
        async with self._session.get(
            url, params={"category": category}, timeout=aiohttp.ClientTimeout(total=30)
        ) as resp:
            if resp.status != 200:
                raise ReplicationError(f"{url}: HTTP {resp.status}")
            items = orjson.loads(await _read_capped(resp, _MAX_LISTING)) or []
        try:
            own = [ChunkInfo.from_json(i) for i in items
                   if str(i.get("name", "")).rpartition("-")[0] == self.peer.instance]
        except (AttributeError, KeyError, TypeError) as exc:
            raise ReplicationError(f"{url}: unexpected listing: {exc}") from None
        state.remote = {c.name: c for c in own}
        return own

    async def _sync_category(self, category: str, state: _CategoryState) -> bool:
        """Download what the peer has. Returns False when there is nothing to wait on but a
        new chunk (everything here is complete).

        One listing per pass, not per chunk: every complete chunk the listing shows is fetched
        back to back (their sizes are final), then the open one is followed; a listing per
        chunk made catch-up of many small chunks quadratic (2.6 MB/s for 64 KiB chunks)."""
        listing = await self._list(category, state)
        await self._drop_acked(category, listing)
        todo: list[tuple[ChunkInfo, int]] = []
        for info in listing:
            if self._store.is_tombstoned(category, info.name):
                continue
            local = self._store.chunk_size(category, info.name) or 0
            if info.complete and local >= info.size:
                continue
            if not info.complete:
                if todo:
                    break  # the complete ones first; the next pass follows this one
                await self._download(category, state, info, local)
                return True
            todo.append((info, local))
        if not todo:
            return False
        await self._fetch_complete(category, todo)
        return True

    async def _drop_acked(self, category: str, listing: list[ChunkInfo]) -> None:
        """Tombstone the peer's own chunks that were acked while no ack event could reach us.

        The (re)subscription replay re-sends only the newest ``REPLAY_TOMBSTONES`` acks per
        (category, owner); older ones would stay live here forever. A chunk of the peer's stream
        that we hold, older than the oldest one it lists and not listed, is a candidate; it is
        dropped only if the owner confirms it acked it (``/replication/tombstones``), because a
        chunk the owner lost some other way (a wiped or restored data directory) must keep its
        last copies. Chunks of other owners are never touched here.
        """
        if not listing:
            return  # nothing to compare with (a wiped owner is not a reason to drop data)
        owner = self.peer.instance
        listed = {c.name for c in listing}
        oldest = min(parse_chunk_name(c.name).index for c in listing)
        candidates = []
        for info in self._store.list_chunks(category):
            cname = parse_chunk_name(info.name)
            if cname.instance == owner and cname.index < oldest and info.name not in listed:
                candidates.append(info.name)
        if not candidates:
            return
        confirmed = await self._acked_at_owner(category)
        for name in candidates:
            if name not in confirmed:
                logger.warning("instance=%s category=%s keeping %s: its owner no longer lists "
                               "it but does not report acking it", self._me, category, name)
                continue
            if await self._store.tombstone_replica(category, name):
                logger.info("instance=%s category=%s dropped %s: acked at its owner while we "
                            "were apart", self._me, category, name)

    async def _acked_at_owner(self, category: str) -> set[str]:
        """Names of the peer's own chunks it acknowledged (empty for a peer without the
        extension, e.g. a Go node: then nothing is dropped by inference)."""
        url = f"{self.peer.url}/replication/tombstones"
        async with self._session.get(
            url, params={"category": category}, timeout=aiohttp.ClientTimeout(total=30)
        ) as resp:
            if resp.status == 404:
                return set()
            if resp.status != 200:
                raise ReplicationError(f"{url}: HTTP {resp.status}")
            names = orjson.loads(await _read_capped(resp, _MAX_LISTING))
        if not isinstance(names, list):
            raise ReplicationError(f"{url}: unexpected answer")
        return {n for n in names if isinstance(n, str)}

    async def _read(
        self, category: str, chunk: str, off: int, wait: float
    ) -> bytes | None:
        """Bytes of the peer's chunk from ``off`` (``b""``: none yet); ``None`` if it is gone."""
        params = {"category": category, "chunk": chunk, "off": str(off),
                  "max_size": str(self._config.batch_size)}
        if wait > 0:
            params["wait"] = f"{wait:g}"
        async with self._session.get(
            f"{self.peer.url}/read", params=params,
            timeout=aiohttp.ClientTimeout(total=wait + 30),
        ) as resp:
            if resp.status == 404:
                return None
            if resp.status != 200:
                raise ReplicationError(
                    f"read {category}/{chunk}@{off} from {self.peer.instance}: HTTP "
                    f"{resp.status} {(await resp.text())[:200]}"
                )
            return await resp.read()

    def _report(self, category: str, chunk: str, size: int) -> None:
        """Queue a progress report for the owner; the reporter task sends the furthest
        position per category (downloads are in order, so holding ``(chunk, size)`` means
        holding everything before it: catching up 2,000 chunks costs a few reports, not 2,000),
        so downloads never wait for it."""
        new = (chunk, size)
        cur = self._reports.get(category)
        if cur is None or _rank(new) > _rank(cur):
            self._reports[category] = new
        self._report_wake.set()

    async def _report_loop(self) -> None:
        while True:
            await self._report_wake.wait()
            self._report_wake.clear()
            pending, self._reports = self._reports, {}
            failed = False
            for category, (chunk, size) in pending.items():
                if failed or not await self._send_report_safe(category, chunk, size):
                    failed = True
                    # Keep it (unless a newer report replaced it) and retry: a writer waiting
                    # on min_sync_replicas may depend on exactly this report.
                    self._reports.setdefault(category, (chunk, size))
            if failed:
                self._report_wake.set()
                await asyncio.sleep(self._config.retry_interval)  # retry backoff

    async def _send_report_safe(self, category: str, chunk: str, size: int) -> bool:
        try:
            return await self._send_report(category, chunk, size)
        except Exception:
            # Never let the reporter die: writers waiting on min_sync_replicas depend on it.
            logger.exception("instance=%s reporting %s/%s@%d to %s failed", self._me, category,
                             chunk, size, self.peer.instance)
            return False

    async def _send_report(self, category: str, chunk: str, size: int) -> bool:
        try:
            async with self._session.get(
                f"{self.peer.url}/replication/ack",
                params={"category": category, "chunk": chunk, "instance": self._me,
                        "size": str(size)},
                timeout=aiohttp.ClientTimeout(total=10),
            ) as resp:
                await resp.read()
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError) as exc:
            logger.debug("reporting %s/%s@%d to %s failed: %s", category, chunk, size,
                         self.peer.instance, exc)
            return False

    async def _download(
        self, category: str, state: _CategoryState, info: ChunkInfo, offset: int
    ) -> None:
        """Download one chunk from ``offset`` until it is complete and fully here, acked, or
        gone. An open chunk is followed with the long poll; once complete, the rest is fetched
        back to back by :meth:`_fetch_complete`."""
        chunk = info.name
        wait = self._config.poll_wait
        loop = asyncio.get_running_loop()
        pause = _POLL_MIN
        while not info.complete:
            asked = loop.time()
            data = await self._read(category, chunk, offset, wait)
            if data is None:
                return  # acked or removed at the owner; the ack event follows
            if data:
                pause = _POLL_MIN
                new_size = await self._store.append_replica(category, chunk, offset, data)
                if new_size is None:
                    return  # acked meanwhile: dropped, never resurrected
                self.bytes_replicated += len(data)
                offset = new_size
                self._report(category, chunk, offset)
                continue
            self.empty_polls += 1
            if loop.time() - asked < min(wait / 2, _POLL_MAX):
                # An empty answer at once: the chunk became complete, or the peer does not
                # hold the request (the Go server ignores wait=). In the second case poll with
                # a growing pause (woken early by the peer's events) instead of re-reading and
                # re-listing in a tight loop.
                fresh = next((c for c in await self._list(category, state)
                              if c.name == chunk), None)
                if fresh is None:
                    return
                if fresh.complete:
                    info = fresh
                    continue
                if not self.no_long_poll:
                    self.no_long_poll = True
                    logger.info("instance=%s peer %s does not long-poll /read (a Go server?): "
                                "polling its open chunks every %g-%g s", self._me,
                                self.peer.instance, _POLL_MIN, _POLL_MAX)
                state.wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(pause):
                        await state.wake.wait()  # a poll interval, cut short by an event
                pause = min(pause * 2, _POLL_MAX)
                continue
            # Nothing new for `wait` seconds, or the chunk became complete: ask which.
            fresh = next((c for c in await self._list(category, state) if c.name == chunk), None)
            if fresh is None:
                return
            info = fresh
        if offset < info.size:
            await self._fetch_complete(category, [(info, offset)])

    async def _fetch_complete(self, category: str, todo: list[tuple[ChunkInfo, int]]) -> None:
        """Catch-up of complete chunks (``(listing entry, local size)``, in order): see
        :class:`~chukcha.bus.catchup.CatchUp`."""
        plan = [(info.name, off, info.size) for info, off in todo if off < info.size]
        if not plan:
            return
        async with self._buffers.pair() as bufs, contextlib.AsyncExitStack() as stack:
            idle: list[ChunkFetcher | None] = []

            async def fetch(chunk: str, off: int, buf: bytearray) -> int | None:
                fetcher = idle.pop() if idle else await stack.enter_async_context(
                    self._fetcher())
                try:
                    return await self._read_fast(fetcher, buf, category, chunk, off)
                finally:
                    idle.append(fetcher)  # a failed read closed its connection: reconnects

            def appended(chunk: str, n: int, size: int) -> None:
                self.bytes_replicated += n
                reports.progress(chunk, size)

            reports = _Throttle(lambda c, n: self._report(category, c, n))
            try:
                await CatchUp(self._store, category, plan, buffers=bufs, fetch=fetch,
                              appended=appended).run()
            finally:
                reports.flush()

    @contextlib.asynccontextmanager
    async def _fetcher(self) -> AsyncIterator[ChunkFetcher | None]:
        try:
            fetcher = ChunkFetcher(self.peer.url, headers=self._access.header_lines)
        except UnsupportedResponseError:
            yield None  # not plain http: aiohttp does the reads
            return
        async with fetcher:
            yield fetcher

    async def _read_fast(
        self, fetcher: ChunkFetcher | None, buf: bytearray, category: str, chunk: str, off: int
    ) -> int | None:
        """A catch-up read into ``buf`` (see :mod:`chukcha.bus.fetch`), aiohttp as fallback."""
        if fetcher is not None and not self._fetch_unsupported:
            params = {"category": category, "chunk": chunk, "off": str(off),
                      "max_size": str(len(buf))}
            try:
                status, n = await fetcher.read(params, buf)
            except UnsupportedResponseError as exc:
                logger.info("instance=%s plain reads from %s: %s", self._me,
                            self.peer.instance, exc)
                self._fetch_unsupported = True
            except OSError as exc:  # ConnectionError included
                raise ReplicationError(f"read from {self.peer.instance}: {exc}") from exc
            else:
                if status == 404:
                    return None
                if status != 200:
                    raise ReplicationError(
                        f"read {category}/{chunk}@{off} from {self.peer.instance}: HTTP "
                        f"{status} {bytes(buf[:min(n, 200)])!r}"
                    )
                return n
        return await self._read_into(buf, category, chunk, off)

    async def _read_into(self, buf: bytearray, category: str, chunk: str, off: int) -> int | None:
        """Like :meth:`_read` (no wait) into ``buf``; returns the length, ``None`` if gone."""
        params = {"category": category, "chunk": chunk, "off": str(off),
                  "max_size": str(len(buf))}
        async with self._session.get(
            f"{self.peer.url}/read", params=params, timeout=aiohttp.ClientTimeout(total=60)
        ) as resp:
            if resp.status == 404:
                return None
            if resp.status != 200:
                raise ReplicationError(
                    f"read {category}/{chunk}@{off} from {self.peer.instance}: HTTP "
                    f"{resp.status} {(await resp.text())[:200]}"
                )
            n = 0
            async for piece in resp.content.iter_any():
                end = n + len(piece)
                if end > len(buf):
                    raise ReplicationError(f"{self.peer.instance} sent more than max_size")
                buf[n:end] = piece
                n = end
            return n


class _Throttle:
    """Progress reports of one catch-up: at its end and at most every ``_REPORT_EVERY``
    seconds meanwhile (holding a later position implies every earlier one)."""

    def __init__(self, report: Callable[[str, int], None]) -> None:
        self._report = report
        self._at = time.monotonic()
        self._unsent: tuple[str, int] | None = None

    def progress(self, chunk: str, size: int) -> None:
        self._unsent = (chunk, size)
        now = time.monotonic()
        if now - self._at >= _REPORT_EVERY:
            self._at = now
            self.flush()

    def flush(self) -> None:
        if self._unsent is not None:
            self._report(*self._unsent)
            self._unsent = None


class _BufferPool:
    """Download buffers shared by every link: bounds memory (and concurrent catch-ups)."""

    def __init__(self, size: int, pairs: int) -> None:
        self._size = size
        self._free: list[tuple[bytearray, bytearray]] = []
        self._slots = asyncio.Semaphore(pairs)

    @contextlib.asynccontextmanager
    async def pair(self) -> AsyncIterator[tuple[bytearray, bytearray]]:
        async with self._slots:
            bufs = self._free.pop() if self._free else (
                bytearray(self._size), bytearray(self._size))
            try:
                yield bufs
            finally:
                self._free.append(bufs)


class Replicator:
    """The replica side for the whole node: one :class:`PeerLink` per member peer."""

    def __init__(
        self,
        store: ChunkStore,
        config: ReplicationConfig,
        membership: Membership,
        access: PeerAccess | None = None,
    ) -> None:
        self._store = store
        self._config = config
        self._membership = membership
        self._access = access or PeerAccess()
        self._links: dict[str, PeerLink] = {}
        self._session: aiohttp.ClientSession | None = None
        self._dead_task: asyncio.Task[None] | None = None
        self._gone_since: dict[str, float] = {}
        self._dead_owners: set[str] = set()
        self._stopping: set[asyncio.Task[None]] = set()
        self._buffers = _BufferPool(config.batch_size, pairs=4)

    @property
    def links(self) -> Mapping[str, PeerLink]:
        return self._links

    async def start(self) -> None:
        self._session = self._access.session(limit=0, enable_cleanup_closed=True)
        self._membership.add_listener(self._on_members)
        self._on_members(self._membership.peers())
        self._dead_task = asyncio.create_task(self._dead_owners_loop(), name="dead-owners")
        self._dead_task.add_done_callback(_log_crash)

    async def stop(self, timeout: float = 5.0) -> None:
        links, self._links = list(self._links.values()), {}
        await asyncio.gather(*(link.stop(timeout) for link in links))
        if self._stopping:
            await asyncio.wait(list(self._stopping), timeout=timeout)
        if self._dead_task is not None:
            self._dead_task.cancel()
            await asyncio.wait([self._dead_task], timeout=timeout)
            self._dead_task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _on_members(self, peers: Mapping[str, Peer]) -> None:
        if self._session is None:
            return
        for name in list(self._links):
            link = self._links[name]
            if name not in peers or peers[name].address != link.peer.address:
                del self._links[name]
                self._gone_since.setdefault(name, time.monotonic())
                self._stop_later(link)
        for name, peer in peers.items():
            if name not in self._links:
                link = PeerLink(peer, self._store, self._config, self._session, self._buffers,
                                access=self._access)
                self._links[name] = link
                link.start()

    def _stop_later(self, link: PeerLink) -> None:
        # Called from a synchronous listener; the stopping task is owned (kept in a set until
        # done, awaited by stop()).
        task = asyncio.create_task(link.stop(self._config.retry_interval + 5),
                                   name=f"unlink-{link.peer.instance}")
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    async def _dead_owners_loop(self) -> None:
        """Mark owners gone longer than ``dead_peer_timeout`` dead (their last chunk complete)."""
        timeout = self._config.dead_peer_timeout
        period = min(max(timeout / 10, 0.05), 60.0)
        while True:
            await asyncio.sleep(period)  # a coarse timer over a timeout measured in minutes
            try:
                self._mark_dead_owners(timeout)
            except Exception:
                logger.exception("instance=%s checking for dead owners failed",
                                 self._store.instance)

    def _mark_dead_owners(self, timeout: float) -> None:
        now = time.monotonic()
        owners = {o for c in self._store.categories() for o in self._store.owners(c)}
        owners.discard(self._store.instance)
        for owner in owners:
            link = self._links.get(owner)
            if link is not None and link.up:
                self._gone_since.pop(owner, None)
                if owner in self._dead_owners:
                    self._dead_owners.discard(owner)
                    self._store.set_owner_dead(owner, False)
                continue
            since = self._gone_since.setdefault(owner, now)
            if now - since >= timeout and owner not in self._dead_owners:
                logger.warning("instance=%s owner %s gone for %.1f s: treating its last "
                               "chunks as complete", self._store.instance, owner,
                               now - since)
                self._dead_owners.add(owner)
                self._store.set_owner_dead(owner, True)

    def status(self) -> list[dict[str, Any]]:
        """Per-peer replication status (``/status``)."""
        return [
            {
                "instance": name,
                "url": link.peer.url,
                "up": link.up,
                "lag_bytes": link.lag_bytes(),
                "last_seen": link.last_seen,
                "bytes_replicated": link.bytes_replicated,
            }
            for name, link in sorted(self._links.items())
        ]


async def _lines(content: aiohttp.StreamReader, limit: int) -> AsyncIterator[bytes]:
    """Lines of a peer's NDJSON stream, none longer than ``limit`` (a peer cannot make us
    buffer without bound)."""
    while True:
        try:
            line = await content.readline(max_line_length=limit)
        except LineTooLong:
            raise ReplicationError(f"a line of the events stream is over {limit} bytes") from None
        if not line:
            return
        yield line


async def _read_capped(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """A peer's whole (JSON) answer, refused when it is over ``limit`` bytes."""
    if resp.content_length is not None and resp.content_length > limit:
        raise ReplicationError(f"{resp.url}: answer of {resp.content_length} bytes is over "
                               f"{limit}")
    buf = bytearray()
    async for piece in resp.content.iter_any():
        buf += piece
        if len(buf) > limit:
            raise ReplicationError(f"{resp.url}: answer is over {limit} bytes")
    return bytes(buf)


def _check_ok(resp: aiohttp.ClientResponse, url: str) -> None:
    if resp.status != 200:
        raise ReplicationError(f"{url}: HTTP {resp.status}")


_log_crash: Final = functools.partial(log_task_crash, what="replication")
