"""The commit protocol of one app, independent of where batches come from.

The runner (real bus) and the tester (in-process) both drive an :class:`Engine`:

1. :meth:`Engine.process` applies one batch of one stream: for every message it decodes the JSON,
   takes the event ID, skips it if the dedup index has it, else calls the callback with a
   :class:`Context` that stages state changes, emits and sink rows for that event only (so a
   dead-lettered event leaves nothing behind).
2. :meth:`Engine.prepare` turns everything staged since the last commit into ONE write: table
   values (``t/``), dedup entries (``d/``), the streams' read positions (``p/``) and the outbox
   of emits (``o/``); the runner writes it (``StateStore.write``) and calls
   :meth:`Engine.committed`, or :meth:`Engine.discard` when it failed.
3. The outbox is sent after the commit (:attr:`Engine.outbox`); :meth:`Engine.outbox_sent`
   schedules its keys for deletion in the next commit. Emit IDs derive from the input's ID, so a
   resend after a crash is a duplicate that the next processor drops.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

import orjson

from chukcha.dedup.index import DedupIndex, DedupPlan
from chukcha.errors import MessageTooLargeError, ProcessorError
from chukcha.processors.base import App, default_event_id
from chukcha.processors.config import ErrorPolicy
from chukcha.protocol import MAX_MESSAGE_SIZE, validate_category
from chukcha.state.base import StateStore

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
    "read_table",
]

logger = logging.getLogger(__name__)

TABLE_PREFIX: Final = b"t/"
POSITION_PREFIX: Final = b"p/"
OUTBOX_PREFIX: Final = b"o/"

DEAD_LETTER_MAX_EVENT: Final = 64 * 1024
"""A dead letter embeds at most this many bytes of the event (``truncated: true`` when cut;
its ``chunk`` and ``offset`` locate the whole event). JSON escaping can make an embedded event
up to 6 times longer, so a whole event near the message limit would not fit."""
_DEAD_LETTER_MAX_ERROR: Final = 8 * 1024  # characters of the error's repr
_DEAD_LETTER_MAX_ID: Final = 1024  # a longer event ID is replaced by its position


class _Marker:
    __slots__ = ()


_MISSING: Final = _Marker()  # not looked up yet
_ABSENT: Final = _Marker()  # looked up: no such key

# A staged table change: (frozen, encoded) for a put, (None, None) for a delete. ``frozen`` is
# the value itself when it is an immutable scalar, else its encoding (bytes, never a JSON value):
# ``get`` decodes a fresh object from it each time, so a callback that changes a value in place
# and then fails cannot change the staged, cached or committed state (see ``Context``). The
# cache holds values in the same frozen form.
_Staged = tuple[Any, bytes | None]
_SCALARS: Final = frozenset({int, str, float, bool, type(None)})


@dataclass(frozen=True, slots=True)
class EventPosition:
    """Where an event is stored: its stream (category, owner) and byte offset in a chunk."""

    category: str
    owner: str
    chunk: str
    offset: int


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


def _position_key(category: str, owner: str) -> bytes:
    return POSITION_PREFIX + category.encode() + b"\x00" + owner.encode()


class Table:
    """Read access to the group's table as the current event sees it (staged changes
    included)."""

    __slots__ = ("_ctx",)

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx

    def get(self, key: str, default: Any = None) -> Any:
        return self._ctx.get(key, default)

    def __getitem__(self, key: str) -> Any:
        value = self._ctx.get(key, _ABSENT)
        if value is _ABSENT:
            raise KeyError(key)
        return value

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._ctx.get(key, _ABSENT) is not _ABSENT

    def items(self) -> Iterator[tuple[str, Any]]:
        """Every key and value, in key order. Scans the store: meant for small tables and
        tests, not for every event."""
        return self._ctx.items()


class Context:
    """What a callback gets besides the event: its ID and position, the group's table
    (``get``/``set``/``delete``), ``emit`` and ``to_sink``.

    Values are JSON (orjson) values. :meth:`get` returns a fresh copy each time and
    :meth:`set` stores a snapshot of the value as it is at the call: changing an object in
    place changes the table only through :meth:`set`, so the changes of an event that fails
    (stop or dead-letter policy) are rolled back entirely.
    """

    __slots__ = (
        "_batch",
        "_cache",
        "_categories",
        "_emits",
        "_event",
        "_rows",
        "_sinks",
        "_store",
        "category",
        "chunk",
        "event_id",
        "offset",
        "owner",
    )

    def __init__(
        self,
        *,
        store: StateStore,
        cache: dict[str, Any],
        batch: dict[str, _Staged],
        event: dict[str, _Staged],
        emits: list[tuple[str, bytes]],
        rows: list[tuple[str, Any]],
        sinks: frozenset[str],
    ) -> None:
        self._store = store
        self._cache = cache
        self._batch = batch
        self._event = event
        self._emits = emits
        self._rows = rows
        self._sinks = sinks
        self._categories: set[str] = set()
        self.category = ""
        self.owner = ""
        self.chunk = ""
        self.offset = 0
        self.event_id = ""

    @property
    def position(self) -> EventPosition:
        """Where this event is stored."""
        return EventPosition(self.category, self.owner, self.chunk, self.offset)

    @property
    def table(self) -> Table:
        """Read access to the group's table."""
        return Table(self)

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key`` in the group's table (including changes staged so far)."""
        staged = self._event.get(key) or self._batch.get(key)
        if staged is not None:
            if staged[1] is None:
                return default
            frozen = staged[0]
            return orjson.loads(frozen) if type(frozen) is bytes else frozen
        value = self._cache.get(key, _MISSING)
        if value is _MISSING:
            # A cache miss is a synchronous LevelDB point read on the event loop, by decision:
            # - It is cheap: ~3 us from LevelDB's block cache, ~50 us for the first read of a
            #   table after a restart (from the OS page cache; measured on a dev machine with
            #   plyvel, 200k keys). Handing it to a worker thread (asyncio.to_thread) costs more
            #   than that (~50-100 us: a queue hand-off and two GIL switches), on every miss.
            # - Only a read from a cold disk blocks for milliseconds, and then it stalls this
            #   processor's own loop (its read-ahead and HTTP), which would wait for the value
            #   anyway: the callback cannot go on without it. Nothing else shares the loop.
            # - It keeps ``ctx.get`` synchronous, so plain ``def`` callbacks work. Prefetching
            #   is not possible in general: which keys a callback reads is known only when it
            #   runs. Hot keys stay in ``_cache`` (``StateConfig.cache_size`` values).
            # The blockbuster fixture of the test suite does not flag it: plyvel's C calls are
            # not patched functions (only Python-level I/O such as os.read is), so the runner's
            # tests (a restart reading committed values back) run with it enabled.
            raw = self._store.get(TABLE_PREFIX + key.encode())
            if raw is None:
                self._cache[key] = _ABSENT
                return default
            value = orjson.loads(raw)
            self._cache[key] = value if type(value) in _SCALARS else raw
            return value  # a fresh object: the cache keeps the bytes
        if value is _ABSENT:
            return default
        return orjson.loads(value) if type(value) is bytes else value

    def set(self, key: str, value: Any) -> None:
        """Stage ``key = value`` (committed with the batch, only if this event succeeds)."""
        if type(key) is not str:
            raise TypeError(f"table keys are strings, not {type(key).__name__}")
        enc = orjson.dumps(value)
        self._event[key] = (value if type(value) in _SCALARS else enc, enc)

    def delete(self, key: str) -> None:
        """Stage the removal of ``key``."""
        if type(key) is not str:
            raise TypeError(f"table keys are strings, not {type(key).__name__}")
        self._event[key] = (None, None)

    def emit(self, category: str, event: dict[str, Any] | bytes) -> str:
        """Stage ``event`` for ``category``; it is sent after the commit. Returns its ID: the
        event's own ``id``, else ``"<input id>/<n>"`` (n counts this input's emits), so a resend
        is a duplicate downstream.

        ``event`` is a dict or the bytes of one JSON object (one line). Bytes without an ``id``
        get the derived one spliced in front (``{"id":"<input id>/<n>",...``); the rest of the
        bytes is kept as it is.

        Raises:
            ValueError: bytes that are not one line holding a JSON object: without an ID of
                its own an emit would be deduplicated downstream only by where it is stored,
                so a resend after a crash would be applied twice.
            MessageTooLargeError: the encoded event is over the bus's message limit (1 MiB);
                raised in the callback, so the error policy decides (stop or dead-letter).
        """
        if category not in self._categories:
            validate_category(category)
            self._categories.add(category)
        if isinstance(event, bytes):
            line, eid = self._bytes_emit(event)
        elif isinstance(event, dict):
            own_id: Any = event.get("id")
            if own_id is None:
                eid = f"{self.event_id}/{len(self._emits)}"
                event = {**event, "id": eid}
            else:
                eid = str(own_id)
            line = orjson.dumps(event)
        else:
            raise TypeError(f"emit takes a dict or bytes, not {type(event).__name__}")
        if len(line) > MAX_MESSAGE_SIZE:
            # Refused here, inside the callback, so the error policy handles it before anything
            # is committed: an over-size message in the outbox could never be sent.
            raise MessageTooLargeError(
                MAX_MESSAGE_SIZE, size=len(line), what=f"an event emitted to {category!r}"
            )
        self._emits.append((category, line + b"\n"))
        return str(eid)

    def _bytes_emit(self, event: bytes) -> tuple[bytes, str]:
        """The line and ID of an event emitted as bytes (see :meth:`emit`)."""
        if b"\n" in event:
            raise ValueError("an emitted event must be one line")
        try:
            obj = orjson.loads(event)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"an event emitted as bytes must be a JSON object: {exc}") from None
        if type(obj) is not dict:
            raise ValueError(
                f"an event emitted as bytes must be a JSON object, not {type(obj).__name__}"
            )
        own = obj.get("id")
        if own is not None:
            return event, str(own)
        eid = f"{self.event_id}/{len(self._emits)}"
        if "id" in obj:  # "id": null; a second "id" key would be ambiguous: re-encode
            return orjson.dumps({**obj, "id": eid}), eid
        rest = event.lstrip()[1:].lstrip()  # after the "{"
        comma = b"" if rest.startswith(b"}") else b","
        return b'{"id":' + orjson.dumps(eid) + comma + rest, eid

    def to_sink(self, name: str, row: Any) -> None:
        """Stage ``row`` for sink ``name``; flushed before the commit."""
        if name not in self._sinks:
            raise KeyError(f"no sink named {name!r} (register it with app.add_sink)")
        self._rows.append((name, row))

    def items(self) -> Iterator[tuple[str, Any]]:
        """Every key and value (committed, overlaid with staged changes), in key order."""
        merged: dict[str, Any] = {}
        n = len(TABLE_PREFIX)
        for raw_key, raw in self._store.scan(TABLE_PREFIX):
            merged[raw_key[n:].decode()] = orjson.loads(raw)
        for staged in (self._batch, self._event):
            for key, (_, enc) in staged.items():
                if enc is None:
                    merged.pop(key, None)
                else:
                    merged[key] = orjson.loads(enc)
        return iter(sorted(merged.items()))


class Engine:
    """Stages batches and builds commits for one app over one state store."""

    def __init__(self, app: App, store: StateStore) -> None:
        self.app = app
        self.store = store
        cfg = app.config
        self._policy = cfg.on_error
        self._cache_size = cfg.state.cache_size
        self.dedup = DedupIndex(cfg.dedup)
        self._cache: dict[str, Any] = {}
        self._batch: dict[str, _Staged] = {}
        self._event: dict[str, _Staged] = {}
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
        self._event_id = app.event_id
        self.ctx = Context(
            store=store, cache=self._cache, batch=self._batch, event=self._event,
            emits=self._event_emits, rows=self._event_rows, sinks=frozenset(app.sinks),
        )
        self.applied = 0
        self.duplicates = 0
        self.dead_lettered = 0
        self.staged_events = 0

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
        logger.info(
            "app=%s state loaded positions=%d unsent_outbox=%d dedup_ids=%d",
            self.app.name, sum(len(p) for p in self.positions.values()), len(self.outbox),
            len(self.dedup),
        )

    # --- processing --------------------------------------------------------------------------

    async def process(
        self, category: str, owner: str, chunk: str, offset: int, data: bytes
    ) -> None:
        """Apply the ``\\n``-terminated messages ``data`` that start at ``offset`` of ``chunk``.

        Raises:
            ProcessorError: a callback raised under the ``stop`` policy; everything staged
                since the last commit is discarded.
        """
        fn, is_async = self.app.handlers[category].fn, self.app.handlers[category].is_async
        ctx = self.ctx
        ctx.category, ctx.owner, ctx.chunk = category, owner, chunk
        committed_ids, staged_ids = self.dedup.views()
        event_overlay, batch = self._event, self._batch
        event_emits, event_rows = self._event_emits, self._event_rows
        default_id = self._event_id is default_event_id
        prefix = category + "\x00"
        # The ID of an event without one: where it is stored. Chunk names repeat across
        # categories, so the category is part of it (its emits' IDs must not collide).
        place = f"{category}:{chunk}:"
        pos = offset
        for line in data[:-1].split(b"\n") if data else ():
            ev_off = pos
            pos += len(line) + 1
            try:
                event = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                self._dead_letter(ctx, ev_off, line, f"{place}{ev_off}", f"invalid JSON: {exc}")
                continue
            # The common case inline: a JSON object with a string "id" and the default key.
            eid = event.get("id") if default_id and type(event) is dict else None
            if (type(eid) is not str or not eid) and (
                eid := self._event_id_of(event, place, ev_off, line)
            ) is None:
                continue
            key = prefix + eid
            if key in committed_ids or key in staged_ids:
                self.duplicates += 1
                continue
            ctx.event_id, ctx.offset = eid, ev_off
            try:
                if is_async:
                    await fn(ctx, event)  # type: ignore[misc]
                else:
                    fn(ctx, event)
            except Exception as exc:  # noqa: BLE001 - the error policy decides
                for staged in (event_overlay, event_emits, event_rows):
                    staged.clear()
                self._failed(ctx, ev_off, line, eid, exc)
                staged_ids[key] = None
                continue
            if event_overlay:
                batch.update(event_overlay)
                event_overlay.clear()
            if event_emits or event_rows:
                self._merge_event()
            staged_ids[key] = None
            self.applied += 1
            self.staged_events += 1
        self._positions[(category, owner)] = (chunk, pos)

    def _event_id_of(self, event: Any, place: str, offset: int, line: bytes) -> str | None:
        """The ID from the app's key function (``place + offset`` when it gives none);
        ``None`` when the function raised and the error policy dead-lettered the event."""
        try:
            raw_id = self._event_id(event)
        except Exception as exc:  # noqa: BLE001 - a user's key function; policy decides
            self._failed(self.ctx, offset, line, f"{place}{offset}", exc)
            return None
        return f"{place}{offset}" if raw_id is None or raw_id == "" else str(raw_id)

    def _merge_event(self) -> None:
        self._emits.extend(self._event_emits)
        self._event_emits.clear()
        for name, row in self._event_rows:
            self.sink_rows.setdefault(name, []).append(row)
        self._event_rows.clear()

    def _failed(self, ctx: Context, offset: int, line: bytes, eid: str, exc: Exception) -> None:
        category, chunk = ctx.category, ctx.chunk
        if self._policy is ErrorPolicy.STOP:
            self.discard()
            raise ProcessorError(
                f"app {self.app.name!r}: processor of {category!r} failed on event {eid!r} "
                f"({chunk}:{offset}): {exc!r}; nothing of this batch was committed"
            ) from exc
        logger.warning(
            "app=%s category=%s event %s (%s:%d) dead-lettered: %r",
            self.app.name, category, eid, chunk, offset, exc,
        )
        self._dead_letter(ctx, offset, line, eid, repr(exc))

    def _dead_letter(self, ctx: Context, offset: int, line: bytes, eid: str, error: str) -> None:
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
            cache[key] = _ABSENT if enc is None else frozen
        self._batch.clear()
        self.dedup.committed(self._dedup_plan)
        self.sink_rows.clear()
        for (category, owner), pos in self._positions.items():
            self.positions.setdefault(category, {})[owner] = pos
        self._positions.clear()
        self.outbox.extend(self._new_outbox)
        self._new_outbox = []
        self._emits.clear()
        self._sent.clear()
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
        self.dedup.discard()
        self._new_outbox = []
        self.staged_events = 0

    def outbox_sent(self, entry: OutboxEntry) -> None:
        """``entry`` reached the bus: delete it from the state with the next commit."""
        self.outbox.remove(entry)
        self._sent.append(entry.key)

    @property
    def has_staged(self) -> bool:
        return bool(self._positions or self._emits or self._batch or self._sent)


def read_table(store: StateStore) -> dict[str, Any]:
    """The committed table of an app's state store as a dict (blocking)."""
    n = len(TABLE_PREFIX)
    return {k[n:].decode(): orjson.loads(v) for k, v in store.scan(TABLE_PREFIX)}
