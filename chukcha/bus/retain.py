"""Keep acknowledged chunks for a while so they can be replayed (``--retain-acked``).

Without it (the default) a chunk is tombstoned the moment the last consumer acknowledges it:
the Go behaviour. With ``--retain-acked 24h`` (or per category, ``--retain-acked orders=24h``)
a fully acknowledged chunk stays where it is, listed and readable, for that long after its
acknowledgement, and the retention pass tombstones it afterwards. A consumer group that acked it
skips it (its acks are kept); a new group, or an app whose positions were reset, reads it again:
a replay. A consumer without a group (the Go client) reads it again after a restart.

Every node of a cluster should be given the same setting: a node that tombstones a chunk
replicates the tombstone to the others, whatever they retain.

The acknowledged-at times are kept in ``<data_dir>/.retained.json`` (atomic write, fsync), so a
restart neither loses a retained chunk nor keeps it longer than asked.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Final

import orjson

from chukcha.bus.chunks import ChunkStore
from chukcha.bus.files import read_file, write_atomic
from chukcha.errors import ChukchaError
from chukcha.protocol import validate_category

__all__ = ["RETAINED_FILE", "AckedRetention"]

logger = logging.getLogger(__name__)

RETAINED_FILE: Final = ".retained.json"


class AckedRetention:
    """Decides what a full acknowledgement does: tombstone now, or keep the chunk a while.

    Args:
        store: the node's chunk store.
        default: seconds to keep an acknowledged chunk (``None``: tombstone at once).
        per_category: overrides of ``default`` per category (``None``: tombstone at once).
    """

    def __init__(
        self,
        store: ChunkStore,
        default: float | None = None,
        per_category: Mapping[str, float | None] | None = None,
    ) -> None:
        for period in [default, *(per_category or {}).values()]:
            if period is not None and period <= 0:
                raise ValueError("a retain-acked period must be positive")
        self._store = store
        self._default = default
        self._per_category = {validate_category(c): p for c, p in (per_category or {}).items()}
        self._path = store.data_dir / RETAINED_FILE
        self._since: dict[str, dict[str, float]] = {}  # category -> chunk -> acked at (Unix)

    def period(self, category: str) -> float | None:
        """Seconds ``category`` keeps acknowledged chunks (``None``: none)."""
        return self._per_category.get(category, self._default)

    def retained(self, category: str) -> dict[str, float]:
        """Acknowledged chunks of ``category`` kept here, with the time they were acked."""
        return dict(self._since.get(category, {}))

    def counts(self) -> dict[str, int]:
        """Acknowledged chunks kept here, per category."""
        return {c: len(chunks) for c, chunks in self._since.items() if chunks}

    async def load(self) -> None:
        raw = await asyncio.to_thread(read_file, self._path)
        if raw is None:
            return
        try:
            data = orjson.loads(raw)
            self._since = {validate_category(c): {str(k): float(v) for k, v in chunks.items()}
                           for c, chunks in data.items()}
        except (orjson.JSONDecodeError, ValueError, AttributeError, TypeError) as exc:
            raise ValueError(f"{self._path} is damaged: {exc}") from exc

    async def _save(self) -> None:
        data = orjson.dumps({c: chunks for c, chunks in sorted(self._since.items()) if chunks})
        await asyncio.to_thread(write_atomic, self._path, data)

    async def acked(self, category: str, chunk: str, size: int | None, *,
                    replica: bool = False) -> bool:
        """Every consumer is done with ``chunk``: tombstone it (returns ``True``) or keep it
        (``False``). ``size`` is what the consumer read (``None``: checked already);
        ``replica`` tombstones even a chunk not here yet (the etcd path)."""
        if self.period(category) is None:
            if replica:
                await self._store.tombstone_replica(category, chunk)
            else:
                await self._store.ack(category, chunk, size)
            return True
        chunks = self._since.setdefault(category, {})
        if chunk not in chunks and not self._store.is_tombstoned(category, chunk):
            chunks[chunk] = time.time()
            try:
                await self._save()
            except OSError:
                del chunks[chunk]
                raise
            logger.debug("category=%s %s acknowledged: kept for replay", category, chunk)
        return False

    async def expire(self, now: float | None = None) -> list[str]:
        """Tombstone the kept chunks whose time is up (and forget those gone another way);
        returns the ``category/chunk`` names tombstoned."""
        now = time.time() if now is None else now
        done: list[str] = []
        changed = False
        for category, chunks in list(self._since.items()):
            period = self.period(category)
            for chunk, since in list(chunks.items()):
                if not self._store.is_tombstoned(category, chunk):
                    if period is not None and now - since < period:
                        continue
                    try:
                        if self._store.chunk_size(category, chunk) is None:
                            await self._store.tombstone_replica(category, chunk)
                        else:
                            await self._store.ack(category, chunk, None)
                    except ChukchaError as exc:
                        logger.warning("category=%s cannot tombstone retained %s: %s",
                                       category, chunk, exc)
                        continue
                    done.append(f"{category}/{chunk}")
                del chunks[chunk]
                changed = True
        if changed:
            await self._save()
        if done:
            logger.info("instance=%s acknowledged chunks kept for replay expired: %s",
                        self._store.instance, ", ".join(done))
        return done

