"""An in-process tester for users' unit tests (like Goka's ``tester``): feed events to an app
without a node, then look at the resulting table, emits, dead letters and sink rows.

```python
from chukcha.processors.tester import Tester
from examples.orders import app

t = Tester(app)
t.feed("orders", {"id": "o1", "customer": "ann", "amount": 30})
t.feed("orders", {"id": "o1", "customer": "ann", "amount": 30})   # a duplicate: skipped
assert t.table == {"ann": 30}
```

Each :meth:`Tester.feed` call is one batch and one commit, through the same
:class:`~chukcha.processors.checkpoint.Checkpoint` (and so the same commit order: flush sinks,
one write, fsync per policy, send the outbox, ack) as the real runner, on a
:class:`~chukcha.state.memory.MemoryStore`. Sinks are not called: their rows are collected.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import orjson

from chukcha.codecs import encode_object
from chukcha.errors import MessageTooLargeError, ProcessorError
from chukcha.processors.base import App
from chukcha.processors.checkpoint import Checkpoint
from chukcha.processors.engine import read_table
from chukcha.processors.partitions import PartitionSet
from chukcha.protocol import MAX_MESSAGE_SIZE, chunk_file_name, validate_category
from chukcha.state.memory import MemoryStore

__all__ = ["Tester"]

logger = logging.getLogger(__name__)


class Tester:
    """Drives ``app`` in-process; the events of each category are one stream owned by
    ``owner`` (``feed(..., owner=...)`` feeds another owner's stream, as a second node's)."""

    __test__ = False  # not a pytest test class

    def __init__(self, app: App, *, owner: str = "tester",
                 views: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        """``views``: the tables ``ctx.lookup(app, key)`` reads, by app name (plain dicts
        stand in for the runner's :class:`~chukcha.processors.views.View`)."""
        self.app = app
        self.owner = owner
        self.stores = [MemoryStore() for _ in range(app.partitions)]
        """One store per partition (as the runner has one LevelDB per partition)."""
        self._io = _TesterIO()
        self.partitions = PartitionSet(app, self.stores, self._io)
        for engine in self.partitions.engines:
            engine.load()
            engine.ctx.views = dict(views or {})
        self._offsets: dict[tuple[str, str], int] = {}
        self._streams: dict[str, set[str]] = {}

    def add_streams(self, category: str, *owners: str) -> None:
        """Declare owner streams of ``category`` before they are fed, as a consumer lists
        them (windows wait for every listed stream)."""
        self._streams.setdefault(category, set()).update(owners)

    async def feed_async(self, category: str, *events: Any, owner: str | None = None) -> None:
        """Process ``events`` of ``category`` as one batch and commit it: dicts (as JSON),
        typed events (msgspec.Struct, dataclass, pydantic: as JSON), str (a line of text) or
        bytes (the line as it is), each decoded by the processor's codec as the runner would.

        The bus's message limit (1 MiB) holds here too: an event over it is refused, as a node
        would refuse it, and an emit over it raises in the callback, as in the runner.

        Raises:
            ProcessorError: a callback raised under the ``stop`` policy (nothing committed).
            MessageTooLargeError: an event of ``events`` is over the message limit.
        """
        validate_category(category)
        if category not in self.app.handlers:
            raise KeyError(f"app {self.app.name!r} has no processor for {category!r}")
        lines = []
        for event in events:
            if isinstance(event, bytes):
                line = event
            elif isinstance(event, str):
                line = event.encode()
            else:
                line = encode_object(event) or orjson.dumps(event)
            if b"\n" in line:
                raise ValueError("an event must be one line")
            if len(line) > MAX_MESSAGE_SIZE:
                raise MessageTooLargeError(MAX_MESSAGE_SIZE, size=len(line), what="a fed event")
            lines.append(line + b"\n")
        data = b"".join(lines)
        owner = owner or self.owner
        chunk = chunk_file_name(owner, 0)
        offset = self._offsets.get((category, owner), 0)
        parts = self.partitions
        streams = self._streams.setdefault(category, set())
        streams.add(owner)
        parts.note_streams(category, frozenset(streams))
        try:
            await parts.process(category, owner, chunk, offset, data)
        except ProcessorError:
            parts.discard()  # as the runner does: nothing of the batch, in any partition
            raise
        await parts.commit()
        self._offsets[(category, owner)] = offset + len(data)

    def feed(self, category: str, *events: Any, owner: str | None = None) -> None:
        """:meth:`feed_async` for synchronous tests (not inside a running event loop)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            asyncio.run(self.feed_async(category, *events, owner=owner))
            return
        raise RuntimeError("Tester.feed() inside an event loop: use await tester.feed_async()")

    async def fire_timers_async(self, now: float) -> int:
        """Run the timers due at ``now`` (seconds since the epoch, as ``time.time()``) and
        commit; returns how many ran (the runner does this on its own, with the wall clock).

        Raises:
            ProcessorError: a timer raised under the ``stop`` policy (nothing committed).
        """
        parts = self.partitions
        try:
            ran = await parts.fire_timers(now)
        except ProcessorError:
            parts.discard()
            raise
        await parts.commit()
        return ran

    def fire_timers(self, now: float) -> int:
        """:meth:`fire_timers_async` for synchronous tests."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.fire_timers_async(now))
        raise RuntimeError("Tester.fire_timers() inside an event loop: use "
                           "await tester.fire_timers_async()")

    @property
    def table(self) -> dict[str, Any]:
        """The committed table (of all partitions together)."""
        merged: dict[str, Any] = {}
        for store in self.stores:
            merged.update(read_table(store))
        return merged

    def partition_tables(self) -> list[dict[str, Any]]:
        """The committed table of each partition, in partition order."""
        return [read_table(store) for store in self.stores]

    def get(self, key: str, default: Any = None) -> Any:
        return self.table.get(key, default)

    def emitted(self, category: str) -> list[Any]:
        """Events emitted to ``category`` so far (decoded, in order, with their IDs)."""
        return list(self._io.emitted.get(category, []))

    def dead_letters(self, category: str) -> list[Any]:
        """Events of ``category`` that were dead-lettered (with their errors)."""
        return self.emitted(f"{category}.dead")

    def sink_rows(self, name: str) -> list[Any]:
        """Rows staged for sink ``name`` by applied events."""
        return list(self._io.rows.get(name, []))

    @property
    def stats(self) -> dict[str, int]:
        """Counters: ``applied``, ``duplicates``, ``dead_lettered``, ``undecodable`` (of the
        dead-lettered: events the codec could not decode), ``dedup_pruned_young`` (IDs
        younger than ``DedupConfig.min_age`` that the count limit pruned)."""
        engines = self.partitions.engines
        return {"applied": sum(e.applied for e in engines),
                "duplicates": sum(e.duplicates for e in engines),
                "dead_lettered": sum(e.dead_lettered for e in engines),
                "undecodable": sum(e.undecodable for e in engines),
                "timers_run": sum(e.timers_run for e in engines),
                "timer_failures": sum(e.timer_failures for e in engines),
                "dedup_pruned_young": sum(e.dedup.pruned_young for e in engines)}


def _decoded(line: bytes) -> Any:
    """An emitted line as JSON; a raw text emit (``codec="str"``) as its text."""
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        return line.decode(errors="replace")


class _TesterIO:
    """The tester's effects: sink rows and emits are collected, acks are no-ops."""

    def __init__(self) -> None:
        self.emitted: dict[str, list[Any]] = {}
        self.rows: dict[str, list[Any]] = {}

    async def flush(self, sink: str, rows: list[Any]) -> None:
        self.rows.setdefault(sink, []).extend(rows)

    async def send(self, category: str, lines: list[bytes]) -> None:
        for line in lines:
            # The engine refuses over-size emits; this guards what it writes itself (dead
            # letters), which the runner could never send (not retriable: raised at once).
            if len(line) > MAX_MESSAGE_SIZE:
                raise MessageTooLargeError(
                    MAX_MESSAGE_SIZE, size=len(line), what=f"an event for {category!r}"
                )
        self.emitted.setdefault(category, []).extend(map(_decoded, lines))

    async def ack(self, checkpoint: Checkpoint, *, force: bool) -> None:
        """Nothing to ack in memory (the positions are committed in the store)."""
