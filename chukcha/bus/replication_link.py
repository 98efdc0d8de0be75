"""Replication, the replica side for one peer: :class:`PeerLink` downloads its chunks.

A link subscribes to the peer's ``/replication/events`` (see :mod:`chukcha.bus.replication`)
and, per category, downloads the peer's own chunks strictly in order from the local size on (so
a restart resumes), never a tombstoned one, queueing a progress report
(:class:`~chukcha.bus.replication_reports.ProgressReporter`) after every append. It applies the
``chunk_ack`` events it receives. :class:`~chukcha.bus.replicator.Replicator` keeps one link per
member peer; the links share one :class:`BufferPool`.

New data in an open chunk arrives through the ``/read?wait=`` long poll, which the owner answers
the moment a write lands or the chunk becomes complete. Catch-up of complete chunks runs back to
back (:class:`~chukcha.bus.catchup.CatchUp`), with the next read in flight while the previous
batch is written to disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Final

import aiohttp
import orjson
from aiohttp.http_exceptions import LineTooLong

from chukcha.bus.catchup import CatchUp
from chukcha.bus.chunks import ChunkStore
from chukcha.bus.config import Peer, ReplicationConfig
from chukcha.bus.fetch import ChunkFetcher, UnsupportedResponseError
from chukcha.bus.peers import PeerAccess
from chukcha.bus.replication import HEARTBEAT_INTERVAL
from chukcha.bus.replication_reports import ProgressReporter, Throttle
from chukcha.bus.tasks import log_task_crash
from chukcha.errors import ChukchaError, ReplicationError
from chukcha.protocol import ChunkInfo, parse_chunk_name, validate_category

__all__ = ["BufferPool", "PeerLink"]

logger = logging.getLogger(__name__)

_MAX_EVENT_LINE: Final = 64 << 10
"""Longest line read from a peer's events stream (an event is ~100 bytes)."""
_MAX_LISTING: Final = 64 << 20
"""Largest ``/listChunks`` answer read from a peer (~70 bytes per chunk: ~1M chunks)."""
_POLL_MIN: Final = 0.05
_POLL_MAX: Final = 1.0
"""Pauses between reads of an open chunk of a peer that does not long-poll (grows while it
is idle, back to the minimum on data)."""


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
        buffers: BufferPool,
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
        self._reporter = ProgressReporter(peer, store.instance, config, session)
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
            self._reporter.report_loop(), name=f"reports-{self.peer.instance}"
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

    async def _found(self, resp: aiohttp.ClientResponse, category: str, chunk: str,
                     off: int) -> bool:
        """A peer's answer to ``/read``: True for 200, False for 404 (the chunk is gone),
        :class:`ReplicationError` with the peer's reason otherwise."""
        if resp.status == 404:
            return False
        if resp.status != 200:
            raise ReplicationError(
                f"read {category}/{chunk}@{off} from {self.peer.instance}: HTTP "
                f"{resp.status} {(await resp.text())[:200]}"
            )
        return True

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
            if not await self._found(resp, category, chunk, off):
                return None
            return await resp.read()

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
                self._reporter.report(category, chunk, offset)
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

            reports = Throttle(lambda c, n: self._reporter.report(category, c, n))
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
            if not await self._found(resp, category, chunk, off):
                return None
            n = 0
            async for piece in resp.content.iter_any():
                end = n + len(piece)
                if end > len(buf):
                    raise ReplicationError(f"{self.peer.instance} sent more than max_size")
                buf[n:end] = piece
                n = end
            return n


class BufferPool:
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
