"""Timers of one partition, kept in its store and committed through its checkpoint.

Two kinds (registered on the :class:`~chukcha.processors.base.App`):

- **periodic** (``@app.timer(every=60)``): ``fn(ctx)`` runs in every partition about every
  ``every`` seconds; the next due time is stored (``r/<name>``), so a restart neither skips nor
  repeats a run that was committed.
- **per key** (``ctx.schedule(at, key)`` in a callback, ``@app.on_timer`` handles them):
  ``fn(ctx, key)`` runs once at (or soon after) the wall-clock time ``at``; stored as
  ``s/<at in ms, 16 digits>\\0<key>`` in the partition of the event that scheduled it.

A timer's run stages its state changes, emits and sink rows like an event, together with the
timer's removal (or its next due time), so all of it commits in ONE write: after a crash the
timer runs again (at least once) and its state changes apply exactly once. Emits get the IDs
``timer:<name>:<due ms>/<n>`` (``timer:@<key>:<at ms>/<n>`` for a per-key timer), the same when
the run is repeated after a crash, so the next processor drops the copies.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable
from typing import Final

import orjson

from chukcha.state.base import StateStore

__all__ = ["PERIODIC_PREFIX", "TIMER_PREFIX", "TimerState", "timer_key", "to_ms"]

TIMER_PREFIX: Final = b"s/"
PERIODIC_PREFIX: Final = b"r/"
_MAX_AT_MS: Final = 10**16 - 1


def timer_key(at_ms: int, key: str) -> bytes:
    """The store key of a per-key timer (sorted by due time)."""
    return TIMER_PREFIX + b"%016d\x00" % at_ms + key.encode()


def to_ms(at: float) -> int:
    """A due time (seconds since the epoch) in whole milliseconds.

    Raises:
        ValueError: not a finite time in range.
    """
    value: object = at
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(at):
        raise ValueError(f"a timer's time is seconds since the epoch, not {at!r}")
    ms = round(at * 1000)
    if not 0 <= ms <= _MAX_AT_MS:
        raise ValueError(f"timer time {at!r} is out of range")
    return ms


class TimerState:
    """The committed and staged timers of one partition."""

    def __init__(self) -> None:
        self._keyed: set[tuple[int, str]] = set()  # committed per-key timers
        self._heap: list[tuple[int, str]] = []  # the same, ordered (may hold fired ones)
        self._periodic: dict[str, int] = {}  # committed next due time (ms) per periodic timer
        self._add: set[tuple[int, str]] = set()
        self._fired: set[tuple[int, str]] = set()
        self._next: dict[str, int] = {}

    def load(self, store: StateStore, periodic: Iterable[tuple[str, float]], now: float) -> None:
        """Read the committed timers; a periodic timer never run yet is due ``every`` from
        ``now``."""
        n = len(TIMER_PREFIX)
        for raw, _ in store.scan(TIMER_PREFIX):
            ms, _, key = raw[n:].partition(b"\x00")
            self._keyed.add((int(ms), key.decode()))
        self._heap = sorted(self._keyed)
        n = len(PERIODIC_PREFIX)
        stored = {raw[n:].decode(): int(orjson.loads(v)) for raw, v in
                  store.scan(PERIODIC_PREFIX)}
        for name, every in periodic:
            self._periodic[name] = stored.get(name, to_ms(now + every))

    # --- staging -----------------------------------------------------------------------------

    def stage_schedules(self, items: Iterable[tuple[int, str]]) -> None:
        self._add.update(items)

    def stage_fired(self, at_ms: int, key: str) -> None:
        self._fired.add((at_ms, key))

    def stage_next(self, name: str, due_ms: int) -> None:
        self._next[name] = due_ms

    @property
    def has_staged(self) -> bool:
        return bool(self._add or self._fired or self._next)

    def prepare(self, puts: dict[bytes, bytes], deletes: list[bytes]) -> None:
        for item in self._add - self._fired:
            puts[timer_key(*item)] = b""
        for item in self._fired:
            deletes.append(timer_key(*item))
        for name, due in self._next.items():
            puts[PERIODIC_PREFIX + name.encode()] = b"%d" % due

    def committed(self) -> None:
        for item in self._add - self._fired:
            if item not in self._keyed:
                self._keyed.add(item)
                heapq.heappush(self._heap, item)
        self._keyed -= self._fired
        self._periodic.update(self._next)
        self.discard()

    def discard(self) -> None:
        self._add.clear()
        self._fired.clear()
        self._next.clear()

    # --- what is due -------------------------------------------------------------------------

    def due_keyed(self, now_ms: int) -> list[tuple[int, str]]:
        """Committed per-key timers due at ``now_ms``, oldest first, not fired in this batch."""
        heap = self._heap
        live: set[tuple[int, str]] = set()
        while heap and heap[0][0] <= now_ms:
            item = heapq.heappop(heap)
            if item in self._keyed:  # else fired and committed meanwhile: dropped here
                live.add(item)
        for item in live:
            heapq.heappush(heap, item)
        return sorted(item for item in live if item not in self._fired)

    def due_periodic(self, now_ms: int) -> list[tuple[str, int]]:
        """Periodic timers due at ``now_ms``: (name, due ms)."""
        return [(name, due) for name, due in self._periodic.items()
                if due <= now_ms and name not in self._next]

    def next_due(self) -> float | None:
        """Seconds since the epoch of the earliest committed timer, ``None`` without any."""
        heap = self._heap
        while heap and heap[0] not in self._keyed:
            heapq.heappop(heap)
        times = [heap[0][0]] if heap else []
        times += [due for name, due in self._periodic.items() if name not in self._next]
        return min(times) / 1000 if times else None

    def __len__(self) -> int:
        return len(self._keyed)
