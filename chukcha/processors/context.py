"""What a callback sees: :class:`Context` (the partition's table as the event sees it, emits,
sink rows) and :class:`Table`; the key layout of a partition's store.

A :class:`Context` only stages: the :class:`~chukcha.processors.engine.Engine` decides what of
it becomes part of a commit.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson

from chukcha.codecs import CodecSpec, encode_object, get_codec, splice_id
from chukcha.errors import MessageTooLargeError
from chukcha.processors.timers import to_ms
from chukcha.protocol import MAX_MESSAGE_SIZE, validate_category
from chukcha.state.base import StateStore

__all__ = [
    "ABSENT",
    "FAILURE_PREFIX",
    "OUTBOX_PREFIX",
    "POSITION_PREFIX",
    "SCALARS",
    "SKIP_PREFIX",
    "TABLE_PREFIX",
    "Context",
    "EventPosition",
    "Staged",
    "Table",
]

logger = logging.getLogger(__name__)

TABLE_PREFIX: Final = b"t/"
POSITION_PREFIX: Final = b"p/"
OUTBOX_PREFIX: Final = b"o/"
SKIP_PREFIX: Final = b"k/"
"""``k/<category>\0<chunk>\0<offset:016x>``: an event to skip (``chukcha app skip``)."""
FAILURE_PREFIX: Final = b"f/"
"""``f/<category>``: where the last ``stop``-policy failure in that category happened."""
class _Marker:
    __slots__ = ()


_MISSING: Final = _Marker()  # not looked up yet
ABSENT: Final = _Marker()  # looked up: no such key

# A staged table change: (frozen, encoded) for a put, (None, None) for a delete. ``frozen`` is
# the value itself when it is an immutable scalar, else its encoding (bytes, never a JSON value):
# ``get`` decodes a fresh object from it each time, so a callback that changes a value in place
# and then fails cannot change the staged, cached or committed state (see ``Context``). The
# cache holds values in the same frozen form.
Staged = tuple[Any, bytes | None]
SCALARS: Final = frozenset({int, str, float, bool, type(None)})


@dataclass(frozen=True, slots=True)
class EventPosition:
    """Where an event is stored: its stream (category, owner) and byte offset in a chunk."""

    category: str
    owner: str
    chunk: str
    offset: int


class Table:
    """Read access to the group's table as the current event sees it (staged changes
    included)."""

    __slots__ = ("_ctx",)

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx

    def get(self, key: str, default: Any = None) -> Any:
        return self._ctx.get(key, default)

    def __getitem__(self, key: str) -> Any:
        value = self._ctx.get(key, ABSENT)
        if value is ABSENT:
            raise KeyError(key)
        return value

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._ctx.get(key, ABSENT) is not ABSENT

    def items(self) -> Iterator[tuple[str, Any]]:
        """Every key and value, in key order. Scans the store: meant for small tables and
        tests, not for every event."""
        return self._ctx.items()


class Context:
    """What a callback gets besides the event: its ID, key, partition and position, the
    partition's table (``get``/``set``/``delete``), ``emit`` and ``to_sink``.

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
        "_timers",
        "category",
        "chunk",
        "event_id",
        "key",
        "offset",
        "owner",
        "partition",
        "streams",
        "views",
    )

    def __init__(
        self,
        *,
        store: StateStore,
        cache: dict[str, Any],
        batch: dict[str, Staged],
        event: dict[str, Staged],
        emits: list[tuple[str, bytes]],
        rows: list[tuple[str, Any]],
        sinks: frozenset[str],
        partition: int = 0,
        timers: list[tuple[int, str]] | None = None,
    ) -> None:
        self._store = store
        self._timers = timers
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
        self.key = ""
        """The event's key as a string (``key=`` of the processor, an integer as its decimal
        digits; default: the event ID): usable as a table key."""
        self.partition = partition
        """The partition whose table this context reads and writes."""
        self.views: Mapping[str, Any] = {}
        """App name -> its table's view (``app.view(name)``; the Tester takes dicts)."""
        self.streams: frozenset[str] = frozenset()
        """The owner streams of the current category this partition knows (windows use it)."""

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
                self._cache[key] = ABSENT
                return default
            value = orjson.loads(raw)
            self._cache[key] = value if type(value) in SCALARS else raw
            return value  # a fresh object: the cache keeps the bytes
        if value is ABSENT:
            return default
        return orjson.loads(value) if type(value) is bytes else value

    def set(self, key: str, value: Any) -> None:
        """Stage ``key = value`` (committed with the batch, only if this event succeeds)."""
        if type(key) is not str:
            raise TypeError(f"table keys are strings, not {type(key).__name__}")
        enc = orjson.dumps(value)
        self._event[key] = (value if type(value) in SCALARS else enc, enc)

    def delete(self, key: str) -> None:
        """Stage the removal of ``key``."""
        if type(key) is not str:
            raise TypeError(f"table keys are strings, not {type(key).__name__}")
        self._event[key] = (None, None)

    def emit(self, category: str, event: Any, *, codec: CodecSpec | None = None) -> str:
        """Stage ``event`` for ``category``; it is sent after the commit. Returns its ID: the
        event's own ``id``, else ``"<input id>/<n>"`` (n counts this input's emits), so a resend
        is a duplicate downstream.

        ``event`` is a dict, a typed event (``msgspec.Struct``, dataclass, attrs, pydantic
        model: encoded as JSON), or the bytes of one JSON object (one line). Bytes and typed
        events without an ``id`` get the derived one spliced in front
        (``{"id":"<input id>/<n>",...``); the rest of the bytes is kept as it is.

        ``codec="str"`` (or a ``str`` event) and ``codec="bytes"`` send one raw line that
        carries no ID: the next processor can tell copies apart only by where they are
        stored, so a resend after a crash is a second event there (returns ``""``). Another
        ``codec`` (``"json"``, a class) encodes ``event`` with it.

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
        line, eid = self._encode_emit(event, codec)
        if len(line) > MAX_MESSAGE_SIZE:
            # Refused here, inside the callback, so the error policy handles it before anything
            # is committed: an over-size message in the outbox could never be sent.
            raise MessageTooLargeError(
                MAX_MESSAGE_SIZE, size=len(line), what=f"an event emitted to {category!r}"
            )
        self._emits.append((category, line + b"\n"))
        return str(eid)

    def _encode_emit(self, event: Any, codec: CodecSpec | None) -> tuple[bytes, str]:
        """The line and ID of an emitted event (see :meth:`emit`)."""
        if codec is None and isinstance(event, str):
            codec = "str"
        if codec is not None:
            chosen = get_codec(codec)
            encoded = chosen.encode(event)
            if chosen.json_object:
                return self._bytes_emit(encoded)
            if b"\n" in encoded:
                raise ValueError("an emitted event must be one line")
            return encoded, ""
        if isinstance(event, dict):
            own_id: Any = event.get("id")
            if own_id is None:
                eid = f"{self.event_id}/{len(self._emits)}"
                return orjson.dumps({**event, "id": eid}), eid
            return orjson.dumps(event), str(own_id)
        if isinstance(event, bytes):
            return self._bytes_emit(event)
        if (typed := encode_object(event)) is not None:
            return self._bytes_emit(typed)
        raise TypeError(f"emit takes a dict, a typed event, bytes or str (with codec=), "
                        f"not {type(event).__name__}")

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
        return splice_id(event, eid), eid

    def lookup(self, app: str, key: str, default: Any = None) -> Any:
        """``key``'s value in app ``app``'s table, as this app's view of it has it now
        (``app.view(app)``; see :mod:`chukcha.processors.views` for how fresh it is).

        Raises:
            KeyError: the app declared no view of ``app``.
        """
        view = self.views.get(app)
        if view is None:
            raise KeyError(f"no view of app {app!r}: declare it with app.view({app!r})")
        return view.get(key, default)

    def schedule(self, at: float, key: str) -> None:
        """Stage a timer: the app's ``@app.on_timer`` handler runs ``fn(ctx, key)`` once at (or
        soon after) ``at`` (seconds since the epoch, e.g. ``time.time() + 3600``), in this
        partition. Committed with this event (dropped if it fails); scheduling the same
        ``(at, key)`` again is one timer.

        Raises:
            RuntimeError: the app has no ``@app.on_timer`` handler.
            ValueError: ``at`` is not a time, or ``key`` not a string.
        """
        if self._timers is None:
            raise RuntimeError("ctx.schedule needs an @app.on_timer handler")
        if type(key) is not str:
            raise ValueError(f"a timer key is a string, not {type(key).__name__}")
        self._timers.append((to_ms(at), key))

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
