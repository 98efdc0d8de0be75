"""Unique, time-ordered event IDs.

An ID is 28 lowercase hex digits: 12 for the Unix time in milliseconds, 6 for a sequence number
within that millisecond, 10 random ones chosen once per process (and again after a ``fork``).
IDs from one generator sort in the order they were made; IDs from different processes sort by
millisecond. The random part makes a collision between processes as likely as two processes
drawing the same 40 random bits.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from typing import Final

__all__ = ["ID_LENGTH", "IdGenerator", "id_timestamp", "new_id", "new_ids"]

ID_LENGTH: Final = 28
_SEQ_LIMIT: Final = 1 << 24


class IdGenerator:
    """Makes IDs; thread-safe; ``ids(n)`` makes many at C-ish speed (one format per ID)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._suffix = secrets.token_hex(5)
        self._ms = 0
        self._seq = 0

    def reseed(self) -> None:
        """Choose a new random part (after ``fork``, so parent and child never collide)."""
        with self._lock:
            self._suffix = secrets.token_hex(5)

    def _reserve(self, n: int) -> tuple[int, int]:
        # Reserve n consecutive (ms, seq) slots; when a millisecond's sequence space runs out,
        # borrow the next millisecond so the order still holds.
        now = time.time_ns() // 1_000_000
        with self._lock:
            if now > self._ms:
                self._ms, self._seq = now, 0
            if self._seq + n > _SEQ_LIMIT:
                self._ms += 1
                self._seq = 0
            ms, seq = self._ms, self._seq
            self._seq += n
        return ms, seq

    def next(self) -> str:
        ms, seq = self._reserve(1)
        return f"{ms:012x}{seq:06x}{self._suffix}"

    def ids(self, n: int) -> list[str]:
        """``n`` consecutive IDs (``n`` at most 16 M)."""
        if n <= 0:
            return []
        if n > _SEQ_LIMIT:
            out: list[str] = []
            while len(out) < n:
                out += self.ids(min(_SEQ_LIMIT, n - len(out)))
            return out
        ms, seq = self._reserve(n)
        prefix = f"{ms:012x}"
        suffix = self._suffix
        return [f"{prefix}{s:06x}{suffix}" for s in range(seq, seq + n)]


_default = IdGenerator()
os.register_at_fork(after_in_child=_default.reseed)


def new_id() -> str:
    """One new ID from the process-wide generator."""
    return _default.next()


def new_ids(n: int) -> list[str]:
    """``n`` new consecutive IDs from the process-wide generator."""
    return _default.ids(n)


def id_timestamp(event_id: str) -> float:
    """The Unix time (seconds) an ID was made at.

    Raises:
        ValueError: not an ID made here.
    """
    if len(event_id) != ID_LENGTH:
        raise ValueError(f"not a chukcha event ID: {event_id!r}")
    return int(event_id[:12], 16) / 1000.0
