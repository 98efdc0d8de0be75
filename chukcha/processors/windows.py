"""Tumbling and hopping windows on event time, kept in the partition's table (exactly once).

``per_minute = app.window("per_minute", size=60, grace=10, emit_to="page_counts")`` defines a
window; a callback adds an event to it with
``per_minute.update(ctx, key, ts, lambda total: total + 1, initial=0)``, where ``ts`` is the
event's time (seconds since the epoch, from the event: a field, not when it was read). A
hopping window (``hop=10``) adds the event to every window that contains ``ts``.

**When a window closes.** Each owner stream's event time is the largest ``ts`` seen in it; the
watermark is the smallest of those over the streams of the category (every stream must have
delivered an event to this partition first). A window ``[start, start + size)`` closes once the
watermark reaches ``start + size + grace``: ``on_close(ctx, result)`` runs (and with
``emit_to`` the result is emitted as ``{"id", "key", "start", "end", "value"}``), and its
values are deleted. An event whose every window has closed is late: it is dropped and counted
(``late(ctx)``). So streams that are out of order with each other (one node far behind
another) still give exact windows; within one stream, events may be out of order by up to
``grace`` seconds. A stream that stops getting events holds the windows open.

All of it lives in the table (keys starting with ``~w``) and changes through ``ctx.set``, so it
commits with the event that changed it: applied exactly once, rolled back with a failed event.
A closed window's result has the ID ``window:<name>:<start ms>:<key>`` (``ctx.event_id`` in
``on_close``), whichever event closed it, so the next processor drops a resend.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from chukcha.processors.timers import to_ms
from chukcha.protocol import validate_category

if TYPE_CHECKING:
    from chukcha.processors.context import Context

__all__ = ["Window", "WindowResult"]


@dataclass(frozen=True, slots=True)
class WindowResult:
    """A closed window of one key: ``start``/``end`` in seconds since the epoch."""

    id: str
    key: str
    start: float
    end: float
    value: Any


OnClose = Callable[["Context", WindowResult], None]


class Window:
    """A tumbling (``hop`` = ``size``) or hopping window; see the module docstring."""

    def __init__(self, name: str, *, size: float, hop: float | None = None, grace: float = 0.0,
                 emit_to: str | None = None) -> None:
        if not name or "/" in name:
            raise ValueError(f"invalid window name {name!r}")
        given: tuple[tuple[str, object], ...] = (("size", size), ("hop", hop), ("grace", grace))
        for what, value in given:
            if value is None and what == "hop":
                continue
            if (not isinstance(value, int | float) or isinstance(value, bool)
                    or not math.isfinite(value) or value < 0 or (value == 0 and what != "grace")):
                raise ValueError(f"window {what} must be a positive number of seconds")
        self.name = name
        self._size = to_ms(size)
        self._hop = to_ms(hop) if hop is not None else self._size
        if self._hop > self._size:
            raise ValueError("hop must not be longer than size (events would fall in no window)")
        self._grace = to_ms(grace)
        self.emit_to = validate_category(emit_to) if emit_to is not None else None
        self._on_close: OnClose | None = None
        self._p = f"~w/{name}/"

    def on_close(self, fn: OnClose) -> OnClose:
        """Register ``fn(ctx, result)``, run for each key of a window when it closes."""
        self._on_close = fn
        return fn

    def windows_of(self, ts_ms: int) -> list[int]:
        """The start times (ms) of the windows that contain ``ts_ms``."""
        last = ts_ms - ts_ms % self._hop
        starts = []
        start = last
        while start > ts_ms - self._size and start >= 0:
            starts.append(start)
            start -= self._hop
        return starts[::-1]

    def update(self, ctx: Context, key: str, ts: float, fn: Callable[[Any], Any],
               initial: Any = None) -> int:
        """Set, in every open window containing ``ts``, ``key``'s value to ``fn(value)``
        (``initial`` when the window has none yet); then close the windows the watermark
        passed. Returns in how many windows the event landed (0: it was late).
        """
        if type(key) is not str:
            raise TypeError(f"window keys are strings, not {type(key).__name__}")
        ts_ms = to_ms(ts)
        p = self._p
        mark = self._watermark(ctx)
        landed = 0
        for start in self.windows_of(ts_ms):
            if mark is not None and start + self._size + self._grace <= mark:
                continue  # closed already
            vkey = f"{p}v/{start:016d}/{key}"
            old = ctx.get(vkey, None)
            if old is None:
                self._track(ctx, start, key)
            ctx.set(vkey, fn(initial if old is None else old))
            landed += 1
        if not landed:
            ctx.set(f"{p}late", ctx.get(f"{p}late", 0) + 1)
        skey = f"{p}s/{ctx.category}/{ctx.owner}"
        if ts_ms > ctx.get(skey, -1):
            ctx.set(skey, ts_ms)
            self._close_due(ctx)
        return landed

    def late(self, ctx: Context) -> int:
        """How many events came after all their windows had closed (and were dropped)."""
        return int(ctx.get(f"{self._p}late", 0))

    def _track(self, ctx: Context, start: int, key: str) -> None:
        """Record that window ``start`` holds ``key``: as its ``n``-th key, one table entry
        each (a list of the keys, read and rewritten for every new key, made a window of K
        keys cost O(K^2))."""
        p = self._p
        starts: list[int] = ctx.get(f"{p}open", [])
        if start not in starts:
            starts.append(start)
            starts.sort()
            ctx.set(f"{p}open", starts)
        count_key = f"{p}n/{start:016d}"
        n = ctx.get(count_key, 0)
        ctx.set(f"{p}k/{start:016d}/{n}", key)
        ctx.set(count_key, n + 1)

    def _pop_keys(self, ctx: Context, start: int) -> list[str]:
        """The keys of window ``start`` (in the order they came), their entries deleted."""
        p = self._p
        count_key = f"{p}n/{start:016d}"
        # a window opened by an earlier release keeps its keys as one list
        keys: list[str] = ctx.get(f"{p}k/{start:016d}", [])
        if keys:
            ctx.delete(f"{p}k/{start:016d}")
        for i in range(ctx.get(count_key, 0)):
            entry = f"{p}k/{start:016d}/{i}"
            keys.append(ctx.get(entry))
            ctx.delete(entry)
        ctx.delete(count_key)
        return keys

    def _watermark(self, ctx: Context) -> int | None:
        marks = []
        for owner in ctx.streams:
            mark = ctx.get(f"{self._p}s/{ctx.category}/{owner}", None)
            if mark is None:
                return None  # a stream that has not shown its time yet
            marks.append(int(mark))
        return min(marks) if marks else None

    def _close_due(self, ctx: Context) -> None:
        mark = self._watermark(ctx)
        if mark is None:
            return
        p = self._p
        starts: list[int] = ctx.get(f"{p}open", [])
        closing = [s for s in starts if s + self._size + self._grace <= mark]
        if not closing:
            return
        saved_id = ctx.event_id
        try:
            for start in closing:
                for key in self._pop_keys(ctx, start):
                    vkey = f"{p}v/{start:016d}/{key}"
                    result = WindowResult(f"window:{self.name}:{start}:{key}", key,
                                          start / 1000, (start + self._size) / 1000,
                                          ctx.get(vkey))
                    ctx.event_id = result.id
                    if self.emit_to is not None:
                        ctx.emit(self.emit_to, {"id": result.id, "key": key,
                                                "start": result.start, "end": result.end,
                                                "value": result.value})
                    if self._on_close is not None:
                        self._on_close(ctx, result)
                    ctx.delete(vkey)
        finally:
            ctx.event_id = saved_id
        ctx.set(f"{p}open", [s for s in starts if s not in closing])
