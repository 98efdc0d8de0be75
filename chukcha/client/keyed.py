"""Writing by key into a partitioned category (see :mod:`chukcha.partitioning`).

:func:`route` splits encoded events by the partition of their key; :class:`KeyedProducer` is a
producer per partition behind one ``send``. The partition count comes from the nodes
(``/partitions``) once, when the client first writes to the category by key.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from types import TracebackType
from typing import Any

import orjson

from chukcha.client.events import Event
from chukcha.client.producer import Producer
from chukcha.partitioning import partition_category, partition_of

__all__ = ["KeyFn", "KeyedProducer", "key_of", "route"]

logger = logging.getLogger(__name__)

KeyFn = Callable[[Any], "str | int"]
"""``key(event) -> str | int``: called with the event as a dict (bytes are decoded first)."""


def key_of(key: KeyFn, event: Event, line: bytes | None = None) -> str | int:
    """The key of ``event`` (a dict as it is; bytes decoded from ``line`` or the event).

    Raises:
        ValueError: bytes that are not JSON.
        TypeError: the key function returned something other than a string or an integer.
    """
    if type(event) is not dict:
        raw = line if line is not None else event
        try:
            event = orjson.loads(raw)  # type: ignore[arg-type]
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"an event to route by key must be JSON: {exc}") from None
    value = key(event)
    if type(value) is not str and type(value) is not int:
        raise TypeError(f"the key function returned {type(value).__name__}; a key is a string "
                        "or an integer")
    return value


def route(events: list[Event], lines: list[bytes], key: KeyFn,
          partitions: int) -> dict[int, list[bytes]]:
    """Encoded ``lines`` of ``events`` grouped by the partition of their key, in order. Every
    key is computed before anything is written: a failing key function sends nothing."""
    parts: dict[int, list[bytes]] = {}
    for event, line in zip(events, lines, strict=True):
        p = partition_of(key_of(key, event, line), partitions)
        parts.setdefault(p, []).append(line)
    return parts


class KeyedProducer:
    """One producer per partition of ``category``; :meth:`send` picks it by the event's key.

    Args:
        category: the partitioned category.
        key: the key function.
        count: returns the category's partition count (asked once, at :meth:`start`).
        make: makes the producer of one partition category.
    """

    def __init__(self, category: str, key: KeyFn, count: Callable[[], Awaitable[int]],
                 make: Callable[[str], Producer]) -> None:
        self.category = category
        self._key = key
        self._count = count
        self._make = make
        self._partitions = 0
        self._producers: dict[int, Producer] = {}

    @property
    def partitions(self) -> int:
        return self._partitions

    async def start(self) -> None:
        """Learn the partition count.

        Raises:
            ValueError: the category is not partitioned.
        """
        if self._partitions:
            return
        n = await self._count()
        if n == 0:
            raise ValueError(f"category {self.category!r} is not partitioned: create its "
                             "partitions first (Client.create_partitions, chukcha partitions)")
        self._partitions = n

    async def _producer(self, p: int) -> Producer:
        producer = self._producers.get(p)
        if producer is None:
            producer = self._producers[p] = self._make(partition_category(self.category, p))
            await producer.start()
        return producer

    async def send(self, event: Event) -> str:
        """Accept one event for the partition of its key; returns its ID."""
        await self.start()
        p = partition_of(key_of(self._key, event), self._partitions)
        return await (await self._producer(p)).send(event)

    async def send_many(self, events: Iterable[Event]) -> list[str]:
        """Accept many events (every key computed first); returns their IDs in order."""
        await self.start()
        seq = list(events)
        parts: dict[int, list[int]] = {}
        for i, event in enumerate(seq):
            parts.setdefault(partition_of(key_of(self._key, event), self._partitions),
                             []).append(i)
        ids = [""] * len(seq)
        for p, idx in parts.items():
            got = await (await self._producer(p)).send_many([seq[i] for i in idx])
            for i, ident in zip(idx, got, strict=True):
                ids[i] = ident
        return ids

    async def flush(self) -> None:
        for producer in list(self._producers.values()):
            await producer.flush()

    async def stop(self) -> None:
        """Flush and stop every partition's producer (the first error is raised)."""
        error: BaseException | None = None
        for producer in list(self._producers.values()):
            try:
                await producer.stop()
            except Exception as exc:  # noqa: BLE001 - stop the others, raise the first
                error = error or exc
        if error is not None:
            raise error

    close = stop

    async def __aenter__(self) -> KeyedProducer:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()
