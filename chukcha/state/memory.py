"""An in-memory :class:`~chukcha.state.base.StateStore` for tests and the in-process tester."""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterable, Iterator, Mapping

__all__ = ["MemoryStore"]

logger = logging.getLogger(__name__)


class MemoryStore:
    """A dict with the :class:`StateStore` interface; writes are trivially atomic."""

    def __init__(self) -> None:
        self._data: dict[bytes, bytes] = {}
        self._closed = False
        self.writes = 0
        """Number of :meth:`write` calls (commits), for tests."""

    def get(self, key: bytes) -> bytes | None:
        self._check()
        return self._data.get(key)

    def scan(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        self._check()
        keys = sorted(self._data)
        i = bisect.bisect_left(keys, prefix)
        while i < len(keys) and keys[i].startswith(prefix):
            yield keys[i], self._data[keys[i]]
            i += 1

    def write(
        self, puts: Mapping[bytes, bytes], deletes: Iterable[bytes] = (), *, sync: bool = True
    ) -> None:
        self._check()
        for key in deletes:
            self._data.pop(key, None)
        self._data.update(puts)
        self.writes += 1

    def close(self) -> None:
        self._closed = True

    def _check(self) -> None:
        if self._closed:
            raise RuntimeError("state store is closed")
