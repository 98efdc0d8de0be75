"""Consumer lag: how far each registered group is behind in each category (extension).

A group's lag in a category is measured on this node against the chunks it holds:

- ``chunks``: live chunks (own and replicated) the group has not acknowledged;
- ``bytes``: their size (a group acks whole chunks, so bytes of a chunk it is half-way through
  count as not consumed: an upper bound);
- ``oldest_age``: seconds since the oldest unacknowledged message was written. It is read from
  the first message of each owner's oldest unacknowledged chunk: the time in its event ID (the
  ``id`` field the producer client adds, :func:`chukcha.client.ids.id_timestamp`) when there is
  one, else the chunk file's last write (a lower bound). ``None`` when nothing is unacknowledged.

Served as ``/groups/lag[?category=C]`` (JSON list of :meth:`GroupLag.to_json`), shown by
``chukcha groups``, exported as metrics and by the web monitor.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import orjson

from chukcha.bus import web
from chukcha.bus.chunks import ChunkStore
from chukcha.bus.group_registry import GroupRegistry
from chukcha.bus.http import Handler
from chukcha.client.ids import id_timestamp
from chukcha.protocol import ChunkInfo, validate_category

__all__ = ["GroupLag", "LagApi", "LagMeter"]

_FIRST_LINE: Final = 64 << 10
"""Bytes read to find a chunk's first message (a longer one falls back to the file time)."""


@dataclass(frozen=True, slots=True)
class GroupLag:
    """One group's lag in one category (see the module docstring)."""

    category: str
    group: str
    chunks: int
    bytes: int
    oldest_age: float | None

    def to_json(self) -> dict[str, Any]:
        return {"category": self.category, "group": self.group, "chunks": self.chunks,
                "bytes": self.bytes, "oldest_age": self.oldest_age}


class LagMeter:
    """Computes :class:`GroupLag` from the store and the group registry (read-only)."""

    def __init__(self, store: ChunkStore, registry: GroupRegistry) -> None:
        self._store = store
        self._registry = registry
        # (category, chunk) -> Unix time of its first message (never changes once found).
        self._first: dict[tuple[str, str], float] = {}

    async def lags(self, category: str | None = None, now: float | None = None) -> list[GroupLag]:
        """Every registered group's lag (in ``category`` only, when given), by category and
        group."""
        categories = [category] if category is not None else self._registry.categories()
        now = time.time() if now is None else now
        result: list[GroupLag] = []
        for cat in categories:
            groups = self._registry.groups(cat)
            if not groups:
                continue
            chunks = self._store.list_chunks(cat)
            for group, acked in sorted(groups.items()):
                unacked = [c for c in chunks if c.name not in acked]
                age = None
                if unacked:
                    oldest = await self._oldest_time(cat, unacked)
                    age = max(0.0, now - oldest) if oldest is not None else None
                result.append(GroupLag(cat, group, len(unacked), sum(c.size for c in unacked),
                                       age))
        self._forget_gone()
        return result

    async def _oldest_time(self, category: str, unacked: list[ChunkInfo]) -> float | None:
        firsts: dict[str, ChunkInfo] = {}
        for info in unacked:  # sorted by name: each owner's first is its oldest
            firsts.setdefault(info.name.rpartition("-")[0], info)
        times = []
        for info in firsts.values():
            if info.size == 0:
                continue  # an empty open chunk holds no message yet
            key = (category, info.name)
            t = self._first.get(key)
            if t is None:
                t = await asyncio.to_thread(
                    _first_message_time, self._store.data_dir / category / info.name
                )
                if t is None:
                    continue
                self._first[key] = t
            times.append(t)
        return min(times) if times else None

    def _forget_gone(self) -> None:
        for key in [k for k in self._first if self._store.chunk_size(*k) is None]:
            del self._first[key]


def _first_message_time(path: Path) -> float | None:
    """The ID time of the file's first message, else the file's last write (``None``: gone)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        head = os.pread(fd, _FIRST_LINE, 0)
        mtime = os.fstat(fd).st_mtime
    finally:
        os.close(fd)
    line, nl, _ = head.partition(b"\n")
    if nl:
        try:
            event = orjson.loads(line)
            if isinstance(event, dict) and isinstance(event.get("id"), str):
                return id_timestamp(event["id"])
        except (orjson.JSONDecodeError, ValueError):
            pass
    return mtime


class LagApi:
    """``/groups/lag[?category=C]``: the lag of every registered group (JSON)."""

    def __init__(self, meter: LagMeter) -> None:
        self._meter = meter

    def routes(self) -> dict[str, Handler]:
        return {"/groups/lag": self.lag}

    async def lag(self, request: web.Request) -> web.StreamResponse:
        category = request.query.get("category") or None
        if category is not None:
            validate_category(category)
        lags = await self._meter.lags(category)
        return web.Response(body=orjson.dumps([x.to_json() for x in lags]),
                            content_type="application/json")
