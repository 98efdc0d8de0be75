"""The state-store seam: a byte key-value store with one atomic write per commit.

Backends: :class:`~chukcha.state.leveldb.LevelDBStore` (durable, plyvel) and
:class:`~chukcha.state.memory.MemoryStore` (tests, the in-process tester). The processor layer
keeps table values, dedup entries, read positions and the outbox in ONE store under different key
prefixes, so a single :meth:`StateStore.write` commits all of them atomically.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

__all__ = ["StateConfig", "StateStore"]


class StateStore(Protocol):
    """A byte key-value store. Every method may block (call them via ``asyncio.to_thread`` from
    the event loop, except for short point reads of warm keys)."""

    def get(self, key: bytes) -> bytes | None:
        """The value of ``key``, or ``None``."""
        ...

    def scan(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        """Every ``(key, value)`` whose key starts with ``prefix``, in key order."""
        ...

    def write(
        self, puts: Mapping[bytes, bytes], deletes: Iterable[bytes] = (), *, sync: bool = True
    ) -> None:
        """Apply ``deletes`` then ``puts`` atomically: after a crash either all or none of them
        are visible. ``sync=True`` makes the write durable before returning (fsync)."""
        ...

    def close(self) -> None:
        """Release the store (and its directory lock). Idempotent."""
        ...


@dataclass(frozen=True, slots=True)
class StateConfig:
    """How the processor state is kept.

    Attributes:
        sync_interval: fsync policy. ``0.0`` (default): every commit is fsync'ed before the
            batch is acknowledged. ``> 0``: at most one fsync per that many seconds; acks wait
            for the fsync that covers their commit. ``None``: never fsync (the OS decides; a
            process crash loses nothing, a machine crash may lose acknowledged events).
        cache_size: how many decoded table values are kept in memory (values of keys touched
            recently); a miss is one LevelDB point read.
        write_buffer_size: LevelDB's memtable size in bytes (default 16 MiB).
    """

    sync_interval: float | None = 0.0
    cache_size: int = 200_000
    write_buffer_size: int = 16 << 20

    def __post_init__(self) -> None:
        if self.sync_interval is not None and self.sync_interval < 0:
            raise ValueError("sync_interval must be >= 0 or None")
        if self.cache_size <= 0:
            raise ValueError("cache_size must be positive")
        if self.write_buffer_size <= 0:
            raise ValueError("write_buffer_size must be positive")
