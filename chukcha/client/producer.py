"""The batching producer: events are encoded at once and written in batches in the background.

A batch is sent when it reaches ``max_batch_bytes`` or when its first event has waited
``linger`` seconds, whichever comes first. ``send`` waits (back-pressure) while more than
``max_buffer_bytes`` are accepted but not yet written. A batch that fails on every node is not
lost silently: the error is raised by the next ``send``/``flush``/``stop`` call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import warnings
from bisect import bisect_right
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import accumulate, islice
from types import TracebackType
from typing import Final

import orjson

from chukcha.client.events import Event, IdSupply, encode_event, encode_events
from chukcha.client.ids import new_ids
from chukcha.errors import ChukchaError, MessageTooLargeError
from chukcha.protocol import DEFAULT_MAX_BATCH_SIZE, MAX_MESSAGE_SIZE, validate_category

__all__ = ["Producer", "ProducerConfig", "ProducerStats", "WriteBody"]

logger = logging.getLogger(__name__)

WriteBody = Callable[[str, bytes], Awaitable[None]]
"""``write(category, body)``: writes one body, with failover; raises when every node failed."""

_STOP_TIMEOUT: Final = 60.0
_dumps: Final = orjson.dumps


@dataclass(frozen=True, slots=True)
class ProducerConfig:
    """Producer settings.

    Attributes:
        max_batch_bytes: largest write body (default 1 MiB; at most the node's 4 MiB limit).
        linger: seconds the first event of a batch may wait for more (default 5 ms).
        max_buffer_bytes: accepted-but-unwritten bytes above which ``send`` waits (16 MiB).
        max_in_flight: concurrent write requests; 1 (the default) keeps the order of events.
    """

    max_batch_bytes: int = 1 << 20
    linger: float = 0.005
    max_buffer_bytes: int = 16 << 20
    max_in_flight: int = 1

    def __post_init__(self) -> None:
        # A single larger message still goes out alone (the node takes bodies up to 4 MiB).
        if not 0 < self.max_batch_bytes <= DEFAULT_MAX_BATCH_SIZE:
            raise ValueError(f"max_batch_bytes must be between 1 and {DEFAULT_MAX_BATCH_SIZE}")
        if self.linger < 0:
            raise ValueError("linger must not be negative")
        if self.max_buffer_bytes < self.max_batch_bytes:
            raise ValueError("max_buffer_bytes must be at least max_batch_bytes")
        if self.max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")


@dataclass(frozen=True, slots=True)
class ProducerStats:
    """Counters of one producer (for metrics)."""

    accepted_events: int
    written_bytes: int
    written_batches: int
    failed_batches: int
    pending_bytes: int


class Producer:
    """Batches events of one category; use ``async with client.producer("orders") as p:``."""

    def __init__(self, write: WriteBody, category: str, config: ProducerConfig) -> None:
        self._write = write
        self._category = validate_category(category)
        self._config = config
        self._ids = IdSupply()
        self._fresh: Iterator[str] = iter(())
        self._max_batch = config.max_batch_bytes
        self._max_buffer = config.max_buffer_bytes
        self._lines: list[bytes] = []
        self._size = 0  # bytes in _lines, newlines included
        self._pending = 0  # accepted, not yet written (buffer + in flight)
        self._first_at = 0.0
        self._flushing = 0
        self._data = asyncio.Event()  # _lines is not empty
        self._full = asyncio.Event()  # a batch is ready now (full, or a flush wants it)
        self._space = asyncio.Event()  # _pending is under max_buffer_bytes
        self._space.set()
        self._idle = asyncio.Event()  # _pending == 0
        self._idle.set()
        self._error: BaseException | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._accepted = 0
        self._written_bytes = 0
        self._written_batches = 0
        self._failed_batches = 0

    @property
    def stats(self) -> ProducerStats:
        return ProducerStats(self._accepted, self._written_bytes, self._written_batches,
                             self._failed_batches, self._pending)

    @property
    def category(self) -> str:
        return self._category

    @property
    def pending_bytes(self) -> int:
        """Bytes accepted but not yet written."""
        return self._pending

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        if self._tasks or self._closed:
            return
        self._tasks = [
            asyncio.create_task(self._send_loop(), name=f"producer-{self._category}-{i}")
            for i in range(self._config.max_in_flight)
        ]

    async def stop(self, timeout: float = _STOP_TIMEOUT) -> None:
        """Flush what is buffered (bounded by ``timeout``), then stop; idempotent.

        Raises:
            ChukchaError: a batch failed on every node (the first such error).
        """
        if self._closed:
            return
        self._closed = True
        try:
            if self._tasks:
                async with asyncio.timeout(timeout):
                    await self._wait_idle()
        finally:
            for task in self._tasks:
                task.cancel()
            if self._tasks:
                await asyncio.wait(self._tasks)
            self._tasks = []
        self._raise_error()

    close = stop

    async def __aenter__(self) -> Producer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            await self.stop()
            return
        # Already failing: stop, but do not hide the original error behind a flush error.
        with contextlib.suppress(ChukchaError, TimeoutError):
            await self.stop()

    def __del__(self) -> None:
        if getattr(self, "_tasks", None) and not self._closed:
            warnings.warn(f"Producer for {self._category!r} was not stopped", ResourceWarning,
                          stacklevel=1)

    # --- sending ------------------------------------------------------------------------

    def _raise_error(self) -> None:
        if (err := self._error) is not None:
            self._error = None
            raise err

    async def send(self, event: Event) -> str:
        """Accept one event; returns its ID (``""`` for a bytes line without one).

        Waits while the buffer is full. The event is written later (see :meth:`flush`).
        """
        if self._error is not None or self._closed or not self._tasks:
            await self._check_open()
        if type(event) is dict and event.get("id") is None:
            # The common case inlined (the per-event path is the producer's hot path).
            ident = next(self._fresh, None) or self._refill()
            line = _dumps({"id": ident, **event})
            if len(line) > MAX_MESSAGE_SIZE:
                raise MessageTooLargeError(MAX_MESSAGE_SIZE)
        else:
            line, ident = encode_event(event, self._ids)
        if self._pending >= self._max_buffer:
            await self._wait_space()
        size = len(line) + 1
        if not self._lines:
            self._first_at = asyncio.get_running_loop().time()
            self._data.set()
        self._lines.append(line)
        self._accepted += 1
        self._size += size
        self._pending += size
        if self._size >= self._max_batch:
            self._full.set()
            # A batch is ready: let the sender start writing it now, so that the network and
            # the node work while the caller produces the next one.
            await asyncio.sleep(0)
        return ident

    def _refill(self) -> str:
        self._fresh = iter(new_ids(512))
        return next(self._fresh)

    async def send_many(self, events: Iterable[Event]) -> list[str]:
        """Accept many events (encoded all at once; refused all at once); returns their IDs."""
        await self._check_open()
        lines, ids = encode_events(events)
        if not lines:
            return ids
        size = sum(map(len, lines)) + len(lines)
        if self._pending >= self._config.max_buffer_bytes:
            await self._wait_space()
        self._append(lines, size)
        self._accepted += len(lines)
        if self._size >= self._config.max_batch_bytes:
            await asyncio.sleep(0)  # as in send(): let the sender start on the full batch
        return ids

    async def flush(self) -> None:
        """Wait until everything accepted so far is written.

        Raises:
            ChukchaError: a batch failed on every node since the last flush.
        """
        self._flushing += 1
        self._full.set()
        try:
            await self._wait_idle()
        finally:
            self._flushing -= 1
        self._raise_error()

    async def _check_open(self) -> None:
        self._raise_error()
        if self._closed:
            raise RuntimeError(f"producer for {self._category!r} is stopped")
        if not self._tasks:
            await self.start()  # used without `async with`: the client's close() stops it

    async def _wait_space(self) -> None:
        while self._pending >= self._config.max_buffer_bytes:
            self._space.clear()
            await self._space.wait()
            self._raise_error()

    async def _wait_idle(self) -> None:
        while self._pending:
            self._idle.clear()
            await self._idle.wait()

    def _append(self, lines: list[bytes], size: int) -> None:
        if not self._lines:
            self._first_at = asyncio.get_running_loop().time()
            self._data.set()
        self._lines += lines
        self._size += size
        self._pending += size
        if self._size >= self._config.max_batch_bytes:
            self._full.set()

    def _take(self) -> bytes:
        limit = self._config.max_batch_bytes
        lines = self._lines
        if self._size <= limit:
            batch, self._lines, self._size = lines, [], 0
        else:
            # ends[j]: bytes of lines[:j + 1] with their newlines (computed at C speed) over a
            # prefix a bit longer than what the limit can hold at the average line size.
            k = min(len(lines), int(limit * len(lines) * 1.5 / self._size) + 2)
            ends = list(accumulate(map(len, islice(lines, k))))
            if ends[-1] + k <= limit:
                ends = list(accumulate(map(len, lines)))
            i = bisect_right(range(len(ends)), limit, key=lambda j: ends[j] + j + 1)
            i = max(i, 1)  # one message over the limit goes alone
            batch, self._lines = lines[:i], lines[i:]
            self._size -= ends[i - 1] + i
        if self._lines:
            self._first_at = asyncio.get_running_loop().time()
        else:
            self._data.clear()
        return b"\n".join(batch) + b"\n"

    async def _send_loop(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self._config
        while True:
            while not self._lines:
                await self._data.wait()
            self._full.clear()
            delay = self._first_at + cfg.linger - loop.time()
            if self._size < cfg.max_batch_bytes and not self._flushing and delay > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._full.wait()
                if not self._lines:  # another sender took it
                    continue
            body = self._take()
            try:
                await self._write(self._category, body)
                self._written_bytes += len(body)
                self._written_batches += 1
            except ChukchaError as exc:
                self._failed_batches += 1
                logger.error("category=%s a batch of %d bytes was not written: %s",  # noqa: TRY400
                             self._category, len(body), exc)
                if self._error is None:
                    self._error = exc
            finally:
                self._pending -= len(body)
                if self._pending < cfg.max_buffer_bytes:
                    self._space.set()
                if self._pending == 0:
                    self._idle.set()
