"""The staging half of the commit protocol, for one partition's store.

The :class:`~chukcha.processors.checkpoint.Checkpoint` of a partition drives its
:class:`Engine` (the runner and the tester both go through the checkpoint):

1. :meth:`Engine.process` applies one batch of one stream: for every message it decodes the JSON,
   takes the event ID, skips it if the dedup index has it, else calls the callback with a
   :class:`Context` that stages state changes, emits and sink rows for that event only (so a
   dead-lettered event leaves nothing behind).
2. :meth:`Engine.prepare` turns everything staged since the last commit into ONE write: table
   values (``t/``), dedup entries (``d/``), the streams' read positions (``p/``) and the outbox
   of emits (``o/``); the checkpoint writes it (``StateStore.write``) and calls
   :meth:`Engine.committed`, or :meth:`Engine.discard` when it failed.
3. The outbox is sent after the commit (:attr:`Engine.outbox`); :meth:`Engine.outbox_sent`
   schedules its keys for deletion in the next commit. Emit IDs derive from the input's ID, so a
   resend after a crash is a duplicate that the next processor drops.
"""

from __future__ import annotations

import itertools
import logging
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import orjson

from chukcha.dedup.index import DedupIndex, DedupPlan
from chukcha.errors import ProcessorError
from chukcha.processors.base import App
from chukcha.processors.config import ErrorPolicy
from chukcha.processors.context import (
    ABSENT,
    FAILURE_PREFIX,
    OUTBOX_PREFIX,
    POSITION_PREFIX,
    SKIP_PREFIX,
    TABLE_PREFIX,
    Context,
    EventPosition,
    Staged,
    Table,
)
from chukcha.processors.decoding import Decoded, Undecodable, decode_batch
from chukcha.processors.timers import PERIODIC_PREFIX, TIMER_PREFIX, TimerState
from chukcha.state.base import StateStore
from chukcha.state.partitions import open_partition_stores

__all__ = [
    "DEAD_LETTER_MAX_EVENT",
    "OUTBOX_PREFIX",
    "POSITION_PREFIX",
    "TABLE_PREFIX",
    "CommitPlan",
    "Context",
    "Engine",
    "EventPosition",
    "OutboxEntry",
    "Table",
    "read_state_table",
    "read_table",
    "skip_key",
]

logger = logging.getLogger(__name__)

DEAD_LETTER_MAX_EVENT: Final = 64 * 1024
"""A dead letter embeds at most this many bytes of the event (``truncated: true`` when cut;
its ``chunk`` and ``offset`` locate the whole event). JSON escaping can make an embedded event
up to 6 times longer, so a whole event near the message limit would not fit."""
_DEAD_LETTER_MAX_ERROR: Final = 8 * 1024  # characters of the error's repr
_DEAD_LETTER_MAX_ID: Final = 1024  # a longer event ID is replaced by its position
_DECODE_WARNING_INTERVAL: Final = 60.0  # seconds between warnings about undecodable events


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """Emits of one commit to one category, kept in the state until sent."""

    key: bytes
    category: str
    data: bytes  # "\n"-terminated JSON lines

    def lines(self) -> list[bytes]:
        return self.data[:-1].split(b"\n")


@dataclass(frozen=True, slots=True)
class CommitPlan:
    """One write batch: what :meth:`Engine.prepare` staged."""

    puts: dict[bytes, bytes]
    deletes: list[bytes]
    events: int  # events applied or dead-lettered in it


def _traceback(exc: BaseException) -> str:
    """The exception's traceback as text (file, line and code of each frame)."""
    return "".join(traceback.format_exception(exc)).rstrip()


def skip_key(category: str, chunk: str, offset: int) -> bytes:
    """The state key that asks the app to step over the event at ``chunk:offset``."""
    return SKIP_PREFIX + f"{category}\x00{chunk}\x00{offset:016x}".encode()


def _position_key(category: str, owner: str) -> bytes:
    return POSITION_PREFIX + category.encode() + b"\x00" + owner.encode()


class Engine:
    """Stages batches and builds commits for one partition of an app over its state store."""

    def __init__(self, app: App, store: StateStore, *, partition: int = 0) -> None:
        self.app = app
        self.store = store
        cfg = app.config
        self._policy = cfg.on_error
        self._cache_size = cfg.state.cache_size
        self.dedup = DedupIndex(cfg.dedup)
        self._cache: dict[str, Any] = {}
        self._batch: dict[str, Staged] = {}
        self._event: dict[str, Staged] = {}
        self._event_emits: list[tuple[str, bytes]] = []
        self._event_rows: list[tuple[str, Any]] = []
        self._emits: list[tuple[str, bytes]] = []
        self.sink_rows: dict[str, list[Any]] = {}
        """Rows staged since the last commit, per sink (flush them before :meth:`prepare`)."""
        self._positions: dict[tuple[str, str], tuple[str, int]] = {}
        self.positions: dict[str, dict[str, tuple[str, int]]] = {}
        """Committed read positions: category -> owner -> (chunk, offset)."""
        self.outbox: list[OutboxEntry] = []
        """Committed emits not yet sent (oldest first)."""
        self._sent: list[bytes] = []
        self._outbox_seq = 0
        self._new_outbox: list[OutboxEntry] = []
        self._dedup_plan = DedupPlan((), 0, 0.0)
        self.partition = partition
        self._event_timers: list[tuple[int, str]] = []
        self.listed_streams: dict[str, frozenset[str]] = {}
        """Per category, the owner streams the consumer listed (windows wait for them)."""
        self.timers = TimerState()
        """The partition's timers (:mod:`chukcha.processors.timers`)."""
        self.ctx = Context(
            store=store, cache=self._cache, batch=self._batch, event=self._event,
            emits=self._event_emits, rows=self._event_rows, sinks=frozenset(app.sinks),
            partition=partition,
            timers=self._event_timers if app.key_timer is not None else None,
        )
        self.applied = 0
        self.duplicates = 0
        self.dead_lettered = 0
        self.undecodable = 0
        """Events dead-lettered because their codec could not decode them."""
        self._undecodable_warned = 0
        self._next_decode_warning = 0.0
        self.timers_run = 0
        self.timer_failures = 0
        self.staged_events = 0
        self._skips: set[tuple[str, str, int]] = set()
        """Events to step over (``chukcha app skip``): (category, chunk, offset)."""
        self._skipped: list[tuple[str, str, int, str]] = []  # + the processor's category
        self._stream = ""  # the stream category of the batch being applied

    # --- start -------------------------------------------------------------------------------

    def load(self) -> None:
        """Read the dedup index, the positions and the unsent outbox (blocking)."""
        self.dedup.load(self.store)
        n = len(POSITION_PREFIX)
        for key, value in self.store.scan(POSITION_PREFIX):
            category, _, owner = key[n:].decode().partition("\x00")
            chunk, offset = orjson.loads(value)
            self.positions.setdefault(category, {})[owner] = (chunk, offset)
        for key, value in self.store.scan(OUTBOX_PREFIX):
            raw_category, _, data = value.partition(b"\n")
            self.outbox.append(OutboxEntry(key, raw_category.decode(), data))
        if self.outbox:
            self._outbox_seq = int(self.outbox[-1].key[len(OUTBOX_PREFIX):], 16) + 1
        self.timers.load(self.store, [(t.name, t.every) for t in self.app.timers.values()],
                         time.time())
        for key, _ in self.store.scan(SKIP_PREFIX):
            category, chunk, offset = key[len(SKIP_PREFIX):].decode().split("\x00")
            self._skips.add((category, chunk, int(offset, 16)))
        logger.info(
            "app=%s state loaded positions=%d unsent_outbox=%d dedup_ids=%d",
            self.app.name, sum(len(p) for p in self.positions.values()), len(self.outbox),
            len(self.dedup),
        )

    def mirror(self, puts: dict[bytes, bytes], deletes: list[bytes]) -> bool:
        """Apply a write that another writer made to this engine's store (a standby following
        the partition's changelog) to the state :meth:`load` reads (dedup IDs, positions,
        outbox, skips), so the engine is what a fresh load would find. Returns ``False`` when
        the write touched what this does not mirror (timers): :meth:`load` it again."""
        self.dedup.mirror(puts, deletes)
        outbox = {e.key: e for e in self.outbox}
        changed = False
        for key in deletes:
            if key.startswith((TIMER_PREFIX, PERIODIC_PREFIX)):
                return False
            if key.startswith(POSITION_PREFIX):
                category, _, owner = key[len(POSITION_PREFIX):].decode().partition("\x00")
                streams = self.positions.get(category, {})
                streams.pop(owner, None)
                if not streams:
                    self.positions.pop(category, None)
            elif key.startswith(OUTBOX_PREFIX):
                changed |= outbox.pop(key, None) is not None
            elif key.startswith(SKIP_PREFIX):
                category, chunk, offset = key[len(SKIP_PREFIX):].decode().split("\x00")
                self._skips.discard((category, chunk, int(offset, 16)))
        for key, value in puts.items():
            if key.startswith((TIMER_PREFIX, PERIODIC_PREFIX)):
                return False
            if key.startswith(POSITION_PREFIX):
                category, _, owner = key[len(POSITION_PREFIX):].decode().partition("\x00")
                chunk, offset = orjson.loads(value)
                self.positions.setdefault(category, {})[owner] = (chunk, offset)
            elif key.startswith(OUTBOX_PREFIX):
                raw_category, _, data = value.partition(b"\n")
                outbox[key] = OutboxEntry(key, raw_category.decode(), data)
                changed = True
            elif key.startswith(SKIP_PREFIX):
                category, chunk, offset = key[len(SKIP_PREFIX):].decode().split("\x00")
                self._skips.add((category, chunk, int(offset, 16)))
        if changed:
            self.outbox = [outbox[k] for k in sorted(outbox)]
            self._outbox_seq = (int(self.outbox[-1].key[len(OUTBOX_PREFIX):], 16) + 1
                                if self.outbox else 0)
        return True

    # --- processing --------------------------------------------------------------------------

    async def process(
        self, category: str, owner: str, chunk: str, offset: int, data: bytes, *,
        handler: str | None = None,
    ) -> None:
        """Apply the ``\\n``-terminated messages ``data`` that start at ``offset`` of ``chunk``
        (all of them: this engine's app has one partition, or the caller routed them).

        Raises:
            ProcessorError: a callback raised under the ``stop`` policy; everything staged
                since the last commit is discarded.
        """
        items, end = decode_batch(self.app, category, chunk, offset, data, handler=handler)
        await self.apply(category, owner, chunk, items, end, handler=handler)

    async def apply(  # noqa: PLR0912 - the per-event hot loop stays in one frame
        self, category: str, owner: str, chunk: str, items: list[Decoded], end: int, *,
        handler: str | None = None,
    ) -> None:
        """Apply decoded events (:func:`decode_batch`) of one batch of stream category
        ``category`` with the processor of ``handler`` (default: ``category``; another one
        when the stream is a partition of it, or the app's repartitioned copy) and stage the
        stream's position ``(chunk, end)``. ``ctx.category``, dead letters and the dedup index
        use the processor's category.

        Raises:
            ProcessorError: a callback (or the key function) raised under the ``stop`` policy;
                everything staged since the last commit is discarded.
        """
        name = handler or category
        fn, is_async = self.app.handlers[name].fn, self.app.handlers[name].is_async
        ctx = self.ctx
        ctx.category, ctx.owner, ctx.chunk = name, owner, chunk
        ctx.streams = self._known_streams(category, owner)
        committed_ids, staged_ids = self.dedup.views()
        event_overlay, batch = self._event, self._batch
        event_emits, event_rows = self._event_emits, self._event_rows
        prefix = name + "\x00"
        skips = self._skips
        self._stream = category
        for ev_off, line, event, eid, key, error in items:
            if skips and self._skip_if_asked(ctx, ev_off, line, eid, staged_ids):
                continue
            if eid is None:  # not identified: undecodable, or the ID function raised
                pid = f"{category}:{chunk}:{ev_off}"
                if isinstance(error, Undecodable):
                    self._undecodable(ctx, ev_off, line, error.line_id or pid, error)
                elif error is not None:
                    self._failed(ctx, ev_off, line, pid, error)
                continue
            dkey = prefix + eid
            if dkey in committed_ids or dkey in staged_ids:
                self.duplicates += 1
                continue
            if error is not None:  # the key function failed: a failure of this event
                self._failed(ctx, ev_off, line, eid, error)  # type: ignore[arg-type]
                staged_ids[dkey] = None
                continue
            ctx.event_id, ctx.offset, ctx.key = eid, ev_off, key
            try:
                if is_async:
                    await fn(ctx, event)  # type: ignore[misc]
                else:
                    fn(ctx, event)
            except Exception as exc:  # noqa: BLE001 - the error policy decides
                for staged in (event_overlay, event_emits, event_rows, self._event_timers):
                    staged.clear()
                self._failed(ctx, ev_off, line, eid, exc)
                staged_ids[dkey] = None
                continue
            if event_overlay:
                batch.update(event_overlay)
                event_overlay.clear()
            if event_emits or event_rows or self._event_timers:
                self._merge_event()
            staged_ids[dkey] = None
            self.applied += 1
            self.staged_events += 1
        self._positions[(category, owner)] = (chunk, end)

    def _undecodable(
        self, ctx: Context, offset: int, line: bytes, eid: str, error: Undecodable
    ) -> None:
        """Dead-letter an event its codec cannot decode (whatever the error policy: a retry
        would fail the same way), count it, and warn: at once, then at most once a minute."""
        self.undecodable += 1
        self._dead_letter(ctx, offset, line, eid, error.reason)
        now = time.monotonic()
        if now >= self._next_decode_warning:
            logger.warning(
                "app=%s category=%s: %d event(s) could not be decoded as %s (%d in all) and "
                "were dead-lettered to %s.dead; the latest at %s:%d: %s",
                self.app.name, ctx.category, self.undecodable - self._undecodable_warned,
                error.codec, self.undecodable, ctx.category, ctx.chunk, offset, error.reason,
            )
            self._undecodable_warned = self.undecodable
            self._next_decode_warning = now + _DECODE_WARNING_INTERVAL

    def _known_streams(self, category: str, owner: str) -> frozenset[str]:
        """The owner streams of ``category`` this partition has positions for, and ``owner``."""
        known = set(self.positions.get(category, ()))
        known.add(owner)
        known.update(self.listed_streams.get(category, ()))
        known.update(o for (c, o) in self._positions if c == category)
        return frozenset(known)

    # --- timers ------------------------------------------------------------------------------

    async def fire_timers(self, now: float) -> int:
        """Run the timers due at ``now`` (seconds since the epoch): each stages its changes
        with its own removal (per-key) or its next due time (periodic), committed by the next
        commit. Returns how many ran.

        Raises:
            ProcessorError: a timer raised under the ``stop`` policy (everything staged since
                the last commit is discarded).
        """
        now_ms = round(now * 1000)
        ran = 0
        for name, due in self.timers.due_periodic(now_ms):
            timer = self.app.timers[name]
            every_ms = max(1, round(timer.every * 1000))
            # The next run: one period after this one, or one from now if we fell behind.
            nxt = due + every_ms if due + every_ms > now_ms else now_ms + every_ms
            await self._run_timer(timer, f"timer:{name}:{due}", "", None)
            self.timers.stage_next(name, nxt)
            ran += 1
        handler = self.app.key_timer
        if handler is not None:
            for at_ms, key in self.timers.due_keyed(now_ms):
                await self._run_timer(handler, f"timer:@{key}:{at_ms}", key, key)
                self.timers.stage_fired(at_ms, key)
                ran += 1
        return ran

    async def _run_timer(self, timer: Any, eid: str, key: str, arg: str | None) -> None:
        ctx = self.ctx
        ctx.category, ctx.owner, ctx.chunk, ctx.offset = "", "", "", 0
        ctx.event_id, ctx.key = eid, key
        args = (ctx,) if arg is None else (ctx, arg)
        try:
            if timer.is_async:
                await timer.fn(*args)
            else:
                timer.fn(*args)
        except Exception as exc:
            for staged in (self._event, self._event_emits, self._event_rows,
                           self._event_timers):
                staged.clear()
            if self._policy is ErrorPolicy.STOP:
                self.discard()
                raise ProcessorError(
                    f"app {self.app.name!r}: timer {eid!r} failed: {exc!r}; nothing of this "
                    "batch was committed"
                ) from exc
            logger.warning("app=%s timer %s failed and is dropped: %r", self.app.name, eid, exc)
            self.timer_failures += 1
            return
        if self._event:
            self._batch.update(self._event)
            self._event.clear()
        self._merge_event()
        self.timers_run += 1
        self.staged_events += 1

    def _merge_event(self) -> None:
        self._emits.extend(self._event_emits)
        self._event_emits.clear()
        if self._event_timers:
            self.timers.stage_schedules(self._event_timers)
            self._event_timers.clear()
        for name, row in self._event_rows:
            self.sink_rows.setdefault(name, []).append(row)
        self._event_rows.clear()

    def _failed(self, ctx: Context, offset: int, line: bytes, eid: str, exc: Exception) -> None:
        category, chunk = ctx.category, ctx.chunk
        trace = _traceback(exc)
        if self._policy is ErrorPolicy.STOP:
            self.discard()
            self._record_failure(ctx, offset, eid, exc)
            # The traceback (file and line of the callback) goes to the log; the error says
            # where the event is and how to get past it.
            logger.error("app=%s category=%s processor failed on event %s (%s:%d):\n%s",
                         self.app.name, category, eid, chunk, offset, trace)
            raise ProcessorError(
                f"app {self.app.name!r}: processor of {category!r} failed on event {eid!r} "
                f"({chunk}:{offset}): {exc!r}; nothing of this batch was committed (to get "
                f"past this event with the app stopped: chukcha app skip MODULE:APP "
                f"--category {category})"
            ) from exc
        logger.warning(
            "app=%s category=%s event %s (%s:%d) dead-lettered:\n%s",
            self.app.name, category, eid, chunk, offset, trace,
        )
        self._dead_letter(ctx, offset, line, eid, repr(exc), trace=trace)

    def _record_failure(self, ctx: Context, offset: int, eid: str, exc: Exception) -> None:
        """Remember where the app stopped (outside any commit: it changes nothing the app
        computes), so ``chukcha app skip`` knows which event to step over."""
        record = {"stream": self._stream, "owner": ctx.owner, "chunk": ctx.chunk,
                  "offset": offset, "id": eid, "error": repr(exc)[:_DEAD_LETTER_MAX_ERROR]}
        try:
            self.store.write({FAILURE_PREFIX + ctx.category.encode(): orjson.dumps(record)}, (),
                             sync=True)
        except Exception:
            logger.exception("app=%s could not record the failure position", self.app.name)

    def _skip_if_asked(self, ctx: Context, offset: int, line: bytes, eid: str | None,
                       staged_ids: dict[str, None]) -> bool:
        """Step over the event if ``chukcha app skip`` named it: dead-lettered, not applied."""
        if (self._stream, ctx.chunk, offset) not in self._skips:
            return False
        if eid is None:
            eid = f"{ctx.category}:{ctx.chunk}:{offset}"
        else:
            staged_ids[ctx.category + "\x00" + eid] = None
        logger.warning("app=%s category=%s event %s (%s:%d) skipped as asked (chukcha app "
                       "skip); recorded in %s.dead", self.app.name, ctx.category, eid,
                       ctx.chunk, offset, ctx.category)
        self._skipped.append((self._stream, ctx.chunk, offset, ctx.category))
        self._dead_letter(ctx, offset, line, eid, "skipped with chukcha app skip")
        return True

    def _dead_letter(self, ctx: Context, offset: int, line: bytes, eid: str, error: str,
                     *, trace: str | None = None) -> None:
        category, chunk = ctx.category, ctx.chunk
        if len(eid) > _DEAD_LETTER_MAX_ID:
            eid = f"{category}:{chunk}:{offset}"
        record: dict[str, Any] = {
            "id": f"{eid}/dead",
            "category": category,
            "chunk": chunk,
            "offset": offset,
            "error": error[:_DEAD_LETTER_MAX_ERROR],
            "event": line[:DEAD_LETTER_MAX_EVENT].decode(errors="replace"),
        }
        if trace is not None:
            record["traceback"] = trace[-_DEAD_LETTER_MAX_ERROR:]  # the innermost frames
        if len(line) > DEAD_LETTER_MAX_EVENT:
            record["truncated"] = True
        self._emits.append((f"{category}.dead", orjson.dumps(record) + b"\n"))
        self.dead_lettered += 1
        self.staged_events += 1

    # --- commit ------------------------------------------------------------------------------

    def prepare(self) -> CommitPlan:
        """Build the one write batch holding everything staged since the last commit."""
        puts: dict[bytes, bytes] = {}
        deletes: list[bytes] = list(self._sent)
        for key, (_, enc) in self._batch.items():
            if enc is None:
                deletes.append(TABLE_PREFIX + key.encode())
            else:
                puts[TABLE_PREFIX + key.encode()] = enc
        self._dedup_plan = self.dedup.stage(puts, deletes)
        for (category, owner), pos in self._positions.items():
            puts[_position_key(category, owner)] = orjson.dumps(pos)
        for stream, chunk, offset, name in self._skipped:
            deletes.append(skip_key(stream, chunk, offset))
            deletes.append(FAILURE_PREFIX + name.encode())
        self.timers.prepare(puts, deletes)
        self._new_outbox = []
        if self._emits:
            by_category: dict[str, list[bytes]] = {}
            for category, line in self._emits:
                by_category.setdefault(category, []).append(line)
            for category, lines in by_category.items():
                okey = OUTBOX_PREFIX + b"%016x" % self._outbox_seq
                self._outbox_seq += 1
                data = b"".join(lines)
                puts[okey] = category.encode() + b"\n" + data
                self._new_outbox.append(OutboxEntry(okey, category, data))
        return CommitPlan(puts, deletes, self.staged_events)

    def committed(self) -> None:
        """The plan from :meth:`prepare` is written: make it the committed state."""
        cache = self._cache
        if len(cache) + len(self._batch) > self._cache_size:
            # Forget the oldest-cached half; they are read again from LevelDB when needed.
            for key in list(itertools.islice(cache, len(cache) // 2 + len(self._batch))):
                del cache[key]
        for key, (frozen, enc) in self._batch.items():
            cache[key] = ABSENT if enc is None else frozen
        self._batch.clear()
        self.dedup.committed(self._dedup_plan)
        self._skips.difference_update(s[:3] for s in self._skipped)
        self._skipped.clear()
        self.sink_rows.clear()
        for (category, owner), pos in self._positions.items():
            self.positions.setdefault(category, {})[owner] = pos
        self._positions.clear()
        self.outbox.extend(self._new_outbox)
        self._new_outbox = []
        self._emits.clear()
        self._sent.clear()
        self.timers.committed()
        self.staged_events = 0

    def discard(self) -> None:
        """Drop everything staged since the last commit."""
        self._batch.clear()
        self._event.clear()
        self._event_emits.clear()
        self._event_rows.clear()
        self._emits.clear()
        self.sink_rows.clear()
        self._positions.clear()
        self._skipped.clear()
        self.dedup.discard()
        self._new_outbox = []
        self._event_timers.clear()
        self.timers.discard()
        self.staged_events = 0

    def outbox_sent(self, entry: OutboxEntry) -> None:
        """``entry`` reached the bus: delete it from the state with the next commit."""
        self.outbox.remove(entry)
        self._sent.append(entry.key)

    @property
    def has_staged(self) -> bool:
        return bool(self._positions or self._emits or self._batch or self._sent
                    or self.timers.has_staged)


def read_table(store: StateStore) -> dict[str, Any]:
    """The committed table of an app's state store as a dict (blocking)."""
    n = len(TABLE_PREFIX)
    return {k[n:].decode(): orjson.loads(v) for k, v in store.scan(TABLE_PREFIX)}


def read_state_table(state_dir: Path) -> dict[str, Any]:
    """The committed table of a stopped app's state directory, all partitions together
    (blocking; refused while the app runs: :class:`~chukcha.errors.StateLockedError`)."""
    stores = open_partition_stores(state_dir, None)
    try:
        merged: dict[str, Any] = {}
        for store in stores:
            merged.update(read_table(store))
        return merged
    finally:
        for store in stores:
            store.close()
