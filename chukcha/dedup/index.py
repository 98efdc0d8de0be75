"""The event-ID index: "has this group applied this event already?".

Entries live in the processor's state store under ``d/<key>`` (value: sequence number and time),
so they are committed in the SAME write batch as the state changes they guard. The whole index
is mirrored in memory (an insertion-ordered dict, oldest first), so :meth:`DedupIndex.seen` never
touches the disk, and pruning by age and count pops from the front.

Protocol per commit: :meth:`seen` / :meth:`add` while processing a batch, :meth:`stage` to put
the new entries and the pruned keys into the write batch, then :meth:`committed` after the write
succeeded (or :meth:`discard` when it did not).
"""

from __future__ import annotations

import logging
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Final, Protocol

from chukcha.dedup.base import DedupConfig

__all__ = ["PREFIX", "DedupIndex", "DedupPlan"]

logger = logging.getLogger(__name__)

PREFIX: Final = b"d/"
_VALUE: Final = struct.Struct(">Qd")  # sequence number, unix time of the commit


class _Scannable(Protocol):
    def scan(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]: ...


@dataclass(frozen=True, slots=True)
class DedupPlan:
    """What one commit does to the index: IDs added and how many of the oldest are pruned."""

    added: tuple[str, ...]
    pruned: int
    now: float


class DedupIndex:
    """The in-memory mirror of the ``d/`` keys plus the IDs staged by the current batch."""

    def __init__(
        self, config: DedupConfig | None = None, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.config = config or DedupConfig()
        self._clock = clock
        self._ids: OrderedDict[str, float] = OrderedDict()  # committed: id -> time, oldest first
        self._pending: dict[str, None] = {}
        self._seq = 0

    def load(self, store: _Scannable) -> None:
        """Rebuild the mirror from the store (blocking: call it from a worker thread)."""
        entries: list[tuple[int, float, str]] = []
        n = len(PREFIX)
        for key, value in store.scan(PREFIX):
            seq, ts = _VALUE.unpack(value)
            entries.append((seq, ts, key[n:].decode()))
        entries.sort()
        self._ids = OrderedDict((key, ts) for _, ts, key in entries)
        self._pending.clear()
        self._seq = entries[-1][0] + 1 if entries else 0
        logger.info("dedup index loaded ids=%d", len(self._ids))

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, key: object) -> bool:
        return key in self._ids or key in self._pending

    def seen(self, key: str) -> bool:
        """True when ``key`` is committed or staged by the current batch."""
        return key in self._ids or key in self._pending

    def views(self) -> tuple[Mapping[str, float], dict[str, None]]:
        """The committed IDs and the staged ones, for a caller's inlined :meth:`seen` in a hot
        loop (``key in committed or key in staged``; stage with ``staged[key] = None``)."""
        return self._ids, self._pending

    def add(self, key: str) -> None:
        """Stage ``key`` (the caller checked :meth:`seen` first)."""
        self._pending[key] = None

    def stage(self, puts: dict[bytes, bytes], deletes: list[bytes]) -> DedupPlan:
        """Put the staged IDs and the pruned keys into the commit's write batch."""
        now = self._clock()
        cfg = self.config
        # Prune the oldest: past the count limit (counting the staged ones) or past the age.
        over = max(0, len(self._ids) + len(self._pending) - cfg.max_count)
        cutoff = now - cfg.max_age
        pruned = 0
        for key, ts in self._ids.items():
            if pruned < over or ts < cutoff:
                deletes.append(PREFIX + key.encode())
                pruned += 1
            else:
                break
        # More staged than the limit allows: the oldest staged ones are not even written.
        added = tuple(self._pending)[max(0, over - len(self._ids)):]
        seq = self._seq
        for key in added:
            puts[PREFIX + key.encode()] = _VALUE.pack(seq, now)
            seq += 1
        return DedupPlan(added, pruned, now)

    def committed(self, plan: DedupPlan) -> None:
        """The write batch holding ``plan`` is committed: update the mirror."""
        ids = self._ids
        for _ in range(plan.pruned):
            ids.popitem(last=False)
        for key in plan.added:
            ids[key] = plan.now
        self._seq += len(plan.added)
        self._pending.clear()

    def discard(self) -> None:
        """Forget the staged IDs (their batch was not committed)."""
        self._pending.clear()

    def committed_ids(self) -> Iterable[str]:
        """The committed IDs, oldest first (for tests and inspection)."""
        return self._ids.keys()
