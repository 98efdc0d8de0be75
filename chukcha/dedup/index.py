"""The event-ID index: "has this group applied this event already?".

Entries live in the processor's state store under ``d/<key>`` (value: sequence number and time),
so they are committed in the SAME write batch as the state changes they guard. The whole index
is mirrored in memory (an insertion-ordered dict, oldest first), so :meth:`DedupIndex.seen` never
touches the disk, and pruning by age and count pops from the front (never the IDs being
committed).

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
_WARN_INTERVAL: Final = 60.0  # seconds between warnings about young IDs pruned by count


class _Scannable(Protocol):
    def scan(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]: ...


@dataclass(frozen=True, slots=True)
class DedupPlan:
    """What one commit does to the index: IDs added and how many of the oldest are pruned
    (``by_count`` of them because of ``max_count``, ``young`` of those younger than
    ``min_age``; ``youngest`` is the commit time of the youngest one pruned)."""

    added: tuple[str, ...]
    pruned: int
    now: float
    by_count: int = 0
    young: int = 0
    youngest: float = 0.0


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
        self.pruned_by_age = 0
        self.pruned_by_count = 0
        self.pruned_young = 0
        """IDs younger than ``min_age`` pruned by the count limit (since the start)."""
        self._unwarned_young = 0
        self._warned_at = float("-inf")

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

    def mirror(self, puts: Mapping[bytes, bytes], deletes: Iterable[bytes]) -> None:
        """Apply another writer's write to the store (a standby following the changelog) to
        the mirror, so that it stays what :meth:`load` would find (IDs in ``seq`` order)."""
        ids = self._ids
        n = len(PREFIX)
        for key in deletes:
            if key[:n] == PREFIX:
                ids.pop(key[n:].decode(), None)
        added = sorted((*_VALUE.unpack(value), key[n:].decode())
                       for key, value in puts.items() if key[:n] == PREFIX)
        for seq, ts, key in added:
            ids.pop(key, None)
            ids[key] = ts
            self._seq = max(self._seq, seq + 1)

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
        # Prune the oldest committed IDs: first those past the age, then as many as the count
        # limit (counting the staged ones) asks for. The staged IDs are always written: the
        # events they guard are applied in this very commit.
        over = len(self._ids) + len(self._pending) - cfg.max_count
        cutoff = now - cfg.max_age
        young_after = now - min(cfg.min_age, cfg.max_age)
        pruned = by_count = young = 0
        youngest = 0.0
        for key, ts in self._ids.items():
            if ts >= cutoff:
                if pruned >= over:
                    break
                by_count += 1
                if ts > young_after:
                    young += 1
                youngest = ts
            deletes.append(PREFIX + key.encode())
            pruned += 1
        added = tuple(self._pending)
        seq = self._seq
        for key in added:
            puts[PREFIX + key.encode()] = _VALUE.pack(seq, now)
            seq += 1
        return DedupPlan(added, pruned, now, by_count, young, youngest)

    def committed(self, plan: DedupPlan) -> None:
        """The write batch holding ``plan`` is committed: update the mirror."""
        ids = self._ids
        for _ in range(plan.pruned):
            ids.popitem(last=False)
        for key in plan.added:
            ids[key] = plan.now
        self._seq += len(plan.added)
        self._pending.clear()
        self.pruned_by_age += plan.pruned - plan.by_count
        self.pruned_by_count += plan.by_count
        if plan.young:
            self.pruned_young += plan.young
            self._unwarned_young += plan.young
            if plan.now - self._warned_at >= _WARN_INTERVAL:
                self._warned_at = plan.now
                logger.warning(
                    "dedup max_count=%d pruned %d IDs younger than min_age=%.0fs (the youngest "
                    "%.0fs old; %d since the start): a duplicate arriving later than that is "
                    "applied again; raise max_count to peak events/s x the lateness window",
                    self.config.max_count, self._unwarned_young,
                    min(self.config.min_age, self.config.max_age), plan.now - plan.youngest,
                    self.pruned_young,
                )
                self._unwarned_young = 0

    def discard(self) -> None:
        """Forget the staged IDs (their batch was not committed)."""
        self._pending.clear()

    def committed_ids(self) -> Iterable[str]:
        """The committed IDs, oldest first (for tests and inspection)."""
        return self._ids.keys()
