"""The durable :class:`~chukcha.state.base.StateStore`: LevelDB through plyvel.

One :meth:`LevelDBStore.write` is one LevelDB ``WriteBatch``: atomic across a crash at any
instant. LevelDB holds a ``LOCK`` file while open, so a second process on the same directory is
refused; we turn plyvel's ``IOError`` into :class:`~chukcha.errors.StateLockedError`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import plyvel

from chukcha.errors import StateLockedError

__all__ = ["LevelDBStore"]

logger = logging.getLogger(__name__)


class LevelDBStore:
    """A LevelDB database in ``path`` (created when missing). Blocking: open it, write to it and
    scan it from a worker thread (``asyncio.to_thread``)."""

    def __init__(self, path: Path, *, write_buffer_size: int = 16 << 20) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            self._db: Any = plyvel.DB(
                str(self.path), create_if_missing=True, write_buffer_size=write_buffer_size
            )
        except plyvel.IOError as exc:
            if "lock" in str(exc).lower():
                raise StateLockedError(
                    f"state directory {self.path} is in use by another process "
                    f"(LevelDB LOCK is held): {exc}"
                ) from exc
            raise
        self._closed = False
        logger.info("state opened path=%s", self.path)

    def get(self, key: bytes) -> bytes | None:
        value: bytes | None = self._db.get(key)
        return value

    def scan(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        with self._db.iterator(prefix=prefix) as it:
            yield from it

    def write(
        self, puts: Mapping[bytes, bytes], deletes: Iterable[bytes] = (), *, sync: bool = True
    ) -> None:
        # transaction=False: the batch is applied with one Write() call, which is what makes it
        # atomic; deletes go first so that a key deleted and re-put in one commit ends up put.
        batch = self._db.write_batch(sync=sync)
        for key in deletes:
            batch.delete(key)
        for key, value in puts.items():
            batch.put(key, value)
        batch.write()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._db.close()
            logger.info("state closed path=%s", self.path)

    @property
    def closed(self) -> bool:
        return self._closed
