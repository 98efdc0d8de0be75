"""The consumer: reads every owner's stream of one category from one node (``PROTOCOL.md``).

Each owner's stream is read chunk by chunk, oldest first: ``/read`` from the position, an empty
answer at the end of a *complete* chunk moves on to the owner's next chunk, a 404 means "not
replicated here yet" and is waited out. For the open chunk the consumer asks the node to hold the
request (``wait=``, our long-poll extension) so an idle consumer neither spins nor polls fast; a
Go server ignores ``wait`` and answers at once, which the consumer notices and then polls every
``poll_interval`` instead.

Complete chunks never change, so the reads of an owner's next complete chunks (from their start)
go out while the current one is processed (``read_ahead``): walking many small chunks then costs
no round trip per chunk. A read-ahead answer is only handed out when the stream reaches that
chunk, in order; it changes no position and acks nothing.

Acks follow commits, never the other way round: :meth:`Consumer.commit` is told how far the
caller has *durably* processed each stream and only then acks (for its group) the complete
chunks that lie wholly before those positions.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import warnings
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final

from chukcha.client.consumer_types import Batch, ConsumerConfig, ConsumerStats, Position
from chukcha.client.http import NodeApi
from chukcha.errors import (
    ClientError,
    ConsumerError,
    RemoteNotFoundError,
    RequestRejectedError,
    ServerError,
)
from chukcha.protocol import (
    MAX_MESSAGE_SIZE,
    ChunkInfo,
    validate_category,
)

__all__ = ["Batch", "Consumer", "ConsumerConfig", "ConsumerStats", "Position"]

logger = logging.getLogger(__name__)

_INF: Final = float("inf")


@dataclass(slots=True)
class _ReadResult:
    data: bytes = b""
    error: ClientError | None = None
    started: float = 0.0
    elapsed: float = 0.0
    wait: float = 0.0


@dataclass(slots=True)
class _Stream:
    owner: str
    chunk: str
    offset: int
    # Complete chunks read to their end, or lying before a restored position: name -> size.
    finished: dict[str, int] = field(default_factory=dict)
    task: asyncio.Task[_ReadResult] | None = None
    # Reads of the owner's next complete chunks from offset 0, in chunk order: name -> read.
    ahead: dict[str, asyncio.Task[_ReadResult]] = field(default_factory=dict)
    not_before: float = 0.0
    at_end: bool = False
    big_read: bool = False


class Consumer:
    """Reads one category from one node; see the module docstring.

    ``async with client.consumer("orders", group="billing") as c:`` then ``await c.read()`` or
    ``async for batch in c``; after durably processing, ``await c.commit({owner: position})``.
    """

    def __init__(
        self,
        api: NodeApi,
        urls: list[str],
        category: str,
        *,
        group: str | None = None,
        positions: Mapping[str, Position] | None = None,
        config: ConsumerConfig | None = None,
        on_close: Callable[[Consumer], None] | None = None,
        register: bool = True,
        fence: tuple[int, int] | None = None,
    ) -> None:
        if not urls:
            raise ValueError("a consumer needs a node URL")
        self.fence = fence
        """``(partition, epoch)`` sent with every ack (a fenced ack), or ``None``."""
        self._api = api
        self._urls = list(urls)
        self._url_index = 0
        self._category = validate_category(category)
        self._group = group or None
        self._register_group = register
        self._config = config or ConsumerConfig()
        self._on_close = on_close
        self._streams: dict[str, _Stream] = {}
        for owner, pos in (positions or {}).items():
            if pos.owner != owner:
                raise ValueError(f"position {pos.chunk} is not a chunk of owner {owner!r}")
            self._streams[owner] = _Stream(owner, pos.chunk, pos.offset)
        self._restored = {o: p.chunk for o, p in (positions or {}).items()}
        self._chunks: dict[str, ChunkInfo] = {}
        self._by_owner: dict[str, list[ChunkInfo]] = {}
        self._listed_at = -_INF
        self._list_due = -_INF
        self._registered: set[str] = set()
        self._acked: set[str] = set()
        self._buffer: list[Batch] = []
        self._started = False
        self._closed = False
        self._batches = 0
        self._bytes_read = 0
        self._acks = 0
        self._failures = 0

    @property
    def stats(self) -> ConsumerStats:
        return ConsumerStats(self._batches, self._bytes_read, self._acks, self._failures,
                             self.lag_bytes)

    @property
    def lag_bytes(self) -> int:
        """Bytes listed (at the last listing) that have not been read yet."""
        lag = 0
        for owner, lst in self._by_owner.items():
            s = self._streams.get(owner)
            for c in lst:
                if s is None or c.name > s.chunk:
                    lag += c.size
                elif c.name == s.chunk:
                    lag += max(0, c.size - s.offset)
        return lag

    @property
    def category(self) -> str:
        return self._category

    @property
    def group(self) -> str | None:
        return self._group

    @property
    def url(self) -> str:
        """The node being read."""
        return self._urls[self._url_index]

    @property
    def caught_up(self) -> bool:
        """Every known stream has been read to its end (as of the last read of each)."""
        return self._listed_at > -_INF and all(s.at_end for s in self._streams.values())

    def backlog_bytes(self) -> int:
        """Bytes listed (as of the last listing) beyond where each stream is read up to: the
        same as :attr:`lag_bytes`."""
        return self.lag_bytes

    def positions(self) -> dict[str, Position]:
        """Where each stream is read up to (delivered, not necessarily committed)."""
        return {o: Position(s.chunk, s.offset) for o, s in self._streams.items()}

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Register the group (if any) and list the chunks; ``read`` does this when needed."""
        if self._closed:
            raise RuntimeError(f"consumer of {self._category!r} is stopped")
        if self._started:
            return
        await self._register(self.url)
        await self._register_elsewhere()
        await self._load_group_acks(self.url)
        await self._relist(asyncio.get_running_loop().time())
        self._started = True

    async def stop(self) -> None:
        """Cancel the reads in flight; idempotent. Uncommitted batches are read again later."""
        if self._closed:
            return
        self._closed = True
        tasks = [s.task for s in self._streams.values() if s.task is not None]
        for s in self._streams.values():
            s.task = None
            tasks += s.ahead.values()
            s.ahead.clear()
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks)
        if self._on_close is not None:
            self._on_close(self)

    close = stop

    async def __aenter__(self) -> Consumer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def __del__(self) -> None:
        # getattr: __init__ may have failed before setting these.
        streams: dict[str, _Stream] = getattr(self, "_streams", {})
        if not getattr(self, "_closed", True) and any(s.task or s.ahead
                                                      for s in streams.values()):
            warnings.warn(f"Consumer of {self._category!r} was not stopped", ResourceWarning,
                          stacklevel=1)

    def __aiter__(self) -> Consumer:
        return self

    async def __anext__(self) -> Batch:
        while not self._buffer:
            self._buffer = await self.read()
        return self._buffer.pop(0)

    async def _register(self, url: str, timeout: float | None = None) -> None:
        if self._group is None or not self._register_group or url in self._registered:
            return
        try:
            await self._api.register_group(url, self._category, self._group, timeout=timeout)
        except RemoteNotFoundError:
            raise ConsumerError(
                f"node {url} does not support consumer groups (a Go server?); "
                "consume without a group there"
            ) from None
        self._registered.add(url)

    async def _register_elsewhere(self) -> None:
        # Register on the other nodes too. The nodes share registrations themselves (etcd, or
        # forwarding between static peers; see chukcha.bus.groups); this only narrows the
        # window in which a node that the registering node cannot reach does not know it.
        others = [u for u in self._urls if u not in self._registered]
        timeout = min(self._api.timeout, self._config.copy_ack_timeout)
        results = await asyncio.gather(*(self._register(u, timeout) for u in others),
                                       return_exceptions=True)
        for url, result in zip(others, results, strict=True):
            if isinstance(result, ClientError | ConsumerError):
                logger.warning("category=%s group=%s not registered on %s: %s",
                               self._category, self._group, url, result)
            elif isinstance(result, BaseException):
                raise result

    async def _copy_ack(self, name: str, size: int) -> None:
        """Record our group's ack on the other nodes (best effort, short timeout).

        The node forwards the ack durably itself; this copy only makes it visible on the other
        nodes before :meth:`commit` returns."""
        if self._group is None or len(self._urls) < 2:
            return
        group = self._group
        timeout = min(self._api.timeout, self._config.copy_ack_timeout)

        async def copy(url: str) -> None:
            try:
                await self._api.copy_group_ack(url, self._category, name, size, group,
                                               timeout=timeout)
            except RequestRejectedError:
                # Not registered there (it was down when we started): register, then copy.
                await self._register(url, timeout)
                await self._api.copy_group_ack(url, self._category, name, size, group,
                                               timeout=timeout)

        others = [u for u in self._urls if u != self.url]
        results = await asyncio.gather(*(copy(u) for u in others), return_exceptions=True)
        for url, result in zip(others, results, strict=True):
            if isinstance(result, ClientError | ConsumerError):
                logger.info("category=%s group=%s ack of %s not copied to %s: %s",
                            self._category, group, name, url, result)
            elif isinstance(result, BaseException):
                raise result

    async def _load_group_acks(self, url: str) -> None:
        # Chunks our group acked before (an earlier run) are done: new streams skip them.
        if self._group is None:
            return
        described = await self._api.list_groups(url, self._category)
        for g in described.get("groups", []):
            if g.get("name") == self._group:
                self._acked.update(str(c) for c in g.get("acked", []))

    # --- reading ------------------------------------------------------------------------

    async def read(self, timeout: float | None = None) -> list[Batch]:
        """The next batches (at most one per owner); ``[]`` after ``timeout`` seconds without
        data; ``None`` waits until there is some.

        Raises:
            ConsumerError: the node refuses the requests (bad category, unknown group).
        """
        if not self._started:
            await self._call_retrying(self.start)
        loop = asyncio.get_running_loop()
        deadline = _INF if timeout is None else loop.time() + timeout
        while True:
            if self._closed:
                raise RuntimeError(f"consumer of {self._category!r} is stopped")
            await self._maybe_relist(loop.time())
            now = loop.time()
            self._start_reads(now)
            batches: list[Batch] = []
            for s in self._streams.values():
                if s.task is not None and s.task.done():
                    result = s.task.result()
                    s.task = None
                    if (b := self._handle(s, result, loop.time())) is not None:
                        batches.append(b)
            if batches:
                return batches
            now = loop.time()
            if now >= deadline:
                return []
            await self._wait_next(now, deadline)

    async def _maybe_relist(self, now: float) -> None:
        if now < min(self._list_due, self._listed_at + self._config.relist_interval):
            return
        try:
            await self._relist(now)
        except RequestRejectedError as exc:
            raise ConsumerError(f"cannot list {self._category!r}: {exc}") from exc
        except ClientError as exc:
            self._failed(exc)
            self._listed_at = now  # try again after relist_interval
            self._list_due = _INF

    async def _wait_next(self, now: float, deadline: float) -> None:
        """Wait until a read in flight answers or the next due thing (a re-list, a retry, the
        deadline)."""
        wake = min(deadline, self._listed_at + self._config.relist_interval, self._list_due)
        for s in self._streams.values():
            if s.task is None and now < s.not_before < wake:
                wake = s.not_before
        tasks = [s.task for s in self._streams.values() if s.task is not None]
        delay = max(0.0, wake - now)
        if tasks:
            await asyncio.wait(tasks, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        else:
            # Nothing in flight: the next thing to do is due at `wake` (a re-list, a retry).
            await asyncio.sleep(delay)

    async def _call_retrying(self, fn: Callable[[], Awaitable[None]]) -> None:
        while True:
            try:
                await fn()
            except RequestRejectedError as exc:
                raise ConsumerError(f"consumer of {self._category!r}: {exc}") from exc
            except ClientError as exc:
                self._failed(exc)
                await asyncio.sleep(self._config.retry_interval)
            else:
                return

    def _failed(self, exc: ClientError) -> None:
        """A request failed (node down?): log, and read from the next node if there is one."""
        self._failures += 1
        if len(self._urls) > 1:
            for s in self._streams.values():  # asked of the node we leave: ask again
                _cancel_ahead(s, "")
            self._url_index = (self._url_index + 1) % len(self._urls)
            logger.warning("category=%s %s; switching to %s", self._category, exc, self.url)
        else:
            logger.warning("category=%s %s; retrying", self._category, exc)

    async def _relist(self, now: float) -> None:
        url = self.url
        await self._register(url)
        chunks = await self._api.list_chunks(url, self._category)
        self._listed_at = now
        self._list_due = _INF
        self._chunks = {c.name: c for c in chunks}
        by_owner: dict[str, list[ChunkInfo]] = {}
        for c in chunks:
            by_owner.setdefault(c.name.rpartition("-")[0], []).append(c)
        self._by_owner = by_owner
        for owner, lst in by_owner.items():
            s = self._streams.get(owner)
            if s is None:
                todo = [c for c in lst if c.name not in self._acked]
                if todo:
                    s = _Stream(owner, todo[0].name, 0)
                else:  # all acked by our group already: wait for the next chunk
                    s = _Stream(owner, lst[-1].name, lst[-1].size, at_end=True)
                self._streams[owner] = s
                logger.debug("category=%s new stream %s at %s", self._category, owner, s.chunk)
            if (restored := self._restored.get(owner)) is not None:
                # Chunks before a restored position were committed by our predecessor; it may
                # have stopped before acking them, so they are acked at our first commit.
                for c in lst:
                    if c.name < restored and c.complete:
                        s.finished.setdefault(c.name, c.size)
            if s.task is None:
                self._advance(s)

    def _advance(self, s: _Stream) -> None:
        """Move ``s`` to the owner's next chunk when its chunk is finished or gone."""
        lst = self._by_owner.get(s.owner, [])
        info = self._chunks.get(s.chunk)
        i = bisect.bisect_right(lst, s.chunk, key=_name)  # the listing is sorted by name
        if i == len(lst):
            return
        nxt = lst[i]
        if info is not None and info.complete and s.offset >= info.size:
            s.finished[s.chunk] = info.size
        elif info is None:
            # Acked meanwhile (by another group-less consumer, by retention, or by us after a
            # restore): replication is in order, so a newer chunk here means it is not coming.
            if s.offset and s.chunk not in self._acked:
                logger.warning("category=%s chunk %s is gone at offset %d; continuing with %s",
                               self._category, s.chunk, s.offset, nxt.name)
        else:
            return
        s.chunk, s.offset, s.at_end, s.not_before = nxt.name, 0, False, 0.0

    def _start_reads(self, now: float) -> None:
        cfg = self._config
        for s in self._streams.values():
            if s.task is not None or s.not_before > now:
                continue
            info = self._chunks.get(s.chunk)
            if info is not None and info.complete and s.offset >= info.size:
                self._advance(s)  # finished: on to the next chunk, if listed already
                if s.chunk == info.name:
                    s.at_end = True
                    continue  # waiting for the next chunk to show up in a listing
                info = self._chunks.get(s.chunk)
            # Long-poll only an open chunk already read to its end: after data, a quick read
            # first, so that an empty answer soon tells the stream is caught up.
            wait = cfg.long_poll if s.at_end and not (info and info.complete) else 0.0
            size = MAX_MESSAGE_SIZE + 1 if s.big_read else cfg.max_batch_bytes
            ahead = s.ahead.pop(s.chunk, None)
            _cancel_ahead(s, s.chunk)  # reads of chunks the stream went past (gone, acked)
            if ahead is not None and (
                    s.offset or s.big_read or (ahead.done() and ahead.result().error)):
                ahead.cancel()  # not what is needed now (or it failed): read again
                ahead = None
            s.task = ahead or asyncio.create_task(
                self._fetch(self.url, s.chunk, s.offset, max(size, cfg.max_batch_bytes), wait),
                name=f"consumer-{self._category}-{s.owner}",
            )
            self._read_ahead(s)

    def _read_ahead(self, s: _Stream) -> None:
        """Start the reads of the owner's next complete chunks (up to ``read_ahead`` chunks
        and ``read_ahead_bytes``) once the read in flight is the last of the current chunk."""
        cfg = self._config
        if len(s.ahead) >= cfg.read_ahead:
            return
        info = self._chunks.get(s.chunk)
        if info is None or not info.complete or info.size - s.offset > cfg.max_batch_bytes:
            return  # not the last read of this chunk: the next chunk's read is not due yet
        held = sum(min(c.size if (c := self._chunks.get(n)) else cfg.max_batch_bytes,
                       cfg.max_batch_bytes) for n in s.ahead)
        lst = self._by_owner.get(s.owner, [])
        for c in lst[bisect.bisect_right(lst, s.chunk, key=_name):]:
            if len(s.ahead) >= cfg.read_ahead or not c.complete:
                break
            if c.name in s.ahead:
                continue
            held += min(c.size, cfg.max_batch_bytes)
            if held > cfg.read_ahead_bytes:
                break
            s.ahead[c.name] = asyncio.create_task(
                self._fetch(self.url, c.name, 0, cfg.max_batch_bytes, 0.0),
                name=f"consumer-{self._category}-{s.owner}-ahead",
            )

    async def _fetch(
        self, url: str, chunk: str, offset: int, size: int, wait: float
    ) -> _ReadResult:
        loop = asyncio.get_running_loop()
        started = loop.time()
        result = _ReadResult(started=started, wait=wait)
        try:
            result.data = await self._api.read(url, self._category, chunk, offset, size, wait=wait)
        except ClientError as exc:
            result.error = exc
        result.elapsed = loop.time() - started
        return result

    def _handle(self, s: _Stream, r: _ReadResult, now: float) -> Batch | None:
        cfg = self._config
        if r.error is not None:
            err = r.error
            if isinstance(err, RemoteNotFoundError):
                # Not replicated here yet (or acked meanwhile): a listing tells which.
                s.at_end = True  # nothing to read here for now
                s.not_before = now + cfg.poll_interval
                if self._listed_at < r.started:
                    self._list_due = now
                return None
            if isinstance(err, RequestRejectedError):
                raise ConsumerError(f"cannot read {self._category!r}: {err}") from err
            if isinstance(err, ServerError) and not s.big_read:
                # Most likely a message larger than max_batch_bytes: retry at once, reading more.
                s.big_read = True
                s.not_before = now
                return None
            self._failed(err)
            s.not_before = now + cfg.retry_interval
            return None
        s.big_read = False
        if r.data:
            start = s.offset
            s.offset += len(r.data)
            s.at_end = False
            self._batches += 1
            self._bytes_read += len(r.data)
            return Batch(self._category, s.owner, s.chunk, start, s.offset, r.data)
        s.at_end = True
        info = self._chunks.get(s.chunk)
        if info is not None and info.complete:
            self._advance(s)
            if s.at_end and self._listed_at < r.started:
                self._list_due = now
        else:
            # It may have become complete (the long poll answers at once when it does); or the
            # node does not hold requests at all: then poll it gently.
            if self._listed_at < r.started:
                self._list_due = now
            if cfg.long_poll == 0 or (r.wait > 0 and r.elapsed < r.wait / 2):
                s.not_before = now + cfg.poll_interval
        return None

    # --- committing ---------------------------------------------------------------------

    async def commit(self, positions: Mapping[str, Position]) -> None:
        """The caller has durably processed everything up to ``positions`` (owner -> position):
        ack, for this consumer's group, every complete chunk wholly before them.

        Idempotent. An ack that fails for a transient reason is retried at the next commit.

        Raises:
            ConsumerError: the node refused an ack (for example the group is not registered).
            RuntimeError: the consumer was made with ``register=False`` (it only reads).
        """
        if self._group is not None and not self._register_group:
            raise RuntimeError(f"consumer of {self._category!r} as group {self._group!r} was "
                               "made with register=False: it reads, never acks")
        for owner, pos in positions.items():
            s = self._streams.get(owner)
            todo: list[tuple[str, int]] = []
            if s is not None:
                todo += [(name, size) for name, size in s.finished.items() if name < pos.chunk]
            info = self._chunks.get(pos.chunk)
            if info is not None and info.complete and pos.offset >= info.size:
                todo.append((pos.chunk, info.size))
            for name, size in sorted(todo):
                if name in self._acked:
                    if s is not None:
                        s.finished.pop(name, None)
                    continue
                try:
                    await self._api.ack(self.url, self._category, name, size, group=self._group,
                                        fence=self.fence)
                except RequestRejectedError as exc:
                    raise ConsumerError(f"cannot ack {self._category}/{name}: {exc}") from exc
                except ClientError as exc:
                    logger.warning("category=%s ack of %s failed (retried at the next commit): "
                                   "%s", self._category, name, exc)
                    break
                self._acked.add(name)
                self._acks += 1
                await self._copy_ack(name, size)
                if s is not None:
                    s.finished.pop(name, None)
                logger.debug("category=%s group=%s acked %s", self._category, self._group, name)
        # Bound the memory of acked names: the listing drops a chunk once it is tombstoned.
        self._acked.intersection_update(self._chunks)


def _name(c: ChunkInfo) -> str:
    return c.name


def _cancel_ahead(s: _Stream, upto: str) -> None:
    """Cancel the read-ahead of chunks up to ``upto`` (all of them for ``""``)."""
    for name in [n for n in s.ahead if not upto or n <= upto]:
        s.ahead.pop(name).cancel()
